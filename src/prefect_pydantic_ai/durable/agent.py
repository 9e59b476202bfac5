"""`PrefectAgent`: a Pydantic AI agent wrapped so that every run carries `PrefectDurability`."""

from __future__ import annotations

import inspect
from collections.abc import AsyncIterator, Callable, Mapping
from contextlib import asynccontextmanager
from typing import Any

from pydantic_ai.agent import AbstractAgent, EventStreamHandler, WrapperAgent
from pydantic_ai.output import OutputDataT
from pydantic_ai.run import AgentRun
from pydantic_ai.tools import AgentDepsT

from prefect_pydantic_ai.durable.budget import Budget
from prefect_pydantic_ai.durable.capability import PrefectDurability, durability_of, realtime_refused
from prefect_pydantic_ai.durable.capability import idempotency_key as within_key
from prefect_pydantic_ai.durable.errors import DurabilityConfigError
from prefect_pydantic_ai.durable.task_config import TaskConfig, TaskConfigLike
from prefect_pydantic_ai.durable.wait import awaiting_approval_of_bare_run
from prefect_pydantic_ai.store.records import entrypoint_of, load_entrypoint
from prefect_pydantic_ai.store.waits import ApprovalMode


class PrefectAgent(WrapperAgent[AgentDepsT, OutputDataT]):
    """Durable execution for a Pydantic AI agent on Prefect: the wrapped agent with `PrefectDurability` added.

    Outside a flow, `run`, `run_sync`, `run_stream` and `iter` create a flow run named after the agent. Inside a
    user's `@flow`, the agent's steps are tasks of that flow run, so retrying it replays them. Every model
    request is a `model: <model>` task and every tool call a `tool: <tool>` task, each with its own `TaskConfig`;
    a tool configured as `None` in `tool_task_config_by_name` runs inline, outside the journal.

    `idempotency_key=` names a logical run across processes: calling `run` again with the same key replays
    every step that completed and continues from the first one that did not.

    `deps_for_resume` rebuilds deps when a run is resumed by `prefect-pydantic-ai resume` and its deps held
    secret-looking values, which are never stored: it receives the stored (redacted) deps JSON. With
    `store_deps=False` the run record keeps nothing of the deps, and `deps_for_resume` receives `None`.

    The arguments of pydantic-ai's own `PrefectAgent` mean the same here (docs/migrating.md): `name` names the
    durable agent instead of the wrapped agent's name; `event_stream_handler` is the handler of every run that
    passes none of its own, as `Agent(event_stream_handler=...)` is; `mcp_task_config` configures the tools of
    MCP toolsets. Configs may be plain dicts.

    A tool with `requires_approval=True` (or one raising `CallDeferred`) makes the run wait for a human:
    `approvals="suspend"` (default) frees the process until `prefect-pydantic-ai approve` or the Prefect UI
    decides; `"pause"` keeps it waiting up to `approval_timeout_seconds`.

    `budget=Budget(usd=..., tokens=...)` caps what one logical run spends over all its attempts, and
    `max_parallel_tools=N` how many of its tool calls execute at once (see `PrefectDurability`).
    """

    def __init__(
        self,
        wrapped: AbstractAgent[AgentDepsT, OutputDataT],
        *,
        name: str | None = None,
        event_stream_handler: EventStreamHandler[AgentDepsT] | None = None,
        mcp_task_config: TaskConfigLike | None = None,
        model_task_config: TaskConfigLike | None = None,
        tool_task_config: TaskConfigLike | None = None,
        tool_task_config_by_name: Mapping[str, TaskConfigLike | None] | None = None,
        event_stream_handler_task_config: TaskConfigLike | None = None,
        prefectify_toolset_func: Callable[..., Any] | None = None,
        deps_for_resume: Callable[[Any], AgentDepsT] | None = None,
        approvals: ApprovalMode = "suspend",
        approval_timeout_seconds: int = 3600,
        store_deps: bool = True,
        budget: Budget | None = None,
        max_parallel_tools: int | None = None,
    ) -> None:
        super().__init__(wrapped)
        if durability_of(wrapped) is not None:
            raise DurabilityConfigError(
                f"Agent {wrapped.name!r} already has PrefectDurability: use it directly, or drop the capability "
                "and wrap it in PrefectAgent, not both."
            )
        if prefectify_toolset_func is not None:
            raise DurabilityConfigError(
                "prefectify_toolset_func has no equivalent here: every tool call of every toolset is already a "
                "durable step; configure tools with tool_task_config_by_name= or metadata={'prefect': ...}."
            )
        self._event_stream_handler = event_stream_handler
        self.durability = PrefectDurability(
            name=name,
            model_task_config=model_task_config,
            tool_task_config=tool_task_config,
            tool_task_config_by_name=tool_task_config_by_name,
            mcp_task_config=mcp_task_config,
            event_stream_handler_task_config=event_stream_handler_task_config,
            deps_for_resume=deps_for_resume,
            approvals=approvals,
            approval_timeout_seconds=approval_timeout_seconds,
            store_deps=store_deps,
            budget=budget,
            max_parallel_tools=max_parallel_tools,
        ).for_agent(wrapped)
        caller = inspect.currentframe()
        self._defined_in: str | None = (
            caller.f_back.f_globals.get("__name__") if caller and caller.f_back else None
        )
        self.durability.importable_as(self, self._defined_in)

    @property
    def name(self) -> str:
        return self.durability.agent_name

    @name.setter
    def name(self, value: str | None) -> None:
        raise DurabilityConfigError(
            "A PrefectAgent's name is fixed: it keys the journal. Rename the wrapped agent instead."
        )

    @property
    def event_stream_handler(self) -> EventStreamHandler[AgentDepsT] | None:
        return self._event_stream_handler or self.wrapped.event_stream_handler

    @property
    def model_task_config(self) -> TaskConfig:
        return self.durability.model_task_config

    @property
    def tool_task_config(self) -> TaskConfig:
        return self.durability.tool_task_config

    def __reduce__(self) -> tuple[Any, ...]:
        """Pickle by reference to where the agent is defined, as Prefect does when it ships a served flow.

        An agent holds clients, context variables and functions that cannot be pickled by value; a module-level
        `PrefectAgent` is re-imported on the other side instead.
        """
        entrypoint = entrypoint_of(self, self._defined_in)
        if entrypoint is None:
            raise TypeError(
                f"PrefectAgent {self.name!r} cannot be pickled: define it at module level so it can be re-imported, "
                "or create it inside the flow function."
            )
        return (load_entrypoint, (entrypoint,))

    async def run(self, user_prompt: Any = None, *, idempotency_key: str | None = None, **kwargs: Any) -> Any:
        with within_key(idempotency_key), awaiting_approval_of_bare_run():
            return await super().run(user_prompt, **kwargs)

    def run_sync(self, user_prompt: Any = None, *, idempotency_key: str | None = None, **kwargs: Any) -> Any:
        with within_key(idempotency_key):  # Agent.run_sync drives `self.run` on its event loop
            return super().run_sync(user_prompt, **kwargs)

    @asynccontextmanager
    async def run_stream(
        self, user_prompt: Any = None, *, idempotency_key: str | None = None, **kwargs: Any
    ) -> AsyncIterator[Any]:
        with within_key(idempotency_key):
            async with super().run_stream(user_prompt, **kwargs) as stream:
                yield stream

    def _open_realtime_session(self, *args: Any, **kwargs: Any) -> Any:
        raise realtime_refused(self.name)

    @asynccontextmanager
    async def iter(
        self, user_prompt: Any = None, *, idempotency_key: str | None = None, **kwargs: Any
    ) -> AsyncIterator[AgentRun[AgentDepsT, Any]]:
        if kwargs.get("model") is None and self.wrapped.model is None:
            raise DurabilityConfigError(
                f"Agent {self.name!r} has no model: pass one to Agent(...) or to run(..., model=...)."
            )
        kwargs["capabilities"] = [*(kwargs.get("capabilities") or ()), self.durability]
        with within_key(idempotency_key):
            async with self.wrapped.iter(user_prompt, **kwargs) as run:
                yield run
