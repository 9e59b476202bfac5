"""Deciding on a waiting run: approve or deny the calls it awaits (or the budget it stopped at), from the
terminal or Python.

A run of a deployment is rescheduled by Prefect once the decision arrives (as after the Prefect UI's Resume
form); a run in `pause` mode is picked up by its waiting process; a script's run, whose process has left, is
continued in place here (the same flow run, run count + 1), like `resume`: every step before the wait replays.
So is a run in `pause` mode whose waiting process died (killed, a reboot): nobody else would pick it up.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from prefect import get_client

from prefect_pydantic_ai.durable.budget import Budget
from prefect_pydantic_ai.durable.wait import WaitSuspended, decision_values, give_decision
from prefect_pydantic_ai.errors import BudgetExceededError, RunError
from prefect_pydantic_ai.ops.resume import check_resumable_here, resume_run
from prefect_pydantic_ai.ops.runs import resolve_run
from prefect_pydantic_ai.store.crashes import gone_here
from prefect_pydantic_ai.store.prefect_rest import ApiFlowRun, prefect_api, tag_values
from prefect_pydantic_ai.store.records import read_records
from prefect_pydantic_ai.store.waits import PendingCall, waiting_for


@dataclass
class Decision:
    """What `approve_run` decided and what followed: the run's result when it was continued here (`continued`),
    the calls it awaits next when it stopped at another wait, and the line it stopped with (`stopped`) when
    it stopped at its budget (as a denied budget does)."""

    run_id: str
    calls: list[PendingCall]
    approved: list[str]
    denied: list[str]
    continued: bool = False
    output: Any = None
    awaiting: list[PendingCall] = field(default_factory=list)
    stopped: str | None = None

    def to_json(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "approved": self.approved,
            "denied": self.denied,
            "continued": self.continued,
            "awaiting": [c.model_dump(mode="json") for c in self.awaiting],
            "stopped": self.stopped,
        }


async def approve_run(
    ref: str,
    *,
    deny: list[str] | None = None,
    message: str | None = None,
    results: dict[str, str] | None = None,
    entrypoint: str | None = None,
    budget: Budget | None = None,
) -> Decision:
    """Decide on the calls run `ref` (id, id prefix or idempotency key) awaits: approve them all, or deny those
    in `deny` (every call when `deny` is `[]`), telling the model `message`; `results` answers external calls.
    A run waiting at its budget goes on past it for one request, or with `budget`'s limits; denied, it stops.

    Raises
    `RunError` before anything changes when the run is not waiting, a call id is unknown or the decision does
    not validate.
    """
    async with prefect_api() as api:
        flow_run = await resolve_run(api, ref)
        waiting = await waiting_for(api, flow_run)
    if waiting is None:
        state = flow_run.state.name if flow_run.state else "unknown"
        raise RunError(f"Run {flow_run.id} is not waiting for approval (its state is {state}).")
    values = decision_values(
        waiting.calls,
        deny=None if deny is None else set(deny),
        message=message,
        results=results,
        usd=budget.usd if budget else None,
        tokens=budget.tokens if budget else None,
    )
    decision = Decision(
        run_id=str(flow_run.id),
        calls=waiting.calls,
        approved=[c.call_id for n, c in enumerate(waiting.calls, 1) if values.get(f"call_{n}_approve")],
        denied=[
            c.call_id
            for n, c in enumerate(waiting.calls, 1)
            if c.kind != "external" and not values[f"call_{n}_approve"]
        ],
    )
    if flow_run.deployment_id is not None or (waiting.mode == "pause" and not await _waiter_gone(flow_run)):
        async with get_client() as client:  # the waiting process, or Prefect's scheduler, takes it from here
            response = await client.resume_flow_run(flow_run.id, run_input=values)
        if response.status.value != "ACCEPT":
            raise RunError(f"Prefect refused the decision for run {flow_run.id}: {response.details}")
        return decision
    await check_resumable_here(flow_run, entrypoint)  # a decision is stored only where it can be carried out
    await give_decision(flow_run, waiting, values)
    decision.continued = True
    try:
        result = await resume_run(str(flow_run.id), entrypoint=entrypoint)
    except WaitSuspended as again:  # a later call of the same run needs a decision too
        decision.awaiting = again.calls
        return decision
    except BudgetExceededError as stopped:  # a denied budget: the run stopped, as decided
        decision.stopped = str(stopped)
        return decision
    decision.output = getattr(result, "output", result)
    return decision


async def _waiter_gone(flow_run: ApiFlowRun) -> bool:
    """Whether the process of a run waiting in `pause` mode died on this host (its records say which it was)."""
    return gone_here(await read_records(str(flow_run.id), tag_values(flow_run, "agent:"))) is not None
