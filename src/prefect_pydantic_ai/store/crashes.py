"""Settling crashes: a flow run whose recorded process is gone is Crashed in Prefect, and so is every task run
it left running.

A SIGKILLed process cannot report its own end, so Prefect keeps showing its flow run, and the step it was in,
as Running (and a step it completed just before, when the events saying so died with it). Whoever finds such a
run first (listing, `show`, `resume`, or a new attempt of the same idempotency key) settles it here, so Prefect's
records are true for everyone who reads them afterwards. Only a run of this host can be judged by its pid; a run
whose machine died is set Crashed by the Prefect server itself, through the heartbeat automation (`automations`,
`prefect-pydantic-ai install-automations`).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Collection, Iterable
from datetime import UTC, datetime, timedelta
from uuid import UUID

from prefect_pydantic_ai.store.file_locks import process_alive
from prefect_pydantic_ai.store.prefect_rest import (
    UNFINISHED,
    ApiFlowRun,
    ApiTaskRun,
    PrefectApi,
    StateType,
    prefect_api,
    tag_values,
)
from prefect_pydantic_ai.store.records import HOST, RunRecord, read_records

_OVER = (StateType.COMPLETED, StateType.FAILED, StateType.CRASHED, StateType.CANCELLED)


async def settle_if_dead(
    api: PrefectApi, flow_run: ApiFlowRun, *, later: list[asyncio.Task[None]] | None = None
) -> ApiFlowRun:
    """`flow_run`, marked Crashed (with its unfinished task runs) if it is running but its process on this host is
    gone; a run last recorded on another host is left to the heartbeat automation.

    The task runs are settled once Prefect has recorded them from the dead process's last events (`_recorded`).
    A caller that goes on with a new attempt passes `later`: the settle does not wait, and a task settling what
    those events create is added there, for the caller to await when its attempt ends."""
    if flow_run.state is None or flow_run.state.type != StateType.RUNNING:
        return flow_run
    records = await read_records(str(flow_run.id), tag_values(flow_run, "agent:"))
    latest = gone_here(records)
    if latest is None:
        return flow_run
    reason = f"The process running it (pid {latest.pid} on {latest.host}) is gone."
    await api.set_state("flow_runs", flow_run.id, StateType.CRASHED, "Crashed", reason)
    killed = [a for r in records for a in r.attempts if a.run_count == flow_run.run_count]
    died = max((a.last_seen for a in killed if a.last_seen is not None), default=None)
    completed = {(a.run_count, title) for r in records for a in r.attempts for title in a.completed_steps}
    finished = completed_attempts(records)
    if later is None:
        await _recorded(api, flow_run, {t for a in killed for t in (*a.in_steps, *a.completed_steps)}, died)
    else:
        later.append(asyncio.create_task(_settle_late(flow_run.id, died, reason, completed, finished)))
    await crash_unfinished_task_runs(api, flow_run.id, reason, completed, finished)
    return await api.flow_run(flow_run.id) or flow_run


async def _settle_late(
    flow_run_id: UUID,
    died: datetime | None,
    reason: str,
    completed: Collection[tuple[int, str]],
    finished: Collection[int],
) -> None:
    """Once `CATCH_UP_S` have passed since the process died, settle the task runs its last events created."""
    await asyncio.sleep(_catch_up_left(died))
    async with prefect_api() as api:
        await crash_unfinished_task_runs(api, flow_run_id, reason, completed, finished)


CATCH_UP_S = 3.0
"""How long Prefect may take to record task runs from the last events an attempt's client sent (a settle, for the
steps a killed process had started, from about when it died; `show`, for an attempt that just ended)."""


async def _recorded(
    api: PrefectApi, flow_run: ApiFlowRun, steps: Collection[str], died: datetime | None
) -> None:
    """Wait until Prefect has a task run of `flow_run`'s latest attempt (or one not started yet) for each of
    `steps` (task run names), at most until `CATCH_UP_S` after the process `died` (its last progress line).

    Prefect records a task run from events its client sends in the background: read right after the kill, the
    step the process died in may not exist yet, and a task run created after the settle from those events stays
    Running for good (a later state written by the settle would win; one that is not there yet cannot). A step
    whose events died with the process never appears: the wait ends at its bound, which counts from the death
    (counted from the settle, it cost a 201-step resume 2.85 s of its 4.2)."""
    deadline = time.monotonic() + _catch_up_left(died)
    while True:
        recorded = (await api.task_runs([flow_run.id]))[flow_run.id]
        names = {t.name for t in recorded if t.flow_run_run_count in (0, flow_run.run_count)}
        if set(steps) <= names or time.monotonic() > deadline:
            return
        await asyncio.sleep(0.1)


def _catch_up_left(died: datetime | None) -> float:
    """Seconds left until `CATCH_UP_S` after `died` (all of it when the time of death is unknown)."""
    since = (_now() - died).total_seconds() if died is not None else 0.0
    return min(CATCH_UP_S, max(0.0, CATCH_UP_S - since))


def gone_here(records: Iterable[RunRecord]) -> RunRecord | None:
    """The record of the latest attempt among `records` when its process ran on this host and is gone; None
    when it is alive, ran on another host (its pid says nothing here), or there is no record."""
    latest = max(records, key=lambda r: r.started_at, default=None)
    if latest is None or latest.host != HOST or process_alive(latest.pid):
        return None
    return latest


def completed_attempts(records: Iterable[RunRecord]) -> set[int]:
    """The attempts in which every agent run of the flow run completed, as their records say: each step task run
    of such an attempt completed, whatever Prefect recorded (the API may have gone away before the last events)."""
    per_record = [{a.run_count for a in r.attempts if a.state == "completed"} for r in records]
    return set.intersection(*per_record) if per_record else set()


async def crash_unfinished_task_runs(
    api: PrefectApi,
    flow_run_id: UUID,
    reason: str,
    completed: Collection[tuple[int, str]] = (),
    finished: Collection[int] = (),
) -> int:
    """Mark the task runs of a flow run that is not running (any more) but left them unfinished as Crashed, except
    those its run record says completed, whose last events the process took with it: those are Completed.
    `completed` names steps (attempt and task run name) from the step marks; `finished` names attempts whose
    agent run completed (the Prefect API went away before their last events reached it)."""
    orphans = (await api.task_runs([flow_run_id], states=UNFINISHED))[flow_run_id]
    await _settle(api, orphans, reason, completed, finished)
    return len(orphans)


async def settle_orphans(api: PrefectApi, flow_run: ApiFlowRun, task_runs: Iterable[ApiTaskRun]) -> int:
    """Crash the task runs a flow run left unfinished in an attempt that is over: Prefect records task runs from
    events in the background, so a killed process's last events can create one after its crash was settled.

    An attempt is over when a later one started, or when the flow run ended more than `EVENTS_LAG` seconds ago:
    until then, the last events of a run that just completed may still be on their way. A task run recorded
    from its Pending event alone has no attempt yet (`flow_run_run_count` 0): it may be the current attempt's,
    so it is only settled once the flow run ended long ago. Returns how many."""
    state = flow_run.state
    if state is None:
        return 0
    ended_long_ago = (
        state.type in _OVER and state.timestamp is not None and _now() - state.timestamp > EVENTS_LAG
    )
    orphans = [
        t
        for t in task_runs
        if t.state_type in UNFINISHED and (0 < t.flow_run_run_count < flow_run.run_count or ended_long_ago)
    ]
    await _settle(api, orphans, "Its attempt of the flow run ended before it finished.")
    return len(orphans)


EVENTS_LAG = timedelta(seconds=30)
"""How long after a flow run ends its last task-run events may still reach Prefect's records."""


def _now() -> datetime:
    return datetime.now(UTC)


async def _settle(
    api: PrefectApi,
    orphans: Iterable[ApiTaskRun],
    reason: str,
    completed: Collection[tuple[int, str]] = (),
    finished: Collection[int] = (),
) -> None:
    for task_run in orphans:
        if (
            task_run.flow_run_run_count,
            task_run.name,
        ) in completed or task_run.flow_run_run_count in finished:
            message = "It completed just before its process died, as its run record says."
            await api.set_state("task_runs", task_run.id, StateType.COMPLETED, "Completed", message)
        else:
            await api.set_state("task_runs", task_run.id, StateType.CRASHED, "Crashed", reason)
