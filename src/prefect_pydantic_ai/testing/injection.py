"""`FaultInjection`: a capability that passes an agent's model requests and tool calls through a `FaultPlan`."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

from pydantic_ai.capabilities import AbstractCapability, CapabilityOrdering
from pydantic_ai.messages import ModelMessage, ModelResponse, ToolCallPart
from pydantic_ai.models import Model, ModelRequestParameters
from pydantic_ai.models.wrapper import WrapperModel
from pydantic_ai.settings import ModelSettings
from pydantic_ai.tools import RunContext, ToolDefinition

from .faults import FaultPlan


class FaultInjection(AbstractCapability[Any]):
    """Calls `plan.hit(step)` before each model request and tool call of the run it is given to.

    Steps are named ``"model"`` and the tool's name, or ``"<prefix>:model"`` and ``"<prefix>:<tool>"`` with a
    `prefix` (an agent's name, when several agents share one plan). The capability orders itself innermost,
    inside `PrefectAgent`'s durable steps: a fault is one failed attempt of the step (so the step's retries
    apply), and a step replayed from the journal never reaches the plan, so the plan counts only what executed.

        await durable.run(prompt, capabilities=[FaultInjection(FaultPlan().fail("search", on_call=1, exc=...))])
    """

    def __init__(self, plan: FaultPlan, prefix: str | None = None) -> None:
        self.plan = plan
        self.prefix = prefix

    def step(self, name: str) -> str:
        """The plan's name for the model (`"model"`) or for a tool."""
        return f"{self.prefix}:{name}" if self.prefix else name

    def get_ordering(self) -> CapabilityOrdering:
        return CapabilityOrdering(position="innermost")

    def get_wrapper_model(self, model: Model) -> Model:
        return _FaultInjectedModel(model, self.plan, self.step("model"))

    async def wrap_tool_execute(
        self,
        ctx: RunContext[Any],
        *,
        call: ToolCallPart,
        tool_def: ToolDefinition,
        args: dict[str, Any],
        handler: Callable[[dict[str, Any]], Awaitable[Any]],
    ) -> Any:
        await self.plan.hit(self.step(call.tool_name))
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
