"""Human approval without holding compute: a run whose model asks for a call that needs approval waits (its
process leaves), `approve` decides, and the run continues with every earlier step replayed."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
from prefect import flow, get_client
from prefect.exceptions import Pause
from pydantic_ai import Agent
from pydantic_ai.models.function import FunctionModel
from pydantic_ai.tools import DeferredToolRequests

from prefect_pydantic_ai import ApprovalTimeout, AwaitingApproval, PrefectAgent, approve_run, list_runs
from prefect_pydantic_ai.testing import CallLog
from tests.scripts import approval
from tests.warm import python

pytestmark = pytest.mark.anyio

SCRIPT = Path(__file__).parent / "scripts" / "approval.py"


def _run(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return python(*args, env=env)


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return _run("-m", "prefect_pydantic_ai", *args, env=env)


def _start(tmp_path: Path, **extra: str) -> tuple[str, dict[str, str], CallLog]:
    """Start the script's run; it must leave by itself, waiting. Returns its flow run id, env and call log."""
    calls = CallLog(tmp_path / "calls.jsonl")
    env = {"APPROVAL_CALLS": str(calls.path), **extra}
    key = f"refund-{uuid.uuid4().hex[:8]}"
    first = _run(str(SCRIPT), key, env=env)
    assert first.returncode == 0, first.stdout + first.stderr
    assert first.stdout.startswith("AWAITING "), first.stdout + first.stderr
    # waiting is the expected outcome: Prefect's "Finished in state Paused(...)" is logged at INFO, not ERROR
    assert "| ERROR" not in first.stderr, first.stderr
    return first.stdout.split()[1], env, calls


async def _state(run_id: str) -> str:
    async with get_client() as client:
        flow_run = await client.read_flow_run(uuid.UUID(run_id))
    assert flow_run.state is not None
    return flow_run.state.type.value


@pytest.mark.slow
async def test_approved_call_runs_once_and_earlier_steps_replay(tmp_path: Path) -> None:
    run_id, env, calls = _start(tmp_path)
    assert calls.counts() == {"model": 1}
    assert await _state(run_id) == "PAUSED"

    listed = json.loads(_cli("runs", "--json", "--agent", "refund_clerk", "--limit", "50", env=env).stdout)
    mine = next(r for r in listed if r["run_id"] == run_id)
    assert mine["state"] == "paused"
    assert mine["awaiting"] == ["refund(order_id=42)"]

    shown = _cli("show", run_id, env=env)
    assert "⏸ awaiting approval: refund(order_id=42)  call-refund" in shown.stdout, shown.stdout
    pending = json.loads(_cli("show", run_id, "--json", env=env).stdout)["awaiting"]
    assert pending == [
        {
            "call_id": "call-refund",
            "tool": "refund",
            "args": {"order_id": 42},
            "kind": "approval",
            "reason": None,
        }
    ]

    # Resumed before anyone decided, it asks again: an undecided wait is never taken as approved.
    resumed = _cli("resume", run_id, env=env)
    assert resumed.returncode == 0 and "Traceback" not in resumed.stderr, resumed.stdout + resumed.stderr
    assert f"Run {run_id} is awaiting approval: refund(order_id=42). Decide with" in resumed.stdout, (
        resumed.stdout
    )
    assert calls.counts() == {"model": 1}
    assert await _state(run_id) == "PAUSED"
    assert json.loads(_cli("show", run_id, "--json", env=env).stdout)["awaiting"] == pending

    approved = _cli("approve", run_id, env=env)
    assert approved.returncode == 0, approved.stdout + approved.stderr
    assert "completed: refund: refunded 42" in approved.stdout
    # the first model request replayed; the refund ran once, the final answer once
    assert calls.counts() == {"model": 2, "refund": 1}
    assert await _state(run_id) == "COMPLETED"
    # the first attempt stopped to wait: the call it waited on is `awaited`, not crashed
    shown = json.loads(_cli("show", run_id, "--json", env=env).stdout)
    assert [(s["kind"], s["status"]) for s in shown["earlier_attempts"][0]] == [
        ("model", "executed"),
        ("tool", "awaited"),
        ("model", "not_reached"),
    ]


@pytest.mark.slow
async def test_denied_call_reaches_the_model_and_never_runs(tmp_path: Path) -> None:
    run_id, env, calls = _start(tmp_path)
    denied = _cli("approve", run_id, "--deny", "--message", "Refunds are frozen today.", env=env)
    assert denied.returncode == 0, denied.stdout + denied.stderr
    assert "completed: refund: Refunds are frozen today." in denied.stdout
    assert calls.counts() == {"model": 2}
    assert await _state(run_id) == "COMPLETED"


