"""The budgeted agent of test_budget.py: model → `measure` → model → `measure` → model, requests of 1500, 2900 and
4500 tokens (gpt-4o prices). `python budgeted.py KEY` runs it under KEY and SIGKILLs itself inside the second
`measure` call, after both requests it paid for were recorded. `python budgeted.py KEY ask` runs `asking` (a
5000-token budget that waits for approval, holding its process) and SIGKILLs itself once it waits."""

from __future__ import annotations

import asyncio
import os
import signal
import sys

from pydantic_ai import Agent
from pydantic_ai.messages import ModelMessage, ModelResponse, TextPart, ToolCallPart, ToolReturnPart
from pydantic_ai.models.function import AgentInfo, FunctionModel
from pydantic_ai.usage import RequestUsage

from prefect_pydantic_ai import Budget, PrefectAgent
from prefect_pydantic_ai.durable.wait import observing_waits
from prefect_pydantic_ai.store.waits import PendingCall

SIZES = [(1200, 300), (2500, 400), (4000, 500)]
"""Input and output tokens of requests 1, 2 and 3: 1500, 2900 and 4500 tokens."""
CALLS: list[str] = []
"""Every model request and tool call executed, in order."""
FAIL_TOOL: list[int] = [0]


def _model(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    done = [p for m in messages for p in m.parts if isinstance(p, ToolReturnPart)]
    CALLS.append(f"model {len(done) + 1}")
    usage = RequestUsage(input_tokens=SIZES[len(done)][0], output_tokens=SIZES[len(done)][1])
    if len(done) < 2:
        return ModelResponse(parts=[ToolCallPart("measure", {"n": len(done)})], usage=usage)
    return ModelResponse(parts=[TextPart(f"measured {[p.content for p in done]}")], usage=usage)


agent: Agent[None, str] = Agent(FunctionModel(_model, model_name="gpt-4o"), name="budgeted")


@agent.tool_plain
def measure(n: int) -> int:
    CALLS.append(f"tool {n}")
    if n == 1 and os.environ.get("BUDGETED_KILL"):
        os.kill(os.getpid(), signal.SIGKILL)
    if n == 1 and FAIL_TOOL[0] > 0:
        FAIL_TOOL[0] -= 1
        raise ValueError("meter offline")
    return n * 10


asking = PrefectAgent(agent, budget=Budget(tokens=5000, on_exceeded="approve"), approvals="pause")
"""Waits in its process before request 3, which the 5000-token budget cannot cover."""


async def _killed(flow_run_id: str, calls: list[PendingCall]) -> None:
    os.kill(os.getpid(), signal.SIGKILL)


if __name__ == "__main__":
    if sys.argv[2:] == ["ask"]:
        with observing_waits(_killed):
            asyncio.run(asking.run("measure twice", idempotency_key=sys.argv[1]))
    os.environ["BUDGETED_KILL"] = "1"
    asyncio.run(PrefectAgent(agent).run("measure twice", idempotency_key=sys.argv[1]))
