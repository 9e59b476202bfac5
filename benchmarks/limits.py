"""Provider limits: what holding a slot of a Prefect global concurrency limit costs, and what it saves.

`.venv/bin/python benchmarks/limits.py [--reps 50] [--runs 50] [--capacity 5]` (~2 min on 2 cores) starts a local
Prefect server (server.py) and, in one client process, measures
- **slot**: one `ConcurrencyLimit.slot()` (acquire a leased slot, release it: two API calls and a lease-renewal
  thread) against an empty block, `--reps` times in a row: medians in ms;
- **request**: a one-request durable run against a loopback OpenAI server, with and without
  `TaskConfig(concurrency_limit=...)`, interleaved, `--reps` each: medians, and their difference per request;
- **storm**: `--runs` durable runs (two requests each) started at once against a loopback server that answers 429
  (`Retry-After: 1`) to every request beyond `--capacity` in flight, with model steps retried (10 retries, 1 s
  apart), without a limit and with a limit of `--capacity` slots: wall time, runs completed, 429s answered.
Writes results/limits.json.

`.venv/bin/python benchmarks/limits.py --cluster [--runs 50] [--capacity 2] [--delay 5]` (~20 min on 2 cores)
runs the storm on the one-machine cluster instead (`prefect-pydantic-ai cluster`: PostgreSQL, Redis, a Prefect
server, two process workers of 10 flow runs each): limits_flow.py is deployed to its pool and `--runs` flow runs
are submitted at once, twice (without a limit, then with a global concurrency limit of `--capacity` on the
cluster's server), against a loopback provider in this process answering after `--delay` s, and with 429 beyond
`--capacity` in flight. Per variant: runs completed, throughput (completed runs per minute, from submission to
the last run's end), the median flow run's duration, requests, 429s, most requests in flight. Writes
results/limits-cluster.json; stops the cluster.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent


def _overloaded(server: Any, capacity: int, polite: Any) -> Any:
    """A responder answering 429 (`Retry-After: 1`) to every request beyond `capacity` in flight."""
    from prefect_pydantic_ai.testing import StatusFault

    return lambda body: StatusFault(429, retry_after=1) if server.in_flight > capacity else polite(body)


async def _slots(slot: Any, reps: int, held: list[float], bare: list[float]) -> None:
    """`reps` slots taken and given back in a row, and as many empty blocks."""
    for _ in range(reps):
        started = time.perf_counter()
        async with slot.slot("m"):
            pass
        held.append(time.perf_counter() - started)
        started = time.perf_counter()
        async with contextlib.nullcontext():
            pass
        bare.append(time.perf_counter() - started)


async def _cluster_waves(pool: str, runs: int, capacity: int, delay: float) -> dict[str, Any]:
    """Deploy limits_flow.py to `pool` and submit `runs` flow runs at once, without a limit and with one."""
    from prefect import Flow, get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate

    from prefect_pydantic_ai.testing import LoopbackOpenAI

    sys.path.insert(0, str(HERE.parent))
    from tests.scripts.limited_runs import answer

    flow: Any = await Flow.from_source(source=str(HERE), entrypoint="limits_flow.py:storm_flow")
    deployment = await flow.deploy(
        name="limits-storm", work_pool_name=pool, print_next_steps=False, ignore_warnings=True
    )
    async with get_client() as client:
        await client.create_global_concurrency_limit(
            GlobalConcurrencyLimitCreate(name="openai", limit=capacity)
        )
    waves = {}
    for variant, limit in (("no limit", None), (f"limit {capacity}", "openai")):
        with LoopbackOpenAI() as server:
            server.responder = _overloaded(server, capacity, answer(delay))
            waves[variant] = await _cluster_wave(deployment, server, runs, limit)
        print(
            f"  {variant}: {waves[variant]['completed']}/{runs} in {waves[variant]['wall_s']} s",
            file=sys.stderr,
        )
    return {"runs": runs, "capacity": capacity, "delay_s": delay, "cpus": os.cpu_count(), "storm": waves}


async def _cluster_wave(deployment: Any, server: Any, runs: int, limit: str | None) -> dict[str, Any]:
    """`runs` flow runs of the deployment submitted at once against `server`; their figures once all ended."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId
    from prefect.deployments import run_deployment

    started = time.time()
    parameters = {"base_url": server.base_url, "limit": limit}
    created = await asyncio.gather(
        *(run_deployment(deployment, parameters=parameters, timeout=0) for _ in range(runs))
    )
    ids = [run.id for run in created]
    deadline = time.monotonic() + 1800
    while True:
        async with get_client() as client:
            found = await client.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids)))
        if len(found) == runs and all(r.state is not None and r.state.is_final() for r in found):
            break
        if time.monotonic() > deadline:
            raise RuntimeError(f"the runs of {limit or 'no limit'} did not end within 30 min")
        await asyncio.sleep(2)
    completed = [r for r in found if r.state is not None and r.state.is_completed()]
    ended = max(r.end_time.timestamp() for r in found if r.end_time is not None)
    durations = [
        (r.end_time - r.start_time).total_seconds() for r in completed if r.start_time and r.end_time
    ]
    exchanges = server.exchanges
    return {
        "runs": runs,
        "completed": len(completed),
        "wall_s": round(ended - started, 1),
        "runs_per_minute": round(60 * len(completed) / (ended - started), 1),
        "p50_run_s": round(statistics.median(durations), 1) if durations else None,
        "requests": len(exchanges),
        "answered_429": sum(1 for e in exchanges if e.status == 429),
        "max_in_flight": server.max_in_flight,
        "not_completed": sorted({f"{r.state.name}: {r.state.message}" for r in found if r not in completed}),
    }


