"""`PrefectAgent`: a Pydantic AI agent whose runs are Prefect flow runs and whose steps are journaled tasks."""

from __future__ import annotations

import asyncio
import contextvars
import inspect
import os
import socket
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from datetime import UTC, datetime
from typing import Any, cast

from prefect import Flow, get_client
from prefect.artifacts import acreate_markdown_artifact
from prefect.client.schemas.objects import FlowRun
from prefect.context import FlowRunContext
from pydantic_ai.agent import AbstractAgent, WrapperAgent
from pydantic_ai.capabilities import AbstractCapability
from pydantic_ai.messages import ToolCallPart
from pydantic_ai.models import Model, ModelRequestContext
from pydantic_ai.output import OutputDataT
from pydantic_ai.run import AgentRun, AgentRunResult
from pydantic_ai.tools import AgentDepsT, RunContext, ToolDefinition

from .config import TaskConfig
from .errors import DurabilityConfigError, NotJournalableError
from .journal import ConversationDigest, RunInputs, to_journal_json
from .ledger import Ledger
from .model_step import DurableModel, ModelSteps, RunIdentity, StepLog
from .report import ledger_markdown, remember_ledger
from .runs import (
    TAG,
    AttemptRecord,
    RunError,
    RunRecord,
    entrypoint_of,
    load_entrypoint,
    read_record,
    rehydrate_deps,
    write_record,
)
from .steps import StepTasks
from .tool_step import ToolSteps, ToolTasks

_idempotency_key: contextvars.ContextVar[str | None] = contextvars.ContextVar("idempotency_key", default=None)

_OWN_FLOW = "__prefect_pydantic_ai_agent__"

# Per attempt of a root flow run (root flow run id, run count): agent-run ordinals and which agent owns a name.
_ordinals: dict[tuple[str, int], Counter[str]] = {}
_owners: dict[tuple[str, int], dict[str, int]] = {}
_roots: dict[str, str] = {}


class DurableRunCapability(AbstractCapability[Any]):
    """Routes one agent run's model requests and tool calls through the journal (added per run)."""

    def __init__(self, model_steps: ModelSteps, tool_steps: ToolSteps) -> None:
        self.model_steps = model_steps
        self.tool_steps = tool_steps

    def get_wrapper_model(self, model: Model) -> Model | None:
        return DurableModel(model, self.model_steps)

    async def wrap_model_request(
        self,
        ctx: RunContext[Any],
        *,
        request_context: ModelRequestContext,
        handler: Callable[[ModelRequestContext], Awaitable[Any]],
    ) -> Any:
        self.model_steps.begin(ctx.messages, request_context.model_request_parameters)
        response = await handler(request_context)
        self.model_steps.end(response)
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
        return await self.tool_steps.execute(ctx, call, args, handler)


