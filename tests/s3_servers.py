"""S3 for tests: a real S3-compatible server (moto's, in a process of its own), a bucket on it saved as a Prefect
`S3Bucket` block, and a fault proxy in front of it.

The fault proxy, on 127.0.0.1, forwards each HTTP request to a real S3-compatible server (moto's) and, for
the requests a rule matches, answers 500, resets the connection mid-body, or stalls.

It runs an asyncio loop in a thread of its own, so a test's runs (sync or async) and the boto3 clients inside
them talk to it over real sockets. One request per connection (`Connection: close` both ways): each request is
forwarded on a fresh upstream connection, so a fault never leaks into the next request.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import socket
import struct
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from prefect_pydantic_ai.infra.server import free_port


def s3_client(endpoint: str) -> Any:
    """A boto3 S3 client for the moto server at `endpoint` (the caller closes it)."""
    import boto3

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        aws_access_key_id="test",
        aws_secret_access_key="test",
        region_name="us-east-1",
    )


@contextlib.contextmanager
def moto_s3(directory: Path) -> Iterator[tuple[str, str]]:
    """A real moto S3 server on a free loopback port (its process stopped at the end) with one new bucket:
    yields (endpoint URL, bucket name)."""

    port = free_port()
    server = subprocess.Popen(
        [str(Path(sys.executable).parent / "moto_server"), "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        cwd=directory,
    )
    endpoint, bucket = f"http://127.0.0.1:{port}", f"journal-{uuid.uuid4().hex[:8]}"
    client = s3_client(endpoint)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                client.create_bucket(Bucket=bucket)
                break
            except Exception:
                assert server.poll() is None, "moto_server exited"
                assert time.monotonic() < deadline, "moto_server not ready after 30s"
                time.sleep(0.05)
        yield endpoint, bucket
    finally:
        client.close()
        server.terminate()
        server.wait(timeout=10)


def save_bucket(
    bucket: str, endpoint: str, *, name: str | None = None, config: dict[str, Any] | None = None
) -> str:
    """Save `bucket` at `endpoint` as an `S3Bucket` block (boto `config` for its client, e.g. timeouts and
    retries); returns the block's slug, for `PREFECT_DEFAULT_RESULT_STORAGE_BLOCK`."""
    from prefect_aws import AwsClientParameters, AwsCredentials, S3Bucket

    credentials = AwsCredentials(
        aws_access_key_id="test",
        aws_secret_access_key="test",
        region_name="us-east-1",
        aws_client_parameters=AwsClientParameters(endpoint_url=endpoint, config=config),
    )
    name = name or bucket
    S3Bucket(bucket_name=bucket, credentials=credentials).save(name, overwrite=True, _sync=True)  # type: ignore[call-arg]
    return f"s3-bucket/{name}"


Fault = Literal["500", "reset", "stall"]

_ERROR_BODY = (
    b'<?xml version="1.0" encoding="UTF-8"?>\n'
    b"<Error><Code>InternalError</Code><Message>injected by the fault proxy</Message></Error>"
)


@dataclass
class Rule:
    """Fault the next `times` requests whose method is in `methods` and whose path matches `path`.

    `nth`: only requests to the nth distinct such path (in the order they first came), e.g. the second step's
    journal entry. `after_put`: only once a PUT to the same path was forwarded (a write accepted, then its reads
    fail)."""

    fault: Fault
    methods: frozenset[str]
    path: re.Pattern[str]
    times: int
    nth: int | None = None
    after_put: bool = False
    hits: int = 0
    paths: list[str] = field(default_factory=list)

    def matches(self, method: str, path: str, written: set[str]) -> bool:
        if method not in self.methods or self.path.search(path) is None:
            return False
        if path not in self.paths:
            self.paths.append(path)
        return (
            self.hits < self.times
            and (self.nth is None or self.paths.index(path) == self.nth - 1)
            and (not self.after_put or path in written)
        )


@dataclass(frozen=True)
class Seen:
    """One request the proxy received: its method, path (no query), and what it did (`forwarded` or the fault)."""

    method: str
    path: str
    outcome: str


