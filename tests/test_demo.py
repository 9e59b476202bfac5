"""`prefect-pydantic-ai demo` end to end, in a subprocess, on the session's Prefect server (the `show` that reads
back its run runs in this process)."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.commands import cli
from tests.warm import python

pytestmark = pytest.mark.slow  # starts processes

SEED_SHAPE = ["model", "tool", "model", "tool", "model"]


def demo(*args: str) -> subprocess.CompletedProcess[str]:
    return python("-m", "prefect_pydantic_ai", "demo", *args, env={"COLUMNS": "160"}, timeout=300)


def shown(proc: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    """The `show --json` document of the run a demo printed (`See it again: prefect-pydantic-ai show KEY`)."""
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    key = re.search(r"prefect-pydantic-ai show (demo-[0-9a-f]+)", proc.stdout)
    assert key, proc.stdout[-2000:]
    out = cli("show", key.group(1), "--json")
    assert out.returncode == 0, out.stderr
    return dict(json.loads(out.stdout))


@pytest.fixture(scope="module")
def uninterrupted() -> dict[str, Any]:
    run = shown(demo("--no-failure"))
    assert [s["status"] for s in run["steps"]] == ["executed"] * 5 and run["earlier_attempts"] == []
    return run


def _planted_outliers_found(output: dict[str, Any]) -> None:
    values = sorted(a["value"] for a in output["anomalies"])
    assert values == [1000.0, 2000.0]


@pytest.mark.parametrize("variant", [[], ["--kill"]], ids=["timeout", "kill"])
def test_demo_fails_at_detect_anomalies_then_replays_steps_1_to_3(
    variant: list[str], uninterrupted: dict[str, Any]
) -> None:
    proc = demo(*variant)
    run = shown(proc)
    assert "Initial run" in proc.stdout and "Retry attempt" in proc.stdout and "⊘" in proc.stdout
    assert "not an LLM" in proc.stdout  # the scripted model says what it is
    assert "Replay saved 2 model call(s), 1 tool call(s)" in proc.stdout
    # Attempt 1's spend too (a killed attempt's as recorded), in dollars at a named reference price.
    assert "priced as gpt-4o for illustration" in " ".join(proc.stdout.split())
    rows = {line.split("│")[1].strip(): line for line in proc.stdout.splitlines() if line.count("│") >= 5}
    for label in ("Attempt 1 spent", "Attempt 2 spent", "Replay saved"):
        assert "$" in rows[label] and "unknown" not in rows[label], proc.stdout
    assert [cell.strip() for cell in rows["Attempt 1 spent"].split("│")[2:3]] == ["2"]
    assert [cell.strip() for cell in rows["Replay saved"].split("│")[2:4]] == ["2", "1"]
    assert "row 10: sales = 1000.0" in proc.stdout and "row 65: sales = 2000.0" in proc.stdout

    first, latest = run["earlier_attempts"][0], run["steps"]
    assert [s["kind"] for s in latest] == SEED_SHAPE
    # A timeout beyond the retries failed the step; a SIGKILL interrupted it: its process died in it.
    assert [s["status"] for s in first] == ["executed"] * 3 + [
        "crashed" if variant else "failed",
        "not_reached",
    ]
    assert [s["status"] for s in latest] == ["replayed"] * 3 + ["executed"] * 2
    if not variant:
        assert first[3]["attempts"] == 3  # the timeout outlasted the step's 2 retries
    # Steps 1-3 executed exactly once overall: in attempt 1, then only replayed.
    assert run["model_calls"] == {"executed": 1, "replayed": 2}
    assert run["tool_calls"] == {"executed": 1, "replayed": 1}
    assert run["output"] == uninterrupted["output"]
    _planted_outliers_found(run["output"])


def test_demo_can_fail_at_a_model_step(uninterrupted: dict[str, Any]) -> None:
    proc = demo("--fail-at", "interpret")
    run = shown(proc)
    model = "offline-analyst (scripted)"
    assert f"Attempt 1: the process times out beyond its retries at model #3: {model}" in proc.stdout
    # One name per step in the live lines, the tables and `show --json`: kind, ordinal, name, what it asked for.
    assert f"⚡ model #1: {model}  " in proc.stdout and f"✓ model #3: {model}  " in proc.stdout
    assert [s["title"] for s in run["steps"]] == [
        f"model #1: {model} → calculate_statistics",
        "tool #2: calculate_statistics",
        f"model #3: {model} → detect_anomalies",
        "tool #4: detect_anomalies",
        f"model #5: {model}",
    ]
    assert f"model #3: {model} → detect_anomalies" in proc.stdout
    assert [s["status"] for s in run["earlier_attempts"][0]] == ["executed", "executed", "failed"] + [
        "not_reached"
    ] * 2
    assert [s["status"] for s in run["steps"]] == ["replayed"] * 2 + ["executed"] * 3
    assert run["output"] == uninterrupted["output"]


def test_demo_analyses_a_users_csv(tmp_path: Path) -> None:
    data = tmp_path / "traffic.csv"
    rows = ["visitors,day,channel"] + [f"{100 + d % 7},{d},web" for d in range(1, 41)] + ["950,41,web"]
    data.write_text("\n".join(rows) + "\n")
    run = shown(demo("--csv", str(data), "--no-failure"))
    assert run["output"]["anomalies"][0]["column"] == "visitors"
    assert run["output"]["anomalies"][0]["value"] == 950.0


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("name,city\nann,paris\nbob,rome\n", "no numeric column"),
        ("", "empty"),
        (None, "does not exist"),
    ],
    ids=["no-numeric-column", "empty-file", "missing-file"],
)
def test_bad_csv_is_a_clear_one_line_error(tmp_path: Path, content: str | None, message: str) -> None:
    path = tmp_path / "input.csv"
    if content is not None:
        path.write_text(content)
    proc = demo("--csv", str(path))
    assert proc.returncode == 2
    assert "Traceback" not in proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:") and message in lines[0].lower(), proc.stderr


def test_unknown_step_is_a_clear_error() -> None:
    proc = demo("--fail-at", "step-99")
    assert proc.returncode == 2 and "Unknown step 'step-99' for --fail-at" in proc.stderr
