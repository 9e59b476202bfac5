"""Model requests as durable steps: each attempt at a request is a `model: <name>` Prefect task."""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import dataclasses
import hashlib
import logging
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable, Iterator, Sequence
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic_ai.messages import (
    CapabilityEvent,
    ModelMessage,
    ModelResponse,
    ModelResponseStreamEvent,
    PartDeltaEvent,
    PartStartEvent,
    ToolCallPart,
)
from pydantic_ai.models import Model, ModelRequestParameters, StreamedResponse
from pydantic_ai.models.wrapper import WrapperModel
from pydantic_ai.settings import ModelSettings
from pydantic_ai.tools import RunContext

from prefect_pydantic_ai.compat.pydantic_ai import EventStreamResponse
from prefect_pydantic_ai.durable.journal import (
    ConversationDigest,
    canonical_json,
    dump_response,
    load_response,
    seal,
    step_key,
)
from prefect_pydantic_ai.durable.step_logs import install as install_step_logs
from prefect_pydantic_ai.durable.steps import NOTHING, StepPhase, StepResult, StepTasks
from prefect_pydantic_ai.ledger import Ledger, StepUsage
from prefect_pydantic_ai.store.step_names import StepKind

install_step_logs()  # every process that runs steps logs their failed attempts on one line each


@dataclass
class RunIdentity:
    """Where a run's steps live in the journal: the logical run, the agent and its ordinal in the flow run."""

    run_key: str
    agent: str
    ordinal: int


@dataclass(frozen=True)
class SubRun:
    """An agent run that finished inside a step of another run (a delegation): its agent and its ledger, as the
    delegating step's journal entry keeps them."""

    agent: str
    ledger: Ledger

    def to_json(self) -> dict[str, Any]:
        return {"agent": self.agent, "ledger": self.ledger.model_dump(mode="json")}

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> SubRun:
        return cls(agent=data["agent"], ledger=Ledger.model_validate(data["ledger"]))


class StepLog:
    """What each step of this attempt did. Executed model steps are priced as they complete, so what an attempt
    spent is known even if its process dies; replayed ones are priced when the attempt ends.

    A re-call of a completed logical run replays every step but saves nothing a recovery would have lost, so
    with `recall=True` its replays are not counted as saved. Sub-agent runs started in this attempt's steps are
    attached as they start, so what they spend is this attempt's spend too, even if the process dies in them.
    """

    def __init__(self, *, recall: bool = False) -> None:
        self.recall = recall
        self._spent = Ledger()
        self._replayed: list[ModelResponse] = []
        self._replayed_tools: list[str] = []
        self._sub_runs: list[tuple[str, StepLog]] = []
        self._replayed_sub_runs: list[SubRun] = []

    @property
    def spent(self) -> Ledger:
        """What this attempt executed so far, its sub-agent runs' included."""
        spent = self._spent
        for agent, log in self._sub_runs:
            spent = spent.with_sub_run(agent, log.spent)
        return spent

    def model(self, response: ModelResponse, replayed: bool) -> None:
        if not replayed:
            self._spent.record_model(StepUsage.from_response(response), replayed=False)
        elif not self.recall:
            self._replayed.append(response)

    def tool(self, name: str, replayed: bool) -> None:
        if not replayed:
            self._spent.record_tool(name, replayed=False)
        elif not self.recall:
            self._replayed_tools.append(name)

    def attach(self, agent: str, log: StepLog) -> None:
        """Count an attempt of a sub-agent run (its `log`) started in one of this attempt's steps as part of it."""
        self._sub_runs.append((agent, log))

    def replayed_sub_run(self, sub_run: SubRun) -> None:
        """A sub-agent run that a replayed step stood for: all it spent and saved is saved now."""
        if not self.recall:
            self._replayed_sub_runs.append(sub_run)

    def ledger(self) -> Ledger:
        """Spent (executed) vs saved (replayed) usage, calls and dollars of this attempt, sub-agent runs included."""
        ledger = self._spent.model_copy(deep=True)
        for response in self._replayed:
            ledger.record_model(StepUsage.from_response(response), replayed=True)
        for name in self._replayed_tools:
            ledger.record_tool(name, replayed=True)
        for agent, log in self._sub_runs:
            ledger = ledger.with_sub_run(agent, log.ledger())
        for sub_run in self._replayed_sub_runs:
            ledger = ledger.with_sub_run(sub_run.agent, sub_run.ledger.all_saved())
        return ledger


