"""Real behaviour of the test helpers: pydantic-ai's OpenAI client against `LoopbackOpenAI`, and fault plans."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from openai import AsyncOpenAI
from pydantic import BaseModel
from pydantic_ai import Agent
from pydantic_ai.exceptions import (
    ModelAPIError,
    ModelConnectionError,
    ModelHTTPError,
    ModelRateLimitError,
    ModelServerError,
    ModelTimeoutError,
    ModelUnavailableError,
)
from pydantic_ai.messages import ModelMessage, ModelResponse, TextPart
from pydantic_ai.models.function import AgentInfo, FunctionModel
from pydantic_ai.models.openai import OpenAIResponsesModel
from pydantic_ai.providers.openai import OpenAIProvider
from pydantic_ai.settings import ModelSettings

import prefect_pydantic_ai.testing.faults as faults_module
from prefect_pydantic_ai.testing import (
    CallLog,
    Chunking,
    FaultPlan,
    LoopbackOpenAI,
    TextReply,
    ToolCallsReply,
    wrap_function_model,
)
from prefect_pydantic_ai.testing.openai_server import Writes
from tests.warm import python


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture(scope="module")
def prefect_server() -> None:
    """These tests never talk to Prefect: skip the session's Prefect server (it takes seconds to start)."""


@pytest.fixture
def server() -> Iterator[LoopbackOpenAI]:
    with LoopbackOpenAI() as running:
        yield running


class City(BaseModel):
    name: str
    population: int


def adding_agent(server: LoopbackOpenAI, **model_kwargs: Any) -> Agent[None, str]:
    agent = Agent(server.openai_model(**model_kwargs))

    @agent.tool_plain
    def add(a: int, b: int) -> int:
        """Add two numbers."""
        return a + b

    return agent


def tool_messages(request: dict[str, Any]) -> list[dict[str, Any]]:
    return [m for m in request["messages"] if m["role"] == "tool"]


# -- LoopbackOpenAI: successful replies ----------------------------------------------------------------------


@pytest.mark.anyio
async def test_text_reply_and_usage(server: LoopbackOpenAI) -> None:
    server.reply_text("hello", usage=(11, 3))

    result = await Agent(server.openai_model()).run("hi")

    assert result.output == "hello"
    assert (result.usage.input_tokens, result.usage.output_tokens, result.usage.requests) == (11, 3, 1)
    [request] = server.received
    assert (request.method, request.path) == ("POST", "/v1/chat/completions")
    assert request.headers["authorization"] == "Bearer loopback"
    assert request.body["model"] == "gpt-4o"
    assert request.body["messages"] == [{"role": "user", "content": "hi"}]


@pytest.mark.anyio
async def test_tool_calls_execute_then_final_text(server: LoopbackOpenAI) -> None:
    server.reply_tool_calls([("add", {"a": 1, "b": 2}), ("add", {"a": 3, "b": 4})], usage=(10, 5))
    server.reply_text("3 and 7", usage=(20, 2))

    result = await adding_agent(server).run("add things")

    assert result.output == "3 and 7"
    assert (result.usage.input_tokens, result.usage.output_tokens, result.usage.requests) == (30, 7, 2)
    assert result.usage.tool_calls == 2
    second = server.requests[1]
    assert [(m["tool_call_id"], m["content"]) for m in tool_messages(second)] == [
        ("call_1", "3"),
        ("call_2", "7"),
    ]
    assert server.pending == 0


@pytest.mark.anyio
async def test_structured_output_through_the_output_tool(server: LoopbackOpenAI) -> None:
    server.reply_json({"name": "Paris", "population": 2_100_000}, usage=(8, 4))

    result = await Agent(server.openai_model(), output_type=City).run("biggest city?")

    assert result.output == City(name="Paris", population=2_100_000)
    assert result.usage.output_tokens == 4
    assert [t["function"]["name"] for t in server.requests[0]["tools"]] == ["final_result"]


