"""`PrefectDurability`: the capability that makes an agent's runs durable on Prefect.

Add it to a named agent, `Agent(..., name="analyst", capabilities=[PrefectDurability(...)])`, and every run of
that agent is journaled: each model request is a `model: <name>` Prefect task and each tool call a
`tool: <name>` task, each with its own `TaskConfig`. Inside a user's `@flow` the steps are tasks of that flow
run, so retrying it replays them; outside any flow the run becomes a flow run of its own, named after the agent.
`with idempotency_key("q4-report"):` names a logical run across processes. `PrefectAgent` is a thin wrapper
over this capability; both forms give the same guarantees.
"""

from __future__ import annotations

import asyncio
import contextlib
import contextvars
import copy
import inspect
import logging
import os
import socket
import warnings
from collections import Counter
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Iterator, Mapping
from contextlib import contextmanager
from datetime import UTC, datetime
from typing import Any, Literal, cast
from uuid import UUID

import anyio
from prefect import Flow, get_client
from prefect.artifacts import acreate_markdown_artifact
from prefect.client.schemas.objects import FlowRun
from prefect.context import AsyncClientContext, FlowRunContext, SyncClientContext
from prefect.flow_engine import run_flow_async
from prefect.states import Cancelled
from pydantic_ai.agent import AbstractAgent, EventStreamHandler
from pydantic_ai.capabilities import AbstractCapability, ProcessEventStream
from pydantic_ai.capabilities.abstract import WrapOutputProcessHandler, WrapRunHandler
from pydantic_ai.messages import AgentStreamEvent, ToolCallPart
from pydantic_ai.models import Model, ModelRequestContext
from pydantic_ai.output import OutputContext
from pydantic_ai.run import AgentRunResult
from pydantic_ai.tools import DeferredToolRequests, DeferredToolResults, RunContext, ToolDefinition
from pydantic_ai.toolsets import FunctionToolset

from prefect_pydantic_ai.durable.budget import Budget, RunBudget, run_budget
from prefect_pydantic_ai.durable.errors import DurabilityConfigError, NotJournalableError
from prefect_pydantic_ai.durable.fork import forking
from prefect_pydantic_ai.durable.journal import ConversationDigest, RunInputs, to_journal_json
from prefect_pydantic_ai.durable.lock_scope import warn_if_run_moved
from prefect_pydantic_ai.durable.model_step import (
    DurableModel,
    ModelSteps,
    RunIdentity,
    StepLog,
    attach_sub_run,
)
from prefect_pydantic_ai.durable.report import artifact_key, ledger_markdown, remember_ledger
from prefect_pydantic_ai.durable.secrets import current as current_redactor
from prefect_pydantic_ai.durable.secrets import redacting
from prefect_pydantic_ai.durable.steps import (
    RunningStep,
    StepPhase,
    StepTasks,
    describe_failure,
    indexing_steps,
    record_replays,
    running_step,
)
from prefect_pydantic_ai.durable.task_config import TaskConfig, TaskConfigLike, tool_config_from_metadata
from prefect_pydantic_ai.durable.tool_step import ToolSteps, ToolTasks
from prefect_pydantic_ai.durable.unreachable import (
    api_gone,
    stopping_when_unreachable,
    unreachable_api_ends_run,
)
from prefect_pydantic_ai.durable.wait import (
    WaitSuspended,
    await_decision,
    awaiting_approval_of_bare_run,
)
from prefect_pydantic_ai.errors import RunError, StorageWriteError
from prefect_pydantic_ai.infra.server import cli_name, ensure_api, local_server_kept_up
from prefect_pydantic_ai.ledger import Ledger
from prefect_pydantic_ai.store.crashes import settle_if_dead
from prefect_pydantic_ai.store.prefect_rest import FORK_TAG, RECALL_TAG, TAG, StateType, prefect_api
from prefect_pydantic_ai.store.records import (
    AttemptRecord,
    RunRecord,
    StepRef,
    entrypoint_of,
    read_record,
    rehydrate_deps,
    write_progress,
    write_record,
    write_step_mark,
)
from prefect_pydantic_ai.store.waits import ApprovalMode

_run_key: contextvars.ContextVar[str | None] = contextvars.ContextVar("ppa_idempotency_key", default=None)

logger = logging.getLogger("prefect_pydantic_ai")

_UNRECORDED_END = (
    "Its steps are journaled: fix the storage, then resume the run (they replay). Until then the record tells of "
    "this attempt only what it had spent."
)

_OWN_FLOW = "__prefect_pydantic_ai_agent__"
"""Marks a flow function as an agent's own flow (a bare run), as opposed to a user's `@flow`."""

# Per attempt of a root flow run (root flow run id, run count): agent-run ordinals and which agent owns a name.
_ordinals: dict[tuple[str, int], Counter[str]] = {}
_owners: dict[tuple[str, int], dict[str, int]] = {}
_roots: dict[str, str] = {}
_MAX_SCOPES = 4096


