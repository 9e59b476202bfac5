"""Resuming a run: the same flow run executed again (run count + 1), replaying what completed.

A run of a deployment goes back to its work pool (Scheduled, as `prefect flow-run retry` does), so whichever
worker is alive executes it; any other run executes again here, in place.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any, Literal
from uuid import UUID

from prefect import Flow, get_client
from prefect.client.schemas.objects import FlowRun, State
from prefect.flow_engine import run_flow_async, run_flow_sync
from prefect.states import AwaitingRetry, Scheduled

from prefect_pydantic_ai.durable.budget import Budget, budget_override
from prefect_pydantic_ai.durable.capability import durability_of
from prefect_pydantic_ai.durable.tool_step import unverified_override
from prefect_pydantic_ai.durable.unreachable import unreachable_api_ends_run
from prefect_pydantic_ai.errors import RunError
from prefect_pydantic_ai.ops.runs import resolve_run, state_of
from prefect_pydantic_ai.store.crashes import crash_unfinished_task_runs
from prefect_pydantic_ai.store.prefect_rest import ApiFlowRun, prefect_api, tag_values
from prefect_pydantic_ai.store.records import RunRecord, load_entrypoint, read_records, record_storage_name


@dataclass(frozen=True)
class Rescheduled:
    """What `resume_run` returns for a run of a deployment: it is Scheduled again, for a worker of its pool."""

    flow_run_id: UUID
    deployment_id: UUID
    work_pool: str | None


async def resume_run(
    ref: str,
    *,
    entrypoint: str | None = None,
    unverified: Literal["rerun", "tell_model"] | None = None,
    budget: Budget | None = None,
) -> Any:
    """Run the same flow run again (run count + 1): completed steps replay, the rest executes.

    `unverified` decides, for this attempt, what happens to calls of non-idempotent tools that an earlier
    attempt started and never finished (see `TaskConfig.on_unverified`): call them again, or tell the model.
    `budget` raises the run's budget for this attempt (its limits replace the configured ones): a run stopped
    by `BudgetExceededError` continues from the request it stopped before.
    A run of a deployment is not executed here: it is scheduled again and `Rescheduled` is returned.
    """
    token = unverified_override.set(unverified)
    try:
        with budget_override(budget):
            return await _resume(ref, entrypoint, unverified, budget)
    finally:
        unverified_override.reset(token)


async def _resume(ref: str, entrypoint: str | None, unverified: str | None, budget: Budget | None) -> Any:
    async with prefect_api() as api:
        flow_run = await resolve_run(api, ref)
    records = await records_of(flow_run)
    if state_of(flow_run) == "running":
        latest = max(records, key=lambda r: r.started_at)
        raise RunError(
            f"Run {flow_run.id} is still running (pid {latest.pid} on {latest.host}); wait for it or stop it "
            "before resuming. A run whose machine died shows as crashed once its heartbeats stop (see "
            "`prefect-pydantic-ai install-automations`)."
        )
    if flow_run.deployment_id is not None:
        if unverified is not None or entrypoint is not None or budget is not None:
            raise RunError(
                f"Run {flow_run.id} belongs to a deployment: a worker of its pool resumes it with the deployment's "
                "code and settings, so --unverified, --entrypoint and --budget do not apply (set them in the code)."
            )
        await _back_in_line(flow_run.id, Scheduled(message="Resumed by prefect-pydantic-ai"))
        return Rescheduled(flow_run.id, flow_run.deployment_id, flow_run.work_pool_name)
    first = records[0]
    target, obj = recorded_entrypoint(flow_run, first, entrypoint)
    if first.entrypoint_kind == "flow" or isinstance(obj, Flow):
        if not isinstance(obj, Flow):
            raise RunError(
                f"{target} is not a Prefect flow; pass --entrypoint of the @flow that ran the agents."
            )
        again = await _back_in_line(flow_run.id, AwaitingRetry())
        with unreachable_api_ends_run(lambda: flow_run.id, first.idempotency_key):
            if obj.isasync:
                return await run_flow_async(obj, flow_run=again, parameters=again.parameters)
            # A synchronous flow runs its own event loops (`run_sync`), so it cannot run on this one.
            return await asyncio.to_thread(run_flow_sync, obj, flow_run=again, parameters=again.parameters)
    durability = durability_of(obj)
    if durability is None:
        raise RunError(
            f"{target} is not a PrefectAgent or an agent with PrefectDurability; pass --entrypoint of the "
            "agent that ran."
        )
    inputs = durability.resume_inputs(str(flow_run.id), first)  # may refuse: before the run's state changes
    return await durability.resume_flow_run(
        obj, await _back_in_line(flow_run.id, AwaitingRetry()), first, inputs
    )


def recorded_entrypoint(flow_run: ApiFlowRun, first: RunRecord, entrypoint: str | None) -> tuple[str, Any]:
    """The import path that re-creates the run's agent or flow (`entrypoint`, else the recorded one) and the
    object it names; `RunError` when there is none or it cannot be imported here."""
    target = entrypoint or first.entrypoint
    if target is None:
        raise RunError(
            f"Run {flow_run.id} recorded no import path for its {first.entrypoint_kind} (it was defined inside a "
            "function or a notebook). Pass --entrypoint module:attribute."
        )
    return target, load_entrypoint(target)


async def check_resumable_here(flow_run: ApiFlowRun, entrypoint: str | None) -> None:
    """Raise the `RunError` that resuming `flow_run` in this process would raise for want of its run record or
    its code, before anything about the run changes."""
    recorded_entrypoint(flow_run, (await records_of(flow_run))[0], entrypoint)


async def records_of(flow_run: ApiFlowRun) -> list[RunRecord]:
    """The run records of `flow_run`'s agent runs; `RunError` when this machine's storage holds none."""
    records = await read_records(str(flow_run.id), tag_values(flow_run, "agent:"))
    if not records:
        raise RunError(
            f"Run {flow_run.id} has no run record in this machine's result storage ({await record_storage_name()}), "
            "so its journal is not visible here: point this machine at the storage its runs share "
            "(PREFECT_DEFAULT_RESULT_STORAGE_BLOCK=<block type>/<name>, see docs/scale-out.md) and resume again."
        )
    return records


async def _back_in_line(flow_run_id: UUID, state: State[Any]) -> FlowRun:
    """Put the flow run back in line for another attempt, as Prefect's own retries do (`AwaitingRetry` to run it
    here, `Scheduled` for a worker); the steps its last attempt left unfinished are settled as Crashed first, so
    none of them stays Running."""
    async with prefect_api() as api:
        await crash_unfinished_task_runs(api, flow_run_id, "Its attempt ended before this step finished.")
    async with get_client() as client:
        await client.set_flow_run_state(flow_run_id, state, force=True)
        return await client.read_flow_run(flow_run_id)
