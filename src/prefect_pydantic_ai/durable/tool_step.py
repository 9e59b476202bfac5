"""Tool calls as durable steps: each call is a `tool: <name>` Prefect task whose outcome is journaled.

The outcome of a tool is more than its return value: it may ask the model to retry (`ModelRetry`), fail
(`ToolFailed`) or defer the call (`CallDeferred`, `ApprovalRequired`). All of these are journaled, so a
replayed step has the same effect on the run as the original, and only real errors are retried by Prefect.
"""

from __future__ import annotations

import contextvars
import difflib
import hashlib
import logging
import sys
from collections.abc import Awaitable, Callable, Collection, Mapping
from typing import Any, Literal

from pydantic import TypeAdapter
from pydantic_ai.exceptions import (
    ApprovalRequired,
    CallDeferred,
    ModelRetry,
    SkipToolExecution,
    ToolFailed,
    ToolFailedError,
    ToolRetryError,
)
from pydantic_ai.messages import ToolCallPart, ToolReturn
from pydantic_ai.tools import RunContext

from prefect_pydantic_ai.durable.errors import DurabilityConfigError, NotJournalableError
from prefect_pydantic_ai.durable.journal import canonical_json, seal, to_journal_json
from prefect_pydantic_ai.durable.model_step import ModelSteps, StepReplayedEvent, SubRun, sub_run_scope
from prefect_pydantic_ai.durable.steps import RUN_AGAIN, StepTasks, within_step
from prefect_pydantic_ai.durable.task_config import TaskConfig, UnverifiedPolicy
from prefect_pydantic_ai.errors import UnverifiedEffectError

_TOOL_RETURN: TypeAdapter[ToolReturn] = TypeAdapter(ToolReturn)
logger = logging.getLogger("prefect_pydantic_ai")

unverified_override: contextvars.ContextVar[UnverifiedPolicy | None] = contextvars.ContextVar(
    "ppa_unverified_override", default=None
)
"""Set by `resume_run(..., unverified=...)`: how the resumed attempt treats unverified calls, whatever the config."""

UNVERIFIED_NOTE = (
    "This call of {tool!r} was started in an earlier attempt of this run, which stopped before the result came "
    "back. Its effect is unverified: it may or may not have happened. Do not assume either; check before "
    "calling it again."
)


class ToolTasks:
    """The step tasks of an agent's tools.

    A tool's config is the tool default (MCP tools: `mcp_task_config` over it), overlaid by the config in the
    tool's metadata (`{"prefect": ...}`), then by its entry in `tool_task_config_by_name`. Each layer is
    `TaskConfig.merged_over` the one below: the fields it sets win, the others are inherited, except that a
    layer setting `retries` brings its own backoff (`retry_delay_seconds`, `retry_jitter_factor`).
    `False` in the metadata or `None` by name runs the tool inline, outside the journal.

    Every config that can be resolved is resolved when this is built (and `check` resolves more), so a layering
    whose fields do not fit together fails before the run pays for anything.
    """

    def __init__(
        self,
        default: TaskConfig,
        by_name: Mapping[str, TaskConfig | None],
        *,
        agent: str,
        mcp: TaskConfig | None = None,
        metadata: Mapping[str, TaskConfig | Literal[False] | None] | None = None,
    ) -> None:
        self._agent = agent
        self._default = default
        self._mcp = default if mcp is None else _layered(mcp, default, "mcp_task_config", "tool_task_config")
        self._has_mcp = mcp is not None
        self._by_name = dict(by_name)
        self._tasks: list[StepTasks] = []  # one per distinct config
        self.check(metadata or {}, function_tools=set(metadata or {}))

    def check(
        self,
        metadata: Mapping[str, TaskConfig | Literal[False] | None],
        *,
        function_tools: Collection[str] = (),
    ) -> None:
        """Resolve the config of every tool named in `tool_task_config_by_name` or in `metadata` (a tool's name
        and the config in its metadata); raises `DurabilityConfigError` for one whose fields do not fit together.
        A tool not among `function_tools` may come from an MCP toolset: its config must fit over both defaults."""
        for name in sorted({*self._by_name, *metadata}):
            mcp_too = self._has_mcp and name not in function_tools
            for from_mcp in (False, True) if mcp_too else (False,):
                self.config_of(name, metadata=metadata.get(name), from_mcp=from_mcp)

    def config_of(
        self, tool_name: str, *, metadata: TaskConfig | Literal[False] | None = None, from_mcp: bool = False
    ) -> TaskConfig | None:
        """The effective config of a tool, or None when the tool is configured to run inline."""
        config, below = (self._mcp, "mcp_task_config") if from_mcp else (self._default, "tool_task_config")
        if metadata is False and tool_name not in self._by_name:
            return None
        if metadata:
            config = _layered(metadata, config, f"the metadata of tool {tool_name!r}", below)
            below = f"{below} and the tool's metadata"
        if tool_name in self._by_name:
            override = self._by_name[tool_name]
            if override is None:
                return None
            config = _layered(override, config, f"tool_task_config_by_name[{tool_name!r}]", below)
        return config

    def for_tool(
        self, tool_name: str, *, metadata: TaskConfig | Literal[False] | None = None, from_mcp: bool = False
    ) -> StepTasks | None:
        """The step tasks for a tool, or None when the tool is configured to run inline (not as a task)."""
        config = self.config_of(tool_name, metadata=metadata, from_mcp=from_mcp)
        if config is None:
            return None
        for tasks in self._tasks:
            if tasks.config == config:
                return tasks
        self._tasks.append(StepTasks("tool", config, agent=self._agent))
        return self._tasks[-1]

    def check_names(self, tools: Collection[str]) -> None:
        """Fail on a `tool_task_config_by_name` entry naming no tool of the agent (a typo would silently
        leave that tool on the default config)."""
        for name in self._by_name:
            if name not in tools:
                close = difflib.get_close_matches(name, list(tools), n=1)
                hint = f" (did you mean {close[0]!r}?)" if close else ""
                raise DurabilityConfigError(
                    f"tool_task_config_by_name names {name!r}, which is not a tool of agent {self._agent!r}{hint}; "
                    f"its tools are: {', '.join(sorted(tools)) or 'none'}."
                )