class PrefectAgent(WrapperAgent[AgentDepsT, OutputDataT]):
    """Durable execution for a Pydantic AI agent on Prefect.

    Outside a flow, `run`, `run_sync` and `iter` create a flow run named after the agent. Inside a user's
    `@flow`, the agent's steps are tasks of that flow run, so retrying it replays them. Every model request is a
    `model: <model>` task and every tool call a `tool: <tool>` task, each with its own `TaskConfig`; a tool
    configured as `None` in `tool_task_config_by_name` runs inline, outside the journal.

    `idempotency_key=` names a logical run across processes: calling `run` again with the same key replays
    every step that completed and continues from the first one that did not.

    `deps_for_resume` rebuilds deps when a run is resumed by `prefect-pydantic-ai resume` and its deps held
    secret-looking values, which are never stored: it receives the stored (redacted) deps JSON.
    """

    def __init__(
        self,
        wrapped: AbstractAgent[AgentDepsT, OutputDataT],
        *,
        model_task_config: TaskConfig | None = None,
        tool_task_config: TaskConfig | None = None,
        tool_task_config_by_name: Mapping[str, TaskConfig | None] | None = None,
        deps_for_resume: Callable[[Any], AgentDepsT] | None = None,
    ) -> None:
        super().__init__(wrapped)
        if not wrapped.name:
            raise DurabilityConfigError(
                "PrefectAgent needs a named agent: create it with Agent(..., name='my_agent'). The name identifies "
                "its steps in the journal and names its Prefect flow, so it must not change between runs."
            )
        self._name: str = wrapped.name
        self.model_task_config = model_task_config or TaskConfig()
        self.tool_task_config = tool_task_config or TaskConfig()
        self.tool_task_config_by_name: dict[str, TaskConfig | None] = dict(tool_task_config_by_name or {})
        self.deps_for_resume = deps_for_resume
        self._model_tasks = StepTasks("model", self.model_task_config, agent=self._name)
        self._tool_tasks = ToolTasks(self.tool_task_config, self.tool_task_config_by_name, agent=self._name)
        caller = inspect.currentframe()
        self._defined_in: str | None = (
            caller.f_back.f_globals.get("__name__") if caller and caller.f_back else None
        )

    @property
    def name(self) -> str:
        return self._name

    @name.setter
    def name(self, value: str | None) -> None:
        raise DurabilityConfigError(
            "A PrefectAgent's name is fixed: it keys the journal. Rename the wrapped agent instead."
        )

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickle by reference to where the agent is defined, as Prefect does when it ships a served flow.

        An agent holds clients, context variables and functions that cannot be pickled by value; a module-level
        `PrefectAgent` is re-imported on the other side instead.
        """
        entrypoint = entrypoint_of(self, self._defined_in)
        if entrypoint is None:
            raise TypeError(
                f"PrefectAgent {self._name!r} cannot be pickled: define it at module level so it can be re-imported, "
                "or create it inside the flow function."
            )
        return (load_entrypoint, (entrypoint,))

    # -- running -----------------------------------------------------------------------------------------------

    async def run(self, user_prompt: Any = None, *, idempotency_key: str | None = None, **kwargs: Any) -> Any:
        self._preflight(kwargs)
        if idempotency_key is None:
            idempotency_key = _idempotency_key.get()
        if FlowRunContext.get() is not None:
            token = _idempotency_key.set(idempotency_key)
            try:
                return await super().run(user_prompt, **kwargs)
            finally:
                _idempotency_key.reset(token)

        async def agent_run(
            prompt: str | None = None, idempotency_key: str | None = None
        ) -> AgentRunResult[Any]:
            return await self.run(user_prompt, idempotency_key=idempotency_key, **kwargs)  # type: ignore[no-any-return]

        return await self._start_flow(agent_run, user_prompt, idempotency_key)

    def run_sync(self, user_prompt: Any = None, *, idempotency_key: str | None = None, **kwargs: Any) -> Any:
        token = _idempotency_key.set(idempotency_key)
        try:  # Agent.run_sync drives `self.run` on its event loop; the key travels in the context
            return super().run_sync(user_prompt, **kwargs)
        finally:
            _idempotency_key.reset(token)

    @asynccontextmanager
    async def iter(
        self, user_prompt: Any = None, *, idempotency_key: str | None = None, **kwargs: Any
    ) -> AsyncIterator[AgentRun[AgentDepsT, Any]]:
        key = idempotency_key if idempotency_key is not None else _idempotency_key.get()
        if FlowRunContext.get() is None:
            self._preflight(kwargs)
            async with _iter_in_flow_run(self, user_prompt, key, kwargs) as run:
                yield run
            return
        capability, record = await self._durable_run(user_prompt, key, kwargs)
        kwargs["capabilities"] = [*(kwargs.get("capabilities") or ()), capability]
        try:
            async with self.wrapped.iter(user_prompt, **kwargs) as run:
                yield run
        except Exception as exc:
            await _finish(record, capability.model_steps.log, error=exc)
            raise
        if run.result is not None:
            ledger = await _finish(record, capability.model_steps.log, output=run.result.output)
            remember_ledger(run.result, ledger)

    async def resume_flow_run(self, flow_run: FlowRun, record: RunRecord) -> Any:
        """Run an earlier flow run of this agent again, in place (same id, run count + 1), from its record."""
        from prefect.flow_engine import run_flow_async

        deps = rehydrate_deps(self.wrapped.deps_type, record.deps)
        if record.redacted:
            if self.deps_for_resume is None:
                raise RunError(
                    f"The deps of run {flow_run.id} held secret-looking values that were not stored "
                    f"({', '.join(record.redacted)}); pass deps_for_resume= to PrefectAgent({self._name!r}) to "
                    "rebuild them on resume."
                )
            deps = self.deps_for_resume(record.deps)
        kwargs: dict[str, Any] = {} if deps is None else {"deps": deps}

        async def agent_run(prompt: str | None = None, idempotency_key: str | None = None) -> Any:
            return await self.run(record.prompt, idempotency_key=idempotency_key, **kwargs)

        return await run_flow_async(
            self._flow(agent_run, flow_run.name), flow_run=flow_run, parameters=flow_run.parameters
        )

    # -- internals ---------------------------------------------------------------------------------------------

    def _flow(self, fn: Callable[..., Awaitable[Any]], flow_run_name: str | None) -> Flow[Any, Any]:
        fn.__dict__[_OWN_FLOW] = self._name  # marks the flow as this agent's own (not a user's @flow)
        return Flow(
            fn=fn,
            name=self._name,
            flow_run_name=flow_run_name,
            persist_result=False,
            validate_parameters=False,
            description=f"Durable run of the Pydantic AI agent {self._name!r}.",
        )

    def _start_flow(
        self, fn: Callable[..., Awaitable[Any]], user_prompt: Any, idempotency_key: str | None
    ) -> Awaitable[Any]:
        """Call `fn` as a new flow run named after the agent (and the idempotency key, when given)."""
        from .server import ensure_api

        ensure_api()  # no server configured: the persistent local one, not a temporary server per process
        run_flow: Any = self._flow(fn, idempotency_key)
        prompt = user_prompt if isinstance(user_prompt, str) else None
        return cast(Awaitable[Any], run_flow(prompt=prompt, idempotency_key=idempotency_key))

    def _preflight(self, kwargs: Mapping[str, Any]) -> None:
        """Fail before any flow run exists when the run cannot work at all."""
        if kwargs.get("model") is None and self.wrapped.model is None:
            raise DurabilityConfigError(
                f"Agent {self._name!r} has no model: pass one to Agent(...) or to run(..., model=...)."
            )
        RunInputs.of(kwargs.get("deps"), _journaled_metadata(kwargs.get("metadata")))

    async def _durable_run(
        self, user_prompt: Any, idempotency_key: str | None, kwargs: Mapping[str, Any]
    ) -> tuple[DurableRunCapability, RunRecord]:
        flow_ctx = FlowRunContext.get()
        assert flow_ctx is not None and flow_ctx.flow_run is not None
        flow_run = flow_ctx.flow_run
        root = await _root_flow_run_id(flow_run)
        scope = (root, flow_run.run_count)
        _forget_old_scopes()
        owner = _owners.setdefault(scope, {}).setdefault(self._name, id(self.wrapped))
        if owner != id(self.wrapped):
            raise DurabilityConfigError(
                f"Two different agents are named {self._name!r} in flow run {flow_run.name!r}; their steps would "
                "share journal keys. Give each agent its own name."
            )
        ordinals = _ordinals.setdefault(scope, Counter())
        ordinal = ordinals[self._name]
        ordinals[self._name] += 1
        identity = RunIdentity(
            run_key=f"key:{idempotency_key}" if idempotency_key is not None else f"flow:{root}",
            agent=self._name,
            ordinal=ordinal,
        )
        inputs = RunInputs.of(kwargs.get("deps"), _journaled_metadata(kwargs.get("metadata")))
        record = await self._record(flow_ctx, ordinal, user_prompt, idempotency_key, inputs)
        model_steps = ModelSteps(
            identity, self._model_tasks, ConversationDigest(inputs.seed(self._name)), StepLog()
        )
        tool_steps = ToolSteps(model_steps, self._tool_tasks)
        return DurableRunCapability(model_steps, tool_steps), record

    async def _record(
        self, flow_ctx: FlowRunContext, ordinal: int, user_prompt: Any, key: str | None, inputs: RunInputs
    ) -> RunRecord:
        """Write (or, on a later attempt, refresh) the run record; tag a user's flow run as holding this agent."""
        assert flow_ctx.flow_run is not None
        flow_run_id = str(flow_ctx.flow_run.id)
        record = await read_record(flow_run_id, self._name, ordinal)
        if record is None:
            bare = getattr(getattr(flow_ctx.flow, "fn", None), _OWN_FLOW, None) == self._name
            flow_fn = getattr(flow_ctx.flow, "fn", None)
            record = RunRecord(
                flow_run_id=flow_run_id,
                agent=self._name,
                ordinal=ordinal,
                idempotency_key=key,
                entrypoint=entrypoint_of(self, self._defined_in)
                if bare
                else entrypoint_of(flow_ctx.flow, getattr(flow_fn, "__module__", None)),
                entrypoint_kind="agent" if bare else "flow",
                prompt=user_prompt if isinstance(user_prompt, str) else None,
                deps=inputs.deps,
                redacted=list(inputs.redacted),
            )
        else:
            record = record.model_copy(update={"pid": os.getpid(), "host": socket.gethostname()})
        await write_record(record)
        wanted = {TAG, f"agent:{self._name}", *([f"key:{key}"] if key else [])}
        if not wanted <= set(flow_ctx.flow_run.tags):
            async with get_client() as client:
                await client.update_flow_run(
                    flow_ctx.flow_run.id, tags=sorted(wanted | set(flow_ctx.flow_run.tags))
                )
            flow_ctx.flow_run.tags = sorted(wanted | set(flow_ctx.flow_run.tags))
        return record