@dataclass
class _SubRunScope:
    """A step (or output function) in which agent runs may start: the run it belongs to, and the runs it started."""

    log: StepLog
    on_executed: Callable[[], Awaitable[None]] | None
    started: list[tuple[str, StepLog]] = field(default_factory=list)


_scope: contextvars.ContextVar[_SubRunScope | None] = contextvars.ContextVar(
    "ppa_sub_run_scope", default=None
)


@contextmanager
def sub_run_scope(
    log: StepLog, on_executed: Callable[[], Awaitable[None]] | None
) -> Iterator[list[tuple[str, StepLog]]]:
    """Agent runs started in this block are sub-runs of the run whose attempt `log` records; yields them (agent,
    log) as they start. `on_executed()` records that run's spend (a sub-run calls it after each executed step)."""
    scope = _SubRunScope(log, on_executed)
    token = _scope.set(scope)
    try:
        yield scope.started
    finally:
        _scope.reset(token)


def attach_sub_run(agent: str, log: StepLog) -> Callable[[], Awaitable[None]] | None:
    """Attach a starting agent run (its attempt's `log`) to the step it runs in, if any: the parent attempt's
    ledger includes it from now on. Returns what records the parent's spend, for the sub-run to call after each
    step it executes, so a process killed inside the sub-run leaves the parent's record true."""
    scope = _scope.get()
    if scope is None:
        return None
    scope.started.append((agent, log))
    scope.log.attach(agent, log)
    return scope.on_executed


class ModelSteps:
    """Numbers the model requests of one run and derives their keys from the conversation digest."""

    def __init__(
        self,
        identity: RunIdentity,
        tasks: StepTasks,
        digest: ConversationDigest,
        log: StepLog,
        on_executed: Callable[[], Awaitable[None]] | None = None,
        on_step: Callable[[str, StepPhase], Awaitable[None]] | None = None,
    ) -> None:
        """`on_executed()` runs after every executed (not replayed) model step: the attempt's spend is recorded.
        `on_step` hears every model and tool step of the run start and end executing (`StepTasks.run`)."""
        self.identity = identity
        self.tasks = tasks
        self.digest = digest
        self.log = log
        self.on_executed = on_executed
        self.on_step = on_step
        self.number = 0
        self._attempt = 0
        self._step_digest = ""
        self.tool_call_positions: dict[str, int] = {}
        self.emit: Callable[[CapabilityEvent], Awaitable[Any]] | None = None
        self._ahead: tuple[str, Any] | None = None  # (an attempt's key, its journal entry's data, read ahead)

    def begin(
        self,
        messages: Sequence[ModelMessage],
        parameters: ModelRequestParameters,
        emit: Callable[[CapabilityEvent], Awaitable[Any]] | None = None,
    ) -> None:
        """Start request step N: absorb the new messages and what the model is offered (tools, output schema).
        `emit` puts one of our events into the run's event stream (the capability's `RunContext.emit`)."""
        self.number += 1
        self.emit = emit
        self._attempt = 0
        conversation = self.digest.absorb(messages)
        offered = hashlib.sha256(canonical_json(_parameters_fingerprint(parameters))).hexdigest()
        self._step_digest = f"{conversation}:{offered}"

    def next_key(self) -> str:
        """The key of the next attempt in this step (a hook may re-attempt on another model)."""
        self._attempt += 1
        return self._attempt_key(self._attempt)

    def _attempt_key(self, attempt: int) -> str:
        return self.key("model", f"{self.number}.{attempt}", self._step_digest)

    async def prefetch(self, model_name: str) -> None:
        """Read the journal entry of this step's next attempt: `replaying` tells whether it will be replayed."""
        key = self._attempt_key(self._attempt + 1)
        data = await self.tasks.prefetch(model_name, key)
        self._ahead = None if data is NOTHING else (key, data)

    @property
    def replaying(self) -> bool:
        """Whether the next attempt of this step will come from the journal (`prefetch` found its entry)."""
        return self._ahead is not None and self._ahead[0] == self._attempt_key(self._attempt + 1)

    def key(self, kind: StepKind, step: str, digest: str, tool_name: str = "") -> str:
        """A step key of this run: its identity plus the step's own ordinal, kind, tool name and digest."""
        return step_key(
            run_key=self.identity.run_key,
            agent=self.identity.agent,
            agent_ordinal=self.identity.ordinal,
            kind=kind,
            step=step,
            tool_name=tool_name,
            digest=digest,
        )

    def end(self, response: ModelResponse) -> None:
        """Remember where each tool call sits in the response: its position keys the tool step."""
        self.tool_call_positions = {
            part.tool_call_id: index
            for index, part in enumerate(response.parts)
            if isinstance(part, ToolCallPart)
        }

    @property
    def step_digest(self) -> str:
        return self._step_digest

    async def request(self, model: Model, work: Any) -> ModelResponse:
        """Run one attempt of the current step through the journal; `work()` performs the real request."""

        async def execute() -> Any:
            return seal("model", dump_response(await work()))

        key = self.next_key()
        ahead, self._ahead = self._ahead, None
        journaled = ahead[1] if ahead is not None and ahead[0] == key else NOTHING
        result: StepResult = await self.tasks.run(
            model.model_name, key, execute, journaled=journaled, on_step=self.on_step
        )
        response = load_response(result.data)
        self.log.model(response, result.replayed)
        if result.replayed and self.emit is not None:
            calls = [p.tool_call_id for p in response.parts if isinstance(p, ToolCallPart)]
            replayed = StepReplayedEvent(
                step="model", request=self.number, model_name=response.model_name, tool_call_ids=calls
            )
            await self.emit(replayed)
        if not result.replayed and self.on_executed is not None:
            await self.on_executed()
        return response


