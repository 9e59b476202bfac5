"""Concurrent runs of one durable agent (model → tool `stamp` → model) against a loopback OpenAI server, each
model request holding a slot of a Prefect global concurrency limit.

`python limited_runs.py PREFIX N` runs N runs at once, keyed `PREFIX-0` ... `PREFIX-<N-1>`, and prints one JSON
line of their outputs. The server is at $LIMITED_BASE_URL; the limit is named $LIMITED_LIMIT (it must exist).
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
from typing import Any

from openai import AsyncOpenAI
from pydantic_ai import Agent
from pydantic_ai.models.openai import OpenAIChatModel
from pydantic_ai.providers.openai import OpenAIProvider

from prefect_pydantic_ai import PrefectAgent, TaskConfig
from prefect_pydantic_ai.testing import DelayFault, TextReply, ToolCallsReply


def answer(delay: float) -> Any:
    """A `LoopbackOpenAI` responder for this agent: after `delay` seconds, a call of `stamp` first, then text."""

    def respond(body: dict[str, Any]) -> Any:
        if any(message.get("role") == "tool" for message in body.get("messages", ())):
            return DelayFault(delay, TextReply("stamped", usage=(100, 10)))
        return DelayFault(delay, ToolCallsReply((("stamp", {"n": 1}),), usage=(50, 5)))

    return respond


def _model() -> OpenAIChatModel:
    client = AsyncOpenAI(base_url=os.environ.get("LIMITED_BASE_URL", "http://127.0.0.1:9/v1"), api_key="x")
    return OpenAIChatModel("gpt-4o", provider=OpenAIProvider(openai_client=client))


agent = Agent(_model(), name="limited_runs")


@agent.tool_plain
def stamp(n: int) -> int:
    return n + 1


durable = PrefectAgent(
    agent, model_task_config=TaskConfig(concurrency_limit=os.environ.get("LIMITED_LIMIT", "limited"))
)


async def main(prefix: str, n: int) -> None:
    results = await asyncio.gather(
        *(durable.run("stamp it", idempotency_key=f"{prefix}-{i}") for i in range(n))
    )
    print(json.dumps([r.output for r in results]), flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2])))
