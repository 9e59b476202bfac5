"""Where journal entries live when Prefect's result storage is the local disk: the same files, written faster
and atomically.

Prefect's `LocalFileSystem` resolves its base path on every call and moves each read and write through anyio's
worker threads (a write is four thread round trips: ~0.5 ms here, against ~0.07 ms for the write itself). A step
writes one small entry, so `JournalFileSystem` does small reads and writes directly and writes atomically
(temporary file + rename): a process killed mid-write leaves the previous state, never a torn entry. It is used
only in place of a plain `LocalFileSystem`; any other result storage (S3, GCS, a saved block) is left as it is.
"""

from __future__ import annotations

import os
import threading
from pathlib import Path
from typing import Any

import anyio.to_thread
from prefect.context import AsyncClientContext
from prefect.filesystems import LocalFileSystem
from prefect.results import aget_default_result_storage

from prefect_pydantic_ai.compat.prefect import ResolvesPaths
from prefect_pydantic_ai.errors import StorageReadError

_INLINE_BYTES = 256 * 1024
"""Entries up to this size are read and written on the event loop; larger ones in a worker thread."""


class JournalFileSystem(ResolvesPaths, LocalFileSystem):
    """A `LocalFileSystem` for journal entries: inline I/O for small files, atomic writes, base path resolved once."""

    _block_type_name = "Prefect Pydantic AI Journal"

    def resolve_path(self, path: str) -> Path:
        base = self._base()
        if not path:
            return base
        if "/" not in path and "\\" not in path and path not in (".", ".."):
            return base / path  # a plain entry name (a step key) cannot leave the base path
        candidate = Path(path)
        if not candidate.is_absolute() and not any(p == ".." or p.startswith("~") for p in candidate.parts):
            return base / candidate  # a relative path below the base (a run record's): no resolving needed
        if candidate.parent == base and candidate.name not in (".", ".."):
            return candidate  # an entry's full path, as Prefect passes it back
        return super().resolve_path(path)

    def root(self) -> Path:
        """The directory every entry lives under."""
        return self._base()

    def entry_path(self, key: str) -> Path:
        """The file of the journal entry stored under `key`."""
        return self.resolve_path(key)

    def _base(self) -> Path:
        base: Path | None = self.__dict__.get("_resolved_base")
        if base is None:
            base = Path(self.basepath).expanduser().resolve() if self.basepath else Path(".").resolve()
            self.__dict__["_resolved_base"] = base
        return base

    async def aread_path(self, path: str) -> bytes:
        target = self.resolve_path(path)
        try:
            if target.stat().st_size <= _INLINE_BYTES:
                return target.read_bytes()
            return await anyio.to_thread.run_sync(target.read_bytes)
        except (FileNotFoundError, IsADirectoryError):
            raise ValueError(f"Path {target} does not exist or is not a file.") from None

    def append_path(self, path: str, content: bytes) -> None:
        """Append `content` to the file at `path` (created with its directories if needed), in one write."""
        fd = _open_creating(self.resolve_path(path), os.O_WRONLY | os.O_CREAT | os.O_APPEND)
        try:
            os.write(fd, content)
        finally:
            os.close(fd)

    async def awrite_path(self, path: str, content: bytes) -> str:
        target = self.resolve_path(path)
        if len(content) <= _INLINE_BYTES:
            _write_atomically(target, content)
        else:
            await anyio.to_thread.run_sync(_write_atomically, target, content)
        return str(target)


def _open_creating(path: Path, flags: int) -> int:
    """`os.open(path, flags)` with the usual permissions, creating the missing directories on the way."""
    try:
        return os.open(path, flags, 0o666)
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True)
        return os.open(path, flags, 0o666)