@contextmanager
def idempotency_key(key: str | None) -> Iterator[None]:
    """Durable runs started in this block belong to the logical run `key`.

    A new process running the same agent under the same key after an attempt failed or was killed replays
    every completed step and continues; once the run completed, the same call returns its output without a
    model request or a journaled tool call (tools configured inline run on every attempt). `None` keeps the key of an enclosing block (or none: the run key is then the root flow run id).
    """
    if key is None:
        yield
        return
    token = _run_key.set(key)
    try:
        yield
    finally:
        _run_key.reset(token)


_within_key = idempotency_key  # under another name where a flow parameter is called `idempotency_key`


class _DurableRun:
    """The journal state of one agent run: its record, its model and tool steps."""

    def __init__(
        self,
        record: RunRecord,
        model_steps: ModelSteps,
        tool_steps: ToolSteps,
        steps: list[StepRef],
        budget: RunBudget | None,
        max_parallel_tools: int | None,
    ) -> None:
        self.record = record
        self.model_steps = model_steps
        self.tool_steps = tool_steps
        self.steps = steps
        """The steps this attempt took, in order (`indexing_steps`)."""
        self.budget = budget
        self.tool_slots = (
            contextlib.nullcontext() if max_parallel_tools is None else asyncio.Semaphore(max_parallel_tools)
        )