async def _finish(
    record: RunRecord, log: StepLog, *, output: Any = None, error: BaseException | None = None
) -> Ledger:
    """Record how this attempt ended and publish its spent/saved ledger as a Prefect artifact."""
    flow_ctx = FlowRunContext.get()
    run_count = flow_ctx.flow_run.run_count if flow_ctx and flow_ctx.flow_run else 1
    ledger = log.ledger()
    try:
        stored_output = to_journal_json(output, what="the run output")
    except NotJournalableError:
        stored_output = repr(output)
    attempt = AttemptRecord(
        run_count=run_count,
        state="failed" if error is not None else "completed",
        finished_at=datetime.now(UTC),
        output=stored_output,
        error=None if error is None else f"{type(error).__name__}: {error}",
        ledger=ledger,
    )
    record.attempts = [a for a in record.attempts if a.run_count != run_count] + [attempt]
    await write_record(record)
    await acreate_markdown_artifact(
        markdown=ledger_markdown(record.agent, ledger, attempt),
        description=f"prefect-pydantic-ai: what {record.agent} spent and what replay saved",
    )
    return ledger


_MAX_SCOPES = 4096


def _forget_old_scopes() -> None:
    """Keep the per-attempt bookkeeping of a long-lived process bounded (oldest attempts first)."""
    for table in (_ordinals, _owners):
        while len(table) > _MAX_SCOPES:
            del table[next(iter(table))]
    while len(_roots) > _MAX_SCOPES:
        del _roots[next(iter(_roots))]


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


