"""An 11-step durable agent (6 model requests, 5 tool calls) as a flow, deployed to the cluster's work pool by
tests/test_cluster.py and executed by its workers.

Every model request and tool call appends `{run, step, host, worker}` to the `CallLog` at $CLUSTER_CALLS when it
starts, so the test counts executions per run over all machines and sees which machine made each one. A run
given `hold_until` (a path) waits inside its third tool call (or the `hold_at`th), on its first attempt only, until
that file exists, so a test can kill a worker while runs are in flight there; `pace` makes each tool call take that
many seconds, so runs are still working while a test brings a part of the cluster down.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket

from prefect import flow
from prefect.runtime import flow_run
from pydantic_ai import Agent
from pydantic_ai.messages import ModelMessage, ModelResponse, TextPart, ToolCallPart, ToolReturnPart
from pydantic_ai.models.function import AgentInfo, FunctionModel

from prefect_pydantic_ai import PrefectAgent
from prefect_pydantic_ai.testing import CallLog

TOOL_CALLS = 5
HOLD_AT = 3


def _record(kind: str, step: int) -> None:
    label = str(flow_run.parameters.get("label"))
    where = {"host": socket.gethostname(), "worker": os.environ.get("PREFECT_PYDANTIC_AI_CLUSTER_WORKER")}
    CallLog(os.environ["CLUSTER_CALLS"]).record(kind, {"run": label, "step": step, **where})


def model(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    done = sum(isinstance(p, ToolReturnPart) for m in messages for p in m.parts)
    _record("model", done + 1)
    if done < TOOL_CALLS:
        return ModelResponse(parts=[ToolCallPart("work", {"step": done + 1})])
    return ModelResponse(parts=[TextPart(f"done after {done} tool calls")])


# Each retry of Prefect's client, in the worker's log. Not as PREFECT_LOGGING_LOGGERS_PREFECT_CLIENT_LEVEL in the
# job's environment: a Prefect setting the worker's warm interpreter lacks would make every run start cold.
if os.environ.get("CLUSTER_CLIENT_DEBUG"):
    logging.getLogger("prefect.client").setLevel(logging.DEBUG)

agent = Agent(FunctionModel(model), name="cluster_agent")


@agent.tool_plain
async def work(step: int) -> str:
    _record("tool", step)
    await asyncio.sleep(float(flow_run.parameters.get("pace") or 0))
    hold_until = flow_run.parameters.get("hold_until")
    if step == flow_run.parameters.get("hold_at", HOLD_AT) and hold_until and flow_run.run_count <= 1:
        while not os.path.exists(hold_until):
            await asyncio.sleep(0.2)
    return f"step {step} done"


durable = PrefectAgent(agent)


@flow(name="cluster-agent")
async def cluster_flow(
    label: str, hold_until: str | None = None, hold_at: int = HOLD_AT, pace: float = 0.0
) -> str:
    result = await durable.run(f"Run {label}: call work five times.")
    return result.output
