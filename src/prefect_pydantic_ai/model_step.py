"""Model requests as durable steps: each attempt at a request is a `model: <name>` Prefect task."""

from __future__ import annotations

import hashlib
from collections.abc import AsyncGenerator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import Any

from pydantic_ai.messages import ModelMessage, ModelResponse, ToolCallPart
from pydantic_ai.models import Model, ModelRequestParameters, StreamedResponse
from pydantic_ai.models.wrapper import WrapperModel
from pydantic_ai.settings import ModelSettings
from pydantic_ai.tools import RunContext

from .journal import (
    ConversationDigest,
    StepKind,
    canonical_json,
    dump_response,
    load_response,
    seal,
    step_key,
)
from .ledger import Ledger, StepUsage
from .step_logs import install as install_step_logs
from .steps import StepResult, StepTasks

install_step_logs()  # every process that runs steps logs their failed attempts on one line each


@dataclass
class RunIdentity:
    """Where a run's steps live in the journal: the logical run, the agent and its ordinal in the flow run."""

    run_key: str
    agent: str
    ordinal: int


class StepLog:
    """What each step of this attempt did. Executed model steps are priced as they complete, so what an attempt
    spent is known even if its process dies; replayed ones are priced when the attempt ends.

    A re-call of a completed logical run replays every step but saves nothing a recovery would have lost, so
    with `recall=True` its replays are not counted as saved.
    """

    def __init__(self, *, recall: bool = False) -> None:
        self.recall = recall
        self.spent = Ledger()
        self._replayed: list[ModelResponse] = []
        self._replayed_tools: list[str] = []

    def model(self, response: ModelResponse, replayed: bool) -> None:
        if not replayed:
            self.spent.record_model(StepUsage.from_response(response), replayed=False)
        elif not self.recall:
            self._replayed.append(response)

    def tool(self, name: str, replayed: bool) -> None:
        if not replayed:
            self.spent.record_tool(name, replayed=False)
        elif not self.recall:
            self._replayed_tools.append(name)

    def ledger(self) -> Ledger:
        """Spent (executed) vs saved (replayed) usage, calls and dollars of this attempt."""
        ledger = self.spent.model_copy(deep=True)
        for response in self._replayed:
            ledger.record_model(StepUsage.from_response(response), replayed=True)
        for name in self._replayed_tools:
            ledger.record_tool(name, replayed=True)
        return ledger


class ModelSteps:
    """Numbers the model requests of one run and derives their keys from the conversation digest."""

    def __init__(
        self,
        identity: RunIdentity,
        tasks: StepTasks,
        digest: ConversationDigest,
        log: StepLog,
        on_executed: Callable[[], Awaitable[None]] | None = None,
    ) -> None:
        """`on_executed()` runs after every executed (not replayed) model step: the attempt's spend is recorded."""
        self.identity = identity
        self.tasks = tasks
        self.digest = digest
        self.log = log
        self.on_executed = on_executed
        self.number = 0
        self._attempt = 0
        self._step_digest = ""
        self.tool_call_positions: dict[str, int] = {}

    def begin(self, messages: Sequence[ModelMessage], parameters: ModelRequestParameters) -> None:
        """Start request step N: absorb the new messages and what the model is offered (tools, output schema)."""
        self.number += 1
        self._attempt = 0
        conversation = self.digest.absorb(messages)
        offered = hashlib.sha256(canonical_json(_parameters_fingerprint(parameters))).hexdigest()
        self._step_digest = f"{conversation}:{offered}"

    def next_key(self) -> str:
        """The key of the next attempt in this step (a hook may re-attempt on another model)."""
        self._attempt += 1
        return self.key("model", f"{self.number}.{self._attempt}", self._step_digest)

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

        result: StepResult = await self.tasks.run(model.model_name, self.next_key(), execute)
        response = load_response(result.data)
        self.log.model(response, result.replayed)
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

    A streamed request is served from the same journaled request and replayed as a stream, so a durable run
    never holds a half-finished stream that cannot be replayed.
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

    @asynccontextmanager
    async def request_stream(
        self,
        messages: list[ModelMessage],
        model_settings: ModelSettings | None,
        model_request_parameters: ModelRequestParameters,
        run_context: RunContext[Any] | None = None,
    ) -> AsyncGenerator[StreamedResponse]:
        response = await self.request(messages, model_settings, model_request_parameters)
        yield _ReplayedStream(model_request_parameters=model_request_parameters, response=response)


class _ReplayedStream(StreamedResponse):
    """A finished response presented as a stream: one event per part."""

    def __init__(self, *, model_request_parameters: ModelRequestParameters, response: ModelResponse) -> None:
        super().__init__(model_request_parameters=model_request_parameters)
        self._response = response
        self._usage = response.usage

    async def _get_event_iterator(self) -> Any:
        for index, part in enumerate(self._response.parts):
            event = self._parts_manager.handle_part(vendor_part_id=index, part=part)
            yield event

    @property
    def model_name(self) -> str:
        return self._response.model_name or ""

    @property
    def provider_name(self) -> str | None:
        return self._response.provider_name

    @property
    def provider_url(self) -> str | None:
        return self._response.provider_url

    @property
    def timestamp(self) -> Any:
        return self._response.timestamp
