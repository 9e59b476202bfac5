"""Provider limits: model requests hold slots of a Prefect global concurrency limit only while they execute.

The provider is a `LoopbackOpenAI` server answering after a delay, which records the most requests it was
answering at once (`max_in_flight`); the limits are real global concurrency limits of this session's server.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from prefect import get_client
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate, GlobalConcurrencyLimitUpdate
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, FlowRunFilterTags
from pydantic_ai import Agent
from pydantic_ai.messages import ModelMessage, ModelResponse, TextPart, ToolCallPart, ToolReturnPart
from pydantic_ai.models.function import AgentInfo, FunctionModel

from prefect_pydantic_ai import ConcurrencyLimit, MissingLimitError, PrefectAgent, TaskConfig
from prefect_pydantic_ai.testing import LoopbackOpenAI
from tests.scripts.limited_runs import answer

pytestmark = pytest.mark.anyio


def _limited(server: LoopbackOpenAI, limit: ConcurrencyLimit | str) -> PrefectAgent[None, str]:
    """model → `stamp` → model, each model request holding a slot of `limit`."""
    agent: Agent[None, str] = Agent(server.openai_model("gpt-4o"), name=f"limited_{uuid.uuid4().hex[:6]}")

    @agent.tool_plain
    def stamp(n: int) -> int:
        return n + 1

    return PrefectAgent(agent, model_task_config=TaskConfig(concurrency_limit=limit))


async def _active_slots(name: str) -> int:
    async with get_client() as client:
        return (await client.read_global_concurrency_limit_by_name(name)).active_slots


async def test_runs_sharing_a_limit_never_send_more_requests_at_once_and_replays_take_no_slot() -> None:
    name = f"llm-{uuid.uuid4().hex[:8]}"
    with LoopbackOpenAI(responder=answer(0.15)) as server:
        durable = _limited(server, ConcurrencyLimit(name=name, create_slots=2))
        keys = [f"{name}-{i}" for i in range(6)]
        results = await asyncio.gather(*(durable.run("stamp it", idempotency_key=k) for k in keys))
        assert [r.output for r in results] == ["stamped"] * 6
        assert server.request_count == 12 and server.max_in_flight == 2
        assert await _active_slots(name) == 0

        async with get_client() as client:  # a replayed step asking for a slot would now wait forever
            await client.update_global_concurrency_limit(name, GlobalConcurrencyLimitUpdate(limit=0))
        again = await asyncio.wait_for(durable.run("stamp it", idempotency_key=keys[0]), 60)
        assert again.output == "stamped" and server.request_count == 12


async def test_a_missing_limit_fails_the_run_in_one_line_naming_the_command_before_any_request() -> None:
    name = f"nowhere-{uuid.uuid4().hex[:8]}"
    with LoopbackOpenAI(responder=answer(0)) as server:
        with pytest.raises(MissingLimitError) as caught:
            await _limited(server, name).run("stamp it")
        assert server.request_count == 0
    assert str(caught.value) == (
        f"Prefect global concurrency limit {name!r} does not exist: create it with "
        f"`prefect gcl create {name} --limit <max requests in flight>`, "
        "or pass ConcurrencyLimit(create_slots=N) to create it on first use."
    )


async def test_a_rate_limit_spaces_the_starts_of_requests() -> None:
    name = f"rate-{uuid.uuid4().hex[:8]}"
    async with get_client() as client:
        await client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=10))
    limit = ConcurrencyLimit(name=name, requests_per_second=4, create_slots=10)
    with LoopbackOpenAI(responder=answer(0)) as server:
        durable = _limited(server, limit)
        await asyncio.gather(*(durable.run("stamp it") for _ in range(4)))  # 8 requests, 4 slots a second
        starts = sorted(exchange.received_at for exchange in server.exchanges)
    assert len(starts) == 8
    assert starts[-1] - starts[0] >= 0.9  # the 5th start waits for a decayed slot: >= 1 s after the 1st
    async with get_client() as client:
        rate: Any = await client.read_global_concurrency_limit_by_name(f"{name}:rate")
    assert (rate.limit, rate.slot_decay_per_second) == (4, 4.0)


LIMITED_RUNS = Path(__file__).parent / "scripts" / "limited_runs.py"


def _worker(server: LoopbackOpenAI, limit: str, prefix: str, n: int) -> subprocess.Popen[str]:
    """A worker process running `n` runs of `limited_runs.py` at once against `server`, under `limit`."""
    return subprocess.Popen(
        [sys.executable, str(LIMITED_RUNS), prefix, str(n)],
        env={**os.environ, "LIMITED_BASE_URL": server.base_url, "LIMITED_LIMIT": limit},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


async def _create(name: str, slots: int) -> None:
    async with get_client() as client:
        await client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=slots))


@pytest.mark.slow
async def test_twenty_runs_on_two_worker_processes_share_a_limit_of_three() -> None:
    name = f"provider-{uuid.uuid4().hex[:8]}"
    await _create(name, 3)
    with LoopbackOpenAI(responder=answer(0.5)) as server:
        workers = [_worker(server, name, f"{name}-w{w}", 10) for w in range(2)]
        try:
            outputs = [worker.communicate(timeout=180) for worker in workers]
        finally:
            for worker in workers:
                worker.kill()
                worker.wait()
        assert [w.returncode for w in workers] == [0, 0], [err[-2000:] for _, err in outputs]
        assert [json.loads(out) for out, _ in outputs] == [["stamped"] * 10] * 2
        assert 2 <= server.max_in_flight <= 3  # requests overlapped, never more than the limit
        assert server.request_count == 40  # each step once: no repeats
    async with get_client() as client:
        runs = await client.read_flow_runs(
            flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=["agent:limited_runs"]))
        )
    mine = [r for r in runs if any(t.startswith(f"key:{name}-") for t in r.tags)]
    assert len(mine) == 20 and all(r.state is not None and r.state.is_completed() for r in mine)
    steps = await _step_names(client_runs=mine)
    assert all(sorted(s) == ["model", "model", "tool"] for s in steps.values())
    assert await _active_slots(name) == 0


async def _step_names(client_runs: list[Any]) -> dict[str, list[str]]:
    """Per flow run, the kinds of its completed step task runs (`model`, `tool`)."""
    async with get_client() as client:
        task_runs = await client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[r.id for r in client_runs]))
        )
    kinds: dict[str, list[str]] = {str(r.id): [] for r in client_runs}
    for task_run in task_runs:
        if task_run.state is not None and task_run.state.is_completed():
            kinds[str(task_run.flow_run_id)].append(task_run.name.split(" ", 1)[0])
    return kinds


@pytest.mark.slow
async def test_the_slot_of_a_killed_run_is_free_again_within_its_lease() -> None:
    name = f"leased-{uuid.uuid4().hex[:8]}"
    await _create(name, 1)
    with LoopbackOpenAI(responder=answer(600)) as server:  # the request hangs: its slot is held
        worker = _worker(server, name, name, 1)
        try:
            deadline = time.monotonic() + 60
            while server.request_count == 0:
                assert worker.poll() is None and time.monotonic() < deadline, worker.communicate()[1][-2000:]
                await asyncio.sleep(0.05)
            assert await _active_slots(name) == 1
            worker.send_signal(signal.SIGKILL)
            worker.wait()
            killed = time.monotonic()
        finally:
            worker.kill()
            worker.communicate()
    lease = ConcurrencyLimit(name=name).lease_seconds
    while await _active_slots(name) == 1:  # Prefect's repossessor frees it once the lease expires
        assert time.monotonic() - killed < lease + 15, "the slot outlived its lease"
        await asyncio.sleep(0.5)
    assert time.monotonic() - killed >= lease - 5  # it was the lease, not the process, that let go


async def test_max_parallel_tools_bounds_the_tool_calls_and_delegations_of_one_response() -> None:
    """One response asks for three `wait` calls and three delegations to a durable sub-agent: with
    `max_parallel_tools=2`, never more than two of them (a delegation counts while its sub-agent's model works)."""
    busy = [0, 0]  # now, most at once

    async def working() -> None:
        busy[0] += 1
        busy[1] = max(busy)
        await asyncio.sleep(0.1)
        busy[0] -= 1

    async def research(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        await working()
        return ModelResponse(parts=[TextPart("found")])

    suffix = uuid.uuid4().hex[:6]
    researcher = PrefectAgent(Agent(FunctionModel(research), name=f"researcher_{suffix}"))

    def coordinate(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        if any(isinstance(p, ToolReturnPart) for m in messages for p in m.parts):
            return ModelResponse(parts=[TextPart("all done")])
        calls = [ToolCallPart("wait", {"n": n}) for n in range(3)]
        return ModelResponse(parts=[*calls, *(ToolCallPart("delegate", {"topic": t}) for t in "abc")])

    coordinator: Agent[None, str] = Agent(FunctionModel(coordinate), name=f"coordinator_{suffix}")

    @coordinator.tool_plain
    async def wait(n: int) -> int:
        await working()
        return n

    @coordinator.tool_plain
    async def delegate(topic: str) -> str:
        return (await researcher.run(f"research {topic}")).output

    result = await PrefectAgent(coordinator, max_parallel_tools=2).run("go")
    assert result.output == "all done" and busy == [0, 2]
