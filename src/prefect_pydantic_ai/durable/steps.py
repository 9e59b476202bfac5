"""Running one step as a Prefect task whose cache key is the step key, so Prefect's result store is the journal.

Each step is one call of a shared task function with a single, small parameter: the step key. The work itself is
looked up in an in-process table, so Prefect never walks the message history when it records task inputs, and a
step costs the same at step 5 as at step 500. Prefect's retries and timeout apply per attempt, and its result
storage holds the entry as JSON (a Prefect result record stored under the step key).

A step whose entry is already journaled is replayed instantly: the entry is read from the result storage and
checked, and Prefect is told of a "Cached" task run by one state event, without running the task engine (no
transaction, lock or state round trips). An entry that is missing, expired or corrupt goes through the task as
before: it executes (a corrupt one is overwritten) under the step's SERIALIZABLE lock.

A storage that fails is never taken for an empty one: a read that fails (not "nothing there") stops the step
with `StorageReadError` instead of executing it again, and an entry Prefect could not write when the step
completed (it logs the error and goes on) is written once more, or the step fails with `StorageWriteError`.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import functools
import inspect
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, Literal, cast
from uuid import UUID

from prefect import Task
from prefect.cache_policies import NO_CACHE, CachePolicy
from prefect.client.schemas.objects import State, StateDetails, TaskRun, TaskRunResult
from prefect.context import FlowRunContext, TaskRunContext
from prefect.locking.protocol import LockManager
from prefect.results import get_result_store
from prefect.settings import PREFECT_HOME
from prefect.states import Completed, Pending
from prefect.transactions import BaseTransaction, TransactionState, get_transaction
from prefect.utilities.engine import emit_task_run_state_change_event
from pydantic_ai.exceptions import (
    AgentRunError,
    ModelHTTPError,
    ModelRequestRejectedError,
    UnexpectedModelBehavior,
    UsageLimitExceeded,
    UserError,
)

from prefect_pydantic_ai.compat.prefect import read_result_record
from prefect_pydantic_ai.durable.fork import NO_RESULT, ForkSource, forking
from prefect_pydantic_ai.durable.journal import JournalCorruptError, memo_key, seal, unseal
from prefect_pydantic_ai.durable.secrets import current as current_redactor
from prefect_pydantic_ai.durable.task_config import TaskConfig
from prefect_pydantic_ai.errors import StorageReadError, StorageWriteError, UnverifiedEffectError
from prefect_pydantic_ai.settings import Settings
from prefect_pydantic_ai.store.file_locks import ReclaimingLockManager
from prefect_pydantic_ai.store.journal_storage import (
    JournalFileSystem,
    describe_cause,
    describe_storage,
    journal_storage,
    read_if_present,
)
from prefect_pydantic_ai.store.records import StepRef
from prefect_pydantic_ai.store.step_names import StepKind, step_title, task_run_name

logger = logging.getLogger("prefect_pydantic_ai")

_PENDING: dict[str, Callable[[], Awaitable[Any]]] = {}
_TASK_RUN_NAMES: dict[str, str] = {}  # step key -> the name its task run takes when it starts
StepPhase = Literal["started", "completed", "stopped"]
"""What `StepTasks.run(on_step=)` hears of an executing step: it started, completed, or stopped without a result."""
RUN_AGAIN = object()
"""What a step's `unverified` callback returns to have the step's work run again (instead of an entry)."""


@dataclass
class RunningStep:
    """The attempt of a step running in this context: its key, and the agent runs it started (sub-agents).

    An agent run started inside a step (a tool delegating to another agent) is keyed under this step's key and
    its ordinal among the runs of that agent in this attempt, so each attempt of the step finds the same
    sub-runs in the journal, and two delegations (sequential, or parallel steps) stay apart.
    """

    key: str
    name: str
    """The step's task run name, `<kind>: <name> @ <agent>`."""
    _runs: Counter[str] = field(default_factory=Counter)

    def next_run(self, agent: str) -> int:
        """The ordinal of a new run of `agent` started in this attempt of the step (0 for the first)."""
        ordinal = self._runs[agent]
        self._runs[agent] += 1
        return ordinal


