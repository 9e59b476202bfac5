"""Where a person waits: the CLI, a later script, a resume and the demo, on the embedded default (no PREFECT_API_URL:
the persistent local server of a private PREFECT_HOME), each in fresh processes, spawn to the moment that counts.

`.venv/bin/python benchmarks/waits.py [--reps 5] [--runs 200] [--load 2]` (~8 min on 2 cores). It measures:

- first boot: `server start` in a fresh PREFECT_HOME;
- the CLI on a server holding `--runs` agent runs: `runs --json`, `runs`, `show`, `costs`, `server status`
  against `prefect flow-run ls` (Prefect's CLI, same server), and errors that need no server (`demo --fail-at
  step-99`, a missing `--csv`);
- a 5-step script (model, tool, model, tool, model), server up: the plain agent, a bare Prefect flow of 5 tasks
  (the floor), pydantic-ai's own PrefectAgent (the competitor) and ours, with each one's import / run / exit;
- a 201-step run SIGKILLed at its final model call, then resumed with the same key: spawn to the final call;
- the demo run again with the server up: spawn to its first line of output;
- `--load N` CPU-bound processes in the background, then 20 kill-and-resume cycles of the 5-step script: the
  pre-flight (run start to the first step) and the retries Prefect's client announced, against the floor: a
  bare Prefect flow of one task, run start to its task, in each cycle.

Medians of `--reps`; ratios against Prefect's CLI and the plain agent. Prints tables, writes
benchmarks/results/waits.json, and stops every server and process it started.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
GOALS = {"cli_s": 1.0, "cli_vs_prefect": 3.0, "error_s": 0.5, "script_ratio": 1.5, "resume_speedup": 5.0}
GOALS |= {"demo_first_line_s": 3.0, "preflight_p95_s": 1.0, "client_retries": 0}


# -- worker processes ------------------------------------------------------------------------------------------


def _marks(path: str | None, name: str) -> None:
    """Append `name time.time()` to the marks file: the moments the benchmark measures to."""
    if path:
        with open(path, "a") as f:
            f.write(f"{name} {time.time()}\n")


def five(variant: str) -> None:
    """One 5-step run of `variant`; prints its import and run seconds as JSON."""
    started = time.perf_counter()
    if variant == "bare":
        from prefect import flow, task

        @task
        def step(n: int) -> int:
            return n

        @flow
        def five_tasks() -> int:
            return sum(step(n) for n in range(5))

        imported = time.perf_counter()
        assert five_tasks() == 10
        print(json.dumps({"import_s": imported - started, "run_s": time.perf_counter() - imported}))
        return
    agent = _agent(f"waits_{variant}", steps=2, kill_in_tool=None)
    runner: Any = agent
    if variant == "ours":
        from prefect_pydantic_ai import PrefectAgent

        runner = PrefectAgent(agent)
    elif variant == "competitor":
        from pydantic_ai.durable_exec.prefect import PrefectAgent as CompetitorAgent

        runner = CompetitorAgent(agent)
    imported = time.perf_counter()
    result = runner.run_sync("Analyze")
    assert result.output == "done", result.output
    print(json.dumps({"import_s": imported - started, "run_s": time.perf_counter() - imported}))


def _agent(name: str, *, steps: int, kill_in_tool: int | None, kill_at_final: bool = False) -> Any:
    """An agent that calls `lookup` `steps` times, then answers "done"; it can SIGKILL its own process inside
    tool call `kill_in_tool` or at its final model call. Marks `first_step` and `final_call` (PPA_MARKS)."""
    from pydantic_ai import Agent
    from pydantic_ai.messages import ModelMessage, ModelResponse, TextPart, ToolCallPart, ToolReturnPart
    from pydantic_ai.models.function import AgentInfo, FunctionModel

    marks = os.environ.get("PPA_MARKS")

    def model(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        done = sum(isinstance(p, ToolReturnPart) for m in messages for p in m.parts)
        if done < steps:
            return ModelResponse(parts=[ToolCallPart("lookup", {"n": done})])
        _marks(marks, "final_call")
        if kill_at_final:
            os.kill(os.getpid(), signal.SIGKILL)
        return ModelResponse(parts=[TextPart("done")])

    agent = Agent(FunctionModel(model), name=name)

    @agent.tool_plain
    def lookup(n: int) -> int:
        _marks(marks, f"tool {n}")
        if kill_in_tool is not None and n == kill_in_tool:
            os.kill(os.getpid(), signal.SIGKILL)
        return n * 10

    return agent


def bare_first() -> None:
    """A bare Prefect flow of one task: marks `run_start` before calling the flow and `tool 1` as its task
    starts, the floor for our pre-flight (run start to the first step)."""
    from prefect import flow, task

    marks = os.environ.get("PPA_MARKS")

    @task
    def first() -> int:
        _marks(marks, "tool 1")
        return 1

    @flow
    def one_task() -> int:
        return first()

    _marks(marks, "run_start")
    assert one_task() == 1


def keyed(name: str, key: str, steps: int, kill: str) -> None:
    """Our agent run with idempotency key `key` (`key` "plain": the plain agent, no key); `kill`: "final", a tool
    call number, or "none"."""
    from pydantic_ai.usage import UsageLimits

    agent = _agent(
        name,
        steps=steps,
        kill_in_tool=int(kill) if kill.isdigit() else None,
        kill_at_final=kill == "final",
    )
    limits = UsageLimits(request_limit=None)
    if key == "plain":
        _marks(os.environ.get("PPA_MARKS"), "run_start")
        agent.run_sync("Analyze", usage_limits=limits)
        return
    from prefect_pydantic_ai import PrefectAgent

    durable = PrefectAgent(agent)
    _marks(os.environ.get("PPA_MARKS"), "run_start")
    durable.run_sync("Analyze", idempotency_key=key, usage_limits=limits)


# -- the measuring side ----------------------------------------------------------------------------------------


def _env(home: Path, **extra: str) -> dict[str, str]:
    """This environment without any PREFECT_ setting, with a private PREFECT_HOME under `home`."""
    (home / "prefect-home").mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(PREFECT_HOME=str(home / "prefect-home"), PREFECT_LOGGING_LEVEL="WARNING", **extra)
    return env


def _timed(command: list[str], env: dict[str, str], *, check: bool = True) -> tuple[float, str]:
    start = time.perf_counter()
    done = subprocess.run(command, env=env, capture_output=True, text=True, timeout=600)
    seconds = time.perf_counter() - start
    if check and done.returncode != 0:
        raise RuntimeError(f"{command} failed ({done.returncode}): {done.stderr[-2000:]}")
    return seconds, done.stdout


def _marked(command: list[str], env: dict[str, str], marks: Path) -> tuple[float, dict[str, float], str]:
    """Spawn `command` with a marks file; its spawn time (time.time()), its marks, and its stderr."""
    marks.unlink(missing_ok=True)
    spawned = time.time()
    done = subprocess.run(command, env={**env, "PPA_MARKS": str(marks)}, capture_output=True, text=True)
    found: dict[str, float] = {}
    if marks.exists():
        for line in marks.read_text().splitlines():
            name, _, at = line.rpartition(" ")
            found.setdefault(name, float(at))  # the first time each moment was reached
    return spawned, found, done.stderr


def _first_line(command: list[str], env: dict[str, str]) -> float:
    """Seconds from spawn to the first line the command prints; it then runs to its end."""
    start = time.perf_counter()
    with subprocess.Popen(
        command, env=env, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True
    ) as p:
        assert p.stdout is not None
        p.stdout.readline()
        first = time.perf_counter() - start
        p.stdout.read()
    return first


def _seed(env: dict[str, str], runs: int) -> str:
    """`runs` completed agent runs (5 steps each, 10 at a time); the idempotency key of the last one."""
    code = f"""