@pytest.mark.anyio
async def test_streamed_reply_with_usage(server: LoopbackOpenAI) -> None:
    server.reply_tool_calls([("add", {"a": 2, "b": 2})], usage=(4, 1))
    server.reply_text("four", usage=(6, 2))

    async with adding_agent(server).run_stream("2+2") as stream:
        output = await stream.get_output()

    assert output == "four"
    assert (stream.usage.input_tokens, stream.usage.output_tokens) == (10, 3)
    assert all(body["stream"] is True for body in server.requests)


@pytest.mark.parametrize("writes", ["per_event", "inside_utf8", "inside_tool_args"])
def test_a_streamed_reply_reaches_the_socket_in_the_writes_of_its_chunking(
    server: LoopbackOpenAI, writes: Writes
) -> None:
    server.chunking = Chunking(writes, pause=0.05)  # long enough for every write to be a read of its own
    if writes == "inside_tool_args":
        server.reply_tool_calls([("lookup", {"city": "México"})])
    else:
        server.reply_text("Ciudad de México")
    body = {"model": "gpt-4o", "messages": [], "stream": True}
    with httpx.stream("POST", f"{server.base_url}/chat/completions", json=body) as response:
        reads = list(response.iter_raw())
    events = b"".join(reads).split(b"\n\n")
    deltas = [json.loads(e[6:])["choices"][0]["delta"] for e in events if e.startswith(b"data: {")]
    if writes == "inside_tool_args":  # the arguments come a few characters at a time, each cut in its middle
        fragments = [d["tool_calls"][0]["function"]["arguments"] for d in deltas if "tool_calls" in d]
        assert fragments == ["", '{"city"', ': "Méxi', 'co"}']
        cut = [r[r.rindex(b'"arguments": "') :] for r in reads if not r.endswith(b"\n\n")]
        assert cut == [b'"arguments": "{\\"c', b'"arguments": ": \\"', b'"arguments": "co']
    else:  # a word per text delta, raw UTF-8, each cut after the first byte of its 'é' if it has one
        assert [d["content"] for d in deltas[:-1]] == ["", "Ciudad", " de", " México"]
        assert len(reads) == (len(events) - 1) + (writes == "inside_utf8")
        assert [r for r in reads if r.endswith("é".encode()[:1])] == (
            [reads[-4]] if writes == "inside_utf8" else []
        )


@pytest.mark.anyio
async def test_the_responses_api_answers_text_and_tool_calls(server: LoopbackOpenAI) -> None:
    server.reply_tool_calls([("add", {"a": 2, "b": 3})], usage=(7, 2))
    server.reply_text("five", usage=(9, 1))
    client = AsyncOpenAI(base_url=server.base_url, api_key="loopback", max_retries=0)
    agent = Agent(OpenAIResponsesModel("gpt-4o", provider=OpenAIProvider(openai_client=client)))
    agent.tool_plain(lambda a, b: a + b, name="add")

    result = await agent.run("2+3")

    assert result.output == "five" and result.usage.input_tokens == 16
    assert [r.path for r in server.received] == ["/v1/responses", "/v1/responses"]


@pytest.mark.anyio
async def test_responder_answers_when_the_queue_is_empty(server: LoopbackOpenAI) -> None:
    server.responder = lambda body: TextReply(f"echo: {body['messages'][-1]['content']}")
    server.reply_text("scripted first")
    agent = Agent(server.openai_model())

    assert (await agent.run("one")).output == "scripted first"
    assert (await agent.run("two")).output == "echo: two"


@pytest.mark.anyio
async def test_delayed_reply_arrives_after_the_delay(server: LoopbackOpenAI) -> None:
    server.fault_delay(0.3, then=TextReply("late"))

    started = time.monotonic()
    result = await Agent(server.openai_model()).run("hi")

    assert result.output == "late"
    assert time.monotonic() - started >= 0.3