_current_step: contextvars.ContextVar[RunningStep | None] = contextvars.ContextVar(
    "ppa_current_step", default=None
)


def running_step() -> RunningStep | None:
    """The step whose attempt is running in this context, if any."""
    return _current_step.get()


def step_idempotency_key() -> str:
    """The key of the model or tool step running now: the same for every attempt and every resume of this call,
    different for any other call (even an identical one at another step). Pass it to external systems that drop
    repeated requests (payment and email APIs take an idempotency key)."""
    step = _current_step.get()
    if step is None:
        raise RuntimeError(
            "step_idempotency_key() works only inside a model or tool step of a PrefectAgent run."
        )
    return step.key


_index: contextvars.ContextVar[list[StepRef] | None] = contextvars.ContextVar("ppa_step_index", default=None)


@contextmanager
def indexing_steps(steps: list[StepRef]) -> Iterator[None]:
    """Append the steps taken in this block to `steps` (an agent run's attempt: its run record keeps them).
    A sub-agent run started inside a step indexes its own in a nested block."""
    token = _index.set(steps)
    try:
        yield
    finally:
        _index.reset(token)


@contextmanager
def within_step(key: str, name: str) -> Iterator[RunningStep]:
    """Run the block as (one attempt of) the step `key` named `name`: agent runs started in it are its sub-runs."""
    step = RunningStep(key, name)
    token = _current_step.set(step)
    try:
        yield step
    finally:
        _current_step.reset(token)


@contextmanager
def _own_transaction() -> Iterator[None]:
    """Make the step task open a top-level Prefect transaction, even when it runs inside another step.

    Prefect runs a task called from inside another task's transaction as a nested transaction: its result is
    staged and written only when the outermost transaction commits, and its SERIALIZABLE lock is held until
    then. A sub-agent's steps run inside the delegating tool step, so a process killed inside that tool would
    lose every step the sub-agent had completed. Hiding the enclosing transaction makes each step commit (write
    its entry, release its lock) as soon as it completes, whatever runs around it.
    """
    token = BaseTransaction.__var__.set(cast(Any, None))
    try:
        yield
    finally:
        BaseTransaction.__var__.reset(token)


@functools.cache
def step_lock_manager() -> LockManager:
    """Where step locks live, chosen by `PREFECT_PYDANTIC_AI_LOCKS`: by default one lock directory per Prefect
    home, which every process on this machine shares; with a Redis URL, Redis, which every machine shares (each
    lock leased, so a dead machine's lock expires)."""
    settings = Settings()
    if settings.locks == "file":
        manager: LockManager = ReclaimingLockManager(
            Path(PREFECT_HOME.value()) / "prefect-pydantic-ai" / "locks"
        )
    else:
        from prefect_pydantic_ai.store.redis_locks import LeasedRedisLockManager

        manager = LeasedRedisLockManager(settings.locks, lease_seconds=settings.lock_lease_seconds)
    logger.debug("Step locks: %s", settings.describe_locks())
    return manager


def _named_task_run(parameters: dict[str, Any]) -> str:
    return _TASK_RUN_NAMES[parameters["step"]]


async def run_step(step: str) -> Any:
    """The body of every step task: run the work registered under this step key."""
    return await _PENDING[step]()


class StepKeyPolicy(CachePolicy):
    """Cache key = the precomputed step key passed as the task's only parameter."""

    def compute_key(
        self,
        task_ctx: TaskRunContext,
        inputs: dict[str, Any],
        flow_parameters: dict[str, Any],
        **kwargs: Any,
    ) -> str | None:
        key = inputs.get("step")
        return key if isinstance(key, str) else None


_RETRYABLE_HTTP_4XX = frozenset({408, 409, 425, 429})


def is_permanent(exc: BaseException) -> bool:
    """Errors that retrying the same step cannot fix: configuration, rejected requests, exhausted tool retries."""
    if isinstance(exc, ModelHTTPError):
        return 400 <= exc.status_code < 500 and exc.status_code not in _RETRYABLE_HTTP_4XX
    return isinstance(
        exc,
        UserError
        | ModelRequestRejectedError
        | UsageLimitExceeded
        | UnexpectedModelBehavior
        | UnverifiedEffectError,
    )


