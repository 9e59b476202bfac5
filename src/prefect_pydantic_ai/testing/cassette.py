"""Replaying a cassette (`prefect-pydantic-ai export RUN -o run.json`) in a test: the recorded run's model
responses and tool results stand in for the models and the tools, with no Prefect server and no network.

    cassette = Cassette.load("tests/cassettes/analyst.json")
    replay = cassette.replay()
    result = await agent.run(cassette.prompt, deps=frame, capabilities=[replay])
    replay.assert_done()

The agent under test runs for real (its instructions, output validation, tool argument validation); only the
model and the tools' work are the recording. A cassette of several agent runs (a `@flow` that ran two agents, a
coordinator whose tool delegated to a sub-agent) is played by one `replay` given to each of those runs: each run
plays the recorded run of its agent (by name, the one with its prompt first), so requests are matched per agent.
A tool step that ran sub-agents is answered from its recorded result, like any tool; the sub-agents' own steps
are played when those agents run with the replay. Streamed runs (`run_stream`, `iter`, an `event_stream_handler`)
get each recorded response as a stream.

Whenever an agent asks for something the cassette does not hold (a request whose prompt or tool results differ
from the recorded ones, a tool call with other arguments, one request more than was recorded, an agent it holds
no run of), the run stops with `CassetteMismatch`, whose message names the agent and diffs recorded vs asked.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pydantic_core
from pydantic_ai.capabilities import AbstractCapability, CapabilityOrdering
from pydantic_ai.messages import (
    ModelMessage,
    ModelRequest,
    ModelResponse,
    RetryPromptPart,
    ToolCallPart,
    ToolReturnPart,
    UserPromptPart,
)
from pydantic_ai.models import CompletedStreamedResponse, Model, ModelRequestParameters, StreamedResponse
from pydantic_ai.settings import ModelSettings
from pydantic_ai.tools import RunContext, ToolDefinition

from prefect_pydantic_ai.durable.journal import load_response
from prefect_pydantic_ai.durable.tool_step import replay_outcome
from prefect_pydantic_ai.ops.export import CASSETTE_FORMAT

_ONE_RUN_FORMAT = "prefect-pydantic-ai/cassette/1"
"""The first format: one agent run, its fields at the top level."""


class CassetteMismatch(AssertionError):
    """An agent under test asked for something the cassette does not hold; the message names it and is a diff."""


@dataclass(frozen=True)
class RecordedRun:
    """One agent run of a cassette, as `export` wrote it."""

    agent: str
    ordinal: int
    within: tuple[int, int] | None
    """For a sub-agent run: (the index in `Cassette.runs` of the run that started it, that run's step #)."""
    prompt: str | None
    deps: Any
    """The run's deps as journaled (JSON; a DataFrame in pandas' `split` form)."""
    output: Any
    """The run's output, as JSON."""
    steps: list[dict[str, Any]]

    @classmethod
    def of(cls, data: dict[str, Any]) -> RecordedRun:
        within = data.get("within")
        return cls(
            agent=data["agent"],
            ordinal=data.get("ordinal", 0),
            within=(within["run"], within["step"]) if within else None,
            prompt=data.get("prompt"),
            deps=data.get("deps"),
            output=data.get("output"),
            steps=list(data["steps"]),
        )


class Cassette:
    """A recorded flow run's agent runs, as `export` wrote them; `prompt`, `deps`, `output` and `steps` are its
    first run's."""

    def __init__(self, document: dict[str, Any], source: str = "cassette") -> None:
        kind = document.get("format")
        if kind not in (CASSETTE_FORMAT, _ONE_RUN_FORMAT):
            raise ValueError(
                f"{source} is not a cassette of format {CASSETTE_FORMAT} (write one with `export`)."
            )
        self.document = document
        self.source = source
        self.runs = [RecordedRun.of(r) for r in (document["runs"] if kind == CASSETTE_FORMAT else [document])]

    @classmethod
    def load(cls, path: str | Path) -> Cassette:
        return cls(json.loads(Path(path).read_text()), str(path))

    @property
    def prompt(self) -> str | None:
        return self.runs[0].prompt

    @property
    def deps(self) -> Any:
        return self.runs[0].deps

    @property
    def output(self) -> Any:
        return self.runs[0].output

    @property
    def steps(self) -> list[dict[str, Any]]:
        return list(self.runs[0].steps)

    def replay(self) -> CassetteReplay:
        """A capability that plays this cassette's agent runs: give it to each run under test."""
        return CassetteReplay(self)


@dataclass
class _Play:
    """How far the test got through one recorded run."""

    run: RecordedRun
    index: int
    label: str
    """How messages name the run: its agent, and which of its runs when the cassette holds several."""
    started: bool = False
    covered: bool = False
    """A sub-agent run whose delegating tool step was answered from its recorded result."""
    requests: int = 0
    tools: list[dict[str, Any]] = field(default_factory=list)
    """The recorded tool steps after the model step last answered, not called yet."""

    @property
    def models(self) -> list[dict[str, Any]]:
        return [s for s in self.run.steps if s["kind"] == "model"]

    @property
    def unasked(self) -> list[dict[str, Any]]:
        """The steps from the first model step not asked for yet on."""
        models = self.models
        if self.requests >= len(models):
            return []
        return self.run.steps[self.run.steps.index(models[self.requests]) :]


class CassetteReplay(AbstractCapability[Any]):
    """Answers agent runs' model requests and tool calls from a cassette, each run from its agent's recording."""

    def __init__(self, cassette: Cassette) -> None:
        self.cassette = cassette
        agents = [r.agent for r in cassette.runs]
        self._plays = [
            _Play(
                run, index, _label(run.agent, agents[: index + 1].count(run.agent), agents.count(run.agent))
            )
            for index, run in enumerate(cassette.runs)
        ]
        self.tool_calls = 0
        """Tool calls answered from the recording, over every run."""

    def get_ordering(self) -> CapabilityOrdering:
        return CapabilityOrdering(position="innermost")

    async def for_run(self, ctx: RunContext[Any]) -> AbstractCapability[Any]:
        agent = ctx.agent.name if ctx.agent is not None else None
        return _PlayedRun(self, self._claim(agent, ctx.prompt))

    def _claim(self, agent: str | None, prompt: Any) -> _Play:
        """The recorded run an agent run plays: the next unplayed one of its agent, one with its prompt first
        (an unnamed agent plays the next run the cassette holds at top level)."""
        free = [
            p
            for p in self._plays
            if not p.started and (p.run.agent == agent if agent is not None else p.run.within is None)
        ]
        if not free:
            held = ", ".join(dict.fromkeys(p.run.agent for p in self._plays))
            raise CassetteMismatch(
                f"{self.cassette.source}: agent {agent!r} ran, and the cassette holds no other run of it "
                f"(it holds runs of {held})"
            )
        play = next((p for p in free if p.run.prompt == prompt), free[0])
        play.started = True
        return play

    def assert_done(self) -> None:
        """Every run that played was played to its end, and every run the cassette holds at top level played
        (a sub-agent run counts as played when its delegating tool step was answered)."""
        left: list[str] = []
        for play in self._plays:
            if play.started:
                steps = [*play.tools, *play.unasked]
            elif play.run.within is None or not play.covered:
                steps = play.run.steps
            else:
                continue
            left += [
                f"{play.label} #{s['step']} {s['kind']} {s.get('tool') or s.get('model')}" for s in steps
            ]
        if left:
            raise CassetteMismatch(
                f"{self.cassette.source}: the runs ended before these steps: {', '.join(left)}"
            )

    def answer(
        self, play: _Play, messages: list[ModelMessage], parameters: ModelRequestParameters
    ) -> ModelResponse:
        """The recorded response to this request of `play`'s run, after checking it is the recorded request."""
        asked = _request_parts(messages, {t.name for t in parameters.function_tools})
        models = play.models
        if play.requests >= len(models):
            raise CassetteMismatch(
                self._diff(
                    play,
                    f"model request {play.requests + 1} is not in the cassette (it holds {len(models)})",
                    None,
                    asked,
                )
            )
        recorded = models[play.requests]
        if play.tools:
            calls = ", ".join(f"{t['tool']}({_args(t['args'])})" for t in play.tools)
            raise CassetteMismatch(
                f"{self.cassette.source}: {play.label}: the agent asked the model again before calling {calls} "
                f"as recorded before step #{recorded['step']}"
            )
        if _json(recorded["request"]) != _json(asked):
            raise CassetteMismatch(
                self._diff(
                    play,
                    f"model step #{recorded['step']} was asked something else",
                    recorded["request"],
                    asked,
                )
            )
        play.requests += 1
        following = play.run.steps[play.run.steps.index(recorded) + 1 :]
        play.tools = []
        for step in following:
            if step["kind"] == "model":
                break
            play.tools.append(step)
        return load_response(recorded["response"])

    def call(self, play: _Play, call: ToolCallPart) -> Any:
        """The recorded result of this tool call of `play`'s run (its delegated sub-agent runs are covered)."""
        asked = {"tool": call.tool_name, "args": call.args_as_dict()}
        for step in play.tools:
            if step["tool"] == call.tool_name and (
                step["args"] is None or _json(step["args"]) == _json(asked["args"])
            ):
                play.tools.remove(step)
                self.tool_calls += 1
                for sub in self._plays:
                    sub.covered = sub.covered or sub.run.within == (play.index, step["step"])
                return replay_outcome(step["result"])
        recorded = [{"tool": t["tool"], "args": t["args"]} for t in play.tools]
        raise CassetteMismatch(self._diff(play, "a tool call is not in the cassette", recorded, asked))

    def _diff(self, play: _Play, what: str, recorded: Any, asked: Any) -> str:
        lines = difflib.unified_diff(
            _pretty(recorded).splitlines(),
            _pretty(asked).splitlines(),
            fromfile="recorded",
            tofile="asked",
            lineterm="",
        )
        return f"{self.cassette.source}: {play.label}: {what}:\n" + "\n".join(lines)


class _PlayedRun(AbstractCapability[Any]):
    """The replay as one agent run sees it: the models and tools of that run, answered from its recording."""

    def __init__(self, replay: CassetteReplay, play: _Play) -> None:
        self._replay = replay
        self._play = play

    def get_ordering(self) -> CapabilityOrdering:
        return CapabilityOrdering(position="innermost")

    def get_wrapper_model(self, model: Model) -> Model:
        return _CassetteModel(
            model, lambda messages, parameters: self._replay.answer(self._play, messages, parameters)
        )

    async def wrap_tool_execute(
        self,
        ctx: RunContext[Any],
        *,
        call: ToolCallPart,
        tool_def: ToolDefinition,
        args: dict[str, Any],
        handler: Callable[[dict[str, Any]], Awaitable[Any]],
    ) -> Any:
        return self._replay.call(self._play, call)


class _CassetteModel(Model):
    """The model of a cassette replay: each request, streamed or not, answered by the next recorded response."""

    def __init__(
        self, recorded: Model, answer: Callable[[list[ModelMessage], ModelRequestParameters], ModelResponse]
    ) -> None:
        super().__init__()
        self._recorded = recorded
        self._answer = answer

    async def request(
        self,
        messages: list[ModelMessage],
        model_settings: ModelSettings | None,
        model_request_parameters: ModelRequestParameters,
    ) -> ModelResponse:
        return self._answer(messages, model_request_parameters)

    @asynccontextmanager
    async def request_stream(
        self,
        messages: list[ModelMessage],
        model_settings: ModelSettings | None,
        model_request_parameters: ModelRequestParameters,
        run_context: RunContext[Any] | None = None,
    ) -> AsyncIterator[StreamedResponse]:
        """The recorded response, its parts streamed one event each (a streamed step journals its whole
        response, not the provider's deltas)."""
        response = self._answer(messages, model_request_parameters)
        yield CompletedStreamedResponse(
            response, model_request_parameters=model_request_parameters, replay_events=True
        )

    @property
    def model_name(self) -> str:
        return self._recorded.model_name

    @property
    def system(self) -> str:
        return self._recorded.system


def _label(agent: str, nth: int, of: int) -> str:
    return agent if of == 1 else f"{agent} (run {nth} of {of})"


def _request_parts(messages: list[ModelMessage], tools: set[str]) -> list[dict[str, Any]]:
    """What is new in the last request, as a cassette writes it: the user prompt, then the function tools'
    results and retries (output tools and everything else are the agent's own, not the recording's)."""
    last = messages[-1] if messages and isinstance(messages[-1], ModelRequest) else None
    parts: list[dict[str, Any]] = []
    for part in last.parts if last is not None else []:
        if isinstance(part, UserPromptPart) and len(messages) == 1:
            parts.append({"user_prompt": part.content})
        elif isinstance(part, ToolReturnPart) and part.tool_name in tools:
            parts.append({"tool": part.tool_name, "content": _jsonable(part.content)})
        elif isinstance(part, RetryPromptPart) and part.tool_name in tools:
            message = part.content if isinstance(part.content, str) else _jsonable(part.content)
            parts.append({"tool": part.tool_name, "retry": message})
    return parts


def _jsonable(value: Any) -> Any:
    return pydantic_core.to_jsonable_python(value, fallback=repr)


def _json(value: Any) -> str:
    return json.dumps(_jsonable(value), sort_keys=True)


def _pretty(value: Any) -> str:
    return json.dumps(_jsonable(value), sort_keys=True, indent=1)


def _args(args: Any) -> str:
    return ", ".join(f"{k}={v!r}" for k, v in (args or {}).items())
