"""Step locks shared by several machines: prefect-redis's lock manager, with a lease that a live holder renews.

Prefect's transactions take a lock without a hold timeout, so a plain `RedisLockManager` lock would outlive a
machine that died holding it and block every resume forever. Here each lock is taken with a lease
(`hold_timeout`), and a daemon thread of the holding process extends the leases it holds every third of the
lease: a step may run longer than the lease while its process lives, and the lock of a dead machine expires at
most one lease after its last renewal, after which the next attempt takes it and executes the step.

A Redis that loses its data (a restart without persistence, a `FLUSHALL`, a failover to a replica that missed
the latest writes) forgets the locks of steps still running, so another machine could take one and execute that
step a second time. Two rules close this. A holder whose renewal finds its lock gone takes it back (nobody else
can have it, by the second rule). And no lock is granted within a lease of Redis losing data: a lock lost then
would have lived at most that long, and within it every live holder has renewed (taken back) its own. A loss is
seen through a marker key naming the Redis server (its `run_id`) that holds the locks: a marker gone (flushed,
restarted empty) or naming another server (restarted, failed over) starts that lease, once. Reading the marker
and taking a lock are one Lua script, so a request retried across a restart is judged by the new server. The
marker is written at the first lock a Redis ever grants, so that first lock waits a lease too; `cluster up`,
which starts its Redis empty, marks it new (`trust_new_redis`) so that its wait counts from Redis's start.
"""

from __future__ import annotations

import asyncio
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
from redis.exceptions import ConnectionError, RedisError, TimeoutError
from redis.retry import Retry

from prefect_pydantic_ai.compat.prefect_redis import lock_name
from prefect_pydantic_ai.settings import without_password

logger = logging.getLogger("prefect_pydantic_ai")

_UNREACHABLE = (ConnectionError, TimeoutError)
_BACKOFF_CAP = 1.0  # seconds between two tries, at most, once Redis has been unreachable for a while
_POLL = 0.1  # seconds between two tries at a lock another holder has (redis-py's `Lock` default)

MARKER = "prefect-pydantic-ai:step-locks"
"""The hash naming the Redis server (`server`: its run_id) whose lock data the step locks trust, and since when
(`since`: Redis's clock, ms): granting waits a lease from then."""

# Reads the marker (the last of KEYS) into `since`, Redis's clock (ms) when its lock data became trustworthy, and
# `now`; a marker that is gone or names another server is written anew, from now (from Redis's start where `fresh`:
# it started empty and has granted no lock).
_MARKED = """
local marker = KEYS[#KEYS]
local info = redis.call('INFO', 'server')
local run = string.match(info, 'run_id:(%w+)')
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local mark = redis.call('HMGET', marker, 'server', 'since')
local since = tonumber(mark[2])
if mark[1] ~= run or not since then
  since = now
  if fresh then since = now - 1000 * tonumber(string.match(info, 'uptime_in_seconds:(%d+)')) end
  redis.call('HSET', marker, 'server', run, 'since', since)
end
"""

_TRUST_NEW = "local fresh = true" + _MARKED + "return now - since"

# KEYS[1] the lock, KEYS[2] the marker; ARGV[1] the holder's token, ARGV[2] the lease in ms. Returns 1: the lock is
# the holder's now; 0: another holder has it; -N: Redis lost its data less than a lease ago, N ms before any
# lock may be granted.
_ACQUIRE = (
    """
local current = redis.call('GET', KEYS[1])
if current == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
local fresh = false"""
    + _MARKED
    + """
local left = tonumber(ARGV[2]) - (now - since)
if left > 0 then return -left end
if current then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 1
"""
)

# Returns 1: the lease is extended; 2: the lock was gone (Redis lost it) and is the holder's again; 0: another
# holder has it.
_RENEW = """
local current = redis.call('GET', KEYS[1])
if current == ARGV[1] then
  redis.call('PEXPIRE', KEYS[1], ARGV[2])
  return 1
end
if current then return 0 end
redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2])
return 2
"""

_RELEASE = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class StepLockUnavailableError(RuntimeError):
    """Redis, where this run's step locks live, did not answer for a whole lease: the step did not start."""


