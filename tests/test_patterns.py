"""The example workflows (agents as building blocks), run on the session's Prefect server and counted.

Every example flow passes its agents' steps through `examples.fault_injection`: with ``PPAI_FAULT_PLAN`` set,
each model request and tool call that really executes is appended to the plan's state file, and chosen calls
fail. Replayed steps never reach it, so the state file tells exactly what a resumed run executed again.
"""

from __future__ import annotations

import email
import email.policy
import json
import os
import subprocess
import sys
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from uuid import UUID

import anyio
import httpx
import pytest
from prefect import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.client.schemas.objects import State
from pydantic_ai.exceptions import UnexpectedModelBehavior
from pydantic_ai.messages import BaseToolReturnPart, ModelMessage, ModelRequest, ModelResponse, ToolCallPart
from pydantic_ai.models.function import AgentInfo, FunctionModel

from examples import FAULT_PLAN_ENV
from examples.analyze_and_report import DEFAULT_RECIPIENT, analyze_and_report, generate_report
from examples.analyze_and_report import main as analyze_and_report_main
from examples.research_and_summarize import (
    DEFAULT_TOPIC,
    ResearchFindings,
    build_research_agent,
    builtin_notes,
    load_notes,
    research_and_summarize,
)
from examples.research_and_summarize import main as research_and_summarize_main
from examples.triage_ticket import (
    SAMPLE_TICKETS,
    SupportTicket,
    triage_agent,
    triage_policy,
    triage_prompt,
    triage_ticket,
)
from examples.triage_ticket import main as triage_main
from prefect_pydantic_ai.demo.analyst import DEFAULT_PROMPT, DataAnalysis, build_analyst_agent, sales_dataset
from prefect_pydantic_ai.store.step_names import parse_task_run_name
from prefect_pydantic_ai.testing import CallLog, FaultPlan

ROOT = Path(__file__).resolve().parents[1]
ANALYST_STEPS = [
    "data_analyst:model",
    "data_analyst:calculate_statistics",
    "data_analyst:model",
    "data_analyst:detect_anomalies",
    "data_analyst:model",
]
RESEARCH_STEPS = Counter({"researcher:model": 3, "researcher:search_notes": 1, "researcher:read_note": 3})
BRANCHES = {"escalate_to_oncall", "route_to_billing_team", "assign_to_support_queue"}

InstallPlan = Callable[..., FaultPlan]


