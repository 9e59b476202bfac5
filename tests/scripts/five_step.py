"""The seed's data-analyst shape in one process: model → tool → model → tool → model.

Every model and tool call appends a line to --log before doing its work, so tests can count calls across
processes. --kill-before N SIGKILLs this process just before call N starts (a step boundary); --kill-in-tool N
SIGKILLs it in the middle of call N, after it started (N must be a tool call: 2 or 4).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
from pathlib import Path

from pydantic_ai import Agent, RunContext
from pydantic_ai.messages import ModelMessage, ModelResponse, TextPart, ToolCallPart, ToolReturnPart
from pydantic_ai.models.function import AgentInfo, FunctionModel

from prefect_pydantic_ai import PrefectAgent, TaskConfig

args = argparse.ArgumentParser()
args.add_argument("--key", required=True)
args.add_argument("--log", type=Path, required=True)
args.add_argument("--kill-before", type=int, default=0)
args.add_argument("--kill-in-tool", type=int, default=0)
opts = args.parse_args()


def _call(name: str) -> None:
    lines = opts.log.read_text().splitlines() if opts.log.exists() else []
    number = len(lines) + 1
    if number == opts.kill_before:
        os.kill(os.getpid(), signal.SIGKILL)
    with opts.log.open("a") as f:
        f.write(f"{number} {name}\n")
        f.flush()
        os.fsync(f.fileno())
    if number == opts.kill_in_tool:
        os.kill(os.getpid(), signal.SIGKILL)


def analyst(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    _call("model")
    returns = [p for m in messages for p in m.parts if isinstance(p, ToolReturnPart)]
    if not returns:
        return ModelResponse(parts=[ToolCallPart("calculate_statistics", {"column": "sales"})])
    if len(returns) == 1:
        return ModelResponse(parts=[ToolCallPart("detect_anomalies", {"column": "sales"})])
    return ModelResponse(
        parts=[TextPart(f"mean={returns[0].content['mean']} anomalies={returns[1].content}")]
    )


agent = Agent(FunctionModel(analyst), name="five_step", deps_type=list)


@agent.tool
async def calculate_statistics(ctx: RunContext[list[float]], column: str) -> dict[str, float]:
    _call("tool:calculate_statistics")
    await asyncio.sleep(0.05)
    return {"mean": sum(ctx.deps) / len(ctx.deps)}


@agent.tool
def detect_anomalies(ctx: RunContext[list[float]], column: str) -> list[float]:
    _call("tool:detect_anomalies")
    return [x for x in ctx.deps if x > 500]


durable = PrefectAgent(agent, tool_task_config=TaskConfig(retries=0))
result = durable.run_sync(
    "Analyze the sales data", deps=[100.0, 110.0, 1000.0, 95.0], idempotency_key=opts.key
)
print("OUTPUT " + json.dumps({"output": result.output, "usage": result.usage.requests}))