import asyncio, sys
sys.path.insert(0, {str(HERE)!r})
from waits import _agent
from prefect_pydantic_ai import PrefectAgent
agent = PrefectAgent(_agent("waits_seed", steps=2, kill_in_tool=None))
async def main():
    for start in range(0, {runs}, 10):
        await asyncio.gather(*(agent.run("go", idempotency_key=f"seed-{{n}}") for n in range(start, min(start + 10, {runs}))))
asyncio.run(main())
"""
    subprocess.run([sys.executable, "-c", code], env=env, check=True, capture_output=True, text=True)
    return f"seed-{runs - 1}"


def _median(values: list[float]) -> float:
    return statistics.median(values) if values else float("nan")


def _p95(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.95 * (len(ordered) - 1)))] if ordered else float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5, help="fresh processes per measure (medians)")
    parser.add_argument("--runs", type=int, default=200, help="agent runs on the server for the CLI measures")
    parser.add_argument("--load", type=int, default=2, help="CPU-bound processes during the resume cycles")
    parser.add_argument("--cycles", type=int, default=20, help="kill-and-resume cycles under load")
    parser.add_argument("--worker", nargs="+", help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.worker:
        if opts.worker[0] == "five":
            five(opts.worker[1])
        elif opts.worker[0] == "bare_first":
            bare_first()
        else:
            keyed(opts.worker[1], opts.worker[2], int(opts.worker[3]), opts.worker[4])
        return

    from rich.console import Console
    from rich.table import Table

    console = Console()
    session = Path(tempfile.mkdtemp(prefix="ppa-waits-bench-"))
    env = _env(session)
    script = [sys.executable, __file__, "--worker"]
    cli = [sys.executable, "-m", "prefect_pydantic_ai"]
    ours_cli = [str(Path(sys.executable).parent / "prefect-pydantic-ai")]
    prefect_cli = [str(Path(sys.executable).parent / "prefect")]
    samples: dict[str, list[float]] = {}
    parts: dict[str, list[dict[str, float]]] = {}
    notes: dict[str, Any] = {}
    load: list[subprocess.Popen[bytes]] = []

    def sample(name: str, seconds: float) -> None:
        samples.setdefault(name, []).append(seconds)

    try:
        console.print("first boot: `server start` in a fresh PREFECT_HOME ...")
        sample("server_boot", _timed([*cli, "server", "start"], env)[0])
        api_url = _timed([*cli, "server", "env"], env)[1].strip().split("=", 1)[1]
        prefect_env = {**env, "PREFECT_API_URL": api_url}
        console.print(f"seeding {opts.runs} agent runs ...")
        key = _seed(env, opts.runs)

        commands = {
            "runs --json": ["runs", "--json"],
            "runs": ["runs"],
            "show KEY": ["show", key],
            "costs": ["costs"],
            "server status": ["server", "status"],
        }
        for rep in range(opts.reps):
            console.print(f"CLI: repetition {rep + 1}/{opts.reps} ...")
            sample("prefect flow-run ls", _timed([*prefect_cli, "flow-run", "ls"], prefect_env)[0])
            for name, args in commands.items():
                sample(name, _timed([*ours_cli, *args], env)[0])
            sample(
                "error: demo --fail-at step-99",
                _timed([*ours_cli, "demo", "--fail-at", "step-99"], env, check=False)[0],
            )
            sample(
                "error: demo --csv missing.csv",
                _timed([*ours_cli, "demo", "--csv", "missing.csv"], env, check=False)[0],
            )

        variants = ("plain", "bare", "competitor", "ours")
        for rep in range(opts.reps):
            console.print(f"5-step script: repetition {rep + 1}/{opts.reps} ...")
            for variant in variants[rep % 4 :] + variants[: rep % 4]:
                # ours finds the local server itself (the embedded default); the others are pointed at it
                seconds, out = _timed([*script, "five", variant], env if variant == "ours" else prefect_env)
                sample(f"script: {variant}", seconds)
                inner = json.loads(out.strip().splitlines()[-1])
                inner["exit_s"] = seconds - inner["import_s"] - inner["run_s"]  # interpreter start and exit
                parts.setdefault(variant, []).append(inner)

        marks = session / "marks"
        for rep in range(opts.reps):
            console.print(f"201-step run killed at its final call, then resumed: {rep + 1}/{opts.reps} ...")
            long_key = f"long-{uuid.uuid4().hex[:8]}"
            runs = (
                ("plain agent", "plain", "none"),
                ("first attempt", long_key, "final"),
                ("resume", long_key, "none"),
            )
            for attempt, run_key, kill in runs:
                spawned, reached, _ = _marked(
                    [*script, "keyed", "waits_long", run_key, "100", kill], env, marks
                )
                start = reached["run_start"]
                sample(f"201 steps: {attempt}, run start to final call", reached["final_call"] - start)
                sample(f"201 steps: {attempt}, spawn to run start", start - spawned)

        for rep in range(opts.reps):
            console.print(f"demo, server up: {rep + 1}/{opts.reps} ...")
            sample("demo: spawn to first line", _first_line([*ours_cli, "demo", "--no-failure"], env))

        console.print(f"{opts.cycles} kill-and-resume cycles with {opts.load} CPU-bound processes ...")
        load = [subprocess.Popen([sys.executable, "-c", "while True: pass"]) for _ in range(opts.load)]
        retries = 0
        debug = {**env, "PREFECT_LOGGING_LEVEL": "DEBUG"}
        for _ in range(opts.cycles):
            cycle_key = f"cycle-{uuid.uuid4().hex[:8]}"
            _marked(
                [*script, "keyed", "waits_cycle", cycle_key, "2", "1"], env, marks
            )  # killed in tool call 2
            spawned, reached, stderr = _marked(
                [*script, "keyed", "waits_cycle", cycle_key, "2", "none"], debug, marks
            )
            sample("resume under load: run start to first step", reached["tool 1"] - reached["run_start"])
            retries += stderr.count("Another attempt will be made")
            _, reached, _ = _marked([*script, "bare_first"], prefect_env, marks)  # on the same server
            sample("bare flow under load: run start to its task", reached["tool 1"] - reached["run_start"])
        notes["client_retries"] = retries
    finally:
        for process in load:
            process.kill()
            process.wait()
        subprocess.run([*cli, "server", "stop"], env=env, stdout=subprocess.DEVNULL)

    medians = {name: _median(values) for name, values in samples.items()}
    split = {
        v: {k: _median([p[k] for p in ps]) for k in ("import_s", "run_s", "exit_s")}
        for v, ps in parts.items()
    }
    prefect_ls = medians["prefect flow-run ls"]
    plain = medians["script: plain"]

    table = Table(
        title=f"Where a person waits (medians of {opts.reps}, {opts.runs} runs on the server)",
        title_justify="left",
    )
    for column in ("measure", "seconds", "ratio", "goal"):
        table.add_column(column, justify="left" if column == "measure" else "right")
    table.add_row("`server start`, fresh PREFECT_HOME", f"{medians['server_boot']:.2f}", "", "")
    table.add_row("prefect flow-run ls (Prefect's CLI)", f"{prefect_ls:.2f}", "1.00×", "")
    for name in commands:
        value = medians[name]
        table.add_row(
            name, f"{value:.2f}", f"{prefect_ls / value:.1f}× faster", f"≤ {GOALS['cli_s']} s, ≥ 3× faster"
        )
    for name in ("error: demo --fail-at step-99", "error: demo --csv missing.csv"):
        table.add_row(name, f"{medians[name]:.2f}", "", f"≤ {GOALS['error_s']} s")
    for variant in ("plain", "bare", "competitor", "ours"):
        value = medians[f"script: {variant}"]
        p = split[variant]
        label = {
            "plain": "plain agent",
            "bare": "bare Prefect flow, 5 tasks (floor)",
            "competitor": "pydantic-ai's PrefectAgent",
            "ours": "ours",
        }[variant]
        table.add_row(
            f"5-step script: {label} (import {p['import_s']:.2f} / run {p['run_s']:.2f} / start+exit {p['exit_s']:.2f})",
            f"{value:.2f}",
            f"{value / plain:.2f}× plain",
            f"≤ {GOALS['script_ratio']}×" if variant == "ours" else "",
        )
    first = medians["201 steps: first attempt, run start to final call"]
    resumed = medians["201 steps: resume, run start to final call"]
    spawn = medians["201 steps: resume, spawn to run start"]
    floor = medians["201 steps: plain agent, run start to final call"]
    table.add_row("201 steps: the plain agent, run start to final call", f"{floor:.2f}", "", "")
    table.add_row("201 steps: first attempt, run start to final call", f"{first:.2f}", "", "")
    table.add_row(
        f"201 steps: resume, run start to final call (+{spawn:.2f} s spawn to run start)",
        f"{resumed:.2f}",
        f"{first / resumed:.1f}× faster",
        f"≥ {GOALS['resume_speedup']}×",
    )
    table.add_row(
        "demo, server up: spawn to first line",
        f"{medians['demo: spawn to first line']:.2f}",
        "",
        f"≤ {GOALS['demo_first_line_s']} s",
    )
    preflight = samples["resume under load: run start to first step"]
    table.add_row(
        f"{opts.cycles} resumes, {opts.load} CPU-bound processes: pre-flight p50 / p95",
        f"{_median(preflight):.2f} / {_p95(preflight):.2f}",
        "",
        f"p95 ≤ {GOALS['preflight_p95_s']} s",
    )
    bare = samples["bare flow under load: run start to its task"]
    table.add_row(
        "  the floor: a bare Prefect flow of one task, run start to its task, p50 / p95",
        f"{_median(bare):.2f} / {_p95(bare):.2f}",
        f"{_p95(preflight) / _p95(bare):.2f}× at p95",
        "",
    )
    table.add_row("  client retries announced (503, ...)", str(notes["client_retries"]), "", "0")
    console.print(table)
    console.print(f"load average at the end: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")

    RESULTS.mkdir(exist_ok=True)
    document = {
        "samples_s": samples,
        "medians_s": medians,
        "script_parts_median_s": split,
        "preflight_p95_s": _p95(preflight),
        "client_retries": notes["client_retries"],
        "goals": GOALS,
        "plan": vars(opts),
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "loadavg": os.getloadavg()},
    }
    out = RESULTS / "waits.json"
    out.write_text(json.dumps(document, indent=2))
    console.print(f"written to {out}")


if __name__ == "__main__":
    main()
