"""Agent runs as Prefect knows them: listing and finding flow runs that hold agent runs, and settling crashes.

Prefect is the system of record: a flow run tagged `prefect-pydantic-ai` holds agent runs, its state is the
run's state; a running flow run whose recorded process is gone is settled as Crashed (see `crashes`).
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any, Literal
from uuid import UUID

from pydantic import BaseModel

from prefect_pydantic_ai.errors import RunError
from prefect_pydantic_ai.ops.timeline import timeline
from prefect_pydantic_ai.store.crashes import settle_if_dead, settle_orphans
from prefect_pydantic_ai.store.prefect_rest import (
    RECALL_TAG,
    TAG,
    ApiFlowRun,
    ApiTaskRun,
    PrefectApi,
    StateType,
    prefect_api,
    tag_values,
)
from prefect_pydantic_ai.store.records import read_records
from prefect_pydantic_ai.store.waits import waiting_for

RunState = Literal["completed", "failed", "crashed", "running", "paused", "cancelled", "pending"]


class RunSummary(BaseModel):
    """One line of `runs` (the `runs --json` schema)."""

    run_id: str
    name: str
    idempotency_key: str | None
    agents: list[str]
    state: RunState
    steps_completed: int
    steps_replayed: int
    started: datetime | None
    duration_s: float | None
    run_count: int
    recall: bool = False
    """A re-call of a completed idempotency key: it returned the stored output and executed nothing."""
    awaiting: list[str] = []
    """The calls a paused run waits for a decision on, as `refund(order_id=42)` (see `approve`)."""


async def completed_keys(keys: set[str]) -> dict[str, str]:
    """Which of these idempotency keys some flow run completed: key → that flow run's id. A crashed run whose key
    a later run completed (a rerun with the same key is a new flow run that replays it) has nothing to resume."""
    if not keys:
        return {}
    async with prefect_api() as api:
        done = await api.flow_runs(
            {
                "tags": {"all_": [TAG], "any_": [f"key:{key}" for key in sorted(keys)]},
                "state": {"type": {"any_": [StateType.COMPLETED]}},
            },
            "START_TIME_DESC",
            100_000,
        )
    found: dict[str, str] = {}
    for fr in done:
        for key in set(tag_values(fr, "key:")) & keys:
            found.setdefault(key, str(fr.id))
    return found


def state_of(flow_run: ApiFlowRun) -> RunState:
    state = flow_run.state.type if flow_run.state else StateType.PENDING
    states: dict[StateType, RunState] = {
        StateType.COMPLETED: "completed",
        StateType.FAILED: "failed",
        StateType.CRASHED: "crashed",
        StateType.RUNNING: "running",
        StateType.PAUSED: "paused",
        StateType.CANCELLED: "cancelled",
        StateType.CANCELLING: "cancelled",
    }
    return states.get(state, "pending")


async def list_runs(
    *, state: str | None = None, agent: str | None = None, limit: int = 20, since: datetime | None = None
) -> list[RunSummary]:
    """Flow runs holding agent runs, newest first, with crashed runs detected and marked as such."""
    async with prefect_api() as api:
        wanted = limit if state is None else max(limit * 5, 1000)
        found = await api.flow_runs(agent_runs(agent, since), "START_TIME_DESC", wanted)
        found = [await settle_if_dead(api, fr) for fr in found]
        if state is not None:
            found = [fr for fr in found if state_of(fr) == state][:limit]
        steps_by_run = await task_runs_of(api, found)
        waits = {fr.id: await waiting_for(api, fr) for fr in found if state_of(fr) == "paused"}
        logged = {fr.id: await _logged_steps(fr) for fr in found if state_of(fr) == "crashed"}
    summaries = []
    for fr in found:
        waiting = waits.get(fr.id)
        steps = timeline(
            steps_by_run[fr.id], fr.run_count, state_of(fr) == "crashed", logged.get(fr.id, set())
        )
        summaries.append(
            RunSummary(
                run_id=str(fr.id),
                name=fr.name,
                idempotency_key=next(iter(tag_values(fr, "key:")), None),
                agents=tag_values(fr, "agent:"),
                state=state_of(fr),
                steps_completed=max(
                    sum(s.status in ("executed", "retried", "replayed") for s in steps),
                    len(logged.get(fr.id, ())),  # steps whose events died with the process
                ),
                steps_replayed=sum(s.status == "replayed" for s in steps),
                started=fr.start_time,
                duration_s=_duration(fr, steps_by_run[fr.id]),
                run_count=fr.run_count,
                recall=RECALL_TAG in fr.tags,
                awaiting=[c.describe() for c in waiting.calls] if waiting else [],
            )
        )
    return summaries


async def _logged_steps(flow_run: ApiFlowRun) -> set[str]:
    """The steps the last attempt of a crashed run completed, as its progress log says: a killed process can take
    every event of its steps with it, so Prefect may know fewer of them, or none."""
    records = await read_records(str(flow_run.id), tag_values(flow_run, "agent:"))
    return {
        title
        for r in records
        for a in r.attempts
        if a.run_count == flow_run.run_count
        for title in a.completed_steps
    }


def agent_runs(agent: str | None, since: datetime | None = None) -> dict[str, Any]:
    """The API's filter for flow runs holding agent runs (of `agent`, started since `since`)."""
    where: dict[str, Any] = {"tags": {"all_": [TAG] + ([f"agent:{agent}"] if agent else [])}}
    if since is not None:
        where["start_time"] = {"after_": since.isoformat()}
    return where


