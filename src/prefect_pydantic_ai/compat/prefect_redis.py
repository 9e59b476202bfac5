"""prefect-redis's private parts: the Redis key under which its lock manager keeps a lock."""

from __future__ import annotations

from typing import Any


def lock_name(manager: Any, key: str) -> str:
    """The Redis key of the lock `manager` (a `prefect_redis.locking.RedisLockManager`) takes for `key`."""
    return str(manager._lock_name_for_key(key))
