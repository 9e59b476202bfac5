"""Waiting for a human: a durable run whose model asked for calls that need approval (or an external result)
waits at the flow level, between steps, with a typed Prefect input form for the pending calls.

Prefect cannot pause from inside a task, so the wait happens where pydantic-ai hands deferred calls to its
capabilities (`handle_deferred_tool_calls`), in the flow run itself. The wait has a key derived from the run's
journal identity and the pending call ids, so when the flow run executes again after the decision (every step
before the wait replays from the journal, so the same calls come back with the same ids), the same wait finds
the decision already given and returns it instead of waiting again. A second wait later in the same run has
other calls, hence another key. A wait whose attempt ended before anyone decided (its process was killed, or
the run was resumed while it waited) asks again, under the next key of its sequence (`<key>-2`, ...).

A run whose budget cannot cover its next model request waits the same way (`Budget(on_exceeded="approve")`),
for one decision: go on (for that request, or with new limits) or stop.

- `suspend` (the default) frees everything: the flow run becomes Suspended (a deployment's run, which Prefect
  reschedules once the input arrives) or Paused (a script's run, which `approve` continues in place), and the
  process leaves the run.
- `pause` keeps the process waiting (polling Prefect) until the decision arrives or the timeout expires.
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Awaitable, Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Literal, cast

import anyio
from prefect import get_client
from prefect.client.schemas.objects import FlowRun, State
from prefect.context import FlowRunContext, TaskRunContext
from prefect.exceptions import Pause
from prefect.input import RunInput
from prefect.input.actions import acreate_flow_run_input, aread_flow_run_input
from prefect.input.run_input import keyset_from_paused_state
from prefect.states import Paused, Suspended
from prefect.utilities.engine import propose_state
from pydantic import Field, create_model
from pydantic_ai.messages import ToolCallPart
from pydantic_ai.tools import DeferredToolRequests, DeferredToolResults, ToolDenied

from prefect_pydantic_ai.durable.errors import DurabilityConfigError
from prefect_pydantic_ai.errors import RunError
from prefect_pydantic_ai.infra.server import cli_name
from prefect_pydantic_ai.store.prefect_rest import ApiFlowRun
from prefect_pydantic_ai.store.waits import PENDING_INPUT, ApprovalMode, PendingCall, Waiting

_POLL_SECONDS = 2.0

WaitObserver = Callable[[str, list[PendingCall]], Awaitable[None]]
"""Told `(flow_run_id, calls)` when a run starts waiting for a decision (a page that shows the calls)."""

_observer: ContextVar[WaitObserver | None] = ContextVar("ppa_wait_observer", default=None)


@contextmanager
def observing_waits(observer: WaitObserver) -> Iterator[None]:
    """Runs started in this block tell `observer` each time they start waiting for a decision."""
    token = _observer.set(observer)
    try:
        yield
    finally:
        _observer.reset(token)


class AwaitingApproval(RunError):
    """The run stopped to wait for a decision on calls that need one; nothing holds it while it waits."""

    def __init__(self, flow_run_id: str, calls: list[PendingCall]) -> None:
        self.flow_run_id = flow_run_id
        self.calls = calls
        super().__init__(
            f"Run {flow_run_id} is awaiting approval: {', '.join(c.describe() for c in calls)}. Decide with "
            f"`prefect-pydantic-ai approve {flow_run_id}` (or --deny), or in the Prefect UI."
        )


class WaitSuspended(Pause):
    """The flow engine's signal that this attempt ends here (the run is suspended, not failed), carrying what
    the run waits for so the caller of a bare run can say so."""

    def __init__(self, state: State[Any], flow_run_id: str, calls: list[PendingCall]) -> None:
        super().__init__(state=state)
        self.flow_run_id = flow_run_id
        self.calls = calls


@contextmanager
def awaiting_approval_of_bare_run() -> Iterator[None]:
    """Outside any flow, a run that suspended to wait ends its caller's `run()` with `AwaitingApproval`; inside
    a flow the engine's `Pause` signal must reach the flow engine, so it passes unchanged."""
    try:
        yield
    except WaitSuspended as waiting:
        if FlowRunContext.get() is not None:
            raise
        raise AwaitingApproval(waiting.flow_run_id, waiting.calls) from None


class ApprovalTimeout(RunError):
    """Nobody decided on the pending calls of a run waiting in `pause` mode before its timeout."""


def pending_calls(requests: DeferredToolRequests) -> list[PendingCall]:
    """The calls of `requests`, in the order the model made them, with the reason a tool gave (metadata)."""

    def reason(call_id: str) -> str | None:
        meta = requests.metadata.get(call_id) or {}
        found = meta.get("reason")
        return None if found is None else str(found)

    kinds: list[tuple[Literal["approval", "external"], list[ToolCallPart]]] = [
        ("approval", requests.approvals),
        ("external", requests.calls),
    ]
    found = [
        PendingCall(
            call_id=c.tool_call_id,
            tool=c.tool_name,
            args=c.args_as_dict(),
            kind=kind,
            reason=reason(c.tool_call_id),
        )
        for kind, calls in kinds
        for c in calls
    ]
    return found