def _retry_condition(user_condition: Callable[..., Any] | None) -> Callable[..., Awaitable[bool]]:
    async def should_retry(task: Task[Any, Any], task_run: TaskRun, state: State[Any]) -> bool:
        if isinstance(state.data, BaseException) and is_permanent(state.data):
            return False
        if user_condition is None:
            return True
        verdict = user_condition(task, task_run, state)
        if inspect.isawaitable(verdict):
            verdict = await verdict
        return bool(verdict)

    return should_retry


_MAX_RETRY_AFTER = 120.0


def _retry_after(exc: BaseException) -> float:
    """Seconds a rate-limited provider asked us to wait (`Retry-After`), capped; 0 when it did not ask."""
    seconds = getattr(exc, "retry_after", None)
    if isinstance(seconds, int | float) and seconds > 0:
        return min(float(seconds), _MAX_RETRY_AFTER)
    return 0.0


RETRY_AFTER: dict[str, float] = {}
"""Task run id → the Retry-After its next attempt waits out (longer than the retry delay Prefect announces):
read once by the line that announces the retry (`step_logs`)."""


def _remember_retry_after(seconds: float) -> None:
    context = TaskRunContext.get()
    if seconds > 0 and context is not None:
        # a step whose retries ran out leaves its entry: keep the table bounded
        while len(RETRY_AFTER) >= 1000:
            RETRY_AFTER.pop(next(iter(RETRY_AFTER)))
        RETRY_AFTER[str(context.task_run.id)] = seconds


INTERRUPTED = "interrupted: the run was cancelled (Ctrl-C, or its task was cancelled)"


def describe_failure(exc: BaseException) -> str:
    """How a failed step or run reads: `Type: message`, or `INTERRUPTED` for a cancellation, whose own text is
    an asyncio cancel-scope message (`Cancelled via cancel scope 7f80...`) or nothing at all."""
    if isinstance(exc, asyncio.CancelledError | KeyboardInterrupt):
        return INTERRUPTED
    return f"{type(exc).__name__}: {exc}"


class StepTimeoutError(TimeoutError):
    """One attempt at a step ran longer than its `timeout_seconds`."""


async def _within(seconds: float | None, work: Callable[[], Awaitable[Any]], what: str) -> Any:
    """Run `work()`, giving up after `seconds`.

    We enforce the timeout ourselves instead of through Prefect's: pydantic-ai runs a sync tool in a worker
    thread whose await is shielded from cancellation, so a cancelling timeout would only fire once the thread
    returned. Here the attempt is abandoned at the deadline (an async step is cancelled; a sync tool's thread
    finishes in the background and its result is discarded) and the retry starts on time.
    """
    if seconds is None:
        return await work()
    running = asyncio.ensure_future(work())
    try:
        done, _ = await asyncio.wait({running}, timeout=seconds)
    except asyncio.CancelledError:
        running.cancel()
        raise
    if running in done:
        return running.result()
    running.cancel()
    running.add_done_callback(lambda task: task.cancelled() or task.exception())
    raise StepTimeoutError(f"{what} timed out after {seconds:g}s")


_ordinals: dict[tuple[Any, int], int] = {}


def _next_ordinal() -> int:
    """The next step number of the current flow run attempt (every agent in it shares the count)."""
    context = FlowRunContext.get()
    run = context.flow_run if context is not None else None
    attempt = (run.id, run.run_count) if run is not None else (None, 0)
    if attempt not in _ordinals and len(_ordinals) >= 256:
        del _ordinals[next(iter(_ordinals))]  # the oldest attempt: long finished
    _ordinals[attempt] = _ordinals.get(attempt, 0) + 1
    return _ordinals[attempt]


@dataclass(frozen=True)
class StepEvent:
    """One finished step, as progress displays see it."""

    agent: str
    kind: StepKind
    name: str
    replayed: bool
    attempts: int
    seconds: float
    error: str | None = None
    ordinal: int = 0

    @property
    def title(self) -> str:
        return step_title(self.kind, self.ordinal, self.name)


_observers: list[Callable[[StepEvent], None]] = []


def observe_steps(callback: Callable[[StepEvent], None]) -> Callable[[], None]:
    """Call `callback` after every step in this process (live progress); returns a function that stops it."""
    _observers.append(callback)
    return lambda: _observers.remove(callback)