@pytest.fixture
def fault_plan(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> InstallPlan:
    """Hand the example flows a fault plan; each `(step, calls)` fails those call numbers of `step`."""

    def install(*faults: tuple[str, range]) -> FaultPlan:
        plan = FaultPlan(state_file=tmp_path / f"calls-{uuid.uuid4().hex[:6]}.jsonl")
        for step, calls in faults:
            for number in calls:
                plan.fail(step, on_call=number, exc=ConnectionError(f"{step} is unreachable"))
        monkeypatch.setenv(FAULT_PLAN_ENV, plan.to_json())
        return plan

    return install


def executed(plan: FaultPlan) -> list[str]:
    """The steps that really executed, in order, across processes."""
    assert plan.state_file is not None
    return [entry.name for entry in CallLog(plan.state_file).entries()]


def executed_by_process(plan: FaultPlan) -> list[list[str]]:
    """The steps that really executed, grouped by the process that executed them, in order."""
    assert plan.state_file is not None
    steps: dict[int, list[str]] = {}
    for entry in CallLog(plan.state_file).entries():
        steps.setdefault(entry.pid, []).append(entry.name)
    return list(steps.values())


def flow_run_id(state: State[Any]) -> UUID:
    """The id of the flow run that ended in `state`."""
    run_id = state.state_details.flow_run_id
    assert run_id is not None
    return run_id


def _task_name(run_name: str) -> str:
    """Our step task runs are named `<kind> #<n>: <name> @ <agent>` (their task: `<kind>: <name>`); other task runs
    carry Prefect's random suffix."""
    step = parse_task_run_name(run_name)
    return f"{step[0]}: {step[2]}" if step else run_name.rsplit("-", 1)[0]


async def task_run_names(run_id: UUID, *, at_least: int) -> list[str]:
    """The names (without Prefect's random suffix) of a flow run's task runs, once Prefect recorded them all.

    Task runs reach the API as events, so this polls until at least `at_least` are there and the count is stable.
    """
    flow_runs = FlowRunFilter(id=FlowRunFilterId(any_=[run_id]))
    deadline = time.monotonic() + 30
    seen = -1
    async with get_client() as client:
        while True:
            runs = await client.read_task_runs(flow_run_filter=flow_runs)
            if (len(runs) >= at_least and len(runs) == seen) or time.monotonic() > deadline:
                return sorted(_task_name(run.name) for run in runs)
            seen = len(runs)
            await anyio.sleep(0.3)


# -- Pattern 1: agent output feeds downstream tasks ----------------------------------------------------------


@pytest.mark.anyio
async def test_analysis_feeds_the_report_and_one_notification_in_the_outbox(
    tmp_path: Path, fault_plan: InstallPlan
) -> None:
    plan = fault_plan()
    plain = (await build_analyst_agent().run(DEFAULT_PROMPT, deps=sales_dataset())).output

    state = await analyze_and_report(outbox=str(tmp_path / "outbox"), return_state=True)
    analysis = await state.aresult()
    assert analysis == plain
    assert executed(plan) == ANALYST_STEPS

    run_id = flow_run_id(state)
    assert [p.name for p in (tmp_path / "outbox").iterdir()] == [f"{run_id}.eml"]
    message = email.message_from_bytes(
        (tmp_path / "outbox" / f"{run_id}.eml").read_bytes(), policy=email.policy.default
    )
    assert message["To"] == DEFAULT_RECIPIENT
    assert message["Subject"] == "Data analysis: Q4 sales"
    assert message.get_content_type() == "text/markdown"
    body = message.get_content()
    assert body == generate_report.fn(analysis, "Q4 sales")
    assert analysis.summary in body
    assert len(analysis.anomalies) == 2
    for anomaly in analysis.anomalies:
        assert f"| sales | {anomaly.row} | {anomaly.value:.2f} |" in body

    names = await task_run_names(run_id, at_least=7)
    assert Counter(names) == Counter(
        {
            "model: offline-analyst (scripted)": 3,
            "tool: calculate_statistics": 1,
            "tool: detect_anomalies": 1,
            "generate_report": 1,
            "send_notification": 1,
        }
    )


def test_report_lists_findings_and_says_when_there_are_no_anomalies() -> None:
    analysis = DataAnalysis(
        summary="Analysed 'visits'.",
        key_findings=["'visits' has 3 values."],
        anomalies=[],
        recommendations=["Keep going.", "Check again next week."],
        columns_analyzed=["visits"],
    )
    report = generate_report.fn(analysis, "visits.csv")
    assert report.startswith("# Data analysis: visits.csv\n\nAnalysed 'visits'.\n")
    assert "- 'visits' has 3 values." in report
    assert "## Anomalies\n\nNone found.\n" in report
    assert "1. Keep going.\n2. Check again next week.\n" in report


@pytest.mark.anyio
async def test_tool_failure_then_flow_retry_resumes_at_the_failed_tool_and_notifies_once(
    tmp_path: Path, fault_plan: InstallPlan
) -> None:
    # The tool task has 2 retries: calls 1-3 fail the first attempt of the flow run, call 4 succeeds.
    plan = fault_plan(("data_analyst:detect_anomalies", range(1, 4)))
    retrying = analyze_and_report.with_options(retries=1, retry_delay_seconds=0)

    state = await retrying(outbox=str(tmp_path / "outbox"), return_state=True)
    assert state.is_completed()
    assert (
        await state.aresult()
        == (await build_analyst_agent().run(DEFAULT_PROMPT, deps=sales_dataset())).output
    )
    first_attempt = [*ANALYST_STEPS[:3], *["data_analyst:detect_anomalies"] * 3]
    assert executed(plan) == [*first_attempt, "data_analyst:detect_anomalies", "data_analyst:model"]
    assert len(list((tmp_path / "outbox").iterdir())) == 1
    async with get_client() as client:
        assert (await client.read_flow_run(flow_run_id(state))).run_count == 2


# -- Pattern 2: agents in sequence with typed deps -----------------------------------------------------------


@pytest.mark.anyio
async def test_research_findings_are_the_typed_deps_of_the_summary_agent(fault_plan: InstallPlan) -> None:
    plan = fault_plan()
    findings = (await build_research_agent().run(f"Research {DEFAULT_TOPIC}", deps=builtin_notes())).output
    assert findings.sources == ["durable-execution", "agent-failure-modes", "retry-policies"]

    summaries = await research_and_summarize()
    for point in findings.key_points:
        assert point in summaries.technical
    assert ", ".join(findings.sources) in summaries.technical
    assert summaries.general == findings.key_points[0]
    assert summaries.executive.startswith(f"Bottom line: {findings.key_points[0]}")
    assert "3 key points from 3 sources" in summaries.executive
    assert Counter(executed(plan)) == RESEARCH_STEPS + Counter(
        {"summarizer:model": 2, "summarizer:get_findings": 1}
    )


@pytest.mark.anyio
@pytest.mark.slow
async def test_summary_agent_failure_retries_the_flow_without_running_the_research_again(
    fault_plan: InstallPlan,
) -> None:
    plan = fault_plan(("summarizer:get_findings", range(1, 4)))
    state = await research_and_summarize(return_state=True)
    assert state.is_completed()

    steps = executed(plan)
    failed_at = steps.index("summarizer:get_findings") + 3  # the first attempt ends after 3 failed calls
    first, second = steps[:failed_at], steps[failed_at:]
    assert Counter(first) == RESEARCH_STEPS + Counter({"summarizer:model": 1, "summarizer:get_findings": 3})
    assert second == ["summarizer:get_findings", "summarizer:model"]  # the research agent replayed entirely
    async with get_client() as client:
        assert (await client.read_flow_run(flow_run_id(state))).run_count == 2


@pytest.mark.anyio
async def test_research_without_findings_fails_validation_before_the_summary_agent_runs(
    fault_plan: InstallPlan,
) -> None:
    plan = fault_plan()
    state = await research_and_summarize(topic="medieval tapestry weaving", return_state=True)
    assert state.is_failed()
    assert isinstance(await state.aresult(raise_on_failure=False), UnexpectedModelBehavior)
    # search, then three invalid answers (two output retries); the flow's retry replays them all
    assert executed(plan) == ["researcher:model", "researcher:search_notes", *["researcher:model"] * 3]


@pytest.mark.anyio
async def test_research_agent_reads_a_notes_directory_and_cites_its_files(tmp_path: Path) -> None:
    (tmp_path / "backoff.md").write_text(
        "# Backoff\nExponential backoff spaces out retries of a failed call.\n"
    )
    (tmp_path / "queues.txt").write_text("Queues\nQueues decouple producers from consumers.\n")
    (tmp_path / "image.png").write_bytes(b"\x89PNG")
    knowledge = load_notes(tmp_path)
    assert [note.title for note in knowledge.notes] == ["Backoff", "Queues"]
    findings = (await build_research_agent().run("Research retries with backoff", deps=knowledge)).output
    assert findings == ResearchFindings(
        summary="Exponential backoff spaces out retries of a failed call. (Notes read: Backoff.)",
        key_points=["Exponential backoff spaces out retries of a failed call."],
        sources=["backoff.md"],
    )


# -- Pattern 3: conditional workflow -------------------------------------------------------------------------


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("ticket", "branch", "team", "triage"),
    [
        (SAMPLE_TICKETS[0], "escalate_to_oncall", "oncall", ("critical", "technical", 1)),
        (SAMPLE_TICKETS[1], "route_to_billing_team", "billing", ("medium", "billing", 3)),
        (SAMPLE_TICKETS[2], "assign_to_support_queue", "support", ("low", "general", 5)),
    ],
    ids=["critical", "billing", "general"],
)
async def test_triage_output_routes_the_ticket_to_exactly_one_branch_task(
    tmp_path: Path, ticket: SupportTicket, branch: str, team: str, triage: tuple[str, str, int]
) -> None:
    state = await triage_ticket(ticket, queue_dir=str(tmp_path), return_state=True)
    routing = await state.aresult()
    assert (routing.team, routing.ticket_id) == (team, ticket.id)
    assert (routing.triage.severity, routing.triage.category, routing.triage.priority) == triage
    filed = json.loads((tmp_path / team / f"{ticket.id}.json").read_text())
    assert filed == {"ticket": ticket.model_dump(), "triage": routing.triage.model_dump(), "team": team}
    assert [p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.json")] == [
        f"{team}/{ticket.id}.json"
    ]

    names = await task_run_names(flow_run_id(state), at_least=4)
    assert [name for name in names if name in BRANCHES] == [branch]
    assert Counter(names) == Counter(
        {"model: offline-triage (scripted)": 2, "tool: lookup_customer": 1, branch: 1}
    )


