"""A flow that runs one durable agent (model → fetch → model → save → model), deployed to a work pool by the
multi-machine tests and executed by real `prefect worker` processes.

Every model and tool call is appended to the `CallLog` at $MH_CALLS when it starts (with the pid), so tests
count executions over all machines; faults come from the `FaultPlan` in the environment (`tool:save` hangs or
kills inside `save`).
"""

from __future__ import annotations

import os

from prefect import flow
from pydantic_ai import Agent
from pydantic_ai.messages import ModelMessage, ModelResponse, TextPart, ToolCallPart, ToolReturnPart
from pydantic_ai.models.function import AgentInfo, FunctionModel

from prefect_pydantic_ai import PrefectAgent
from prefect_pydantic_ai.testing import CallLog, FaultPlan


def _calls() -> CallLog:
    return CallLog(os.environ["MH_CALLS"])


def model(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    returns = [p for m in messages for p in m.parts if isinstance(p, ToolReturnPart)]
    _calls().record("model", len(returns) + 1)
    if not returns:
        return ModelResponse(parts=[ToolCallPart("fetch", {"item": "order-42"})])
    if len(returns) == 1:
        return ModelResponse(parts=[ToolCallPart("save", {"value": returns[0].content})])
    return ModelResponse(parts=[TextPart(f"done: {returns[1].content}")])


agent = Agent(FunctionModel(model), name="worker_flow")


@agent.tool_plain
async def fetch(item: str) -> str:
    _calls().record("tool:fetch", item)
    return f"{item}-fetched"


@agent.tool_plain
async def save(value: str) -> str:
    _calls().record("tool:save", value)
    await FaultPlan.from_env().hit("tool:save")
    return f"{value}-saved"


durable = PrefectAgent(agent)


@flow(name="multihost-analyst")
async def analyst_flow() -> str:
    result = await durable.run("Fetch the item, then save it.")
    return result.output