class PrefectDurability(AbstractCapability[Any]):
    """Durable execution of an agent's runs on Prefect: journaled model and tool steps, resumable runs.

    - `model_task_config` / `tool_task_config`: retries, backoff and timeout of model requests and tool calls.
    - `tool_task_config_by_name`: per tool, layered over the tool default (`TaskConfig.merged_over`: the fields
      it sets win, except that setting `retries` also replaces the backoff); `None` runs that tool inline,
      outside the journal. A layering that does not fit fails here, when the capability is built.
    - `deps_for_resume`: rebuilds deps when `prefect-pydantic-ai resume` re-creates a run whose deps held
      secret-looking values, which are never stored; it receives the stored (redacted) deps JSON.
    - `store_deps`: the run record keeps the deps as JSON with their secrets removed, so `resume` can rebuild
      them in another process (default). `False` stores nothing of them (deps that may hold secrets no rule
      recognises, or personal data); `resume` then needs `deps_for_resume`, which receives `None`.

    The arguments of pydantic-ai's own `PrefectDurability` mean the same here (see docs/migrating.md): `name`
    names the durable agent (journal keys, flow name) instead of the agent's name; `event_stream_handler`
    receives every run's events; `mcp_task_config` applies to tools from MCP toolsets, over `tool_task_config`;
    `models` registers models that `run(model="<key>")` selects. A tool's config can also be its metadata,
    `{"prefect": TaskConfig(...) | dict | False}`. Every config may be a plain dict.

    - `approvals`: how a run waits for a decision on calls that need approval (or are deferred) when the
      output type does not include `DeferredToolRequests`: `"suspend"` (default) frees the process, `"pause"`
      keeps it waiting up to `approval_timeout_seconds`. See `wait`.
    - `budget`: the most a logical run may spend over all its attempts, killed ones included (`Budget(usd=...,
      tokens=...)`): it stops with `BudgetExceededError` before a model request the rest cannot cover, and
      `resume --budget` continues it; with `on_exceeded="approve"` it waits for a decision there instead, as
      `approvals` says. See `budget`.
    - `max_parallel_tools`: at most this many tool calls of a run execute at once (the calls of one model
      response wait for a free place; a call that delegates to another agent is one of them). A sub-agent run
      bounds its own tool calls with its own setting.
    """

    _model_tasks: StepTasks
    _tool_tasks: ToolTasks

    def __init__(
        self,
        *,
        model_task_config: TaskConfigLike | None = None,
        tool_task_config: TaskConfigLike | None = None,
        tool_task_config_by_name: Mapping[str, TaskConfigLike | None] | None = None,
        deps_for_resume: Callable[[Any], Any] | None = None,
        name: str | None = None,
        event_stream_handler: EventStreamHandler[Any] | None = None,
        mcp_task_config: TaskConfigLike | None = None,
        models: Mapping[str, Model] | None = None,
        event_stream_handler_task_config: TaskConfigLike | None = None,
        approvals: ApprovalMode = "suspend",
        approval_timeout_seconds: int = 3600,
        store_deps: bool = True,
        budget: Budget | None = None,
        max_parallel_tools: int | None = None,
    ) -> None:
        if max_parallel_tools is not None and max_parallel_tools < 1:
            raise DurabilityConfigError(
                f"max_parallel_tools={max_parallel_tools!r}: give a whole number >= 1, or None for no bound."
            )
        self.max_parallel_tools = max_parallel_tools
        self.budget = budget
        self.model_task_config = TaskConfig.of(model_task_config)
        self.tool_task_config = TaskConfig.of(tool_task_config)
        self.tool_task_config_by_name: dict[str, TaskConfig | None] = {
            tool: None if cfg is None else TaskConfig.of(cfg)
            for tool, cfg in (tool_task_config_by_name or {}).items()
        }
        self.mcp_task_config = None if mcp_task_config is None else TaskConfig.of(mcp_task_config)
        # every per-tool config layered over its default now: one whose fields do not fit fails here, not mid-run
        ToolTasks(self.tool_task_config, self.tool_task_config_by_name, agent="", mcp=self.mcp_task_config)
        self.deps_for_resume = deps_for_resume
        self.store_deps = store_deps
        self.models: dict[str, Model] = dict(models or {})
        self._name = name
        self._events = None if event_stream_handler is None else ProcessEventStream[Any](event_stream_handler)
        if event_stream_handler_task_config is not None:
            warnings.warn(
                "event_stream_handler_task_config has no effect here: the event stream handler runs in the run's "
                "own process, not as a Prefect task.",
                UserWarning,
                stacklevel=2,
            )
        self._names_checked = False
        self.approvals: ApprovalMode = approvals
        self.approval_timeout_seconds = approval_timeout_seconds
        caller = inspect.currentframe()
        self._defined_in: str | None = (
            caller.f_back.f_globals.get("__name__") if caller and caller.f_back else None
        )
        self._agent: AbstractAgent[Any, Any] | None = None
        self._importable: tuple[object, str | None] | None = None
        self._bindings: dict[int, PrefectDurability] = {}
        self._run: _DurableRun | None = None

    # -- binding -----------------------------------------------------------------------------------------------

    def for_agent(self, agent: AbstractAgent[Any, Any]) -> PrefectDurability:
        """This capability bound to `agent` (once per agent): its name keys the journal and names the tasks."""
        if self._agent is agent:
            return self
        bound = self._bindings.get(id(agent))
        if bound is not None and bound._agent is agent:
            return bound
        name = self._name or agent.name
        if not name:
            raise DurabilityConfigError(
                "A durable agent needs a name: create it with Agent(..., name='my_agent'). The name identifies "
                "its steps in the journal and names its Prefect flow, so it must not change between runs."
            )
        bound = copy.copy(self)
        bound._agent = agent
        bound._name = name
        bound._bindings = {}
        bound._model_tasks = StepTasks("model", self.model_task_config, agent=name)
        bound._tool_tasks = ToolTasks(
            self.tool_task_config,
            self.tool_task_config_by_name,
            agent=name,
            mcp=self.mcp_task_config,
            metadata=_function_tool_configs(agent),
        )
        self._bindings[id(agent)] = bound
        return bound

    def importable_as(self, owner: object, module: str | None) -> None:
        """Record `owner` (found in `module`) as what a resume re-imports, instead of the agent itself."""
        self._importable = (owner, module)

    async def for_run(self, ctx: RunContext[Any]) -> PrefectDurability:
        fresh = copy.copy(self)
        fresh._run = None
        fresh._names_checked = False
        return fresh

    @property
    def tool_tasks(self) -> ToolTasks:
        """Each tool's effective task config (`config_of(name)`) and the step tasks its calls run as, once bound."""
        assert self._agent is not None, "PrefectDurability used before for_agent()"
        return self._tool_tasks

    @property
    def agent_name(self) -> str:
        """The durable agent's name (`name=`, else the agent's): it keys the journal and names the flow."""
        assert self._agent is not None and self._name, "PrefectDurability used before for_agent()"
        return self._name

    # -- the run -----------------------------------------------------------------------------------------------

    async def wrap_run(self, ctx: RunContext[Any], *, handler: WrapRunHandler) -> AgentRunResult[Any]:
        async with _prefect_clients():
            return await self._wrapped_run(ctx, handler)

    async def _wrapped_run(self, ctx: RunContext[Any], handler: WrapRunHandler) -> AgentRunResult[Any]:
        if not isinstance(ctx.model, Model):  # a realtime session: a live connection, nothing to replay
            raise realtime_refused(self.agent_name)
        prompt = ctx.prompt if isinstance(ctx.prompt, str) else None
        # fails before any flow run exists
        inputs = RunInputs.of(ctx.deps, _journaled_metadata(ctx.metadata), prompt)
        with redacting(inputs.secrets):  # everything the run writes or logs from here on
            return await self._run_in_flow(ctx, inputs, handler)

    async def _run_in_flow(
        self, ctx: RunContext[Any], inputs: RunInputs, handler: WrapRunHandler
    ) -> AgentRunResult[Any]:
        """The durable run as a task of the enclosing flow run, or as a flow run of its own (a bare run)."""
        if FlowRunContext.get() is not None:
            return await self._durable(ctx, inputs, handler)
        ensure_api()  # no server configured: the persistent local one, started once per PREFECT_HOME
        key = _run_key.get()
        started: list[UUID] = []  # the flow run, once it exists
        recall_of: str | None = None
        earlier: list[str] = []

        async def agent_run(prompt: str | None = None, idempotency_key: str | None = None) -> Any:
            flow_ctx = FlowRunContext.get()
            if flow_ctx is not None and flow_ctx.flow_run is not None:
                started.append(flow_ctx.flow_run.id)
            return await self._durable(ctx, inputs, handler, recall_of, earlier)

        flow = self.flow(agent_run, key)
        settling: list[asyncio.Task[None]] = []  # what dead earlier attempts' last events create
        try:
            with unreachable_api_ends_run(lambda: started[0] if started else None, key):
                if key is not None:
                    recall_of, earlier = await _earlier_attempts(key, settling)
                # the prompt parameter is shown, never read back: scrubbed
                with local_server_kept_up(), awaiting_approval_of_bare_run():
                    return cast(
                        AgentRunResult[Any], await cast(Any, flow)(prompt=inputs.prompt, idempotency_key=key)
                    )
        except (asyncio.CancelledError, KeyboardInterrupt):
            for task in settling:  # an interrupted run ends now; `runs` and `show` settle the rest later
                task.cancel()
            settling.clear()
            if started:
                await _cancelled(started[0], key)
            raise
        finally:
            await _settled(settling)

    def flow(self, fn: Callable[..., Awaitable[Any]], flow_run_name: str | None) -> Flow[Any, Any]:
        """The agent's own flow around `fn` (a bare run), named after the agent."""
        fn.__dict__[_OWN_FLOW] = self.agent_name
        return Flow(
            fn=fn,
            name=self.agent_name,
            flow_run_name=flow_run_name,
            persist_result=False,
            validate_parameters=False,
            description=f"Durable run of the Pydantic AI agent {self.agent_name!r}.",
        )

    async def _durable(
        self,
        ctx: RunContext[Any],
        inputs: RunInputs,
        handler: WrapRunHandler,
        recall_of: str | None = None,
        earlier: list[str] | None = None,
    ) -> AgentRunResult[Any]:
        """Run `handler` (the agent run) as this flow run's durable agent run; `recall_of` names the flow run
        that already completed this logical run (this one then only returns its stored result), `earlier` the
        flow runs of its earlier attempts, newest first."""
        flow_ctx = FlowRunContext.get()
        assert flow_ctx is not None and flow_ctx.flow_run is not None
        with stopping_when_unreachable(flow_ctx.flow_run.id, _run_key.get()):
            self._run = run = await self._begin(ctx, inputs, recall_of, earlier or [])
            try:
                with indexing_steps(run.steps):
                    result = await handler()
            except WaitSuspended:  # this attempt ends to wait; the run is paused, not failed or crashed
                await _record_attempt(run.record, run.model_steps.log, "waiting", steps=run.steps)
                raise
            except BaseException as exc:
                # before Prefect makes it the flow run's state message
                current_redactor().scrub_exception(exc)
                try:
                    await _finish(run.record, run.model_steps.log, error=exc, steps=run.steps)
                except StorageWriteError as unrecorded:  # the run's own failure is the one to report
                    logger.warning("%s", unrecorded)
                raise
            ledger = await _finish(run.record, run.model_steps.log, output=result.output, steps=run.steps)
            remember_ledger(result, ledger)
            return result

    async def _begin(
        self, ctx: RunContext[Any], inputs: RunInputs, recall_of: str | None, earlier: list[str]
    ) -> _DurableRun:
        flow_ctx = FlowRunContext.get()
        assert flow_ctx is not None and flow_ctx.flow_run is not None
        flow_run = flow_ctx.flow_run
        name = self.agent_name
        root = await _root_flow_run_id(flow_run)
        scope = (root, flow_run.run_count)
        _forget_old_scopes()
        if scope not in _owners:  # the attempt's first agent run: refuse twins before anything is paid for
            _refuse_twins(getattr(flow_ctx.flow, "fn", None), flow_run.name)
            if running_step() is None:
                await warn_if_run_moved(flow_run, name, _run_key.get(), earlier)
        owner = _owners.setdefault(scope, {}).setdefault(name, id(self._agent))
        if owner != id(self._agent):
            raise DurabilityConfigError(
                f"Two different agents are named {name!r} in flow run {flow_run.name!r}; their steps would "
                "share journal keys. Give each agent its own name."
            )
        key = _run_key.get()
        parent = running_step()
        if parent is None:
            ordinals = _ordinals.setdefault(scope, Counter())
            ordinal = ordinals[name]
            ordinals[name] += 1
            run_key = f"key:{key}" if key is not None else f"flow:{root}"
        else:  # a sub-agent run: keyed under the step that started it, which every attempt of it finds again
            ordinal = parent.next_run(name)
            run_key = f"step:{parent.key}"
        identity = RunIdentity(run_key=run_key, agent=name, ordinal=ordinal)
        record = await self._record(flow_ctx, ordinal, key, inputs, recall_of, parent)
        log = StepLog(recall=recall_of is not None)
        parent_spent = attach_sub_run(name, log)

        async def spent() -> None:  # what this attempt spent survives its process (and so does its parent's)
            await _record_attempt(record, log, "running")
            if parent_spent is not None:
                await parent_spent()

        executing: list[str] = []

        async def in_steps(title: str, phase: StepPhase) -> None:  # and so do the steps it was killed in
            if phase == "started":
                if title in executing:  # a retry of the step
                    return
                executing.append(title)
            elif title in executing:
                executing.remove(title)
            # a step that starts calls this from its own scope: its key is what gc finds a killed attempt by
            step = running_step() if phase == "started" else None
            completed = title if phase == "completed" else None
            await write_step_mark(record, _run_count(), executing, completed, step.key if step else None)

        model_steps = ModelSteps(
            identity,
            self._model_tasks,
            ConversationDigest(inputs.seed(name)),
            log,
            on_executed=spent,
            on_step=in_steps,
        )
        budget = await run_budget(self.budget, record, _run_count(), key)
        tool_steps = ToolSteps(model_steps, self._tool_tasks)
        return _DurableRun(record, model_steps, tool_steps, [], budget, self.max_parallel_tools)

    async def _record(
        self,
        flow_ctx: FlowRunContext,
        ordinal: int,
        key: str | None,
        inputs: RunInputs,
        recall_of: str | None,
        parent: RunningStep | None,
    ) -> RunRecord:
        """Write (or, on a later attempt, refresh) the run record; tag the flow run as holding this agent."""
        assert flow_ctx.flow_run is not None
        name = self.agent_name
        flow_run_id = str(flow_ctx.flow_run.id)
        record = await read_record(flow_run_id, name, ordinal, parent.key if parent else None)
        if record is None:
            flow_fn = getattr(flow_ctx.flow, "fn", None)
            bare = getattr(flow_fn, _OWN_FLOW, None) == name
            owner, module = self._importable or (self._agent, self._defined_in)
            record = RunRecord(
                flow_run_id=flow_run_id,
                agent=name,
                ordinal=ordinal,
                idempotency_key=key,
                entrypoint=entrypoint_of(owner, module)
                if bare
                else entrypoint_of(flow_ctx.flow, getattr(flow_fn, "__module__", None)),
                entrypoint_kind="agent" if bare else "flow",
                prompt=inputs.prompt,
                deps=inputs.deps if self.store_deps else None,
                metadata=inputs.metadata,
                redacted=self._redacted(inputs),
                recall_of=recall_of,
                parent_step=parent.key if parent else None,
                parent_step_name=parent.name if parent else None,
            )
            if (fork := forking()) is not None and parent is None:
                record.forked_from, record.forked_at = fork.flow_run_id, fork.at
        if (fork := forking()) is not None and parent is None and flow_run_id not in fork.flow_runs:
            fork.flow_runs.append(flow_run_id)
        else:
            record = record.model_copy(update={"pid": os.getpid(), "host": socket.gethostname()})
        await write_record(record, "No step ran in this attempt: fix the storage, then run it again.")
        wanted = {
            TAG,
            f"agent:{name}",
            *([f"key:{key}"] if key else []),
            *([RECALL_TAG] if recall_of else []),
            *([f"{FORK_TAG}{record.forked_from}"] if record.forked_from else []),
        }
        if not wanted <= set(flow_ctx.flow_run.tags):
            tags = sorted(wanted | set(flow_ctx.flow_run.tags))
            async with get_client() as client:
                await client.update_flow_run(flow_ctx.flow_run.id, tags=tags)
            flow_ctx.flow_run.tags = tags
        return record

    def _redacted(self, inputs: RunInputs) -> list[str]:
        """What the run record leaves out: the redacted paths, or all of the deps (`deps`) when they are not stored."""
        if self.store_deps or inputs.deps is None:
            return list(inputs.redacted)
        return ["deps", *(path for path in inputs.redacted if not path.startswith("deps"))]

    # -- the steps ---------------------------------------------------------------------------------------------

    def _steps(self) -> _DurableRun:
        assert self._run is not None, "a durable step ran outside PrefectDurability.wrap_run"
        return self._run

    def get_wrapper_model(self, model: Model) -> Model | None:
        return DurableModel(model, lambda: self._steps().model_steps)

    async def wrap_model_request(
        self,
        ctx: RunContext[Any],
        *,
        request_context: ModelRequestContext,
        handler: Callable[[ModelRequestContext], Awaitable[Any]],
    ) -> Any:
        run = self._steps()
        steps = run.model_steps
        steps.begin(ctx.messages, request_context.model_request_parameters, emit=ctx.emit)
        await steps.prefetch(request_context.model.model_name)
        if run.budget is not None and not steps.replaying:  # a replayed request costs nothing
            await run.budget.admit(
                steps.log.spent.spent,
                steps.number,
                identity=steps.key("model", f"{steps.number}.budget", steps.step_digest),
                mode=self.approvals,
                timeout_seconds=self.approval_timeout_seconds,
            )
        response = await handler(request_context)
        steps.end(response)
        return response

    async def wrap_tool_execute(
        self,
        ctx: RunContext[Any],
        *,
        call: ToolCallPart,
        tool_def: ToolDefinition,
        args: dict[str, Any],
        handler: Callable[[dict[str, Any]], Awaitable[Any]],
    ) -> Any:
        metadata = tool_config_from_metadata(tool_def.name, tool_def.metadata)
        run = self._steps()
        async with run.tool_slots:  # `max_parallel_tools`: the other calls of the response wait here
            return await run.tool_steps.execute(ctx, call, args, handler, metadata=metadata)

    # -- pydantic-ai's PrefectDurability arguments ---------------------------------------------------------------

    async def prepare_tools(
        self, ctx: RunContext[Any], tool_defs: list[ToolDefinition]
    ) -> list[ToolDefinition]:
        """Before the run's first model request, check that `tool_task_config_by_name` names real tools."""
        if not self._names_checked:
            self._names_checked = True
            assert self._agent is not None
            function_tools = _function_tool_configs(self._agent)
            self._tool_tasks.check_names({d.name for d in tool_defs} | set(function_tools))
            metadata = {d.name: tool_config_from_metadata(d.name, d.metadata) for d in tool_defs}
            self._tool_tasks.check({**function_tools, **metadata}, function_tools=function_tools)
        return tool_defs

    @property
    def has_wrap_run_event_stream(self) -> bool:
        return self._events is not None

    async def wrap_run_event_stream(
        self, ctx: RunContext[Any], *, stream: AsyncIterable[AgentStreamEvent]
    ) -> AsyncIterable[AgentStreamEvent]:
        """Hand the run's events to `event_stream_handler` as they pass through to the caller."""
        events = stream if self._events is None else self._events.wrap_run_event_stream(ctx, stream=stream)
        async for event in events:
            yield event

    async def resolve_model_id(self, ctx: Any, *, model_id: str) -> Model | None:
        """`run(model="<key>")` selects the model registered under that key in `models=`."""
        return self.models.get(model_id)

    async def wrap_output_process(
        self,
        ctx: RunContext[Any],
        *,
        output_context: OutputContext,
        output: Any,
        handler: WrapOutputProcessHandler,
    ) -> Any:
        if not output_context.has_function or ctx.partial_output:
            return await handler(output)
        function = output_context.function_name or "output"
        return await self._steps().tool_steps.process_output(
            output_context.tool_call, function, lambda: handler(output)
        )

    # -- waiting for approval --------------------------------------------------------------------------------

    async def handle_deferred_tool_calls(
        self, ctx: RunContext[Any], *, requests: DeferredToolRequests
    ) -> DeferredToolResults | None:
        """Calls that need approval (or an external result) wait for a human at the flow level, unless the
        run's output type includes `DeferredToolRequests` (then pydantic-ai ends the run with them, as usual)."""
        agent = ctx.agent or self._agent
        if agent is None or _includes_deferred(agent.output_type):
            return None
        steps = self._steps().model_steps
        identity = steps.key("model", f"{steps.number}.wait", steps.step_digest)
        return await await_decision(
            requests, identity=identity, mode=self.approvals, timeout_seconds=self.approval_timeout_seconds
        )

    # -- resume ------------------------------------------------------------------------------------------------

    def resume_inputs(self, flow_run_id: str, record: RunRecord) -> dict[str, Any]:
        """The `run()` arguments that re-create a recorded run: its deps (rebuilt by `deps_for_resume` when they
        held secrets) and its metadata, which seeds the step keys. Raises `RunError` before anything changes."""
        assert self._agent is not None
        if "prompt" in record.redacted:
            raise RunError(
                f"The prompt of run {flow_run_id} held secret-looking values that were not stored, so `resume` "
                "cannot re-create it; run the agent again from your code with the same prompt and idempotency_key= "
                "(its completed steps replay), and keep secrets in deps (rebuilt by deps_for_resume=)."
            )
        deps = rehydrate_deps(self._agent.deps_type, record.deps)
        hidden = [path for path in record.redacted if path.startswith("deps")]
        if hidden:
            if self.deps_for_resume is None:
                why = (
                    "were not stored (store_deps=False)"
                    if hidden == ["deps"]
                    else f"held secret-looking values that were not stored ({', '.join(hidden)})"
                )
                raise RunError(
                    f"The deps of run {flow_run_id} {why}; pass deps_for_resume= to "
                    f"PrefectAgent({self.agent_name!r}) to rebuild them on resume."
                )
            deps = self.deps_for_resume(record.deps)
        inputs: dict[str, Any] = {} if deps is None else {"deps": deps}
        if record.metadata is not None:
            inputs["metadata"] = record.metadata
        return inputs

    async def resume_flow_run(
        self, agent: AbstractAgent[Any, Any], flow_run: FlowRun, record: RunRecord, inputs: dict[str, Any]
    ) -> Any:
        """Run an earlier flow run of `agent` (its own flow, a bare run) again in place, with `inputs` from
        `resume_inputs`."""

        async def agent_run(prompt: str | None = None, idempotency_key: str | None = None) -> Any:
            with _within_key(idempotency_key):
                return await agent.run(record.prompt, **inputs)

        key = record.idempotency_key
        with unreachable_api_ends_run(lambda: flow_run.id, key):
            return await run_flow_async(
                self.flow(agent_run, flow_run.name), flow_run=flow_run, parameters=flow_run.parameters
            )


