"""An agent whose tool waits (asynchronously) on its first call while $SLOW_TOOL_HANG is set, for Ctrl-C tests, or
until the file $SLOW_TOOL_WAIT_FOR exists, for tests that break the infrastructure while a tool runs.

Each model and tool call is appended to $SLOW_TOOL_LOG; the tool prints `WAITING` when it starts waiting. Run as a
script: `slow_tool.py KEY` runs the agent with that idempotency key.
"""

from __future__ import annotations

import asyncio
import os
import sys

from pydantic_ai import Agent
from pydantic_ai.messages import ModelMessage, ModelResponse, TextPart, ToolCallPart, ToolReturnPart
from pydantic_ai.models.function import AgentInfo, FunctionModel

from prefect_pydantic_ai import PrefectAgent


def _log(name: str) -> None:
    with open(os.environ["SLOW_TOOL_LOG"], "a") as f:
        f.write(name + "\n")


def model(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    _log("model")
    if not any(isinstance(p, ToolReturnPart) for m in messages for p in m.parts):
        return ModelResponse(parts=[ToolCallPart("lookup", {})])
    return ModelResponse(parts=[TextPart("found it")])


agent = Agent(FunctionModel(model), name="slow_tool")


@agent.tool_plain
async def lookup() -> str:
    _log("lookup")
    if os.environ.get("SLOW_TOOL_HANG"):
        print("WAITING", flush=True)
        await asyncio.sleep(3600)  # a person presses Ctrl-C here
    if until := os.environ.get("SLOW_TOOL_WAIT_FOR"):
        print("WAITING", flush=True)
        while not os.path.exists(until):
            await asyncio.sleep(0.05)
    return "the answer"


durable = PrefectAgent(agent)

if __name__ == "__main__":
    print("OUTPUT " + asyncio.run(durable.run("go", idempotency_key=sys.argv[1])).output)