# -- LoopbackOpenAI: faults ----------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_429_is_a_rate_limit_error_after_exactly_one_request(server: LoopbackOpenAI) -> None:
    server.fault_status(429, retry_after=1.5)

    with pytest.raises(ModelHTTPError) as caught:
        await Agent(server.openai_model()).run("hi")

    assert caught.value.status_code == 429
    assert isinstance(caught.value, ModelRateLimitError)
    assert caught.value.retry_after == 1.5
    assert caught.value.provider_error_code == "rate_limit_exceeded"
    assert server.request_count == 1


@pytest.mark.anyio
@pytest.mark.parametrize(("status", "category"), [(500, ModelServerError), (503, ModelUnavailableError)])
async def test_5xx_is_a_model_http_error(
    server: LoopbackOpenAI, status: int, category: type[Exception]
) -> None:
    server.fault_status(status)

    with pytest.raises(ModelHTTPError) as caught:
        await Agent(server.openai_model()).run("hi")

    assert caught.value.status_code == status
    assert isinstance(caught.value, category)
    assert server.request_count == 1


@pytest.mark.anyio
async def test_delay_beyond_the_client_timeout_is_a_timeout_and_does_not_block_stop() -> None:
    server = LoopbackOpenAI().start()
    stopping = threading.Thread(target=server.stop, daemon=True)
    try:
        server.fault_delay(3600.0, then=TextReply("too late"))
        with pytest.raises(ModelTimeoutError):
            await Agent(server.openai_model(timeout=0.2)).run("hi")
        assert server.request_count == 1
    finally:
        stopping.start()
        stopping.join(timeout=120)  # a stop that waited out the delay would take an hour
    assert not stopping.is_alive(), "stop() is waiting for the delayed request"


@pytest.mark.anyio
async def test_reset_mid_body_is_a_connection_error(server: LoopbackOpenAI) -> None:
    server.fault_reset()

    with pytest.raises(ModelConnectionError) as caught:
        await Agent(server.openai_model()).run("hi")

    assert not isinstance(caught.value, ModelHTTPError)
    assert server.request_count == 1


@pytest.mark.anyio
async def test_delay_without_a_reply_drops_the_connection(server: LoopbackOpenAI) -> None:
    server.fault_delay(0.05)

    with pytest.raises(ModelConnectionError):
        await Agent(server.openai_model()).run("hi")


@pytest.mark.anyio
async def test_malformed_json_is_a_model_api_error(server: LoopbackOpenAI) -> None:
    server.fault_malformed_json()

    with pytest.raises(ModelAPIError, match="decode"):
        await Agent(server.openai_model()).run("hi")


@pytest.mark.anyio
async def test_streamed_faults(server: LoopbackOpenAI) -> None:
    server.fault_malformed_json()
    server.fault_reset()
    agent = Agent(server.openai_model())

    with pytest.raises(ModelAPIError, match="decode"):
        async with agent.run_stream("hi") as stream:
            await stream.get_output()
    with pytest.raises(ModelConnectionError):
        async with agent.run_stream("hi") as stream:
            await stream.get_output()


@pytest.mark.anyio
@pytest.mark.parametrize("where", ["client", "model_settings"])
async def test_sdk_retries_only_when_asked(server: LoopbackOpenAI, where: str) -> None:
    server.fault_status(503, retry_after=0.05)
    server.reply_text("second attempt")
    model = server.openai_model(max_retries=1 if where == "client" else 0)
    settings: ModelSettings = {"max_retries": 1} if where == "model_settings" else {}

    result = await Agent(model).run("hi", model_settings=settings)

    assert result.output == "second attempt"
    assert server.request_count == 2