def _ms(samples: list[float]) -> float:
    return round(statistics.median(samples) * 1000, 2)


async def measure(reps: int, runs: int, capacity: int) -> dict[str, Any]:
    from prefect import get_client
    from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
    from prefect.context import AsyncClientContext
    from pydantic_ai import Agent

    from prefect_pydantic_ai import ConcurrencyLimit, PrefectAgent, TaskConfig
    from prefect_pydantic_ai.testing import LoopbackOpenAI, TextReply

    sys.path.insert(0, str(HERE.parent))
    from tests.scripts.limited_runs import answer

    async with get_client() as client:
        for name, slots in (("bench-slot", 1000), ("bench-storm", capacity)):
            await client.create_global_concurrency_limit(GlobalConcurrencyLimitCreate(name=name, limit=slots))

    slot = ConcurrencyLimit(name="bench-slot")
    held, bare = [], []
    async with AsyncClientContext.get_or_create():  # one client, as inside a run
        await _slots(slot, reps, held, bare)

    with LoopbackOpenAI(responder=lambda body: TextReply("ok", usage=(10, 1))) as server:
        variants = {
            "no limit": TaskConfig(),
            "limit": TaskConfig(concurrency_limit="bench-slot"),
        }
        agents = {
            v: PrefectAgent(Agent(server.openai_model(), name=f"bench_{i}"), model_task_config=cfg)
            for i, (v, cfg) in enumerate(variants.items())
        }
        request: dict[str, list[float]] = {v: [] for v in variants}
        for durable in agents.values():  # warm up
            await durable.run("hi", idempotency_key=f"warm-{uuid.uuid4().hex}")
        for _ in range(reps):
            for v, durable in agents.items():
                started = time.perf_counter()
                await durable.run("hi", idempotency_key=f"r-{uuid.uuid4().hex}")
                request[v].append(time.perf_counter() - started)

    storm: dict[str, Any] = {}
    for variant, limit in (("no limit", None), (f"limit {capacity}", "bench-storm")):
        with LoopbackOpenAI() as server:
            server.responder = _overloaded(server, capacity, answer(0.1))
            agent = Agent(server.openai_model(), name=f"storm_{variant.replace(' ', '_')}")

            @agent.tool_plain
            def stamp(n: int) -> int:
                return n + 1

            retried = TaskConfig(retries=10, retry_delay_seconds=1, concurrency_limit=limit)
            durable = PrefectAgent(agent, model_task_config=retried)
            started = time.perf_counter()
            results = await asyncio.gather(
                *(durable.run("stamp it", idempotency_key=f"s-{uuid.uuid4().hex}") for _ in range(runs)),
                return_exceptions=True,
            )
            wall = time.perf_counter() - started
            exchanges = server.exchanges
            storm[variant] = {
                "runs": runs,
                "completed": sum(1 for r in results if not isinstance(r, BaseException)),
                "wall_s": round(wall, 1),
                "requests": len(exchanges),
                "answered_429": sum(1 for e in exchanges if e.status == 429),
                "max_in_flight": server.max_in_flight,
            }
    return {
        "reps": reps,
        "slot_ms": {"held": _ms(held), "bare": _ms(bare)},
        "request_ms": {v: _ms(s) for v, s in request.items()},
        "slot_cost_per_request_ms": round(_ms(request["limit"]) - _ms(request["no limit"]), 2),
        "storm": storm,
        "capacity": capacity,
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--reps", type=int, default=50)
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--capacity", type=int, default=5)
    parser.add_argument(
        "--cluster", action="store_true", help="the storm on the one-machine cluster's workers"
    )
    parser.add_argument(
        "--delay", type=float, default=5.0, help="--cluster: seconds the provider takes to answer"
    )
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--pool", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        measured = (
            _cluster_waves(args.pool, args.runs, args.capacity, args.delay)
            if args.pool
            else measure(args.reps, args.runs, args.capacity)
        )
        print(json.dumps(asyncio.run(measured)))
        return
    sys.path.insert(0, str(HERE))
    if args.cluster:
        _cluster_main(args.runs, args.capacity, args.delay)
        return
    from server import local_prefect_server

    with local_prefect_server() as (env, _):
        done = subprocess.run(
            [sys.executable, __file__, "--child", *sys.argv[1:]],
            env={**env, "PYTHONPATH": os.environ.get("PYTHONPATH", "")},
            capture_output=True,
            text=True,
        )
    if done.returncode != 0:
        sys.exit(done.stderr[-3000:])
    result = json.loads(done.stdout.strip().splitlines()[-1])
    print(f"slot: {result['slot_ms']['held']} ms held vs {result['slot_ms']['bare']} ms bare (median)")
    print(
        f"request: {result['request_ms']['limit']} ms with a limit vs {result['request_ms']['no limit']} ms "
        f"without (median run of one request): {result['slot_cost_per_request_ms']} ms per request"
    )
    print(
        f"{'storm':<10} {'runs':>5} {'completed':>10} {'wall s':>7} {'requests':>9} {'429s':>6} {'in flight':>10}"
    )
    _storm_table(result["storm"])
    _write("limits.json", result)


