"""Agent runs as Prefect knows them: records, listing, step timelines, crash detection and resume.

Prefect is the system of record. A flow run that holds agent runs is tagged `prefect-pydantic-ai` and
`agent:<name>` (and `key:<idempotency key>`); its task runs, named `<kind>: <name> @ <agent>`, are the steps. Beside the journal entries, each agent
run writes one small JSON *run record* to Prefect's result storage: how to re-create the run (the import path of
the agent or of the user's flow, and its inputs with secret-looking values removed), the process that runs it (so a
killed run is recognised as crashed), and per finished attempt its output or error and its spent/saved ledger.
"""

from __future__ import annotations

import importlib
import importlib.util
import inspect
import itertools
import json
import os
import re
import socket
import sys
from collections.abc import Iterable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal
from uuid import UUID

from prefect import Flow, get_client
from prefect.client.orchestration import PrefectClient
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterId,
    FlowRunFilterStartTime,
    FlowRunFilterTags,
)
from prefect.client.schemas.objects import FlowRun, StateType, TaskRun
from prefect.client.schemas.sorting import FlowRunSort
from prefect.results import get_default_result_storage
from prefect.states import Crashed
from pydantic import BaseModel, Field

from .ledger import Ledger
from .locks import process_alive
from .storage import journal_storage

TAG = "prefect-pydantic-ai"
_RECORD_FORMAT = "prefect-pydantic-ai/run/1"
_HOST = socket.gethostname()

RunState = Literal["completed", "failed", "crashed", "running", "paused", "cancelled", "pending"]
StepStatus = Literal["executed", "replayed", "retried", "failed", "not_reached"]


class RunError(Exception):
    """A run cannot be found, resolved or resumed; the message says what to do. The CLI exits with code 2."""


# -- records ---------------------------------------------------------------------------------------------------


class AttemptRecord(BaseModel):
    """What one attempt (flow run count) of an agent run ended with."""

    run_count: int
    state: Literal["completed", "failed"]
    finished_at: datetime
    output: Any = None
    error: str | None = None
    ledger: Ledger = Field(default_factory=Ledger)


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
    redacted: list[str] = Field(default_factory=list)
    host: str = _HOST
    pid: int = Field(default_factory=os.getpid)
    started_at: datetime = Field(default_factory=lambda: datetime.now(UTC))
    attempts: list[AttemptRecord] = Field(default_factory=list)


def record_path(flow_run_id: str, agent: str, ordinal: int) -> str:
    return f"prefect-pydantic-ai/runs/{flow_run_id}/{agent}.{ordinal}.json"


async def write_record(record: RunRecord) -> None:
    storage = await _storage()
    data = record.model_dump_json(indent=1).encode()
    await storage.awrite_path(record_path(record.flow_run_id, record.agent, record.ordinal), data)


async def read_record(flow_run_id: str, agent: str, ordinal: int) -> RunRecord | None:
    storage = await _storage()
    try:
        data = await storage.aread_path(record_path(flow_run_id, agent, ordinal))
    except Exception:
        return None
    try:
        return RunRecord.model_validate_json(data)
    except ValueError:
        return None


async def read_records(flow_run_id: str, agents: Iterable[str]) -> list[RunRecord]:
    """All agent-run records of a flow run, in agent order then ordinal order."""
    found: list[RunRecord] = []
    for agent in agents:
        ordinal = 0
        while (record := await read_record(flow_run_id, agent, ordinal)) is not None:
            found.append(record)
            ordinal += 1
    return found


async def _storage() -> Any:
    """Prefect's default result storage (written atomically when it is a local directory)."""
    storage: Any = get_default_result_storage()
    storage = await storage if inspect.isawaitable(storage) else storage
    return await journal_storage(storage) or storage


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


# -- listing ---------------------------------------------------------------------------------------------------


class StepView(BaseModel):
    """One step in a run's timeline (the `show --json` schema)."""

    index: int
    kind: Literal["model", "tool"]
    name: str
    agent: str | None
    status: StepStatus
    attempts: int
    duration_s: float | None


