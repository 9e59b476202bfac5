"""Run records: one small JSON document per agent run, kept in Prefect's result storage beside the journal.

A flow run that holds agent runs is tagged `prefect-pydantic-ai` and `agent:<name>` (and `key:<idempotency key>`).
Its run record says how to re-create the run (the import path of the agent or of the user's flow, and its inputs
with secret-looking values removed), which process runs it (so a killed run is recognised as crashed), and per
finished attempt its output or error and its spent/saved ledger.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import re
import socket
import sys
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, Field

from prefect_pydantic_ai.errors import RunError, StorageWriteError
from prefect_pydantic_ai.ledger import Ledger
from prefect_pydantic_ai.prefect_settings import prefect_settings
from prefect_pydantic_ai.store.prefect_rest import prefect_api

logger = logging.getLogger("prefect_pydantic_ai")
_unrecorded: set[str] = set()  # the records whose progress could not be written, each said once

_RECORD_FORMAT = "prefect-pydantic-ai/run/1"
HOST = socket.gethostname()


class StepRef(BaseModel):
    """One step an attempt took, in order: where its journal entry lives (`key`) and what it was."""

    ordinal: int
    """The step's `#` in its attempt (`show`'s numbering)."""
    kind: Literal["model", "tool"]
    name: str
    """The model's or tool's name."""
    key: str
    replayed: bool = False


class AttemptRecord(BaseModel):
    """What one attempt (flow run count) of an agent run ended with."""

    run_count: int
    state: Literal["completed", "failed", "running", "waiting"]
    """`running` until the attempt ends: an attempt whose process died stays `running` in its record. `waiting`:
    it ended to wait for a human's decision (the run is paused, not crashed)."""
    finished_at: datetime
    output: Any = None
    error: str | None = None
    ledger: Ledger = Field(default_factory=Ledger)
    steps: list[StepRef] = Field(default_factory=list)
    """The steps the attempt took, in order, written when it ends: what `export` and `gc` read the journal by."""
    in_steps: list[str] = Field(default_factory=list, exclude=True)
    """While the attempt runs: the steps it is executing (task run names, `tool #4: search @ analyst`; several
    for parallel tool calls). A killed attempt keeps the steps it died in, even those Prefect never heard of."""
    completed_steps: list[str] = Field(default_factory=list, exclude=True)
    """The steps the attempt completed, as its progress log says (a killed process's last task-run events may
    never have reached Prefect). Both lists are read back from the log (`StepMark`), not written here."""
    last_seen: datetime | None = Field(default=None, exclude=True)
    """When its progress log last heard of an attempt that has not ended: about when a killed one died."""


class StepMark(BaseModel):
    """A progress-log line: the steps attempt `run_count` is executing now, as one starts or ends (`completed`:
    the one that just completed; `started`: the journal key of the one that just started, which is how `gc`
    finds the entries of an attempt that was killed and so never recorded its steps)."""

    run_count: int
    in_steps: list[str]
    completed: str | None = None
    started: str | None = None
    at: datetime = Field(default_factory=lambda: datetime.now(UTC))


class RunRecord(BaseModel):
    """Everything needed to list, show and re-create one agent run, minus anything that looks like a secret."""

    format: str = _RECORD_FORMAT
    flow_run_id: str
    agent: str
    ordinal: int
    idempotency_key: str | None = None
    entrypoint: str | None = None
    entrypoint_kind: Literal["agent", "flow"] = "agent"
    prompt: str | None = None
    deps: Any = None
    metadata: Any = None
    """The run's metadata as journaled (secret-looking values redacted): it seeds the step keys."""
    redacted: list[str] = Field(default_factory=list)
    host: str = HOST
    pid: int = Field(default_factory=os.getpid)
    started_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    attempts: list[AttemptRecord] = Field(default_factory=list)
    recall_of: str | None = None
    """For a re-call of a completed idempotency key: the flow run that did the work."""
    parent_step: str | None = None
    """For a sub-agent run (started inside a step of another agent run of this flow run): that step's key; its
    `ordinal` then counts the runs of this agent within that step."""
    parent_step_name: str | None = None
    """The task run name of that step, `tool: <name> @ <agent>`."""
    forked_from: str | None = None
    """For a fork (`fork_run`): the flow run whose journal answered the steps before `forked_at`."""
    forked_at: int | None = None
    """For a fork: the first step it ran live (the steps before it replayed the original's)."""

    @property
    def path(self) -> str:
        """Where this record lives in the result storage (`record_path`)."""
        return record_path(self.flow_run_id, self.agent, self.ordinal, self.parent_step)


