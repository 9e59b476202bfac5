"""The benchmarked agent and its three variants; `python workload.py <mode>` is one benchmark worker process.

The agent is a `FunctionModel` that asks for one `fetch` tool call per response until it has made N of them,
then answers with text; `fetch` returns P bytes. The prompt carries N and P, so all variants run the very
same agent definition: (a) plain, (b) pydantic-ai's own `PrefectAgent`, (c) ours. The environment (Prefect
API, PREFECT_HOME) is set by `run.py` before this process starts, so Prefect reads it on import.

Modes (each writes one JSON object to --out):
- `overhead`: interleaved repetitions of every variant and of a bare Prefect task loop, per (N, P).
- `run`: one run of one variant; with BENCH_CALL_LOG set, every model/tool call appends `<time> <kind> <step>`
  to that file, and with BENCH_KILL_AT=k the process SIGKILLs itself inside tool call k.
- `profile`: our N-step run under pyinstrument (installed separately: `.venv/bin/pip install pyinstrument`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import json
import os
import re
import resource
import signal
import statistics
import threading
import time
import uuid
import warnings
from pathlib import Path
from typing import Any

from prefect import flow, task
from prefect.cache_policies import CacheKeyFnPolicy
from pydantic_ai import Agent
from pydantic_ai.durable_exec.prefect import PrefectAgent as CompetitorAgent
from pydantic_ai.messages import ModelMessage, ModelResponse, TextPart, ToolCallPart, ToolReturnPart
from pydantic_ai.models.function import AgentInfo, FunctionModel
from pydantic_ai.usage import RequestUsage, UsageLimits
from server import cpu_seconds, settle

from prefect_pydantic_ai import PrefectAgent
from prefect_pydantic_ai.durable.steps import step_lock_manager

VARIANTS = ("plain", "competitor", "ours")
NO_LIMITS = UsageLimits(request_limit=None)  # 200 steps are more than pydantic-ai's default of 50 requests
_PROMPT = re.compile(r"steps=(\d+) bytes=(\d+)")


def prompt(steps: int, size: int) -> str:
    return f"Call fetch until done: steps={steps} bytes={size}"


def _log_call(kind: str, step: int) -> None:
    path = os.environ.get("BENCH_CALL_LOG")
    if path:
        with open(path, "a") as f:
            f.write(f"{time.time():.6f} {kind} {step}\n")


async def scripted_model(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    """One `fetch` call per response until `steps` calls were made, then a final text answer."""
    first = messages[0].parts[-1]
    match = _PROMPT.search(str(getattr(first, "content", "")))
    assert match is not None, "the prompt must say steps=N bytes=P"
    steps, size = int(match[1]), int(match[2])
    done = sum(isinstance(part, ToolReturnPart) for message in messages for part in message.parts)
    _log_call("model", done + 1)
    # Reported usage, as a provider would: FunctionModel would otherwise re-tokenize the whole history per call.
    usage = RequestUsage(input_tokens=50 + done * (size // 4 + 20), output_tokens=20)
    if done < steps:
        return ModelResponse(parts=[ToolCallPart("fetch", {"step": done + 1, "size": size})], usage=usage)
    return ModelResponse(parts=[TextPart(f"done after {done} steps")], usage=usage)


agent: Agent[None, str] = Agent(FunctionModel(scripted_model), name="bench_agent")


@agent.tool_plain
async def fetch(step: int, size: int) -> str:
    """Return `size` bytes of text."""
    _log_call("tool", step)
    if step == int(os.environ.get("BENCH_KILL_AT", "0")):
        os.kill(os.getpid(), signal.SIGKILL)
    return (f"{step:08d}" * (size // 8 + 1))[:size]


ours = PrefectAgent(agent)
with warnings.catch_warnings():  # it is deprecated in favour of a capability, but still the shipped wrapper
    warnings.simplefilter("ignore")
    competitor = CompetitorAgent(agent)


async def run_variant(variant: str, steps: int, size: int, key: str | None = None) -> None:
    """One complete run of `variant`, checked to have made all its steps."""
    if variant == "plain":
        result = await agent.run(prompt(steps, size), usage_limits=NO_LIMITS)
    elif variant == "competitor":
        result = await competitor.run(prompt(steps, size), usage_limits=NO_LIMITS)
    elif variant == "ours":
        result = await ours.run(prompt(steps, size), idempotency_key=key, usage_limits=NO_LIMITS)
    else:
        raise ValueError(f"unknown variant {variant!r}")
    assert result.output == f"done after {steps} steps", result.output


@task
async def noop(i: int) -> int:
    return i


@flow(name="bare-task-loop")
async def bare_task_loop(count: int) -> None:
    """`count` trivial async tasks, one after the other, in one flow run."""
    for i in range(count):
        await noop(i)


_JOURNALED = CacheKeyFnPolicy(cache_key_fn=lambda context, parameters: parameters["key"]).configure(
    isolation_level="SERIALIZABLE", lock_manager=step_lock_manager()
)


@task(persist_result=True, cache_policy=_JOURNALED, result_serializer="json")
async def journaled_noop(key: str, i: int) -> int:
    return i


@flow(name="bare-journaled-task-loop")
async def journaled_task_loop(count: int) -> None:
    """`count` trivial tasks, each as durable as Prefect makes one: its result persisted under its own cache key,
    under a SERIALIZABLE lock (the lock manager our steps use). The floor for a journaled step."""
    run = uuid.uuid4().hex
    for i in range(count):
        await journaled_noop(f"{run}-{i}", i)


async def _timed(kind: str, steps: int, size: int) -> tuple[float, float]:
    """Wall-clock and CPU seconds (this process, all threads) of one run of `kind`, started on an idle server."""
    settle()
    gc.collect()
    wall, cpu = time.perf_counter(), time.process_time()
    await _run_kind(kind, steps, size)
    return time.perf_counter() - wall, time.process_time() - cpu


async def overhead(steps: list[int], sizes: list[int], reps: int) -> dict[str, Any]:
    """Seconds per run of each variant and of the bare loop (2N+1 tasks), interleaved in rotating order."""
    kinds = [*VARIANTS, "bare", "journaled"]
    for kind in kinds:  # warm up imports, schema builds and connections
        await _run_kind(kind, 3, 100)
    configs = []
    for n in steps:
        for size in sizes:
            wall: dict[str, list[float]] = {kind: [] for kind in kinds}
            cpu: dict[str, list[float]] = {kind: [] for kind in kinds}
            for rep in range(reps):
                order = kinds[rep % len(kinds) :] + kinds[: rep % len(kinds)]
                for kind in order:
                    seconds, cpu_seconds = await _timed(kind, n, size)
                    wall[kind].append(seconds)
                    cpu[kind].append(cpu_seconds)
            configs.append({"steps": n, "bytes": size, "wall": wall, "cpu": cpu})
            medians = {kind: round(statistics.median(s), 2) for kind, s in wall.items()}
            print(f"  N={n} P={size}: median wall seconds {medians}", flush=True)
    return {"configs": configs}


async def _run_kind(kind: str, steps: int, size: int) -> None:
    if kind == "bare":
        await bare_task_loop(2 * steps + 1)
    elif kind == "journaled":
        await journaled_task_loop(2 * steps + 1)
    else:
        await run_variant(kind, steps, size)


def rss_kb() -> int:
    """Current resident set size, in KiB."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") // 1024


