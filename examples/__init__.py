"""Runnable examples: durable Pydantic AI agents as building blocks of Prefect workflows.

Run each one from the repository root, offline by default (``--model`` takes a pydantic-ai model string):

- ``python -m examples.data_analyst``: the analyst agent alone.
- ``python -m examples.analyze_and_report``: agent output feeds downstream tasks.
- ``python -m examples.research_and_summarize``: two agents in sequence, with typed deps.
- ``python -m examples.triage_ticket``: a conditional workflow routed by the agent's typed output.
- ``python -m examples.serve_analyst``: the analyze-and-report flow served as a deployment.

Every example flow passes its agents' steps through `fault_injection(agent_name)`: when the environment
variable ``PPAI_FAULT_PLAN`` holds a `prefect_pydantic_ai.testing.FaultPlan`, each model request and tool call
that really executes is counted in the plan's state file and may fail on a chosen call. Steps replayed from the
journal never reach it, so the state file shows exactly what a resumed run executed again.
"""

from __future__ import annotations

import functools
import os
from collections.abc import Awaitable, Callable
from typing import Any

from pydantic_ai.capabilities import AbstractCapability, CapabilityOrdering
from pydantic_ai.messages import ModelMessage, ModelResponse, ToolCallPart
from pydantic_ai.models import Model, ModelRequestParameters
from pydantic_ai.models.wrapper import WrapperModel
from pydantic_ai.settings import ModelSettings
from pydantic_ai.tools import RunContext, ToolDefinition

from prefect_pydantic_ai.testing import ENV_VAR, FaultPlan

__all__ = ["FAULT_PLAN_ENV", "FaultInjection", "fault_injection"]

FAULT_PLAN_ENV = ENV_VAR
"""The environment variable that hands a `FaultPlan` (as JSON) to the example flows."""


class FaultInjection(AbstractCapability[Any]):
    """Passes each model request and tool call of an agent through `plan.hit(step)` before it runs.

    Steps are named ``"<agent>:model"`` and ``"<agent>:<tool>"``. The capability sits innermost, inside
    `PrefectAgent`'s journaled steps, so only calls that really execute are counted or failed.
    """

    def __init__(self, plan: FaultPlan, agent: str) -> None:
        self.plan = plan
        self.agent = agent

    def get_ordering(self) -> CapabilityOrdering:
        return CapabilityOrdering(position="innermost")

    def get_wrapper_model(self, model: Model) -> Model:
        return _FaultInjectedModel(model, self.plan, f"{self.agent}:model")

    async def wrap_tool_execute(
        self,
        ctx: RunContext[Any],
        *,
        call: ToolCallPart,
        tool_def: ToolDefinition,
        args: dict[str, Any],
        handler: Callable[[dict[str, Any]], Awaitable[Any]],
    ) -> Any:
        await self.plan.hit(f"{self.agent}:{call.tool_name}")
        return await handler(args)


class _FaultInjectedModel(WrapperModel):
    def __init__(self, wrapped: Model, plan: FaultPlan, step: str) -> None:
        super().__init__(wrapped)
        self._plan = plan
        self._step = step

    async def request(
        self,
        messages: list[ModelMessage],
        model_settings: ModelSettings | None,
        model_request_parameters: ModelRequestParameters,
    ) -> ModelResponse:
        await self._plan.hit(self._step)
        return await super().request(messages, model_settings, model_request_parameters)


def fault_injection(agent: str) -> list[AbstractCapability[Any]]:
    """The run capabilities for `agent`: a `FaultInjection` if ``PPAI_FAULT_PLAN`` is set, else none."""
    text = os.environ.get(FAULT_PLAN_ENV)
    return [] if text is None else [FaultInjection(_plan(text), agent)]


@functools.cache
def _plan(text: str) -> FaultPlan:
    """One plan per process and value, so a plan without a state file still counts across agent runs."""
    return FaultPlan.from_json(text)
