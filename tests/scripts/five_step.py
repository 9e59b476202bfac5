"""The seed's data-analyst shape: model → tool → model → tool → model, as an importable module and a script.

Every model and tool call appends a line to $FIVE_STEP_LOG before doing its work, so tests count calls across
processes. $FIVE_STEP_KILL_BEFORE=N SIGKILLs the process just before call N starts (a step boundary);
$FIVE_STEP_KILL_IN_TOOL=N SIGKILLs it in the middle of call N (a tool call: 2 or 4), once Prefect has heard the
step started; $FIVE_STEP_KILL_AT_ONCE_IN_TOOL=N in the first instant of call N; $FIVE_STEP_HANG_IN_TOOL=N
makes call N sleep for a minute; $FIVE_STEP_FAIL=NAME (`model`, `tool:detect_anomalies`) makes every call of that
name fail with `ConnectionError` while it is set. $FIVE_STEP_AGENT names the agent (default "five_step"), so a
test that lists runs by agent sees only its own. Usage is FunctionModel's own estimate. The same agent comes in
both durable forms, module-level so `prefect-pydantic-ai resume` can re-create either: `durable` wraps `agent` in
`PrefectAgent`; `capable` is built with `capabilities=[PrefectDurability(...)]`.
Run as a script: `five_step.py KEY` (an empty KEY runs without an idempotency key); $FIVE_STEP_FORM=capability
runs `capable` under `with idempotency_key(KEY)` instead of `durable.run_sync(..., idempotency_key=KEY)`.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
import time
from pathlib import Path

from pydantic_ai import Agent, RunContext
from pydantic_ai.messages import ModelMessage, ModelResponse, TextPart, ToolCallPart, ToolReturnPart
from pydantic_ai.models.function import AgentInfo, FunctionModel

from prefect_pydantic_ai import PrefectAgent, PrefectDurability, TaskConfig, idempotency_key


def _call(name: str) -> None:
    log = Path(os.environ["FIVE_STEP_LOG"])
    lines = log.read_text().splitlines() if log.exists() else []
    number = len(lines) + 1
    if number == int(os.environ.get("FIVE_STEP_KILL_BEFORE", "0")):
        os.kill(os.getpid(), signal.SIGKILL)
    with log.open("a") as f:
        f.write(f"{number} {name}\n")
        f.flush()
        os.fsync(f.fileno())
    if number == int(os.environ.get("FIVE_STEP_KILL_AT_ONCE_IN_TOOL", "0")):
        os.kill(os.getpid(), signal.SIGKILL)
    if number == int(os.environ.get("FIVE_STEP_KILL_IN_TOOL", "0")):
        # In the middle of the call, as a crash finds a tool: once Prefect has heard that the step is running.
        # That news travels as an event from a background thread, which a kill in the call's first millisecond
        # can outrun (then no task run of the step exists anywhere to be shown as crashed).
        from prefect.events.worker import EventsWorker

        EventsWorker.drain_all(timeout=30)
        os.kill(os.getpid(), signal.SIGKILL)
    if number == int(os.environ.get("FIVE_STEP_HANG_IN_TOOL", "0")):
        time.sleep(60)
    if os.environ.get("FIVE_STEP_FAIL") == name:
        raise ConnectionError(f"{name} is down")


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


async def calculate_statistics(ctx: RunContext[list[float]], column: str) -> dict[str, float]:
    _call("tool:calculate_statistics")
    await asyncio.sleep(0.05)
    return {"mean": sum(ctx.deps) / len(ctx.deps)}


def detect_anomalies(ctx: RunContext[list[float]], column: str) -> list[float]:
    _call("tool:detect_anomalies")
    return [x for x in ctx.deps if x > 500]


TOOLS = [calculate_statistics, detect_anomalies]
agent = Agent(
    FunctionModel(analyst),
    name=os.environ.get("FIVE_STEP_AGENT", "five_step"),
    deps_type=list[float],
    tools=TOOLS,
)
durable = PrefectAgent(agent, tool_task_config=TaskConfig(retries=0))
capable = Agent(
    FunctionModel(analyst),
    name="five_step_capability",
    deps_type=list[float],
    tools=TOOLS,
    capabilities=[PrefectDurability(tool_task_config=TaskConfig(retries=0))],
)
DEPS = [100.0, 110.0, 1000.0, 95.0]

if __name__ == "__main__":
    key = sys.argv[1] or None
    if os.environ.get("FIVE_STEP_FORM") == "capability":
        with idempotency_key(key):
            result = capable.run_sync("Analyze the sales data", deps=DEPS)
    else:
        result = durable.run_sync("Analyze the sales data", deps=DEPS, idempotency_key=key)
    usage = result.usage
    print(
        "OUTPUT "
        + json.dumps(
            {
                "output": result.output,
                "usage": [usage.requests, usage.input_tokens, usage.output_tokens, usage.tool_calls],
            }
        )
    )
