"""Durable sub-agents: an agent run inside another agent's tool keeps its own journal across SIGKILLs.

The script (tests/scripts/delegation.py) counts every model and tool call at every level in a `CallLog`, and
SIGKILLs itself at a planned call; a rerun with the same idempotency key must execute only what had not
completed: the coordinator's tool step runs again, and the sub-agent inside it replays its completed steps.
"""

from __future__ import annotations

import json
import re
import signal
import subprocess
import uuid
from collections import Counter
from pathlib import Path
from typing import Any, Literal

import pytest
from prefect import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags
from rich.console import Console

from examples import FAULT_PLAN_ENV
from examples.delegate_research_and_writing import delegate_research_and_writing
from examples.research_and_summarize import research_and_summarize
from prefect_pydantic_ai.cli.display import show_json, timeline_table
from prefect_pydantic_ai.ops.show import show_run
from prefect_pydantic_ai.ops.timeline import StepView, step_tree
from prefect_pydantic_ai.store.prefect_rest import TAG, tag_values
from prefect_pydantic_ai.store.records import RunRecord, read_records
from prefect_pydantic_ai.testing import CallLog, FaultPlan
from tests.warm import python

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


NESTED = [
    "coordinator:model",
    "coordinator:delegate",
    "researcher:model",
    "researcher:verify",
    "fact_checker:model",
    "fact_checker:source",
    "fact_checker:model",
    "researcher:model",
    "coordinator:returned",
    "coordinator:model",
]
_NOT_A_STEP = {"coordinator:returned"}  # counted inside the delegate tool, after the researcher returned


def _run(plan: FaultPlan, key: str, shape: str, **env: str) -> subprocess.CompletedProcess[str]:
    return python(str(SCRIPT), key, shape, env={**plan.to_env(), **env}, timeout=180)


def _output(proc: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(line for line in proc.stdout.splitlines() if line.startswith("OUTPUT "))
    return dict(json.loads(line.removeprefix("OUTPUT ")))


def _kill_then_rerun(
    tmp_path: Path, shape: str, name: str, on_call: int = 0, **env: str
) -> tuple[list[str], list[str], dict[str, Any]]:
    """SIGKILL the script at call `on_call` of `name` (or where `env` says), rerun it with the same key:
    (calls before, calls after, the rerun's output with its key)."""
    calls = tmp_path / "calls.jsonl"
    key = f"sub-{uuid.uuid4().hex[:8]}"
    plan = FaultPlan(state_file=calls)
    killed = _run(plan.kill(name, on_call=on_call) if on_call else plan, key, shape, **env)
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-3000:]
    first = [entry.name for entry in CallLog(calls).entries()]
    out = _output(_run(FaultPlan(state_file=calls), key, shape))
    out["key"] = key
    return first, [entry.name for entry in CallLog(calls).entries()][len(first) :], out


def _is_model(call: str) -> bool:
    return call.split(":")[1] == "model"


def _models(calls: list[str]) -> int:
    return sum(_is_model(call) for call in calls)


def _tools(calls: list[str]) -> int:
    return sum(not _is_model(call) and call not in _NOT_A_STEP for call in calls)


def _assert_ledger_counts(out: dict[str, Any], executed: list[str], uninterrupted: list[str]) -> None:
    """The rerun's ledger spent exactly the calls it executed (at every level), and saved the rest of an
    uninterrupted run's; `sub_agents` says how much of it was the researcher's."""
    ledger = out["ledger"]
    assert ledger["spent"]["model_calls"] == _models(executed)
    assert ledger["spent"]["tool_calls"] == _tools(executed)
    assert ledger["spent"]["model_calls"] + ledger["saved"]["model_calls"] == _models(uninterrupted)
    assert ledger["spent"]["tool_calls"] + ledger["saved"]["tool_calls"] == _tools(uninterrupted)
    researcher = ledger["sub_agents"]["researcher"]
    below = [call for call in executed if not call.startswith("coordinator:")]
    assert researcher["spent"]["model_calls"] == _models(below)
    assert researcher["spent"]["model_calls"] + researcher["saved"]["model_calls"] == _models(
        [call for call in uninterrupted if not call.startswith("coordinator:")]
    )


