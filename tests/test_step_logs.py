"""A failed attempt of a step is one log line; the traceback appears only where the error is final."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # starts processes

SCRIPT = Path(__file__).parent / "scripts" / "retried_tool_flow.py"


def run(failures: int) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(SCRIPT), str(failures)],
        capture_output=True,
        text=True,
        timeout=240,
        env={**os.environ, "PREFECT_LOGGING_LEVEL": "INFO"},
    )


def test_a_retried_then_successful_tool_logs_one_line_for_its_failed_attempt() -> None:
    proc = run(1)
    assert proc.returncode == 0, proc.stderr
    assert "Traceback" not in proc.stderr
    failed = [line for line in proc.stderr.splitlines() if "tool #2: flaky" in line and "failed" in line]
    assert len(failed) == 1 and failed[0].endswith(
        "ConnectionError('blip 1') - Retry 1/1 will start immediately"
    )


def test_a_step_whose_retries_are_exhausted_logs_no_traceback_of_its_own() -> None:
    proc = run(2)
    assert proc.returncode == 1
    lines = proc.stderr.splitlines()
    exhausted = [i for i, line in enumerate(lines) if "Retries are exhausted" in line]
    assert len(exhausted) == 1 and "tool #2: flaky" in lines[exhausted[0]]
    assert not lines[exhausted[0] + 1].startswith("Traceback")
    # What remains is the final error: the flow run's log of it and the script's own uncaught exception.
    assert proc.stderr.count("Traceback (most recent call last)") == 2
    assert "ConnectionError: blip 2" in lines
