"""Running one chat turn as a durable run and writing what clients are sent to the turn's event logs.

The turn is `agent.run(prompt, idempotency_key="chat:<conversation>:<turn>")`: a server that was killed mid-turn
runs it again under the same key, every completed model request and tool call replays from the journal, and the
first one that did not complete runs live.

One run, one log per protocol (`protocols`): each event of the run goes, as it comes, through every protocol's
pydantic-ai adapter (`transform_stream`), and what an adapter makes of it is appended to that protocol's log.
The logs keep the events as they were sent, encoded once, rather than the run's native events encoded anew for
each reader: the adapters mint ids as they go (a message id per text part, in both protocols) and AG-UI stamps
times, so encoding at read time would give a reconnecting client other ids than those of the events it holds,
and a resumed run's native events are not the killed attempt's anyway (a request that runs again streams other
deltas). What a log holds is what its clients were sent, so a reconnect continues it byte for byte.

A resumed run produces its events again from the start (a replayed step re-emits its response at once), so a
log cannot be continued by counting events. It is continued by *segment* instead: the part before the run's
first event is segment 0, each node the run streams (a model request, the tool calls of a response; pydantic-ai
hands each to `event_stream_handler` once) is segment 1, 2, ..., and the end of the run is `FINAL`. A segment
whose events are all in a log is marked complete there, and a resumed run writes none of its events again. A
segment the killed process had begun is sent anew; before its first event a `discard` names the text parts, tool
calls and approval cards of the interrupted attempt, which a page removes (in AG-UI after the ends of what that
attempt left open, `protocols`). The segments are the run's, so the logs of both protocols are cut at the same
places.

A step the journal answered (the durable layer's `StepReplayedEvent`) becomes a `replayed` event naming its tool
call ids. It is written whatever its segment (the replayed step's own events are usually in a complete segment,
not sent again), once per log: a later attempt that replays the same step adds nothing.

A server killed while a turn waits for a decision leaves that attempt's flow run Paused, and nobody would ever
continue it: the resumed run waits again, in a flow run of its own. When that wait begins, the earlier attempts
still Paused are set Crashed, with a message naming the flow run that replaced them.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterable, AsyncIterator
from dataclasses import dataclass
from typing import Any

from pydantic_ai.agent import AbstractAgent
from pydantic_ai.messages import AgentStreamEvent
from pydantic_ai.run import AgentRunResult, AgentRunResultEvent
from pydantic_ai.tools import RunContext

from prefect_pydantic_ai.durable.capability import idempotency_key
from prefect_pydantic_ai.durable.model_step import StepReplayedEvent
from prefect_pydantic_ai.durable.report import ledger_of, usage_json
from prefect_pydantic_ai.durable.wait import observing_waits
from prefect_pydantic_ai.store.prefect_rest import TAG, StateType, prefect_api
from prefect_pydantic_ai.store.waits import PendingCall
from prefect_pydantic_ai.web.conversations import Conversations
from prefect_pydantic_ai.web.event_log import TurnLog
from prefect_pydantic_ai.web.protocols import PROTOCOLS, UIProtocol

FINAL = 1_000_000
"""The segment of the events after the run's last node: its result, the finish."""


def turn_key(conversation: str, turn: int) -> str:
    """The idempotency key of a turn's durable run."""
    return f"chat:{conversation}:{turn}"


@dataclass(frozen=True)
class _Wait:
    """The run started waiting for a decision on `calls` in flow run `flow_run_id`."""

    flow_run_id: str
    calls: list[PendingCall]


class _Ended:
    """The queue item after the run's last event."""


_Item = tuple[int, AgentStreamEvent | AgentRunResultEvent[Any] | _Wait | None] | _Ended | BaseException
"""What the run hands each protocol's writer: `(segment, event)` (`None`: the segment's events are all out),
then the end of the run or the exception it raised."""


class TurnWriter:
    """Writes one attempt of a turn's events in one protocol to its log, skipping the segments the log already
    holds."""

    def __init__(self, log: TurnLog, protocol: UIProtocol) -> None:
        self.log = log
        self.protocol = protocol
        state = log.read()
        self.ended = state.ended
        self._complete = state.complete
        self._earlier: dict[int, list[str]] = {}
        for data, segment in zip(state.events, state.segments, strict=True):
            self._earlier.setdefault(segment, []).append(data)
        self._held = set(state.events)
        self._begun: set[int] = set()
        self.segment = 0

    def write(self, event: Any, *, once: bool = False) -> None:
        """Write `event`, produced in the current segment, unless that segment is complete; with `once`, write it
        whatever its segment, unless the log holds the same event already."""
        data = self.protocol.encode(event)
        if once:
            if data in self._held:
                return
            self._held.add(data)
        elif self.segment in self._complete:
            return
        self._begin(self.segment)
        self.log.append(data, self.segment)

    def _begin(self, segment: int) -> None:
        """Before this attempt's first event in a segment the killed attempt had begun: a `discard` of what that
        attempt showed (its text parts, tool calls and approval cards), which this one sends anew."""
        if segment in self._begun or segment in self._complete:
            return
        self._begun.add(segment)
        for event in self.protocol.interrupted(self._earlier.get(segment, [])):
            self.log.append(self.protocol.encode(event), segment)

    def complete(self, segment: int) -> None:
        if segment not in self._complete:
            self._complete.add(segment)
            self.log.mark_complete(segment)


