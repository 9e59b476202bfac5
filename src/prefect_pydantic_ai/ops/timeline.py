"""A flow run's steps as Prefect recorded them: one timeline per attempt, with each step's fate.

Step task runs are named `<kind> #<ordinal>: <model or tool name> @ <agent>` (`steps.task_run_name`); their
states say whether a step executed, was replayed from the journal (Prefect's "Cached"), was retried, failed or was
never reached.
"""

from __future__ import annotations

import itertools
from collections.abc import Collection
from datetime import UTC, datetime
from typing import Literal
from uuid import UUID

from pydantic import BaseModel, computed_field

from prefect_pydantic_ai.store.prefect_rest import UNFINISHED, ApiTaskRun, StateType
from prefect_pydantic_ai.store.step_names import parse_task_run_name, step_title

StepStatus = Literal["executed", "replayed", "retried", "failed", "crashed", "awaited", "not_reached"]
"""`crashed`: the step was running when its process died (interrupted, not failed). `awaited`: a call the attempt
stopped to wait for a human's decision on (it runs, or is denied, in a later attempt)."""


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
    asked_for: list[str] = []
    """For a model step: the tools it called, as the tool steps that followed it show (after the fact)."""

    @computed_field  # type: ignore[prop-decorator]
    @property
    def title(self) -> str:
        """The step's name in every view: `model #2: gpt-4o → detect_anomalies`, `tool #3: detect_anomalies`."""
        asked = f" → {', '.join(self.asked_for)}" if self.asked_for else ""
        return f"{step_title(self.kind, self.index, self.name)}{asked}"


def _with_asked_for(views: list[StepView]) -> list[StepView]:
    """Each model step with the tools it called: the tool steps between it and the next model step."""
    for position, view in enumerate(views):
        if view.kind == "model":
            following = []
            for later in views[position + 1 :]:
                if later.kind == "model" and later.agent == view.agent:
                    break
                if later.agent == view.agent and later.parent == view.parent:  # not a sub-agent's steps
                    following.append(later.name)
            view.asked_for = following
    return views


def _step_status(
    task_run: ApiTaskRun, attempt_crashed: bool, completed: bool, attempt_succeeded: bool
) -> StepStatus:
    state = task_run.state
    if completed and (state is None or state.type != StateType.COMPLETED):
        return "retried" if task_run.run_count > 1 else "executed"  # its last events died with the process
    if attempt_succeeded and (state is None or state.type in UNFINISHED):
        return "retried" if task_run.run_count > 1 else "executed"  # its last events are still on their way
    if state is None:
        return "crashed" if attempt_crashed else "failed"
    if state.name == "Cached":
        return "replayed"
    if state.type == StateType.COMPLETED:
        return "retried" if task_run.run_count > 1 else "executed"
    if state.type == StateType.CRASHED:
        return "crashed"
    if state.type in UNFINISHED:
        return "crashed" if attempt_crashed else "executed"
    return "failed"


def timeline(
    task_runs: list[ApiTaskRun],
    attempt: int,
    attempt_crashed: bool,
    completed: Collection[str] = (),
    *,
    succeeded: bool = False,
) -> list[StepView]:
    """The steps of one attempt of a flow run, in the order they started. `completed` names steps the run
    record says completed: a killed process may have taken the events that say so to Prefect with it.
    `succeeded`: the run record says the attempt completed (or stopped to wait for a decision), so each of its
    steps ended, even one whose last events Prefect has not recorded yet."""
    parsed = [
        (task_run, names)
        for task_run in task_runs
        if task_run.flow_run_run_count == attempt and (names := parse_task_run_name(task_run.name))
    ]
    never = datetime.max.replace(tzinfo=UTC)
    parsed.sort(key=lambda p: (p[1][1] or 0, p[0].start_time or p[0].expected_start_time or never))
    views = []
    indexes = {task_run.id: index for index, (task_run, _) in enumerate(parsed, start=1)}
    for index, (task_run, (kind, _, name, agent)) in enumerate(parsed, start=1):
        views.append(
            StepView(
                index=index,
                kind=kind,
                name=name,
                agent=agent,
                status=_step_status(task_run, attempt_crashed, task_run.name in completed, succeeded),
                attempts=task_run.run_count if task_run.state_name != "Cached" else 0,
                duration_s=task_run.total_run_time.total_seconds() if task_run.total_run_time else None,
                parent=_parent_step(task_run, indexes),
            )
        )
    return _with_asked_for(views)


def _parent_step(task_run: ApiTaskRun, indexes: dict[UUID, int]) -> int | None:
    """The index of the step task run that `task_run` ran inside (Prefect records it as a `__parents__` input)."""
    for parent in task_run.parents():
        if (index := indexes.get(parent)) is not None:
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
    return _with_asked_for(shown)


def with_steps_died_in(steps: list[StepView], titles: list[str]) -> list[StepView]:
    """A killed attempt's steps, with those its run record says it was executing (`titles`, task run names) and
    Prefect never recorded: the process died before the events that create their task runs left it. `crashed`.

    Steps are in ordinal order, so a step whose ordinal is past the last recorded one is missing."""
    shown = list(steps)
    for title in titles:
        parsed = parse_task_run_name(title)
        if parsed is None or parsed[1] is None or parsed[1] <= len(shown):
            continue
        kind, _, name, agent = parsed
        shown.append(
            StepView(
                index=len(shown) + 1,
                kind=kind,
                name=name,
                agent=agent,
                status="crashed",
                attempts=1,
                duration_s=None,
            )
        )
    return _with_asked_for(shown) if len(shown) > len(steps) else steps


def not_reached(
    earlier: list[StepView], later: list[StepView], *, crashed: bool, waited: bool = False
) -> list[StepView]:
    """Steps a later attempt ran beyond where an earlier attempt stopped: `⊘` in the earlier timeline.

    A process killed inside a step may die before Prefect records that step's task run; when the earlier
    attempt crashed, the first step it did not record is the one it was in: `crashed`. When it stopped to wait
    for a decision (`waited`), the tool calls right after its last step are the calls it waited on: `awaited`.
    """
    died_in_one = crashed and not any(e.status in ("failed", "crashed") for e in earlier)
    beyond = later[len(earlier) :]
    awaited = len(list(itertools.takewhile(lambda s: s.kind == "tool", beyond))) if waited else 0

    def status(offset: int) -> StepStatus:
        if died_in_one and offset == 1:
            return "crashed"
        return "awaited" if offset <= awaited else "not_reached"

    return [
        StepView(
            index=len(earlier) + offset,
            kind=s.kind,
            name=s.name,
            agent=s.agent,
            asked_for=s.asked_for,
            status=status(offset),
            attempts=int(died_in_one and offset == 1),
            duration_s=None,
            parent=s.parent,
        )
        for offset, s in enumerate(beyond, start=1)
    ]
