"""One agent run in detail: every attempt's step timeline, its output or error, and what it spent and saved."""

from __future__ import annotations

import itertools
import time
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

import anyio
from pydantic import BaseModel

from prefect_pydantic_ai.ledger import Ledger
from prefect_pydantic_ai.ops.runs import RunState, resolve_run, state_of, task_runs_of
from prefect_pydantic_ai.ops.timeline import (
    StepView,
    completed_before_the_kill,
    not_reached,
    step_tree,
    timeline,
    with_steps_died_in,
)
from prefect_pydantic_ai.store.crashes import CATCH_UP_S, EVENTS_LAG, completed_attempts
from prefect_pydantic_ai.store.prefect_rest import (
    RECALL_TAG,
    TAG,
    UNFINISHED,
    ApiFlowRun,
    ApiTaskRun,
    PrefectApi,
    prefect_api,
    tag_values,
)
from prefect_pydantic_ai.store.records import RunRecord, read_records
from prefect_pydantic_ai.store.waits import PendingCall, waiting_for


class RunDetail(BaseModel):
    """A run's full picture (the `show --json` schema)."""

    run_id: str
    name: str
    idempotency_key: str | None
    agent: str | None
    agents: list[str]
    state: RunState
    run_count: int
    steps: list[StepView]
    earlier_attempts: list[list[StepView]]
    output: Any = None
    error: str | None = None
    ledger: Ledger | None = None
    attempt_ledgers: list[Ledger] = []
    """Each attempt's ledger (all agents), in order, a killed attempt's as far as it was recorded."""
    awaiting: list[PendingCall] = []
    """For a paused run, the calls its latest attempt waits for a decision on, after its last step."""
    forked_from: str | None = None
    """For a fork: the run whose journal answered its steps before `forked_at`."""
    forked_at: int | None = None


async def _task_runs_caught_up(
    api: PrefectApi, runs: list[ApiFlowRun], flow_run: ApiFlowRun, records: list[RunRecord]
) -> dict[UUID, list[ApiTaskRun]]:
    """The task runs of `runs`, read again while Prefect is still recording those of `flow_run`'s latest attempt.

    Prefect records task runs from events its client sends in the background, a fraction of a second behind
    the run: read right after an attempt ended (as its run record says), its last steps may still be Pending,
    Running, without a state, or not recorded at all (fewer executed task runs of this attempt than the
    record's executed steps). Waiting for them (at most `CATCH_UP_S`) shows what Prefect will keep. A task run
    that does not say its attempt (run count 0: Prefect heard only of its creation) is waited for while it is
    unfinished, and not counted: a killed attempt leaves such a one, settled Crashed."""
    deadline = time.monotonic() + CATCH_UP_S
    count = max(flow_run.run_count, 1)
    latest = [a for r in records for a in r.attempts if a.run_count == count and a.state != "running"]
    just_ended = any(datetime.now(UTC) - a.finished_at < EVENTS_LAG for a in latest)
    executed = sum(not step.replayed for a in latest for step in a.steps)
    while True:
        grouped = await task_runs_of(api, runs)
        mine = [t for t in grouped[flow_run.id] if t.flow_run_run_count in (0, count)]
        in_flight = [t for t in mine if t.state is None or t.state_type in UNFINISHED]
        recorded = sum(t.state_name != "Cached" and t.flow_run_run_count == count for t in mine)
        caught_up = not in_flight and recorded >= executed
        if not just_ended or caught_up or time.monotonic() > deadline:
            return grouped
        await anyio.sleep(0.1)


