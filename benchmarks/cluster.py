"""50 concurrent 11-step runs against the SQLite default vs the PostgreSQL cluster, four variants side by side.

`.venv/bin/python benchmarks/cluster.py [--runs 50] [--clients 5]` (~15 min on 2 cores) starts (a) a local
Prefect server on its default SQLite database (server.py) and (b) the cluster of `prefect_pydantic_ai.infra.cluster`
without workers (PostgreSQL, Redis, a Prefect server on them). Against each, one wave per variant: `--clients`
client processes import, warm up with one run, wait at a barrier, then each starts its share of `--runs` runs at
once with `asyncio.gather`, so all runs hit the server together. What the database decides is how fast the
server accepts the flow runs, task runs and states of many runs at once, so the runs are driven straight from
clients (no workers: process start-up would dominate and is the same for both databases).

Variants (the workload.py agent, N=5 tool calls of 100 B: 6 model requests + 5 tool calls = 11 steps):
plain agent (no Prefect: the floor), bare Prefect task loop (11 trivial tasks in one flow), pydantic-ai's own
PrefectAgent ("competitor") and ours. Ours uses what each setup uses for step locks: files on the local server,
Redis on the cluster.

Reported per backend and variant: runs completed and failed, runs per minute (completed runs over the wave's
wall time, first start to last end), p50/p95 run latency, per-step overhead ((p50 − plain p50) / 11) and the
retries Prefect's client announced (503 "database is locked" and the like). Writes results/cluster.json.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
VARIANTS = ("plain", "bare", "competitor", "ours")
TOOL_CALLS, SIZE = 5, 100
STEPS = 2 * TOOL_CALLS + 1


# -- one client process -----------------------------------------------------------------------------------------


class _Retries(logging.Handler):
    """The retries Prefect's client announces (at debug level, before each back-off), by cause."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.causes: dict[str, int] = {}

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if "Another attempt will be made" in message:
            cause = message.partition(". Another attempt")[0]
            if record.exc_info and record.exc_info[1] is not None:
                cause += f" ({type(record.exc_info[1]).__name__})"
            self.causes[cause] = self.causes.get(cause, 0) + 1


async def _client(variant: str, runs: int) -> dict[str, Any]:
    sys.path.insert(0, str(HERE))
    from workload import bare_task_loop, run_variant

    async def one() -> None:
        if variant == "bare":
            await bare_task_loop(STEPS)
        else:
            await run_variant(variant, TOOL_CALLS, SIZE)

    await one()  # warm up: imports, schemas, connections
    retries = _Retries()
    client_logger = logging.getLogger("prefect.client")
    client_logger.setLevel(logging.DEBUG)
    client_logger.addHandler(retries)
    print("ready", flush=True)
    sys.stdin.readline()  # the barrier: every client starts at once

    async def timed() -> tuple[float, float, str | None]:
        started = time.time()
        try:
            await one()
            error = None
        except Exception as exc:
            error = f"{type(exc).__name__}: {str(exc)[:200]}"
        return started, time.time(), error

    results = await asyncio.gather(*(timed() for _ in range(runs)))
    return {
        "runs": [{"started": s, "finished": f, "error": e} for s, f, e in results],
        "retries": retries.causes,
    }


# -- the driver -------------------------------------------------------------------------------------------------


@contextmanager
def _sqlite_server(locks: dict[str, str]) -> Any:
    from server import local_prefect_server

    with local_prefect_server() as (env, _session):
        yield {**env, **locks}, int(env["BENCH_SERVER_PID"])


@contextmanager
def _postgres_cluster(locks: dict[str, str]) -> Any:
    from server import cluster_session

    from prefect_pydantic_ai.infra.cluster import ClusterConfig

    with cluster_session(ClusterConfig(workers=0)) as (env, cluster):
        [server] = [c for c in cluster.components if c.name == "prefect server"]
        yield {**env, **locks}, server.pid