def shouting_triage(*, learns: bool) -> FunctionModel:
    """The offline triage policy, but its answer's severity is in capitals ("CRITICAL"), which is invalid.

    With `learns=True` it answers correctly once the agent has sent a validation error back to it.
    """

    def policy(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        response = triage_policy(messages, info)
        corrected = learns and any(
            isinstance(part, BaseToolReturnPart) and part.outcome == "retried"
            for message in messages
            if isinstance(message, ModelRequest)
            for part in message.parts
        )
        answer = response.parts[0]
        if corrected or not isinstance(answer, ToolCallPart) or answer.tool_name != info.output_tools[0].name:
            return response
        args = answer.args_as_dict()
        return ModelResponse(
            parts=[ToolCallPart(answer.tool_name, {**args, "severity": args["severity"].upper()})]
        )

    return FunctionModel(policy, model_name="shouting-triage (scripted)")


@pytest.mark.anyio
async def test_invalid_triage_output_is_retried_by_validation_before_routing(
    tmp_path: Path, fault_plan: InstallPlan
) -> None:
    plan = fault_plan()
    with triage_agent.override(model=shouting_triage(learns=True)):
        state = await triage_ticket(SAMPLE_TICKETS[0], queue_dir=str(tmp_path), return_state=True)
    routing = await state.aresult()
    assert routing.team == "oncall" and routing.triage.severity == "critical"
    assert executed(plan) == [
        "ticket_triage:model",
        "ticket_triage:lookup_customer",
        "ticket_triage:model",  # severity "CRITICAL": rejected by TicketTriage
        "ticket_triage:model",  # corrected after the validation error
    ]
    names = await task_run_names(flow_run_id(state), at_least=5)
    assert [name for name in names if name in BRANCHES] == ["escalate_to_oncall"]


@pytest.mark.anyio
async def test_triage_output_still_invalid_after_retries_fails_the_flow_before_any_branch(
    tmp_path: Path, fault_plan: InstallPlan
) -> None:
    plan = fault_plan()
    with triage_agent.override(model=shouting_triage(learns=False)):
        state = await triage_ticket(SAMPLE_TICKETS[0], queue_dir=str(tmp_path / "queues"), return_state=True)
    assert state.is_failed()
    error = await state.aresult(raise_on_failure=False)
    assert isinstance(error, UnexpectedModelBehavior) and "output retries" in str(error)
    assert Counter(executed(plan)) == Counter({"ticket_triage:model": 4, "ticket_triage:lookup_customer": 1})
    names = await task_run_names(flow_run_id(state), at_least=5)
    assert Counter(names) == Counter({"model: shouting-triage (scripted)": 4, "tool: lookup_customer": 1})
    assert not (tmp_path / "queues").exists()


@pytest.mark.anyio
async def test_triage_resumes_after_a_failed_lookup_and_routes_once(
    tmp_path: Path, fault_plan: InstallPlan
) -> None:
    plan = fault_plan(("ticket_triage:lookup_customer", range(1, 4)))
    retrying = triage_ticket.with_options(retries=1, retry_delay_seconds=0)
    state = await retrying(SAMPLE_TICKETS[1], queue_dir=str(tmp_path), return_state=True)
    assert (await state.aresult()).team == "billing"
    assert executed(plan) == [
        "ticket_triage:model",
        *["ticket_triage:lookup_customer"] * 3,
        "ticket_triage:lookup_customer",  # the retried flow run replays the first model request
        "ticket_triage:model",
    ]
    names = await task_run_names(flow_run_id(state), at_least=6)
    assert [name for name in names if name in BRANCHES] == ["route_to_billing_team"]


def test_prompt_carries_the_ticket_text_after_a_blank_line() -> None:
    ticket = SupportTicket(id="T-9", text="Line one.\n\nLine two.", customer_id="cus_x")
    assert triage_prompt(ticket).partition("\n\n")[2] == "Line one.\n\nLine two."


# -- Pattern 4: the flow served as a deployment --------------------------------------------------------------


def registered(
    deployment: str, process: subprocess.Popen[bytes], log: Path, timeout: float = 120
) -> dict[str, Any]:
    """The `analyze-and-report/<deployment>` deployment once the serving `process` has registered it."""
    url = f"{os.environ['PREFECT_API_URL']}/deployments/name/analyze-and-report/{deployment}"
    deadline = time.monotonic() + timeout
    while (response := httpx.get(url)).status_code != 200:
        assert process.poll() is None, log.read_text()
        assert time.monotonic() < deadline, "the deployment was not registered in time"
        time.sleep(0.5)
    return dict(response.json())


@contextmanager
def serving(
    log: Path, deployment: str, outbox: Path, *args: str, env: dict[str, str] | None = None
) -> Iterator[dict[str, Any]]:
    """Run ``python -m examples.serve_analyst`` in a subprocess until the block ends; yield the deployment."""
    environment = {**os.environ, "PREFECT_RUNNER_POLL_FREQUENCY": "1", **(env or {})}
    with log.open("wb") as out:
        proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "examples.serve_analyst",
                "--name",
                deployment,
                "--outbox",
                str(outbox),
                *args,
            ],
            cwd=ROOT,
            env=environment,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
        try:
            yield registered(deployment, proc, log)
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


