"""Settings read from the environment (`PREFECT_PYDANTIC_AI_*`), for what differs between deployments.

`locks` selects where step locks live: unset (or `file`) keeps them in files under PREFECT_HOME, right for one
machine; a `redis://` (or `rediss://`) URL shares them between every machine pointed at that Redis.
`lock_lease_seconds` is how long a lock outlives a holder that stopped renewing it (its machine died).
`local_server=false` opts out of the persistent local Prefect server: Prefect's temporary one per process.
"""

from __future__ import annotations

from urllib.parse import urlsplit

from pydantic import Field, field_validator
from pydantic_settings import BaseSettings, SettingsConfigDict


class Settings(BaseSettings):
    """`PREFECT_PYDANTIC_AI_LOCKS`, `PREFECT_PYDANTIC_AI_LOCK_LEASE_SECONDS`, `PREFECT_PYDANTIC_AI_LOCAL_SERVER`."""

    model_config = SettingsConfigDict(env_prefix="PREFECT_PYDANTIC_AI_", extra="ignore")

    locks: str = "file"
    lock_lease_seconds: float = Field(default=30.0, gt=0)
    local_server: bool = True

    @field_validator("locks")
    @classmethod
    def _known_lock_backend(cls, value: str) -> str:
        if value != "file" and not value.startswith(("redis://", "rediss://", "unix://")):
            raise ValueError(
                f"PREFECT_PYDANTIC_AI_LOCKS={value!r}: use 'file' (this machine only) or a redis:// URL."
            )
        return value

    def describe_locks(self) -> str:
        """Which step locks are in force, for logs and docs (a password in the URL is not shown)."""
        if self.locks == "file":
            return "files under PREFECT_HOME (this machine only)"
        return f"Redis at {without_password(self.locks)} (lease {self.lock_lease_seconds:g}s)"


def without_password(url: str) -> str:
    """`url` with its user and password left out, for messages and logs."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}{parts.path}"