@dataclass
class S3FaultProxy:
    """A proxy from 127.0.0.1:`port` to `upstream` (`host`, `port`) that applies the rules it is given."""

    upstream: tuple[str, int]
    stall_seconds: float = 30.0
    seen: list[Seen] = field(default_factory=list)
    _rules: list[Rule] = field(default_factory=list)
    _written: set[str] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def __post_init__(self) -> None:
        self._loop = asyncio.new_event_loop()
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.port: int = self._listener.getsockname()[1]
        self._stop: asyncio.Event | None = None
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, name="s3-fault-proxy", daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("the S3 fault proxy did not start")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def fault(
        self,
        fault: Fault,
        *,
        methods: str,
        path: str,
        times: int = 1_000_000,
        nth: int | None = None,
        after_put: bool = False,
    ) -> Rule:
        """Add a rule (`methods`: space-separated, e.g. "HEAD GET"); it applies until cleared or used up."""
        rule = Rule(fault, frozenset(methods.split()), re.compile(path), times, nth, after_put)
        with self._lock:
            self._rules.append(rule)
        return rule

    def clear(self) -> None:
        """The fault clears: every request is forwarded from now on (a stalled one is let go)."""
        with self._lock:
            self._rules.clear()
            self._written.clear()
        self._loop.call_soon_threadsafe(self._release_stalls)

    def requests(self, method: str, path: str) -> list[Seen]:
        """The requests seen with this method whose path matches `path`."""
        with self._lock:
            return [s for s in self.seen if s.method == method and re.search(path, s.path)]

    def close(self) -> None:
        """Stop serving and end every connection (a stalled one included); the thread exits."""
        if self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=10)
        self._listener.close()

    def __enter__(self) -> S3FaultProxy:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- the loop ---

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._loop.run_until_complete(self._serve())
        self._loop.close()

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        self._stalls = asyncio.Event()
        connections: set[asyncio.Task[None]] = set()

        async def accepted(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            assert task is not None
            connections.add(task)
            try:
                await self._handle(reader, writer)
            except (ConnectionError, asyncio.IncompleteReadError):
                pass  # the client went away
            finally:
                connections.discard(task)
                writer.close()

        server = await asyncio.start_server(accepted, sock=self._listener)
        self._ready.set()
        async with server:
            await self._stop.wait()
            self._stalls.set()
            for task in list(connections):
                task.cancel()
            await asyncio.gather(*connections, return_exceptions=True)

    def _release_stalls(self) -> None:
        self._stalls.set()
        self._stalls = asyncio.Event()

    def _match(self, method: str, path: str) -> Rule | None:
        with self._lock:
            matching = [
                r for r in self._rules if r.matches(method, path, self._written)
            ]  # each rule counts paths
            rule = matching[0] if matching else None
            if rule is not None:
                rule.hits += 1
            return rule

    def _note(self, method: str, path: str, outcome: str) -> None:
        with self._lock:
            self.seen.append(Seen(method, path, outcome))
            if method == "PUT" and outcome == "forwarded":
                self._written.add(path)

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        request_line, *header_lines = head.decode("latin-1").split("\r\n")
        method, target, _ = request_line.split(" ", 2)
        path = target.split("?", 1)[0]
        headers = [
            line for line in header_lines if line and not line.lower().startswith(("connection:", "expect:"))
        ]
        if any(line.lower().replace(" ", "") == "expect:100-continue" for line in header_lines):
            writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")  # boto waits for it (up to 1 s) before the body
        body = await _read_body(reader, headers)
        rule = self._match(method, path)

        if rule is not None and rule.fault == "500":
            self._note(method, path, "500")
            writer.write(
                b"HTTP/1.1 500 Internal Server Error\r\nContent-Type: application/xml\r\n"
                + f"Content-Length: {len(_ERROR_BODY)}\r\nConnection: close\r\n\r\n".encode()
                + _ERROR_BODY
            )
            await writer.drain()
            return
        if rule is not None and rule.fault == "stall":
            self._note(method, path, "stall")
            stalls = self._stalls
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(stalls.wait(), self.stall_seconds)
            return  # closed without an answer

        upstream_reader, upstream_writer = await asyncio.open_connection(*self.upstream)
        try:
            upstream_writer.write(
                f"{request_line}\r\n".encode("latin-1")
                + "".join(f"{h}\r\n" for h in headers).encode("latin-1")
                + b"Connection: close\r\n\r\n"
                + body
            )
            await upstream_writer.drain()
            response = await upstream_reader.read()  # until the server closes: one response
        finally:
            upstream_writer.close()
        if rule is not None and rule.fault == "reset":
            self._note(method, path, "reset")
            header_end = response.index(b"\r\n\r\n") + 4
            cut = (
                header_end + (len(response) - header_end) // 2
                if len(response) > header_end
                else header_end // 2
            )
            writer.write(response[:cut])
            await writer.drain()
            sock = writer.get_extra_info("socket")
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))  # close = RST
            writer.transport.abort()
            return
        self._note(method, path, "forwarded")
        writer.write(response)
        await writer.drain()


async def _read_body(reader: asyncio.StreamReader, headers: list[str]) -> bytes:
    """A request's body as it was sent (Content-Length or chunked), to forward unchanged."""
    fields = {h.split(":", 1)[0].strip().lower(): h.split(":", 1)[1].strip() for h in headers}
    if "content-length" in fields:
        return await reader.readexactly(int(fields["content-length"]))
    if fields.get("transfer-encoding", "").lower() == "chunked":
        raw = b""
        while True:
            size_line = await reader.readuntil(b"\r\n")
            raw += size_line
            size = int(size_line.split(b";", 1)[0], 16)
            if size == 0:  # then the trailers, up to an empty line
                while (line := await reader.readuntil(b"\r\n")) != b"\r\n":
                    raw += line
                return raw + line
            raw += await reader.readexactly(size + 2)
    return b""