def _wave(env: dict[str, str], server_pid: int, variant: str, runs: int, clients: int) -> dict[str, Any]:
    shares = [runs // clients + (1 if i < runs % clients else 0) for i in range(clients)]
    with ExitStack() as stack:
        logs = [stack.enter_context(tempfile.TemporaryFile("w+")) for _ in shares]
        return _measure(env, server_pid, variant, shares, logs)


def _measure(
    env: dict[str, str], server_pid: int, variant: str, shares: list[int], logs: list[Any]
) -> dict[str, Any]:
    from server import settle

    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "--client", variant, "--runs", str(share)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
            env={**env, "PYTHONPATH": os.environ.get("PYTHONPATH", "")},
        )
        for share, log in zip(shares, logs, strict=True)
    ]
    try:
        for proc, log in zip(procs, logs, strict=True):
            assert proc.stdout is not None
            if proc.stdout.readline().strip() != "ready":
                log.seek(0)
                raise RuntimeError(f"a {variant} client did not start:\n{log.read()[-3000:]}")
        settle(server_pid)  # the warm-up runs' events are persisted before the wave starts
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        outputs = [json.loads(proc.communicate(timeout=1800)[0].strip().splitlines()[-1]) for proc in procs]
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    every = [run for output in outputs for run in output["runs"]]
    done = [run for run in every if run["error"] is None]
    latencies = sorted(run["finished"] - run["started"] for run in done)
    wall = max(r["finished"] for r in every) - min(r["started"] for r in every)
    return {
        "variant": variant,
        "runs": len(every),
        "completed": len(done),
        "errors": sorted({run["error"] for run in every if run["error"]}),
        "wall_s": wall,
        "runs_per_minute": 60 * len(done) / wall,
        "p50_s": statistics.median(latencies) if latencies else None,
        "p95_s": latencies[int(0.95 * (len(latencies) - 1))] if latencies else None,
        "retries": sum(sum(output["retries"].values()) for output in outputs),
        "retry_causes": _merged([output["retries"] for output in outputs]),
        "latencies_s": latencies,
    }


def _merged(counts: list[dict[str, int]]) -> dict[str, int]:
    merged: dict[str, int] = {}
    for count in counts:
        for cause, n in count.items():
            merged[cause] = merged.get(cause, 0) + n
    return merged


def _overheads(waves: list[dict[str, Any]]) -> None:
    plain = next(w for w in waves if w["variant"] == "plain")["p50_s"]
    for wave in waves:
        p50 = wave["p50_s"]
        wave["overhead_ms_per_step"] = None if p50 is None else 1000 * (p50 - plain) / STEPS


def _table(results: dict[str, list[dict[str, Any]]], runs: int) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"{runs} concurrent {STEPS}-step runs: SQLite default vs PostgreSQL cluster")
    for column in ("database", "variant", "done", "runs/min", "p50 s", "p95 s", "ms/step", "retries"):
        table.add_column(column, justify="left" if column in ("database", "variant") else "right")

    def fmt(value: float | None, digits: int) -> str:
        return "-" if value is None else f"{value:.{digits}f}"

    for backend, waves in results.items():
        for wave in waves:
            table.add_row(
                backend,
                wave["variant"],
                f"{wave['completed']}/{wave['runs']}",
                fmt(wave["runs_per_minute"], 0),
                fmt(wave["p50_s"], 2),
                fmt(wave["p95_s"], 2),
                "-" if wave["variant"] == "plain" else fmt(wave["overhead_ms_per_step"], 0),
                str(wave["retries"]),
            )
    Console(width=120).print(table)
    for backend, waves in results.items():
        for wave in waves:
            for error in wave["errors"]:
                print(f"{backend} {wave['variant']} failed: {error}")
            for cause, n in wave["retry_causes"].items():
                print(f"{backend} {wave['variant']} retried {n}x: {cause}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--runs", type=int, default=50)
    parser.add_argument("--clients", type=int, default=5)
    parser.add_argument("--only", nargs="+", choices=["sqlite", "postgres"], default=["sqlite", "postgres"])
    parser.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    parser.add_argument(
        "--locks",
        choices=["setup", "file"],
        default="setup",
        help="our step locks: as each setup runs (files locally, Redis on the cluster), or files on both",
    )
    parser.add_argument("--client", choices=VARIANTS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.client:
        print(json.dumps(asyncio.run(_client(args.client, args.runs))))
        return
    sys.path.insert(0, str(HERE))
    variants = ["plain", *(v for v in args.variants if v != "plain")]  # plain is the floor of every overhead
    backends = {"sqlite": _sqlite_server, "postgres": _postgres_cluster}
    results: dict[str, list[dict[str, Any]]] = {}
    for backend in args.only:
        print(f"{backend}: starting", flush=True)
        locks = {"PREFECT_PYDANTIC_AI_LOCKS": "file"} if args.locks == "file" else {}
        with backends[backend](locks) as (env, server_pid):
            waves = []
            for variant in variants:
                wave = _wave(env, server_pid, variant, args.runs, args.clients)
                print(
                    f"  {variant}: {wave['completed']}/{wave['runs']} in {wave['wall_s']:.1f}s, "
                    f"{wave['retries']} retries",
                    flush=True,
                )
                waves.append(wave)
            _overheads(waves)
            results[backend] = waves
    _table(results, args.runs)
    out = HERE / "results" / ("cluster.json" if args.locks == "setup" else "cluster-file-locks.json")
    out.parent.mkdir(exist_ok=True)
    document = {
        "runs": args.runs,
        "clients": args.clients,
        "locks": args.locks,
        "steps": STEPS,
        "cpus": os.cpu_count(),
        "load_average": os.getloadavg(),
        "results": results,
    }
    out.write_text(json.dumps(document, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
