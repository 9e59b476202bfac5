"""Runs that move between machines while their step locks stay on one: said in one line before any step runs.

With `PREFECT_PYDANTIC_AI_LOCKS` unset, step locks are files on each machine. A run whose journal is shared and
whose earlier attempt another machine recorded can then be run on two machines at once, and each would take its
own lock for the same step and execute it. A warning, not a refusal: resuming a dead machine's run on another is
what a shared journal is for, and it is safe as long as no other attempt runs; refusing would block that
failover until Redis is deployed. Having read the other machine's run record is the proof that the journal is
shared, so a machine with a journal of its own is never warned.
"""

from __future__ import annotations

import contextlib
import logging

from prefect.client.schemas.objects import FlowRun

from prefect_pydantic_ai.errors import RunError
from prefect_pydantic_ai.settings import Settings
from prefect_pydantic_ai.store.records import HOST, read_record

logger = logging.getLogger("prefect_pydantic_ai")

_EARLIER_READ = 3  # earlier flow runs of a key whose records are read, newest first


async def warn_if_run_moved(flow_run: FlowRun, agent: str, key: str | None, earlier: list[str]) -> None:
    """Warn when this run's last attempt was recorded on another machine and step locks are files: on a later
    attempt of this flow run its own record says where, else the newest earlier flow run of its idempotency
    `key` that has one (`earlier`: their ids, newest first). With Redis locks nothing is read."""
    if Settings().locks != "file":
        return
    own = [str(flow_run.id)] if flow_run.run_count > 1 else []
    for flow_run_id in own + earlier[:_EARLIER_READ]:
        with contextlib.suppress(RunError):  # an unreadable record says nothing here; the run goes on
            if (found := await read_record(flow_run_id, agent, 0)) is not None:
                break
    else:
        return
    if found.host == HOST:
        return
    logger.warning(
        "Run %s last ran on %s and now runs on %s, but step locks are files on each machine: two machines running "
        "it at once can each execute a step. Machines that share a journal need shared step locks: set "
        "PREFECT_PYDANTIC_AI_LOCKS=redis://<host>:6379/0 on every one (docs/scale-out.md).",
        key or flow_run.id,
        found.host,
        HOST,
    )