@contextlib.asynccontextmanager
async def _prefect_clients() -> AsyncIterator[None]:
    """One async and one sync Prefect client for everything an agent run asks of Prefect, closed when it ends.

    Every Prefect call of the run (ours, the flow engine's) takes its client from these contexts, and so do
    Prefect's helpers that open a client and never close it: in prefect 3.9, `aget_default_result_storage()`
    (the journal and the run record resolve the result storage with it) and the flow engine's lookup of the
    server's default result storage at each flow run. Without the contexts, each left a connection to the
    garbage collector (a `ResourceWarning`, an unclosed transport under `run_sync`).

    Then the loop turns once more before the run returns: a transport closes its socket on the next iteration
    after `close()`, and `run_sync` stops its loop (which it keeps for the next call) as soon as the run returns.
    """
    try:
        with SyncClientContext.get_or_create():
            async with AsyncClientContext.get_or_create():
                yield
    finally:
        await asyncio.sleep(0)


def realtime_refused(agent_name: str) -> DurabilityConfigError:
    """Why a durable agent does not open realtime sessions, and what to do instead."""
    return DurabilityConfigError(
        f"Agent {agent_name!r} is durable, and a realtime session cannot be: its live connection can be neither "
        "journaled nor replayed. Open the session on the agent without PrefectDurability (a PrefectAgent's .wrapped)."
    )