@asynccontextmanager
async def _iter_in_flow_run(
    agent: PrefectAgent[Any, Any], user_prompt: Any, idempotency_key: str | None, kwargs: dict[str, Any]
) -> AsyncIterator[Any]:
    """`iter()` outside a flow: the graph is driven inside a flow run, node by node, on the caller's demand.

    Prefect's flow-run context lives in the task that runs the flow, so every step of the agent run must execute
    there. The caller gets a proxy of the `AgentRun` whose iteration sends each "advance" to that task.
    """
    requests: asyncio.Queue[
        tuple[Callable[[AgentRun[Any, Any]], Awaitable[Any]], asyncio.Future[Any]] | None
    ] = asyncio.Queue()
    started: asyncio.Future[AgentRun[Any, Any]] = asyncio.get_running_loop().create_future()

    async def agent_run(prompt: str | None = None, idempotency_key: str | None = None) -> Any:
        async with agent.iter(user_prompt, idempotency_key=idempotency_key, **kwargs) as run:
            started.set_result(run)
            while (request := await requests.get()) is not None:
                action, reply = request
                try:
                    reply.set_result(await action(run))
                except BaseException as exc:  # handed to the caller, who decides
                    reply.set_exception(exc)
            return run.result

    flow_task = asyncio.ensure_future(agent._start_flow(agent_run, user_prompt, idempotency_key))
    done, _ = await asyncio.wait({flow_task, started}, return_when=asyncio.FIRST_COMPLETED)
    if flow_task in done and not started.done():
        await flow_task  # raises the error that stopped the flow before the run started
    proxy = _FlowDrivenRun(started.result(), requests)
    try:
        yield proxy
    finally:
        await requests.put(None)
        await asyncio.gather(flow_task, return_exceptions=True)


class _FlowDrivenRun:
    """An `AgentRun` stand-in whose steps execute in the flow run's task; other attributes read through."""

    def __init__(self, run: AgentRun[Any, Any], requests: asyncio.Queue[Any]) -> None:
        self._run = run
        self._requests = requests

    async def _ask(self, action: Callable[[AgentRun[Any, Any]], Awaitable[Any]]) -> Any:
        reply: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        await self._requests.put((action, reply))
        return await reply

    def __aiter__(self) -> _FlowDrivenRun:
        return self

    async def __anext__(self) -> Any:
        return await self._ask(lambda run: run.__anext__())

    async def next(self, node: Any) -> Any:
        return await self._ask(lambda run: run.next(node))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._run, name)
