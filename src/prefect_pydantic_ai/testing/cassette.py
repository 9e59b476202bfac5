"""Replaying a cassette (`prefect-pydantic-ai export RUN -o run.json`) in a test: the recorded run's model
responses and tool results stand in for the model and the tools, with no Prefect server and no network.

    cassette = Cassette.load("tests/cassettes/analyst.json")
    replay = cassette.replay()
    result = await agent.run(cassette.prompt, deps=frame, capabilities=[replay])
    replay.assert_done()

The agent under test runs for real (its instructions, output validation, tool argument validation); only the
model and the tools' work are the recording. Whenever the agent asks for something the cassette does not hold (a
request whose prompt or tool results differ from the recorded ones, a tool call with other arguments, one request
more than was recorded), the run stops with `CassetteMismatch`, whose message is a diff of recorded vs asked.
"""

from __future__ import annotations

import difflib
import json
from collections.abc import Awaitable, Callable
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
from pydantic_ai.models import Model, ModelRequestParameters
from pydantic_ai.settings import ModelSettings
from pydantic_ai.tools import RunContext, ToolDefinition

from prefect_pydantic_ai.durable.journal import load_response
from prefect_pydantic_ai.durable.tool_step import replay_outcome
from prefect_pydantic_ai.ops.export import CASSETTE_FORMAT


class CassetteMismatch(AssertionError):
    """The agent under test asked for something the cassette does not hold; the message is a diff."""


class Cassette:
    """A recorded run, as `export` wrote it."""

    def __init__(self, document: dict[str, Any], source: str = "cassette") -> None:
        if document.get("format") != CASSETTE_FORMAT:
            raise ValueError(
                f"{source} is not a cassette of format {CASSETTE_FORMAT} (write one with `export`)."
            )
        self.document = document
        self.source = source

    @classmethod
    def load(cls, path: str | Path) -> Cassette:
        return cls(json.loads(Path(path).read_text()), str(path))

    @property
    def prompt(self) -> str | None:
        return self.document.get("prompt")

    @property
    def deps(self) -> Any:
        """The run's deps as journaled (JSON; a DataFrame in pandas' `split` form)."""
        return self.document.get("deps")

    @property
    def output(self) -> Any:
        """The recorded run's output, as JSON."""
        return self.document.get("output")

    @property
    def steps(self) -> list[dict[str, Any]]:
        return list(self.document["steps"])

    def replay(self) -> CassetteReplay:
        """A capability that plays this cassette for one agent run."""
        return CassetteReplay(self)


class CassetteReplay(AbstractCapability[Any]):
    """Answers one run's model requests and tool calls from a cassette, in the recorded order."""

    def __init__(self, cassette: Cassette) -> None:
        self.cassette = cassette
        self._models = [s for s in cassette.steps if s["kind"] == "model"]
        self._tools: list[dict[str, Any]] = []  # the recorded tool steps after the model step last answered
        self._requests = 0
        self.tool_calls = 0

    def get_ordering(self) -> CapabilityOrdering:
        return CapabilityOrdering(position="innermost")

    def get_wrapper_model(self, model: Model) -> Model:
        return _CassetteModel(model, self)

    def assert_done(self) -> None:
        """Every recorded model response and tool result was asked for."""
        left = self._models[self._requests :]
        if left or self._tools:
            steps = [
                f"#{s['step']} {s['kind']} {s.get('tool') or s.get('model')}" for s in [*self._tools, *left]
            ]
            raise CassetteMismatch(
                f"{self.cassette.source}: the run ended before these steps: {', '.join(steps)}"
            )

    def answer(self, messages: list[ModelMessage], parameters: ModelRequestParameters) -> ModelResponse:
        """The recorded response to this request, after checking the request is the recorded one."""
        asked = _request_parts(messages, {t.name for t in parameters.function_tools})
        if self._requests >= len(self._models):
            raise CassetteMismatch(
                self._diff(
                    f"model request {self._requests + 1} is not in the cassette "
                    f"(it holds {len(self._models)})",
                    None,
                    asked,
                )
            )
        recorded = self._models[self._requests]
        if self._tools:
            calls = ", ".join(f"{t['tool']}({_args(t['args'])})" for t in self._tools)
            raise CassetteMismatch(
                f"{self.cassette.source}: the agent asked the model again before calling {calls} "
                f"as recorded before step #{recorded['step']}"
            )
        if _json(recorded["request"]) != _json(asked):
            raise CassetteMismatch(
                self._diff(
                    f"model step #{recorded['step']} was asked something else", recorded["request"], asked
                )
            )
        self._requests += 1
        following = self.cassette.steps[self.cassette.steps.index(recorded) + 1 :]
        self._tools = []
        for step in following:
            if step["kind"] == "model":
                break
            self._tools.append(step)
        return load_response(recorded["response"])

    async def wrap_tool_execute(
        self,
        ctx: RunContext[Any],
        *,
        call: ToolCallPart,
        tool_def: ToolDefinition,
        args: dict[str, Any],
        handler: Callable[[dict[str, Any]], Awaitable[Any]],
    ) -> Any:
        asked = {"tool": call.tool_name, "args": call.args_as_dict()}
        for step in self._tools:
            if step["tool"] == call.tool_name and (
                step["args"] is None or _json(step["args"]) == _json(asked["args"])
            ):
                self._tools.remove(step)
                self.tool_calls += 1
                return replay_outcome(step["result"])
        recorded = [{"tool": t["tool"], "args": t["args"]} for t in self._tools]
        raise CassetteMismatch(self._diff("a tool call is not in the cassette", recorded, asked))

    def _diff(self, what: str, recorded: Any, asked: Any) -> str:
        lines = difflib.unified_diff(
            _pretty(recorded).splitlines(),
            _pretty(asked).splitlines(),
            fromfile="recorded",
            tofile="asked",
            lineterm="",
        )
        return f"{self.cassette.source}: {what}:\n" + "\n".join(lines)


class _CassetteModel(Model):
    """The model of a cassette replay: each request answered by the next recorded response."""

    def __init__(self, recorded: Model, replay: CassetteReplay) -> None:
        super().__init__()
        self._recorded = recorded
        self._replay = replay

    async def request(
        self,
        messages: list[ModelMessage],
        model_settings: ModelSettings | None,
        model_request_parameters: ModelRequestParameters,
    ) -> ModelResponse:
        return self._replay.answer(messages, model_request_parameters)

    @property
    def model_name(self) -> str:
        return self._recorded.model_name

    @property
    def system(self) -> str:
        return self._recorded.system


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