def record_path(flow_run_id: str, agent: str, ordinal: int, parent_step: str | None = None) -> str:
    """Where a run record lives; a sub-agent run's record lives under the key of the step that started it."""
    if parent_step is not None:
        return f"prefect-pydantic-ai/runs/{flow_run_id}/steps/{parent_step}/{agent}.{ordinal}.json"
    return f"prefect-pydantic-ai/runs/{flow_run_id}/{agent}.{ordinal}.json"


async def write_record(record: RunRecord, then: str) -> None:
    """Write the run record; `StorageWriteError` naming the storage and the cause when it cannot be written, the
    message ending with `then`: what the failure means for the run and what to do."""
    from prefect_pydantic_ai.store.journal_storage import describe_cause, describe_storage

    storage = await _storage()
    try:
        await _put_record(storage, record)
    except Exception as exc:
        raise StorageWriteError(
            f"The run record of agent {record.agent!r} could not be written to {record.path!r} in the result storage "
            f"{describe_storage(storage)}: {describe_cause(exc)}. {then}"
        ) from exc


async def _put_record(storage: Any, record: RunRecord) -> None:
    await storage.awrite_path(record.path, record.model_dump_json(indent=1).encode())


async def write_progress(record: RunRecord, attempt: AttemptRecord) -> None:
    """Record how far a running `attempt` got (what it spent so far), after each step it executes.

    In a local directory this appends one line to the record's progress log: rewriting the record (written
    atomically, by renaming over it) costs a filesystem flush each time, on ext4 about 2 ms, more than a
    step's own journal entry. `read_record` reads the log back; a line torn by a kill is skipped. Elsewhere
    (S3, saved blocks) nothing can be appended, so the record itself is rewritten. Progress is bookkeeping, not
    the journal: a write that fails is said once per run, and the run goes on (`_progress_failed`).
    """
    from prefect_pydantic_ai.store.journal_storage import JournalFileSystem

    storage = await _storage()
    try:
        if isinstance(storage, JournalFileSystem):
            _append_progress(storage, record, attempt)
        else:
            await _put_record(storage, record)
    except Exception as exc:
        _progress_failed(record, storage, exc)


async def write_step_mark(
    record: RunRecord,
    run_count: int,
    in_steps: list[str],
    completed: str | None = None,
    started: str | None = None,
) -> None:
    """Record the steps attempt `run_count` is executing now (their task run names), as one starts or ends;
    `completed` names the step that just completed, `started` is the key of the step that just started.

    Prefect hears of a step's task run from events its client sends in the background, so a process killed in
    a step's first milliseconds can take that step with it; this line, appended before the step's work begins,
    still says where it died. Only a local directory can take a line this cheaply (an append, no flush), so
    other storages record no marks. A mark that cannot be written is said once per run, as progress is."""
    from prefect_pydantic_ai.store.journal_storage import JournalFileSystem

    storage = await _storage()
    if isinstance(storage, JournalFileSystem):
        mark = StepMark(run_count=run_count, in_steps=in_steps, completed=completed, started=started)
        try:
            _append_progress(storage, record, mark)
        except OSError as exc:
            _progress_failed(record, storage, exc)


