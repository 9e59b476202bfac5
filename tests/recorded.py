"""Task runs as Prefect has recorded them, read once it has caught up with the events they come from.

Prefect learns about task runs from events its client sends in the background, and the servers we start record
them in batches at least every `RECORDER_FLUSH_S` (`infra.server.RECORDER_BATCHES`): right after a run, its last
task runs may still be on their way.
"""

from __future__ import annotations

import time

import anyio
from prefect import get_client
from prefect.client.schemas.filters import FlowRunFilter
from prefect.client.schemas.objects import TaskRun

from prefect_pydantic_ai.infra.server import RECORDER_FLUSH_S

AGREE_S = RECORDER_FLUSH_S + 0.3
"""Two reads this far apart straddle one of the recorder's flushes: if they agree, it had nothing left to add."""
DEADLINE_S = 30.0


async def recorded_task_runs(flow_runs: FlowRunFilter, *, at_least: int = 0) -> list[TaskRun]:
    """The task runs of `flow_runs` once Prefect has recorded all that were sent: at once when `at_least` are
    there and each is final, otherwise when two reads `AGREE_S` apart find the same task runs in the same states
    (and at least `at_least` of them). A test that knows how many steps ran says so, and reads without waiting."""
    deadline = time.monotonic() + DEADLINE_S
    seen: tuple[list[TaskRun], float] | None = None
    async with get_client() as client:
        while True:
            runs = await client.read_task_runs(flow_run_filter=flow_runs)
            now = time.monotonic()
            enough = len(runs) >= at_least
            if enough and at_least and all(t.state is not None and t.state.is_final() for t in runs):
                return runs
            if seen is None or _states(seen[0]) != _states(runs):
                seen = (runs, now)
            elif enough and now - seen[1] >= AGREE_S:
                return runs
            if now > deadline:
                raise AssertionError(
                    f"Prefect recorded {len(runs)} task runs (at least {at_least} expected) within {DEADLINE_S:g}s:"
                    f" {sorted((t.name, str(t.state_name)) for t in runs)}"
                )
            await anyio.sleep(0.2)


def _states(runs: list[TaskRun]) -> set[tuple[str, str | None]]:
    return {(str(t.id), t.state_name) for t in runs}
