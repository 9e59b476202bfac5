"""Forking a run: a new run that replays another run's steps before a chosen step, and runs live from there.

The fork is a new flow run of the same agent (or the same user flow) with the same inputs. Its steps numbered
below `at` are answered from the original's journal, paying for none (the ledger counts them saved); from step
`at` on it runs live, with another model, another prompt, or the tool step `at` returning an edited result.
The fork's run record names the original and the step (`show` says so), and its flow run is tagged
`forked-from:<id>` in the Prefect UI.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

from prefect import Flow
from pydantic_ai.models import KnownModelName, Model

from prefect_pydantic_ai.durable.capability import durability_of
from prefect_pydantic_ai.durable.fork import NO_RESULT, ForkSource, fork_of
from prefect_pydantic_ai.durable.report import ledger_of
from prefect_pydantic_ai.errors import RunError
from prefect_pydantic_ai.infra.server import ensure_api
from prefect_pydantic_ai.ledger import Ledger
from prefect_pydantic_ai.ops.resume import recorded_entrypoint, records_of
from prefect_pydantic_ai.ops.runs import resolve_run, state_of
from prefect_pydantic_ai.store.prefect_rest import prefect_api


@dataclass(frozen=True)
class Forked:
    """What `fork_run` returns: the fork's flow run, what it was forked from, and how it ended."""

    run_id: str
    forked_from: str
    at: int
    replayed: int
    """Steps the original's journal answered (paid for by the original, not by the fork)."""
    output: Any
    ledger: Ledger | None


async def fork_run(
    ref: str,
    *,
    at: int,
    prompt: str | None = None,
    model: Model | KnownModelName | str | None = None,
    tool_result: Any = NO_RESULT,
    entrypoint: str | None = None,
) -> Forked:
    """Start a new run that replays run `ref`'s steps numbered below `at` from its journal and runs live from
    step `at` (with `model` instead of the agent's, `prompt` instead of the original prompt, and the tool step
    `at` returning the JSON value `tool_result` instead of running). Works for a completed, failed or crashed
    run, of a bare agent or of a `@flow` (its own parameters: no `prompt` or `model`).

    `ref` is a flow run id, unique prefix or idempotency key; `entrypoint` (`module:attribute`) names the agent
    or flow when the recorded one cannot be imported here. A request it cannot fork raises `RunError` with one
    line naming what to change; a failure of the fork itself is raised as the agent raised it."""
    ensure_api()  # no server configured: the persistent local one the runs were recorded in
    if at < 1:
        raise RunError(f"--at {at} is not a step number: steps are numbered from 1, as `show` numbers them.")
    async with prefect_api() as api:
        flow_run = await resolve_run(api, ref)
    if state_of(flow_run) == "running":
        raise RunError(f"Run {flow_run.id} is still running; fork it once it has ended.")
    records = await records_of(flow_run)
    first = records[0]
    _check_step([step for r in records if r.attempts for step in r.attempts[-1].steps], at, tool_result)
    target, obj = recorded_entrypoint(flow_run, first, entrypoint)
    source = ForkSource(
        flow_run_id=str(flow_run.id),
        run_key=f"key:{first.idempotency_key}" if first.idempotency_key else f"flow:{flow_run.id}",
        at=at,
        prompt=(prompt, first.prompt) if prompt is not None and first.prompt is not None else None,
        tool_result=tool_result,
    )
    result: Any
    if first.entrypoint_kind == "flow" or isinstance(obj, Flow):
        if not isinstance(obj, Flow):
            raise RunError(
                f"{target} is not a Prefect flow; pass --entrypoint of the @flow that ran the agents."
            )
        if prompt is not None or model is not None:
            raise RunError(
                f"Run {flow_run.id} ran in the flow {target}: its agents' prompts and models are the flow's own, "
                "so --prompt and --model do not apply; fork it with --at (and --tool-result) alone."
            )
        with fork_of(source):
            if obj.isasync:
                result = await obj(**flow_run.parameters)
            else:  # a synchronous flow runs its own event loops; the thread inherits the fork's context
                result = await asyncio.to_thread(obj, **flow_run.parameters)
        output = result
    else:
        durability = durability_of(obj)
        if durability is None:
            raise RunError(
                f"{target} is not a PrefectAgent or an agent with PrefectDurability; pass --entrypoint of the "
                "agent that ran."
            )
        inputs = durability.resume_inputs(str(flow_run.id), first)
        if model is not None:
            inputs["model"] = model
        with fork_of(source):
            result = await obj.run(prompt if prompt is not None else first.prompt, **inputs)
        output = result.output
    if not source.flow_runs:
        raise RunError(
            f"The fork of run {flow_run.id} started no agent run."
        )  # pragma: no cover - a flow without agents
    return Forked(
        run_id=source.flow_runs[0],
        forked_from=str(flow_run.id),
        at=at,
        replayed=source.replayed,
        output=output,
        ledger=ledger_of(result),
    )


def _check_step(steps: list[Any], at: int, tool_result: Any) -> None:
    """Refuse a `--tool-result` for a step the original recorded as a model step, and a step past its end."""
    if not steps:
        return  # an attempt that died records no steps: the fork finds out as it goes
    if at > steps[-1].ordinal + 1:
        raise RunError(
            f"--at {at} is past the run's last step (#{steps[-1].ordinal}); use a step `show` lists."
        )
    kinds = {step.ordinal: step.kind for step in steps}
    if tool_result is not NO_RESULT and kinds.get(at) != "tool":
        raise RunError(
            f"--tool-result edits a tool step, and step #{at} is {'a model step' if at in kinds else 'not recorded'}; "
            "use --at with a tool step's number (`show` lists them)."
        )
