"""Retention: remove the journal entries, step markers, run records and progress logs of old finished runs.

A run is collected when it ended before the cutoff and completed. A failed, crashed, cancelled or paused run can
still be resumed, so it is kept unless `include_unfinished`; a running or scheduled one is never touched, and a
run Prefect still shows running whose process on this host is gone is settled as crashed first. Runs of one
idempotency key share their journal, so a key is collected only when every flow run of it is; once the key's
newest flow run completed, its earlier flow runs (failed, or killed and never resumed themselves) are finished
too: resuming one would only return the completed result, so they go with the key. The Prefect flow runs
themselves stay (Prefect keeps or removes them by its own settings); a collected run can no longer be resumed,
forked or exported, and calling its key again runs it anew.

What a run's journal holds is read from its run records (the steps each attempt indexed when it ended) and, for
an attempt that was killed and so never ended, from its progress log (the key of each step it started). Only a
local directory has progress logs: in S3 a killed attempt's entries are found only when a later attempt of the
run replayed them.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from datetime import datetime

from prefect_pydantic_ai.ops.runs import state_of
from prefect_pydantic_ai.store.crashes import settle_if_dead
from prefect_pydantic_ai.store.prefect_rest import TAG, ApiFlowRun, PrefectApi, prefect_api, tag_values
from prefect_pydantic_ai.store.records import RunRecord, StepMark, result_storage
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
        old = [await settle_if_dead(api, run) for run in old]
        verdicts = await _verdicts(api, old, before, include_unfinished)
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


async def _verdicts(
    api: PrefectApi, old: list[ApiFlowRun], before: datetime, include_unfinished: bool
) -> dict[str, str | None]:
    """Why each of `old` is kept (None: it is collected), judging the runs of one idempotency key together."""
    verdicts = {str(run.id): _verdict(run, before, include_unfinished) for run in old}
    by_key: dict[str, list[str]] = {}
    for run in old:
        if key := next(iter(tag_values(run, "key:")), None):
            by_key.setdefault(key, []).append(str(run.id))
    for key, run_ids in by_key.items():
        every = await api.flow_runs({"tags": {"all_": [TAG, f"key:{key}"]}}, "START_TIME_ASC", 1000)
        every = [await settle_if_dead(api, run) for run in every]
        superseded = bool(every) and state_of(every[-1]) == "completed"
        judged = ((run, _verdict(run, before, include_unfinished, superseded)) for run in every)
        kept = next(((run, why) for run, why in judged if why is not None), None)
        for run_id in run_ids:
            if kept is None or str(kept[0].id) == run_id:
                verdicts[run_id] = kept[1] if kept is not None else None
            else:
                verdicts[run_id] = f"its key {key!r} has run {kept[0].id}, which is kept: {kept[1]}"
    return verdicts


def _verdict(
    run: ApiFlowRun, before: datetime, include_unfinished: bool, superseded: bool = False
) -> str | None:
    """Why `run` is kept (None: it is collected); `superseded`: a later flow run of its key completed it."""
    state = state_of(run)
    ended = run.end_time or run.start_time
    if state not in ("completed", *_UNFINISHED):
        return f"it is {state}"
    if ended is None or ended >= before:
        return "it ended after the cutoff"
    if state in _UNFINISHED and not (include_unfinished or superseded):
        return f"it is {state} and can be resumed (pass --include-unfinished to remove it)"
    return None


async def _files_of(retention: Retention, run_id: str) -> list[StoredFile]:
    """The run's records and progress logs, and the journal entries and markers of every step they index or
    (an attempt that never ended) say it started."""
    files = await retention.under(f"prefect-pydantic-ai/runs/{run_id}")
    keys: set[str] = set()
    for file in files:
        data = await retention.read(file.path)
        if file.path.endswith(".progress.jsonl"):
            keys.update(_started_keys(data))
        elif file.path.endswith(".json"):
            record = RunRecord.model_validate_json(data)
            keys.update(step.key for attempt in record.attempts for step in attempt.steps)
    for key in sorted(keys):
        files += await retention.entry(key)
    return files


def _started_keys(progress: bytes) -> set[str]:
    """The keys of the steps a progress log says were started (a line torn by a kill is skipped)."""
    keys: set[str] = set()
    for line in progress.splitlines():
        if b'"started":"' in line:
            with contextlib.suppress(ValueError):
                keys.add(StepMark.model_validate_json(line).started or "")
    return keys - {""}
