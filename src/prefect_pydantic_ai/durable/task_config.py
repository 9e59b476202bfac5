"""Per-step execution policy: retries, backoff, timeout and result handling of one Prefect task.

`TaskConfig` is a frozen, validated model that also reads like pydantic-ai's `TaskConfig` TypedDict: it can be
built from a plain dict, merged with `|` (the right side wins, field by field), unpacked with `**` and read
with `cfg["retries"]` / `cfg.get(...)`. An unset field is absent, as a key missing from the TypedDict is.
"""

import difflib
from collections.abc import Callable, Mapping
from typing import Any, Literal, TypeAlias

from prefect.cache_policies import CachePolicy
from prefect.filesystems import WritableFileSystem
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidatorFunctionWrapHandler,
    model_validator,
)

from prefect_pydantic_ai.errors import DurabilityConfigError

UnverifiedPolicy = Literal["fail", "tell_model", "rerun"]
"""What happens to a call of a non-idempotent tool that an earlier attempt started and never finished."""

RetryCondition = Callable[..., Any]
"""Prefect's `retry_condition_fn(task, task_run, state) -> bool` (may be async)."""

METADATA_KEY = "prefect"
"""The tool metadata key holding a tool's config: `@agent.tool(metadata={"prefect": TaskConfig(...) | False})`."""

_FIXES = {
    "retries": "a whole number >= 0 (attempts after the first)",
    "retry_delay_seconds": "seconds >= 0, or a list of them (the backoff of retry 1, 2, ...)",
    "retry_jitter_factor": "a number >= 0",
    "timeout_seconds": "seconds > 0",
    "retry_condition_fn": "a callable (task, task_run, state) -> bool",
    "persist_result": "True or False",
    "log_prints": "True or False",
    "tags": "a list of strings",
    "on_unverified": "one of 'fail', 'tell_model', 'rerun'",
}


class TaskConfig(BaseModel):
    """How one kind of step runs as a Prefect task.

    Every field left as `None` is "not set": a per-tool config overrides the tool default field by field,
    and whatever is still unset falls back to Prefect's own default.

    - `retries` / `retry_delay_seconds`: attempts after the first, and the wait before each (one number, or a
      list read as the backoff for retry 1, 2, ...; the last entry repeats, and there are at most `retries`).
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

    An invalid value raises `DurabilityConfigError` with one line naming the field and what it accepts.
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

    @model_validator(mode="wrap")
    @classmethod
    def _one_line_errors(cls, data: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        """Report the first invalid field as one actionable line instead of pydantic's multi-line report."""
        try:
            config = handler(data)
        except ValidationError as exc:
            raise DurabilityConfigError(_one_line(exc)) from None
        misfit = config._misfit() if isinstance(config, TaskConfig) else None
        if misfit is not None:
            raise DurabilityConfigError(f"Invalid TaskConfig: {misfit}.")
        return config

    def _misfit(self) -> str | None:
        """What is wrong with values that are each valid alone, if anything."""
        delays = self.retry_delay_seconds
        values = delays if isinstance(delays, list) else [] if delays is None else [delays]
        if any(d < 0 for d in values):
            return f"retry_delay_seconds={delays!r} must be seconds >= 0"
        if isinstance(delays, list) and self.retries is not None and len(delays) > self.retries:
            return (
                f"retry_delay_seconds has {len(delays)} delays but retries={self.retries}: "
                f"give at most {self.retries} (one per retry) or set retries={len(delays)}"
            )
        if self.cache_policy is not None and not isinstance(self.cache_policy, CachePolicy):
            return "cache_policy must be a prefect.cache_policies.CachePolicy"
        if self.result_storage is not None and not isinstance(self.result_storage, WritableFileSystem | str):
            return "result_storage must be a Prefect WritableFileSystem block or a block slug string"
        return None

    @classmethod
    def of(cls, config: "TaskConfigLike | None") -> "TaskConfig":
        """`config` as a `TaskConfig`: a plain dict (pydantic-ai's TypedDict form) is validated; `None` is empty."""
        if isinstance(config, TaskConfig):
            return config
        return cls.model_validate(dict(config or {}))

    def merged_over(self, base: "TaskConfig") -> "TaskConfig":
        """This config with every unset field taken from `base` (validated again: the fields must fit together)."""
        return TaskConfig.model_validate({**base, **self})

    # -- the mapping view of pydantic-ai's TypedDict: set fields are its keys ----------------------------------

    def keys(self) -> list[str]:
        return [name for name, value in self.__dict__.items() if value is not None]

    def __getitem__(self, key: str) -> Any:
        value = self.__dict__.get(key)
        if value is None:
            raise KeyError(key)
        return value

    def get(self, key: str, default: Any = None) -> Any:
        value = self.__dict__.get(key)
        return default if value is None else value

    def __contains__(self, key: object) -> bool:
        return isinstance(key, str) and self.__dict__.get(key) is not None

    def __or__(self, other: "TaskConfigLike") -> "TaskConfig":
        return TaskConfig.of(other).merged_over(self)

    def __ror__(self, other: Mapping[str, Any]) -> "TaskConfig":
        return self.merged_over(TaskConfig.of(other))


TaskConfigLike: TypeAlias = TaskConfig | Mapping[str, Any]
"""Where a config is expected: a `TaskConfig` or the plain dict pydantic-ai's TypedDict form uses."""


def tool_config_from_metadata(
    tool_name: str, metadata: Mapping[str, Any] | None
) -> TaskConfig | Literal[False] | None:
    """The config a tool carries in its metadata under `"prefect"`: a config, `False` (run inline) or `None`."""
    value = (metadata or {}).get(METADATA_KEY)
    if value is None or value is False:
        return value
    if not isinstance(value, Mapping | TaskConfig):
        raise DurabilityConfigError(
            f"Tool {tool_name!r} has metadata {{{METADATA_KEY!r}: {value!r}}}: give a TaskConfig, a dict of its "
            "fields, or False to run the tool inline."
        )
    return TaskConfig.of(value)


def _one_line(exc: ValidationError) -> str:
    errors = exc.errors()
    error = errors[0]
    field = str(error["loc"][0]) if error["loc"] else None
    more = len({e["loc"][:1] for e in errors}) - 1  # a union field reports one error per member
    tail = f" ({more} more error{'s' if more > 1 else ''})" if more else ""
    if error["type"] == "extra_forbidden" and field is not None:
        close = difflib.get_close_matches(field, list(TaskConfig.model_fields), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        return f"TaskConfig has no field {field!r}: {hint}its fields are {', '.join(TaskConfig.model_fields)}{tail}."
    if field is None or field not in _FIXES:
        message = str(error["msg"]).removeprefix("Value error, ")
        return f"Invalid TaskConfig: {message}{tail}."
    return f"TaskConfig {field}={error['input']!r} is invalid: use {_FIXES[field]}{tail}."
