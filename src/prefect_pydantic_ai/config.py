"""Per-step execution policy: retries, backoff, timeout and result handling of one Prefect task."""

from collections.abc import Callable
from typing import Any, Literal

from prefect.cache_policies import CachePolicy
from prefect.filesystems import WritableFileSystem
from pydantic import BaseModel, ConfigDict, Field, model_validator

UnverifiedPolicy = Literal["fail", "tell_model", "rerun"]
"""What happens to a call of a non-idempotent tool that an earlier attempt started and never finished."""

RetryCondition = Callable[..., Any]
"""Prefect's `retry_condition_fn(task, task_run, state) -> bool` (may be async)."""


class TaskConfig(BaseModel):
    """How one kind of step runs as a Prefect task.

    Every field left as `None` is "not set": a per-tool config overrides the tool default field by field,
    and whatever is still unset falls back to Prefect's own default.

    - `retries` / `retry_delay_seconds`: attempts after the first, and the wait before each (one number, or a
      list read as the backoff for retry 1, 2, ...; the last entry repeats).
    - `timeout_seconds`: a single attempt longer than this fails with a timeout (and is retried if allowed).
    - `retry_condition_fn`: Prefect's hook to veto a retry. It is combined with ours: errors that retrying
      cannot fix (user errors, rejected requests, exhausted tool retries) are never retried.
    - `cache_policy`: added to our step-key policy. `prefect.cache_policies.NO_CACHE` turns journaling off
      for this step, so it always executes again on resume.
    - `persist_result` / `result_storage`: where the journal lives (default: Prefect's result storage).
    - `on_unverified` (tools only): marks a tool as *not idempotent* (it sends an email, charges a card). Left
      unset, a call interrupted before its result was journaled (process killed, attempt timed out) simply runs
      again. Set, such a call is "unverified" on its next attempt, and: `"fail"` stops the run with
      `UnverifiedEffectError` for a human to check (then `resume --unverified rerun|tell_model`), `"tell_model"`
      gives the model a result saying the effect may or may not have happened, `"rerun"` runs it again with a
      warning. Pass `step_idempotency_key()` to the external system so that it can drop a repeated call itself.
    """

    model_config = ConfigDict(frozen=True, arbitrary_types_allowed=True, extra="forbid")

    retries: int | None = Field(default=None, ge=0)
    retry_delay_seconds: float | list[float] | None = None
    retry_jitter_factor: float | None = Field(default=None, ge=0)
    timeout_seconds: float | None = Field(default=None, gt=0)
    retry_condition_fn: RetryCondition | None = None
    cache_policy: Any = None  # a Prefect CachePolicy; checked below
    persist_result: bool | None = None
    result_storage: Any = None  # a Prefect WritableFileSystem block or a block slug; checked below
    log_prints: bool | None = None
    tags: tuple[str, ...] | None = None
    on_unverified: UnverifiedPolicy | None = None

    @model_validator(mode="after")
    def _delays_are_not_negative(self) -> "TaskConfig":
        delays = self.retry_delay_seconds
        values = delays if isinstance(delays, list) else [] if delays is None else [delays]
        if any(d < 0 for d in values):
            raise ValueError(f"retry_delay_seconds must not be negative, got {delays!r}")
        if self.cache_policy is not None and not isinstance(self.cache_policy, CachePolicy):
            raise ValueError("cache_policy must be a prefect.cache_policies.CachePolicy")
        if self.result_storage is not None and not isinstance(self.result_storage, WritableFileSystem | str):
            raise ValueError(
                "result_storage must be a Prefect WritableFileSystem block or a block slug string"
            )
        return self

    def merged_over(self, base: "TaskConfig") -> "TaskConfig":
        """This config with every unset field taken from `base`."""
        own = {name: value for name, value in self if value is not None}
        return base.model_copy(update=own)
