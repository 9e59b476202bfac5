"""Benchmarks: durability overhead, resume, cold start and memory of our PrefectAgent vs pydantic-ai's own.

`python3 dev.py bench` (full, ~15 min) or `python3 dev.py bench --quick` (smoke, ~3 min). Every phase runs in
worker processes (workload.py) against one local Prefect server that this script starts; results are printed
as tables and written to benchmarks/results/<name>.json. See benchmarks/README.md for how to read them.
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
import uuid
from dataclasses import asdict, dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.table import Table
from server import isolated_env, local_prefect_server, settle

HERE = Path(__file__).resolve().parent
WORKLOAD = HERE / "workload.py"
RESULTS = HERE / "results"
PHASES = ("overhead", "resume", "coldstart", "memory", "profile")
VARIANTS = ("plain", "competitor", "ours")
CLOCKS = ("wall", "cpu")
console = Console(width=None if sys.stdout.isatty() else 110)


@dataclass(frozen=True)
class Plan:
    """What one benchmark session measures."""

    reps: dict[int, int]  # overhead: steps N -> repetitions
    sizes: tuple[int, ...]  # overhead: tool output sizes P
    long_steps: int  # resume, memory and profile: one long run of N steps ...
    long_size: int  # ... with outputs of this size
    kill_at: int  # resume: the tool call that SIGKILLs the first attempt
    resume_reps: int  # resume: repetitions (medians are reported)
    coldstart_steps: int
    coldstart_no_server: tuple[str, ...]  # the variants also started with no server configured (~25 s each)


FULL = Plan(
    reps={10: 5, 50: 3, 200: 2},
    sizes=(100, 10_000),
    long_steps=200,
    long_size=10_000,
    kill_at=150,
    resume_reps=3,
    coldstart_steps=5,
    coldstart_no_server=("competitor", "ours"),
)
QUICK = Plan(
    reps={10: 2, 50: 1},
    sizes=(100, 10_000),
    long_steps=50,
    long_size=10_000,
    kill_at=40,
    resume_reps=1,
    coldstart_steps=5,
    coldstart_no_server=("ours",),
)


def worker(mode: str, env: dict[str, str], *args: object) -> dict[str, Any]:
    """Run workload.py in a fresh process with `env` (once its server is idle); return the JSON it wrote."""
    settle(_server_pid(env))
    with tempfile.NamedTemporaryFile(suffix=".json", delete=False) as tmp:
        out = Path(tmp.name)
    try:
        spawn([mode, "--out", out, *args], env, check=True)
        return dict(json.loads(out.read_text()))
    finally:
        out.unlink(missing_ok=True)


def spawn(args: list[object], env: dict[str, str], *, check: bool) -> int:
    """Run workload.py with `args`; its progress lines go to our stdout, its stderr to a log shown on failure."""
    with tempfile.TemporaryFile() as errors:
        proc = subprocess.run(
            [sys.executable, str(WORKLOAD), *map(str, args)], env=env, cwd=HERE, stderr=errors
        )
        if check and proc.returncode != 0:
            errors.seek(0)
            sys.stderr.write(errors.read().decode(errors="replace")[-5000:])
            raise RuntimeError(f"workload.py {args[0]} failed with exit code {proc.returncode}")
    return proc.returncode


def _server_pid(env: dict[str, str]) -> int | None:
    return int(env["BENCH_SERVER_PID"]) if "BENCH_SERVER_PID" in env else None


# -- overhead ----------------------------------------------------------------------------------------------


def overhead(plan: Plan, env: dict[str, str]) -> list[dict[str, Any]]:
    """Per (N, P), in wall-clock and in CPU time: ms per durable step over plain, and the ratios."""
    configs: list[dict[str, Any]] = []
    for n, reps in plan.reps.items():
        raw = worker("overhead", env, "--steps", n, "--sizes", *plan.sizes, "--reps", reps)
        for c in raw["configs"]:
            steps = 2 * c["steps"] + 1  # N+1 model requests and N tool calls, each one Prefect task
            summary = {"steps": c["steps"], "bytes": c["bytes"], "durable_steps": steps, "reps": reps}
            configs.append(summary | {clock: _per_step(c[clock], c["steps"]) for clock in CLOCKS})
    return configs


def _per_step(samples: dict[str, list[float]], n: int) -> dict[str, Any]:
    steps = 2 * n + 1
    median = {kind: statistics.median(s) for kind, s in samples.items()}
    per_step = {v: (median[v] - median["plain"]) * 1000 / steps for v in ("competitor", "ours")}
    bare = median["bare"] * 1000 / steps
    journaled = median["journaled"] * 1000 / steps if "journaled" in median else float("nan")
    return {
        "samples_seconds": samples,
        "median_seconds": median,
        "ms_per_step_over_plain": per_step,
        "ms_per_tool_round_over_plain": {v: ms * steps / n for v, ms in per_step.items()},
        "bare_ms_per_task": bare,
        "competitor_over_ours": per_step["competitor"] / per_step["ours"],
        "ours_over_bare": per_step["ours"] / bare,
        "journaled_ms_per_task": journaled,
        "ours_over_journaled": per_step["ours"] / journaled,
    }


def overhead_table(configs: list[dict[str, Any]], clock: str) -> Table:
    what = "wall-clock" if clock == "wall" else "CPU time of the client process"
    table = Table(title=f"Overhead ({what}): ms per durable step over the plain agent; medians")
    for column in (
        "N",
        "P",
        "plain run ms",
        "bare ms/task",
        "comp ms/step",
        "ours ms/step",
        "comp/ours",
        "ours/bare",
        "journaled ms/task",
        "ours/journaled",
    ):
        table.add_column(column, justify="right")
    for c in configs:
        m = c[clock]
        table.add_row(
            str(c["steps"]),
            _bytes(c["bytes"]),
            f"{m['median_seconds']['plain'] * 1000:.0f}",
            f"{m['bare_ms_per_task']:.1f}",
            f"{m['ms_per_step_over_plain']['competitor']:.1f}",
            f"{m['ms_per_step_over_plain']['ours']:.1f}",
            f"{m['competitor_over_ours']:.1f}×",
            f"{m['ours_over_bare']:.2f}×",
            f"{m['journaled_ms_per_task']:.1f}",
            f"{m['ours_over_journaled']:.2f}×",
        )
    return table


def _bytes(size: int) -> str:
    return f"{size // 1000} KB" if size >= 1000 else f"{size} B"


# -- resume ------------------------------------------------------------------------------------------------


def resume(plan: Plan, env: dict[str, str], session: Path) -> dict[str, Any]:
    """Kill a run inside tool call K, run it again in a new process; count and time what precedes step K.

    Each repetition also runs the plain agent, killed at the same tool call: the time pydantic-ai's own agent
    loop needs to get there (each model request prepares the whole history so far), which a replay that goes
    through the agent loop cannot undercut. Ours and the plain agent are also killed at tool call 2, which
    separates what every resume pays once (a fresh process's first flow run) from what each replayed step costs.
    The medians of `resume_reps` repetitions are reported.
    """
    k = plan.kill_at
    results: dict[str, Any] = {"steps": plan.long_steps, "kill_at": k, "bytes": plan.long_size}
    results["replayed_steps"] = 2 * k - 1  # model requests 1..K and tool calls 1..K-1
    samples: dict[str, list[dict[str, float]]] = {v: [] for v in ("ours", "competitor", "plain")}
    early: dict[str, list[dict[str, float]]] = {v: [] for v in ("ours", "plain")}
    for rep in range(plan.resume_reps):
        for variant in ("ours", "competitor", "plain"):
            samples[variant].append(_kill_and_resume(plan, env, session, variant, k, f"{rep}"))
        for variant in ("ours", "plain"):
            early[variant].append(_kill_and_resume(plan, env, session, variant, 2, f"{rep}-early"))
    results["samples"], results["early_samples"] = samples, early
    for variant, rows in samples.items():
        results[variant] = {field: statistics.median(row[field] for row in rows) for field in rows[0]}
    ours, plain = results["ours"], results["plain"]["first_attempt_seconds_to_step"]
    ours_early = statistics.median(row["resumed_seconds_to_step"] for row in early["ours"])
    plain_early = statistics.median(row["first_attempt_seconds_to_step"] for row in early["plain"])
    replayed, resumed = results["replayed_steps"], ours["resumed_seconds_to_step"]
    results["derived"] = {
        "speedup_over_first_attempt": ours["first_attempt_seconds_to_step"] / resumed,
        "best_possible_speedup": ours["first_attempt_seconds_to_step"] / plain,
        "plain_agent_seconds_to_step": plain,
        "ms_per_replayed_step": 1000 * resumed / replayed,
        "resume_fixed_seconds": ours_early,
        "ms_per_replayed_step_beyond_fixed": 1000 * (resumed - ours_early) / (replayed - 3),
        "plain_ms_per_step": 1000 * (plain - plain_early) / (replayed - 3),
        "ms_per_replayed_step_over_plain": 1000
        * ((resumed - ours_early) - (plain - plain_early))
        / (replayed - 3),
    }
    return results


def _kill_and_resume(
    plan: Plan, env: dict[str, str], session: Path, variant: str, kill_at: int, tag: str
) -> dict[str, float]:
    """SIGKILL one run of `variant` in tool call `kill_at`, then (but for the plain agent) run it again."""
    args = ["--variant", variant, "--steps", plan.long_steps, "--sizes", plan.long_size]
    if variant == "ours":  # the competitor has no way to name a run across processes: it starts afresh
        args += ["--key", f"bench-resume-{uuid.uuid4().hex[:10]}"]
    logs = [session / f"resume-{variant}-{tag}-{attempt}.log" for attempt in (1, 2)]
    settle(_server_pid(env))
    kill_env = {**env, "BENCH_CALL_LOG": str(logs[0]), "BENCH_KILL_AT": str(kill_at)}
    killed = spawn(["run", "--out", os.devnull, *args], kill_env, check=False)
    if killed != -9:
        raise RuntimeError(f"the {variant} run was to be SIGKILLed, but exited with {killed}")
    first = _read_log(logs[0])
    sample = {
        "first_attempt_seconds_to_step": _seconds_to_tool(first, kill_at),
        "completed_before_kill": sum(1 for _, kind, _ in first if kind in ("model", "tool")) - 1,
    }
    if variant == "plain":
        return sample
    rerun = worker("run", {**env, "BENCH_CALL_LOG": str(logs[1])}, *args)
    second = _read_log(logs[1])
    return sample | {
        "resumed_seconds_to_step": _seconds_to_tool(second, kill_at),
        "resumed_total_seconds": rerun["seconds"],
        "reexecuted_before_step": sum(
            1
            for _, kind, step in second
            if (kind == "model" and step <= kill_at) or (kind == "tool" and step < kill_at)
        ),
    }


def _read_log(path: Path) -> list[tuple[float, str, int]]:
    rows = (line.split() for line in path.read_text().splitlines())
    return [(float(t), kind, int(step)) for t, kind, step in rows]


def _seconds_to_tool(log: list[tuple[float, str, int]], step: int) -> float:
    start = next(t for t, kind, _ in log if kind == "start")
    return next(t for t, kind, k in log if kind == "tool" and k == step) - start


def resume_table(r: dict[str, Any]) -> Table:
    k, reps = r["kill_at"], len(r["samples"]["ours"])
    table = Table(
        title=f"Resume: {r['steps']}-step run SIGKILLed in tool call {k}, then run again "
        f"(medians of {reps}; {r['replayed_steps']} steps precede tool call {k})"
    )
    for column in (
        "variant",
        "completed before kill",
        f"re-executed before step {k}",
        "resumed: s to step",
        "first attempt: s to step",
        "resumed run total s",
    ):
        table.add_column(column, justify="right")
    for variant in ("ours", "competitor", "plain"):
        v = r[variant]
        resumed = (
            [
                str(v["reexecuted_before_step"]),
                f"{v['resumed_seconds_to_step']:.2f}",
            ]
            if variant != "plain"
            else ["-", "-"]
        )
        table.add_row(
            variant if variant != "plain" else "plain agent (no replay: the floor)",
            str(v["completed_before_kill"]),
            *resumed,
            f"{v['first_attempt_seconds_to_step']:.2f}",
            f"{v['resumed_total_seconds']:.2f}" if variant != "plain" else "-",
        )
    d = r["derived"]
    table.caption = (
        f"ours: resumed {d['speedup_over_first_attempt']:.1f}× faster than the first attempt (at most "
        f"{d['best_possible_speedup']:.1f}× while the plain agent needs {d['plain_agent_seconds_to_step']:.2f} s); "
        f"{d['ms_per_replayed_step']:.2f} ms per replayed step in all = {d['resume_fixed_seconds']:.2f} s once "
        f"(a fresh process's first flow run) + {d['ms_per_replayed_step_beyond_fixed']:.2f} ms a step, against "
        f"the plain agent's {d['plain_ms_per_step']:.2f} ms ({d['ms_per_replayed_step_over_plain']:+.2f} ms)"
    )
    return table


# -- cold start and memory ---------------------------------------------------------------------------------


def cold_start(plan: Plan, env: dict[str, str]) -> dict[str, Any]:
    """Seconds from spawning a fresh process to its result: with no server configured, and with the session's."""
    results: dict[str, Any] = {"steps": plan.coldstart_steps}
    for setting in ("no_server", "local_server"):
        results[setting] = {}
        for variant in VARIANTS:
            if setting == "no_server" and variant not in plan.coldstart_no_server:
                continue
            if setting == "no_server":
                settle(_server_pid(env))  # idle, so that it does not compete for the CPU
                run_env = isolated_env(Path(tempfile.mkdtemp(prefix="ppa-bench-cold-")), None)
            else:
                run_env = env
            spawned = time.time()
            out = worker("run", run_env, "--variant", variant, "--steps", plan.coldstart_steps)
            results[setting][variant] = {
                "to_result": out["finished"] - spawned,
                "exit": time.time() - spawned,
                "run": out["seconds"],
            }
    return results


def cold_start_table(r: dict[str, Any]) -> Table:
    table = Table(
        title=f"Cold start: fresh process, {r['steps']}-step agent; seconds from spawn to result (run() only)"
    )
    for column in ("variant", "no server (Prefect's temporary one)", "local server"):
        table.add_column(column, justify="right")
    for variant in VARIANTS:
        cells = [
            f"{r[s][variant]['to_result']:.2f} ({r[s][variant]['run']:.2f})" if variant in r[s] else "—"
            for s in ("no_server", "local_server")
        ]
        table.add_row(variant, *cells)
    return table


def memory(plan: Plan, env: dict[str, str]) -> dict[str, Any]:
    """Peak RSS during one N-step run per variant, each in its own process."""
    results: dict[str, Any] = {"steps": plan.long_steps, "bytes": plan.long_size}
    for variant in VARIANTS:
        out = worker("run", env, "--variant", variant, "--steps", plan.long_steps, "--sizes", plan.long_size)
        results[variant] = {
            "peak_rss_mb": out["peak_rss_kb"] / 1024,
            "before_run_rss_mb": out["rss_before_run_kb"] / 1024,
            "seconds": out["seconds"],
        }
    return results


def memory_table(r: dict[str, Any]) -> Table:
    table = Table(
        title=f"Memory: peak RSS during one {r['steps']}-step run, {_bytes(r['bytes'])} tool outputs"
    )
    for column in ("variant", "peak RSS MB", "RSS before run MB", "growth MB"):
        table.add_column(column, justify="right")
    for variant in VARIANTS:
        v = r[variant]
        table.add_row(
            variant,
            f"{v['peak_rss_mb']:.0f}",
            f"{v['before_run_rss_mb']:.0f}",
            f"{v['peak_rss_mb'] - v['before_run_rss_mb']:.0f}",
        )
    return table


# -- profile -----------------------------------------------------------------------------------------------


def profile(plan: Plan, env: dict[str, str], name: str) -> dict[str, Any]:
    """Our run under pyinstrument: the call tree goes to results/<name>-profile[.flat].txt, the top functions here."""
    tree = RESULTS / f"{name}-profile.txt"
    raw = worker("profile", env, "--steps", plan.long_steps, "--sizes", plan.long_size, "--tree", tree)

    def top(group: str) -> list[dict[str, Any]]:
        chosen = [{"function": f, **t} for f, t in raw["functions"].items() if t["group"] == group]
        return sorted(chosen, key=lambda t: -t["own"])[:10]

    return {
        "steps": plan.long_steps,
        "bytes": plan.long_size,
        "seconds": raw["seconds"],
        "ours": top("ours"),
        "prefect": top("prefect"),
        "thread_cpu_seconds": raw["thread_cpu_seconds"],
        "tree": str(tree),
    }


def profile_tables(p: dict[str, Any]) -> list[Table]:
    tables = []
    for part, label in (("ours", "our code"), ("prefect", "Prefect internals")):
        title = f"Profile of our {p['steps']}-step run ({p['seconds']:.1f} s, main thread): top 10 of {label}"
        table = Table(title=title)
        for column in ("own s", "total s", "function"):
            table.add_column(column, justify="right" if column != "function" else "left")
        for t in p[part]:
            table.add_row(f"{t['own']:.3f}", f"{t['total']:.3f}", t["function"])
        tables.append(table)
    table = Table(title="CPU seconds per thread during the profiled run")
    table.add_column("thread")
    table.add_column("CPU s", justify="right")
    for thread, seconds in sorted(p["thread_cpu_seconds"].items(), key=lambda kv: -kv[1]):
        table.add_row(thread, f"{seconds:.2f}")
    tables.append(table)
    return tables


# -- session -----------------------------------------------------------------------------------------------


def goals(configs: list[dict[str, Any]], clock: str) -> list[dict[str, Any]]:
    """The targets of the performance issue, checked against this session's medians on `clock`."""
    by = {(c["steps"], c["bytes"]): c[clock] for c in configs}
    checks: list[tuple[str, float, str, bool]] = []
    for (n, size), m in sorted(by.items()):
        checks.append(
            (f"ours/bare N={n} P={_bytes(size)}", m["ours_over_bare"], "≤ 1.2", m["ours_over_bare"] <= 1.2)
        )
        ratio = m["ours_over_journaled"]
        checks.append((f"ours/journaled N={n} P={_bytes(size)}", ratio, "≤ 1.2", ratio <= 1.2))
    for (n, size), m in sorted(by.items()):
        if n == 50 or (n, size) == (200, 10_000):
            target = 8 if n == 50 else 12
            ratio = m["competitor_over_ours"]
            checks.append((f"comp/ours N={n} P={_bytes(size)}", ratio, f"≥ {target}", ratio >= target))
    for size in sorted({size for _, size in by}):
        ours = {n: m["ms_per_step_over_plain"]["ours"] for (n, s), m in by.items() if s == size}
        if len(ours) > 1:  # flat within noise: the largest run costs at most 1.5× the smallest, per step
            growth = ours[max(ours)] / ours[min(ours)]
            checks.append(
                (
                    f"ours ms/step N={max(ours)} over N={min(ours)}, P={_bytes(size)}",
                    growth,
                    "≤ 1.5",
                    growth <= 1.5,
                )
            )
    return [{"check": c, "value": round(v, 2), "target": t, "met": met} for c, v, t, met in checks]


def goals_table(report: dict[str, Any]) -> Table:
    table = Table(title="Goals of the performance issue (wall-clock, as specified; CPU time for reference)")
    for column in ("check", "target", "wall", "cpu"):
        table.add_column(column, justify="left" if column == "check" else "right")
    for wall, cpu in zip(report["goals"]["wall"], report["goals"]["cpu"], strict=True):
        cells = [f"{g['value']:.2f} {'✓' if g['met'] else '✗'}" for g in (wall, cpu)]
        table.add_row(wall["check"], wall["target"], *cells)
    return table


def machine() -> dict[str, Any]:
    cpu = next(
        (
            line.split(":", 1)[1].strip()
            for line in Path("/proc/cpuinfo").read_text().splitlines()
            if line.startswith("model name")
        ),
        platform.processor(),
    )
    return {
        "nproc": os.cpu_count(),
        "cpu": cpu,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "prefect": metadata.version("prefect"),
        "pydantic_ai_slim": metadata.version("pydantic-ai-slim"),
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--quick", action="store_true", help="smoke run: N in {10, 50}, fewer repetitions")
    parser.add_argument("--name", help="results file name (default: full or quick)")
    parser.add_argument("--only", nargs="+", choices=PHASES, help="run only these phases")
    parser.add_argument("--profile", action="store_true", help="also profile our run (needs pyinstrument)")
    opts = parser.parse_args()
    plan = QUICK if opts.quick else FULL
    name = opts.name or ("quick" if opts.quick else "full")
    phases = set(opts.only or [p for p in PHASES if p != "profile" or opts.profile])
    if (
        "profile" in phases
        and subprocess.run([sys.executable, "-c", "import pyinstrument"], capture_output=True).returncode
    ):
        console.print("[red]--profile needs pyinstrument: .venv/bin/pip install pyinstrument[/red]")
        return 2
    RESULTS.mkdir(exist_ok=True)
    report: dict[str, Any] = {"name": name, "machine": machine(), "plan": asdict(plan)}
    report["load_average_at_start"] = os.getloadavg()
    started = time.monotonic()
    tables: list[Table] = []
    with local_prefect_server() as (env, session):
        console.print(f"Prefect server at {env['PREFECT_API_URL']} (session files in {session})")
        report["phase_seconds"] = {}
        for phase in (p for p in PHASES if p in phases):
            console.print(f"[bold]{phase}[/bold] ...")
            phase_started = time.monotonic()
            if phase == "overhead":
                report["overhead"] = overhead(plan, env)
                report["goals"] = {clock: goals(report["overhead"], clock) for clock in CLOCKS}
                tables += [overhead_table(report["overhead"], clock) for clock in CLOCKS]
                tables.append(goals_table(report))
            elif phase == "resume":
                report["resume"] = resume(plan, env, session)
                tables.append(resume_table(report["resume"]))
            elif phase == "coldstart":
                report["cold_start"] = cold_start(plan, env)
                tables.append(cold_start_table(report["cold_start"]))
            elif phase == "memory":
                report["memory"] = memory(plan, env)
                tables.append(memory_table(report["memory"]))
            else:
                report["profile"] = profile(plan, env, name)
                tables.extend(profile_tables(report["profile"]))
            report["phase_seconds"][phase] = round(time.monotonic() - phase_started, 1)
    report["wall_seconds"] = time.monotonic() - started
    report["load_average_at_end"] = os.getloadavg()
    path = RESULTS / f"{name}.json"
    path.write_text(json.dumps(report, indent=2))
    for table in tables:
        console.print(table)
    console.print(report["machine"])
    load = [
        f"{a:.1f}/{b:.1f}"
        for a, b in zip(report["load_average_at_start"], report["load_average_at_end"], strict=True)
    ]
    console.print(f"load average (1/5/15 min, start/end): {' '.join(load)}")
    console.print(f"wall time {report['wall_seconds']:.0f} s {report['phase_seconds']}; results in {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
