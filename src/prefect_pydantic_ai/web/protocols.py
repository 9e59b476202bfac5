"""The UI protocols a turn's events are served in, each through pydantic-ai's own adapter: the Vercel AI data
stream (`VercelAIEventStream`) and AG-UI (`AGUIEventStream`).

A protocol here says how its events are kept in a turn's log (the JSON a client is sent) and how the events
pydantic-ai's adapters do not produce are put in the protocol's own form for application data (Vercel: a
`data-<name>` chunk; AG-UI: a `CUSTOM` event named `<name>`), with the same payload in both:

- `approval` `{"run_id", "calls"}`: the calls a turn waits for a decision on. AG-UI's own interrupts end the run
  (the client resumes it with a new run request), while a durable turn keeps waiting in its flow run until the
  page, the CLI or the Prefect UI decides (`POST /api/approvals/<run_id>`), so in AG-UI the card is a custom
  event; Vercel also gets the AI SDK's `tool-approval-request` per call.
- `replayed`: a model request or tool call of the turn was answered from the journal, not executed (`turns`).
- `discard` `{"ids"}`: the text, reasoning, tool-call and approval ids an interrupted attempt showed (`turns`);
  in AG-UI after the ends of what it left open, since AG-UI clients check that what starts ends.
- `ledger`: what the turn spent and what replay saved.
"""

from __future__ import annotations

import json
from abc import ABC, abstractmethod
from collections.abc import Mapping
from typing import Any, Literal

from ag_ui.core import BaseEvent, CustomEvent, Event
from pydantic import TypeAdapter
from pydantic_ai.ui import UIEventStream
from pydantic_ai.ui.ag_ui import AGUIEventStream
from pydantic_ai.ui.vercel_ai import VercelAIEventStream
from pydantic_ai.ui.vercel_ai.response_types import BaseChunk, DataChunk, ToolApprovalRequestChunk

from prefect_pydantic_ai.store.waits import PendingCall

ProtocolName = Literal["vercel-ai", "ag-ui"]


class UIProtocol(ABC):
    """One wire protocol: its adapter, how an event is kept, and its form for our application data."""

    name: ProtocolName
    headers: Mapping[str, str] = {}
    """Response headers the protocol asks for, beside `Content-Type: text/event-stream`."""

    @abstractmethod
    def stream(self, conversation: str, key: str) -> UIEventStream[Any, Any, Any, Any]:
        """A new adapter stream for one attempt of the turn `key` of `conversation`."""

    @abstractmethod
    def encode(self, event: Any) -> str:
        """The JSON `event` is sent as (an SSE `data:` line)."""

    @abstractmethod
    def data(self, name: str, value: dict[str, Any]) -> Any:
        """An event of application data `name` with payload `value`."""

    @abstractmethod
    def shown_id(self, data: str) -> str | None:
        """The id a `discard` names to remove what the logged event `data` started on a page, if anything."""

    def interrupted(self, shown: list[str]) -> list[Any]:
        """What goes before a segment the killed attempt had begun is sent anew (`shown`: that attempt's events
        in it): a `discard` naming what they started on a page."""
        ids = [i for i in map(self.shown_id, shown) if i is not None]
        return [self.data("discard", {"ids": ids})] if ids else []

    def approval(self, flow_run_id: str, calls: list[PendingCall]) -> list[Any]:
        """The events that show a wait for a decision on `calls` in flow run `flow_run_id`."""
        card = {"run_id": flow_run_id, "calls": [c.model_dump(mode="json") for c in calls]}
        return [self.data("approval", card)]


class VercelAI(UIProtocol):
    """The Vercel AI data stream protocol, for AI SDK 6 (which knows tool approval requests)."""

    name: ProtocolName = "vercel-ai"
    SDK_VERSION: Literal[6] = 6

    def __init__(self) -> None:
        self.headers = dict(
            VercelAIEventStream[Any, Any](sdk_version=self.SDK_VERSION).response_headers or {}
        )

    def stream(self, conversation: str, key: str) -> VercelAIEventStream[Any, Any]:
        return VercelAIEventStream(sdk_version=self.SDK_VERSION)

    def encode(self, event: BaseChunk) -> str:
        return event.encode(self.SDK_VERSION)

    def data(self, name: str, value: dict[str, Any]) -> DataChunk:
        return DataChunk(type=f"data-{name}", data=value)

    def approval(self, flow_run_id: str, calls: list[PendingCall]) -> list[Any]:
        requests = [
            ToolApprovalRequestChunk(approval_id=f"{flow_run_id}:{c.call_id}", tool_call_id=c.call_id)
            for c in calls
            if c.kind == "approval"
        ]
        return [*requests, *super().approval(flow_run_id, calls)]

    def shown_id(self, data: str) -> str | None:
        if not data.startswith("{"):  # `[DONE]`
            return None
        chunk = json.loads(data)
        kind = chunk.get("type")
        if kind in ("text-start", "reasoning-start"):
            return str(chunk["id"])
        if kind == "tool-input-start":
            return str(chunk["toolCallId"])
        if kind == "data-approval":
            return f"approval:{chunk['data']['run_id']}"
        return None


class AGUI(UIProtocol):
    """AG-UI: the turn is one AG-UI run, its thread the conversation and its run id the turn's key, the same in
    every attempt, so `RUN_STARTED` (sent by the first attempt) and `RUN_FINISHED` (by the last) match."""

    name: ProtocolName = "ag-ui"

    def stream(self, conversation: str, key: str) -> AGUIEventStream[Any, Any]:
        return AGUIEventStream(thread_id=conversation, run_id=key)

    def encode(self, event: BaseEvent) -> str:
        return event.model_dump_json(by_alias=True, exclude_none=True)

    def data(self, name: str, value: dict[str, Any]) -> CustomEvent:
        return CustomEvent(name=name, value=value)

    def interrupted(self, shown: list[str]) -> list[Any]:
        """The ends of the messages, tool calls and reasoning the killed attempt started and never ended (by the
        `<KIND>_START` and `<KIND>_END` types and their ids), innermost first, then the `discard`."""
        started: dict[tuple[str, str | None], dict[str, str]] = {}
        for data in shown:
            event = json.loads(data)
            ids = {k: v for k, v in event.items() if k in ("messageId", "toolCallId")}
            ref = next(iter(ids.values()), None)
            kind: str = event["type"]
            if kind.endswith("_START"):
                started[(kind.removesuffix("_START"), ref)] = ids
            elif kind.endswith("_END"):
                started.pop((kind.removesuffix("_END"), ref), None)
        ends = [
            _EVENT.validate_python({"type": f"{kind}_END", **ids})
            for (kind, _), ids in reversed(started.items())
        ]
        return [*ends, *super().interrupted(shown)]

    def shown_id(self, data: str) -> str | None:
        event = json.loads(data)
        kind = event.get("type")
        if kind in ("TEXT_MESSAGE_START", "REASONING_MESSAGE_START"):
            return str(event["messageId"])
        if kind == "TOOL_CALL_START":
            return str(event["toolCallId"])
        if kind == "CUSTOM" and event.get("name") == "approval":
            return f"approval:{event['value']['run_id']}"
        return None


_EVENT: TypeAdapter[BaseEvent] = TypeAdapter(Event)
"""Any AG-UI event, from its JSON."""

PROTOCOLS: dict[ProtocolName, UIProtocol] = {p.name: p for p in (VercelAI(), AGUI())}
"""Every protocol a turn is kept in, by the name `?protocol=` selects it with."""