def _function_tool_configs(agent: AbstractAgent[Any, Any]) -> dict[str, TaskConfig | Literal[False] | None]:
    """The agent's own function tools (including those a `prepare` function hides from a step), each with the
    config in its metadata."""
    configs: dict[str, TaskConfig | Literal[False] | None] = {}

    def collect(toolset: object) -> None:
        if isinstance(toolset, FunctionToolset):
            for name, tool in toolset.tools.items():
                configs[name] = tool_config_from_metadata(name, tool.metadata)

    for toolset in agent.toolsets:
        toolset.apply(collect)
    return configs


def durability_of(agent: object) -> PrefectDurability | None:
    """The `PrefectDurability` bound to `agent`: an agent built with the capability, or anything exposing one as
    `.durability` (a `PrefectAgent`)."""
    own = getattr(agent, "durability", None)
    if isinstance(own, PrefectDurability):
        return own
    if not isinstance(agent, AbstractAgent):
        return None
    found: list[PrefectDurability] = []

    def collect(capability: AbstractCapability[Any]) -> None:
        if isinstance(capability, PrefectDurability):
            found.append(capability)

    agent.root_capability.apply(collect)
    return found[0].for_agent(agent) if found else None


async def _record_attempt(
    record: RunRecord,
    log: StepLog,
    state: Literal["completed", "failed", "running", "waiting"],
    *,
    output: Any = None,
    error: BaseException | None = None,
    steps: list[StepRef] | None = None,
) -> AttemptRecord:
    """Write this attempt into the run record: while it runs (what it spent so far), and how it ended."""
    run_count = _run_count()
    try:
        stored_output = to_journal_json(output, what="the run output")
    except NotJournalableError:
        stored_output = repr(output)
    # the output and the error may quote a secret (a tool's error, a model's echo)
    secrets = current_redactor()
    attempt = AttemptRecord(
        run_count=run_count,
        state=state,
        finished_at=datetime.now(UTC),
        output=secrets.scrub_data(stored_output),
        error=None if error is None else secrets.scrub(describe_failure(error)),
        ledger=log.spent if state == "running" else log.ledger(),
        steps=[] if state == "running" or steps is None else steps,
    )
    record.attempts = [a for a in record.attempts if a.run_count != run_count] + [attempt]
    if state == "running":
        await write_progress(record, attempt)
    else:
        await write_record(record, _UNRECORDED_END)
    return attempt


