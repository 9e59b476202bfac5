"""The local server's app: a request that found SQLite busy is run again inside the server, and writes take turns.

Driven through the ASGI interface with a stand-in for Prefect's app that answers Prefect's retryable 503 (or
raises after sending it, as Starlette's outermost middleware does) a given number of times."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest

from prefect_pydantic_ai.infra.local_app import ATTEMPTS, RETRY_AFTER_S, RetryBusy

pytestmark = pytest.mark.anyio

BUSY = json.dumps({"exception_message": "Service Unavailable"}).encode()


class StandIn:
    """Answers `busy_times` requests with Prefect's 503 for a busy database, then 201 with the body it read."""

    def __init__(self, busy_times: int, raise_after_503: bool = False, other_503: bool = False) -> None:
        self.busy_times = busy_times
        self.raise_after_503 = raise_after_503
        self.other_503 = other_503
        self.calls: list[tuple[str, bytes]] = []
        self.running = 0
        self.most_at_once = 0

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        self.running += 1
        self.most_at_once = max(self.most_at_once, self.running)
        try:
            body = (await receive())["body"]
            self.calls.append((scope["path"], body))
            scope["path"] = "/rewritten-by-routing"  # a router writes into the scope it is given
            await asyncio.sleep(0.01)
            if self.other_503:
                await _respond(send, 503, b'{"message": "Database is not available"}')
            elif len(self.calls) <= self.busy_times:
                await _respond(send, 503, BUSY)
                if self.raise_after_503:
                    raise RuntimeError("database is locked")
            else:
                await _respond(send, 201, body)
        finally:
            self.running -= 1


async def _respond(send: Any, status: int, body: bytes) -> None:
    await send(
        {"type": "http.response.start", "status": status, "headers": [(b"content-type", b"application/json")]}
    )
    await send({"type": "http.response.body", "body": body, "more_body": False})


async def _request(
    app: RetryBusy, method: str = "POST", path: str = "/api/flow_runs/"
) -> tuple[int, dict[bytes, bytes], bytes]:
    chunks = [b'{"name": ', b'"run"}']
    sent: list[dict[str, Any]] = []

    async def receive() -> dict[str, Any]:
        if chunks:
            return {"type": "http.request", "body": chunks.pop(0), "more_body": bool(chunks)}
        await asyncio.sleep(3600)  # no disconnect
        raise AssertionError

    async def send(message: dict[str, Any]) -> None:
        sent.append(message)

    await app({"type": "http", "method": method, "path": path, "headers": []}, receive, send)
    start, *rest = sent
    assert start["type"] == "http.response.start" and len([m for m in sent if m is start]) == 1
    return start["status"], dict(start["headers"]), b"".join(m.get("body", b"") for m in rest)


@pytest.mark.parametrize("raise_after_503", [False, True], ids=["answered", "raised after answering"])
async def test_a_busy_database_is_retried_in_the_server_with_the_same_body_and_path(
    raise_after_503: bool,
) -> None:
    prefect = StandIn(busy_times=3, raise_after_503=raise_after_503)
    app = RetryBusy(prefect, first_wait_s=0.001)
    status, _, body = await _request(app)
    assert (status, body) == (201, b'{"name": "run"}')
    assert prefect.calls == [("/api/flow_runs/", b'{"name": "run"}')] * 4
    assert app.retried == 3


async def test_a_database_busy_for_longer_reaches_the_client_with_a_short_retry_after() -> None:
    prefect = StandIn(busy_times=100)
    app = RetryBusy(prefect, first_wait_s=0.001)
    status, headers, body = await _request(app)
    assert (status, body, headers[b"retry-after"]) == (503, BUSY, RETRY_AFTER_S.encode())
    assert len(prefect.calls) == ATTEMPTS


async def test_another_503_is_answered_as_it_is() -> None:
    prefect = StandIn(busy_times=0, other_503=True)
    app = RetryBusy(prefect, first_wait_s=0.001)
    status, headers, body = await _request(app, "GET", "/api/health")
    assert (status, body) == (503, b'{"message": "Database is not available"}')
    assert b"retry-after" not in headers and len(prefect.calls) == 1 and app.retried == 0


async def test_writes_take_turns_and_reads_do_not_wait() -> None:
    writes = StandIn(busy_times=0)
    one_server = RetryBusy(writes)
    await asyncio.gather(*(_request(one_server) for _ in range(5)))
    assert writes.most_at_once == 1
    reads = StandIn(busy_times=0)
    shared = RetryBusy(reads)
    await asyncio.gather(*(_request(shared, "POST", "/api/flow_runs/filter") for _ in range(5)))
    assert reads.most_at_once == 5
