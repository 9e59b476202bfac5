"""Step locks shared by several machines: prefect-redis's lock manager, with a lease that a live holder renews.

Prefect's transactions take a lock without a hold timeout, so a plain `RedisLockManager` lock would outlive a
machine that died holding it and block every resume forever. Here each lock is taken with a lease
(`hold_timeout`), and a daemon thread of the holding process extends the leases it holds every third of the
lease: a step may run longer than the lease while its process lives, and the lock of a dead machine expires at
most one lease after its last renewal, after which the next attempt takes it and executes the step.
"""

from __future__ import annotations

import logging
import threading
import time
from typing import Any

from prefect_redis.locking import RedisLockManager
from redis.exceptions import LockError, RedisError
from redis.lock import Lock

logger = logging.getLogger("prefect_pydantic_ai")


class LeasedRedisLockManager(RedisLockManager):
    """A `RedisLockManager` whose locks expire `lease_seconds` after their holder process stops renewing them."""

    def __init__(self, connection_url: str, *, lease_seconds: float) -> None:
        super().__init__(connection_url=connection_url)
        self.lease_seconds = lease_seconds
        self._init_leases()

    def _init_leases(self) -> None:
        self._held: dict[str, str] = {}  # key -> holder, for the locks this process holds
        self._guard = threading.Lock()
        self._renewer: threading.Thread | None = None

    def __getstate__(self) -> dict[str, Any]:
        return {**super().__getstate__(), "lease_seconds": self.lease_seconds}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._init_leases()

    def acquire_lock(
        self, key: str, holder: str, acquire_timeout: float | None = None, hold_timeout: float | None = None
    ) -> bool:
        acquired = super().acquire_lock(key, holder, acquire_timeout, hold_timeout or self.lease_seconds)
        return self._holding(key, holder) if acquired else False

    async def aacquire_lock(
        self, key: str, holder: str, acquire_timeout: float | None = None, hold_timeout: float | None = None
    ) -> bool:
        acquired = await super().aacquire_lock(
            key, holder, acquire_timeout, hold_timeout or self.lease_seconds
        )
        return self._holding(key, holder) if acquired else False

    def release_lock(self, key: str, holder: str) -> None:
        with self._guard:
            self._held.pop(key, None)
        super().release_lock(key, holder)

    def _holding(self, key: str, holder: str) -> bool:
        with self._guard:
            self._held[key] = holder
            if self._renewer is None or not self._renewer.is_alive():
                self._renewer = threading.Thread(target=self._renew, name="ppa-lock-leases", daemon=True)
                self._renewer.start()
        return True

    def _renew(self) -> None:
        """Extend every lease this process holds, every third of a lease, until it holds none."""
        while True:
            time.sleep(self.lease_seconds / 3)
            with self._guard:
                held = dict(self._held)
                if not held:
                    self._renewer = None
                    return
            for key, holder in held.items():
                lock = Lock(self.client, self._lock_name_for_key(key), timeout=self.lease_seconds)
                lock.local.token = holder.encode()
                try:
                    lock.reacquire()
                except (LockError, RedisError) as exc:  # lost (expired, taken over) or Redis unreachable
                    logger.warning("Could not renew the lease of step lock %s: %s", key[:12], exc)
                    if isinstance(exc, LockError):
                        with self._guard:
                            self._held.pop(key, None)