class RunSummary(BaseModel):
    """One line of `runs` (the `runs --json` schema)."""

    run_id: str
    name: str
    idempotency_key: str | None
    agents: list[str]
    state: RunState
    steps_completed: int
    steps_replayed: int
    started: datetime | None
    duration_s: float | None
    run_count: int


def _state_of(flow_run: FlowRun) -> RunState:
    state = flow_run.state.type if flow_run.state else StateType.PENDING
    states: dict[StateType, RunState] = {
        StateType.COMPLETED: "completed",
        StateType.FAILED: "failed",
        StateType.CRASHED: "crashed",
        StateType.RUNNING: "running",
        StateType.PAUSED: "paused",
        StateType.CANCELLED: "cancelled",
        StateType.CANCELLING: "cancelled",
    }
    return states.get(state, "pending")


def _tag_values(flow_run: FlowRun, prefix: str) -> list[str]:
    return [tag.removeprefix(prefix) for tag in flow_run.tags if tag.startswith(prefix)]


def _step_kind(task_run: TaskRun) -> Literal["model", "tool"] | None:
    if task_run.name.startswith("model: "):
        return "model"
    if task_run.name.startswith("tool: "):
        return "tool"
    return None


def _step_name_and_agent(task_run: TaskRun) -> tuple[str, str | None]:
    """Step task runs are named `<kind>: <model or tool name> @ <agent>`."""
    name, _, agent = task_run.name.split(": ", 1)[1].rpartition(" @ ")
    return (name, agent) if name else (agent, None)


def _step_status(task_run: TaskRun, attempt_crashed: bool) -> StepStatus:
    state = task_run.state
    if state is None:
        return "failed"
    if state.name == "Cached":
        return "replayed"
    if state.type == StateType.COMPLETED:
        return "retried" if task_run.run_count > 1 else "executed"
    if state.type in (StateType.RUNNING, StateType.PENDING, StateType.SCHEDULED) and not attempt_crashed:
        return "executed"
    return "failed"


def timeline(task_runs: list[TaskRun], attempt: int, attempt_crashed: bool) -> list[StepView]:
    """The steps of one attempt of a flow run, in the order they started."""
    steps = [t for t in task_runs if t.flow_run_run_count == attempt and _step_kind(t) is not None]
    steps.sort(key=lambda t: t.start_time or t.expected_start_time or datetime.max.replace(tzinfo=UTC))
    views = []
    for index, task_run in enumerate(steps, start=1):
        name, agent = _step_name_and_agent(task_run)
        views.append(
            StepView(
                index=index,
                kind=_step_kind(task_run) or "tool",
                name=name,
                agent=agent,
                status=_step_status(task_run, attempt_crashed),
                attempts=max(task_run.run_count, 1) if task_run.state_name != "Cached" else 0,
                duration_s=task_run.total_run_time.total_seconds() if task_run.total_run_time else None,
            )
        )
    return views


def completed_before_the_kill(steps: list[StepView], following: list[StepView]) -> list[StepView]:
    """A killed attempt's steps, completed with what the next attempt proves: the steps it replayed were executed.

    Prefect learns about task runs from events sent in the background, and a process killed right after a step
    may take the last events with it: that step then shows "Running", or no task run at all. The next attempt
    replaying a step proves it completed, and in this attempt (had an earlier one completed it, this one would
    have replayed it).
    """
    shown = [
        step.model_copy(update={"status": "executed"})
        if step.status == "failed" and index < len(following) and following[index].status == "replayed"
        else step
        for index, step in enumerate(steps)
    ]
    for later in following[len(shown) :]:
        if later.status != "replayed":
            break
        shown.append(
            later.model_copy(
                update={"index": len(shown) + 1, "status": "executed", "attempts": 1, "duration_s": None}
            )
        )
    return shown