def _run_count() -> int:
    """The attempt (flow run count) running in this context."""
    flow_ctx = FlowRunContext.get()
    return flow_ctx.flow_run.run_count if flow_ctx and flow_ctx.flow_run else 1


async def _finish(
    record: RunRecord,
    log: StepLog,
    *,
    output: Any = None,
    error: BaseException | None = None,
    steps: list[StepRef] | None = None,
) -> Ledger:
    """Record how this attempt ended and publish its spent/saved ledger as a Prefect artifact.

    An attempt the Prefect API ended is recorded as a killed one is (its progress, no end): Prefect missed its
    last task-run events, so `show` and the settling of the flow run read its steps from the step marks, as for a
    process that died; no artifact either (it would wait out the client's retries again)."""
    record_replays(wait=True)
    if error is not None and api_gone(error):
        return (await _record_attempt(record, log, "running")).ledger
    attempt = await _record_attempt(
        record, log, "failed" if error is not None else "completed", output=output, error=error, steps=steps
    )
    await acreate_markdown_artifact(
        key=artifact_key(record.agent),
        markdown=ledger_markdown(record.agent, attempt.ledger, attempt),
        description=f"prefect-pydantic-ai: what {record.agent} spent and what replay saved",
    )
    return attempt.ledger


async def _cancelled(flow_run_id: UUID, key: str | None) -> None:
    """An interrupted bare run (Ctrl-C) ends Cancelled, not Crashed as Prefect's engine marks it: nothing died,
    and the message says how to go on. Shielded: the cancellation that interrupted the run is not repeated."""
    ref = key or str(flow_run_id)
    message = f"Interrupted (Ctrl-C or a cancelled task); resume it with `{cli_name()} resume {ref}`."
    with anyio.CancelScope(shield=True):
        async with get_client() as client:
            await client.set_flow_run_state(flow_run_id, Cancelled(message=message), force=True)


