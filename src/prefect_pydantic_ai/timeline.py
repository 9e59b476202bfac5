"""A flow run's steps as Prefect recorded them: one timeline per attempt, with each step's fate.

Step task runs are named `<kind>: <model or tool name> @ <agent>`; their states say whether a step executed,
was replayed from the journal (Prefect's "Cached"), was retried, failed or was never reached.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Literal
from uuid import UUID

from prefect.client.orchestration import PrefectClient
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
from prefect.client.schemas.objects import StateType, TaskRun, TaskRunResult
from pydantic import BaseModel

StepStatus = Literal["executed", "replayed", "retried", "failed", "crashed", "not_reached"]
"""`crashed`: the step was running when its process died (interrupted, not failed)."""


class StepView(BaseModel):
    """One step in a run's timeline (the `show --json` schema)."""

    index: int
    kind: Literal["model", "tool"]
    name: str
    agent: str | None
    status: StepStatus
    attempts: int
    duration_s: float | None
    parent: int | None = None
    """For a sub-agent's step: the index of the step it ran inside (the delegating tool call)."""
    steps: list[StepView] = []
    """The sub-agent steps that ran inside this step (filled by `step_tree`)."""


def _step_kind(task_run: TaskRun) -> Literal["model", "tool"] | None:
    if task_run.name.startswith("model: "):
        return "model"
    if task_run.name.startswith("tool: "):
        return "tool"
    return None


def _step_name_and_agent(task_run: TaskRun) -> tuple[str, str | None]:
    """Step task runs are named `<kind>: <model or tool name> @ <agent>`."""
    name, _, agent = task_run.name.split(": ", 1)[1].rpartition(" @ ")
    return (name, agent) if name else (agent, None)


def _step_status(task_run: TaskRun, attempt_crashed: bool) -> StepStatus:
    state = task_run.state
    if state is None:
        return "crashed" if attempt_crashed else "failed"
    if state.name == "Cached":
        return "replayed"
    if state.type == StateType.COMPLETED:
        return "retried" if task_run.run_count > 1 else "executed"
    if state.type == StateType.CRASHED:
        return "crashed"
    if state.type in (StateType.RUNNING, StateType.PENDING, StateType.SCHEDULED):
        return "crashed" if attempt_crashed else "executed"
    return "failed"


def timeline(task_runs: list[TaskRun], attempt: int, attempt_crashed: bool) -> list[StepView]:
    """The steps of one attempt of a flow run, in the order they started."""
    steps = [t for t in task_runs if t.flow_run_run_count == attempt and _step_kind(t) is not None]
    steps.sort(key=lambda t: t.start_time or t.expected_start_time or datetime.max.replace(tzinfo=UTC))
    views = []
    indexes = {task_run.id: index for index, task_run in enumerate(steps, start=1)}
    for index, task_run in enumerate(steps, start=1):
        name, agent = _step_name_and_agent(task_run)
        views.append(
            StepView(
                index=index,
                kind=_step_kind(task_run) or "tool",
                name=name,
                agent=agent,
                status=_step_status(task_run, attempt_crashed),
                attempts=task_run.run_count if task_run.state_name != "Cached" else 0,
                duration_s=task_run.total_run_time.total_seconds() if task_run.total_run_time else None,
                parent=_parent_step(task_run, indexes),
            )
        )
    return views


def _parent_step(task_run: TaskRun, indexes: dict[UUID, int]) -> int | None:
    """The index of the step task run that `task_run` ran inside (Prefect records it as a `__parents__` input)."""
    for parent in task_run.task_inputs.get("__parents__", []):
        if isinstance(parent, TaskRunResult) and (index := indexes.get(parent.id)) is not None:
            return index
    return None


def step_tree(steps: list[StepView]) -> list[StepView]:
    """A flat timeline as a tree: each sub-agent step under the step it ran inside, in order."""
    nodes = {step.index: step.model_copy(update={"steps": []}) for step in steps}
    roots: list[StepView] = []
    for step in steps:
        node = nodes[step.index]
        parent = nodes.get(step.parent) if step.parent is not None else None
        (parent.steps if parent is not None else roots).append(node)
    return roots


def completed_before_the_kill(steps: list[StepView], following: list[StepView]) -> list[StepView]:
    """A killed attempt's steps, completed with what the next attempt proves: the steps it replayed were executed.

    Prefect learns about task runs from events sent in the background, and a process killed right after a step
    may take the last events with it: that step then shows "Running", or no task run at all. The next attempt
    replaying a step proves it completed, and in this attempt (had an earlier one completed it, this one would
    have replayed it).
    """
    shown = [
        step.model_copy(update={"status": "executed"})
        if step.status in ("failed", "crashed")
        and index < len(following)
        and following[index].status == "replayed"
        else step
        for index, step in enumerate(steps)
    ]
    for later in following[len(shown) :]:
        if later.status != "replayed":
            break
        shown.append(
            later.model_copy(
                update={"index": len(shown) + 1, "status": "executed", "attempts": 1, "duration_s": None}
            )
        )
    return shown


def not_reached(earlier: list[StepView], later: list[StepView], *, crashed: bool) -> list[StepView]:
    """Steps a later attempt ran beyond where an earlier attempt stopped: `⊘` in the earlier timeline.

    A process killed inside a step may die before Prefect records that step's task run; when the earlier
    attempt crashed, the first step it did not record is the one it was in: `crashed`.
    """
    died_in_one = crashed and not any(e.status in ("failed", "crashed") for e in earlier)
    return [
        StepView(
            index=len(earlier) + offset,
            kind=s.kind,
            name=s.name,
            agent=s.agent,
            status="crashed" if died_in_one and offset == 1 else "not_reached",
            attempts=int(died_in_one and offset == 1),
            duration_s=None,
            parent=s.parent,
        )
        for offset, s in enumerate(later[len(earlier) :], start=1)
    ]


async def task_runs(client: PrefectClient, flow_run_ids: list[UUID]) -> dict[UUID, list[TaskRun]]:
    grouped: dict[UUID, list[TaskRun]] = {i: [] for i in flow_run_ids}
    if not flow_run_ids:
        return grouped
    offset = 0
    while True:
        page = await client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=flow_run_ids)), limit=200, offset=offset
        )
        for task_run in page:
            if task_run.flow_run_id in grouped:
                grouped[task_run.flow_run_id].append(task_run)
        if len(page) < 200:
            return grouped
        offset += 200
