"""The reliability matrix, through the real HTTP path: pydantic-ai's OpenAI client against `LoopbackOpenAI`.

For every fault the server can inject we count what crosses the socket: a retryable fault is retried per the
model step's `TaskConfig` (one HTTP request per attempt, since the SDK's own retries are off), an exhausted step
fails the run with an error naming the step and the cause, and a resume with the same idempotency key sends only
the requests of the steps that did not complete. The numbers asserted here are the ones in docs/reliability.md.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import os
import signal
import subprocess
import sys
import time
import traceback
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from openai import AsyncOpenAI
from prefect.settings import PREFECT_CLIENT_MAX_RETRIES, temporary_settings
from pydantic import BaseModel
from pydantic_ai import Agent
from pydantic_ai.exceptions import ModelAPIError, ModelConnectionError, ModelHTTPError
from pydantic_ai.messages import (
    ModelMessage,
    ModelResponse,
    TextPart,
    ToolCallPart,
    ToolReturnPart,
    UserPromptPart,
)
from pydantic_ai.models import Model
from pydantic_ai.models.function import AgentInfo, FunctionModel
from pydantic_ai.models.openai import OpenAIChatModel
from pydantic_ai.providers.openai import OpenAIProvider
from pydantic_ai.settings import ModelSettings

from prefect_pydantic_ai import PrefectAgent, TaskConfig
from prefect_pydantic_ai.durable.steps import _retry_after
from prefect_pydantic_ai.testing import (
    CallLog,
    FaultInjection,
    FaultPlan,
    LoopbackOpenAI,
    StatusFault,
    TextReply,
)

pytestmark = pytest.mark.anyio

PROMPT = "What is the weather in Paris?"
FINAL = "Paris is sunny."
MODEL_STEP = "model step 'gpt-4o'"
RETRY_AFTER = 1.5


def _key() -> str:
    return f"matrix-{uuid.uuid4().hex[:10]}"


def error_text(exc: BaseException) -> str:
    """What the user sees for a failed run: the exception line plus its notes."""
    return "".join(traceback.format_exception_only(exc))


@pytest.fixture
def server() -> Iterator[LoopbackOpenAI]:
    with LoopbackOpenAI() as running:
        yield running


@dataclass
class Weather:
    """A `lookup` tool that counts its calls."""

    calls: list[str] = field(default_factory=list)

    def agent(self, model: Model, name: str) -> Agent[None, str]:
        agent: Agent[None, str] = Agent(model, name=name)

        @agent.tool_plain
        def lookup(city: str) -> str:
            """The weather in `city`."""
            self.calls.append(city)
            return f"{city}: sunny"

        return agent


# -- the matrix: one fault on the second model request, after a completed model + tool prefix ------------------


@dataclass(frozen=True)
class HttpFault:
    """A fault the server injects into one request, and what the client makes of it."""

    name: str
    inject: Callable[[LoopbackOpenAI], object]
    error: type[Exception]
    cause: str
    timeout_seconds: float | None = None


FAULTS = [
    HttpFault(
        "429", lambda s: s.fault_status(429, retry_after=RETRY_AFTER), ModelHTTPError, "status_code: 429"
    ),
    HttpFault("500", lambda s: s.fault_status(500), ModelHTTPError, "status_code: 500"),
    HttpFault(  # the timeout applies to every model step: generous, so only the hung request reaches it
        "timeout",
        lambda s: s.fault_delay(60.0, then=TextReply("too late")),
        TimeoutError,
        "timed out after 3s",
        timeout_seconds=3.0,
    ),
    HttpFault("reset", lambda s: s.fault_reset(), ModelConnectionError, "Connection error"),
    HttpFault("malformed-json", lambda s: s.fault_malformed_json(), ModelAPIError, "decode"),
]


def _durable(
    server: LoopbackOpenAI, weather: Weather, fault: HttpFault, retries: int
) -> PrefectAgent[None, str]:
    config = TaskConfig(retries=retries, retry_delay_seconds=0, timeout_seconds=fault.timeout_seconds)
    return PrefectAgent(
        weather.agent(server.openai_model(), f"matrix_{fault.name}"), model_task_config=config
    )


@pytest.mark.parametrize("fault", FAULTS, ids=[f.name for f in FAULTS])
@pytest.mark.slow
async def test_a_transient_fault_is_retried_once_and_the_resume_sends_nothing(
    server: LoopbackOpenAI, fault: HttpFault
) -> None:
    weather = Weather()
    durable = _durable(server, weather, fault, retries=1)
    server.reply_tool_calls([("lookup", {"city": "Paris"})])
    fault.inject(server)
    server.reply_text(FINAL)
    key = _key()

    result = await durable.run(PROMPT, idempotency_key=key)

    assert result.output == FINAL
    assert server.request_count == 3  # model, model (fault), model (Prefect's retry)
    assert server.requests[2]["messages"] == server.requests[1]["messages"]  # the retry repeats the request
    assert weather.calls == ["Paris"]
    if fault.name == "429":  # the retry waits as long as the server's Retry-After asked
        assert _gap_before_retry(server, 1) >= RETRY_AFTER

    resumed = await durable.run(PROMPT, idempotency_key=key)

    assert resumed.output == FINAL
    assert server.request_count == 3 and weather.calls == ["Paris"]


@pytest.mark.parametrize("fault", FAULTS, ids=[f.name for f in FAULTS])
@pytest.mark.slow
async def test_an_exhausted_step_fails_naming_step_and_cause_and_the_resume_completes(
    server: LoopbackOpenAI, fault: HttpFault
) -> None:
    weather = Weather()
    durable = _durable(server, weather, fault, retries=1)
    server.reply_tool_calls([("lookup", {"city": "Paris"})])
    fault.inject(server)
    fault.inject(server)
    key = _key()

    with pytest.raises(fault.error) as failure:
        await durable.run(PROMPT, idempotency_key=key)

    text = error_text(failure.value)
    assert f"in {MODEL_STEP}, after 2 attempt(s)" in text
    assert fault.cause in text
    assert server.request_count == 3 and weather.calls == ["Paris"]

    server.reply_text(FINAL)
    resumed = await durable.run(PROMPT, idempotency_key=key)

    assert resumed.output == FINAL
    assert server.request_count == 4  # only the failed step: model 1 and the tool replay from the journal
    assert server.requests[3]["messages"] == server.requests[1]["messages"]
    assert weather.calls == ["Paris"]


async def test_a_rejected_request_is_not_retried_and_the_resume_completes(server: LoopbackOpenAI) -> None:
    weather = Weather()
    durable = PrefectAgent(
        weather.agent(server.openai_model(), "matrix_400"), model_task_config=TaskConfig(retries=2)
    )
    server.reply_tool_calls([("lookup", {"city": "Paris"})])
    server.fault_status(400, message="Invalid 'messages': rejected")
    key = _key()

    with pytest.raises(ModelHTTPError) as failure:
        await durable.run(PROMPT, idempotency_key=key)

    assert failure.value.status_code == 400
    assert "Invalid 'messages': rejected" in error_text(failure.value)
    assert "in model step 'gpt-4o', not retried: retrying cannot fix it" in error_text(failure.value)
    assert server.request_count == 2  # retries=2, but a 400 cannot be fixed by sending it again

    server.reply_text(FINAL)
    assert (await durable.run(PROMPT, idempotency_key=key)).output == FINAL
    assert server.request_count == 3 and weather.calls == ["Paris"]


# -- Retry-After: the retry waits as the provider asked, instead of the step's shorter delay, capped -----------


def _gap_before_retry(server: LoopbackOpenAI, failed: int) -> float:
    """Seconds from the answer to request `failed` (0-based) until the next request arrived."""
    fault, retry = server.exchanges[failed], server.exchanges[failed + 1]
    assert fault.answered_at is not None
    return retry.received_at - fault.answered_at


@contextlib.contextmanager
def _messages_of(logger: str) -> Iterator[list[str]]:
    """The messages `logger` emits while the block runs, as its handlers see them (after its filters)."""
    seen: list[str] = []

    class Collect(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            seen.append(record.getMessage())

    handler, target = Collect(logging.INFO), logging.getLogger(logger)
    level = target.level
    target.setLevel(logging.INFO)
    target.addHandler(handler)
    try:
        yield seen
    finally:
        target.removeHandler(handler)
        target.setLevel(level)


@pytest.mark.parametrize(
    ("retry_after", "retry_delay"),
    [(2.0, 0.0), (4.0, 3.0)],
    ids=["no-retry-delay", "retry-delay-shorter"],
)
@pytest.mark.slow
async def test_a_retry_waits_out_retry_after_in_place_of_a_shorter_retry_delay(
    server: LoopbackOpenAI, retry_after: float, retry_delay: float
) -> None:
    config = TaskConfig(retries=1, retry_delay_seconds=retry_delay)
    durable = PrefectAgent(Agent(server.openai_model(), name="matrix_retry_after"), model_task_config=config)
    server.fault_status(429, retry_after=retry_after)
    server.reply_text(FINAL)

    with _messages_of("prefect.task_runs") as logged:
        result = await durable.run(PROMPT)

    assert result.output == FINAL
    assert [(e.path, e.status) for e in server.exchanges] == [
        ("/v1/chat/completions", 429),
        ("/v1/chat/completions", 200),
    ]
    # Prefect announces its own delay (0 s: "immediately", or 3 s); the line says how long the retry really waits
    [announced] = [line for line in logged if "Retry 1/1 will start" in line]
    assert announced.endswith(
        f"Retry 1/1 will start {retry_after:g} second(s) from now (the provider's Retry-After)"
    )
    gap = _gap_before_retry(server, 0)
    assert gap >= retry_after
    if retry_delay:  # the two waits overlap and the longer one wins: they are not added (3 s margin for load)
        assert gap < retry_after + retry_delay


async def test_retry_after_from_the_real_openai_client_is_read_and_capped_at_two_minutes(
    server: LoopbackOpenAI,
) -> None:
    server.fault_status(429, retry_after=500)

    with pytest.raises(ModelHTTPError) as failure:
        await Agent(server.openai_model(), name="matrix_retry_cap").run(PROMPT)

    assert failure.value.status_code == 429
    assert failure.value.retry_after == 500.0  # pydantic-ai read the 429's retry-after headers
    assert (
        _retry_after(failure.value) == 120.0
    )  # so a durable step's next attempt waits two minutes, not 500 s
    assert _retry_after(ModelHTTPError(429, "gpt-4o", retry_after=0.25)) == 0.25
    assert _retry_after(ModelHTTPError(500, "gpt-4o")) == 0.0  # no header: only the step's own retry delay


# -- pydantic-ai's own retries (the model is asked to correct itself) are journaled like any exchange --------


async def test_invalid_tool_args_retry_prompt_is_journaled_and_replayed(server: LoopbackOpenAI) -> None:
    weather = Weather()
    durable = PrefectAgent(weather.agent(server.openai_model(), "matrix_tool_args"))
    server.fault_invalid_tool_args("lookup")
    server.reply_tool_calls([("lookup", {"city": "Paris"})])
    server.fault_status(500)  # the last step fails: the run stops after the corrected exchange
    key = _key()

    with pytest.raises(ModelHTTPError):
        await durable.run(PROMPT, idempotency_key=key)

    assert server.request_count == 3 and weather.calls == ["Paris"]
    [retry_prompt] = [m for m in server.requests[1]["messages"] if m["role"] == "tool"]
    assert "json_invalid" in retry_prompt["content"]  # the model was asked to correct its arguments

    server.reply_text(FINAL)
    resumed = await durable.run(PROMPT, idempotency_key=key)

    assert resumed.output == FINAL
    assert server.request_count == 4  # invalid call, retry prompt, corrected call and tool all replayed
    assert server.requests[3]["messages"] == server.requests[2]["messages"]
    assert weather.calls == ["Paris"]

    again = await durable.run(PROMPT, idempotency_key=key)

    assert again.output == FINAL
    assert server.request_count == 4 and weather.calls == ["Paris"]  # the whole exchange: zero requests
    assert [m.kind for m in again.all_messages()] == [m.kind for m in resumed.all_messages()]


class Forecast(BaseModel):
    city: str
    celsius: int


async def test_schema_invalid_output_retry_prompt_is_journaled_and_replayed(server: LoopbackOpenAI) -> None:
    agent: Agent[None, Forecast] = Agent(server.openai_model(), name="matrix_output", output_type=Forecast)
    durable = PrefectAgent(agent)
    server.fault_schema_invalid_output({"city": "Paris", "celsius": "warm"})
    server.fault_status(500)
    key = _key()

    with pytest.raises(ModelHTTPError):
        await durable.run(PROMPT, idempotency_key=key)

    assert server.request_count == 2
    [retry_prompt] = [m for m in server.requests[1]["messages"] if m["role"] == "tool"]
    assert "celsius" in retry_prompt["content"]

    server.reply_json({"city": "Paris", "celsius": 21})
    resumed = await durable.run(PROMPT, idempotency_key=key)

    assert resumed.output == Forecast(city="Paris", celsius=21)
    assert server.request_count == 3
    assert server.requests[2]["messages"] == server.requests[1]["messages"]

    again = await durable.run(PROMPT, idempotency_key=key)

    assert again.output == Forecast(city="Paris", celsius=21)
    assert server.request_count == 3


# -- one retry layer ------------------------------------------------------------------------------------------


def _sdk_defaults(server: LoopbackOpenAI) -> OpenAIChatModel:
    """The model as most users build it: the provider creates the OpenAI client with the SDK's defaults."""
    return OpenAIChatModel("gpt-4o", provider=OpenAIProvider(base_url=server.base_url, api_key="loopback"))