async def _earlier_attempts(key: str, later: list[asyncio.Task[None]]) -> tuple[str | None, list[str]]:
    """Settle earlier attempts of logical run `key` whose process died (what their last events create is settled
    by the tasks added to `later`); the flow run that completed it, if any, and the flow runs of its earlier
    attempts, newest first."""
    async with prefect_api() as api:
        earlier = await api.flow_runs({"tags": {"all_": [TAG, f"key:{key}"]}}, "START_TIME_DESC", 50)
        completed = None
        for flow_run in earlier:
            flow_run = await settle_if_dead(api, flow_run, later=later)
            done = flow_run.state is not None and flow_run.state.type == StateType.COMPLETED
            if completed is None and done and RECALL_TAG not in flow_run.tags:
                completed = str(flow_run.id)
        return completed, [str(flow_run.id) for flow_run in earlier]


async def _settled(settling: list[asyncio.Task[None]]) -> None:
    """Wait for the settling of earlier attempts to end (it is bookkeeping: a failure is logged, not raised)."""
    for task in settling:
        try:
            await task
        except Exception as exc:  # the API went away meanwhile: `runs` and `show` settle them later
            logger.debug("Could not settle the task runs of a dead earlier attempt: %s", exc)


def _refuse_twins(flow_fn: Any, flow_run_name: str) -> None:
    """Fail if the flow function refers to two different durable agents with one name (their steps would share
    journal keys), before its first agent runs: found among the globals its code names and its closure."""
    if flow_fn is None or not hasattr(flow_fn, "__code__"):
        return
    names = set(flow_fn.__code__.co_names)
    referred = [value for key, value in getattr(flow_fn, "__globals__", {}).items() if key in names]
    for cell in flow_fn.__closure__ or ():
        with contextlib.suppress(ValueError):  # an empty cell
            referred.append(cell.cell_contents)
    agents: dict[str, int] = {}
    for value in referred:
        durability = durability_of(value)  # an agent, a PrefectAgent, or anything exposing `.durability`
        if durability is None or durability._agent is None:
            continue
        name = durability.agent_name
        if agents.setdefault(name, id(durability._agent)) != id(durability._agent):
            raise DurabilityConfigError(
                f"Two different agents are named {name!r} in flow run {flow_run_name!r}; their steps would "
                "share journal keys. Give each agent its own name."
            )


