"""Durable sub-agents: an agent run inside another agent's tool keeps its own journal across SIGKILLs.

The script (tests/scripts/delegation.py) counts every model and tool call at every level in a `CallLog`, and
SIGKILLs itself at a planned call; a rerun with the same idempotency key must execute only what had not
completed: the coordinator's tool step runs again, and the sub-agent inside it replays its completed steps.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

from prefect_pydantic_ai.testing import CallLog, FaultPlan

SCRIPT = Path(__file__).parent / "scripts" / "delegation.py"
ONE = [
    "coordinator:model",
    "coordinator:delegate",
    "researcher:model",
    "researcher:lookup",
    "researcher:model",
    "coordinator:returned",
    "coordinator:model",
]


def _run(plan: FaultPlan, key: str, shape: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), key, shape],
        capture_output=True,
        text=True,
        timeout=180,
        env={**os.environ, **plan.to_env()},
    )


def _output(proc: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(line for line in proc.stdout.splitlines() if line.startswith("OUTPUT "))
    return dict(json.loads(line.removeprefix("OUTPUT ")))


def _kill_then_rerun(
    tmp_path: Path, shape: str, name: str, on_call: int
) -> tuple[list[str], list[str], dict[str, Any]]:
    """SIGKILL the script at call `on_call` of `name`, rerun it with the same key: (calls before, calls after,
    the rerun's output)."""
    calls = tmp_path / "calls.jsonl"
    key = f"sub-{uuid.uuid4().hex[:8]}"
    killed = _run(FaultPlan(state_file=calls).kill(name, on_call=on_call), key, shape)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    first = [entry.name for entry in CallLog(calls).entries()]
    out = _output(_run(FaultPlan(state_file=calls), key, shape))
    return first, [entry.name for entry in CallLog(calls).entries()][len(first) :], out


def test_killed_inside_the_sub_agents_tool_replays_the_sub_agents_completed_model_call(
    tmp_path: Path,
) -> None:
    first, second, out = _kill_then_rerun(tmp_path, "one", "researcher:lookup", 1)
    assert first == ONE[:4]
    # The coordinator's tool step runs again; inside it the researcher replays its first model call.
    assert second == ["coordinator:delegate", "researcher:lookup", "researcher:model", *ONE[-2:]]
    assert out["output"] == "findings on a: fact a"
