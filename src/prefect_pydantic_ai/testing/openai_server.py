"""A loopback OpenAI-compatible server (chat completions and Responses) with a scripted queue of replies and
injected faults.

Tests point pydantic-ai's real OpenAI provider at it, so every model request crosses a real socket and real HTTP
failures (429/5xx statuses, slow answers, connections reset mid-body, broken JSON) reach the real client code.
A streamed reply is sent the way providers send one (a word per text delta, tool-call arguments a few characters
at a time), cut into socket writes as its `Chunking` says: all at once, one event per write, at random bytes,
inside a UTF-8 character or inside a tool call's arguments.
"""

from __future__ import annotations

import itertools
import json
import math
import random
import re
import socket
import struct
import sys
import threading
import time
import uuid
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import TYPE_CHECKING, Any, Literal, Self, TypeAlias

if TYPE_CHECKING:
    from pydantic_ai.models.openai import OpenAIChatModel

Usage: TypeAlias = tuple[int, int]
"""`(input_tokens, output_tokens)`, sent as the OpenAI `usage` of a reply."""

ToolArgs: TypeAlias = Mapping[str, Any] | str
"""Tool-call arguments: a mapping is sent JSON-encoded, a string is sent exactly as given (e.g. broken JSON)."""

CHAT_COMPLETIONS_PATHS = frozenset({"/v1/chat/completions", "/chat/completions"})
RESPONSES_PATHS = frozenset({"/v1/responses", "/responses"})
"""OpenAI's Responses API, which pydantic-ai's `"openai:<model>"` strings use (non-streamed answers only)."""
OUTPUT_TOOL_PREFIX = "final_result"
"""pydantic-ai names its output tools `final_result` (or `final_result_<Type>` for several output types)."""

INVALID_JSON_ARGS = '{"oops": '
"""Default arguments of `fault_invalid_tool_args`: not JSON at all, so no tool schema can accept them."""


@dataclass(frozen=True)
class TextReply:
    """An assistant message with text content (`finish_reason="stop"`)."""

    text: str
    usage: Usage | None = None


@dataclass(frozen=True)
class ToolCallsReply:
    """An assistant message calling one or more tools (`finish_reason="tool_calls"`); ids are `call_1`, `call_2`..."""

    calls: tuple[tuple[str, ToolArgs], ...]
    usage: Usage | None = None


@dataclass(frozen=True)
class JsonReply:
    """Structured output: a call of the request's `final_result*` output tool with `obj` as its arguments.

    If the request advertises no output tool (native or prompted output modes), `obj` is sent as JSON text.
    """

    obj: Any
    usage: Usage | None = None


@dataclass(frozen=True)
class StatusFault:
    """An HTTP error status with an OpenAI-style error body; `retry_after` sets `Retry-After` and `retry-after-ms`."""

    status: int
    retry_after: float | None = None
    message: str | None = None
    code: str | None = None


@dataclass(frozen=True)
class DelayFault:
    """Sleep `seconds` before answering with `then`; with `then=None` the connection is closed without an answer.

    The sleep ends early when the server stops, so a delayed request never blocks shutdown.
    """

    seconds: float
    then: Scripted | None = None


@dataclass(frozen=True)
class ResetFault:
    """Send a 200 status, headers and half of the promised body (or SSE stream), then reset the connection (RST)."""


@dataclass(frozen=True)
class MalformedJsonFault:
    """A 200 response whose body (or the single SSE event of a streamed one) is truncated JSON."""


Reply: TypeAlias = TextReply | ToolCallsReply | JsonReply
"""A successful answer."""


@dataclass(frozen=True)
class CutStreamFault:
    """A streamed `reply` cut off after its first `after_deltas` text or arguments deltas: the server sends them
    (as its `Chunking` writes them), then closes the connection short of the promised body. The close is orderly,
    so the client reads every byte sent before it, then fails (`peer closed connection`)."""

    reply: Reply
    after_deltas: int


Scripted: TypeAlias = (
    TextReply
    | ToolCallsReply
    | JsonReply
    | StatusFault
    | DelayFault
    | ResetFault
    | MalformedJsonFault
    | CutStreamFault
)
"""One scripted answer; each consumes exactly one chat-completions request."""

Responder: TypeAlias = Callable[[dict[str, Any]], Scripted]
"""Called with the parsed request body when the script queue is empty."""