def _layered(config: TaskConfig, base: TaskConfig, what: str, below: str) -> TaskConfig:
    """`config` (described by `what`) over `base` (`below`), with both named in an error."""
    try:
        return config.merged_over(base)
    except DurabilityConfigError as exc:
        reason = str(exc).removeprefix("Invalid TaskConfig: ")
        raise DurabilityConfigError(f"{what} over {below} gives an invalid TaskConfig: {reason}") from None


def from_mcp(ctx: RunContext[Any], tool_name: str) -> bool:
    """Whether the tool `tool_name` of this run comes from an MCP toolset (which `mcp_task_config` applies to)."""
    mcp = sys.modules.get("pydantic_ai.mcp")  # never imported: no MCP toolset can exist
    manager = ctx.tool_manager
    tool = manager.tools.get(tool_name) if manager is not None and manager.tools else None
    if mcp is None or tool is None:
        return False
    leaves: list[object] = []
    tool.toolset.apply(leaves.append)
    return any(isinstance(leaf, mcp.MCPToolset) for leaf in leaves)


class ToolSteps:
    """Runs a run's tool calls as journaled steps, with the per-tool task configuration."""

    def __init__(self, model_steps: ModelSteps, tasks: ToolTasks) -> None:
        self._model_steps = model_steps
        self._tasks = tasks
        self._unplaced = 0

    def key(self, call: ToolCallPart, *, name: str | None = None) -> str:
        """Key of a tool call: the model step that issued it, its position in that response, name (`name`, if
        given, instead of the tool's) and args."""
        steps = self._model_steps
        position = steps.tool_call_positions.get(call.tool_call_id)
        if position is None:  # a call not issued by the last response (e.g. resumed deferred calls)
            self._unplaced += 1
            place = f"u{self._unplaced}"
        else:
            place = str(position)
        args = hashlib.sha256(canonical_json(to_journal_json(call.args, what="tool arguments"))).hexdigest()
        return steps.key(
            "tool", f"{steps.number}.{place}", f"{steps.step_digest}:{args}", name or call.tool_name
        )

    async def process_output(
        self, call: ToolCallPart | None, function: str, handler: Callable[[], Awaitable[Any]]
    ) -> Any:
        """Run an output function as the scope of the agent runs it starts (a delegation in an output function).

        The output function is not journaled itself: it returns typed Python output that the journal cannot
        rebuild, and it runs again on every attempt. The agent runs it starts are keyed under this scope (the
        model step that asked for the output, and the output call's place in it), so on a later attempt they
        replay what they completed, and their ledgers join this run's.
        """
        steps = self._model_steps
        name = f"output:{function}"
        key = (
            self.key(call, name=name)
            if call is not None
            else steps.key("tool", f"{steps.number}.output", steps.step_digest, name)
        )
        with (
            within_step(key, f"output: {function} @ {steps.identity.agent}"),
            sub_run_scope(steps.log, steps.on_executed),
        ):
            return await handler()

    async def execute(
        self,
        ctx: RunContext[Any],
        call: ToolCallPart,
        args: dict[str, Any],
        handler: Callable[[dict[str, Any]], Awaitable[Any]],
        *,
        metadata: TaskConfig | Literal[False] | None = None,
    ) -> Any:
        """Run the tool call `call` through the journal; `handler` runs the real tool lifecycle. `metadata` is
        the config the tool carries in its metadata."""
        tasks = self._tasks.for_tool(
            call.tool_name, metadata=metadata, from_mcp=from_mcp(ctx, call.tool_name)
        )
        if tasks is None:
            return await handler(args)
        log = self._model_steps.log
        live: list[BaseException] = []
        live_result: list[Any] = []

        async def work() -> Any:
            live.clear()
            live_result.clear()
            with sub_run_scope(log, self._model_steps.on_executed) as sub_runs:
                try:
                    result = await handler(args)
                    outcome = _return_outcome(call.tool_name, result)
                    live_result.append(result)
                except (
                    ToolRetryError,
                    ToolFailedError,
                    CallDeferred,
                    ApprovalRequired,
                    SkipToolExecution,
                ) as exc:
                    live.append(exc)
                    outcome = _control_flow_outcome(exc)
            if sub_runs:  # journaled with the outcome: a replay of this step saves all of them
                outcome["sub_runs"] = [SubRun(agent, run.ledger()).to_json() for agent, run in sub_runs]
            return seal("tool", outcome)

        # An approved call runs again after the tool asked for approval (`ApprovalRequired`): another step.
        key = self.key(call, name=f"{call.tool_name}#approved" if ctx.tool_call_approved else None)
        policy = tasks.config.on_unverified

        async def unverified() -> Any:
            """The call was started in an earlier attempt and never finished: apply the tool's policy."""
            chosen = unverified_override.get() or policy
            if chosen == "fail":
                raise UnverifiedEffectError(
                    f"Tool {call.tool_name!r} was called in an earlier attempt that stopped before its result "
                    f"was recorded, so whether its effect happened is unknown (step idempotency key {key}). "
                    "Check the external system, then resume with `--unverified rerun` (call it again) or "
                    "`--unverified tell_model` (tell the model the effect is unverified)."
                )
            if chosen == "tell_model":
                return seal(
                    "tool", {"outcome": "unverified", "message": UNVERIFIED_NOTE.format(tool=call.tool_name)}
                )
            logger.warning(
                "Tool %r: an earlier attempt's effect is unverified; calling it again.", call.tool_name
            )
            return RUN_AGAIN  # through the step's own timeout, like any attempt

        step = await tasks.run(
            call.tool_name,
            key,
            work,
            unverified=None if policy is None else unverified,
            on_step=self._model_steps.on_step,
        )
        log.tool(call.tool_name, step.replayed)
        if step.replayed:
            number = self._model_steps.number
            await ctx.emit(
                StepReplayedEvent(
                    step="tool", request=number, tool_call_id=call.tool_call_id, tool_name=call.tool_name
                )
            )
            for data in step.data.get("sub_runs", ()):
                log.replayed_sub_run(SubRun.from_json(data))
        if live:
            raise live[0]
        if live_result:
            return live_result[0]
        if step.replayed and step.data["outcome"] in ("return", "tool_return"):
            ctx.usage.tool_calls += 1  # pydantic-ai counts a call that returned (a skip it counts itself)
        return replay_outcome(step.data)