class LeasedRedisLockManager(RedisLockManager):
    """A `RedisLockManager` whose locks expire `lease_seconds` after their holder process stops renewing them.

    Redis being unreachable for less than a lease (a restart, a failover) delays the step that needs a lock
    instead of failing it; after about a lease (plus 1.5 s of shorter first back-offs), taking a lock fails with
    one clear `StepLockUnavailableError` before the step runs, and releasing one only logs a warning (its lease
    ends it). Which locks this process holds is known here (`is_lock_holder`), and forgotten when a renewal finds
    a lock taken by another holder.
    """

    def __init__(self, connection_url: str, *, lease_seconds: float) -> None:
        super().__init__(connection_url=connection_url)
        self.lease_seconds = lease_seconds
        self._init_leases()

    def _init_leases(self) -> None:
        self._held: dict[str, str] = {}  # key -> holder, for the locks this process holds
        self._guard = threading.Lock()
        self._renewer: threading.Thread | None = None
        self._waiting_for_restart = False  # warned that Redis lost its data less than a lease ago
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
        self._acquire, self._renew_script, self._release = (
            self.client.register_script(script) for script in (_ACQUIRE, _RENEW, _RELEASE)
        )
        self._aacquire = self.async_client.register_script(_ACQUIRE)

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

    def _script_keys(self, key: str) -> list[str]:
        return [lock_name(self, key), MARKER]

    def _lease_ms(self, hold_timeout: float | None) -> int:
        return math.ceil((hold_timeout or self.lease_seconds) * 1000)

    def acquire_lock(
        self, key: str, holder: str, acquire_timeout: float | None = None, hold_timeout: float | None = None
    ) -> bool:
        deadline = None if acquire_timeout is None else time.monotonic() + acquire_timeout
        while True:
            since = time.monotonic()
            try:
                outcome = int(
                    self._acquire(keys=self._script_keys(key), args=[holder, self._lease_ms(hold_timeout)])
                )
            except _UNREACHABLE as exc:
                raise self._unavailable(exc, since) from exc
            pause = self._after(key, holder, outcome, deadline)
            if pause is None:
                return outcome == 1
            time.sleep(pause)

    async def aacquire_lock(
        self, key: str, holder: str, acquire_timeout: float | None = None, hold_timeout: float | None = None
    ) -> bool:
        deadline = None if acquire_timeout is None else time.monotonic() + acquire_timeout
        while True:
            since = time.monotonic()
            try:
                outcome = int(
                    await self._aacquire(
                        keys=self._script_keys(key), args=[holder, self._lease_ms(hold_timeout)]
                    )
                )
            except _UNREACHABLE as exc:
                raise self._unavailable(exc, since) from exc
            pause = self._after(key, holder, outcome, deadline)
            if pause is None:
                return outcome == 1
            await asyncio.sleep(pause)

    def _after(self, key: str, holder: str, outcome: int, deadline: float | None) -> float | None:
        """What one try at a lock leads to: `None` when the answer is final (taken, or out of time), else how long
        to wait before the next try (another holder has it, or Redis lost its data less than a lease ago)."""
        if outcome == 1:
            self._holding(key, holder)
            return None
        pause = _POLL
        if outcome < 0:
            pause = -outcome / 1000
            self._warn_restarted(pause)
        else:
            self._waiting_for_restart = False
        if deadline is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            pause = min(pause, left)
        return pause

    def _warn_restarted(self, wait: float) -> None:
        with self._guard:
            if self._waiting_for_restart:
                return
            self._waiting_for_restart = True
        logger.warning(
            "Step locks: Redis at %s may have lost the locks of steps still running: it restarted, was flushed or "
            "failed over less than a lease (%gs) ago, or holds step locks for the first time. No step lock is "
            "taken for %.1fs, so that their holders take them back.",
            self.where,
            self.lease_seconds,
            wait,
        )

    def is_lock_holder(self, key: str, holder: str) -> bool:
        with self._guard:
            return self._held.get(key) == holder

    def release_lock(self, key: str, holder: str) -> None:
        with self._guard:
            self._held.pop(key, None)
        try:
            self._release(keys=[lock_name(self, key)], args=[holder])
        except _UNREACHABLE as exc:  # the step is journaled already; the lock's lease ends it
            logger.warning(
                "Could not release step lock %s in Redis at %s (%s); it expires within %gs.",
                key[:12],
                self.where,
                exc,
                self.lease_seconds,
            )

    def _holding(self, key: str, holder: str) -> None:
        with self._guard:
            self._held[key] = holder
            self._waiting_for_restart = False
            if self._renewer is None or not self._renewer.is_alive():
                self._renewer = threading.Thread(target=self._renew, name="ppa-lock-leases", daemon=True)
                self._renewer.start()

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
                self._renew_one(key, holder)

    def _renew_one(self, key: str, holder: str) -> None:
        """Extend one lease; take a lock that Redis lost back, and forget one that another holder has now."""
        try:
            outcome = int(
                self._renew_script(keys=[lock_name(self, key)], args=[holder, self._lease_ms(None)])
            )
        except RedisError as exc:  # unreachable for about a lease: the next renewal tries again
            logger.warning("Could not renew the lease of step lock %s: %s", key[:12], exc)
            return
        if outcome == 2:
            logger.warning(
                "Step lock %s was gone from Redis at %s (it restarted without its data, or the lease lapsed while it "
                "was unreachable); this process, still running the step, holds it again.",
                key[:12],
                self.where,
            )
        elif outcome == 0:
            logger.warning(
                "Step lock %s is held by another process now (Redis at %s lost it, or it expired while Redis was "
                "unreachable for a lease): that process may execute this step too.",
                key[:12],
                self.where,
            )
            with self._guard:
                if self._held.get(key) == holder:
                    del self._held[key]


def trust_new_redis(url: str) -> None:
    """Mark the Redis at `url` as started empty, having granted no step lock: its first locks then wait only until
    it has been up a lease, not a lease from their own request (`cluster up`, which starts its Redis)."""
    with Redis.from_url(url) as client:
        client.register_script(_TRUST_NEW)(keys=[MARKER])
