"""A streamed durable run for kill tests: a stream-only model asks for one `lookup`, then streams its answer.

`streamed.py KEY` runs it with `event_stream_handler=`; every model request and tool call appends a line to
$STREAMED_LOG first, and $STREAMED_KILL_IN_TOOL=1 SIGKILLs the process inside the tool call (after the first
streamed model step was journaled). Prints `OUTPUT <json>` at the end.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from collections.abc import AsyncIterable, AsyncIterator
from pathlib import Path

from pydantic_ai import Agent, RunContext
from pydantic_ai.messages import AgentStreamEvent, ModelMessage, ToolReturnPart
from pydantic_ai.models.function import AgentInfo, DeltaToolCall, DeltaToolCalls, FunctionModel

from prefect_pydantic_ai import PrefectAgent


def _call(name: str) -> None:
    with Path(os.environ["STREAMED_LOG"]).open("a") as f:
        f.write(f"{name}\n")


async def stream(messages: list[ModelMessage], info: AgentInfo) -> AsyncIterator[str | DeltaToolCalls]:
    _call("model")
    if not any(isinstance(p, ToolReturnPart) for m in messages for p in m.parts):
        yield {0: DeltaToolCall(name="lookup", json_args='{"q": "x"}')}
    else:
        yield "the answer "
        yield "is 42"


agent: Agent[None, str] = Agent(FunctionModel(stream_function=stream), name="streamed")


@agent.tool_plain
def lookup(q: str) -> int:
    _call("tool")
    if os.environ.get("STREAMED_KILL_IN_TOOL") == "1":
        os.kill(os.getpid(), signal.SIGKILL)
    return 42


async def main(key: str) -> None:
    async def handler(ctx: RunContext[None], events: AsyncIterable[AgentStreamEvent]) -> None:
        async for _ in events:
            pass

    result = await PrefectAgent(agent).run("go", idempotency_key=key, event_stream_handler=handler)
    print("OUTPUT " + json.dumps({"output": result.output}), flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
