"""Per-step execution policy: retries, backoff, timeout and result handling of one Prefect task.

`TaskConfig` is a frozen, validated `dict` of the fields that are set, so it is pydantic-ai's `TaskConfig`
TypedDict wherever one is expected: `cfg["retries"]`, `cfg.get(...)`, `dict(cfg)`, `{**cfg}`, `cfg.copy()`,
`cfg | {...}` (a validated `TaskConfig`), `cfg == {"retries": 2}`, `isinstance(cfg, dict)`. An unset field
is an absent key, as a key missing from the TypedDict is; the fields also read as attributes (`cfg.retries`,
`None` when unset).

Configs of one tool are layered with `merged_over`: field by field, except that `retries` brings its own
backoff (see `TaskConfig.merged_over`).
"""

import difflib
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Literal, NoReturn, TypeAlias, TypedDict, Unpack, cast

from prefect.cache_policies import CachePolicy
from prefect.filesystems import WritableFileSystem
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    ValidationError,
    ValidatorFunctionWrapHandler,
    field_validator,
    model_validator,
)

from prefect_pydantic_ai.durable.errors import DurabilityConfigError
from prefect_pydantic_ai.durable.limits import ConcurrencyLimit

UnverifiedPolicy = Literal["fail", "tell_model", "rerun"]
"""What happens to a call of a non-idempotent tool that an earlier attempt started and never finished."""

RetryCondition = Callable[..., Any]
"""Prefect's `retry_condition_fn(task, task_run, state) -> bool` (may be async)."""

METADATA_KEY = "prefect"
"""The tool metadata key holding a tool's config: `@agent.tool(metadata={"prefect": TaskConfig(...) | False})`."""

BACKOFF_FIELDS = ("retry_delay_seconds", "retry_jitter_factor")
"""The fields that belong to `retries`: a config layered over another and setting `retries` replaces them."""

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
    "memoize_seconds": "seconds > 0",
    "concurrency_limit": "a Prefect global concurrency limit name, or a ConcurrencyLimit(name=...)",
}


class TaskConfigFields(TypedDict, total=False):
    """The keyword arguments of `TaskConfig(...)`: the keys of pydantic-ai's `TaskConfig` TypedDict, and ours."""

    retries: int | None
    retry_delay_seconds: float | list[float] | None
    retry_jitter_factor: float | None
    timeout_seconds: float | None
    retry_condition_fn: RetryCondition | None
    cache_policy: CachePolicy | None
    persist_result: bool | None
    result_storage: WritableFileSystem | str | None
    log_prints: bool | None
    tags: list[str] | tuple[str, ...] | None
    on_unverified: UnverifiedPolicy | None
    memoize_seconds: float | None
    concurrency_limit: ConcurrencyLimit | str | None


class _Fields(BaseModel):
    """The validation of a config's fields; `TaskConfig` keeps those that are set."""

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
    memoize_seconds: float | None = Field(default=None, gt=0)
    concurrency_limit: ConcurrencyLimit | None = None

    @field_validator("concurrency_limit", mode="before")
    @classmethod
    def _limit_by_name(cls, value: Any) -> Any:
        return ConcurrencyLimit(name=value) if isinstance(value, str) else value

    @model_validator(mode="wrap")
    @classmethod
    def _one_line_errors(cls, data: Any, handler: ValidatorFunctionWrapHandler) -> Any:
        """Report the first invalid field as one actionable line instead of pydantic's multi-line report."""
        try:
            config = handler(data)
        except ValidationError as exc:
            raise DurabilityConfigError(_one_line(exc)) from None
        misfit = config._misfit() if isinstance(config, _Fields) else None
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


FIELDS = tuple(_Fields.model_fields)
"""The names of `TaskConfig`'s fields, in order."""