def _forget_old_scopes() -> None:
    """Keep the per-attempt bookkeeping of a long-lived process bounded (oldest attempts first)."""
    for table in (_ordinals, _owners):
        while len(table) > _MAX_SCOPES:
            del table[next(iter(table))]
    while len(_roots) > _MAX_SCOPES:
        del _roots[next(iter(_roots))]


def _includes_deferred(output_type: Any) -> bool:
    """Whether an output spec (a type or a sequence of them) includes `DeferredToolRequests`."""
    if isinstance(output_type, (list, tuple)):
        return any(_includes_deferred(t) for t in output_type)
    return output_type is DeferredToolRequests


def _journaled_metadata(metadata: Any) -> Any:
    """Run metadata enters the run's identity; a metadata callable is evaluated per run, so it cannot."""
    return None if callable(metadata) else metadata


async def _root_flow_run_id(flow_run: FlowRun) -> str:
    """The id of the outermost flow run: a retried parent gives its subflows new ids, but keeps its own."""
    own = str(flow_run.id)
    if flow_run.parent_task_run_id is None:
        return own
    if own not in _roots:
        async with get_client() as client:
            task_run = await client.read_task_run(flow_run.parent_task_run_id)
            if task_run.flow_run_id is None:
                _roots[own] = own
            else:
                _roots[own] = await _root_flow_run_id(await client.read_flow_run(task_run.flow_run_id))
    return _roots[own]
