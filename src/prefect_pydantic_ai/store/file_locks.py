"""Step locks that a killed process cannot keep.

Steps run under Prefect's SERIALIZABLE isolation, so two processes resuming the same run never execute the same
step twice: the second waits for the first's lock, then finds the committed entry and replays it. Prefect's
file lock has no owner check, so a lock left by a SIGKILLed process would block every resume forever. This lock
manager (Prefect's `LockManager` protocol) records the holder's host and pid and reclaims a lock whose holder
process on this host is gone. Locks held on other hosts are honoured until `stale_after` seconds, if set.

Taking a lock is an exclusive create (`O_CREAT | O_EXCL`): of several processes, exactly one succeeds. Taking
over a dead holder's lock cannot be one system call, because "the holder is dead" is a judgement on what a read
returned: between that read and the removal, a faster reclaimer may already have replaced the file with its own
live lock, and removing the path would then delete *that* lock, letting two processes run the step. Renaming the
dead file aside instead does not close the gap either (the rename can move the faster reclaimer's fresh lock, and
putting it back races new creators). So every takeover in a directory runs under one `flock` on a guard file
there: while it is held, the lock file is read, judged and removed by this process alone. Nothing else can
change that file meanwhile: creators only create a file that does not exist, a dead holder releases nothing, and
every other reclaimer waits for the guard, then reads our new lock, which is alive. `flock` is the right
primitive here because the kernel drops it when its process dies (a reclaimer killed mid-takeover blocks no one)
and because it excludes separate opens within one process too (threads), unlike POSIX record locks. The guard
file is never deleted, so no process can hold a guard that another replaced. (A lock reclaimed because of
`stale_after` is different: it is a lease without renewal, whose holder on another host may still be alive.)
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import os
import socket
import time
from pathlib import Path
from typing import Any

logger = logging.getLogger("prefect_pydantic_ai")

_HOST = socket.gethostname()


def process_alive(pid: int) -> bool:
    """Whether a process with this pid exists on this host."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class ReclaimingLockManager:
    """File locks in `directory`, one file per step key, reclaimed when their holder died."""

    def __init__(
        self, directory: Path, *, stale_after: float | None = None, poll_interval: float = 0.05
    ) -> None:
        self.directory = Path(directory)
        self.stale_after = stale_after
        self.poll_interval = poll_interval
        # Locks this process holds, by key. While we live no one else may remove them (unless `stale_after` lets
        # another host reclaim them), so questions about our own locks need no file read.
        self._ours: dict[str, str] = {}

    def _path(self, key: str) -> Path:
        return self.directory / f"{key}.lock"

    def _read(self, key: str) -> dict[str, Any] | None:
        path = self._path(key)
        try:
            info = json.loads(path.read_bytes())
        except FileNotFoundError:
            return None
        except (OSError, ValueError):
            info = None
        if isinstance(info, dict):
            return info
        # Created but not yet (or never) written: the holder is unknown; it is reclaimed once clearly abandoned.
        try:
            return {"holder": None, "since": path.stat().st_mtime, "unwritten": True}
        except FileNotFoundError:
            return None

    _UNWRITTEN_GRACE = 10.0

    def _held_by_the_dead(self, info: dict[str, Any]) -> bool:
        if info.get("unwritten"):
            return time.time() - float(info["since"]) > self._UNWRITTEN_GRACE
        if info.get("host") == _HOST and not process_alive(int(info.get("pid", -1))):
            return True
        return self.stale_after is not None and time.time() - float(info.get("since", 0)) > self.stale_after

    def acquire_lock(
        self, key: str, holder: str, acquire_timeout: float | None = None, hold_timeout: float | None = None
    ) -> bool:
        deadline = None if acquire_timeout is None else time.monotonic() + acquire_timeout
        while not self._try_acquire(key, holder):
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(self.poll_interval)
        return True

    async def aacquire_lock(
        self, key: str, holder: str, acquire_timeout: float | None = None, hold_timeout: float | None = None
    ) -> bool:
        deadline = None if acquire_timeout is None else time.monotonic() + acquire_timeout
        while not self._try_acquire(key, holder):
            if deadline is not None and time.monotonic() >= deadline:
                return False
            await asyncio.sleep(self.poll_interval)
        return True

    def _try_acquire(self, key: str, holder: str) -> bool:
        """Create the lock file exclusively; read it only when it exists (ours already? a dead holder's?)."""
        record = json.dumps(
            {"holder": holder, "pid": os.getpid(), "host": _HOST, "since": time.time()}
        ).encode()
        if self._create(key, record) or self._take_over(key, record):
            self._ours[key] = holder
            return True
        return self.is_lock_holder(key, holder)

    _GUARD = ".reclaim.guard"

    def _take_over(self, key: str, record: bytes) -> bool:
        """Replace a dead holder's lock with ours, judging and removing it under the directory's guard `flock`."""
        info = self._read(key)
        if info is None:
            return self._create(key, record)  # released meanwhile
        if not self._held_by_the_dead(info):
            return False
        with open(self.directory / self._GUARD, "a") as guard:
            fcntl.flock(guard, fcntl.LOCK_EX)  # released when the file is closed, or when this process dies
            info = self._read(key)  # again: a reclaimer that held the guard before us may have replaced it
            if info is not None:
                if not self._held_by_the_dead(info):
                    return False
                logger.warning(
                    "Reclaiming the lock of step %s left by process %s on %s, which is gone.",
                    key[:12],
                    info.get("pid"),
                    info.get("host") or "?",
                )
                self._path(key).unlink(missing_ok=True)
            return self._create(key, record)

    def _create(self, key: str, record: bytes) -> bool:
        try:
            fd = os.open(self._path(key), os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileNotFoundError:
            self.directory.mkdir(parents=True, exist_ok=True)
            return self._create(key, record)
        except FileExistsError:
            return False
        with os.fdopen(fd, "wb") as f:
            f.write(record)
        return True

    def release_lock(self, key: str, holder: str) -> None:
        if not self.is_lock_holder(key, holder):
            raise ValueError(f"No lock held by {holder} for key {key}")
        self._ours.pop(key, None)
        self._path(key).unlink(missing_ok=True)

    def _known_ours(self, key: str) -> str | None:
        return self._ours.get(key) if self.stale_after is None else None

    def is_locked(self, key: str) -> bool:
        """Whether a live holder has the lock; a dead holder's lock is not locked (the next acquirer takes it over)."""
        if self._known_ours(key) is not None:
            return True
        info = self._read(key)
        return info is not None and not self._held_by_the_dead(info)

    def is_lock_holder(self, key: str, holder: str) -> bool:
        if (ours := self._known_ours(key)) is not None:
            return ours == holder
        info = self._read(key)
        return info is not None and info.get("holder") == holder

    def wait_for_lock(self, key: str, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.is_locked(key):
            if deadline is not None and time.monotonic() >= deadline:
                return False
            time.sleep(self.poll_interval)
        return True

    async def await_for_lock(self, key: str, timeout: float | None = None) -> bool:
        deadline = None if timeout is None else time.monotonic() + timeout
        while self.is_locked(key):
            if deadline is not None and time.monotonic() >= deadline:
                return False
            await asyncio.sleep(self.poll_interval)
        return True
