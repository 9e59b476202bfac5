"""A fault proxy in front of a real Prefect server: forwards, answers 503, or refuses connections, on command.

It listens on its own loopback port, so a run process whose PREFECT_API_URL names the proxy talks to the real
server through it with its real Prefect client (HTTP and the events websocket alike). The test thread switches
the mode; each switch closes the connections already open, so keep-alive connections and websockets see the new
mode at once (as behind a load balancer whose backend went away), and the client's next request meets it:

- `forward()`: bytes pass through both ways.
- `unavailable()`: every request is read and answered `503 Service Unavailable` (no Retry-After), then the
  connection is closed.
- `refuse()`: the port is closed; connecting fails with "connection refused", as with a server that is gone.

The proxy runs an asyncio loop in a thread of the test process; `close()` stops it and every connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections.abc import Coroutine
from typing import Any, Literal
from urllib.parse import urlsplit

from prefect_pydantic_ai.infra.server import free_port

Mode = Literal["forward", "unavailable", "refuse"]
_HEAD_LIMIT = 1 << 16


class FaultProxy:
    """A loopback proxy to `upstream` (a Prefect API URL, `http://host:port/api`) whose faults a test switches."""

    def __init__(self, upstream: str) -> None:
        parts = urlsplit(upstream)
        assert parts.hostname is not None and parts.port is not None, upstream
        self._upstream = (parts.hostname, parts.port)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}{parts.path}"
        self.mode: Mode = "forward"
        self.answered_503: list[str] = []  # the request lines answered 503 ("POST /api/artifacts/ HTTP/1.1")
        self.first_503 = threading.Event()  # set when the first request is answered 503
        self._loop = asyncio.new_event_loop()
        self._server: asyncio.Server | None = None
        self._open: set[asyncio.StreamWriter] = set()
        self._thread = threading.Thread(target=self._loop.run_forever, name="fault-proxy", daemon=True)
        self._thread.start()
        self._call(self._listen())

    def __enter__(self) -> FaultProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- switching faults, from the test thread ------------------------------------------------------------------

    def forward(self) -> None:
        """Pass every request through to the server again (listening again if the port was closed)."""
        self._call(self._switch("forward"))

    def unavailable(self) -> None:
        """Answer every request 503 until the mode changes."""
        self._call(self._switch("unavailable"))

    def refuse(self) -> None:
        """Close the port: connections are refused until the mode changes."""
        self._call(self._switch("refuse"))

    def close(self) -> None:
        """Stop listening, close every connection and stop the proxy's thread."""
        if not self._thread.is_alive():
            return
        self._call(self._switch("refuse"))
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=10)
        self._loop.close()

    def _call(self, coro: Coroutine[Any, Any, None]) -> None:
        asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout=10)

    # -- in the proxy's loop ---------------------------------------------------------------------------------

    async def _switch(self, mode: Mode) -> None:
        self.mode = mode
        for writer in list(self._open):  # open connections meet the new mode on their next request
            writer.close()
        self._open.clear()
        if mode == "refuse" and self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        elif mode != "refuse" and self._server is None:
            await self._listen()

    async def _listen(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port, reuse_address=True)

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self._open.add(writer)
        try:
            if self.mode == "forward":
                await self._pipe(reader, writer)
            else:
                await self._answer_503(reader, writer)
        except (ConnectionError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        finally:
            self._open.discard(writer)
            writer.close()

    async def _pipe(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self._upstream)
        self._open.add(up_writer)
        try:
            await asyncio.gather(_copy(reader, up_writer), _copy(up_reader, writer))
        finally:
            self._open.discard(up_writer)
            up_writer.close()

    async def _answer_503(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        if len(head) > _HEAD_LIMIT:
            return
        length = next(
            (
                int(line.split(b":", 1)[1])
                for line in head.lower().split(b"\r\n")
                if line.startswith(b"content-length:")
            ),
            0,
        )
        if length:
            await reader.readexactly(length)
        body = b'{"detail":"Service Unavailable"}'
        writer.write(
            b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\nConnection: close\r\n\r\n%s" % (len(body), body)
        )
        await writer.drain()
        self.answered_503.append(head.split(b"\r\n", 1)[0].decode("latin-1"))
        self.first_503.set()


async def _copy(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy until either side closes, then close the writing side too (so the other copy ends as well)."""
    try:
        while chunk := await reader.read(65536):
            writer.write(chunk)
            await writer.drain()
    except ConnectionError:
        pass
    finally:
        with contextlib.suppress(Exception):
            writer.close()