def _notify(event: StepEvent) -> None:
    for callback in list(_observers):
        callback(event)


@dataclass
class StepResult:
    """What a step returned, and whether it came from the journal or from running the work."""

    data: Any
    replayed: bool
    attempts: int


NOTHING: Any = object()
"""What `StepTasks.prefetch` returns when there is no journal entry to replay."""


class StepTasks:
    """The Prefect tasks of one kind of step, one per name (`model: gpt-4o`, `tool: search`), built once."""

    def __init__(self, kind: StepKind, config: TaskConfig, *, agent: str) -> None:
        self.kind = kind
        self.config = config
        self.agent = agent
        self.journaled = config.persist_result is not False and config.cache_policy is not NO_CACHE
        self._tasks: dict[tuple[str, bool, int], Task[Any, Any]] = {}
        self._storage: tuple[Any, Any] | None = None  # (the flow run's result store, the storage steps use)

    async def storage(self) -> Any:
        """The result storage of this flow run's step tasks: a `JournalFileSystem` where entries go to a local
        directory, else what the config (or the flow) says."""
        store = get_result_store()
        if self._storage is None or self._storage[0] is not store:
            configured = self.config.result_storage
            journal = await journal_storage(configured if configured is not None else store.result_storage)
            self._storage = (store, journal if journal is not None else configured or store.result_storage)
        return self._storage[1]

    def task(self, name: str, storage: Any = None, *, overwrite: bool = False) -> Task[Any, Any]:
        """The task for steps called `name` that journal to `storage`; `overwrite=True` re-executes and replaces
        a bad journal entry."""
        cached = self._tasks.get((name, overwrite, id(storage)))
        if cached is not None:
            return cached
        cfg = self.config
        policy: CachePolicy = StepKeyPolicy()
        if cfg.cache_policy is not None:
            policy = NO_CACHE if cfg.cache_policy is NO_CACHE else policy + cfg.cache_policy
        if self.journaled:
            policy = policy.configure(isolation_level="SERIALIZABLE", lock_manager=step_lock_manager())
        task: Task[Any, Any] = Task(
            fn=run_step,
            name=f"{self.kind}: {name}",
            retries=cfg.retries or 0,
            retry_delay_seconds=cfg.retry_delay_seconds or 0,
            retry_jitter_factor=cfg.retry_jitter_factor,
            retry_condition_fn=_retry_condition(cfg.retry_condition_fn),
            cache_policy=policy,
            persist_result=self.journaled,
            result_storage=None if isinstance(storage, JournalFileSystem) else storage,
            result_serializer="json",
            log_prints=bool(cfg.log_prints),
            # No tags of our own: Prefect asks the server for a concurrency slot for every tagged task run.
            tags=cfg.tags,
            # Named per call (the ordinal varies); Prefect calls it with the parameters, its protocol type says so
            # with a marker method plain functions lack.
            task_run_name=_named_task_run,  # type: ignore[arg-type]
            refresh_cache=True if overwrite else None,
        )
        if isinstance(storage, JournalFileSystem):
            # Set after construction: `Task()` accepts only saved blocks, since a task's configuration may be sent
            # to another process (`.delay()`). Step tasks always run in the process that built them, and this
            # storage is an unsaved view of the same local directory, rebuilt in every process.
            task.result_storage = storage
        self._tasks[(name, overwrite, id(storage))] = task
        return task

    async def run(
        self,
        name: str,
        key: str,
        work: Callable[[], Awaitable[Any]],
        *,
        unverified: Callable[[], Awaitable[Any]] | None = None,
        journaled: Any = NOTHING,
        on_step: Callable[[str, StepPhase], Awaitable[None]] | None = None,
    ) -> StepResult:
        """Run `work` as the step `key`, or replay its journal entry; `work` returns the entry to store.

        With `unverified` (a step that must not silently happen twice), each attempt leaves a "started" marker
        beside the journal until it finishes; an attempt that finds one left behind (its predecessor was killed
        or abandoned at its timeout) runs `unverified` instead, which returns the entry to store or `RUN_AGAIN`.
        `journaled` is the step's entry as `prefetch` read it, when the caller read ahead: it is replayed.
        `on_step(title, phase)` hears the step (`title`: its task run name) start executing, before `work`, and
        then complete or stop (fail, be cancelled or suspended). A replayed step calls it for neither.
        """
        attempts = 0
        transaction: BaseTransaction | None = None  # the step task's, which writes the entry when it commits
        started = time.perf_counter()
        wait_until = 0.0  # a server's Retry-After, honoured by the next attempt
        storage = await self.storage() if self.journaled else self.config.result_storage
        guarded = unverified is not None and self.journaled and storage is not None

        async def attempt() -> Any:
            nonlocal attempts, wait_until, transaction
            attempts += 1
            transaction = get_transaction()
            if attempts == 1 and self.journaled and not overwrite:
                await self._warn_if_entry_exists(name, key, storage)
            if (pause := wait_until - time.monotonic()) > 0:
                await asyncio.sleep(pause)
            limit = self.config.concurrency_limit
            # a provider slot is held while this attempt executes, never while waiting to retry
            async with limit.slot(name) if limit is not None else contextlib.nullcontext():
                return await executing()

        async def executing() -> Any:
            nonlocal wait_until
            with within_step(key, title):
                if on_step is not None:
                    await on_step(title, "started")
                if guarded:  # outside the `try` below: a failure to decide leaves the marker as it was
                    assert unverified is not None
                    if await self._started_before(name, storage, key):
                        if (decided := await unverified()) is not RUN_AGAIN:
                            return decided
                    else:
                        await _set_marker(storage, key, _STARTED)
                try:
                    return await _within(self.config.timeout_seconds, work, f"{self.kind} step {name!r}")
                except Exception as exc:
                    current_redactor().scrub_exception(exc)  # before Prefect records it as the step's state
                    after = _retry_after(exc)
                    wait_until = time.monotonic() + after
                    _remember_retry_after(after)
                    if guarded and not isinstance(exc, StepTimeoutError | UnverifiedEffectError):
                        await _set_marker(storage, key, _FINISHED)  # it reported failure: nothing unverified
                    raise

        overwrite = False
        ordinal = _next_ordinal()
        title = task_run_name(self.kind, ordinal, name, self.agent)
        if self._instant(storage):
            data = journaled
            if data is NOTHING:
                data, corrupt = await self._journaled_data(name, key, storage)
                if corrupt is not None:
                    self._warn_corrupt(name, corrupt)
                    overwrite = True
            if data is not NOTHING:
                self._record_replay(name, key, storage, ordinal)
                self._report(name, ordinal, True, 0, started)
                return self._indexed(StepResult(data=data, replayed=True, attempts=0), ordinal, name, key)
            if (fork := forking()) is not None:
                forked = await self._from_original(fork, name, key, storage, ordinal)
                if forked is not None:
                    self._report(name, ordinal, forked.replayed, 0, started)
                    return self._indexed(forked, ordinal, name, key)
            if self.config.memoize_seconds and (memo := memo_key(key)) is not None:
                data, _ = await self._journaled_data(name, memo, storage)
                if data is not NOTHING:
                    await self._write(name, storage, key, seal(self.kind, data))
                    self._record_replay(name, key, storage, ordinal)
                    self._report(name, ordinal, True, 0, started)
                    return self._indexed(StepResult(data=data, replayed=True, attempts=0), ordinal, name, key)
        record_replays()  # before anything executes: Prefect's timeline keeps the steps in order
        for _ in range(2):
            _PENDING[key] = attempt
            _TASK_RUN_NAMES[key] = title
            try:
                with _own_transaction():
                    entry = await self.task(name, storage, overwrite=overwrite)(key)
            except BaseException as exc:
                if attempts and on_step is not None:
                    await on_step(title, "stopped")
                if isinstance(exc, Exception):
                    retried = (
                        "not retried: retrying cannot fix it"
                        if is_permanent(exc)
                        else f"after {attempts} attempt(s)"
                    )
                    exc.add_note(f"in {self.kind} step {name!r}, {retried}")
                self._report(name, ordinal, False, attempts, started, describe_failure(exc))
                raise
            else:
                if attempts and on_step is not None:
                    await on_step(title, "completed")
            finally:
                _PENDING.pop(key, None)
                _TASK_RUN_NAMES.pop(key, None)
            if attempts and self.journaled and transaction is not None:
                try:
                    await self._journal_if_not_written(name, key, storage, entry, transaction)
                except StorageWriteError as exc:
                    self._report(name, ordinal, False, attempts, started, describe_failure(exc))
                    raise
            try:
                result = StepResult(data=unseal(entry, self.kind), replayed=attempts == 0, attempts=attempts)
            except JournalCorruptError as exc:
                if attempts:
                    raise
                self._warn_corrupt(name, exc)
                overwrite = True
                continue
            if guarded and attempts:
                await _set_marker(storage, key, _FINISHED)  # journaled now: the effect is verified
            if attempts and self.config.memoize_seconds and (memo := memo_key(key)) is not None:
                until = datetime.now(UTC) + timedelta(seconds=self.config.memoize_seconds)
                await self._write(name, storage, memo, entry, expiration=until)
            self._report(name, ordinal, result.replayed, attempts, started)
            return self._indexed(result, ordinal, name, key)
        raise AgentRunError(
            f"{self.kind} step {name!r} could not be journaled"
        )  # pragma: no cover - loop guard

    def _indexed(self, result: StepResult, ordinal: int, name: str, key: str) -> StepResult:
        """Add the step to the index of its agent run (when one collects: `index_steps`)."""
        index = _index.get()
        if index is not None:
            index.append(
                StepRef(ordinal=ordinal, kind=self.kind, name=name, key=key, replayed=result.replayed)
            )
        return result

    async def _from_original(
        self, fork: ForkSource, name: str, key: str, storage: Any, ordinal: int
    ) -> StepResult | None:
        """In a fork, the step answered without running: a step before `fork.at` by the original run's entry of
        the same step (replayed), the tool step at `fork.at` by the edited result. Either is written under the
        fork's own key first, so the fork resumes without its original. `None`: the step runs live."""
        data: Any = NOTHING
        if ordinal < fork.at and (original := fork.aliases.get(key)) is not None:
            data, _ = await self._journaled_data(name, original, storage)
            replayed = True
        elif ordinal == fork.at and self.kind == "tool" and fork.tool_result is not NO_RESULT:
            data = {"outcome": "return", "value": fork.tool_result}
            replayed = False
        if data is NOTHING:
            return None
        await self._write(name, storage, key, seal(self.kind, data))
        if replayed:
            fork.replayed += 1
            self._record_replay(name, key, storage, ordinal)
        return StepResult(data=data, replayed=replayed, attempts=0)

    async def _write(
        self, name: str, storage: Any, key: str, entry: Any, *, expiration: datetime | None = None
    ) -> None:
        """Store `entry` under `key` as a step's result record (Prefect's result store writes it)."""
        store = await get_result_store().aupdate_for_task(self.task(name, storage))
        await store.awrite(obj=entry, key=key, expiration=cast(Any, expiration))

    async def _journal_if_not_written(
        self, name: str, key: str, storage: Any, entry: Any, transaction: BaseTransaction
    ) -> None:
        """Make sure the entry of the step that just executed is stored. Prefect writes it when the step's
        transaction commits; a write that fails there (the storage answered 500, timed out, the disk is full) is
        logged and rolled back, and the step still completes, so a resume would execute it again. Write it once
        more through the same result store; if that fails too, fail the step naming the storage and the cause."""
        if transaction.state is not TransactionState.ROLLED_BACK or transaction.store is None:
            return
        try:
            await transaction.store.awrite(obj=entry, key=key)
        except Exception as exc:
            where = storage.entry_path(key) if isinstance(storage, JournalFileSystem) else key
            raise StorageWriteError(
                f"{self.kind.capitalize()} step {name!r} completed, but its journal entry could not be written "
                f"to {str(where)!r} in the result storage {describe_storage(storage)}: {describe_cause(exc)}. "
                "The run stops here: fix the storage, then resume the run (the step runs again unless its "
                "entry did reach the storage)."
            ) from exc
        logger.warning(
            "Journal entry of %s step %r was not written when the step completed; written on a second try.",
            self.kind,
            name,
        )

    async def _started_before(self, name: str, storage: Any, key: str) -> bool:
        """Whether an earlier attempt of guarded step `key` started and never finished (its marker says
        "started"). A marker that cannot be read is no answer: `StorageReadError`, and the step does not run."""
        try:
            return await read_if_present(storage, f"{key}.started") == _STARTED
        except StorageReadError as exc:
            raise StorageReadError(
                f"{self.kind.capitalize()} step {name!r} cannot tell whether an earlier attempt started it, so it "
                f"does not run: {exc}. Fix the storage, then resume the run."
            ) from exc

    def _instant(self, storage: Any) -> bool:
        """Whether a journaled step of these tasks is answered from the journal without a task run: the journal is
        on, under our step keys alone (a user cache policy decides for itself), in a known storage."""
        return self.journaled and self.config.cache_policy is None and storage is not None

    async def prefetch(self, name: str, key: str) -> Any:
        """The verified data of step `key`'s journal entry, read before the step runs so that its caller can skip
        work only an executed step needs; passed to `run(journaled=)`, the step replays it without reading it
        again. `NOTHING` when there is none to replay instantly (a corrupt one: `run` finds it as before)."""
        storage = await self.storage() if self.journaled else None
        if not self._instant(storage):
            return NOTHING
        data, _ = await self._journaled_data(name, key, storage)
        return data

    async def _journaled_data(
        self, name: str, key: str, storage: Any
    ) -> tuple[Any, JournalCorruptError | None]:
        """The verified data of step `key`'s journal entry (`NOTHING` without one), or why the entry is corrupt."""
        entry = await self._journaled_entry(name, key, storage)
        if entry is None:
            return NOTHING, None
        try:
            return unseal(entry, self.kind), None
        except JournalCorruptError as exc:
            return NOTHING, exc

    def _warn_corrupt(self, name: str, exc: JournalCorruptError) -> None:
        logger.warning(
            "Journal entry of %s step %r is corrupt (%s); running the step again.", self.kind, name, exc
        )

    async def _journaled_entry(self, name: str, key: str, storage: Any) -> Any:
        """The journal entry stored under `key` (Prefect's result record, parsed by Prefect's own class), or `None`
        when there is none to replay instantly: absent, not a result record, expired, or kept apart from its
        metadata. A read that fails raises `StorageReadError`: whether the step completed is unknown, and Prefect
        would take the failure for "not stored" and execute the step again."""
        where = storage
        if not isinstance(storage, JournalFileSystem):
            view = await get_result_store().aupdate_for_task(self.task(name, storage))
            if view.result_storage is None or view.metadata_storage is not None:
                return None
            where = view.result_storage
        try:
            content = await read_if_present(where, key)
        except StorageReadError as exc:
            raise StorageReadError(
                f"{self.kind.capitalize()} step {name!r} cannot tell whether it completed in an earlier attempt, "
                f"so it does not run: {exc}. Fix the storage, then resume the run."
            ) from exc
        if content is None:
            return None
        try:
            result, expiration = read_result_record(content)
        except Exception:
            return None
        if expiration is not None and expiration <= datetime.now(UTC):
            return None
        return result

    def _report(
        self, name: str, ordinal: int, replayed: bool, attempts: int, started: float, error: str | None = None
    ) -> None:
        """Tell the progress observers, if any, how this step ended."""
        if _observers:
            _notify(
                StepEvent(
                    self.agent,
                    self.kind,
                    name,
                    replayed,
                    attempts,
                    time.perf_counter() - started,
                    error,
                    ordinal,
                )
            )

    def _record_replay(self, name: str, key: str, storage: Any, ordinal: int) -> None:
        """Note that this step was answered from the journal; `record_replays()` tells Prefect."""
        context = FlowRunContext.get()
        parent = TaskRunContext.get()
        _replays.append(
            _Replay(
                task_key=self.task(name, storage).task_key,
                name=task_run_name(self.kind, ordinal, name, self.agent),
                key=key,
                flow_run_id=context.flow_run.id if context is not None and context.flow_run else None,
                flow_run_count=context.flow_run.run_count if context is not None and context.flow_run else 0,
                parent=parent.task_run.id if parent is not None else None,
                at=datetime.now(UTC),
            )
        )

    async def _warn_if_entry_exists(self, name: str, key: str, storage: Any) -> None:
        """Called when Prefect decided to execute a step: an entry already stored under its key was unreadable
        (Prefect treats those as absent, rightly but silently), so say so. A readable entry with a bad checksum
        is caught in `run` instead."""
        if isinstance(storage, JournalFileSystem):  # the common case: one stat, no thread hop
            if not storage.entry_path(key).exists():
                return
        else:
            view = await get_result_store().aupdate_for_task(self.task(name, storage))
            if view.result_storage is None or view.metadata_storage is not None:
                return
            try:
                await _read_path(view.result_storage, key)
            except Exception:
                return  # nothing stored yet
        logger.warning(
            "Journal entry %s of %s step %r is unreadable (corrupt); running the step again.",
            key[:12],
            self.kind,
            name,
        )