@pytest.mark.parametrize(
    ("layers", "requests"),
    [("prefect-only", 3), ("sdk-default", 9), ("model-settings-max-retries-1", 6)],
)
@pytest.mark.slow
async def test_retry_layers_multiply(server: LoopbackOpenAI, layers: str, requests: int) -> None:
    server.responder = lambda body: StatusFault(500)  # every request fails
    model = _sdk_defaults(server) if layers == "sdk-default" else server.openai_model(max_retries=0)
    client = model.client
    assert isinstance(client, AsyncOpenAI)
    assert client.max_retries == (2 if layers == "sdk-default" else 0)
    settings: ModelSettings = {"max_retries": 1} if layers.startswith("model-settings") else {}
    durable = PrefectAgent(
        Agent(model, name=f"layers_{layers.replace('-', '_')}"), model_task_config=TaskConfig(retries=2)
    )

    with pytest.raises(ModelHTTPError) as failure:
        await durable.run(PROMPT, model_settings=settings)

    assert f"in {MODEL_STEP}, after 3 attempt(s)" in error_text(failure.value)
    assert server.request_count == requests


# -- many runs at once against one Prefect server -------------------------------------------------------------

CONCURRENT_RUNS = 50
IN_FLIGHT = 10
"""Runs in flight at once: on a loaded 2-core box, the local (SQLite) Prefect server answered 503 to 50 at once."""


