"""`prefect-pydantic-ai runs / show / resume`: crash detection, in-place resume, timelines and clear errors.

Scripts and `resume` (which runs them) are real subprocesses; read-only commands (`runs`, `show`) run in this
process (tests/commands.py), all against the session's Prefect server.
Scripts log each model/tool call to a file, so the logs prove which calls executed in which process.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prefect import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, LogFilter, LogFilterFlowRunId
from pydantic_ai import Agent, RunContext
from pydantic_ai.messages import ModelMessage, ModelResponse, TextPart, ToolCallPart
from pydantic_ai.models.function import AgentInfo, FunctionModel

from prefect_pydantic_ai import PrefectAgent, ledger_of
from tests.commands import cli  # in this process unless a test gives its scripts an environment
from tests.warm import python

pytestmark = pytest.mark.slow  # starts processes

SCRIPTS = Path(__file__).parent / "scripts"
FIVE = SCRIPTS / "five_step.py"
TWO_AGENTS = SCRIPTS / "two_agents_flow.py"
SHAPE = ["model", "tool:calculate_statistics", "model", "tool:detect_anomalies", "model"]


def script(path: Path, arg: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return python(str(path), arg, env=env)


def calls(log: Path) -> list[str]:
    return [line.split(" ", 1)[-1] for line in log.read_text().splitlines()] if log.exists() else []


def task_run_states(run_id: str) -> dict[str, str]:
    """Each task run of a flow run (by id) and its state type, as Prefect recorded it."""
    import asyncio

    async def read() -> dict[str, str]:
        async with get_client() as client:
            runs = await client.read_task_runs(
                flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[uuid.UUID(run_id)]))
            )
        return {str(t.id): t.state_type.value if t.state_type else "NONE" for t in runs}

    return asyncio.run(read())


def newest_run(agent: str) -> dict[str, Any]:
    listed = cli("runs", "--agent", agent, "--limit", "1", "--json")
    assert listed.returncode == 0, listed.stderr
    runs = json.loads(listed.stdout)
    assert runs, f"no runs of {agent}"
    return dict(runs[0])


def show(ref: str) -> dict[str, Any]:
    shown = cli("show", ref, "--json")
    assert shown.returncode == 0, shown.stderr
    return dict(json.loads(shown.stdout))


@pytest.fixture(scope="module")
def uninterrupted_output(tmp_path_factory: pytest.TempPathFactory) -> str:
    log = tmp_path_factory.mktemp("reference") / "calls.log"
    done = script(FIVE, f"reference-{uuid.uuid4().hex[:6]}", {"FIVE_STEP_LOG": str(log)})
    assert done.returncode == 0, done.stderr[-2000:]
    line = next(line for line in done.stdout.splitlines() if line.startswith("OUTPUT "))
    return str(json.loads(line.removeprefix("OUTPUT "))["output"])


def test_killed_script_shows_crashed_and_resume_completes_it_in_place(
    tmp_path: Path, uninterrupted_output: str
) -> None:
    log = tmp_path / "calls.log"
    agent = f"five_step_{uuid.uuid4().hex[:6]}"  # this test's runs only
    env = {"FIVE_STEP_LOG": str(log), "FIVE_STEP_AGENT": agent}
    killed = script(
        FIVE, "", {**env, "FIVE_STEP_KILL_BEFORE": "4"}
    )  # no idempotency key: keyed by the flow run
    assert killed.returncode == -signal.SIGKILL
    assert calls(log) == SHAPE[:3]

    crashed = newest_run(agent)
    assert crashed["state"] == "crashed"  # not "running": the recorded process is gone
    # The kill can take the events of any of the three steps with it (under load, all of them): `runs` counts
    # the steps from the run's progress log too, so it says 3 whatever reached Prefect.
    assert crashed["steps_completed"] == 3

    resumed = cli("resume", crashed["run_id"], env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "⚡" in resumed.stdout and "completed" in resumed.stdout
    assert calls(log) == SHAPE  # steps 1-3 executed exactly once across both processes

    detail = show(crashed["run_id"][:10])  # a unique prefix resolves too
    assert detail["run_id"] == crashed["run_id"] and detail["state"] == "completed"
    assert detail["run_count"] == 2  # the same flow run, run again
    assert [s["status"] for s in detail["steps"]] == ["replayed"] * 3 + ["executed"] * 2
    assert [s["kind"] for s in detail["steps"]] == ["model", "tool", "model", "tool", "model"]
    assert [s["name"] for s in detail["steps"]][1::2] == ["calculate_statistics", "detect_anomalies"]
    assert all({"index", "attempts", "duration_s"} <= set(s) for s in detail["steps"])
    assert detail["output"] == uninterrupted_output
    assert detail["model_calls"] == {"executed": 1, "replayed": 2}
    assert detail["tool_calls"] == {"executed": 1, "replayed": 1}
    earlier = detail["earlier_attempts"][0]
    assert [s["status"] for s in earlier] == ["executed"] * 3 + ["crashed", "not_reached"]

    again = cli("resume", crashed["run_id"], env=env)  # completed: prints the stored output, executes nothing
    assert again.returncode == 0 and "already completed" in again.stdout
    assert calls(log) == SHAPE


@pytest.mark.parametrize("flow_kind", ["async", "sync"])
def test_user_flow_with_two_agents_killed_in_the_second_resumes_without_the_first(
    tmp_path: Path, flow_kind: str
) -> None:
    log = tmp_path / "calls.log"
    suffix = f"_{uuid.uuid4().hex[:6]}"  # this test's runs only
    env = {"TWO_AGENTS_LOG": str(log), "TWO_AGENTS_SUFFIX": suffix}
    env.update({"TWO_AGENTS_SYNC": "1"} if flow_kind == "sync" else {})
    killed = script(TWO_AGENTS, "durability", {**env, "TWO_AGENTS_KILL_AT": "summary:draft"})
    assert killed.returncode == -signal.SIGKILL
    before = calls(log)
    assert before == ["research:model", "research:search", "research:model", "summary:model", "summary:draft"]

    run = newest_run(f"summarizer{suffix}")
    assert run["state"] == "crashed" and set(run["agents"]) == {f"researcher{suffix}", f"summarizer{suffix}"}
    resumed = cli("resume", run["run_id"], env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    after = calls(log)[len(before) :]
    assert after == ["summary:draft", "summary:model"]  # the first agent executed nothing

    detail = show(run["run_id"])
    assert detail["state"] == "completed"
    assert [s["status"] for s in detail["steps"]] == ["replayed"] * 4 + ["executed"] * 2
    assert "never pay twice" in detail["output"][f"summarizer{suffix}"]["technical"]
    # Prefect holds no Running task run for a run that is over: the step killed in attempt 1 is Crashed, where
    # Prefect heard of it at all (its events can die with the process: then the two attempts leave 4 + 6).
    states = task_run_states(run["run_id"])
    assert "RUNNING" not in states.values() and "PENDING" not in states.values()
    crashed = list(states.values()).count("CRASHED")
    assert crashed in (0, 1) and len(states) == 10 + crashed, states


def test_resume_all_crashed_resumes_each_crashed_run(tmp_path: Path) -> None:
    log = tmp_path / "calls.log"
    agent = f"five_step_{uuid.uuid4().hex[:6]}"  # --all-crashed --agent sweeps this test's runs only
    env = {"FIVE_STEP_LOG": str(log), "FIVE_STEP_AGENT": agent}
    keys = [f"all-crashed-{n}-{uuid.uuid4().hex[:6]}" for n in range(2)]
    for key in keys:
        assert script(FIVE, key, {**env, "FIVE_STEP_KILL_BEFORE": str(len(calls(log)) + 3)}).returncode == -9
    assert calls(log) == SHAPE[:2] * 2
    # a third key killed the same way, then run again with its key: a new flow run completes it, so its
    # crashed flow run has nothing left to resume
    done = f"all-crashed-done-{uuid.uuid4().hex[:6]}"
    assert script(FIVE, done, {**env, "FIVE_STEP_KILL_BEFORE": str(len(calls(log)) + 3)}).returncode == -9
    assert script(FIVE, done, env).returncode == 0
    before = len(calls(log))

    resumed = cli("resume", "--all-crashed", "--agent", agent, env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for key in keys:
        assert show(key)["state"] == "completed"
    assert resumed.stdout.count("Skipped run ") == 1
    assert f"completed its key {done!r}; nothing to resume." in resumed.stdout, resumed.stdout
    assert calls(log)[before:].count("model") == 4 and calls(log)[before:].count("tool:detect_anomalies") == 2
    assert "tool:calculate_statistics" not in calls(log)[before:]
    left = json.loads(cli("runs", "--state", "crashed", "--agent", agent, "--json").stdout)
    assert [r["idempotency_key"] for r in left] == [done]  # the superseded attempt, left as it was


def test_unknown_run_unknown_key_and_ambiguous_prefix_are_one_line_errors() -> None:
    missing = cli("show", str(uuid.uuid4()))
    assert missing.returncode == 2 and missing.stderr.startswith("error: No flow run with id")
    assert "Traceback" not in missing.stderr and len(missing.stderr.strip().splitlines()) == 1

    unknown_key = cli("resume", "no-such-key-anywhere")
    assert (
        unknown_key.returncode == 2
        and "No agent run with idempotency key 'no-such-key-anywhere'" in unknown_key.stderr
    )

    shared = _a_shared_first_character_of_run_ids()
    ambiguous = cli("show", shared)
    assert ambiguous.returncode == 2 and f"Run id prefix {shared!r} is ambiguous" in ambiguous.stderr

    bad_state = cli("runs", "--state", "sleeping")
    assert bad_state.returncode == 2 and "Unknown state 'sleeping'" in bad_state.stderr


def _a_shared_first_character_of_run_ids() -> str:
    """Add tiny agent runs until two run ids begin alike (17 runs at most: there are 16 hex digits)."""
    agent = PrefectAgent(
        Agent(FunctionModel(lambda _m, _i: ModelResponse(parts=[TextPart("ok")])), name="prefix")
    )
    while True:
        firsts = [r["run_id"][0] for r in json.loads(cli("runs", "--limit", "200", "--json").stdout)]
        if shared := next((c for c in firsts if firsts.count(c) > 1), None):
            return shared
        for _ in range(17 - len(firsts)):
            agent.run_sync("hi")


def test_unresolvable_import_path_says_how_to_fix_it(tmp_path: Path) -> None:
    moved = tmp_path / "gone.py"
    shutil.copy(FIVE, moved)
    log = tmp_path / "calls.log"
    env = {"FIVE_STEP_LOG": str(log)}
    key = f"gone-{uuid.uuid4().hex[:6]}"
    assert script(moved, key, {**env, "FIVE_STEP_KILL_BEFORE": "2"}).returncode == -9
    moved.unlink()
    failed = cli("resume", key, env=env)
    assert failed.returncode == 2
    assert (
        "Cannot load the recorded entrypoint" in failed.stderr
        and "--entrypoint module:attribute" in failed.stderr
    )
    fixed = cli("resume", key, "--entrypoint", f"{FIVE}:durable", env=env)
    assert fixed.returncode == 0, fixed.stderr[-2000:]
    assert show(key)["state"] == "completed"


def test_a_run_whose_process_is_alive_is_not_resumed(tmp_path: Path) -> None:
    log = tmp_path / "calls.log"
    env = {**os.environ, "FIVE_STEP_LOG": str(log), "FIVE_STEP_HANG_IN_TOOL": "2"}
    key = f"alive-{uuid.uuid4().hex[:6]}"
    proc = subprocess.Popen(
        [sys.executable, str(FIVE), key], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )
    try:
        deadline = time.monotonic() + 120
        while calls(log) != SHAPE[:2]:
            assert time.monotonic() < deadline and proc.poll() is None
            time.sleep(0.2)
        refused = cli("resume", key, env={"FIVE_STEP_LOG": str(log)})
        assert refused.returncode == 2 and "is still running" in refused.stderr
        assert show(key)["state"] == "running"
    finally:
        proc.kill()
        proc.wait()
    finished = cli("resume", key, env={"FIVE_STEP_LOG": str(log)})  # now it is crashed, and resumable
    assert finished.returncode == 0, finished.stderr[-2000:]


@dataclass
class Deps:
    region: str
    api_key: str


@pytest.mark.anyio
async def test_secret_looking_deps_never_reach_parameters_labels_logs_or_records(storage_dir: Path) -> None:
    secret = f"sk-test-{uuid.uuid4().hex}"

    def model(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        if len(messages) == 1:
            return ModelResponse(parts=[ToolCallPart("lookup", {})])
        return ModelResponse(parts=[TextPart("done")])

    agent: Agent[Deps, str] = Agent(FunctionModel(model), name="secretive", deps_type=Deps)

    @agent.tool
    def lookup(ctx: RunContext[Deps]) -> str:
        return f"looked up {ctx.deps.region}"  # uses the secret-bearing deps, never returns the key

    key = f"secret-{uuid.uuid4().hex[:6]}"
    result = await PrefectAgent(agent).run("go", deps=Deps(region="eu", api_key=secret), idempotency_key=key)
    assert result.output == "done"
    assert ledger_of(result) is not None

    detail = show(key)
    async with get_client() as client:
        flow_run = await client.read_flow_run(uuid.UUID(detail["run_id"]))
        logs = await client.read_logs(
            log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run.id]))
        )
        task_runs = await client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run.id]))
        )
    assert secret not in json.dumps(flow_run.parameters) and secret not in " ".join(flow_run.tags)
    assert all(secret not in log.message for log in logs)
    assert all(secret not in json.dumps(t.task_inputs, default=str) for t in task_runs)
    stored = "".join(p.read_text(errors="ignore") for p in storage_dir.rglob("*") if p.is_file())
    assert secret not in stored
    assert secret not in json.dumps(detail)


def test_a_step_whose_completion_event_died_with_the_process_shows_executed_when_the_next_attempt_replayed_it() -> (
    None
):
    from prefect_pydantic_ai.ops.timeline import StepView, completed_before_the_kill

    def view(index: int, status: str) -> StepView:
        return StepView(
            index=index, kind="model", name="m", agent="a", status=status, attempts=1, duration_s=None
        )  # type: ignore[arg-type]

    killed = [view(1, "executed"), view(2, "failed")]  # step 2 left "Running" in Prefect
    assert [
        s.status for s in completed_before_the_kill(killed, [view(1, "replayed"), view(2, "replayed")])
    ] == [
        "executed",
        "executed",
    ]
    # Steps whose task runs never reached Prefect at all, but that the next attempt replayed.
    later = [view(1, "replayed"), view(2, "replayed"), view(3, "replayed"), view(4, "executed")]
    assert [s.status for s in completed_before_the_kill([view(1, "executed")], later)] == ["executed"] * 3
    # The next attempt executed step 2 again: it had not completed.
    assert [
        s.status for s in completed_before_the_kill(killed, [view(1, "replayed"), view(2, "executed")])
    ] == [
        "executed",
        "failed",
    ]


def test_ctrl_c_typed_during_a_run_ends_it_cancelled_and_resume_completes_it(tmp_path: Path) -> None:
    """Ctrl-C in a real terminal while a tool waits: the run ends Cancelled (not Crashed), saying how to go on;
    `resume` replays the model call and runs the tool again."""
    from tests.terminal import ctrl_c_when

    log, key = tmp_path / "calls.log", f"ctrl-c-{uuid.uuid4().hex[:8]}"
    env = {**os.environ, "SLOW_TOOL_LOG": str(log), "SLOW_TOOL_HANG": "1"}
    argv = [sys.executable, str(SCRIPTS / "slow_tool.py"), key]
    code, text, interrupted = ctrl_c_when(argv, env, tmp_path, b"WAITING")
    assert interrupted and code != 0, text
    assert calls(log) == ["model", "lookup"]

    stopped = show(key)
    assert stopped["state"] == "cancelled", stopped
    assert stopped["error"] == "interrupted: the run was cancelled (Ctrl-C, or its task was cancelled)"
    resumed = cli("resume", key, env={"SLOW_TOOL_LOG": str(log)})
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert show(key)["state"] == "completed"
    assert calls(log) == ["model", "lookup", "lookup", "model"]  # the first model call replayed
