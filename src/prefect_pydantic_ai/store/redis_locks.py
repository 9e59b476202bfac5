"""Step locks shared by several machines: prefect-redis's lock manager, with a lease that a live holder renews.

Prefect's transactions take a lock without a hold timeout, so a plain `RedisLockManager` lock would outlive a
machine that died holding it and block every resume forever. Here each lock is taken with a lease
(`hold_timeout`), and a daemon thread of the holding process extends the leases it holds every third of the
lease: a step may run longer than the lease while its process lives, and the lock of a dead machine expires at
most one lease after its last renewal, after which the next attempt takes it and executes the step.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from typing import Any

from prefect_redis.locking import RedisLockManager
from redis import Redis
from redis.asyncio import Redis as AsyncRedis
from redis.asyncio.retry import Retry as AsyncRetry
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError, LockError, RedisError, TimeoutError
from redis.lock import Lock
from redis.retry import Retry

from prefect_pydantic_ai.compat.prefect_redis import lock_name
from prefect_pydantic_ai.settings import without_password

logger = logging.getLogger("prefect_pydantic_ai")

_UNREACHABLE = (ConnectionError, TimeoutError)
_BACKOFF_CAP = 1.0  # seconds between two tries, at most, once Redis has been unreachable for a while


class StepLockUnavailableError(RuntimeError):
    """Redis, where this run's step locks live, did not answer for a whole lease: the step did not start."""


class LeasedRedisLockManager(RedisLockManager):
    """A `RedisLockManager` whose locks expire `lease_seconds` after their holder process stops renewing them.

    Redis being unreachable for less than a lease (a restart, a failover) delays the step that needs a lock
    instead of failing it; after about a lease (plus 1.5 s of shorter first back-offs), taking a lock fails with
    one clear `StepLockUnavailableError` before the step runs, and releasing one only logs a warning (its lease
    ends it).
    """

    def __init__(self, connection_url: str, *, lease_seconds: float) -> None:
        super().__init__(connection_url=connection_url)
        self.lease_seconds = lease_seconds
        self._init_leases()

    def _init_leases(self) -> None:
        self._held: dict[str, str] = {}  # key -> holder, for the locks this process holds
        self._guard = threading.Lock()
        self._renewer: threading.Thread | None = None
        # Clients that keep trying an unreachable Redis for about one lease (the ones prefect-redis builds gave up
        # at the first dropped connection), and wait on a silent one at most 5 s a try.
        backoff = ExponentialBackoff(cap=_BACKOFF_CAP, base=0.05)
        tries = 5 + math.ceil(self.lease_seconds / _BACKOFF_CAP)  # the first five back-offs add up to 1.55 s
        assert self.connection_url is not None
        url = self.connection_url
        self.client = Redis.from_url(
            url, retry=Retry(backoff, tries, _UNREACHABLE), socket_connect_timeout=5.0, socket_timeout=5.0
        )
        self.async_client = AsyncRedis.from_url(
            url,
            retry=AsyncRetry(backoff, tries, _UNREACHABLE),
            socket_connect_timeout=5.0,
            socket_timeout=5.0,
        )

    @property
    def where(self) -> str:
        """The Redis URL without its password, for messages."""
        return without_password(self.connection_url or "")

    def _unavailable(self, exc: BaseException, since: float) -> StepLockUnavailableError:
        return StepLockUnavailableError(
            f"Step locks: Redis at {self.where} did not answer for {time.monotonic() - since:.0f}s ({exc}). The "
            "step did not start; start Redis (or fix PREFECT_PYDANTIC_AI_LOCKS) and resume the run: it continues "
            "here."
        )

    def __getstate__(self) -> dict[str, Any]:
        return {**super().__getstate__(), "lease_seconds": self.lease_seconds}

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        self._init_leases()

    def acquire_lock(
        self, key: str, holder: str, acquire_timeout: float | None = None, hold_timeout: float | None = None
    ) -> bool:
        since = time.monotonic()
        try:
            acquired = super().acquire_lock(key, holder, acquire_timeout, hold_timeout or self.lease_seconds)
        except _UNREACHABLE as exc:
            raise self._unavailable(exc, since) from exc
        return self._holding(key, holder) if acquired else False

    async def aacquire_lock(
        self, key: str, holder: str, acquire_timeout: float | None = None, hold_timeout: float | None = None
    ) -> bool:
        since = time.monotonic()
        try:
            acquired = await super().aacquire_lock(
                key, holder, acquire_timeout, hold_timeout or self.lease_seconds
            )
        except _UNREACHABLE as exc:
            raise self._unavailable(exc, since) from exc
        return self._holding(key, holder) if acquired else False

    def release_lock(self, key: str, holder: str) -> None:
        with self._guard:
            self._held.pop(key, None)
        try:
            super().release_lock(key, holder)
        except _UNREACHABLE as exc:  # the step is journaled already; the lock's lease ends it
            logger.warning(
                "Could not release step lock %s in Redis at %s (%s); it expires within %gs.",
                key[:12],
                self.where,
                exc,
                self.lease_seconds,
            )

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
                lock = Lock(self.client, lock_name(self, key), timeout=self.lease_seconds)
                lock.local.token = holder.encode()
                try:
                    lock.reacquire()
                except (LockError, RedisError) as exc:  # lost (expired, taken over) or Redis unreachable
                    logger.warning("Could not renew the lease of step lock %s: %s", key[:12], exc)
                    if isinstance(exc, LockError):
                        with self._guard:
                            self._held.pop(key, None)