@pytest.mark.slow
def test_killed_inside_the_sub_agents_tool_replays_the_sub_agents_completed_model_call(
    tmp_path: Path,
) -> None:
    first, second, out = _kill_then_rerun(tmp_path, "one", "researcher:lookup", 1)
    assert first == ONE[:4]
    # The coordinator's tool step runs again; inside it the researcher replays its first model call.
    assert second == ["coordinator:delegate", "researcher:lookup", "researcher:model", *ONE[-2:]]
    assert out["output"] == "findings on a: fact a"
    _assert_ledger_counts(out, second, ONE)


@pytest.mark.slow
def test_killed_between_the_sub_agents_model_call_and_its_tool_runs_only_the_tool_onwards(
    tmp_path: Path,
) -> None:
    first, second, out = _kill_then_rerun(tmp_path, "one", "", DELEGATION_KILL_AFTER="researcher:model:1")
    assert first == ONE[:3]
    assert second == ["coordinator:delegate", "researcher:lookup", "researcher:model", *ONE[-2:]]
    assert out["output"] == "findings on a: fact a"
    _assert_ledger_counts(out, second, ONE)


@pytest.mark.slow
def test_killed_after_the_sub_agent_returned_replays_the_whole_sub_run(tmp_path: Path) -> None:
    first, second, out = _kill_then_rerun(tmp_path, "one", "coordinator:returned", 1)
    assert first == ONE[:6]
    # The delegate tool was not journaled, so it runs again; the researcher executes nothing.
    assert second == ["coordinator:delegate", "coordinator:returned", "coordinator:model"]
    _assert_ledger_counts(out, second, ONE)
    assert out["ledger"]["sub_agents"]["researcher"]["saved"]["model_calls"] == 2


@pytest.mark.slow
def test_two_parallel_delegations_with_one_killed_keep_separate_journals(tmp_path: Path) -> None:
    first, second, out = _kill_then_rerun(tmp_path, "parallel", "researcher:lookup:b", 1)
    assert out["output"] == "findings on a: fact a | findings on b: fact b"
    calls = Counter(first + second)
    # The killed delegation's researcher made its first model call before the kill: it never runs again.
    assert Counter(first)["researcher:model:b"] == 1 and calls["researcher:model:b"] == 2
    # The other one ran alongside: only a model call it had in flight at the kill (not journaled) may repeat.
    assert calls["researcher:model:a"] in (2, 3)
    assert Counter(second)["coordinator:delegate"] == 2 and Counter(second)["coordinator:model"] == 1
    uninterrupted = [
        "coordinator:model",
        *[
            f"{call}:{topic}" if call.startswith("researcher:") else call
            for topic in "ab"
            for call in ONE[1:6]
        ],
        "coordinator:model",
    ]
    _assert_ledger_counts(out, second, uninterrupted)


@pytest.mark.slow
def test_a_sub_agent_driven_through_iter_replays_like_run(tmp_path: Path) -> None:
    first, second, out = _kill_then_rerun(tmp_path, "iter", "researcher:lookup", 1)
    assert first == ONE[:4]
    assert second == ["coordinator:delegate", "researcher:lookup", "researcher:model", *ONE[-2:]]
    assert out["output"] == "findings on a: fact a"
    _assert_ledger_counts(out, second, ONE)


@pytest.mark.slow
def test_two_levels_of_delegation_replay_every_completed_step_at_every_level(tmp_path: Path) -> None:
    first, second, out = _kill_then_rerun(tmp_path, "nested", "fact_checker:source", 1)
    assert first == NESTED[:6]
    assert second == [
        "coordinator:delegate",
        "researcher:verify",
        "fact_checker:source",
        "fact_checker:model",
        "researcher:model",
        "coordinator:returned",
        "coordinator:model",
    ]
    assert out["output"] == "findings on a: checked source of a"
    _assert_ledger_counts(out, second, NESTED)
    checker = out["ledger"]["sub_agents"]["researcher/fact_checker"]
    assert (checker["spent"]["model_calls"], checker["saved"]["model_calls"]) == (1, 1)