async def call(api: httpx.AsyncClient, method: str, path: str, body: Any = None) -> Any:
    """One Prefect REST API call; like Prefect's own client, retry while the server answers 503 (busy)."""
    for attempt in range(8):
        response = await api.request(method, path, json=body)
        if response.status_code != 503:
            break
        await anyio.sleep(0.25 * 2**attempt)
    return response.raise_for_status().json()


async def wait_for_final_state(api: httpx.AsyncClient, run_id: str) -> dict[str, Any]:
    deadline = time.monotonic() + 120
    while True:
        run: dict[str, Any] = await call(api, "GET", f"flow_runs/{run_id}")
        if run["state_type"] in {"COMPLETED", "FAILED", "CRASHED", "CANCELLED"}:
            return run
        assert time.monotonic() < deadline, f"flow run still {run['state_type']}"
        await anyio.sleep(0.5)


async def read_result(run_id: str) -> Any:
    async with get_client() as client:
        run = await client.read_flow_run(UUID(run_id))
    assert run.state is not None
    return await run.state.aresult()


# Everything is read while the service still runs: when a runner shuts down it cancels the flow runs whose
# process it still tracks, and a process lingers for a moment after reporting its final state.


@pytest.mark.anyio
@pytest.mark.slow
async def test_served_flow_runs_when_triggered_over_rest_and_its_result_is_a_data_analysis(
    tmp_path: Path,
) -> None:
    expected = (await build_analyst_agent().run(DEFAULT_PROMPT, deps=sales_dataset())).output
    deployment = f"svc-{uuid.uuid4().hex[:8]}"
    with serving(tmp_path / "serve.log", deployment, tmp_path / "outbox", "--cron", "0 9 * * *") as served:
        assert [s["schedule"]["cron"] for s in served["schedules"]] == ["0 9 * * *"]
        async with httpx.AsyncClient(base_url=os.environ["PREFECT_API_URL"] + "/") as api:
            body = {"parameters": {"recipient": "ops@example.com"}}
            run_id = (await call(api, "POST", f"deployments/{served['id']}/create_flow_run", body))["id"]
            run = await wait_for_final_state(api, run_id)
            assert run["state_type"] == "COMPLETED", (tmp_path / "serve.log").read_text()
            analysis = await read_result(run_id)
    assert isinstance(analysis, DataAnalysis)
    assert analysis == expected
    message = email.message_from_bytes((tmp_path / "outbox" / f"{run_id}.eml").read_bytes())
    assert message["To"] == "ops@example.com"