@pytest.mark.anyio
@pytest.mark.parametrize("bad_args", [None, {"a": "one", "b": [2]}], ids=["not-json", "wrong-types"])
async def test_invalid_tool_args_make_pydantic_ai_send_a_retry_prompt(
    server: LoopbackOpenAI, bad_args: dict[str, Any] | None
) -> None:
    if bad_args is None:
        server.fault_invalid_tool_args("add")
    else:
        server.fault_invalid_tool_args("add", bad_args)
    server.reply_tool_calls([("add", {"a": 1, "b": 1})])
    server.reply_text("two")

    result = await adding_agent(server).run("1+1")

    assert result.output == "two"
    [retry] = tool_messages(server.requests[1])
    assert retry["tool_call_id"] == "call_1"
    errors = json.loads(retry["content"])["error"]
    assert [e["type"] for e in errors] == (
        ["json_invalid"] if bad_args is None else ["int_parsing", "int_type"]
    )
    assert server.request_count == 3


@pytest.mark.anyio
async def test_schema_invalid_output_is_retried_by_pydantic_ai(server: LoopbackOpenAI) -> None:
    server.fault_schema_invalid_output({"name": "Paris", "population": "lots"})
    server.reply_json({"name": "Paris", "population": 2})

    result = await Agent(server.openai_model(), output_type=City).run("city?")

    assert result.output == City(name="Paris", population=2)
    [retry] = tool_messages(server.requests[1])
    assert "population" in retry["content"]


@pytest.mark.anyio
async def test_exhausted_script_is_a_clear_500(server: LoopbackOpenAI) -> None:
    with pytest.raises(ModelHTTPError, match="script exhausted") as caught:
        await Agent(server.openai_model(max_retries=2)).run("hi")

    assert caught.value.status_code == 500
    # `x-should-retry: false` stops even a retrying SDK client from asking again.
    assert (server.request_count, server.exhausted_count) == (1, 1)


def test_raw_http_status_headers_and_unknown_routes(server: LoopbackOpenAI) -> None:
    server.fault_status(429, retry_after=0.25)
    with httpx.Client(base_url=server.base_url) as client:
        limited = client.post("/chat/completions", json={"model": "m", "messages": []})
        missing = client.get("/models")

    assert limited.status_code == 429
    assert (limited.headers["retry-after"], limited.headers["retry-after-ms"]) == ("1", "250")
    assert limited.json()["error"]["code"] == "rate_limit_exceeded"
    assert missing.status_code == 404
    assert [(r.method, r.path) for r in server.received] == [
        ("POST", "/v1/chat/completions"),
        ("GET", "/v1/models"),
    ]


def test_tool_call_ids_are_unique_across_replies(server: LoopbackOpenAI) -> None:
    server.enqueue(ToolCallsReply((("a", {}),)), ToolCallsReply((("b", "{}"), ("c", {"x": 1}))))
    with httpx.Client(base_url=server.base_url) as client:
        bodies = [client.post("/chat/completions", json={"messages": []}).json() for _ in range(2)]

    calls = [c for body in bodies for c in body["choices"][0]["message"]["tool_calls"]]
    assert [(c["id"], c["function"]["name"], c["function"]["arguments"]) for c in calls] == [
        ("call_1", "a", "{}"),
        ("call_2", "b", "{}"),
        ("call_3", "c", '{"x": 1}'),
    ]


# -- FaultPlan and CallLog -----------------------------------------------------------------------------------


def test_fault_plan_fails_on_the_nth_call_only() -> None:
    plan = FaultPlan().fail("step", on_call=2, exc=TimeoutError("injected"))

    assert plan.hit_sync("step") == 1
    with pytest.raises(TimeoutError, match="injected"):
        plan.hit_sync("step")
    assert plan.hit_sync("step") == 3
    assert plan.hit_sync("other") == 1
    assert (plan.calls("step"), plan.calls("other")) == (3, 1)


@pytest.mark.anyio
async def test_fault_plan_delays_then_raises() -> None:
    plan = (
        FaultPlan().fail("slow", on_call=1, delay=0.2).fail("slow", on_call=2, delay=0.1, exc=ValueError("x"))
    )

    started = time.monotonic()
    await plan.hit("slow")
    assert time.monotonic() - started >= 0.2
    with pytest.raises(ValueError):
        await plan.hit("slow")