@dataclass(frozen=True)
class _Replay:
    """A step answered from the journal, not yet recorded in Prefect."""

    task_key: str
    name: str
    key: str
    flow_run_id: UUID | None
    flow_run_count: int
    parent: UUID | None
    at: datetime


_replays: list[_Replay] = []


_recorder: ThreadPoolExecutor | None = None
_recording: list[Future[None]] = []


def record_replays(*, wait: bool = False) -> None:
    """Record the steps replayed since the last call as "Cached" task runs, as Prefect records one: one task-run
    state event each (the event Prefect's task engine sends), queued for Prefect's background events worker.

    Called before a step executes and when a run ends (`wait=True`: until every batch is queued), not at each
    replay. Building the events costs about as much CPU as replaying the steps, so a batch is built in a
    background thread while the run goes on (the executing step mostly waits on the network); each record
    carries the moment of its replay, so Prefect's timeline keeps the steps in order. A process killed during a
    stretch of replays loses their records (the journal, and so the next attempt, is unaffected).
    """
    global _recorder
    if _replays:
        batch = list(_replays)
        _replays.clear()
        if _recorder is None:
            _recorder = ThreadPoolExecutor(max_workers=1, thread_name_prefix="prefect-pydantic-ai-replays")
        _recording.append(_recorder.submit(contextvars.copy_context().run, _record, batch))
    if wait:
        while _recording:
            _recording.pop(0).result()