class TaskConfig(dict[str, Any]):
    """How one kind of step runs as a Prefect task: a frozen dict of the fields that are set.

    A field left unset (or `None`) is absent: a per-tool config layered over the tool default inherits it (see
    `merged_over`), and whatever is still unset falls back to Prefect's own default.

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
    - `memoize_seconds` (opt-in): an identical request (the same conversation, deps, metadata and offered tools;
      for a tool, the same arguments too) made by any run of the same agent within this many seconds is answered
      from the journal entry of the run that executed it, and counted as saved. Never on by default.
    - `concurrency_limit`: each executing attempt holds a slot of this Prefect global concurrency limit (a name,
      or a `ConcurrencyLimit` with a rate limit, creation and lease settings), shared by every run and worker of
      the Prefect server; a replayed step, the wait before a retry and a run waiting for approval hold none.

    `TaskConfig({"retries": 2})` and `TaskConfig(retries=2)` are the same config, equal to `{"retries": 2}`.
    It is frozen (it is checked once, when built): `cfg | {"retries": 3}` gives a changed copy. An invalid
    value raises `DurabilityConfigError` with one line naming the field and what it accepts.
    """

    __slots__ = ()

    def __init__(
        self, config: Mapping[str, Any] | None = None, /, **fields: Unpack[TaskConfigFields]
    ) -> None:
        checked = _Fields.model_validate({**(config or {}), **fields})
        super().__init__((name, value) for name, value in checked.__dict__.items() if value is not None)

    @classmethod
    def of(cls, config: "TaskConfigLike | None") -> "TaskConfig":
        """`config` as a `TaskConfig`: a plain dict (pydantic-ai's TypedDict form) is validated; `None` is empty."""
        if isinstance(config, TaskConfig):
            return config
        return cls(config)

    @classmethod
    def _checked(cls, fields: Mapping[str, Any]) -> "TaskConfig":
        """A config of `fields`, which come from validated configs (they are not checked again)."""
        config = dict.__new__(cls)
        dict.update(config, fields)
        return config

    def merged_over(self, base: "TaskConfig") -> "TaskConfig":
        """This config layered over `base`: every field set here wins and every unset one is inherited, except
        that setting `retries` also replaces `base`'s backoff (`retry_delay_seconds`, `retry_jitter_factor`),
        so a delay list written for another number of retries never travels on its own. The result is
        validated again: `DurabilityConfigError` if its fields do not fit together."""
        replaced = BACKOFF_FIELDS if "retries" in self else ()
        return TaskConfig({**{k: v for k, v in base.items() if k not in replaced}, **self})

    # -- a dict: the set fields are its keys ---------------------------------------------------------------------

    def copy(self) -> "TaskConfig":
        return TaskConfig._checked(self)

    def __copy__(self) -> "TaskConfig":
        return self.copy()

    def __reduce__(self) -> tuple[Any, ...]:
        return (TaskConfig, (dict(self),))

    def __eq__(self, other: object) -> bool:
        """Equal to a config or a dict of the same set fields (`{"timeout_seconds": 10}` is `10.0`)."""
        if isinstance(other, TaskConfig):
            return dict.__eq__(self, other)
        if not isinstance(other, Mapping):
            return NotImplemented
        try:
            return dict.__eq__(self, TaskConfig(other))
        except DurabilityConfigError:  # no valid config equals an invalid one
            return False

    def __ne__(self, other: object) -> bool:
        equal = self.__eq__(other)
        return equal if equal is NotImplemented else not equal

    def __or__(self, other: Mapping[str, Any]) -> "TaskConfig":  # type: ignore[override]
        """A new config: `other`'s set fields over these, key by key (a dict union), validated."""
        if not isinstance(other, Mapping):
            return NotImplemented
        return TaskConfig({**self, **TaskConfig.of(other)})

    def __ror__(self, other: Mapping[str, Any]) -> "TaskConfig":  # type: ignore[override]
        if not isinstance(other, Mapping):
            return NotImplemented
        return TaskConfig({**TaskConfig.of(other), **self})

    def __ior__(self, other: Mapping[str, Any]) -> "TaskConfig":  # type: ignore[override]
        return self | other  # `cfg |= {...}` binds a new config, as with a frozenset

    @classmethod
    def fromkeys(cls, keys: Iterable[str], value: Any = None) -> "TaskConfig":  # type: ignore[override]
        return cls(dict.fromkeys(keys, value))

    def __repr__(self) -> str:
        return f"TaskConfig({', '.join(f'{k}={v!r}' for k, v in self.items())})"

    def _frozen(self, *args: Any, **kwargs: Any) -> NoReturn:
        raise TypeError(
            "A TaskConfig is frozen (it is checked once, when built): use cfg | {...} for a changed copy."
        )

    __setitem__ = __delitem__ = clear = pop = popitem = setdefault = update = _frozen

    def __setattr__(self, name: str, value: Any) -> NoReturn:
        raise ValidationError.from_exception_data(
            type(self).__name__, [{"type": "frozen_instance", "loc": (name,), "input": value}]
        )

    __delattr__ = __setattr__  # type: ignore[assignment]

    # -- the fields as attributes, `None` when unset -----------------------------------------------------------

    @property
    def retries(self) -> int | None:
        return cast("int | None", self.get("retries"))

    @property
    def retry_delay_seconds(self) -> float | list[float] | None:
        return cast("float | list[float] | None", self.get("retry_delay_seconds"))

    @property
    def retry_jitter_factor(self) -> float | None:
        return cast("float | None", self.get("retry_jitter_factor"))

    @property
    def timeout_seconds(self) -> float | None:
        return cast("float | None", self.get("timeout_seconds"))

    @property
    def retry_condition_fn(self) -> RetryCondition | None:
        return cast("RetryCondition | None", self.get("retry_condition_fn"))

    @property
    def cache_policy(self) -> CachePolicy | None:
        return cast("CachePolicy | None", self.get("cache_policy"))

    @property
    def persist_result(self) -> bool | None:
        return cast("bool | None", self.get("persist_result"))

    @property
    def result_storage(self) -> WritableFileSystem | str | None:
        return cast("WritableFileSystem | str | None", self.get("result_storage"))

    @property
    def log_prints(self) -> bool | None:
        return cast("bool | None", self.get("log_prints"))

    @property
    def tags(self) -> tuple[str, ...] | None:
        return cast("tuple[str, ...] | None", self.get("tags"))

    @property
    def concurrency_limit(self) -> ConcurrencyLimit | None:
        return cast("ConcurrencyLimit | None", self.get("concurrency_limit"))

    @property
    def on_unverified(self) -> UnverifiedPolicy | None:
        return cast("UnverifiedPolicy | None", self.get("on_unverified"))

    @property
    def memoize_seconds(self) -> float | None:
        return cast("float | None", self.get("memoize_seconds"))