def _progress_failed(record: RunRecord, storage: Any, exc: Exception) -> None:
    """Say once per run that its progress could not be recorded: its steps are journaled apart from it, so the
    run goes on; only what `show` and `costs` tell of this attempt, if it is killed, is older."""
    from prefect_pydantic_ai.store.journal_storage import describe_cause, describe_storage

    if record.path in _unrecorded:
        return
    _unrecorded.add(record.path)
    logger.warning(
        "The progress of run %s (agent %r) could not be recorded in the result storage %s: %s. The run goes on "
        "(its steps are journaled); if it is killed, `show` and `costs` tell less of this attempt.",
        record.flow_run_id,
        record.agent,
        describe_storage(storage),
        describe_cause(exc),
    )


def _append_progress(storage: Any, record: RunRecord, entry: AttemptRecord | StepMark) -> None:
    """Append `entry` to the progress log of `record`, as one line."""
    # A line starts with its newline: one torn by a kill cannot swallow the next attempt's first line.
    storage.append_path(_progress_path(record.path), b"\n" + entry.model_dump_json().encode())


def _progress_path(path: str) -> str:
    return path.removesuffix(".json") + ".progress.jsonl"


async def read_record(
    flow_run_id: str, agent: str, ordinal: int, parent_step: str | None = None
) -> RunRecord | None:
    """The run record, None when there is none; `RunError` naming the storage and the cause when it cannot be
    read or is not a run record (an unreadable record is never taken for a missing one)."""
    return await _read_record_at(record_path(flow_run_id, agent, ordinal, parent_step), await local_root())


async def _read_record_at(path: str, root: Path | None) -> RunRecord | None:
    """`read_record` of the record at `path`, in the local directory `root` (None: in the result storage)."""
    if root is not None:
        try:
            data = (root / path).read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise RunError(f"Cannot read the run record {root / path}: {exc}") from None
    else:
        storage = await _storage()
        try:
            data = await storage.aread_path(path)
        except Exception as exc:
            if _is_missing(exc):
                return None
            raise RunError(
                f"Cannot read the run record {path} from {await record_storage_name()} "
                f"({type(exc).__name__}: {exc})."
            ) from None
    try:
        record = RunRecord.model_validate_json(data)
    except ValueError as exc:
        where = root / path if root is not None else path
        raise RunError(f"The run record {where} is not one ({type(exc).__name__}); it was damaged.") from None
    if root is not None:
        _merge_progress(record, root / _progress_path(path))
    return record


def _is_missing(exc: Exception) -> bool:
    """Whether a result storage's read error says "no such file" (a local directory's ValueError, S3's 404)."""
    if isinstance(exc, FileNotFoundError) or (isinstance(exc, ValueError) and "does not exist" in str(exc)):
        return True
    error = getattr(exc, "response", None)
    code = error.get("Error", {}).get("Code") if isinstance(error, dict) else None
    return code in ("404", "NoSuchKey", "NotFound")


_local_roots: dict[tuple[str | None, str], Path | None] = {}


async def local_root() -> Path | None:
    """The local directory run records live in when the result storage is one (Prefect's default), else None.

    With Prefect imported this is what a run's own storage is; without, it is found as Prefect finds it (no
    storage block in the settings, none named by the server), without importing it."""
    if "prefect.results" in sys.modules:
        from prefect_pydantic_ai.store.journal_storage import JournalFileSystem

        storage = await _storage()
        return storage.root() if isinstance(storage, JournalFileSystem) else None
    settings = prefect_settings()
    if settings.default_storage_block is not None:
        return None
    known = (settings.api_url, str(settings.local_storage_path))
    if known not in _local_roots:
        async with prefect_api() as api:
            named = await api.default_storage_block_id()
        _local_roots[known] = (
            None if named is not None else settings.local_storage_path.expanduser().resolve()
        )
    return _local_roots[known]