def _write_atomically(target: Path, content: bytes) -> None:
    """Write `content` to a temporary file beside `target` (one per process and thread, so no two writers share
    it; created with the usual permissions), then rename it over `target`. A failed write (a full disk) removes
    the temporary file and leaves `target` as it was; its `OSError` names `target`."""
    temporary = target.with_name(f".{target.name}.{os.getpid()}.{threading.get_ident()}.tmp")
    fd = _open_creating(temporary, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(content)
        os.replace(temporary, target)
    except BaseException as exc:
        temporary.unlink(missing_ok=True)
        if isinstance(exc, OSError) and exc.filename is None:  # a full disk's ENOSPC names no file: name it
            raise OSError(exc.errno, exc.strerror, str(target)) from exc
        raise


_journals: dict[str, JournalFileSystem] = {}


async def default_result_storage() -> Any:
    """Prefect's default result storage (`aget_default_result_storage()`), asked for inside a Prefect client
    context: prefect 3.9 asks the server for its default storage block with a client it never closes, unless a
    context lends it one (which closes when the context ends), so outside a flow run every call would leave a
    connection to the garbage collector."""
    async with AsyncClientContext.get_or_create():
        return await aget_default_result_storage()


async def journal_storage(effective: object) -> JournalFileSystem | None:
    """A `JournalFileSystem` to use in place of `effective` (the result storage step tasks would get, `None` for
    Prefect's default) when that is a plain local directory; `None` when it is anything else."""
    if effective is None:
        effective = await default_result_storage()
    if isinstance(effective, Path):
        base = str(effective)
    elif type(effective) is LocalFileSystem:
        base = str(effective.basepath or ".")
    else:
        return None
    journal = _journals.get(base)
    if journal is None:
        journal = _journals[base] = JournalFileSystem(basepath=base)
    return journal


async def read_if_present(storage: Any, path: str) -> bytes | None:
    """The bytes stored at `path` in a result storage block, or `None` when nothing is stored there.

    This is the one place that tells "absent" from "unreadable": any other failure of the read (credentials,
    network, permissions, a storage that is down) raises `StorageReadError` naming the storage, the path and the
    cause, so that a caller deciding on what is stored never takes an outage for "nothing there"."""
    try:
        if isinstance(storage, JournalFileSystem):  # the common case: one read, no thread hop
            return storage.entry_path(path).read_bytes()
        reader = getattr(storage, "aread_path", None)
        return bytes(await (reader(path) if reader is not None else storage.read_path(path)))
    except Exception as exc:
        if _is_absent(exc):
            return None
        raise StorageReadError(
            f"Cannot read {path!r} from the result storage {describe_storage(storage)}: {describe_cause(exc)}"
        ) from exc


def describe_cause(exc: BaseException) -> str:
    """A storage error as one line, `Type: message` without a closing period (the caller's sentence goes on);
    a transfer's "Max Retries Exceeded" (s3transfer) says what its last try met."""
    text = f"{type(exc).__name__}: {str(exc).rstrip('.')}"
    last = getattr(exc, "last_exception", None)
    return f"{text} ({describe_cause(last)})" if isinstance(last, BaseException) else text


def describe_storage(storage: Any) -> str:
    """A storage block as a reader recognises it: its type and where it points (`S3Bucket('journal')`)."""
    where = next(
        (
            getattr(storage, name)
            for name in ("bucket_name", "bucket", "basepath", "container_name")
            if getattr(storage, name, None)
        ),
        None,
    )
    return f"{type(storage).__name__}({str(where)!r})" if where else type(storage).__name__


_NOT_FOUND_CODES = frozenset({"404", "NoSuchKey", "NotFound", "ResourceNotFound", "BlobNotFound"})


def _is_absent(exc: BaseException) -> bool:
    """Whether a storage's error means "nothing at that path", in the forms the common storages raise it: a
    missing file (local, fsspec), Prefect's `LocalFileSystem` "does not exist", a 404 or `NoSuchKey` (S3, GCS,
    Azure), anywhere in the chain of causes."""
    seen: set[int] = set()
    error: BaseException | None = exc
    while error is not None and id(error) not in seen:
        seen.add(id(error))
        if isinstance(error, FileNotFoundError):
            return True
        if isinstance(error, ValueError) and "does not exist" in str(error):
            return True
        response = getattr(error, "response", None)
        code = response.get("Error", {}).get("Code") if isinstance(response, dict) else None
        status = getattr(error, "status_code", None) or getattr(error, "code", None)
        if str(code) in _NOT_FOUND_CODES or str(status) in _NOT_FOUND_CODES:
            return True
        error = error.__cause__ or error.__context__
    return False