def _parameters_fingerprint(parameters: ModelRequestParameters) -> Any:
    return {
        "tools": [(t.name, t.description, t.parameters_json_schema) for t in parameters.function_tools],
        "output_tools": [(t.name, t.description, t.parameters_json_schema) for t in parameters.output_tools],
        "output_mode": parameters.output_mode,
        "allow_text_output": parameters.allow_text_output,
    }


class DurableModel(WrapperModel):
    """The run's model, with every request sent from inside a journaled Prefect task.

    A streamed request streams live: the step task opens the wrapped model's stream and forwards each event to
    the consumer as the provider produces it, then journals the completed response. A replayed step re-emits
    its journaled response as a stream at once.
    """

    def __init__(self, wrapped: Model, steps: Callable[[], ModelSteps]) -> None:
        """`steps()` gives the current run's model steps (they exist once the run has started)."""
        super().__init__(wrapped)
        self._steps = steps

    async def request(
        self,
        messages: list[ModelMessage],
        model_settings: ModelSettings | None,
        model_request_parameters: ModelRequestParameters,
    ) -> ModelResponse:
        return await self._steps().request(
            self.wrapped,
            lambda: self.wrapped.request(messages, model_settings, model_request_parameters),
        )

    def prepare_messages(
        self, messages: list[ModelMessage], model_request_parameters: ModelRequestParameters | None = None
    ) -> list[ModelMessage]:
        """The wrapped model's preparation of the history, skipped for a step the journal answers: no request is
        sent, and preparing a long history is most of what a replayed step would cost."""
        if self._steps().replaying:
            return messages
        return super().prepare_messages(messages, model_request_parameters)

    @asynccontextmanager
    async def request_stream(
        self,
        messages: list[ModelMessage],
        model_settings: ModelSettings | None,
        model_request_parameters: ModelRequestParameters,
        run_context: RunContext[Any] | None = None,
    ) -> AsyncGenerator[StreamedResponse]:
        steps = self._steps()
        stream = _LiveStream(
            model_request_parameters=model_request_parameters, model=self.wrapped, emit=steps.emit
        )

        async def attempt() -> ModelResponse:
            async with self.wrapped.request_stream(
                messages, model_settings, model_request_parameters, run_context
            ) as inner:
                return await stream.forward(inner)

        stream.start(steps.request(self.wrapped, attempt))
        try:
            yield stream
        finally:
            await stream.close()


logger = logging.getLogger(__name__)
_END = object()


@dataclass(kw_only=True)
class StreamRetryEvent(CapabilityEvent, namespace="prefect_pydantic_ai"):
    """A streamed model step is being retried after its failed attempt had streamed parts: those parts are
    discarded (the run continues with the retry's response alone), and the retry streams new ones."""

    attempt: int
    """The attempt that is starting (2 for the first retry)."""
    discarded_parts: list[int]
    """The indices of the parts the consumer was shown and must drop."""


