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

from collections.abc import Collection
from typing import Any
from uuid import UUID

from prefect.client.orchestration import PrefectClient
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterId,
    TaskRunFilter,
    TaskRunFilterState,
    TaskRunFilterStateType,
)
from prefect.client.schemas.objects import FlowRun, State, StateType
from prefect.states import Completed, Crashed

from prefect_pydantic_ai.store.file_locks import process_alive
from prefect_pydantic_ai.store.records import HOST, read_records, tag_values

_UNFINISHED = [StateType.RUNNING, StateType.PENDING, StateType.SCHEDULED]


async def settle_if_dead(client: PrefectClient, flow_run: FlowRun) -> FlowRun:
    """`flow_run`, marked Crashed (with its unfinished task runs) if it is running but its process on this host is
    gone; a run last recorded on another host is left to the heartbeat automation."""
    if flow_run.state is None or flow_run.state.type != StateType.RUNNING:
        return flow_run
    records = await read_records(str(flow_run.id), tag_values(flow_run, "agent:"))
    if not records:
        return flow_run
    latest = max(records, key=lambda r: r.started_at)
    if latest.host != HOST or process_alive(latest.pid):
        return flow_run
    reason = f"The process running it (pid {latest.pid} on {latest.host}) is gone."
    await client.set_flow_run_state(flow_run.id, Crashed(message=reason), force=True)
    completed = {(a.run_count, title) for r in records for a in r.attempts for title in a.completed_steps}
    await crash_unfinished_task_runs(client, flow_run.id, reason, completed)
    return await client.read_flow_run(flow_run.id)


async def crash_unfinished_task_runs(
    client: PrefectClient, flow_run_id: UUID, reason: str, completed: Collection[tuple[int, str]] = ()
) -> int:
    """Mark the task runs of a flow run that is not running (any more) but left them unfinished as Crashed, except
    those its run record says completed (`completed`: attempt and task run name), whose last events the killed
    process took with it: those are Completed."""
    orphans = await client.read_task_runs(
        flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])),
        task_run_filter=TaskRunFilter(
            state=TaskRunFilterState(type=TaskRunFilterStateType(any_=_UNFINISHED))
        ),
    )
    for task_run in orphans:
        state: State[Any]
        if (task_run.flow_run_run_count, task_run.name) in completed:
            state = Completed(message="It completed just before its process died, as its run record says.")
        else:
            state = Crashed(message=reason)
        await client.set_task_run_state(task_run.id, state, force=True)
    return len(orphans)