def _merge_progress(record: RunRecord, log: Path) -> None:
    """Add to `record` what its progress log holds of attempts that have not ended: the last spend line of each,
    and the steps its last mark says it was in."""
    try:
        lines = log.read_bytes().splitlines()
    except FileNotFoundError:
        return
    ended = {a.run_count for a in record.attempts if a.state != "running"}
    latest: dict[int, AttemptRecord] = {}
    marks: dict[int, StepMark] = {}
    completed: dict[int, list[str]] = {}
    for line in lines:
        if (count := _RUN_COUNT.match(line)) is not None and int(count[1]) in ended:
            continue  # an ended attempt's line: the record has its final state (most lines, read cheaply)
        entry = _progress_entry(line)
        if entry is None or entry.run_count in ended:
            continue
        if isinstance(entry, StepMark):
            marks[entry.run_count] = entry
            if entry.completed is not None:
                completed.setdefault(entry.run_count, []).append(entry.completed)
        else:
            latest[entry.run_count] = entry
    for run_count, mark in marks.items():
        attempt = latest.get(run_count) or next(
            (a for a in record.attempts if a.run_count == run_count),
            AttemptRecord(run_count=run_count, state="running", finished_at=mark.at),
        )
        latest[run_count] = attempt.model_copy(
            update={
                "in_steps": mark.in_steps,
                "completed_steps": completed.get(run_count, []),
                "last_seen": max(mark.at, attempt.finished_at),
            }
        )
    if latest:
        record.attempts = [a for a in record.attempts if a.run_count not in latest] + list(latest.values())
        record.attempts.sort(key=lambda a: a.run_count)


_RUN_COUNT = re.compile(rb'\{"run_count":(\d+),')
"""The start of every progress-log line (pydantic writes a model's fields in order; `run_count` is first)."""


def _progress_entry(line: bytes) -> AttemptRecord | StepMark | None:
    """A progress-log line read back: a spend line or a step mark; None for an empty line or one torn by a kill."""
    for kind in (AttemptRecord, StepMark):
        try:
            return kind.model_validate_json(line)
        except ValueError:
            continue
    return None


async def read_records(flow_run_id: str, agents: Iterable[str]) -> list[RunRecord]:
    """All agent-run records of a flow run, in agent order then ordinal order (sub-agent runs' records, which
    live under the step that started them, are not among them: their parent's ledger includes them)."""
    found: list[RunRecord] = []
    root = await local_root()  # once: `costs` reads the records of hundreds of runs
    for agent in agents:
        ordinal = 0
        while (record := await _read_record_at(record_path(flow_run_id, agent, ordinal), root)) is not None:
            found.append(record)
            ordinal += 1
    return found


_storage_of_flow_run: dict[Any, Any] = {}
_storage_of_settings: dict[tuple[str, str, str], Any] = {}


async def _storage() -> Any:
    """Prefect's default result storage (written atomically when it is a local directory): every machine that
    runs or resumes a run must see the same one (`PREFECT_DEFAULT_RESULT_STORAGE_BLOCK`, docs/scale-out.md).

    Resolving it asks the server for its default storage block, so inside a flow run it is resolved once per
    attempt (a run writes its record after every executed model step), and outside one once per process and
    settings, as `local_root` does without Prefect (`export`, `gc` and `show` read dozens of records: one
    request each took most of their time)."""
    from prefect.context import FlowRunContext
    from prefect.settings import get_current_settings

    from prefect_pydantic_ai.store.journal_storage import default_result_storage, journal_storage

    context = FlowRunContext.get()
    attempt = (context.flow_run.id, context.flow_run.run_count) if context and context.flow_run else None
    if attempt is not None:
        known = _storage_of_flow_run.get(attempt)
    else:
        settings = get_current_settings()
        where = (
            str(settings.api.url),
            str(settings.results.default_storage_block),
            str(settings.results.local_storage_path),
        )
        known = _storage_of_settings.get(where)
    if known is not None:
        return known
    default: Any = await default_result_storage()
    storage = await journal_storage(default) or default
    if attempt is not None:
        if len(_storage_of_flow_run) >= 64:
            del _storage_of_flow_run[next(iter(_storage_of_flow_run))]  # the oldest attempt: long finished
        _storage_of_flow_run[attempt] = storage
    else:
        _storage_of_settings[where] = storage
    return storage


async def result_storage() -> Any:
    """The result storage run records and journal entries live in (see `_storage`)."""
    return await _storage()