Writes: TypeAlias = Literal["burst", "per_event", "random", "inside_utf8", "inside_tool_args"]
"""How a streamed body is cut into socket writes; see `Chunking`."""


@dataclass(frozen=True)
class Chunking:
    """How the SSE body of a streamed reply reaches the socket, that is what one read of the client can see.

    - `"burst"`: the whole body in one write (a recorded cassette, a proxy, a coalesced TCP read): the client
      parses every delta before it yields the first.
    - `"per_event"`: one write per SSE event, `pause` seconds apart, so the client reads one delta at a time.
    - `"random"`: cut at random byte offsets (from `seed`, the same cuts every time), `pause` apart.
    - `"inside_utf8"`: `"per_event"`, and every multi-byte UTF-8 character is cut after its first byte (text
      is sent as raw UTF-8, not `\\u` escapes).
    - `"inside_tool_args"`: `"per_event"`, and every tool-call arguments fragment is cut in its middle.
    """

    writes: Writes = "burst"
    pause: float = 0.001
    seed: int = 0


@dataclass(frozen=True)
class RecordedRequest:
    """One HTTP request the server received: header names lowercased, `body` parsed (`None` if not JSON)."""

    method: str
    path: str
    headers: dict[str, str]
    body: Any


@dataclass(frozen=True)
class Exchange:
    """When one request arrived and how it was answered, for tests of timing (a retry after a `Retry-After`).

    Times are `time.monotonic()` seconds of this process, so they compare with the client's when it runs in the
    same process. `status` and `answered_at` are `None` while the request is unanswered, and stay `None` for a
    connection closed without a status (`DelayFault(then=None)`); a reset mid-body reports the 200 it sent.
    """

    path: str
    received_at: float
    status: int | None = None
    answered_at: float | None = None