def _fingerprint(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:12]


@pytest.mark.slow
@pytest.mark.xdist_group("heavy")  # conftest: HEAVY
async def test_fifty_concurrent_runs_each_get_their_own_output() -> None:
    model_calls: list[str] = []
    tool_calls: list[str] = []

    def echo(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        prompt = str(next(p for m in messages for p in m.parts if isinstance(p, UserPromptPart)).content)
        model_calls.append(prompt)
        returns = [p for m in messages for p in m.parts if isinstance(p, ToolReturnPart)]
        if not returns:
            return ModelResponse(parts=[ToolCallPart("fingerprint", {"text": prompt})])
        return ModelResponse(parts=[TextPart(f"{prompt} -> {returns[0].content}")])

    agent: Agent[None, str] = Agent(FunctionModel(echo), name="matrix_concurrent")

    another_run_reached_its_tool = asyncio.Event()
    overlapped: list[bool] = []

    @agent.tool_plain
    async def fingerprint(text: str) -> str:
        tool_calls.append(text)
        if len(tool_calls) == 1:  # the first run holds its tool call open until another run reaches its own
            try:
                await asyncio.wait_for(another_run_reached_its_tool.wait(), 60)
                overlapped.append(True)
            except TimeoutError:
                overlapped.append(False)
        else:
            another_run_reached_its_tool.set()
        return _fingerprint(text)

    durable = PrefectAgent(agent)
    prompts = [f"order-{i:02d}-{uuid.uuid4().hex[:6]}" for i in range(CONCURRENT_RUNS)]
    keys = [_key() if i % 2 else None for i in range(CONCURRENT_RUNS)]  # half keyed, half keyed by flow run

    gate = asyncio.Semaphore(IN_FLIGHT)

    async def run(prompt: str, key: str | None) -> Any:
        async with gate:
            return await durable.run(prompt, idempotency_key=key)

    # The promise here is isolation, not SQLite's capacity: with the other xdist worker loading both cores, the
    # session's SQLite server answered '503 database is locked' past the client's 5 default retries (1 run of 50,
    # once). The client waits longer instead; docs/scale-out.md measures the capacity itself.
    with temporary_settings({PREFECT_CLIENT_MAX_RETRIES: 8}):
        results = await asyncio.gather(*(run(p, k) for p, k in zip(prompts, keys, strict=True)))

    assert [r.output for r in results] == [f"{p} -> {_fingerprint(p)}" for p in prompts]
    # Every run executed its own tool call: none was replayed from another run's journal entry.
    assert sorted(tool_calls) == sorted(prompts)
    assert sorted(model_calls) == sorted(prompts * 2)
    assert overlapped == [True], "the runs did not overlap: a second run never reached its tool call"


# -- the fault-injection capability users get -------------------------------------------------------------------


async def test_fault_injection_is_one_failed_attempt_inside_the_step_and_never_sees_replays() -> None:
    def script(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        returns = [p for m in messages for p in m.parts if isinstance(p, ToolReturnPart)]
        if not returns:
            return ModelResponse(parts=[ToolCallPart("search", {"q": "tea"})])
        return ModelResponse(parts=[TextPart(f"found {returns[0].content}")])

    agent: Agent[None, str] = Agent(FunctionModel(script), name="matrix_injection")
    searched: list[str] = []

    @agent.tool_plain
    async def search(q: str) -> str:
        searched.append(q)
        return q.upper()

    durable = PrefectAgent(agent, tool_task_config=TaskConfig(retries=1))
    plan = FaultPlan().fail("search", on_call=1, exc=TimeoutError("injected"))
    key = _key()

    first = await durable.run("go", idempotency_key=key, capabilities=[FaultInjection(plan)])
    assert first.output == "found TEA"
    assert (plan.calls("model"), plan.calls("search"), searched) == (2, 2, ["tea"])  # failed, then retried

    again = await durable.run("go", idempotency_key=key, capabilities=[FaultInjection(plan)])
    assert again.output == "found TEA"
    assert (plan.calls("model"), plan.calls("search"), searched) == (2, 2, ["tea"])  # all replayed

    named = FaultPlan().fail("matrix_injection:model", on_call=1, exc=ConnectionError("injected"))
    with pytest.raises(ConnectionError, match="injected") as failure:
        await durable.run("go", capabilities=[FaultInjection(named, prefix="matrix_injection")])
    assert "in model step 'function:script:', after 1 attempt(s)" in error_text(failure.value)


# -- several processes: concurrent resume of a killed run, and a lock held by a killed process -----------------

SCRIPT = Path(__file__).parent / "scripts" / "matrix_resume.py"
FULL_OUTPUT = "done: order-42-fetched-saved"

_started: list[subprocess.Popen[str]] = []


@pytest.fixture(autouse=True)
def _no_leftover_processes() -> Iterator[None]:
    """A failed test must not leave its script processes running."""
    yield
    while _started:
        proc = _started.pop()
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


def _start(key: str, calls: Path, plan: FaultPlan, *extra: str) -> subprocess.Popen[str]:
    proc = subprocess.Popen(
        [sys.executable, str(SCRIPT), "--key", key, "--calls", str(calls), *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **plan.to_env()},
    )
    _started.append(proc)
    return proc


def _finish(proc: subprocess.Popen[str], timeout: float) -> str:
    """The run's output, once the process exits successfully within `timeout` seconds."""
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        stdout, stderr = proc.communicate()
        stderr = f"still running after {timeout}s, killed\n{stderr}"
    assert proc.returncode == 0, f"pid {proc.pid} exited with {proc.returncode}: {stderr[-3000:]}"
    line = next(line for line in stdout.splitlines() if line.startswith("OUTPUT "))
    return line.removeprefix("OUTPUT ")


def _kill_run(key: str, calls: Path, plan: FaultPlan, *extra: str) -> None:
    proc = _start(key, calls, plan, *extra)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL, stderr[-3000:]


def _executions(calls: Path) -> dict[str, int]:
    """How many times each step started, over all processes (`model#2` is the second model request)."""
    counts: dict[str, int] = {}
    for entry in CallLog(calls).entries():
        if entry.name in ("model", "tool:fetch", "tool:save"):
            step = f"model#{entry.args}" if entry.name == "model" else entry.name
            counts[step] = counts.get(step, 0) + 1
    return counts


def _wait_for(calls: Path, name: str, proc: subprocess.Popen[str], args: Any = None) -> None:
    """Wait (up to a minute) until `proc` logged a call of `name`, with `args` if given."""
    deadline = time.monotonic() + 60
    while not any(
        e.name == name and e.pid == proc.pid and (args is None or e.args == args)
        for e in CallLog(calls).entries()
    ):
        assert proc.poll() is None, (
            f"pid {proc.pid} exited with {proc.returncode}: {proc.communicate()[1][-3000:]}"
        )
        assert time.monotonic() < deadline, f"pid {proc.pid} never logged {name} {args}"
        time.sleep(0.05)


@pytest.mark.slow
def test_two_processes_resuming_one_killed_run_execute_each_step_once(tmp_path: Path) -> None:
    key, calls = _key(), tmp_path / "calls.jsonl"
    # Killed between steps: model 1 and fetch completed, model 2 not started.
    _kill_run(key, calls, FaultPlan(state_file=tmp_path / "plan.jsonl").kill("boundary", on_call=2))
    assert _executions(calls) == {"model#1": 1, "tool:fetch": 1}

    # Both resumers replay model 1 and fetch, then meet at a barrier just before model 2: they reach the first
    # unfinished step at the same moment, and each remaining step takes a second.
    extra = ("--step-seconds", "1", "--barrier", str(tmp_path / "barrier"), "--barrier-at", "2")
    resumers = [_start(key, calls, FaultPlan(), *extra) for _ in range(2)]
    outputs = [_finish(proc, timeout=120) for proc in resumers]

    assert outputs == [f'"{FULL_OUTPUT}"'] * 2
    assert _executions(calls) == {"model#1": 1, "tool:fetch": 1, "model#2": 1, "tool:save": 1, "model#3": 1}


@pytest.mark.slow
def test_a_lock_held_by_a_killed_process_does_not_block_the_resume(tmp_path: Path) -> None:
    key, calls = _key(), tmp_path / "calls.jsonl"
    # The first process hangs in `save` (it would SIGKILL itself after a minute); the test kills it sooner.
    plan = FaultPlan(state_file=tmp_path / "plan.jsonl").kill("tool:save", on_call=1, delay=60)
    holder = _start(key, calls, plan)
    _wait_for(calls, "tool:save", holder)

    resumer = _start(key, calls, plan)
    _wait_for(calls, "reach:save", resumer)  # replayed model 1, fetch and model 2: at the `save` step now
    time.sleep(3)  # ... where it waits, the step being locked by a live process (it would run `save` here)
    assert _executions(calls)["tool:save"] == 1
    holder.send_signal(signal.SIGKILL)
    assert holder.wait(timeout=10) == -signal.SIGKILL
    CallLog(calls).record("holder killed")

    output = _finish(resumer, timeout=90)

    assert output == f'"{FULL_OUTPUT}"'
    assert _executions(calls) == {"model#1": 1, "tool:fetch": 1, "model#2": 1, "tool:save": 2, "model#3": 1}
    order = [
        (e.name, e.pid)
        for e in CallLog(calls).entries()
        if e.name in ("tool:save", "holder killed") or (e.name == "reach:save" and e.pid == resumer.pid)
    ]
    assert order == [  # the resumer reached `save` while the holder lived, and ran it only once it was killed
        ("tool:save", holder.pid),
        ("reach:save", resumer.pid),
        ("holder killed", os.getpid()),
        ("tool:save", resumer.pid),
    ]