async def single_run(variant: str, steps: int, size: int, key: str | None) -> dict[str, Any]:
    """One run; timestamps are wall-clock so the caller can relate them to its own and to the call log."""
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS: measure the run, not the imports
    rss_before = rss_kb()
    _log_call("start", 0)
    started = time.time()
    await run_variant(variant, steps, size, key)
    finished = time.time()
    return {
        "started": started,
        "finished": finished,
        "seconds": finished - started,
        "rss_before_run_kb": rss_before,
        "peak_rss_kb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
    }


async def profile(steps: int, size: int, tree: Path) -> dict[str, Any]:
    """Profile our run with pyinstrument (main thread) and /proc (CPU per thread).

    The call tree goes to `tree`, a flat list by self time beside it. Per function, `total` is the time inside
    it and `own` the part not inside another function of the same code base (ours, or Prefect's): for our
    functions, what they spend in Prefect, pydantic-ai and the standard library.
    """
    from pyinstrument import Profiler

    await run_variant("ours", 3, 100)  # warm up
    settle()
    threads_before = _thread_cpu()
    profiler = Profiler(interval=0.001, async_mode="disabled")
    profiler.start()
    await run_variant("ours", steps, size)
    session = profiler.stop()
    threads = {name: cpu - threads_before.get(name, 0.0) for name, cpu in _thread_cpu().items()}
    every_frame = {"filter_threshold": 0.005}  # frames under 0.5% of the run are left out
    tree.write_text(profiler.output_text(unicode=True, show_all=True, processor_options=every_frame))
    tree.with_suffix(".flat.txt").write_text(profiler.output_text(flat=True, show_all=True))
    functions: dict[str, dict[str, Any]] = {}

    def walk(frame: Any, active: frozenset[str], nearest: dict[str, str]) -> None:
        if not frame.function or frame.function.startswith("["):
            return  # a self-time leaf: its time stays with its parent
        name = f"{frame.function} ({frame.file_path_short}:{frame.line_no})"
        group = _code_base(frame.file_path_short or "")
        entry = functions.setdefault(name, {"group": group, "self": 0.0, "total": 0.0, "own": 0.0})
        entry["self"] += frame.total_self_time
        if group is not None and nearest.get(group, name) != name:
            functions[nearest[group]]["own"] -= frame.time
        if name not in active:  # count a recursive function once
            entry["total"] += frame.time
            entry["own"] += frame.time
            if group is not None:
                nearest = {**nearest, group: name}
        for child in frame.children:
            walk(child, active | {name}, nearest)

    root = session.root_frame()
    if root is not None:
        walk(root, frozenset(), {})
    return {"seconds": session.duration, "functions": functions, "thread_cpu_seconds": threads}