class LoopbackOpenAI:
    """An OpenAI-compatible `POST /v1/chat/completions` (and `POST /v1/responses`) server on 127.0.0.1, run in a
    background thread.

    Each request takes the next item of a FIFO script (`reply_*` / `fault_*` / `enqueue`), else asks `responder`,
    else is answered with HTTP 500 "script exhausted" (with `x-should-retry: false`), so a test missing a reply
    fails with a clear error instead of hanging. `"stream": true` chat-completions requests get proper SSE chunks
    with usage, cut into writes as `chunking` says (it may be changed between requests); the Responses API
    answers text and tool calls, not streamed. Every request is recorded (`requests`, `received`,
    `request_count`, and its timing and status in `exchanges`), and so is the most requests in flight at once
    (`max_in_flight`); all state is guarded by a lock.
    """

    def __init__(self, *, responder: Responder | None = None, chunking: Chunking | None = None) -> None:
        self.responder: Responder | None = responder
        self.chunking: Chunking = chunking or Chunking()
        self._lock = threading.Lock()
        self._script: deque[Scripted] = deque()
        self._received: list[RecordedRequest] = []
        self._exchanges: list[Exchange] = []
        self._exhausted = 0
        self._tool_call_ids = 0
        self._in_flight = 0
        self._max_in_flight = 0
        self._stopping = threading.Event()
        self._httpd: _HTTPServer | None = None
        self._thread: threading.Thread | None = None

    # -- lifecycle -------------------------------------------------------------------------------------------

    def start(self) -> Self:
        """Bind a free port on 127.0.0.1 and serve in a daemon thread."""
        if self._httpd is not None:
            raise RuntimeError("LoopbackOpenAI is already running")
        self._stopping.clear()
        httpd = _HTTPServer(("127.0.0.1", 0), _Handler)
        httpd.loopback = self
        self._httpd = httpd
        self._thread = threading.Thread(
            target=httpd.serve_forever, kwargs={"poll_interval": 0.02}, name="loopback-openai", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stop serving: wake delayed requests (they answer nothing), close the socket and join the thread."""
        httpd, thread = self._httpd, self._thread
        if httpd is None or thread is None:
            return
        self._stopping.set()
        httpd.shutdown()
        httpd.server_close()
        thread.join()
        self._httpd = self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    @property
    def port(self) -> int:
        """The bound port (only while running)."""
        if self._httpd is None:
            raise RuntimeError("LoopbackOpenAI is not running; call start() or use it as a context manager")
        return int(self._httpd.server_address[1])

    @property
    def base_url(self) -> str:
        """The OpenAI `base_url` of this server, e.g. `http://127.0.0.1:PORT/v1`."""
        return f"http://127.0.0.1:{self.port}/v1"

    def openai_model(
        self, model_name: str = "gpt-4o", *, max_retries: int = 0, timeout: float | None = None
    ) -> OpenAIChatModel:
        """A pydantic-ai `OpenAIChatModel` talking to this server through a real `AsyncOpenAI` client.

        `max_retries` defaults to 0 so the OpenAI SDK does not retry 408/409/429/5xx/connection errors by
        itself (its default is 2): the Prefect task retries are meant to be the one retry layer, and a test
        must see exactly one HTTP request per attempt. `timeout` (seconds per HTTP attempt) defaults to the SDK's.
        """
        from openai import NOT_GIVEN, AsyncOpenAI
        from pydantic_ai.models.openai import OpenAIChatModel
        from pydantic_ai.providers.openai import OpenAIProvider

        client = AsyncOpenAI(
            base_url=self.base_url,
            api_key="loopback",
            max_retries=max_retries,
            timeout=NOT_GIVEN if timeout is None else timeout,
        )
        return OpenAIChatModel(model_name, provider=OpenAIProvider(openai_client=client))

    # -- scripting -------------------------------------------------------------------------------------------

    def enqueue(self, *items: Scripted) -> Self:
        """Append scripted answers to the queue, one per future request."""
        with self._lock:
            self._script.extend(items)
        return self

    def reply_text(self, text: str, *, usage: Usage | None = None) -> Self:
        """Queue a plain text answer."""
        return self.enqueue(TextReply(text, usage))

    def reply_tool_calls(self, calls: Sequence[tuple[str, ToolArgs]], *, usage: Usage | None = None) -> Self:
        """Queue one answer calling the given `(tool_name, args)` tools, in order."""
        return self.enqueue(ToolCallsReply(tuple(calls), usage))

    def reply_json(self, obj: Any, *, usage: Usage | None = None) -> Self:
        """Queue structured output `obj` (via the `final_result*` output tool when the request offers one)."""
        return self.enqueue(JsonReply(obj, usage))

    def fault_status(
        self,
        status: int,
        *,
        retry_after: float | None = None,
        message: str | None = None,
        code: str | None = None,
    ) -> Self:
        """Queue an HTTP error status (e.g. 429 with `retry_after`, 500, 503) with an OpenAI-style error body."""
        return self.enqueue(StatusFault(status, retry_after, message, code))

    def fault_delay(self, seconds: float, *, then: Scripted | None = None) -> Self:
        """Queue a slow answer: sleep `seconds`, then answer with `then` (or drop the connection if `None`)."""
        return self.enqueue(DelayFault(seconds, then))

    def fault_reset(self) -> Self:
        """Queue a connection reset in the middle of a 200 response body."""
        return self.enqueue(ResetFault())

    def fault_cut_stream(self, reply: Reply, *, after_deltas: int) -> Self:
        """Queue a streamed `reply` whose connection closes after its first `after_deltas` deltas."""
        return self.enqueue(CutStreamFault(reply, after_deltas))

    def fault_malformed_json(self) -> Self:
        """Queue a 200 response whose JSON body is broken."""
        return self.enqueue(MalformedJsonFault())

    def fault_invalid_tool_args(self, tool_name: str, args: ToolArgs = INVALID_JSON_ARGS) -> Self:
        """Queue a call of `tool_name` with arguments its schema rejects: non-JSON by default, or `args` as given."""
        return self.enqueue(ToolCallsReply(((tool_name, args),)))

    def fault_schema_invalid_output(self, obj: Any, *, usage: Usage | None = None) -> Self:
        """Queue a `final_result*` output call whose arguments `obj` are expected to fail the output schema."""
        return self.enqueue(JsonReply(obj, usage))

    @property
    def pending(self) -> int:
        """How many scripted answers are still queued."""
        with self._lock:
            return len(self._script)

    # -- recording -------------------------------------------------------------------------------------------

    @property
    def received(self) -> list[RecordedRequest]:
        """Every HTTP request received so far (method, path, headers, parsed body), oldest first."""
        with self._lock:
            return list(self._received)

    @property
    def exchanges(self) -> list[Exchange]:
        """Arrival time, status and answer time of every request received so far, oldest first."""
        with self._lock:
            return list(self._exchanges)

    @property
    def requests(self) -> list[Any]:
        """The parsed JSON bodies of every request received so far, oldest first."""
        return [request.body for request in self.received]

    @property
    def request_count(self) -> int:
        """How many HTTP requests the server received (including failed and unscripted ones)."""
        with self._lock:
            return len(self._received)

    @property
    def in_flight(self) -> int:
        """How many POST requests this server is answering now (a responder's own request included)."""
        with self._lock:
            return self._in_flight

    @property
    def max_in_flight(self) -> int:
        """The most POST requests this server was answering at one time (received, answer not yet fully sent):
        what a provider would see of a concurrency limit."""
        with self._lock:
            return self._max_in_flight

    @property
    def exhausted_count(self) -> int:
        """How many chat-completions requests found neither a scripted answer nor a responder."""
        with self._lock:
            return self._exhausted

    # -- used by the request handler -------------------------------------------------------------------------

    def _record(self, request: RecordedRequest, received_at: float) -> int:
        with self._lock:
            self._received.append(request)
            self._exchanges.append(Exchange(request.path.split("?", 1)[0], received_at))
            return len(self._received)

    def _flight(self, change: int) -> None:
        with self._lock:
            self._in_flight += change
            self._max_in_flight = max(self._max_in_flight, self._in_flight)

    def _answered(self, number: int, status: int) -> None:
        with self._lock:
            answered = replace(self._exchanges[number - 1], status=status, answered_at=time.monotonic())
            self._exchanges[number - 1] = answered

    def _next_scripted(self, body: dict[str, Any]) -> Scripted | None:
        with self._lock:
            if self._script:
                return self._script.popleft()
            responder = self.responder
            if responder is None:
                self._exhausted += 1
                return None
        return responder(body)

    def _next_tool_call_id(self) -> str:
        with self._lock:
            self._tool_call_ids += 1
            return f"call_{self._tool_call_ids}"


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    loopback: LoopbackOpenAI

    def handle_error(self, request: Any, client_address: Any) -> None:
        """Stay quiet about clients that went away (timeouts, resets); report anything else as usual."""
        if not isinstance(sys.exc_info()[1], OSError):
            super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # a write is sent as it is, never held back to join the next one
    server: _HTTPServer
    _number = 0  # this request's 1-based number on the server, once recorded

    def log_message(self, format: str, *args: Any) -> None:
        """Keep test output clean: requests are recorded on the server object instead."""

    def do_GET(self) -> None:
        self._record(None, time.monotonic())
        self._send_error(404, f"no route for GET {self.path}", "not_found")

    def do_POST(self) -> None:
        self.server.loopback._flight(+1)
        try:
            self._post()
        finally:
            self.server.loopback._flight(-1)

    def _post(self) -> None:
        received_at = time.monotonic()
        raw = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        try:
            body: Any = json.loads(raw)
        except ValueError:
            body = None
        number = self._record(body, received_at)
        path = self.path.split("?", 1)[0]
        if path not in CHAT_COMPLETIONS_PATHS | RESPONSES_PATHS:
            self._send_error(404, f"no route for POST {path}", "not_found")
            return
        if not isinstance(body, dict):
            self._send_error(400, "request body must be a JSON object", "invalid_request_error")
            return
        if path in RESPONSES_PATHS and body.get("stream"):
            self._send_error(
                400, "LoopbackOpenAI answers non-streamed Responses requests only", "unsupported"
            )
            return
        try:
            item = self.server.loopback._next_scripted(body)
        except Exception as e:  # a responder bug must reach the test as an error, not a hung request
            self._send_error(500, f"LoopbackOpenAI responder raised {e!r}", "responder_error")
            return
        if item is None:
            self._send_error(
                500,
                f"LoopbackOpenAI script exhausted: request #{number} ({path}) has no scripted reply; "
                "queue more replies or set `responder`",
                "script_exhausted",
            )
            return
        self._answer(item, body, responses=path in RESPONSES_PATHS)

    # -- answers ---------------------------------------------------------------------------------------------

    def _record(self, body: Any, received_at: float) -> int:
        self._number = self.server.loopback._record(
            RecordedRequest(self.command, self.path, {k.lower(): v for k, v in self.headers.items()}, body),
            received_at,
        )
        return self._number

    def _answer(self, item: Scripted, request: dict[str, Any], *, responses: bool = False) -> None:
        match item:
            case StatusFault():
                self._send_status_fault(item)
            case DelayFault(seconds=seconds, then=then):
                if self.server.loopback._stopping.wait(seconds) or then is None:
                    self.close_connection = True
                    return
                self._answer(then, request, responses=responses)
            case ResetFault():
                self._reset_mid_body(
                    _reply_body(request, "a reply cut short", (), None), _content_type(request)
                )
            case MalformedJsonFault():
                broken = b'{"id": "chatcmpl-broken", "choices": [{"index'
                body = b"data: " + broken + b"\n\n" if request.get("stream") else broken
                self._send(200, body, {"Content-Type": _content_type(request)})
            case CutStreamFault(reply=reply, after_deltas=after):
                if not request.get("stream"):
                    self._send_error(400, "CutStreamFault answers streamed requests only", "unsupported")
                    return
                self._stream(_sse_events(request, *self._message(reply, request)), cut_after=after)
            case TextReply() | ToolCallsReply() | JsonReply() if responses:
                body = _response_body(request, *self._message(item, request))
                self._send(200, body, {"Content-Type": "application/json"})
            case TextReply() | ToolCallsReply() | JsonReply() if request.get("stream"):
                self._stream(_sse_events(request, *self._message(item, request)))
            case TextReply() | ToolCallsReply() | JsonReply():
                body = _completion_body(request, *self._message(item, request))
                self._send(200, body, {"Content-Type": "application/json"})

    def _message(
        self, item: Reply, request: dict[str, Any]
    ) -> tuple[str | None, tuple[tuple[str, str, str], ...], Usage | None]:
        """The assistant message of a reply: `(content, ((id, name, arguments_json), ...), usage)`."""
        calls: tuple[tuple[str, ToolArgs], ...]
        if isinstance(item, TextReply):
            return item.text, (), item.usage
        if isinstance(item, ToolCallsReply):
            calls = item.calls
        else:
            output_tool = _output_tool_name(request)
            if output_tool is None:
                return json.dumps(item.obj), (), item.usage
            calls = ((output_tool, item.obj),)
        tool_calls = tuple(
            (
                self.server.loopback._next_tool_call_id(),
                name,
                args if isinstance(args, str) else json.dumps(args, ensure_ascii=False),
            )
            for name, args in calls
        )
        return None, tool_calls, item.usage

    def _send_status_fault(self, fault: StatusFault) -> None:
        headers: dict[str, str] = {}
        if fault.retry_after is not None:
            headers["Retry-After"] = str(math.ceil(fault.retry_after))
            headers["retry-after-ms"] = str(round(fault.retry_after * 1000))
        default_code = "rate_limit_exceeded" if fault.status == 429 else None
        error_type = (
            "requests"
            if fault.status == 429
            else "server_error"
            if fault.status >= 500
            else "invalid_request_error"
        )
        message = fault.message or f"Injected HTTP {fault.status} from LoopbackOpenAI"
        self._send(fault.status, _error_body(message, error_type, fault.code or default_code), headers)

    def _send_error(self, status: int, message: str, code: str) -> None:
        self._send(status, _error_body(message, code, code), {"x-should-retry": "false"})

    def _send(self, status: int, body: bytes, headers: Mapping[str, str]) -> None:
        self._send_head(status, len(body), headers)
        self.wfile.write(body)
        self.server.loopback._answered(self._number, status)

    def _send_head(self, status: int, length: int, headers: Mapping[str, str]) -> None:
        self.send_response(status)
        self.send_header("Content-Type", headers.get("Content-Type", "application/json"))
        self.send_header("Content-Length", str(length))
        # One request per connection: a keep-alive connection left in an unclosed client's pool would be closed
        # by the SDK's `__del__` on whatever event loop runs then, failing a later test with "Event loop is closed".
        self.send_header("Connection", "close")
        for name, value in headers.items():
            if name != "Content-Type":
                self.send_header(name, value)
        self.end_headers()

    def _stream(self, events: list[_Event], *, cut_after: int | None = None) -> None:
        """Send SSE `events` in the writes of the server's chunking; with `cut_after`, only the events up to that
        many deltas, then close the connection short of the promised body."""
        body = b"".join(event.data for event in events)
        if cut_after is not None:
            deltas, sent = 0, 0
            for event in events:
                if event.delta is not None:
                    if deltas == cut_after:
                        break
                    deltas += 1
                sent += len(event.data)
            body, promised = body[:sent], len(body)
        chunking = self.server.loopback.chunking
        self._send_head(
            200, promised if cut_after is not None else len(body), {"Content-Type": "text/event-stream"}
        )
        for number, piece in enumerate(_writes(body, events, chunking)):
            if number and self.server.loopback._stopping.wait(chunking.pause):
                self.close_connection = True
                return
            self.wfile.write(piece)
        self.server.loopback._answered(self._number, 200)
        if cut_after is not None:
            self.connection.shutdown(socket.SHUT_WR)  # an orderly close: every byte sent is read first
            self.close_connection = True

    def _reset_mid_body(self, body: bytes, content_type: str) -> None:
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body[: len(body) // 2])
        self.wfile.flush()
        self.server.loopback._answered(self._number, 200)
        # Linger with a zero timeout turns close() into a TCP RST instead of an orderly FIN.
        self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        self.connection.close()
        self.close_connection = True


def _output_tool_name(request: Mapping[str, Any]) -> str | None:
    for tool in request.get("tools") or ():
        if not isinstance(tool, dict):
            continue
        name = (tool.get("function") or {}).get("name") or tool.get("name")  # chat completions / Responses
        if isinstance(name, str) and name.startswith(OUTPUT_TOOL_PREFIX):
            return name
    return None


def _content_type(request: Mapping[str, Any]) -> str:
    return "text/event-stream" if request.get("stream") else "application/json"


def _reply_body(
    request: Mapping[str, Any],
    content: str | None,
    tool_calls: Sequence[tuple[str, str, str]],
    usage: Usage | None,
) -> bytes:
    """An assistant message as a `chat.completion` JSON body, or as SSE chunks when the request streams."""
    if request.get("stream"):
        return b"".join(event.data for event in _sse_events(request, content, tool_calls, usage))
    return _completion_body(request, content, tool_calls, usage)


def _usage_json(usage: Usage) -> dict[str, int]:
    prompt, completion = usage
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}


def _tool_calls_json(tool_calls: Sequence[tuple[str, str, str]]) -> list[dict[str, Any]]:
    return [
        {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}
        for call_id, name, arguments in tool_calls
    ]


def _completion_body(
    request: Mapping[str, Any],
    content: str | None,
    tool_calls: Sequence[tuple[str, str, str]],
    usage: Usage | None,
) -> bytes:
    message: dict[str, Any] = {"role": "assistant", "content": content}
    if tool_calls:
        message["tool_calls"] = _tool_calls_json(tool_calls)
    completion: dict[str, Any] = {
        "id": f"chatcmpl-{time.monotonic_ns()}",
        "object": "chat.completion",
        "created": int(time.time()),
        "model": request.get("model", "loopback"),
        "choices": [
            {
                "index": 0,
                "message": message,
                "finish_reason": "tool_calls" if tool_calls else "stop",
                "logprobs": None,
            }
        ],
    }
    if usage is not None:
        completion["usage"] = _usage_json(usage)
    return json.dumps(completion).encode()


def _response_body(
    request: Mapping[str, Any],
    content: str | None,
    tool_calls: Sequence[tuple[str, str, str]],
    usage: Usage | None,
) -> bytes:
    """An assistant message as a Responses API `response` body: a message item, or one `function_call` each."""
    output: list[dict[str, Any]] = [
        {
            "type": "function_call",
            "id": f"fc_{uuid.uuid4().hex[:8]}",
            "call_id": call_id,
            "name": name,
            "arguments": arguments,
            "status": "completed",
        }
        for call_id, name, arguments in tool_calls
    ]
    if content is not None:
        output.insert(
            0,
            {
                "type": "message",
                "id": f"msg_{uuid.uuid4().hex[:8]}",
                "role": "assistant",
                "status": "completed",
                "content": [{"type": "output_text", "text": content, "annotations": []}],
            },
        )
    prompt, completion = usage or (0, 0)
    response = {
        "id": f"resp_{uuid.uuid4().hex[:8]}",
        "object": "response",
        "created_at": int(time.time()),
        "model": request.get("model", "loopback"),
        "status": "completed",
        "output": output,
        "parallel_tool_calls": True,
        "tool_choice": "auto",
        "tools": [],
        "usage": {
            "input_tokens": prompt,
            "output_tokens": completion,
            "total_tokens": prompt + completion,
            "input_tokens_details": {"cached_tokens": 0},
            "output_tokens_details": {"reasoning_tokens": 0},
        },
    }
    return json.dumps(response).encode()


@dataclass(frozen=True)
class _Event:
    """One SSE event of a streamed reply; `delta` is the text or arguments fragment it carries, if any."""

    data: bytes
    delta: str | None = None
    arguments: bool = False


ARGUMENTS_PER_DELTA = 7
"""Characters of a tool call's JSON arguments per streamed delta: most fragments end inside a key or a value."""


def _words(text: str) -> list[str]:
    """`text` as streamed text deltas, one word each (with the whitespace before it): `The`, ` capital`, ..."""
    words = re.findall(r"\s*\S+", text) or [text]
    words[-1] += text[len("".join(words)) :]  # trailing whitespace stays in the last delta
    return words


def _sse_events(
    request: Mapping[str, Any],
    content: str | None,
    tool_calls: Sequence[tuple[str, str, str]],
    usage: Usage | None,
) -> list[_Event]:
    """The reply as `chat.completion.chunk` SSE events: the role, a word per text delta, each tool call's name
    and then its arguments a few characters at a time, the finish reason, the usage, `[DONE]`."""
    base = {
        "id": f"chatcmpl-{time.monotonic_ns()}",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": request.get("model", "loopback"),
    }

    def event(change: dict[str, Any], finish_reason: str | None = None, **kind: Any) -> _Event:
        choice = {"index": 0, "delta": change, "finish_reason": finish_reason, "logprobs": None}
        return _Event(_sse({**base, "choices": [choice]}), **kind)

    events = [event({"role": "assistant", "content": ""})]
    if content:
        events.extend(event({"content": word}, delta=word) for word in _words(content))
    for index, (call_id, name, arguments) in enumerate(tool_calls):
        opening = {
            "index": index,
            "id": call_id,
            "type": "function",
            "function": {"name": name, "arguments": ""},
        }
        events.append(event({"tool_calls": [opening]}))
        for start in range(0, len(arguments), ARGUMENTS_PER_DELTA):
            piece = arguments[start : start + ARGUMENTS_PER_DELTA]
            fragment = {"index": index, "function": {"arguments": piece}}
            events.append(event({"tool_calls": [fragment]}, delta=piece, arguments=True))
    events.append(event({}, "tool_calls" if tool_calls else "stop"))
    if usage is not None and (request.get("stream_options") or {}).get("include_usage"):
        events.append(_Event(_sse({**base, "choices": [], "usage": _usage_json(usage)})))
    events.append(_Event(b"data: [DONE]\n\n"))
    return events


def _sse(chunk: Mapping[str, Any]) -> bytes:
    return f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n".encode()  # raw UTF-8, as providers send


def _writes(body: bytes, events: Sequence[_Event], chunking: Chunking) -> list[bytes]:
    """`body` (the events' bytes, maybe cut short) as the socket writes `chunking` asks for."""
    cuts: set[int] = set()
    if chunking.writes == "random":
        rng, at = random.Random(chunking.seed), 0
        while (at := at + rng.randint(1, 160)) < len(body):
            cuts.add(at)
    elif chunking.writes != "burst":
        at = 0
        for event in events:
            if chunking.writes == "inside_tool_args" and event.arguments and event.delta:
                value = event.data.index(b'"arguments": "') + len(b'"arguments": "')
                fragment = json.dumps(event.delta, ensure_ascii=False)[1:-1].encode()
                cuts.add(at + value + max(1, len(fragment) // 2))
            if chunking.writes == "inside_utf8":
                cuts.update(at + i + 1 for i, byte in enumerate(event.data) if byte >= 0xC0)
            at += len(event.data)
            cuts.add(at)
    bounds = [0, *sorted(c for c in cuts if 0 < c < len(body)), len(body)]
    return [body[a:b] for a, b in itertools.pairwise(bounds) if b > a]


def _error_body(message: str, error_type: str, code: str | None) -> bytes:
    return json.dumps(
        {"error": {"message": message, "type": error_type, "param": None, "code": code}}
    ).encode()