TaskConfigLike: TypeAlias = TaskConfig | Mapping[str, Any]
"""Where a config is expected: a `TaskConfig` or the plain dict pydantic-ai's TypedDict form uses."""


def tool_config_from_metadata(
    tool_name: str, metadata: Mapping[str, Any] | None
) -> TaskConfig | Literal[False] | None:
    """The config a tool carries in its metadata under `"prefect"`: a config, `False` (run inline) or `None`."""
    value = (metadata or {}).get(METADATA_KEY)
    if value is None or value is False:
        return value
    if not isinstance(value, Mapping):
        raise DurabilityConfigError(
            f"Tool {tool_name!r} has metadata {{{METADATA_KEY!r}: {value!r}}}: give a TaskConfig, a dict of its "
            "fields, or False to run the tool inline."
        )
    try:
        return TaskConfig.of(value)
    except DurabilityConfigError as exc:
        raise DurabilityConfigError(
            f"Tool {tool_name!r} has metadata {{{METADATA_KEY!r}: ...}}: {exc}"
        ) from None


def _one_line(exc: ValidationError) -> str:
    errors = exc.errors()
    error = errors[0]
    field = str(error["loc"][0]) if error["loc"] else None
    more = len({e["loc"][:1] for e in errors}) - 1  # a union field reports one error per member
    tail = f" ({more} more error{'s' if more > 1 else ''})" if more else ""
    if error["type"] == "extra_forbidden" and field is not None:
        close = difflib.get_close_matches(field, list(FIELDS), n=1)
        hint = f"did you mean {close[0]!r}? " if close else ""
        return f"TaskConfig has no field {field!r}: {hint}its fields are {', '.join(FIELDS)}{tail}."
    message = str(error["msg"]).removeprefix("Value error, ")
    if (
        field == "concurrency_limit"
        and len(error["loc"]) > 1
        and error["loc"][1] in ConcurrencyLimit.model_fields
    ):
        where = ".".join(str(part) for part in error["loc"])
        return f"TaskConfig {where}={error['input']!r} is invalid: {message}{tail}."
    if field is None or field not in _FIXES:
        return f"Invalid TaskConfig: {message}{tail}."
    return f"TaskConfig {field}={error['input']!r} is invalid: use {_FIXES[field]}{tail}."
