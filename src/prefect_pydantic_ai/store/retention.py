"""Listing and removing stored files of the journal and run records, by path, in a local directory or S3.

Prefect's storage blocks read and write paths but neither list nor delete them, so retention (`gc`) does both
here: in a local directory (`JournalFileSystem`) with the filesystem, in an `S3Bucket` block with the bucket's
own boto3 client (`credentials.get_s3_client()`), under its `bucket_folder`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio.to_thread

from prefect_pydantic_ai.errors import RunError
from prefect_pydantic_ai.store.journal_storage import JournalFileSystem, describe_storage


@dataclass(frozen=True)
class StoredFile:
    path: str
    """Relative to the storage's root, as the journal names it (`<step key>`, `prefect-pydantic-ai/runs/...`)."""
    size: int


class Retention:
    """List and remove files of one result storage (a local directory or an S3 bucket)."""

    def __init__(self, storage: Any) -> None:
        self.storage = storage
        if isinstance(storage, JournalFileSystem):
            self._root: Path | None = storage.root()
            self._s3: Any = None
        elif getattr(storage, "bucket_name", None) and hasattr(
            getattr(storage, "credentials", None), "get_s3_client"
        ):
            self._root = None
            self._s3 = storage.credentials.get_s3_client()
            self._bucket: str = storage.bucket_name
            self._folder = (getattr(storage, "bucket_folder", "") or "").strip("/")
        else:
            raise RunError(
                f"gc cannot list or remove files in the result storage {describe_storage(storage)}: it works on a "
                "local directory and on an S3Bucket block."
            )

    async def under(self, directory: str) -> list[StoredFile]:
        """Every file below `directory`."""
        return await anyio.to_thread.run_sync(self._under, directory.rstrip("/") + "/")

    async def entry(self, key: str) -> list[StoredFile]:
        """The journal entry of step `key` and its marker (`<key>.started`), those that exist."""
        return await anyio.to_thread.run_sync(self._entry, key)

    async def read(self, path: str) -> bytes:
        if self._root is not None:
            return (self._root / path).read_bytes()
        body = await anyio.to_thread.run_sync(
            lambda: self._s3.get_object(Bucket=self._bucket, Key=self._key(path))
        )
        return bytes(await anyio.to_thread.run_sync(body["Body"].read))

    async def remove(self, files: list[StoredFile]) -> None:
        await anyio.to_thread.run_sync(self._remove, files)

    def _under(self, prefix: str) -> list[StoredFile]:
        if self._root is not None:
            found = [p for p in (self._root / prefix).rglob("*") if p.is_file()]
            return [StoredFile(str(p.relative_to(self._root)), p.stat().st_size) for p in found]
        return self._listed(prefix)

    def _entry(self, key: str) -> list[StoredFile]:
        if self._root is None:
            return [f for f in self._listed(key) if f.path in (key, f"{key}.started")]
        found = []
        for path in (key, f"{key}.started"):
            try:
                found.append(StoredFile(path, (self._root / path).stat().st_size))
            except FileNotFoundError:
                continue
        return found

    def _listed(self, prefix: str) -> list[StoredFile]:
        pages = self._s3.get_paginator("list_objects_v2").paginate(
            Bucket=self._bucket, Prefix=self._key(prefix)
        )
        cut = len(self._folder) + 1 if self._folder else 0
        return [StoredFile(o["Key"][cut:], o["Size"]) for page in pages for o in page.get("Contents", [])]

    def _remove(self, files: list[StoredFile]) -> None:
        if self._root is not None:
            directories: set[Path] = set()
            for file in files:
                path = self._root / file.path
                path.unlink(missing_ok=True)
                directories.update(p for p in path.parents if self._root in p.parents)
            for directory in sorted(directories, key=lambda p: len(p.parts), reverse=True):
                if directory.is_dir() and not any(directory.iterdir()):
                    os.rmdir(directory)  # the run's directories, once empty
            return
        for start in range(0, len(files), 1000):  # S3 deletes at most 1000 keys a request
            batch = [{"Key": self._key(f.path)} for f in files[start : start + 1000]]
            self._s3.delete_objects(Bucket=self._bucket, Delete={"Objects": batch, "Quiet": True})

    def _key(self, path: str) -> str:
        return f"{self._folder}/{path}" if self._folder else path
