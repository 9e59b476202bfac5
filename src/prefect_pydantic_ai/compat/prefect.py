"""Prefect's private parts: its result-record format, a saved block's name, and how `LocalFileSystem` resolves
the paths its methods take."""

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