def _code_base(path: str) -> str | None:
    if path.startswith("prefect_pydantic_ai/"):
        return "ours"
    return "prefect" if path.startswith("prefect/") else None


def _thread_cpu() -> dict[str, float]:
    """CPU seconds of each live thread of this process, by thread name (pooled threads summed)."""
    totals: dict[str, float] = {}
    for thread in threading.enumerate():
        with contextlib.suppress(OSError):
            name = re.sub(r"[-_ ]?\d+$", "", thread.name)  # "AnyIO worker thread", not one per number
            totals[name] = totals.get(name, 0.0) + cpu_seconds(f"self/task/{thread.native_id}")
    return totals


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("mode", choices=["overhead", "run", "profile"])
    parser.add_argument("--out", type=Path, required=True, help="where to write the JSON result")
    parser.add_argument("--steps", type=int, nargs="+", default=[10])
    parser.add_argument("--sizes", type=int, nargs="+", default=[100])
    parser.add_argument("--reps", type=int, default=3)
    parser.add_argument("--variant", choices=VARIANTS, default="ours")
    parser.add_argument("--key", help="our idempotency key (mode run, variant ours)")
    parser.add_argument("--tree", type=Path, help="where the profile call tree goes (mode profile)")
    opts = parser.parse_args()
    if opts.mode == "overhead":
        result = asyncio.run(overhead(opts.steps, opts.sizes, opts.reps))
    elif opts.mode == "run":
        result = asyncio.run(single_run(opts.variant, opts.steps[0], opts.sizes[0], opts.key))
    else:
        result = asyncio.run(profile(opts.steps[0], opts.sizes[0], opts.tree))
    opts.out.write_text(json.dumps(result))


if __name__ == "__main__":
    main()