def approval_form(calls: list[PendingCall]) -> type[RunInput]:
    """The typed input form of a wait: per call, approve (or not) and a message for the model if denied; for an
    external call, its result; for a budget, go on (or stop) and new limits. Fields are flat (`call_1_approve`,
    ...) so the Prefect UI renders plain inputs."""
    fields: dict[str, Any] = {}
    for n, call in enumerate(calls, 1):
        title = call.describe()
        if call.kind == "budget":
            fields[f"call_{n}_approve"] = (
                bool,
                Field(default=True, title=f"Go on past the budget: {title}", description=call.reason),
            )
            fields[f"call_{n}_usd"] = (
                Decimal | None,
                Field(default=None, gt=0, title="New budget in dollars (empty: this request only)"),
            )
            fields[f"call_{n}_tokens"] = (
                int | None,
                Field(default=None, gt=0, title="New budget in tokens (empty: this request only)"),
            )
        elif call.kind == "approval":
            fields[f"call_{n}_approve"] = (
                bool,
                Field(
                    default=True,
                    title=f"Approve {title}",
                    description=call.reason or f"call id {call.call_id}",
                ),
            )
            fields[f"call_{n}_message"] = (
                str,
                Field(default="", title=f"Message to the model if {call.tool} is denied"),
            )
        else:
            fields[f"call_{n}_result"] = (
                str,
                Field(title=f"Result of {title}", description=call.reason or f"call id {call.call_id}"),
            )
    form = create_model("ApprovalDecision", __base__=RunInput, **fields)
    description = "**Awaiting approval**\n\n" + "\n".join(f"- `{c.describe()}`" for c in calls)
    return form.with_initial_data(description=description)


def decision_values(
    calls: list[PendingCall],
    *,
    deny: set[str] | None,
    message: str | None,
    results: dict[str, str] | None = None,
    usd: Decimal | None = None,
    tokens: int | None = None,
) -> dict[str, Any]:
    """The form values of a decision: every approval call (or budget) approved except those in `deny` (all when
    `deny` is empty), `message` told to the model for each denied call, `results` for external calls, a budget's
    new limits `usd` / `tokens`. Validated."""
    values: dict[str, Any] = {}
    known = {c.call_id for c in calls}
    unknown = sorted((set(deny or ()) | set(results or ())) - known)
    if unknown:
        raise RunError(
            f"No pending call has id {unknown[0]!r}; pending: {', '.join(c.call_id for c in calls)}."
        )
    limits = usd is not None or tokens is not None
    if limits and not any(c.kind == "budget" for c in calls):
        raise RunError(
            "A new budget answers a run waiting at its budget; this one awaits "
            f"{', '.join(c.describe() for c in calls)}."
        )
    for n, call in enumerate(calls, 1):
        denied = deny is not None and (not deny or call.call_id in deny)
        if call.kind == "budget":
            if denied and limits:
                raise RunError("A denied budget takes no new limits: deny it, or approve it with them.")
            values[f"call_{n}_approve"] = not denied
            values[f"call_{n}_usd"] = None if usd is None else str(usd)  # stored as JSON
            values[f"call_{n}_tokens"] = tokens
        elif call.kind == "approval":
            values[f"call_{n}_approve"] = not denied
            values[f"call_{n}_message"] = (message or "") if denied else ""
        elif results is not None and call.call_id in results:
            values[f"call_{n}_result"] = results[call.call_id]
    try:
        approval_form(calls).model_validate(values)
    except ValueError as exc:
        first = str(exc).splitlines()
        raise RunError(f"The decision does not fit the pending calls: {' '.join(first[:3])}") from None
    return values


def tool_results(calls: list[PendingCall], values: dict[str, Any]) -> DeferredToolResults:
    """The `DeferredToolResults` pydantic-ai continues with: approvals, denials (with their message), results."""
    results = DeferredToolResults()
    for n, call in enumerate(calls, 1):
        if call.kind == "approval":
            if values[f"call_{n}_approve"]:
                results.approvals[call.call_id] = True
            else:
                results.approvals[call.call_id] = ToolDenied(
                    values[f"call_{n}_message"] or "The call was denied."
                )
        else:
            results.calls[call.call_id] = values[f"call_{n}_result"]
    return results


def wait_key(identity: str, calls: list[PendingCall]) -> str:
    """The key of one wait: the run's journal identity and the pending call ids (stable across attempts)."""
    material = "\x1f".join([identity, *sorted(c.call_id for c in calls)])
    return "ppa-" + hashlib.sha256(material.encode()).hexdigest()[:24]


def _waiting_state(
    flow_run: FlowRun, key: str, mode: ApprovalMode, timeout: int | None, note: str
) -> State[Any]:
    """The state a wait proposes. Prefect reschedules a Suspended run, which needs a deployment to run it."""
    if mode == "suspend" and flow_run.deployment_id is not None:
        state: State[Any] = Suspended(pause_key=key)
    else:
        state = Paused(timeout_seconds=timeout if mode == "pause" else None, reschedule=False, pause_key=key)
    state.message = f"awaiting approval: {note}"
    state.state_details.run_input_keyset = cast(dict[str, str], keyset_from_paused_state(state))
    return state