@dataclass(kw_only=True)
class StepReplayedEvent(CapabilityEvent, namespace="prefect_pydantic_ai"):
    """A step of the run was answered from the journal instead of executed: a model request (`step="model"`,
    `tool_call_ids` the calls its response asked for) or a tool call (`step="tool"`, `tool_call_id` and
    `tool_name` that call's). What a page that shows the run marks as replayed."""

    step: Literal["model", "tool"]
    request: int
    """The ordinal of the model request (from 1) that is, or asked for, the step."""
    model_name: str | None = None
    tool_call_ids: list[str] = field(default_factory=list)


class _LiveStream(EventStreamResponse):
    """The consumer's side of a streamed model step: the events of the step task's stream as they arrive, or
    the journaled response's parts when the step was replayed.

    The step task runs ahead of the consumer (a provider's burst of deltas is parsed at once), so the events
    go through a queue, and this stream's own parts are built from the events as the consumer takes them:
    what `get()` shows is always what the consumer was shown, never the provider's parts ahead of it.
    Each attempt's events are forwarded with their part indices shifted past the parts of earlier (failed)
    attempts, so a retry's events never extend a discarded partial part: they start new parts. The response
    the run continues with is the journaled one, the successful attempt's alone.
    """

    def __init__(
        self,
        *,
        model_request_parameters: ModelRequestParameters,
        model: Model,
        emit: Callable[[CapabilityEvent], Awaitable[Any]] | None = None,
    ) -> None:
        super().__init__(model_request_parameters=model_request_parameters)
        self._model = model
        self._emit = emit
        self._attempts = 0
        self._queue: asyncio.Queue[Any] = asyncio.Queue()
        self._step: asyncio.Task[ModelResponse] | None = None
        self._response: ModelResponse | None = None
        self._forwarded = False
        self._next_index = 0  # the first part index free for the next attempt's parts
        self._shown: list[int] = []  # the parts the current attempt started

    def start(self, step: Awaitable[ModelResponse]) -> None:
        async def run() -> ModelResponse:
            try:
                return await step
            finally:
                self._queue.put_nowait(_END)

        self._step = asyncio.ensure_future(run())

    async def forward(self, inner: StreamedResponse) -> ModelResponse:
        """One attempt of the step, inside its task: pass each event of `inner` on, return what it streamed."""
        self._attempts += 1
        if self._shown:
            self._queue.put_nowait(StreamRetryEvent(attempt=self._attempts, discarded_parts=self._shown))
            self._shown = []
        offset = self._next_index
        async for event in inner:
            if isinstance(event, PartStartEvent | PartDeltaEvent):
                index = event.index + offset
                self._next_index = max(self._next_index, index + 1)
                if isinstance(event, PartStartEvent):
                    self._shown.append(index)
                self._forwarded = True
                self._queue.put_nowait(dataclasses.replace(event, index=index))
        return inner.get()

    async def _discarded(self, retry: StreamRetryEvent) -> None:
        """Tell the consumer that the parts a failed attempt streamed are discarded: the retry streams anew."""
        logger.warning(
            "Model %s: a failed attempt had streamed %d part(s); they are discarded, attempt %d streams anew.",
            self._model.model_name,
            len(retry.discarded_parts),
            retry.attempt,
        )
        if self._emit is not None:
            await self._emit(retry)

    async def events(self) -> AsyncIterator[ModelResponseStreamEvent]:
        assert self._step is not None
        while (item := await self._queue.get()) is not _END:
            if isinstance(item, StreamRetryEvent):
                await self._discarded(item)
                continue
            self.apply_event(item)
            yield item
        self._response = await self._step
        self.set_usage(self._response.usage)
        if not self._forwarded:  # replayed from the journal: its parts, at once
            for index, part in enumerate(self._response.parts):
                yield self.part_event(index, part)

    async def close(self) -> None:
        """Leave the step only once it has finished: drained by the consumer, or cancelled when abandoned."""
        if self._step is not None and not self._step.done():
            self._step.cancel()
            with contextlib.suppress(BaseException):
                await self._step

    def get(self) -> ModelResponse:
        return self._response if self._response is not None else super().get()

    @property
    def model_name(self) -> str:
        return self._response.model_name or "" if self._response is not None else self._model.model_name

    @property
    def provider_name(self) -> str | None:
        return self._response.provider_name if self._response is not None else self._model.system

    @property
    def provider_url(self) -> str | None:
        return self._response.provider_url if self._response is not None else None

    @property
    def timestamp(self) -> Any:
        return self._response.timestamp if self._response is not None else datetime.now(UTC)
