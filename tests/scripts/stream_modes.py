"""Streamed and iterated runs of a durable agent in a fresh process, recording every warning they raise.

`stream_modes.py PREFIX` runs agent `PREFIX_<form>_<mode>` once per form (`PrefectAgent`, `capability`) and mode
(`run_stream`, `run_stream_events`, `iter`) and prints one JSON line per run: its output, the calls that
executed and the UserWarnings and ResourceWarnings raised (after `gc.collect()`, so an unclosed transport
counts). Its tool logs `looked up in <agent>` through Prefect's run logger. A fresh process, so that nothing an
earlier test left behind is collected during the runs.

Prefect 3.9.1 itself leaves about one client socket to its API unclosed per flow run (a bare `@flow` with one
task does too, the `baseline` line): those are counted apart, as `prefect_api_sockets`.
"""

from __future__ import annotations

import asyncio
import functools
import gc
import json
import os
import sys
import warnings
from collections import Counter
from collections.abc import AsyncIterator
from typing import Any
from urllib.parse import urlparse

from prefect import flow, get_run_logger, task
from prefect.logging.handlers import APILogHandler
from pydantic_ai import Agent, AgentRunResultEvent
from pydantic_ai.messages import ModelMessage, ModelResponse, TextPart, ToolCallPart, ToolReturnPart
from pydantic_ai.models.function import AgentInfo, DeltaToolCall, DeltaToolCalls, FunctionModel

from prefect_pydantic_ai import PrefectAgent, PrefectDurability


def durable_agent(name: str, form: str, calls: Counter[str]) -> Any:
    """model → lookup → model, streaming or not; every call counted."""

    def answered(messages: list[ModelMessage]) -> str | None:
        done = [p for m in messages for p in m.parts if isinstance(p, ToolReturnPart)]
        return f"answer: {done[0].content}" if done else None

    def reply(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        calls["model"] += 1
        answer = answered(messages)
        return ModelResponse(parts=[TextPart(answer) if answer else ToolCallPart("lookup", {"key": "a"})])

    async def stream(messages: list[ModelMessage], info: AgentInfo) -> AsyncIterator[str | DeltaToolCalls]:
        calls["model"] += 1
        answer = answered(messages)
        yield answer if answer else {0: DeltaToolCall(name="lookup", json_args='{"key": "a"}')}

    model = FunctionModel(reply, stream_function=stream)
    capabilities = [PrefectDurability()] if form == "capability" else []
    agent: Agent[None, str] = Agent(model, name=name, capabilities=capabilities)

    @agent.tool_plain
    def lookup(key: str) -> str:
        calls["lookup"] += 1
        get_run_logger().warning(f"looked up in {name}")
        return f"value of {key}"

    return agent if form == "capability" else PrefectAgent(agent)


async def drive(mode: str, durable: Any) -> str:
    if mode == "run_stream":
        async with durable.run_stream("go") as stream:
            return str(await stream.get_output())
    if mode == "run_stream_events":
        async with durable.run_stream_events("go") as events:
            outputs = [e.result.output async for e in events if isinstance(e, AgentRunResultEvent)]
        return str(outputs[-1])
    async with durable.iter("go") as run:
        async for _ in run:
            pass
    assert run.result is not None
    return str(run.result.output)


@task
async def one() -> int:
    return 1


@flow
async def baseline() -> int:
    return await one()


async def warned(run: Any) -> tuple[Any, list[str], int]:
    """What `run()` returns, the UserWarnings and ResourceWarnings it raised, and how many of those were
    Prefect's own unclosed API sockets."""
    port = urlparse(os.environ["PREFECT_API_URL"]).port
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        value = await run()
        await APILogHandler.aflush()
        gc.collect()
    raised = [
        f"{w.category.__name__}: {w.message}"
        for w in caught
        if issubclass(w.category, UserWarning | ResourceWarning)
    ]
    prefects = [
        w for w in raised if w.startswith("ResourceWarning: unclosed <socket.socket") and f", {port})>" in w
    ]
    return value, [w for w in raised if w not in prefects], len(prefects)


async def main(prefix: str) -> None:
    await baseline()  # the first flow run of a process sets up Prefect's clients
    _, others, sockets = await warned(baseline)
    print(json.dumps({"agent": "baseline", "warnings": others, "prefect_api_sockets": sockets}))
    for form in ("PrefectAgent", "capability"):
        for mode in ("run_stream", "run_stream_events", "iter"):
            name = f"{prefix}_{form}_{mode}"
            calls: Counter[str] = Counter()
            durable = durable_agent(name, form, calls)
            output, others, sockets = await warned(functools.partial(drive, mode, durable))
            line = {"agent": name, "output": output, "calls": dict(calls), "warnings": others}
            print(json.dumps({**line, "prefect_api_sockets": sockets}))


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
