"""The demo's durable analyst, built at import from the environment `prefect-pydantic-ai demo` sets.

It is a module-level `PrefectAgent` so that its runs record an import path and can be resumed by
`prefect-pydantic-ai resume`. Faults come from a `FaultPlan` in the environment whose call counts live in a
state file, so the first attempt fails (or is killed) at the chosen step and the recovery attempt does not.
`first_attempt()` is the demo's first attempt; the demo runs it in a child process.
"""

from __future__ import annotations

import os
from typing import Any

from prefect.logging.handlers import APILogHandler
from pydantic_ai.capabilities import AbstractCapability
from pydantic_ai.messages import ModelMessage, ModelResponse, ToolCallPart
from pydantic_ai.models import Model, ModelRequestParameters, infer_model
from pydantic_ai.models.wrapper import WrapperModel
from pydantic_ai.settings import ModelSettings
from pydantic_ai.tools import RunContext, ToolDefinition

from . import PrefectAgent, TaskConfig
from .analyst import DEFAULT_PROMPT, build_analyst_agent, load_csv, offline_analyst_model, sales_dataset
from .testing.faults import FaultPlan

PLAN = FaultPlan.from_env()
MODEL_CONFIG = TaskConfig(retries=2, retry_delay_seconds=[0.5, 1.0], timeout_seconds=60.0)
TOOL_CONFIG = TaskConfig(retries=2, retry_delay_seconds=[0.5, 1.0], timeout_seconds=1.0)


class _ModelFaults(WrapperModel):
    """Consults the fault plan before every model request (inside the step's Prefect task)."""

    async def request(
        self,
        messages: list[ModelMessage],
        model_settings: ModelSettings | None,
        model_request_parameters: ModelRequestParameters,
    ) -> ModelResponse:
        await PLAN.hit("model")
        return await super().request(messages, model_settings, model_request_parameters)


class ToolFaults(AbstractCapability[Any]):
    """Consults the fault plan before every tool call (inside the step's Prefect task)."""

    async def before_tool_execute(
        self, ctx: RunContext[Any], *, call: ToolCallPart, tool_def: ToolDefinition, args: dict[str, Any]
    ) -> dict[str, Any]:
        await PLAN.hit(call.tool_name)
        return args


def _model() -> Model:
    name = os.environ.get("PPA_DEMO_MODEL")
    return _ModelFaults(offline_analyst_model() if not name else infer_model(name))


analyst = PrefectAgent(
    build_analyst_agent(_model()), model_task_config=MODEL_CONFIG, tool_task_config=TOOL_CONFIG
)


async def first_attempt() -> None:
    """Attempt 1 of the demo: run the analysis under the demo's idempotency key (it may fail or be killed)."""
    from .cli import print_step
    from .steps import observe_steps

    csv = os.environ.get("PPA_DEMO_CSV")
    data = load_csv(csv) if csv else sales_dataset()
    observe_steps(print_step)
    try:
        await analyst.run(
            DEFAULT_PROMPT, deps=data, idempotency_key=os.environ["PPA_DEMO_KEY"], capabilities=[ToolFaults()]
        )
    finally:
        await APILogHandler.aflush()  # the child exits without running atexit handlers
