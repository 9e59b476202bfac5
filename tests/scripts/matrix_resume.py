"""One durable run of a three-model-step, two-tool agent, for the multi-process reliability tests.

Shape: model → fetch → model → save → model. Every model and tool call is appended to the `--calls` `CallLog`
when it starts (with this process's pid), so tests count executions across processes; each step then takes
`--step-seconds`. Faults come from the `FaultPlan` in the environment: `boundary` is hit (and logged) before
each model request, outside every step (a SIGKILL there lands between two steps); `tool:fetch` and
`tool:save` are hit inside those tools; `reach:save` is logged when `save`'s arguments are validated, just
before its step. With `--barrier DIR`, the process waits before its `--barrier-at`th model request (also
outside every step) until `--parties` processes have arrived in DIR, so concurrent resumers reach the same
unfinished step at the same moment. With `--save-waits-for FILE`, `save` waits (inside its step, holding its
lock) until FILE exists.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import time
from pathlib import Path
from typing import Annotated

from pydantic import AfterValidator
from pydantic_ai import Agent
from pydantic_ai.messages import (
    ModelMessage,
    ModelResponse,
    TextPart,
    ToolCallPart,
    ToolReturnPart,
    UserPromptPart,
)
from pydantic_ai.models.function import AgentInfo, FunctionModel

from prefect_pydantic_ai import PrefectAgent
from prefect_pydantic_ai.testing import CallLog, FaultPlan

parser = argparse.ArgumentParser()
parser.add_argument("--key", required=True)
parser.add_argument("--calls", type=Path, required=True)
parser.add_argument("--step-seconds", type=float, default=0.0)
parser.add_argument("--barrier", type=Path)
parser.add_argument("--barrier-at", type=int, default=1)
parser.add_argument("--parties", type=int, default=2)
parser.add_argument("--save-waits-for", type=Path)
opts = parser.parse_args()

plan = FaultPlan.from_env()
calls = CallLog(opts.calls)
boundaries = 0


def barrier(directory: Path, parties: int, timeout: float = 120.0) -> None:
    """Wait until `parties` processes have arrived in `directory`; fail the run if they have not within `timeout`
    seconds (the processes would not reach the step together, and the test would prove nothing)."""
    directory.mkdir(parents=True, exist_ok=True)
    (directory / str(os.getpid())).touch()
    deadline = time.monotonic() + timeout
    while (arrived := len(list(directory.iterdir()))) < parties:
        if time.monotonic() > deadline:
            raise RuntimeError(f"barrier: {arrived} of {parties} processes arrived within {timeout:g}s")
        time.sleep(0.002)


def model(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    returns = [p for m in messages for p in m.parts if isinstance(p, ToolReturnPart)]
    calls.record("model", len(returns) + 1)
    time.sleep(opts.step_seconds)  # FunctionModel runs a sync function in a worker thread
    if not returns:
        prompt = next(p for m in messages for p in m.parts if isinstance(p, UserPromptPart))
        return ModelResponse(parts=[ToolCallPart("fetch", {"item": str(prompt.content)})])
    if len(returns) == 1:
        return ModelResponse(parts=[ToolCallPart("save", {"value": returns[0].content})])
    return ModelResponse(parts=[TextPart(f"done: {returns[1].content}")])


agent = Agent(FunctionModel(model), name="matrix_resume")


@agent.instructions
def boundary() -> str:
    """Runs before every model request, outside any step: the place for a SIGKILL between two steps."""
    global boundaries
    boundaries += 1
    calls.record("boundary", boundaries)
    if opts.barrier is not None and boundaries == opts.barrier_at:
        barrier(opts.barrier, opts.parties)
    plan.hit_sync("boundary")
    return "Fetch the item, then save it."


@agent.tool_plain
async def fetch(item: str) -> str:
    calls.record("tool:fetch", item)
    await plan.hit("tool:fetch")
    await asyncio.sleep(opts.step_seconds)
    return f"{item}-fetched"


def reach_save(value: str) -> str:
    """Validates `save`'s argument, outside (just before) its step: the process has reached that step."""
    calls.record("reach:save")
    return value


@agent.tool_plain
async def save(value: Annotated[str, AfterValidator(reach_save)]) -> str:
    calls.record("tool:save", value)
    await plan.hit("tool:save")
    deadline = time.monotonic() + 120
    while opts.save_waits_for is not None and not opts.save_waits_for.exists():
        if time.monotonic() > deadline:
            raise RuntimeError(f"{opts.save_waits_for} did not appear within 120s")
        await asyncio.sleep(0.02)
    await asyncio.sleep(opts.step_seconds)
    return f"{value}-saved"


result = PrefectAgent(agent).run_sync("order-42", idempotency_key=opts.key)
print("OUTPUT " + json.dumps(result.output), flush=True)