@pytest.mark.slow
async def test_second_approval_in_one_run(tmp_path: Path) -> None:
    run_id, env, calls = _start(tmp_path, APPROVAL_TWO="1")
    first = _cli("approve", run_id, env=env)
    assert first.returncode == 0, first.stdout + first.stderr
    assert 'awaiting approval again: notify(customer="ada")' in first.stdout
    assert calls.counts() == {"model": 2, "refund": 1}
    assert await _state(run_id) == "PAUSED"
    second = _cli("approve", run_id, "--json", env=env)
    assert second.returncode == 0, second.stdout + second.stderr
    assert json.loads(second.stdout)["output"] == "refund: refunded 42 | notify: notified ada"
    # both earlier model requests and the refund replayed: each call happened exactly once
    assert calls.counts() == {"model": 3, "refund": 1, "notify": 1}


@pytest.mark.slow
async def test_approve_errors_are_one_line_and_change_nothing(tmp_path: Path) -> None:
    run_id, env, calls = _start(tmp_path)
    unknown = _cli("approve", run_id, "--deny", "call-nope", env=env)
    assert unknown.returncode == 2
    assert unknown.stderr.strip() == ("error: No pending call has id 'call-nope'; pending: call-refund.")
    assert await _state(run_id) == "PAUSED"
    assert calls.counts() == {"model": 1}
    assert _cli("approve", run_id, env=env).returncode == 0
    again = _cli("approve", run_id, env=env)
    assert again.returncode == 2
    assert (
        again.stderr.strip() == f"error: Run {run_id} is not waiting for approval (its state is Completed)."
    )


def _clerk_agent(name: str, calls: CallLog, **options: Any) -> PrefectAgent[None, str]:
    """The script's clerk under its own name, counting into `calls`, with `options` for PrefectAgent."""
    os.environ["APPROVAL_CALLS"] = str(calls.path)
    agent = Agent(FunctionModel(approval.clerk), name=name)
    agent.tool_plain(requires_approval=True)(approval.refund)
    return PrefectAgent(agent, **options)


@pytest.mark.slow
async def test_pause_mode_waits_in_process_until_approved(tmp_path: Path) -> None:
    calls = CallLog(tmp_path / "calls.jsonl")
    durable = _clerk_agent(f"clerk_pause_{uuid.uuid4().hex[:6]}", calls, approvals="pause")
    key = f"pause-{uuid.uuid4().hex[:8]}"
    waiting = asyncio.create_task(durable.run("Refund order 42", idempotency_key=key))
    while True:  # the run holds its process, paused at the wait
        listed = await list_runs(agent=durable.name)
        if listed and listed[0].state == "paused":
            break
        await asyncio.sleep(0.5)
    decision = await approve_run(key)
    assert not decision.continued  # the waiting process takes it from here
    result = await waiting
    assert result.output == "refund: refunded 42"
    assert calls.counts() == {"model": 2, "refund": 1}


@pytest.mark.slow
async def test_a_pause_mode_run_whose_waiting_process_was_killed_is_continued_by_approve(
    tmp_path: Path,
) -> None:
    calls = CallLog(tmp_path / "calls.jsonl")
    env = {**os.environ, "APPROVAL_CALLS": str(calls.path), "APPROVAL_PAUSE": "1"}
    key = f"refund-pause-{uuid.uuid4().hex[:8]}"
    script = subprocess.Popen([sys.executable, str(SCRIPT), key], env=env, stdout=subprocess.DEVNULL)
    try:
        for _ in range(240):  # the run holds its process, paused at the wait
            listed = [r for r in await list_runs(agent="refund_clerk", limit=50) if r.name == key]
            if listed and listed[0].state == "paused":
                break
            assert script.poll() is None
            await asyncio.sleep(0.5)
        else:
            pytest.fail("the run never reached its wait")
    finally:
        script.kill()  # SIGKILL: as a reboot or the OOM killer would
        script.wait()

    # Nobody would pick the decision up: approve continues the run here, as for a run whose process left.
    approved = _cli("approve", key, env=env)
    assert approved.returncode == 0, approved.stdout + approved.stderr
    assert "completed: refund: refunded 42" in approved.stdout, approved.stdout
    assert calls.counts() == {"model": 2, "refund": 1}  # the first request replayed, the refund ran once
    assert await _state(listed[0].run_id) == "COMPLETED"


@pytest.mark.slow
async def test_pause_mode_fails_the_run_when_nobody_decides(tmp_path: Path) -> None:
    calls = CallLog(tmp_path / "calls.jsonl")
    durable = _clerk_agent(
        f"clerk_timeout_{uuid.uuid4().hex[:6]}", calls, approvals="pause", approval_timeout_seconds=3
    )
    with pytest.raises(ApprovalTimeout, match=r"waited 3 s for approval of refund\(order_id=42\)"):
        await durable.run("Refund order 42")
    (run,) = await list_runs(agent=durable.name)
    assert run.state == "failed"
    assert calls.counts() == {"model": 1}


_flow_calls: dict[str, CallLog] = {}


@flow
async def refunds_desk(name: str) -> str:
    """A user's flow holding the clerk: the wait suspends this flow run, the approval continues it."""
    durable = _clerk_agent(name, _flow_calls[name])
    result = await durable.run("Refund order 42")
    return f"desk: {result.output}"


