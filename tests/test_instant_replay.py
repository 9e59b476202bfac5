"""Instant replay: a journaled step is answered from the journal without running a Prefect task, and Prefect still
shows it (a "Cached" task run recorded by one state event), as do `show`, the ledger and progress observers."""

from __future__ import annotations

import asyncio
import logging
import uuid
from pathlib import Path
from typing import Any

import pytest
from prefect import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, FlowRunFilterTags
from prefect.client.schemas.objects import TaskRun
from pydantic_ai import Agent
from pydantic_ai.messages import ModelMessage, ModelResponse, TextPart, ToolCallPart, ToolReturnPart
from pydantic_ai.models import ModelRequestParameters
from pydantic_ai.models.function import AgentInfo, FunctionModel

from prefect_pydantic_ai import PrefectAgent, ledger_of, show_run
from prefect_pydantic_ai.durable.journal import messages_fingerprint
from prefect_pydantic_ai.durable.steps import StepEvent, observe_steps

pytestmark = pytest.mark.anyio


class _PreparingModel(FunctionModel):
    """A FunctionModel that notes each preparation of the history ("prepare"): a model sending a request does it."""

    def __init__(self, function: Any, calls: list[str]) -> None:
        super().__init__(function)
        self._calls = calls

    def prepare_messages(
        self, messages: list[ModelMessage], model_request_parameters: ModelRequestParameters | None = None
    ) -> list[ModelMessage]:
        self._calls.append("prepare")
        return super().prepare_messages(messages, model_request_parameters)


def _agent(
    calls: list[str], name: str, fail_second_lookup: list[bool] | None = None
) -> PrefectAgent[None, str]:
    return PrefectAgent(_plain_agent(calls, name, fail_second_lookup))


def _plain_agent(
    calls: list[str], name: str, fail_second_lookup: list[bool] | None = None
) -> Agent[None, str]:
    """model → lookup → model → lookup → model; the second lookup fails while `fail_second_lookup[0]` is true."""

    def model(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        calls.append("model")
        done = [p for m in messages for p in m.parts if isinstance(p, ToolReturnPart)]
        if len(done) < 2:
            return ModelResponse(parts=[ToolCallPart("lookup", {"n": len(done)})])
        return ModelResponse(parts=[TextPart(f"found {done[0].content} and {done[1].content}")])

    agent: Agent[None, str] = Agent(_PreparingModel(model, calls), name=name)

    @agent.tool_plain
    def lookup(n: int) -> int:
        calls.append("lookup")
        if n == 1 and fail_second_lookup and fail_second_lookup[0]:
            fail_second_lookup[0] = False
            raise ConnectionError("lookup service unreachable")
        return n * 10

    return agent


async def _task_runs(key: str, expected: int) -> dict[uuid.UUID, list[TaskRun]]:
    """The step task runs of every flow run of `key`, once Prefect has recorded `expected` of them in all
    (task runs reach the server as events sent in the background)."""
    async with get_client() as client:
        for _ in range(200):
            flow_runs = await client.read_flow_runs(
                flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[f"key:{key}"]))
            )
            runs = await client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[f.id for f in flow_runs]))
            )
            if len(runs) >= expected and all(r.state_type is not None for r in runs):
                grouped: dict[uuid.UUID, list[TaskRun]] = {f.id: [] for f in flow_runs}
                for run in runs:
                    grouped[run.flow_run_id].append(run)  # type: ignore[index]
                return grouped
            await asyncio.sleep(0.05)
    raise AssertionError(f"Prefect recorded {len(runs)} task runs of {key}, expected {expected}")


