"""`durable_chat_app(agent)`: a Starlette app to chat with a durable agent in a browser.

- `GET /` is the page (`page.html`: plain HTML and JS).
- `POST /api/conversations/{id}/turns` `{"message": ...}` starts a turn, a durable run keyed by conversation and
  turn (`turns.run_turn`), and answers `{"turn": n, "events": url}`.
- `GET /api/conversations/{id}/turns/{n}/events` streams the turn's events as Server-Sent Events, each with
  `id: <offset>`, in the Vercel AI data stream protocol, or in AG-UI with `?protocol=ag-ui` (each protocol has
  its own log, hence its own offsets), from the offset `?offset=` or after the `Last-Event-ID` a reconnecting
  `EventSource` sends; 204 when the turn is over and nothing is left (an `EventSource` then stops).
- `GET /api/conversations/{id}` lists the turns (prompt, ended, events so far in each protocol).
- `POST /api/approvals/{run_id}` `{"approve": bool, "message": ...}` decides on the calls a turn waits for, as
  `prefect-pydantic-ai approve` does; the first decision wins, from here, the CLI or the Prefect UI.

The app runs turns in its own process. At startup it resumes every turn a killed server left unfinished; a
client reconnecting to an unfinished turn that no task of this process runs resumes it too.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from importlib.resources import files
from pathlib import Path
from typing import Any

from pydantic_ai.agent import AbstractAgent
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from prefect_pydantic_ai.durable.capability import durability_of
from prefect_pydantic_ai.durable.errors import DurabilityConfigError
from prefect_pydantic_ai.errors import RunError
from prefect_pydantic_ai.ops.approve import approve_run
from prefect_pydantic_ai.web.conversations import Conversations, check_conversation_id, default_directory
from prefect_pydantic_ai.web.protocols import PROTOCOLS, UIProtocol
from prefect_pydantic_ai.web.turns import run_turn


class ChatServer:
    """The turns this process runs, and the conversations they belong to."""

    def __init__(self, agent: AbstractAgent[Any, Any], events_dir: Path | None) -> None:
        self.agent = agent
        self._events_dir = events_dir
        self._conversations: Conversations | None = None
        self.tasks: dict[tuple[str, int], asyncio.Task[None]] = {}

    @property
    def conversations(self) -> Conversations:
        assert self._conversations is not None, "the app has not started"
        return self._conversations

    async def start(self) -> None:
        self._conversations = Conversations(self._events_dir or await default_directory())
        for conversation in self.conversations.all():
            for turn in self.conversations.turns(conversation):
                if not self.conversations.ended(conversation, turn):
                    self.ensure_running(conversation, turn)

    def ensure_running(self, conversation: str, turn: int) -> None:
        """Run the turn in this process unless a task of it is running already (a no-op for an ended turn)."""
        task = self.tasks.get((conversation, turn))
        if task is None or task.done():
            self.tasks[(conversation, turn)] = asyncio.create_task(
                run_turn(self.agent, self.conversations, conversation, turn)
            )

    async def stop(self) -> None:
        for task in self.tasks.values():
            task.cancel()
        await asyncio.gather(*self.tasks.values(), return_exceptions=True)


def durable_chat_app(agent: AbstractAgent[Any, Any], *, events_dir: Path | None = None) -> Starlette:
    """An ASGI app to chat with `agent` (a `PrefectAgent`, or an agent with `PrefectDurability`) in a browser.

    Each turn is a durable run keyed by conversation and turn; its events are kept in `events_dir` (default:
    beside the journal, `web.conversations`). The agent must wait for approvals in `"pause"` mode, so the
    server's run is the one that continues once a decision arrives, streaming on.
    """
    if not isinstance(agent, AbstractAgent):
        raise DurabilityConfigError(f"{agent!r} is not a Pydantic AI agent: serve a PrefectAgent(...).")
    durability = getattr(agent, "durability", None) or durability_of(agent)
    if durability is None:
        raise DurabilityConfigError(
            f"Agent {agent.name!r} is not durable: wrap it in PrefectAgent(...) or give it PrefectDurability()."
        )
    if durability.approvals != "pause":
        raise DurabilityConfigError(
            f"Agent {agent.name!r} waits for approvals in {durability.approvals!r} mode; the chat app needs "
            "PrefectAgent(..., approvals='pause'), so the turn continues in the server once someone decides."
        )
    server = ChatServer(agent, events_dir)
    page = files("prefect_pydantic_ai.web").joinpath("page.html").read_text()

    async def index(request: Request) -> Response:
        return HTMLResponse(page.replace("{{AGENT}}", agent.name or "agent"))

    async def conversation(request: Request) -> Response:
        cid = check_conversation_id(request.path_params["conversation"])
        turns = []
        for turn in server.conversations.turns(cid):
            prompt = server.conversations.prompt(cid, turn)
            ended = server.conversations.ended(cid, turn)
            sent = {name: len(server.conversations.log(cid, turn, name).read().events) for name in PROTOCOLS}
            turns.append({"turn": turn, "prompt": prompt, "ended": ended, "events": sent})
        return JSONResponse({"conversation": cid, "turns": turns})

    async def start_turn(request: Request) -> Response:
        cid = check_conversation_id(request.path_params["conversation"])
        body = await _json(request)
        message = body.get("message") if isinstance(body, dict) else None
        if not isinstance(message, str) or not message.strip():
            return _error(400, 'Send {"message": "<text>"}.')
        turns = server.conversations.turns(cid)
        if turns and not server.conversations.ended(cid, turns[-1]):
            return _error(409, f"Turn {turns[-1]} of conversation {cid} has not ended; wait for it.")
        turn = server.conversations.add_turn(cid, message)
        server.ensure_running(cid, turn)
        return JSONResponse({"turn": turn, "events": f"/api/conversations/{cid}/turns/{turn}/events"})

    async def events(request: Request) -> Response:
        cid = check_conversation_id(request.path_params["conversation"])
        turn = int(request.path_params["turn"])
        if turn not in server.conversations.turns(cid):
            return _error(404, f"Conversation {cid} has no turn {turn}.")
        protocol = _protocol(request)
        start = _start_offset(request)
        log = server.conversations.log(cid, turn, protocol.name)
        state = log.read()
        if state.ended and start >= len(state.events):
            return Response(status_code=204)
        if not server.conversations.ended(cid, turn):
            server.ensure_running(cid, turn)

        async def stream() -> AsyncIterator[str]:
            yield "retry: 500\n\n"
            async for offset, data in log.follow(start):
                yield f"id: {offset}\ndata: {data}\n\n"

        headers = {**protocol.headers, "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
        return StreamingResponse(stream(), media_type="text/event-stream", headers=headers)

    async def approve(request: Request) -> Response:
        body = await _json(request)
        if not isinstance(body, dict) or not isinstance(body.get("approve"), bool):
            return _error(400, 'Send {"approve": true} or {"approve": false, "message": "<why>"}.')
        try:
            decision = await approve_run(
                request.path_params["run_id"],
                deny=None if body["approve"] else [],
                message=body.get("message") or None,
            )
        except RunError as exc:
            return _error(409, str(exc))
        return JSONResponse(decision.to_json())

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        await server.start()
        try:
            yield
        finally:
            await server.stop()

    app = Starlette(
        routes=[
            Route("/", index),
            Route("/api/conversations/{conversation}", conversation),
            Route("/api/conversations/{conversation}/turns", start_turn, methods=["POST"]),
            Route("/api/conversations/{conversation}/turns/{turn:int}/events", events),
            Route("/api/approvals/{run_id}", approve, methods=["POST"]),
        ],
        exception_handlers={RunError: _run_error},
        lifespan=lifespan,
    )
    app.state.chat = server
    return app


def _protocol(request: Request) -> UIProtocol:
    """The protocol `?protocol=` asks for: `vercel-ai` (the default) or `ag-ui`."""
    name = request.query_params.get("protocol") or "vercel-ai"
    for known, protocol in PROTOCOLS.items():
        if name == known:
            return protocol
    raise RunError(f"Unknown protocol {name!r}: use {' or '.join(PROTOCOLS)}.")


def _start_offset(request: Request) -> int:
    """The first offset to send: `?offset=`, or the one after a reconnecting client's `Last-Event-ID`."""
    start = int(request.query_params.get("offset") or 0)
    last = request.headers.get("last-event-id")
    if last is not None and last.strip().isdigit():
        start = max(start, int(last) + 1)
    return start


async def _json(request: Request) -> Any:
    """The request's JSON body; `None` when it is not JSON (answered with the 400 that says what to send)."""
    try:
        return await request.json()
    except ValueError:
        return None


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


async def _run_error(request: Request, exc: Exception) -> Response:
    return _error(400, str(exc))
