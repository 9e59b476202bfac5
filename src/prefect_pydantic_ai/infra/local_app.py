"""The persistent local server's process: Prefect's own server app, with a request that found SQLite busy retried
inside the server instead of answered 503, and writes taking turns.

SQLite lets one connection write at a time, and a transaction that read before it writes fails at once
(`SQLITE_BUSY_SNAPSHOT`, no busy timeout helps) when another connection wrote in between. The server's own
services (the event persister, the task-run recorder) write beside every request, so on a busy laptop a request
now and then meets that. Prefect answers it with 503 "Service Unavailable", and Prefect's client, given no
`Retry-After`, backs off 2, 4, 8 ... seconds (with jitter): a run stalls for seconds on a conflict that is gone
in milliseconds. Here the request, whose transaction was rolled back, runs again after 10 ms, 20 ms ... (at most
`ATTEMPTS` times); only a conflict that outlasts them reaches the client, with a short `Retry-After`. Requests
that write take turns, so they do not conflict with each other (one user's server: SQLite writes one at a time
anyway); reads, and the writes of the server's own services, go on beside them.

Run as `python -m prefect_pydantic_ai.infra.local_app --host H --port P --keep-alive-timeout S [--fd N]`: what
`prefect server start` runs in the foreground, with this app around it; `--fd` serves on a listening socket the
starter bound and handed over (`server._listen_on_port`: clients wait in its backlog while the server boots).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
from collections.abc import Awaitable, Callable, MutableMapping
from typing import Any

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
App = Callable[[Scope, Receive, Send], Awaitable[None]]

ATTEMPTS = 8
FIRST_WAIT_S = 0.01
RETRY_AFTER_S = "0.2"
"""What a client is told to wait when the conflicts outlasted the attempts (Prefect's client honours it)."""
_BUSY_BODY = {"exception_message": "Service Unavailable"}
"""The body of Prefect's 503 for an error a client may retry (a busy database)."""


class RetryBusy:
    """ASGI middleware: an HTTP request answered with Prefect's retryable 503 is run again, its body replayed;
    requests that write are answered one at a time."""

    def __init__(self, app: App, attempts: int = ATTEMPTS, first_wait_s: float = FIRST_WAIT_S) -> None:
        self.app = app
        self.attempts = attempts
        self.first_wait_s = first_wait_s
        self.retried = 0
        """Requests run again so far (read by the tests)."""
        self._writing = asyncio.Lock()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        body = await _read_body(receive)
        if _writes(scope):
            async with self._writing:
                await self._answer(scope, body, receive, send)
        else:
            await self._answer(scope, body, receive, send)

    async def _answer(self, scope: Scope, body: bytes, receive: Receive, send: Send) -> None:
        wait = self.first_wait_s
        for attempt in range(1, self.attempts + 1):
            last = attempt == self.attempts
            answer = _Answer(send)
            try:
                # a fresh scope each time: routing writes into it (a mount's path and root_path)
                await self.app(dict(scope), _replay(body, receive), answer.send)
            except Exception:
                # Starlette's outermost middleware sends the error handler's answer (Prefect's 503), then raises
                # the error again for the server to log: a busy database is retried here, anything else goes on.
                if not answer.busy:
                    await answer.release()
                    raise
            if not answer.busy:
                await answer.release()
                return
            if last:
                await answer.release(retry_after=RETRY_AFTER_S)
                return
            self.retried += 1
            await asyncio.sleep(wait)
            wait *= 2


_READS = ("/filter", "/count", "/paginate", "/history")
"""Paths of requests that are POSTed but only read."""


def _writes(scope: Scope) -> bool:
    path = str(scope.get("path", "")).rstrip("/")
    return scope.get("method") in ("POST", "PUT", "PATCH", "DELETE") and not path.endswith(_READS)


async def _read_body(receive: Receive) -> bytes:
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] != "http.request":  # the client went away: the app sees an empty request
            break
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            break
    return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A `receive` that gives the buffered body once, then waits on the real one (for a disconnect)."""
    given = False

    async def replayed() -> Message:
        nonlocal given
        if not given:
            given = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return replayed


class _Answer:
    """Passes a response through, except a 503, which is held until it is known to be Prefect's retryable one."""

    def __init__(self, send: Send) -> None:
        self._send = send
        self._held: list[Message] = []
        self.busy = False

    async def send(self, message: Message) -> None:
        if message["type"] == "http.response.start" and message["status"] == 503:
            self._held.append(message)
            return
        if self._held:  # the body of a held 503
            self._held.append(message)
            if not message.get("more_body", False):
                body = b"".join(m.get("body", b"") for m in self._held[1:])
                self.busy = _is_busy(body)
            return
        await self._send(message)

    async def release(self, retry_after: str | None = None) -> None:
        """Send what was held (a 503 that is not Prefect's retryable one, or the last attempt's)."""
        if not self._held:
            return
        start = dict(self._held[0])
        if retry_after is not None:
            start["headers"] = [*start.get("headers", []), (b"retry-after", retry_after.encode())]
        for message in (start, *self._held[1:]):
            await self._send(message)


def _is_busy(body: bytes) -> bool:
    try:
        return bool(json.loads(body) == _BUSY_BODY)
    except ValueError:
        return False


def create_app() -> App:
    """Prefect's full server app (API, UI, services), as `prefect server start` builds it, inside `RetryBusy`."""
    from prefect.server.api.server import create_app as prefect_app

    return RetryBusy(prefect_app(final=True))


def main() -> None:
    import uvicorn
    from prefect.settings import PREFECT_SERVER_LOGGING_LEVEL

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--keep-alive-timeout", type=int, default=5)
    parser.add_argument("--fd", type=int, help="serve on this inherited listening socket instead of binding")
    opts = parser.parse_args()
    config = uvicorn.Config(
        app=create_app(),
        host=opts.host,
        port=opts.port,
        timeout_keep_alive=opts.keep_alive_timeout,
        log_level=PREFECT_SERVER_LOGGING_LEVEL.value().lower(),
    )
    # uvicorn's own `fd=` takes the descriptor for a Unix socket; this one is TCP (the family is read from it)
    sockets = None if opts.fd is None else [socket.socket(fileno=opts.fd)]
    uvicorn.Server(config).run(sockets=sockets)


if __name__ == "__main__":
    main()