def not_reached(earlier: list[StepView], later: list[StepView], *, crashed: bool) -> list[StepView]:
    """Steps a later attempt ran beyond where an earlier attempt stopped: `⊘` in the earlier timeline.

    A process killed inside a step may die before Prefect records that step's task run; when the earlier
    attempt crashed, the first step it did not record is the one it was in: `✗`.
    """
    missing = later[len(earlier) :]
    return [
        StepView(
            index=len(earlier) + offset,
            kind=s.kind,
            name=s.name,
            agent=s.agent,
            status="failed"
            if crashed and offset == 1 and not any(e.status == "failed" for e in earlier)
            else "not_reached",
            attempts=int(crashed and offset == 1),
            duration_s=None,
        )
        for offset, s in enumerate(missing, start=1)
    ]


async def _task_runs(client: PrefectClient, flow_run_ids: list[UUID]) -> dict[UUID, list[TaskRun]]:
    grouped: dict[UUID, list[TaskRun]] = {i: [] for i in flow_run_ids}
    if not flow_run_ids:
        return grouped
    offset = 0
    while True:
        page = await client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=flow_run_ids)), limit=200, offset=offset
        )
        for task_run in page:
            if task_run.flow_run_id in grouped:
                grouped[task_run.flow_run_id].append(task_run)
        if len(page) < 200:
            return grouped
        offset += 200


async def _flow_runs(
    client: PrefectClient, flow_run_filter: FlowRunFilter, sort: FlowRunSort, limit: int
) -> list[FlowRun]:
    """Up to `limit` flow runs, read in pages (the API serves at most 200 at a time)."""
    found: list[FlowRun] = []
    while len(found) < limit:
        page = await client.read_flow_runs(
            flow_run_filter=flow_run_filter, sort=sort, limit=min(200, limit - len(found)), offset=len(found)
        )
        found += page
        if len(page) < 200:
            break
    return found


async def _mark_crashed_if_dead(client: PrefectClient, flow_run: FlowRun) -> FlowRun:
    """A running flow run whose recorded process on this host is gone is crashed: say so to Prefect."""
    if _state_of(flow_run) != "running":
        return flow_run
    records = await read_records(str(flow_run.id), _tag_values(flow_run, "agent:"))
    if not records:
        return flow_run
    latest = max(records, key=lambda r: r.started_at)
    if latest.host != _HOST or process_alive(latest.pid):
        return flow_run
    await client.set_flow_run_state(
        flow_run.id,
        Crashed(message=f"The process running it (pid {latest.pid} on {latest.host}) is gone."),
        force=True,
    )
    return await client.read_flow_run(flow_run.id)


async def list_runs(
    *, state: str | None = None, agent: str | None = None, limit: int = 20, since: datetime | None = None
) -> list[RunSummary]:
    """Flow runs holding agent runs, newest first, with crashed runs detected and marked as such."""
    tags = [TAG] + ([f"agent:{agent}"] if agent else [])
    async with get_client() as client:
        flow_runs = await _flow_runs(
            client,
            FlowRunFilter(
                tags=FlowRunFilterTags(all_=tags),
                start_time=FlowRunFilterStartTime(after_=since) if since else None,
            ),
            FlowRunSort.START_TIME_DESC,
            limit if state is None else max(limit * 5, 1000),
        )
        flow_runs = [await _mark_crashed_if_dead(client, fr) for fr in flow_runs]
        if state is not None:
            flow_runs = [fr for fr in flow_runs if _state_of(fr) == state][:limit]
        task_runs = await _task_runs(client, [fr.id for fr in flow_runs])
    summaries = []
    for fr in flow_runs:
        steps = timeline(task_runs[fr.id], fr.run_count, _state_of(fr) == "crashed")
        summaries.append(
            RunSummary(
                run_id=str(fr.id),
                name=fr.name,
                idempotency_key=next(iter(_tag_values(fr, "key:")), None),
                agents=_tag_values(fr, "agent:"),
                state=_state_of(fr),
                steps_completed=sum(s.status in ("executed", "retried", "replayed") for s in steps),
                steps_replayed=sum(s.status == "replayed" for s in steps),
                started=fr.start_time,
                duration_s=fr.total_run_time.total_seconds() if fr.total_run_time else None,
                run_count=fr.run_count,
            )
        )
    return summaries


