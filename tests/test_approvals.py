"""Human approval without holding compute: a run whose model asks for a call that needs approval waits (its
process leaves), `approve` decides, and the run continues with every earlier step replayed."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
from prefect import get_client

from prefect_pydantic_ai.testing import CallLog

pytestmark = pytest.mark.anyio

SCRIPT = Path(__file__).parent / "scripts" / "approval.py"


def _run(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, timeout=240, env={**os.environ, **env}
    )


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
    return first.stdout.split()[1], env, calls


async def _state(run_id: str) -> str:
    async with get_client() as client:
        flow_run = await client.read_flow_run(uuid.UUID(run_id))
    assert flow_run.state is not None
    return flow_run.state.type.value


async def test_approved_call_runs_once_and_earlier_steps_replay(tmp_path: Path) -> None:
    run_id, env, calls = _start(tmp_path)
    assert calls.counts() == {"model": 1}
    assert await _state(run_id) == "PAUSED"

    listed = json.loads(_cli("runs", "--json", "--agent", "refund_clerk", "--limit", "50", env=env).stdout)
    mine = next(r for r in listed if r["run_id"] == run_id)
    assert mine["state"] == "paused"
    assert mine["awaiting"] == ["refund(order_id=42)"]

    approved = _cli("approve", run_id, env=env)
    assert approved.returncode == 0, approved.stdout + approved.stderr
    assert "completed: refund: refunded 42" in approved.stdout
    # the first model request replayed; the refund ran once, the final answer once
    assert calls.counts() == {"model": 2, "refund": 1}
    assert await _state(run_id) == "COMPLETED"


async def test_denied_call_reaches_the_model_and_never_runs(tmp_path: Path) -> None:
    run_id, env, calls = _start(tmp_path)
    denied = _cli("approve", run_id, "--deny", "--message", "Refunds are frozen today.", env=env)
    assert denied.returncode == 0, denied.stdout + denied.stderr
    assert "completed: refund: Refunds are frozen today." in denied.stdout
    assert calls.counts() == {"model": 2}
    assert await _state(run_id) == "COMPLETED"


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