@pytest.mark.anyio
@pytest.mark.slow
async def test_show_nests_the_sub_agents_steps_under_the_delegating_tool(tmp_path: Path) -> None:
    _, _, out = _kill_then_rerun(tmp_path, "one", "researcher:lookup", 1)
    detail = await show_run(out["key"])

    def tree(steps: list[StepView]) -> list[Any]:
        return [(s.agent, s.kind, s.status, tree(s.steps)) for s in steps]

    sub = [
        ("researcher", "model", "replayed", []),
        ("researcher", "tool", "executed", []),
        ("researcher", "model", "executed", []),
    ]
    assert tree(detail.steps) == [
        ("coordinator", "model", "replayed", []),
        ("coordinator", "tool", "executed", sub),
        ("coordinator", "model", "executed", []),
    ]
    assert detail.ledger is not None and set(detail.ledger.sub_agents) == {"researcher"}
    rendered = show_json(detail)
    assert [s["agent"] for s in rendered["steps"][1]["steps"]] == ["researcher"] * 3
    assert rendered["sub_agents"]["researcher"]["model_calls"] == {"executed": 1, "replayed": 1}


# -- the example: an editor delegating research and writing -----------------------------------------------------

RESEARCH_STEPS = Counter({"researcher:model": 3, "researcher:search_notes": 1, "researcher:read_note": 3})