async def resolve_run(ref: str) -> FlowRun:
    """A flow run by id, unique id prefix, or idempotency key (the newest run with that key)."""
    async with get_client() as client:
        try:
            return await _mark_crashed_if_dead(client, await client.read_flow_run(UUID(ref)))
        except ValueError:
            pass
        except Exception as exc:
            raise RunError(f"No flow run with id {ref}.") from exc
        by_key = await client.read_flow_runs(
            flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[TAG, f"key:{ref}"])),
            sort=FlowRunSort.START_TIME_DESC,
            limit=1,
        )
        if by_key:
            return await _mark_crashed_if_dead(client, by_key[0])
        if not re.fullmatch(r"[0-9a-fA-F-]{1,36}", ref):
            raise RunError(f"No agent run with idempotency key {ref!r}; see `prefect-pydantic-ai runs`.")
        tagged = await _flow_runs(
            client, FlowRunFilter(tags=FlowRunFilterTags(all_=[TAG])), FlowRunSort.START_TIME_DESC, 100_000
        )
        candidates = [fr for fr in tagged if str(fr.id).startswith(ref.lower())]
        if not candidates:
            raise RunError(f"No agent run matches {ref!r} (not an id, id prefix or idempotency key).")
        if len(candidates) > 1:
            shown = ", ".join(str(fr.id)[:12] for fr in candidates[:5])
            raise RunError(
                f"Run id prefix {ref!r} is ambiguous: it matches {len(candidates)} runs ({shown}...)."
            )
        return await _mark_crashed_if_dead(client, candidates[0])


class RunDetail(BaseModel):
    """A run's full picture (the `show --json` schema)."""

    run_id: str
    name: str
    idempotency_key: str | None
    agent: str | None
    agents: list[str]
    state: RunState
    run_count: int
    steps: list[StepView]
    earlier_attempts: list[list[StepView]]
    output: Any = None
    error: str | None = None
    ledger: Ledger | None = None


async def show_run(ref: str) -> RunDetail:
    """The timeline of the latest attempt of a run (and of its earlier attempts), its output and its ledger."""
    flow_run = await resolve_run(ref)
    key = next(iter(_tag_values(flow_run, "key:")), None)
    async with get_client() as client:
        runs = [flow_run]
        if key is not None:  # earlier processes of the same logical run are earlier attempts
            runs = await _flow_runs(
                client,
                FlowRunFilter(tags=FlowRunFilterTags(all_=[TAG, f"key:{key}"])),
                FlowRunSort.START_TIME_ASC,
                1000,
            )
            runs = [
                fr
                for fr in runs
                if fr.start_time is None
                or flow_run.start_time is None
                or fr.start_time <= flow_run.start_time
            ]
        task_runs = await _task_runs(client, [fr.id for fr in runs])
    agents = _tag_values(flow_run, "agent:")
    records = await read_records(str(flow_run.id), agents)
    ended = {a.run_count for r in records for a in r.attempts}  # attempts that finished (not killed)
    attempts: list[tuple[list[StepView], bool]] = []  # each attempt's steps, and whether its process died
    for fr in runs:
        for count in range(1, fr.run_count + 1):
            last = fr.id == flow_run.id and count == fr.run_count
            died = _state_of(fr) == "crashed" if fr.id != flow_run.id else count not in ended
            steps = timeline(task_runs[fr.id], count, _state_of(fr) == "crashed" or not last)
            if steps or last or died:  # a killed attempt may have lost every task-run event
                attempts.append((steps, died and not last))
    latest = attempts[-1][0]
    earlier = []
    for (steps, died), (following, _) in itertools.pairwise(attempts):
        if died:
            steps = completed_before_the_kill(steps, following)
        earlier.append(steps + not_reached(steps, latest, crashed=died))
    output: Any = None
    error: str | None = None
    ledger: Ledger | None = None
    for record in records:
        finished = [a for a in record.attempts if a.run_count == flow_run.run_count] or record.attempts[-1:]
        if finished:
            output = (
                finished[-1].output
                if len(records) == 1
                else {**(output or {}), record.agent: finished[-1].output}
            )
            error = finished[-1].error or error
            ledger = finished[-1].ledger if ledger is None else ledger.merge(finished[-1].ledger)
    if _state_of(flow_run) in ("failed", "crashed") and error is None and flow_run.state is not None:
        error = flow_run.state.message
    return RunDetail(
        run_id=str(flow_run.id),
        name=flow_run.name,
        idempotency_key=key,
        agent=agents[0] if len(agents) == 1 else None,
        agents=agents,
        state=_state_of(flow_run),
        run_count=flow_run.run_count,
        steps=latest,
        earlier_attempts=earlier,
        output=output,
        error=error,
        ledger=ledger,
    )


