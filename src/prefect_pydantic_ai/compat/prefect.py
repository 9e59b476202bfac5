"""Prefect's private parts: its result-record format, a saved block's name, how `LocalFileSystem` resolves the
paths its methods take, and how often its events worker tries to send an event."""

from __future__ import annotations

from datetime import datetime
from pathlib import Path
from typing import Any, cast

from prefect._internal.result_records import ResultRecord
from prefect.filesystems import LocalFileSystem


def read_result_record(content: bytes) -> tuple[Any, datetime | None]:
    """The value and the expiration (`None`: never) of a result record as Prefect's result store writes it.

    `ResultStore.aread` reads the same through the storage block's worker threads; a replayed step reads its
    entry's bytes itself (one file read) and only needs them parsed, by Prefect's own class."""
    record: ResultRecord[Any] = ResultRecord.deserialize(content)
    return record.result, record.expiration


def saved_block_name(block: object) -> str | None:
    """The name a block was saved (or loaded) under, `None` for a block built in code: Prefect keeps it privately."""
    name = getattr(block, "_block_document_name", None)
    return name if isinstance(name, str) else None


class ResolvesPaths:
    """A mixin for a `LocalFileSystem` subclass (listed before it): every path its inherited methods take goes
    through `resolve_path`, which a subclass overrides (Prefect's methods call their private `_resolve_path`)."""

    def resolve_path(self, path: str) -> Path:
        """Prefect's own resolution: `path` under the base path, refusing one that leaves it (`ValueError`)."""
        return Path(LocalFileSystem._resolve_path(cast(LocalFileSystem, self), path))

    def _resolve_path(self, path: str) -> Path:
        return self.resolve_path(path)


def send_each_event_once() -> int:
    """Make the events workers of this process try each task-run event once instead of 11 times; how many.

    Prefect's events client reconnects up to 10 times per event (about 7 s when the API refuses connections), one
    event after another, and its worker sends every queued event before the process exits: once the API is
    known to be gone, a process that ran steps meanwhile (3 events a step) would wait ~7 s per event to exit. An
    event that fails stays among the client's unconfirmed events, sent again if it reconnects later. Prefect keeps
    its services and the client's attempts privately (`_QueueServiceBase._instances`, `_reconnection_attempts`).
    """
    from prefect._internal.concurrency.services import _QueueServiceBase
    from prefect.events.worker import EventsWorker

    services: dict[int, object] = vars(_QueueServiceBase)["_instances"]  # every service, of every class
    with _QueueServiceBase._instance_cache_lock:
        workers = [w for w in services.values() if isinstance(w, EventsWorker)]
    changed = 0
    for worker in workers:
        client = getattr(worker, "_client", None)  # set once the worker's thread has started it
        if isinstance(getattr(client, "_reconnection_attempts", None), int):
            client._reconnection_attempts = 0  # type: ignore[union-attr]
            changed += 1
    return changed