@pytest.mark.anyio
@pytest.mark.slow
async def test_served_run_failing_midway_is_retried_as_the_same_flow_run_and_replays_completed_steps(
    tmp_path: Path,
) -> None:
    plan = FaultPlan(state_file=tmp_path / "calls.jsonl")
    for number in (1, 2, 3):  # every attempt of the tool task in the flow run's first attempt
        plan.fail(
            "data_analyst:detect_anomalies", on_call=number, exc=ConnectionError("anomaly service down")
        )
    deployment = f"svc-{uuid.uuid4().hex[:8]}"
    with serving(tmp_path / "serve.log", deployment, tmp_path / "outbox", env=plan.to_env()) as served:
        async with httpx.AsyncClient(base_url=os.environ["PREFECT_API_URL"] + "/") as api:
            run_id = (await call(api, "POST", f"deployments/{served['id']}/create_flow_run", {}))["id"]
            failed = await wait_for_final_state(api, run_id)
            assert failed["state_type"] == "FAILED", (tmp_path / "serve.log").read_text()
            assert not (tmp_path / "outbox").exists()

            scheduled = {"state": {"type": "SCHEDULED"}, "force": True}
            assert (await call(api, "POST", f"flow_runs/{run_id}/set_state", scheduled))["status"] == "ACCEPT"
            run = await wait_for_final_state(api, run_id)
            assert run["state_type"] == "COMPLETED", (tmp_path / "serve.log").read_text()
            assert run["run_count"] == 2
            assert isinstance(await read_result(run_id), DataAnalysis)

    first, second = executed_by_process(plan)
    assert first == [*ANALYST_STEPS[:3], *["data_analyst:detect_anomalies"] * 3]
    assert second == ANALYST_STEPS[3:]  # the steps before the failure ran exactly once across both attempts
    assert [p.name for p in (tmp_path / "outbox").iterdir()] == [f"{run_id}.eml"]