async def ledgers_since(since: datetime | None, agent: str | None) -> list[tuple[str, Ledger]]:
    """The finished attempts' ledgers of every agent run since `since`, with their agent names."""
    found: list[tuple[str, Ledger]] = []
    for summary in await list_runs(agent=agent, limit=10_000, since=since):
        for record in await read_records(summary.run_id, summary.agents):
            if agent is not None and record.agent != agent:
                continue
            for attempt in record.attempts:
                found.append((record.agent, attempt.ledger))
    return found


# -- resume ----------------------------------------------------------------------------------------------------


async def resume_run(
    ref: str, *, entrypoint: str | None = None, unverified: Literal["rerun", "tell_model"] | None = None
) -> Any:
    """Run the same flow run again (run count + 1): completed steps replay, the rest executes.

    `unverified` decides, for this attempt, what happens to calls of non-idempotent tools that an earlier
    attempt started and never finished (see `TaskConfig.on_unverified`): call them again, or tell the model.
    """
    from .tool_step import unverified_override

    token = unverified_override.set(unverified)
    try:
        return await _resume(ref, entrypoint)
    finally:
        unverified_override.reset(token)


async def _resume(ref: str, entrypoint: str | None) -> Any:
    from prefect.flow_engine import run_flow_async
    from prefect.states import AwaitingRetry

    from .agent import PrefectAgent

    flow_run = await resolve_run(ref)
    state = _state_of(flow_run)
    if state == "running":
        raise RunError(
            f"Run {flow_run.id} is still running (its process is alive); wait for it or stop it before resuming."
        )
    agents = _tag_values(flow_run, "agent:")
    records = await read_records(str(flow_run.id), agents)
    if not records:
        raise RunError(f"Run {flow_run.id} has no prefect-pydantic-ai run record; it cannot be re-created.")
    first = records[0]
    target = entrypoint or first.entrypoint
    if target is None:
        raise RunError(
            f"Run {flow_run.id} recorded no import path for its {first.entrypoint_kind} (it was defined inside a "
            "function or a notebook). Pass --entrypoint module:attribute."
        )
    obj = load_entrypoint(target)
    async with get_client() as client:
        await client.set_flow_run_state(flow_run.id, AwaitingRetry(), force=True)
        flow_run = await client.read_flow_run(flow_run.id)
    if first.entrypoint_kind == "flow" or isinstance(obj, Flow):
        if not isinstance(obj, Flow):
            raise RunError(
                f"{target} is not a Prefect flow; pass --entrypoint of the @flow that ran the agents."
            )
        return await run_flow_async(obj, flow_run=flow_run, parameters=flow_run.parameters)
    durable = obj if isinstance(obj, PrefectAgent) else None
    if durable is None:
        raise RunError(f"{target} is not a PrefectAgent; pass --entrypoint of the PrefectAgent that ran.")
    return await durable.resume_flow_run(flow_run, first)


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


def dumps(model: BaseModel | list[Any]) -> str:
    """JSON for `--json` output."""
    if isinstance(model, BaseModel):
        return model.model_dump_json(indent=2)
    return json.dumps([m.model_dump(mode="json") if isinstance(m, BaseModel) else m for m in model], indent=2)