def test_fault_plan_rejects_ambiguous_or_untransportable_faults() -> None:
    plan = FaultPlan().fail("s", on_call=1, exc=RuntimeError("a"))
    with pytest.raises(ValueError, match="already has a fault"):
        plan.kill("s", on_call=1)
    with pytest.raises(ValueError, match="1-based"):
        plan.kill("s", on_call=0)
    with pytest.raises(ValueError, match="cannot pass"):
        FaultPlan().fail("s", on_call=1, exc=KeyError("k")).to_json()


def test_fault_plan_round_trips_through_the_environment(tmp_path: Path) -> None:
    plan = (
        FaultPlan(state_file=tmp_path / "calls.jsonl")
        .fail("a", on_call=2, exc=ConnectionError("down"), delay=0.5)
        .kill("b", on_call=1)
    )

    copy = FaultPlan.from_env(environ=plan.to_env())

    assert copy.state_file == tmp_path / "calls.jsonl"
    assert [(f.name, f.on_call, f.delay, f.kill, type(f.exc), str(f.exc)) for f in copy.faults] == [
        ("a", 2, 0.5, False, ConnectionError, "down"),
        ("b", 1, 0.0, True, type(None), "None"),
    ]
    assert FaultPlan.from_env(environ={}).faults == ()


# The subprocesses load faults.py by path: importing the package would import Prefect, which takes seconds.
SUBPROCESS_PRELUDE = f"""
import importlib.util, sys
spec = importlib.util.spec_from_file_location("faults", {faults_module.__file__!r})
faults = importlib.util.module_from_spec(spec)
sys.modules["faults"] = faults
spec.loader.exec_module(faults)
"""


def run_python(code: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return python("-c", SUBPROCESS_PRELUDE + code, env=env, timeout=20)


@pytest.mark.slow
def test_kill_fault_sigkills_once_across_processes(tmp_path: Path) -> None:
    state_file = tmp_path / "calls.jsonl"
    plan = FaultPlan(state_file=state_file).kill("detect", on_call=1)
    hit_and_report = "n = faults.FaultPlan.from_env().hit_sync('detect'); print('survived call', n)"

    first = run_python(hit_and_report, plan.to_env())
    assert first.returncode == -signal.SIGKILL
    assert "survived" not in first.stdout
    assert plan.calls("detect") == 1

    second = run_python(hit_and_report, plan.to_env())
    assert (second.returncode, second.stdout.strip()) == (0, "survived call 2")
    assert [e.name for e in CallLog(state_file).entries()] == ["detect", "detect"]


@pytest.mark.slow
def test_call_log_counts_calls_from_concurrent_processes(tmp_path: Path) -> None:
    path = tmp_path / "log" / "calls.jsonl"
    code = f"""
log = faults.CallLog({str(path)!r})
for i in range(20):
    log.record("model", {{"i": i}})
log.record("tool", ["x"])
"""
    procs = [
        subprocess.Popen([sys.executable, "-c", SUBPROCESS_PRELUDE + code], env=dict(os.environ))
        for _ in range(2)
    ]
    assert [p.wait(timeout=20) for p in procs] == [0, 0]

    log = CallLog(path)
    assert log.counts() == {"model": 40, "tool": 2}
    entries = log.entries()
    assert {e.pid for e in entries} == {p.pid for p in procs}
    assert sorted(e.args["i"] for e in entries if e.name == "model") == sorted(list(range(20)) * 2)
    assert log.record("tool") == 3
    assert all(json.loads(line) for line in path.read_text().splitlines())


@pytest.mark.anyio
async def test_wrapped_function_model_consults_the_plan() -> None:
    def reply(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        return ModelResponse(parts=[TextPart("ok")])

    plan = FaultPlan().fail("model", on_call=1, exc=ConnectionError("injected"))
    agent = Agent(FunctionModel(wrap_function_model(reply, plan)))

    with pytest.raises(ConnectionError, match="injected"):
        await agent.run("first")
    assert (await agent.run("second")).output == "ok"
    assert plan.calls("model") == 2