def _record(batch: list[_Replay]) -> None:
    for replay in batch:
        inputs: dict[str, Any] = {}
        if replay.parent is not None:
            inputs["__parents__"] = [TaskRunResult(id=replay.parent)]
        task_run = TaskRun(  # its id: a new uuid7, as Prefect's own task runs get
            name=replay.name,
            flow_run_id=replay.flow_run_id,
            flow_run_run_count=replay.flow_run_count,
            task_key=replay.task_key,
            dynamic_key=replay.key,
            cache_key=replay.key,
            task_inputs=inputs,
            expected_start_time=replay.at,
            start_time=replay.at,
            end_time=replay.at,
        )
        details = StateDetails(task_run_id=task_run.id, flow_run_id=task_run.flow_run_id)
        pending: State[Any] = Pending(state_details=details)
        cached: State[Any] = Completed(
            name="Cached", state_details=details.model_copy(update={"cache_key": replay.key})
        )
        pending.timestamp = cached.timestamp = replay.at
        task_run.state, task_run.state_id = cached, cached.id
        task_run.state_type, task_run.state_name = cached.type, cached.name
        emit_task_run_state_change_event(task_run=task_run, initial_state=pending, validated_state=cached)


_STARTED, _FINISHED = b"started", b"finished"
"""What a guarded step's marker (`<key>.started`, beside its journal entry) holds while an attempt runs, and after."""


async def _read_path(storage: Any, path: str) -> bytes:
    """Read `path` from any result storage block (async where it has `aread_path`)."""
    reader = getattr(storage, "aread_path", None)
    return bytes(await (reader(path) if reader is not None else storage.read_path(path)))


async def _set_marker(storage: Any, key: str, state: bytes) -> None:
    writer = getattr(storage, "awrite_path", None)
    path = f"{key}.started"
    await (writer(path, state) if writer is not None else storage.write_path(path, state))
