"""SIGKILL a real process at every step boundary and inside a tool; a rerun with the same key finishes the job.

The script (tests/scripts/five_step.py) logs each model/tool call to a file before doing it, so the log counts
calls across both processes: a completed step must appear exactly once overall.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

SCRIPT = Path(__file__).parent / "scripts" / "five_step.py"
SHAPE = ["model", "tool:calculate_statistics", "model", "tool:detect_anomalies", "model"]


def _run(log: Path, key: str, *kill: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "FIVE_STEP_LOG": str(log)}
    if kill:
        env[kill[0]] = kill[1]
    return subprocess.run(
        [sys.executable, str(SCRIPT), key], capture_output=True, text=True, timeout=180, env=env
    )


def _output(proc: subprocess.CompletedProcess[str]) -> dict[str, object]:
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(line for line in proc.stdout.splitlines() if line.startswith("OUTPUT "))
    return dict(json.loads(line.removeprefix("OUTPUT ")))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory) -> dict[str, object]:
    log = tmp_path_factory.mktemp("ref") / "calls.log"
    out = _output(_run(log, f"ref-{uuid.uuid4().hex[:8]}"))
    assert [line.split(" ", 1)[1] for line in log.read_text().splitlines()] == SHAPE
    return out


@pytest.mark.parametrize(
    ("flag", "call", "completed_before_kill"),
    [
        ("FIVE_STEP_KILL_BEFORE", 2, 1),  # after the first model call
        ("FIVE_STEP_KILL_BEFORE", 3, 2),  # after the first tool
        ("FIVE_STEP_KILL_BEFORE", 4, 3),  # after the second model call
        ("FIVE_STEP_KILL_BEFORE", 5, 4),  # after the second tool
        ("FIVE_STEP_KILL_IN_TOOL", 4, 3),  # in the middle of detect_anomalies
    ],
)
def test_sigkill_then_rerun_with_the_same_key_completes_without_repeating_completed_steps(
    tmp_path: Path, uninterrupted: dict[str, object], flag: str, call: int, completed_before_kill: int
) -> None:
    log = tmp_path / "calls.log"
    key = f"kill-{uuid.uuid4().hex[:8]}"
    killed = _run(log, key, flag, str(call))
    assert killed.returncode == -signal.SIGKILL
    first = [line.split(" ", 1)[1] for line in log.read_text().splitlines()]
    assert first == SHAPE[: completed_before_kill + (1 if flag == "FIVE_STEP_KILL_IN_TOOL" else 0)]

    resumed = _output(_run(log, key))
    assert resumed == uninterrupted
    second = [line.split(" ", 1)[1] for line in log.read_text().splitlines()][len(first) :]
    # The resumed process starts at the first step that did not complete; nothing before it runs again.
    assert second == SHAPE[completed_before_kill:]