async def run_turn(
    agent: AbstractAgent[Any, Any], conversations: Conversations, conversation: str, turn: int
) -> None:
    """Run (or resume) turn `turn` of `conversation` to its end, writing its events to its log in every protocol
    (but one whose log ended already: a server killed between the ends of the logs)."""
    writers = [TurnWriter(conversations.log(conversation, turn, name), p) for name, p in PROTOCOLS.items()]
    writers = [w for w in writers if not w.ended]
    if not writers:
        return
    key = turn_key(conversation, turn)
    queues = [asyncio.Queue[_Item]() for _ in writers]
    nodes = 0

    def put(item: _Item) -> None:
        for queue in queues:
            queue.put_nowait(item)

    async def handler(ctx: RunContext[Any], events: AsyncIterable[AgentStreamEvent]) -> None:
        nonlocal nodes
        nodes += 1
        segment = nodes
        async for event in events:
            put((segment, event))
        put((segment, None))  # the node's events are all out

    async def waiting(flow_run_id: str, calls: list[PendingCall]) -> None:
        await settle_replaced_attempts(key, flow_run_id)
        put((nodes, _Wait(flow_run_id, calls)))

    async def drive() -> None:
        try:
            with observing_waits(waiting), idempotency_key(key):
                result = await agent.run(
                    conversations.prompt(conversation, turn),
                    message_history=conversations.history(conversation, turn),
                    event_stream_handler=handler,
                )
            conversations.save_messages(conversation, turn, result.all_messages_json())
            put((FINAL, AgentRunResultEvent(result=result)))
            put(_Ended())
        except Exception as exc:
            put(exc)

    async with asyncio.TaskGroup() as group:
        group.create_task(drive())
        for writer, queue in zip(writers, queues, strict=True):
            group.create_task(_write(writer, queue, conversation, key))


async def _write(writer: TurnWriter, queue: asyncio.Queue[_Item], conversation: str, key: str) -> None:
    """Feed the run's events from `queue` through the writer's protocol adapter into its log, to the end."""
    protocol = writer.protocol

    async def native() -> AsyncIterator[AgentStreamEvent | AgentRunResultEvent[Any]]:
        writer.complete(0)  # everything before the first event is out
        while not isinstance(item := await queue.get(), _Ended):
            if isinstance(item, BaseException):
                raise item
            writer.segment, event = item
            if event is None:
                writer.complete(writer.segment)
            elif isinstance(event, _Wait):
                for shown in protocol.approval(event.flow_run_id, event.calls):
                    writer.write(shown)
            elif isinstance(event, StepReplayedEvent):
                writer.write(protocol.data("replayed", _replayed(event)), once=True)
            else:
                yield event

    async def summary(result: AgentRunResult[Any]) -> AsyncIterator[Any]:
        ledger = ledger_of(result)
        if ledger is not None:
            yield protocol.data("ledger", usage_json(ledger))

    stream = protocol.stream(conversation, key)
    async for event in stream.transform_stream(native(), on_complete=summary):
        writer.write(event)
    writer.complete(FINAL)
    writer.log.end()


def _replayed(event: StepReplayedEvent) -> dict[str, Any]:
    """The payload of a `replayed` event: the step, its model request, and the tool call(s) it was or asked for."""
    if event.step == "tool":
        return {
            "step": "tool",
            "request": event.request,
            "tool": event.tool_name,
            "tool_call_id": event.tool_call_id,
        }
    return {
        "step": "model",
        "request": event.request,
        "model": event.model_name,
        "tool_call_ids": event.tool_call_ids,
    }


async def settle_replaced_attempts(key: str, by: str) -> None:
    """Set Crashed every attempt of turn `key` but flow run `by` that is Paused at a wait: this server runs the turn
    now and waits in `by`, so the server that waited in them is gone, and nothing would ever continue them."""
    async with prefect_api() as api:
        attempts = await api.flow_runs({"tags": {"all_": [TAG, f"key:{key}"]}}, "START_TIME_DESC", 50)
        for flow_run in attempts:
            state = flow_run.state
            if str(flow_run.id) == by or state is None or state.type != StateType.PAUSED:
                continue
            reason = (
                f"The chat server waiting in it for a decision stopped; flow run {by}, a later attempt of {key}, "
                "continues the turn and asks again."
            )
            await api.set_state("flow_runs", flow_run.id, StateType.CRASHED, "Crashed", reason)