async def await_decision(
    requests: DeferredToolRequests, *, identity: str, mode: ApprovalMode, timeout_seconds: int
) -> DeferredToolResults:
    """Wait at the flow level for a decision on `requests`; the decision as pydantic-ai's `DeferredToolResults`.

    Raises `WaitSuspended` (a `prefect.exceptions.Pause`) when the run is suspended (the flow engine ends this
    attempt without failing it), `ApprovalTimeout` when nobody decided within `timeout_seconds` in `pause` mode.
    """
    calls = pending_calls(requests)
    return tool_results(calls, await _decision(calls, identity, mode, timeout_seconds))


@dataclass(frozen=True)
class BudgetDecision:
    """What a person decided for a run waiting at its budget: go on or stop; with new limits (`usd`, `tokens`)
    the run's budget is raised, without them only the request it waits before may go over."""

    approved: bool
    usd: Decimal | None = None
    tokens: int | None = None


async def await_budget_decision(
    over: PendingCall, *, identity: str, mode: ApprovalMode, timeout_seconds: int
) -> BudgetDecision:
    """Wait at the flow level for a decision on `over`, a model request the run's budget cannot cover; as
    `await_decision` (the same wait, suspension and timeout)."""
    values = await _decision([over], identity, mode, timeout_seconds)
    return BudgetDecision(values["call_1_approve"], values["call_1_usd"], values["call_1_tokens"])


async def _decision(
    calls: list[PendingCall], identity: str, mode: ApprovalMode, timeout_seconds: int
) -> dict[str, Any]:
    """The values of the decision on `calls`: the one given for this wait in an earlier attempt, else waited for.

    The wait's keys are tried in order: a key that fired in an earlier attempt holds that attempt's decision,
    or none when the attempt ended before anyone decided; the first key that has not fired asks (again)."""
    flow_ctx = FlowRunContext.get()
    if TaskRunContext.get() is not None or flow_ctx is None or flow_ctx.flow_run is None:
        raise DurabilityConfigError(
            "A run inside a step (a sub-agent run in a tool) cannot wait for a decision: Prefect waits only "
            "between steps of a flow run. Give the delegating agent the tool that needs approval (or the budget) "
            "instead."
        )
    flow_run = flow_ctx.flow_run
    form = approval_form(calls)
    note = ", ".join(c.describe() for c in calls)
    base = wait_key(identity, calls)
    async with get_client() as client:
        for asked in itertools.count(1):
            key = base if asked == 1 else f"{base}-{asked}"
            proposed = _waiting_state(flow_run, key, mode, timeout_seconds, note)
            keyset = keyset_from_paused_state(proposed)
            state = await propose_state(client=client, state=proposed, flow_run_id=flow_run.id)
            if not state.is_running():
                break
            given = await aread_flow_run_input(keyset["response"], flow_run_id=flow_run.id)
            if given is not None:  # this wait happened in an earlier attempt and was decided
                return form(**given).model_dump()
        if not state.is_paused():
            raise RunError(
                f"Run {flow_run.id} cannot wait for approval: Prefect answered {state.type.value}."
            )
        await form.asave(keyset, flow_run_id=flow_run.id)
        waiting = Waiting(key=key, mode=mode, calls=calls)
        await acreate_flow_run_input(
            key=f"{PENDING_INPUT}-{key}", value=waiting.model_dump(mode="json"), flow_run_id=flow_run.id
        )
        observer = _observer.get()
        if observer is not None:
            await observer(str(flow_run.id), calls)
        if mode == "suspend":
            raise WaitSuspended(state, str(flow_run.id), calls)
        with anyio.move_on_after(timeout_seconds):
            while True:
                await anyio.sleep(_POLL_SECONDS)
                current = await client.read_flow_run(flow_run.id)
                if current.state is not None and current.state.is_running():
                    return (await form.aload(keyset, flow_run_id=flow_run.id)).model_dump()
    raise ApprovalTimeout(
        f"Run {flow_run.id} waited {timeout_seconds} s for approval of {note} and nobody decided; it failed. "
        f"Run it again to ask again."
    )


async def give_decision(flow_run: ApiFlowRun, waiting: Waiting, values: dict[str, Any]) -> None:
    """Store the decision where the waiting run reads it (the wait's input response), without changing state.

    Giving the same decision again is harmless (an `approve` whose continuation failed can be repeated); a
    different one raises `RunError`, since the run will act on the first."""
    assert flow_run.state is not None
    keyset = flow_run.state.state_details.run_input_keyset
    assert keyset is not None
    given = await aread_flow_run_input(key=keyset["response"], flow_run_id=flow_run.id)
    if given is None:
        await acreate_flow_run_input(key=keyset["response"], value=values, flow_run_id=flow_run.id)
    elif given != values:
        raise RunError(
            f"Run {flow_run.id} already has a different decision for this wait; it continues with that one "
            f"(`{cli_name()} resume {flow_run.id}`)."
        )
