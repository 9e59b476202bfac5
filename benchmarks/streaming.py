"""Live streaming latency: from a chunk's production by the model to its arrival at the event stream handler.

`.venv/bin/python benchmarks/streaming.py [--chunks 50] [--runs 5]` starts a local Prefect server (server.py),
runs a stream-only `FunctionModel` that stamps each chunk as it yields it, through the plain agent and through
our `PrefectAgent` (each run a new logical run, so every step executes), and prints the median and the 95th
percentile of production-to-handler latency. Writes results/streaming.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from collections.abc import AsyncIterable, AsyncIterator
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


async def measure(chunks: int, runs: int) -> dict[str, Any]:
    from pydantic_ai import Agent
    from pydantic_ai.messages import AgentStreamEvent, ModelMessage, PartDeltaEvent, PartStartEvent
    from pydantic_ai.models.function import AgentInfo, FunctionModel
    from pydantic_ai.tools import RunContext

    from prefect_pydantic_ai import PrefectAgent

    produced: dict[str, float] = {}
    latencies: dict[str, list[float]] = {"plain": [], "ours": []}

    async def stream(messages: list[ModelMessage], info: AgentInfo) -> AsyncIterator[str]:
        for i in range(chunks):
            await asyncio.sleep(0.002)  # a provider's pace between chunks
            chunk = f"<{i}>"
            produced[chunk] = time.perf_counter()
            yield chunk

    def handler(variant: str) -> Any:
        async def handle(ctx: RunContext[None], events: AsyncIterable[AgentStreamEvent]) -> None:
            async for event in events:
                text = (
                    event.part.content
                    if isinstance(event, PartStartEvent)
                    else getattr(event.delta, "content_delta", None)
                    if isinstance(event, PartDeltaEvent)
                    else None
                )
                if isinstance(text, str) and text in produced:
                    latencies[variant].append(time.perf_counter() - produced.pop(text))

        return handle

    agent: Agent[None, str] = Agent(FunctionModel(stream_function=stream), name="stream_bench")
    durable = PrefectAgent(agent)
    await durable.run(
        "warm up", idempotency_key=f"warm-{uuid.uuid4().hex}", event_stream_handler=handler("ours")
    )
    latencies["ours"].clear()
    for _ in range(runs):
        await agent.run("go", event_stream_handler=handler("plain"))
        await durable.run("go", idempotency_key=f"s-{uuid.uuid4().hex}", event_stream_handler=handler("ours"))

    def summary(samples: list[float]) -> dict[str, float]:
        ordered = sorted(samples)
        return {
            "samples": len(ordered),
            "median_ms": round(statistics.median(ordered) * 1000, 3),
            "p95_ms": round(ordered[int(0.95 * (len(ordered) - 1))] * 1000, 3),
        }

    return {"chunks": chunks, "runs": runs, **{v: summary(s) for v, s in latencies.items()}}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--chunks", type=int, default=50)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(asyncio.run(measure(args.chunks, args.runs))))
        return
    sys.path.insert(0, str(HERE))
    from server import local_prefect_server

    with local_prefect_server() as (env, _):
        done = subprocess.run(
            [sys.executable, __file__, "--child", "--chunks", str(args.chunks), "--runs", str(args.runs)],
            env={**env, "PYTHONPATH": os.environ.get("PYTHONPATH", "")},
            capture_output=True,
            text=True,
        )
    if done.returncode != 0:
        sys.exit(done.stderr[-3000:])
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"{'variant':<8} {'samples':>8} {'median ms':>10} {'p95 ms':>8}")
    for variant in ("plain", "ours"):
        row = result[variant]
        print(f"{variant:<8} {row['samples']:>8} {row['median_ms']:>10} {row['p95_ms']:>8}")
    out = HERE / "results" / "streaming.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