def _cluster_main(runs: int, capacity: int, delay: float) -> None:
    """The storm on the cluster's two workers: the driver runs in a child pointed at the cluster."""
    from server import cluster_session

    from prefect_pydantic_ai.infra.cluster import ClusterConfig

    with cluster_session(ClusterConfig()) as (env, cluster):
        child = [sys.executable, __file__, "--child", "--pool", cluster.pool, "--runs", str(runs)]
        child += ["--capacity", str(capacity), "--delay", str(delay)]
        done = subprocess.run(
            child,
            env={**env, "PYTHONPATH": os.environ.get("PYTHONPATH", "")},
            stdout=subprocess.PIPE,
            text=True,
        )
    if done.returncode != 0:
        sys.exit(done.returncode)
    result = json.loads(done.stdout.strip().splitlines()[-1])
    result["load_average"] = os.getloadavg()
    print(f"{runs} runs on the cluster's two workers, 429 beyond {capacity} requests in flight:")
    _storm_table(result["storm"], throughput=True)
    _write("limits-cluster.json", result)


def _storm_table(storm: dict[str, Any], *, throughput: bool = False) -> None:
    extra = f" {'runs/min':>9} {'p50 run s':>10}" if throughput else ""
    print(
        f"{'storm':<10} {'runs':>5} {'completed':>10} {'wall s':>7}{extra} {'requests':>9} {'429s':>6} "
        f"{'in flight':>10}"
    )
    for variant, row in storm.items():
        extra = f" {row['runs_per_minute']:>9} {row['p50_run_s']:>10}" if throughput else ""
        print(
            f"{variant:<10} {row['runs']:>5} {row['completed']:>10} {row['wall_s']:>7}{extra} {row['requests']:>9} "
            f"{row['answered_429']:>6} {row['max_in_flight']:>10}"
        )
        for reason in row.get("not_completed", ()):
            print(f"  not completed: {reason}")


def _write(name: str, result: dict[str, Any]) -> None:
    out = HERE / "results" / name
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
