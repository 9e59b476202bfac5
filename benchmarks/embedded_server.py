"""Benchmark of the embedded default: fresh processes on the persistent local Prefect server (no PREFECT_API_URL).

`python benchmarks/embedded_server.py [--reps 5]` (from a clone: `.venv/bin/python benchmarks/embedded_server.py`).
In a private PREFECT_HOME, with PREFECT_API_URL removed, it measures, each in a fresh process, spawn to exit:

- first boot: `prefect-pydantic-ai server start`, and our 5-step agent script when no server runs yet (it starts
  the persistent server), and the same script with the local server opted out (Prefect's temporary server per
  process: what every process paid before);
- once the server is up: the 5-step script, ours vs the plain pydantic-ai agent (interleaved, medians);
- `prefect-pydantic-ai runs --json`.

It prints a table, writes benchmarks/results/embedded_server.json and stops the server it started.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
GOALS = {"ratio": 1.3, "runs_json_s": 2.0}


def worker(variant: str) -> None:
    """One 5-step run (model → tool → model → tool → model) of the plain agent or of ours; prints the seconds
    its imports and its run took as JSON (the rest of the process's time is interpreter start and exit)."""
    started = time.perf_counter()
    from pydantic_ai import Agent
    from pydantic_ai.messages import ModelMessage, ModelResponse, TextPart, ToolCallPart, ToolReturnPart
    from pydantic_ai.models.function import AgentInfo, FunctionModel

    def analyst(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        returns = [p for m in messages for p in m.parts if isinstance(p, ToolReturnPart)]
        if len(returns) < 2:
            return ModelResponse(parts=[ToolCallPart("lookup", {"n": len(returns)})])
        return ModelResponse(parts=[TextPart(f"done: {[r.content for r in returns]}")])

    agent = Agent(FunctionModel(analyst), name="embedded_bench")

    @agent.tool_plain
    def lookup(n: int) -> int:
        return n * 10

    if variant == "ours":
        from prefect_pydantic_ai import PrefectAgent

        runner: Any = PrefectAgent(agent)
    else:
        runner = agent
    imported = time.perf_counter()
    result = runner.run_sync("Analyze")
    assert result.output == "done: [0, 10]", result.output
    print(json.dumps({"import_s": imported - started, "run_s": time.perf_counter() - imported}))


def _env(home: Path, **extra: str) -> dict[str, str]:
    """This environment without any PREFECT_ setting, with a private PREFECT_HOME under `home`."""
    (home / "prefect-home").mkdir(parents=True, exist_ok=True)  # Prefect creates only the last level
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(
        PREFECT_HOME=str(home / "prefect-home"),
        PREFECT_LOCAL_STORAGE_PATH=str(home / "storage"),
        PREFECT_LOGGING_LEVEL="WARNING",
        PREFECT_SERVER_ANALYTICS_ENABLED="false",
        PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS="120",
        **extra,
    )
    return env


def _timed(command: list[str], env: dict[str, str], parts: list[dict[str, float]] | None = None) -> float:
    """Seconds from spawning `command` to its exit; a worker's own import/run seconds are appended to `parts`."""
    start = time.perf_counter()
    done = subprocess.run(command, env=env, check=True, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if parts is not None:
        parts.append(json.loads(done.stdout.strip().splitlines()[-1]))
    return seconds


def _timed_retrying(command: list[str], env: dict[str, str], attempts: int = 3) -> tuple[float, int]:
    """Seconds of the first successful run, and how many failed before it (Prefect's temporary server can fail
    to boot under load, e.g. "database is locked" while it migrates a new database)."""
    for failed in range(attempts):
        try:
            return _timed(command, env), failed
        except subprocess.CalledProcessError:
            continue
    return float("nan"), attempts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--reps", type=int, default=5, help="fresh processes per variant once the server is up"
    )
    parser.add_argument("--worker", choices=["plain", "ours"], help=argparse.SUPPRESS)
    opts = parser.parse_args()
    if opts.worker:
        worker(opts.worker)
        return

    from rich.console import Console
    from rich.table import Table

    console = Console()
    session = Path(tempfile.mkdtemp(prefix="ppa-embedded-bench-"))
    env = _env(session)
    script = [sys.executable, __file__, "--worker"]
    cli = [sys.executable, "-m", "prefect_pydantic_ai"]
    samples: dict[str, list[float]] = {"plain": [], "ours": [], "runs_json": []}
    parts: dict[str, list[dict[str, float]]] = {"plain": [], "ours": []}
    fresh = _env(session / "fresh")
    try:
        console.print("first boot: `prefect-pydantic-ai server start` in a fresh PREFECT_HOME ...")
        boot = _timed([*cli, "server", "start"], env)
        console.print("first boot: our script in a fresh PREFECT_HOME (it starts the persistent server) ...")
        first = _timed([*script, "ours"], fresh)
        subprocess.run([*cli, "server", "stop"], env=fresh, stdout=subprocess.DEVNULL)
        console.print("first boot: the same with the local server opted out (Prefect's temporary server) ...")
        opted_out, failed = _timed_retrying(
            [*script, "ours"], _env(session / "opted-out", PREFECT_PYDANTIC_AI_LOCAL_SERVER="false")
        )
        for rep in range(opts.reps):
            console.print(f"server up: repetition {rep + 1}/{opts.reps} ...")
            for variant in ("plain", "ours") if rep % 2 == 0 else ("ours", "plain"):
                samples[variant].append(_timed([*script, variant], env, parts[variant]))
            samples["runs_json"].append(_timed([*cli, "runs", "--json"], env))
    finally:
        for home_env in (env, fresh):
            subprocess.run([*cli, "server", "stop"], env=home_env, stdout=subprocess.DEVNULL)
    medians = {name: statistics.median(values) for name, values in samples.items()}
    ratio = medians["ours"] / medians["plain"]
    split = {
        variant: {part: statistics.median(p[part] for p in parts[variant]) for part in ("import_s", "run_s")}
        for variant in parts
    }

    table = Table(title="Embedded default: fresh processes, no PREFECT_API_URL", title_justify="left")
    for column in ("measure", "seconds", "goal"):
        table.add_column(column, justify="left" if column == "measure" else "right")
    table.add_row("`server start`, fresh PREFECT_HOME (boot until healthy)", f"{boot:.2f}", "")
    table.add_row("first script, fresh PREFECT_HOME (boots the server)", f"{first:.2f}", "")
    note = f" ({failed} failed attempt(s) before)" if failed else ""
    table.add_row(f"opted out: Prefect's temporary server, every process{note}", f"{opted_out:.2f}", "")
    table.add_row(f"server up: plain agent, 5 steps (median of {opts.reps})", f"{medians['plain']:.2f}", "")
    table.add_row(f"server up: ours, 5 steps (median of {opts.reps})", f"{medians['ours']:.2f}", "")
    table.add_row("  ours / plain", f"{ratio:.2f}×", f"≤ {GOALS['ratio']}×")
    for variant in ("plain", "ours"):
        table.add_row(
            f"  {variant}: imports / run_sync() alone (medians)",
            f"{split[variant]['import_s']:.2f} / {split[variant]['run_s']:.2f}",
            "",
        )
    table.add_row(
        f"prefect-pydantic-ai runs --json (median of {opts.reps})", f"{medians['runs_json']:.2f}", "≤ 2 s"
    )
    console.print(table)
    console.print(f"load average during the run: {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores")

    RESULTS.mkdir(exist_ok=True)
    document: dict[str, Any] = {
        "first_process_s": first,
        "server_boot_s": boot,
        "opted_out_process_s": opted_out,
        "opted_out_failed_attempts": failed,
        "samples_s": samples,
        "medians_s": medians,
        "worker_parts_s": parts,
        "worker_parts_median_s": split,
        "ours_over_plain": ratio,
        "goals": GOALS,
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(), "loadavg": os.getloadavg()},
    }
    out = RESULTS / "embedded_server.json"
    out.write_text(json.dumps(document, indent=2))
    console.print(f"written to {out}")


if __name__ == "__main__":
    main()
