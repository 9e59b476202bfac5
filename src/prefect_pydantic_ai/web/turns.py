"""Running one chat turn as a durable run and writing what the browser is sent to the turn's event log.

The turn is `agent.run(prompt, idempotency_key="chat:<conversation>:<turn>")`: a server that was killed mid-turn
runs it again under the same key, every completed model request and tool call replays from the journal, and the
first one that did not complete runs live. The run's events go through pydantic-ai's `VercelAIEventStream` (the
Vercel AI data stream protocol) into the log.

A resumed run produces its events again from the start (a replayed step re-emits its response at once), so the
log cannot be continued by counting events. It is continued by *segment* instead: the part before the run's
first event is segment 0, each node the run streams (a model request, the tool calls of a response; pydantic-ai
hands each to `event_stream_handler` once) is segment 1, 2, ..., and the end of the run is `FINAL`. A segment
whose events are all in the log is marked complete, and a resumed run writes none of its events again. A
segment the killed process had begun is sent anew; before its first event a `data-discard` event names the
text parts and approval cards of the interrupted attempt, which the page removes (a tool call keeps its id and
is updated in place).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterable, AsyncIterator
from typing import Any, Literal

from pydantic_ai.agent import AbstractAgent
from pydantic_ai.messages import AgentStreamEvent
from pydantic_ai.run import AgentRunResult, AgentRunResultEvent
from pydantic_ai.tools import RunContext
from pydantic_ai.ui.vercel_ai import VercelAIEventStream
from pydantic_ai.ui.vercel_ai.response_types import BaseChunk, DataChunk, ToolApprovalRequestChunk

from prefect_pydantic_ai.durable.capability import idempotency_key
from prefect_pydantic_ai.durable.report import ledger_of, usage_json
from prefect_pydantic_ai.durable.wait import observing_waits
from prefect_pydantic_ai.store.waits import PendingCall
from prefect_pydantic_ai.web.conversations import Conversations
from prefect_pydantic_ai.web.event_log import LogState, TurnLog

SDK_VERSION: Literal[6] = 6
"""The Vercel AI SDK version the stream targets (6 and later know tool approval requests)."""

FINAL = 1_000_000
"""The segment of the events after the run's last node: its result, the finish."""

_TEXT_STARTS = ("text-start", "reasoning-start")


def turn_key(conversation: str, turn: int) -> str:
    """The idempotency key of a turn's durable run."""
    return f"chat:{conversation}:{turn}"


class _Ended:
    """The queue item after the run's last event."""


class TurnWriter:
    """Writes one attempt of a turn's events to its log, skipping the segments the log already holds."""

    def __init__(self, log: TurnLog) -> None:
        self.log = log
        state: LogState = log.read()
        self._complete = state.complete
        self._earlier: dict[int, list[str]] = {}
        for data, segment in zip(state.events, state.segments, strict=True):
            self._earlier.setdefault(segment, []).append(data)
        self._begun: set[int] = set()
        self.segment = 0

    def write(self, chunk: BaseChunk) -> None:
        """Write `chunk`, produced in the current segment, unless that segment is already complete."""
        segment = self.segment
        if segment in self._complete:
            return
        if segment not in self._begun:
            self._begun.add(segment)
            interrupted = [_discardable(data) for data in self._earlier.get(segment, [])]
            ids = [i for i in interrupted if i is not None]
            if ids:
                self.log.append(
                    DataChunk(type="data-discard", data={"ids": ids}).encode(SDK_VERSION), segment
                )
        self.log.append(chunk.encode(SDK_VERSION), segment)

    def complete(self, segment: int) -> None:
        if segment not in self._complete:
            self._complete.add(segment)
            self.log.mark_complete(segment)


def _discardable(data: str) -> str | None:
    """The id a `data-discard` names to remove what `data` showed: a text part, or an approval card (whose wait
    the resumed run asks again, in a flow run of its own)."""
    if not data.startswith("{"):
        return None
    chunk = json.loads(data)
    if chunk.get("type") in _TEXT_STARTS:
        return str(chunk["id"])
    if chunk.get("type") == "data-approval":
        return f"approval:{chunk['data']['run_id']}"
    return None


async def run_turn(
    agent: AbstractAgent[Any, Any], conversations: Conversations, conversation: str, turn: int
) -> None:
    """Run (or resume) turn `turn` of `conversation` to its end, writing its events to its log."""
    log = conversations.log(conversation, turn)
    if log.read().ended:
        return
    writer = TurnWriter(log)
    queue: asyncio.Queue[
        tuple[int, AgentStreamEvent | AgentRunResultEvent[Any] | BaseChunk | None] | _Ended | BaseException
    ] = asyncio.Queue()
    nodes = 0

    async def handler(ctx: RunContext[Any], events: AsyncIterable[AgentStreamEvent]) -> None:
        nonlocal nodes
        nodes += 1
        segment = nodes
        async for event in events:
            await queue.put((segment, event))
        await queue.put((segment, None))  # the node's events are all out

    async def waiting(flow_run_id: str, calls: list[PendingCall]) -> None:
        for call in calls:
            if call.kind == "approval":
                await queue.put(
                    (
                        nodes,
                        ToolApprovalRequestChunk(
                            approval_id=f"{flow_run_id}:{call.call_id}", tool_call_id=call.call_id
                        ),
                    )
                )
        card = {"run_id": flow_run_id, "calls": [c.model_dump(mode="json") for c in calls]}
        await queue.put((nodes, DataChunk(type="data-approval", data=card)))

    async def drive() -> None:
        try:
            with observing_waits(waiting), idempotency_key(turn_key(conversation, turn)):
                result = await agent.run(
                    conversations.prompt(conversation, turn),
                    message_history=conversations.history(conversation, turn),
                    event_stream_handler=handler,
                )
            conversations.save_messages(conversation, turn, result.all_messages_json())
            await queue.put((FINAL, AgentRunResultEvent(result=result)))
            await queue.put(_Ended())
        except Exception as exc:
            await queue.put(exc)

    async def native() -> AsyncIterator[AgentStreamEvent | AgentRunResultEvent[Any]]:
        writer.complete(0)  # everything before the first event is out
        while True:
            item = await queue.get()
            if isinstance(item, _Ended):
                return
            if isinstance(item, BaseException):
                raise item
            segment, event = item
            writer.segment = segment
            if event is None:
                writer.complete(segment)
            elif isinstance(event, BaseChunk):
                writer.write(event)
            else:
                yield event

    def summary(result: AgentRunResult[Any]) -> AsyncIterator[BaseChunk]:
        async def chunks() -> AsyncIterator[BaseChunk]:
            ledger = ledger_of(result)
            if ledger is not None:
                yield DataChunk(type="data-ledger", data=usage_json(ledger))

        return chunks()

    stream: VercelAIEventStream[Any, Any] = VercelAIEventStream(sdk_version=SDK_VERSION)
    runner = asyncio.create_task(drive())
    try:
        async for chunk in stream.transform_stream(native(), on_complete=summary):
            writer.write(chunk)
        writer.complete(FINAL)
        log.end()
    finally:
        if not runner.done():
            runner.cancel()
        await asyncio.gather(runner, return_exceptions=True)