async def record_storage_name() -> str:
    """Where this machine looks for run records, as a user would name it: a saved block's slug, a bucket, a path."""
    from prefect.filesystems import LocalFileSystem

    from prefect_pydantic_ai.compat.prefect import saved_block_name

    storage = await _storage()
    block = saved_block_name(storage)
    if block:
        return f"block {storage.get_block_type_slug()}/{block}"
    if isinstance(storage, LocalFileSystem):
        return f"local directory {Path(storage.basepath or '.').expanduser().resolve()}"
    bucket = getattr(storage, "bucket_name", None)
    return f"{type(storage).__name__} {bucket}" if bucket else type(storage).__name__


def entrypoint_of(obj: object, module_name: str | None) -> str | None:
    """`module:attribute` (or `path/to/file.py:attribute` for a script) under which `obj` can be imported."""
    if module_name is None or (module := sys.modules.get(module_name)) is None:
        return None
    for attribute, value in vars(module).items():
        if value is obj:
            if module_name != "__main__":
                return f"{module_name}:{attribute}"
            spec = getattr(module, "__spec__", None)
            if spec is not None and spec.name:  # run with `python -m package.module`
                return f"{spec.name}:{attribute}"
            file = getattr(module, "__file__", None)
            return f"{Path(file).resolve()}:{attribute}" if file else None
    return None


def load_entrypoint(entrypoint: str) -> Any:
    """Import `module:attribute` or `file.py:attribute`; a clear `RunError` when that is not possible."""
    target, _, attribute = entrypoint.rpartition(":")
    if not target or not attribute:
        raise RunError(
            f"Invalid entrypoint {entrypoint!r}: use module:attribute or path/to/file.py:attribute."
        )
    _importable_from(str(Path(target).resolve().parent) if target.endswith(".py") else os.getcwd())
    try:
        if target.endswith(".py"):
            spec = importlib.util.spec_from_file_location("_prefect_pydantic_ai_resumed", target)
            if spec is None or spec.loader is None or not Path(target).exists():
                raise FileNotFoundError(target)
            module = importlib.util.module_from_spec(spec)
            sys.modules[spec.name] = module
            spec.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
        return getattr(module, attribute)
    except (ImportError, FileNotFoundError, AttributeError, SyntaxError) as exc:
        raise RunError(
            f"Cannot load the recorded entrypoint {entrypoint!r} ({type(exc).__name__}: {exc}). Make it importable "
            "from here (run from the project directory or fix PYTHONPATH), or pass --entrypoint module:attribute."
        ) from None


def _importable_from(directory: str) -> None:
    """Put `directory` first on `sys.path`, as Python does for the code it starts: `python -m pkg.mod` puts the
    working directory there and `python file.py` the file's own, so its sibling modules import. A console script
    (`prefect-pydantic-ai`) puts only its own bin directory there, and could not import the recorded code."""
    if directory not in sys.path:
        sys.path.insert(0, directory)


def rehydrate_deps(deps_type: Any, stored: Any) -> Any:
    """Rebuild deps from their journaled JSON (pandas frames from their `split` form)."""
    if stored is None:
        return None
    module = getattr(deps_type, "__module__", "") or ""
    if module.startswith("pandas") and getattr(deps_type, "__name__", "") == "DataFrame":
        import pandas as pd

        return pd.DataFrame(stored["data"], index=stored["index"], columns=stored["columns"])
    from pydantic import TypeAdapter

    return TypeAdapter(deps_type).validate_python(stored)


async def read_journal_entry(key: str) -> Any:
    """The journal entry stored under step `key` in the result storage (the sealed step data), `None` when
    there is none; `RunError` when it cannot be read or is no result record."""
    from prefect_pydantic_ai.compat.prefect import read_result_record
    from prefect_pydantic_ai.errors import StorageReadError
    from prefect_pydantic_ai.store.journal_storage import read_if_present

    try:
        content = await read_if_present(await _storage(), key)
    except StorageReadError as exc:
        raise RunError(str(exc)) from None
    if content is None:
        return None
    try:
        return read_result_record(content)[0]
    except Exception as exc:
        raise RunError(f"The journal entry {key} is not a result record ({type(exc).__name__}).") from None