async def test_replayed_steps_start_no_task_and_are_still_shown() -> None:
    calls: list[str] = []
    durable = _agent(calls, f"instant_{uuid.uuid4().hex[:6]}", fail_second_lookup=[True])
    key = f"instant-{uuid.uuid4().hex[:6]}"
    with pytest.raises(ConnectionError):
        await durable.run("go", idempotency_key=key)
    assert calls == ["prepare", "model", "lookup", "prepare", "model", "lookup"]

    calls.clear()
    events: list[StepEvent] = []
    stop = observe_steps(events.append)
    try:
        resumed = await durable.run("go", idempotency_key=key)
    finally:
        stop()
    assert resumed.output == "found 0 and 10"
    # the first three steps are not re-requested, and the replayed model steps do not prepare the history
    assert calls == ["lookup", "prepare", "model"]
    assert [(e.kind, e.replayed, e.attempts) for e in events] == [
        ("model", True, 0),
        ("tool", True, 0),
        ("model", True, 0),
        ("tool", False, 1),
        ("model", False, 1),
    ]
    ledger = ledger_of(resumed)
    assert ledger is not None and (ledger.saved.model_calls, ledger.saved.tool_calls) == (2, 1)

    by_flow_run = await _task_runs(key, 9)
    assert sorted(len(runs) for runs in by_flow_run.values()) == [4, 5]
    second = next(runs for runs in by_flow_run.values() if len(runs) == 5)
    replayed = [run for run in second if run.state_name == "Cached"]
    assert len(replayed) == 3
    async with get_client() as client:
        for run in replayed:
            states = await client.read_task_run_states(run.id)
            # the task engine never ran: no Running state, no run counted
            assert [s.name for s in states] == ["Cached"] and run.run_count == 0
    detail = await show_run(key)
    assert [(s.kind, s.status) for s in detail.steps] == [
        ("model", "replayed"),
        ("tool", "replayed"),
        ("model", "replayed"),
        ("tool", "executed"),
        ("model", "executed"),
    ]

    calls.clear()
    assert (await durable.run("go", idempotency_key=key)).output == "found 0 and 10"
    assert calls == []  # a completed logical run executes nothing


async def test_a_corrupt_entry_on_the_fast_path_re_executes(
    storage_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    calls: list[str] = []
    durable = _agent(calls, f"instant_corrupt_{uuid.uuid4().hex[:6]}")
    key = f"instant-corrupt-{uuid.uuid4().hex[:6]}"
    storage_dir.mkdir(parents=True, exist_ok=True)
    before = set(storage_dir.iterdir())
    await durable.run("go", idempotency_key=key)
    written = sorted(
        (p for p in storage_dir.iterdir() if p.is_file() and p not in before),
        key=lambda p: p.stat().st_mtime_ns,
    )
    assert len(written) == 5
    tampered = written[1].read_text().replace('sha256\\": \\"', 'sha256\\": \\"0')
    assert tampered != written[1].read_text()
    written[1].write_text(tampered)  # the first lookup: checksum mismatch
    written[2].write_text("{ not json")  # the second model request: unreadable

    calls.clear()
    with caplog.at_level(logging.WARNING, logger="prefect_pydantic_ai"):
        result = await durable.run("go", idempotency_key=key)
    assert result.output == "found 0 and 10"
    assert calls == ["lookup", "prepare", "model"]  # the re-executed model request is prepared as usual
    assert sum("corrupt" in r.getMessage() for r in caplog.records) == 2

    calls.clear()
    assert (await durable.run("go", idempotency_key=key)).output == "found 0 and 10"
    assert calls == []  # the re-executed steps overwrote the bad entries


@pytest.mark.slow
async def test_concurrent_resumes_of_one_agent_each_replay_their_own_steps() -> None:
    """Runs of one agent in one process share its step tasks; what one reads ahead never answers another."""
    calls: list[str] = []
    durable = _agent(calls, f"instant_many_{uuid.uuid4().hex[:6]}", fail_second_lookup=[True])
    keys = [f"instant-many-{i}-{uuid.uuid4().hex[:6]}" for i in range(3)]
    with pytest.raises(ConnectionError):
        await durable.run("go", idempotency_key=keys[0])
    for key in keys[1:]:  # the other two get through: only the first run's second lookup fails
        await durable.run("go", idempotency_key=key)

    calls.clear()
    results = await asyncio.gather(*(durable.run("go", idempotency_key=key) for key in keys))
    assert [r.output for r in results] == ["found 0 and 10"] * 3
    # only the first run had anything left to do: its second lookup and last model request
    assert sorted(calls) == sorted(["lookup", "prepare", "model"])


async def test_one_conversation_run_twice_has_one_fingerprint_per_message() -> None:
    """Whatever a pydantic-ai release adds to its messages that differs between two runs of one conversation
    (pydantic-ai 2.78 added `request_timestamp` and `duration`) must stay out of step keys: otherwise every step
    after a re-executed one runs again."""
    calls: list[str] = []
    agent = _plain_agent(calls, f"fingerprint_{uuid.uuid4().hex[:6]}")
    first = (await agent.run("go")).all_messages()
    second = (await agent.run("go")).all_messages()
    assert calls.count("model") == 6 and len(first) == len(second) == 6
    assert [messages_fingerprint([m]) for m in first] == [messages_fingerprint([m]) for m in second]