async def task_runs_of(api: PrefectApi, flow_runs: list[ApiFlowRun]) -> dict[UUID, list[ApiTaskRun]]:
    """The task runs of each flow run; those a flow run that is over left unfinished are settled on the way."""
    grouped = await api.task_runs([fr.id for fr in flow_runs])
    for fr in flow_runs:
        if await settle_orphans(api, fr, grouped[fr.id]):
            grouped[fr.id] = (await api.task_runs([fr.id]))[fr.id]
    return grouped


def _duration(flow_run: ApiFlowRun, steps: list[ApiTaskRun]) -> float | None:
    """How long the flow run ran. A crashed run is only settled when someone notices, so Prefect's own figure
    would include the time nobody was looking: it lasted until its last step's last recorded moment."""
    if state_of(flow_run) != "crashed":
        return flow_run.total_run_time.total_seconds() if flow_run.total_run_time else None
    moments = [s.start_time for s in steps if s.start_time is not None]
    moments += [  # a step settled as Crashed ended when it was settled, not when it died
        s.end_time for s in steps if s.end_time is not None and s.state_type != StateType.CRASHED
    ]
    if flow_run.start_time is None or not moments:
        return None
    return float(max(0.0, (max(moments) - flow_run.start_time).total_seconds()))


async def resolve_run(api: PrefectApi, ref: str) -> ApiFlowRun:
    """A flow run by id, unique id prefix, or idempotency key (the newest run with that key)."""
    try:
        flow_run_id = UUID(ref)
    except ValueError:
        pass
    else:
        found = await api.flow_run(flow_run_id)
        if found is None:
            raise RunError(f"No flow run with id {ref}.")
        return await settle_if_dead(api, found)
    by_key = await api.flow_runs({"tags": {"all_": [TAG, f"key:{ref}"]}}, "START_TIME_DESC", 200)
    if by_key:  # the newest run that did the work, not a re-call that returned its stored output
        worker = next((fr for fr in by_key if RECALL_TAG not in fr.tags), by_key[0])
        return await settle_if_dead(api, worker)
    if not re.fullmatch(r"[0-9a-fA-F-]{1,36}", ref):
        raise RunError(f"No agent run with idempotency key {ref!r}; see `prefect-pydantic-ai runs`.")
    tagged = await api.flow_runs({"tags": {"all_": [TAG]}}, "START_TIME_DESC", 100_000)
    candidates = [fr for fr in tagged if str(fr.id).startswith(ref.lower())]
    if not candidates:
        raise RunError(f"No agent run matches {ref!r} (not an id, id prefix or idempotency key).")
    if len(candidates) > 1:
        shown = ", ".join(str(fr.id)[:12] for fr in candidates[:5])
        raise RunError(f"Run id prefix {ref!r} is ambiguous: it matches {len(candidates)} runs ({shown}...).")
    return await settle_if_dead(api, candidates[0])