@pytest.fixture
def fault_plan(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> FaultPlan:
    """A fault plan the example flow counts its executed steps in (and fails `summarizer:get_findings` on the
    calls the test adds)."""
    plan = FaultPlan(state_file=tmp_path / f"calls-{uuid.uuid4().hex[:6]}.jsonl")
    monkeypatch.setenv(FAULT_PLAN_ENV, plan.to_json())
    return plan


def _executed(plan: FaultPlan) -> Counter[str]:
    assert plan.state_file is not None
    return Counter(entry.name for entry in CallLog(plan.state_file).entries())


@pytest.mark.anyio
async def test_the_editor_delegates_research_and_writing_and_returns_the_write_up(
    fault_plan: FaultPlan,
) -> None:
    summaries = await delegate_research_and_writing()
    assert summaries == await research_and_summarize()  # the same agents, delegated instead of chained
    counts = _executed(fault_plan)
    assert (
        counts
        == Counter(
            {
                "editor:model": 3,
                "editor:research": 1,
                "editor:write": 1,
                "summarizer:model": 2 * 2,
                "summarizer:get_findings": 1 * 2,
            }
        )
        + RESEARCH_STEPS
        + RESEARCH_STEPS
    )


@pytest.mark.anyio
@pytest.mark.slow
async def test_a_failed_delegation_is_retried_and_the_sub_agent_replays_what_it_completed(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, storage_dir: Path
) -> None:
    plan = FaultPlan(state_file=tmp_path / "calls.jsonl")
    for call in range(
        1, 4
    ):  # the summarizer's tool fails beyond its retries: its run fails, and so does `write`
        plan.fail(
            "summarizer:get_findings", on_call=call, exc=ConnectionError("findings store is unreachable")
        )
    monkeypatch.setenv(FAULT_PLAN_ENV, plan.to_json())
    state = await delegate_research_and_writing(return_state=True)
    assert state.is_completed()
    # The `write` step ran twice; its second attempt replayed the summarizer's first model call.
    assert (
        _executed(plan)
        == Counter(
            {
                "editor:model": 3,
                "editor:research": 1,
                "editor:write": 2,
                "summarizer:model": 2,
                "summarizer:get_findings": 4,
            }
        )
        + RESEARCH_STEPS
    )
    flow_run_id = state.state_details.flow_run_id
    assert flow_run_id is not None
    async with get_client() as client:
        assert (await client.read_flow_run(flow_run_id)).run_count == 1  # no flow retry was needed
    detail = await show_run(str(flow_run_id))
    assert detail.ledger is not None
    summarizer = detail.ledger.sub_agents["summarizer"]
    assert (summarizer.spent.model_calls, summarizer.saved.model_calls) == (2, 1)
    assert detail.ledger.sub_agents["researcher"].spent.model_calls == 3
    assert detail.ledger.spent.model_calls == 3 + 3 + 2
    (path,) = (storage_dir / "prefect-pydantic-ai" / "runs" / str(flow_run_id) / "steps").glob(
        "*/summarizer.0.json"
    )
    record = RunRecord.model_validate_json(path.read_text())
    assert record.parent_step == path.parent.name
    assert re.fullmatch(r"tool #\d+: write @ editor", record.parent_step_name or "")
    assert [attempt.state for attempt in record.attempts] == ["completed"]


@pytest.mark.slow
def test_a_sub_agent_run_from_an_output_function_replays_what_it_completed(tmp_path: Path) -> None:
    uninterrupted = [
        "coordinator:model",
        "coordinator:deliver",
        "researcher:model",
        "researcher:lookup",
        "researcher:model",
        "coordinator:returned",
    ]
    first, second, out = _kill_then_rerun(tmp_path, "output", "researcher:lookup", 1)
    assert first == uninterrupted[:4]
    # The output function runs again (it is not a step); the researcher inside it replays its first model call.
    assert second == ["coordinator:deliver", "researcher:lookup", "researcher:model", "coordinator:returned"]
    assert out["output"] == "findings on a: fact a"
    researcher = out["ledger"]["sub_agents"]["researcher"]
    assert (researcher["spent"]["model_calls"], researcher["saved"]["model_calls"]) == (1, 1)
    assert (out["ledger"]["spent"]["model_calls"], out["ledger"]["saved"]["model_calls"]) == (1, 2)


@pytest.mark.slow
def test_two_identical_delegations_in_one_step_stay_apart(tmp_path: Path) -> None:
    first, second, out = _kill_then_rerun(tmp_path, "twice", "researcher:lookup", 2)
    assert first == [*ONE[:5], "researcher:model", "researcher:lookup"]
    # The first researcher run replays entirely; the second, same prompt, replays only its first model call.
    assert second == ["coordinator:delegate", "researcher:lookup", "researcher:model", *ONE[-2:]]
    assert out["output"] == "findings on a: fact a & findings on a: fact a"
    _assert_ledger_counts(out, second, [*ONE[:5], *ONE[2:5], *ONE[5:]])


def test_the_show_table_prints_a_sub_agents_steps_indented_under_the_delegating_step() -> None:
    def step(index: int, kind: Literal["model", "tool"], name: str, agent: str, **more: Any) -> StepView:
        return StepView(
            index=index,
            kind=kind,
            name=name,
            agent=agent,
            status="executed",
            attempts=1,
            duration_s=0.1,
            **more,
        )

    flat = [
        step(1, "model", "coordinator-scripted", "coordinator"),
        step(2, "tool", "delegate", "coordinator"),
        step(3, "model", "researcher-scripted", "researcher", parent=2),
        step(4, "tool", "verify", "researcher", parent=2),
        step(5, "model", "checker-scripted", "fact_checker", parent=4),
        step(6, "model", "coordinator-scripted", "coordinator"),
    ]
    console = Console(width=120, record=True)
    console.print(timeline_table("Attempt 1", step_tree(flat)))
    rows = [line for line in console.export_text().splitlines() if line.startswith("│")]
    assert [row.split("│")[3].rstrip() for row in rows] == [
        " model #1: coordinator-scripted",
        " tool #2: delegate",
        " └ researcher: model #3: researcher-scripted",
        " └ researcher: tool #4: verify",
        "   └ fact_checker: model #5: checker-scripted",
        " model #6: coordinator-scripted",
    ]


@pytest.mark.anyio
@pytest.mark.slow
async def test_what_a_killed_sub_agent_spent_is_in_its_parents_record_and_counted_once(
    tmp_path: Path,
) -> None:
    first, second, out = _kill_then_rerun(tmp_path, "one", "researcher:lookup", 1)
    async with get_client() as client:
        flow_runs = await client.read_flow_runs(
            flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[TAG, f"key:{out['key']}"]))
        )
    assert len(flow_runs) == 2
    records = [r for fr in flow_runs for r in await read_records(str(fr.id), tag_values(fr, "agent:"))]
    assert [r.agent for r in records] == ["coordinator", "coordinator"]  # sub-runs are inside their parent's
    killed = next(a for r in records for a in r.attempts if a.state == "running")
    # The killed attempt's record holds what it spent up to the kill, the researcher's first model call included.
    assert killed.ledger.spent.model_calls == _models(first) == 2
    assert killed.ledger.sub_agents["researcher"].spent.model_calls == 1
    spent = sum(a.ledger.spent.model_calls for r in records for a in r.attempts)
    assert spent == _models(first + second)  # every executed model call once, at every level