async def show_run(ref: str) -> RunDetail:
    """The timeline of the latest attempt of a run (and of its earlier attempts), its output and its ledger."""
    async with prefect_api() as api:
        flow_run = await resolve_run(api, ref)
        key = next(iter(tag_values(flow_run, "key:")), None)
        runs = [flow_run]
        if key is not None:  # earlier processes of the same logical run are earlier attempts
            runs = await api.flow_runs({"tags": {"all_": [TAG, f"key:{key}"]}}, "START_TIME_ASC", 1000)
            runs = [
                fr
                for fr in runs
                if RECALL_TAG not in fr.tags
                and (
                    fr.start_time is None
                    or flow_run.start_time is None
                    or fr.start_time <= flow_run.start_time
                )
            ]
        agents = tag_values(flow_run, "agent:")
        records = await read_records(str(flow_run.id), agents)
        steps_by_run = await _task_runs_caught_up(api, runs, flow_run, records)
        waiting = await waiting_for(api, flow_run)
    ended = {a.run_count for r in records for a in r.attempts if a.state != "running"}  # not killed
    succeeded = {a.run_count for r in records for a in r.attempts if a.state in ("completed", "waiting")}
    waited = {a.run_count for r in records for a in r.attempts if a.state == "waiting"}
    completed_everywhere = completed_attempts(records)
    executing: dict[
        int, list[str]
    ] = {}  # by attempt: the steps its progress log says it was in, and completed
    completed: dict[int, set[str]] = {}
    for attempt_record in (a for r in records for a in r.attempts):
        executing.setdefault(attempt_record.run_count, []).extend(attempt_record.in_steps)
        completed.setdefault(attempt_record.run_count, set()).update(attempt_record.completed_steps)
    # each attempt's steps, whether its process died, and whether it stopped to wait for a decision
    attempts: list[tuple[list[StepView], bool, bool]] = []
    for fr in runs:
        attempts_of_run = max(fr.run_count, 1)  # a run not started yet has one (empty) attempt
        for count in range(1, attempts_of_run + 1):
            last = fr.id == flow_run.id and count == attempts_of_run
            died = state_of(fr) == "crashed" if fr.id != flow_run.id else count not in ended
            over = state_of(fr) == "crashed" or not last
            ours = fr.id == flow_run.id  # only its attempts have records here
            steps = timeline(
                steps_by_run[fr.id],
                count,
                over,
                completed.get(count, set()) if ours else (),
                succeeded=ours and count in succeeded,
            )
            if fr.id == flow_run.id and died and over:  # the steps it was killed in, recorded or not
                steps = with_steps_died_in(steps, executing.get(count, []))
            # An attempt the record says completed, yet followed by another, lost its last events with the
            # Prefect API (docs/reliability.md): like a killed one, the next attempt's replays complete it.
            lost_events = died or (ours and count in completed_everywhere)
            if steps or last or died or lost_events:  # a killed attempt, or one whose API went away, may
                # have lost every task-run event
                attempts.append((steps, lost_events and not last, fr.id == flow_run.id and count in waited))
    latest = attempts[-1][0]
    earlier = []
    for (steps, lost_events, stopped_to_wait), (following, _, _) in itertools.pairwise(attempts):
        if lost_events:
            steps = completed_before_the_kill(steps, following)
        earlier.append(steps + not_reached(steps, latest, crashed=lost_events, waited=stopped_to_wait))
    output: Any = None
    error: str | None = None
    ledger: Ledger | None = None
    by_attempt: dict[int, Ledger] = {}
    for record in records:
        for each in record.attempts:
            known = by_attempt.get(each.run_count)
            by_attempt[each.run_count] = each.ledger if known is None else known.merge(each.ledger)
    for record in records:  # the latest attempt only: an earlier attempt's error is not this one's
        latest_attempt = [a for a in record.attempts if a.run_count == flow_run.run_count]
        if latest_attempt:
            attempt = latest_attempt[-1]
            output = attempt.output if len(records) == 1 else {**(output or {}), record.agent: attempt.output}
            error = attempt.error or error
            ledger = attempt.ledger if ledger is None else ledger.merge(attempt.ledger)
    if state_of(flow_run) in ("failed", "crashed") and error is None and flow_run.state is not None:
        error = flow_run.state.message
    return RunDetail(
        run_id=str(flow_run.id),
        name=flow_run.name,
        idempotency_key=key,
        agent=agents[0] if len(agents) == 1 else None,
        agents=agents,
        state=state_of(flow_run),
        run_count=flow_run.run_count,
        steps=step_tree(latest),
        earlier_attempts=[step_tree(steps) for steps in earlier],
        output=output,
        error=error,
        ledger=ledger,
        attempt_ledgers=[by_attempt[count] for count in sorted(by_attempt)],
        awaiting=waiting.calls if waiting else [],
        forked_from=next((r.forked_from for r in records if r.forked_from), None),
        forked_at=next((r.forked_at for r in records if r.forked_from), None),
    )