async def test_user_flow_holding_the_agent_waits_and_continues(tmp_path: Path) -> None:
    name = f"clerk_desk_{uuid.uuid4().hex[:6]}"
    calls = _flow_calls[name] = CallLog(tmp_path / "calls.jsonl")
    with pytest.raises(Pause):
        await refunds_desk(name)
    (run,) = await list_runs(agent=name)
    assert run.state == "paused" and run.awaiting == ["refund(order_id=42)"]
    decision = await approve_run(run.run_id)
    assert decision.continued and decision.output == "desk: refund: refunded 42"
    assert calls.counts() == {"model": 2, "refund": 1}
    assert await _state(run.run_id) == "COMPLETED"


async def test_output_type_with_deferred_requests_keeps_pydantic_ais_behaviour(tmp_path: Path) -> None:
    calls = CallLog(tmp_path / "calls.jsonl")
    os.environ["APPROVAL_CALLS"] = str(calls.path)
    agent = Agent(
        FunctionModel(approval.clerk),
        name=f"clerk_own_{uuid.uuid4().hex[:6]}",
        output_type=[str, DeferredToolRequests],
    )
    agent.tool_plain(requires_approval=True)(approval.refund)
    result = await PrefectAgent(agent).run("Refund order 42")
    assert isinstance(result.output, DeferredToolRequests)
    assert [c.tool_name for c in result.output.approvals] == ["refund"]
    (run,) = await list_runs(agent=agent.name)
    assert run.state == "completed" and run.awaiting == []
    assert calls.counts() == {"model": 1}


async def test_tool_asking_for_approval_itself_runs_its_effect_once_when_approved(tmp_path: Path) -> None:
    calls = CallLog(tmp_path / "calls.jsonl")
    os.environ["APPROVAL_CALLS"] = str(calls.path)
    with pytest.raises(AwaitingApproval) as waiting:
        await approval.wire_desk.run("Wire 5000", idempotency_key=f"wire-{uuid.uuid4().hex[:8]}")
    (call,) = waiting.value.calls
    assert (call.describe(), call.reason) == ("wire(amount=5000)", "5000 is above the 1000 limit")
    decision = await approve_run(waiting.value.flow_run_id)
    assert decision.output == "wire: wired 5000"
    assert calls.counts() == {"model": 2, "wire": 1}


@pytest.mark.slow
async def test_the_console_script_approves_the_example_from_the_clone_only_once_its_code_imports(
    tmp_path: Path,
) -> None:
    """The installed `prefect-pydantic-ai` (not `python -m`) imports the recorded `examples.approve_refund` from
    the directory it runs in, as `python -m` would; where the code cannot be imported, nothing is recorded."""
    root = Path(__file__).resolve().parents[1]
    started = subprocess.run(
        [sys.executable, "-m", "examples.approve_refund", "42"],
        cwd=root,
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert started.returncode == 0, started.stdout + started.stderr
    run_id = started.stdout.split()[1]
    assert started.stdout.startswith(f"Run {run_id} is awaiting approval"), started.stdout
    console = str(Path(sys.executable).parent / "prefect-pydantic-ai")

    elsewhere = subprocess.run(
        [console, "approve", run_id], cwd=tmp_path, capture_output=True, text=True, timeout=240
    )
    assert elsewhere.returncode == 2 and len(elsewhere.stderr.strip().splitlines()) == 1, elsewhere.stderr
    assert "Cannot load the recorded entrypoint 'examples.approve_refund:refund_desk'" in elsewhere.stderr
    assert await _state(run_id) == "PAUSED"  # no decision was stored: the next approve is not refused

    approved = subprocess.run(
        [console, "approve", run_id], cwd=root, capture_output=True, text=True, timeout=240
    )
    assert approved.returncode == 0, approved.stdout + approved.stderr
    assert await _state(run_id) == "COMPLETED"


@pytest.mark.slow
async def test_giving_the_same_decision_twice_is_harmless_and_a_different_one_is_refused(
    tmp_path: Path,
) -> None:
    from prefect_pydantic_ai.durable.wait import decision_values, give_decision
    from prefect_pydantic_ai.errors import RunError
    from prefect_pydantic_ai.store.prefect_rest import prefect_api
    from prefect_pydantic_ai.store.waits import waiting_for

    run_id, env, calls = _start(tmp_path)
    async with prefect_api() as api:
        flow_run = await api.flow_run(uuid.UUID(run_id))
        assert flow_run is not None
        waiting = await waiting_for(api, flow_run)
    assert waiting is not None
    approve = decision_values(waiting.calls, deny=None, message=None, results=None)
    await give_decision(flow_run, waiting, approve)
    await give_decision(flow_run, waiting, approve)  # as a repeated `approve` whose continuation had failed
    deny = decision_values(waiting.calls, deny=set(), message="no", results=None)
    with pytest.raises(RunError, match=f"Run {run_id} already has a different decision for this wait"):
        await give_decision(flow_run, waiting, deny)
    assert _cli("approve", run_id, env=env).returncode == 0  # continues with the decision given first
    assert await _state(run_id) == "COMPLETED"
    assert calls.counts() == {"model": 2, "refund": 1}
