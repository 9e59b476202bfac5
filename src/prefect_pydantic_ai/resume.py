"""Resuming a run: the same flow run executed again in place (run count + 1), replaying what completed."""

from __future__ import annotations

import asyncio
from typing import Any, Literal
from uuid import UUID

from prefect import Flow, get_client
from prefect.client.schemas.objects import FlowRun
from prefect.flow_engine import run_flow_async, run_flow_sync
from prefect.states import AwaitingRetry

from .capability import durability_of
from .crashes import crash_unfinished_task_runs
from .errors import RunError
from .records import load_entrypoint, read_records, record_storage_name, tag_values
from .runs import resolve_run, state_of
from .tool_step import unverified_override


async def resume_run(
    ref: str, *, entrypoint: str | None = None, unverified: Literal["rerun", "tell_model"] | None = None
) -> Any:
    """Run the same flow run again (run count + 1): completed steps replay, the rest executes.

    `unverified` decides, for this attempt, what happens to calls of non-idempotent tools that an earlier
    attempt started and never finished (see `TaskConfig.on_unverified`): call them again, or tell the model.
    """
    token = unverified_override.set(unverified)
    try:
        return await _resume(ref, entrypoint)
    finally:
        unverified_override.reset(token)


async def _resume(ref: str, entrypoint: str | None) -> Any:
    flow_run = await resolve_run(ref)
    records = await read_records(str(flow_run.id), tag_values(flow_run, "agent:"))
    if not records:
        raise RunError(
            f"Run {flow_run.id} has no run record in this machine's result storage ({await record_storage_name()}), "
            "so its journal is not visible here: point this machine at the storage its runs share "
            "(PREFECT_DEFAULT_RESULT_STORAGE_BLOCK=<block type>/<name>, see docs/scale-out.md) and resume again."
        )
    if state_of(flow_run) == "running":
        raise RunError(
            f"Run {flow_run.id} is still running (its process is alive); wait for it or stop it before resuming."
        )
    first = records[0]
    target = entrypoint or first.entrypoint
    if target is None:
        raise RunError(
            f"Run {flow_run.id} recorded no import path for its {first.entrypoint_kind} (it was defined inside a "
            "function or a notebook). Pass --entrypoint module:attribute."
        )
    obj = load_entrypoint(target)
    if first.entrypoint_kind == "flow" or isinstance(obj, Flow):
        if not isinstance(obj, Flow):
            raise RunError(
                f"{target} is not a Prefect flow; pass --entrypoint of the @flow that ran the agents."
            )
        flow_run = await _awaiting_retry(flow_run.id)
        if obj.isasync:
            return await run_flow_async(obj, flow_run=flow_run, parameters=flow_run.parameters)
        # A synchronous flow runs its own event loops (`run_sync`), so it cannot run on this one.
        return await asyncio.to_thread(run_flow_sync, obj, flow_run=flow_run, parameters=flow_run.parameters)
    durability = durability_of(obj)
    if durability is None:
        raise RunError(
            f"{target} is not a PrefectAgent or an agent with PrefectDurability; pass --entrypoint of the "
            "agent that ran."
        )
    inputs = durability.resume_inputs(str(flow_run.id), first)  # may refuse: before the run's state changes
    return await durability.resume_flow_run(obj, await _awaiting_retry(flow_run.id), first, inputs)


async def _awaiting_retry(flow_run_id: UUID) -> FlowRun:
    """Put the flow run back in line for another attempt, as Prefect's own retries do; the steps its last attempt
    left unfinished are settled as Crashed first, so none of them stays Running."""
    async with get_client() as client:
        await crash_unfinished_task_runs(client, flow_run_id, "Its attempt ended before this step finished.")
        await client.set_flow_run_state(flow_run_id, AwaitingRetry(), force=True)
        return await client.read_flow_run(flow_run_id)
