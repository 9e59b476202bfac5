"""Retention: remove the journal entries, step markers, run records and progress logs of old finished runs.

A run is collected when it ended before the cutoff and completed; a failed, crashed, cancelled or paused run can
still be resumed, so it is kept unless `include_unfinished`; a running or scheduled one is never touched. Runs of
one idempotency key share their journal, so a key is collected only when every flow run of it is. The Prefect
flow runs themselves stay (Prefect keeps or removes them by its own settings); a collected run can no longer be
resumed, forked or exported, and calling its key again runs it anew.

What a run's journal holds is read from its run records: the steps each attempt indexed when it ended. An attempt
whose process was killed indexes none; its entries stay until a resume of it ends.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime

from prefect_pydantic_ai.ops.runs import state_of
from prefect_pydantic_ai.store.prefect_rest import TAG, ApiFlowRun, prefect_api, tag_values
from prefect_pydantic_ai.store.records import RunRecord, result_storage
from prefect_pydantic_ai.store.retention import Retention, StoredFile

_UNFINISHED = ("failed", "crashed", "cancelled", "paused")
"""States of a run that can still be resumed: kept unless asked."""


@dataclass
class Collected:
    """What `collect_garbage` removed (or, with `dry_run`, would remove) and what it kept."""

    before: datetime
    dry_run: bool
    runs: list[str] = field(default_factory=list)
    files: int = 0
    bytes: int = 0
    kept: dict[str, str] = field(default_factory=dict)
    """Run id -> why it was kept although it is older than the cutoff."""


async def collect_garbage(
    before: datetime, *, dry_run: bool = False, include_unfinished: bool = False, agent: str | None = None
) -> Collected:
    """Remove what the runs (of `agent`, if given) that ended before `before` left in the result storage."""
    report = Collected(before=before, dry_run=dry_run)
    tags = [TAG, *([f"agent:{agent}"] if agent else [])]
    async with prefect_api() as api:
        old = await api.flow_runs(
            {"tags": {"all_": tags}, "start_time": {"before_": before.isoformat()}}, "START_TIME_ASC", 100_000
        )
        verdicts = {str(run.id): _verdict(run, before, include_unfinished) for run in old}
        for run in old:
            if verdicts[str(run.id)] is None and (key := next(iter(tag_values(run, "key:")), None)):
                for other in await api.flow_runs(
                    {"tags": {"all_": [TAG, f"key:{key}"]}}, "START_TIME_ASC", 1000
                ):
                    why = verdicts.get(str(other.id)) or _verdict(other, before, include_unfinished)
                    if why is not None:
                        verdicts[str(run.id)] = f"its key {key!r} has run {other.id}, which is kept: {why}"
                        break
    retention = Retention(await result_storage())
    for run in old:
        run_id = str(run.id)
        if (why := verdicts[run_id]) is not None:
            report.kept[run_id] = why
            continue
        files = await _files_of(retention, run_id)
        if not files:  # collected before (Prefect keeps the flow run), or it never wrote anything here
            continue
        report.runs.append(run_id)
        report.files += len(files)
        report.bytes += sum(f.size for f in files)
        if not dry_run:
            await retention.remove(files)
    return report


def _verdict(run: ApiFlowRun, before: datetime, include_unfinished: bool) -> str | None:
    """Why `run` is kept (None: it is collected)."""
    state = state_of(run)
    ended = run.end_time or run.start_time
    if state not in ("completed", *_UNFINISHED):
        return f"it is {state}"
    if ended is None or ended >= before:
        return "it ended after the cutoff"
    if state in _UNFINISHED and not include_unfinished:
        return f"it is {state} and can be resumed (pass --include-unfinished to remove it)"
    return None


async def _files_of(retention: Retention, run_id: str) -> list[StoredFile]:
    """The run's records and progress logs, and the journal entries and markers of every step they index."""
    files = await retention.under(f"prefect-pydantic-ai/runs/{run_id}")
    keys: set[str] = set()
    for file in files:
        if file.path.endswith(".json"):
            record = RunRecord.model_validate_json(await retention.read(file.path))
            keys.update(step.key for attempt in record.attempts for step in attempt.steps)
    for key in sorted(keys):
        files += await retention.entry(key)
    return files
