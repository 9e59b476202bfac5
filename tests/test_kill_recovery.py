"""SIGKILL a real process at every step boundary and inside a tool; a rerun with the same key finishes the job.

The script (tests/scripts/five_step.py) logs each model/tool call to a file before doing it, so the log counts
calls across both processes: a completed step must appear exactly once overall. Every test runs for both durable
forms: `PrefectAgent(agent)` with `idempotency_key=`, and an agent built with `capabilities=[PrefectDurability()]`
under `with idempotency_key(...)`.
"""

from __future__ import annotations

import json
import signal
import subprocess
import uuid
from pathlib import Path

import pytest

from prefect_pydantic_ai import list_runs, resume_run, show_run
from tests.warm import python

pytestmark = pytest.mark.slow  # starts processes

SCRIPT = Path(__file__).parent / "scripts" / "five_step.py"
SHAPE = ["model", "tool:calculate_statistics", "model", "tool:detect_anomalies", "model"]


@pytest.fixture(scope="module", params=["PrefectAgent", "capability"])
def form(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def _run(log: Path, form: str, key: str, *kill: str) -> subprocess.CompletedProcess[str]:
    env = {"FIVE_STEP_LOG": str(log), "FIVE_STEP_FORM": form}
    if kill:
        env[kill[0]] = kill[1]
    return python(str(SCRIPT), key, env=env, timeout=180)


def _output(proc: subprocess.CompletedProcess[str]) -> dict[str, object]:
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(line for line in proc.stdout.splitlines() if line.startswith("OUTPUT "))
    return dict(json.loads(line.removeprefix("OUTPUT ")))


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory: pytest.TempPathFactory, form: str) -> dict[str, object]:
    log = tmp_path_factory.mktemp("ref") / "calls.log"
    out = _output(_run(log, form, f"ref-{uuid.uuid4().hex[:8]}"))
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
    tmp_path: Path,
    form: str,
    uninterrupted: dict[str, object],
    flag: str,
    call: int,
    completed_before_kill: int,
) -> None:
    log = tmp_path / "calls.log"
    key = f"kill-{uuid.uuid4().hex[:8]}"
    killed = _run(log, form, key, flag, str(call))
    assert killed.returncode == -signal.SIGKILL
    first = [line.split(" ", 1)[1] for line in log.read_text().splitlines()]
    assert first == SHAPE[: completed_before_kill + (1 if flag == "FIVE_STEP_KILL_IN_TOOL" else 0)]

    resumed = _output(_run(log, form, key))
    assert resumed == uninterrupted
    second = [line.split(" ", 1)[1] for line in log.read_text().splitlines()][len(first) :]
    # The resumed process starts at the first step that did not complete; nothing before it runs again.
    assert second == SHAPE[completed_before_kill:]


def _calls(log: Path) -> list[str]:
    return [line.split(" ", 1)[1] for line in log.read_text().splitlines()]


@pytest.mark.anyio
@pytest.mark.parametrize("route", ["resume_run", "cli"])
async def test_a_killed_bare_run_of_a_capability_agent_resumes_in_place(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, route: str
) -> None:
    """`resume RUN` re-imports the module-level agent built with the capability and runs the same flow run again."""
    log = tmp_path / "calls.log"
    killed = _run(log, "capability", "", "FIVE_STEP_KILL_BEFORE", "4")  # no key: keyed by its flow run
    assert killed.returncode == -signal.SIGKILL
    assert _calls(log) == SHAPE[:3]
    [crashed] = await list_runs(agent="five_step_capability", limit=1)
    assert crashed.state == "crashed"

    if route == "cli":
        resumed = python(
            "-m",
            "prefect_pydantic_ai",
            "resume",
            crashed.run_id,
            env={"FIVE_STEP_LOG": str(log)},
            timeout=180,
        )
        assert resumed.returncode == 0, resumed.stderr[-3000:]
    else:
        monkeypatch.setenv("FIVE_STEP_LOG", str(log))
        result = await resume_run(crashed.run_id)
        assert result.output == "mean=326.25 anomalies=[1000.0]"
    assert _calls(log) == SHAPE  # the first three steps executed once, in the killed process

    detail = await show_run(crashed.run_id)
    assert (detail.state, detail.run_count, detail.agent) == ("completed", 2, "five_step_capability")
    assert detail.ledger is not None  # from the run record: what the second attempt executed and replayed
    assert (detail.ledger.spent.model_calls, detail.ledger.saved.model_calls) == (1, 2)
    assert (detail.ledger.spent.tool_calls, detail.ledger.saved.tool_calls) == (1, 1)
    assert detail.output == "mean=326.25 anomalies=[1000.0]"