def _return_outcome(tool_name: str, result: Any) -> dict[str, Any]:
    try:
        if isinstance(result, ToolReturn):
            return {"outcome": "tool_return", "value": _TOOL_RETURN.dump_python(result, mode="json")}
        return {
            "outcome": "return",
            "value": to_journal_json(result, what=f"the result of tool {tool_name!r}"),
        }
    except NotJournalableError as exc:
        raise NotJournalableError(
            f"{exc} To keep this tool out of the journal, pass tool_task_config_by_name={{{tool_name!r}: None}}."
        ) from None


def _control_flow_outcome(exc: BaseException) -> dict[str, Any]:
    if isinstance(exc, ToolRetryError):
        cause = exc.__cause__
        return {"outcome": "retry", "message": cause.message if isinstance(cause, ModelRetry) else str(exc)}
    if isinstance(exc, ToolFailedError):
        cause = exc.__cause__
        return {"outcome": "failed", "message": cause.message if isinstance(cause, ToolFailed) else str(exc)}
    if isinstance(exc, CallDeferred):
        return {
            "outcome": "deferred",
            "metadata": to_journal_json(exc.metadata, what="deferral metadata"),
            "kind": exc.kind,
        }
    if isinstance(exc, ApprovalRequired):
        return {"outcome": "approval", "metadata": to_journal_json(exc.metadata, what="approval metadata")}
    assert isinstance(exc, SkipToolExecution)
    return {"outcome": "skip", "value": to_journal_json(exc.result, what="skipped tool result")}


def replay_outcome(outcome: dict[str, Any]) -> Any:
    """Give the run the same effect the journaled outcome had when the step first ran."""
    match outcome["outcome"]:
        case "return":
            return outcome["value"]
        case "tool_return":
            return _TOOL_RETURN.validate_python(outcome["value"])
        case "retry":
            raise ModelRetry(outcome["message"])
        case "failed":
            raise ToolFailed(outcome["message"])
        case "deferred":
            raise CallDeferred(outcome["metadata"], kind=outcome["kind"])
        case "approval":
            raise ApprovalRequired(outcome["metadata"])
        case "skip":
            raise SkipToolExecution(outcome["value"])
        case "unverified":
            return outcome["message"]
        case other:
            raise ValueError(f"unknown journaled tool outcome {other!r}")