# -- the command lines (in process: ``python -m`` itself is exercised by the service tests) -------------------


def test_analyze_and_report_command_prints_the_summary_and_the_notification(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert analyze_and_report_main(["--outbox", str(tmp_path), "--to", "cfo@example.com"]) == 0
    (eml,) = tmp_path.iterdir()
    summary, notification = capsys.readouterr().out.splitlines()
    assert "2 anomalies at modified |z| > 3.5" in summary
    assert notification == f"Notification: {eml}"
    assert email.message_from_bytes(eml.read_bytes())["To"] == "cfo@example.com"


def test_analyze_and_report_command_rejects_a_bad_csv_before_any_flow_run(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "empty.csv").write_text("")
    assert analyze_and_report_main(["--csv", str(tmp_path / "empty.csv"), "--outbox", str(tmp_path)]) == 2
    assert "is empty" in capsys.readouterr().err
    assert [p.name for p in tmp_path.iterdir()] == ["empty.csv"]


def test_research_and_summarize_command_prints_three_summaries(capsys: pytest.CaptureFixture[str]) -> None:
    assert research_and_summarize_main([]) == 0
    out = capsys.readouterr().out
    assert [line for line in out.splitlines() if line.endswith(":")] == [
        "technical:",
        "executive:",
        "general:",
    ]
    assert "Sources: durable-execution, agent-failure-modes, retry-policies." in out


def test_triage_command_routes_each_sample_ticket_and_a_ticket_given_on_the_command_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert triage_main(["--queue-dir", str(tmp_path)]) == 0
    assert capsys.readouterr().out.splitlines() == [
        f"T-1001 -> oncall (critical, technical, priority 1): {tmp_path / 'oncall' / 'T-1001.json'}",
        f"T-1002 -> billing (medium, billing, priority 3): {tmp_path / 'billing' / 'T-1002.json'}",
        f"T-1003 -> support (low, general, priority 5): {tmp_path / 'support' / 'T-1003.json'}",
    ]
    text = "I forgot my password and the login page says my account is locked."
    assert (
        triage_main(["--text", text, "--id", "T-7", "--customer", "cus_acme", "--queue-dir", str(tmp_path)])
        == 0
    )
    assert capsys.readouterr().out.splitlines() == [
        f"T-7 -> support (medium, account, priority 2): {tmp_path / 'support' / 'T-7.json'}"
    ]
