"""`prefect-pydantic-ai demo`: the seed's Recovery Flow walkthrough, run for real on this machine.

Attempt 1 runs the AI Data Analyst in a child process and fails at the chosen step: an injected timeout that
outlasts the step's retries, or (`--kill`) a SIGKILL of the whole process. The recovery attempt then resumes the
same Prefect flow run, exactly as `prefect-pydantic-ai resume <run>` would: completed steps replay from the
journal and execution continues from the failed step. The two timelines, the analysis and what replay saved are
printed at the end. With no Prefect server configured, it runs on the persistent local server (`server` module),
started on first use (no network needed); a second demo reuses it.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Coroutine
from pathlib import Path
from typing import Any

from rich.table import Table

from prefect_pydantic_ai.cli.display import SYMBOLS, console, print_step
from prefect_pydantic_ai.infra.server import LocalServer, cli_name, local_api, prefect_api, run_url

# The seed's five steps, by name and by number, mapped to the fault plan's step names and call numbers.
STEPS: dict[str, tuple[str, int]] = {
    "plan": ("model", 1),
    "calculate_statistics": ("calculate_statistics", 1),
    "interpret": ("model", 2),
    "detect_anomalies": ("detect_anomalies", 1),
    "recommendations": ("model", 3),
}
_TOOL_RETRIES = 2  # as in the worker's TOOL_CONFIG
_MODEL_RETRIES = 2  # as in the worker's MODEL_CONFIG


def _step(fail_at: str) -> tuple[str, int]:
    if fail_at.isdigit() and 1 <= int(fail_at) <= len(STEPS):
        return list(STEPS.values())[int(fail_at) - 1]
    if fail_at not in STEPS:
        raise ValueError(f"Unknown step {fail_at!r} for --fail-at; use 1-5 or one of: {', '.join(STEPS)}.")
    return STEPS[fail_at]


def check_options(fail_at: str, csv: Path | None) -> None:
    """Raise `ValueError` for a `--fail-at` that names no step or a `--csv` that cannot be analysed."""
    _step(fail_at)
    if csv is not None:
        from prefect_pydantic_ai.demo.analyst import DatasetError, load_csv

        try:
            load_csv(csv)
        except DatasetError as exc:
            raise ValueError(str(exc)) from None


def _fault_title(fail_at: str, model_name: str) -> str:
    """The step `--fail-at` names, as the timelines will call it (`model #3: offline-analyst (scripted)`)."""
    from prefect_pydantic_ai.store.step_names import step_title

    ordinal = int(fail_at) if fail_at.isdigit() else list(STEPS).index(fail_at) + 1
    name, _ = _step(fail_at)
    return step_title("model", ordinal, model_name) if name == "model" else step_title("tool", ordinal, name)


def run_demo(
    *,
    fail_at: str,
    kill: bool,
    model: str | None,
    csv: Path | None,
    inject_failure: bool,
    server: LocalServer | None,
    started: float,
) -> int:
    """Run the walkthrough on `server` (None: the configured Prefect API), with options `check_options` passed;
    returns the process exit code."""
    console.rule(  # first, so the demo answers before Prefect, pydantic-ai and pandas are imported
        "[bold]prefect-pydantic-ai demo: the AI Data Analyst, with a real failure and a real recovery"
    )
    # The demo prints its own progress; Prefect's run logs still go to the API (the UI shows them).
    from prefect.logging.configuration import setup_logging

    from prefect_pydantic_ai.demo.analyst import OFFLINE_MODEL_NAME

    os.environ.setdefault("PREFECT_LOGGING_HANDLERS_CONSOLE_LEVEL", "CRITICAL")
    setup_logging(incremental=False)
    fault_name, fault_call = _step(fail_at)
    key = f"demo-{uuid.uuid4().hex[:8]}"
    if model is None:
        console.print(
            f"Model: [bold]{OFFLINE_MODEL_NAME}[/bold]. This is a scripted policy, [bold]not an LLM[/bold]: it "
            "calls the real tools on the real data and writes the analysis from their results. "
            "Use --model openai:gpt-4o (or any pydantic-ai model) for a real one."
        )
    else:
        console.print(f"Model: [bold]{model}[/bold]")
    console.print(
        f"Data: {csv if csv else 'built-in sales data (100 rows, two planted outliers: 1000 and 2000)'}"
    )

    with tempfile.TemporaryDirectory(prefix="ppa-demo-") as scratch:
        plan = _fault_plan(Path(scratch), fault_name, fault_call, kill=kill, inject=inject_failure)
        env = {
            **os.environ,
            **plan.to_env(),
            "PPA_DEMO_KEY": key,
            "PREFECT_LOGGING_LEVEL": os.environ.get("PREFECT_LOGGING_LEVEL", "ERROR"),
        }
        if model:
            env["PPA_DEMO_MODEL"] = model
        if csv:
            env["PPA_DEMO_CSV"] = str(csv.resolve())
        with prefect_api(server) as api:
            temporary = server is not None
            where = (
                "a temporary local Prefect server"
                if temporary
                else "the local Prefect server"
                if local_api() == api
                else "the configured Prefect server"
            )
            console.print(f"Prefect: {where} at {api} (ready after {time.monotonic() - started:.1f}s)")
            env["PREFECT_API_URL"] = api
            fault = _fault_title(fail_at, OFFLINE_MODEL_NAME if model is None else model.rpartition(":")[2])
            return _walkthrough(
                env, key, fault, kill=kill, inject=inject_failure, started=started, link=not temporary
            )


def _fault_plan(scratch: Path, name: str, call: int, *, kill: bool, inject: bool) -> Any:
    from prefect_pydantic_ai.testing.faults import FaultPlan

    plan = FaultPlan(state_file=scratch / "fault-calls.jsonl")
    if not inject:
        return plan
    if kill:
        return plan.kill(name, on_call=call)
    attempts = 1 + (_MODEL_RETRIES if name == "model" else _TOOL_RETRIES)
    for offset in range(attempts):  # every attempt of the step fails: its retries are exhausted
        if name == "model":
            plan.fail(name, on_call=call + offset, exc=TimeoutError("injected: the model API timed out"))
        else:
            plan.fail(name, on_call=call + offset, delay=30.0)  # hangs past the task's timeout
    return plan


def _walkthrough(
    env: dict[str, str], key: str, fault: str, *, kill: bool, inject: bool, started: float, link: bool
) -> int:
    from prefect_pydantic_ai.durable.steps import observe_steps
    from prefect_pydantic_ai.ops.resume import resume_run
    from prefect_pydantic_ai.ops.show import show_run

    what = "is SIGKILLed at" if kill else "times out beyond its retries at"
    console.print()
    console.rule("Attempt 1" + (f": the process {what} {fault}" if inject else ""))
    os.environ.update(env)  # the worker module reads its fault plan, key, model and data from here
    from prefect_pydantic_ai.demo import worker

    returncode, reason = _first_attempt_in_child(worker.first_attempt)
    first_result = time.monotonic() - started
    if returncode == 0:
        console.print(f"Attempt 1 completed ({first_result:.1f}s).")
    elif returncode == -signal.SIGKILL:
        console.print(
            f"[bold red]Attempt 1 was killed (SIGKILL) at {fault}.[/bold red] Its flow run is left 'Running'."
        )
    else:
        console.print(f"[bold red]Attempt 1 failed:[/bold red] {reason}", highlight=False)
    detail = asyncio.run(show_run(key))
    if returncode != 0:
        console.print()
        console.rule(f"Recovery: prefect-pydantic-ai resume {detail.run_id}")
        console.print(
            f"Same flow run, attempt {detail.run_count + 1}: completed steps replay (⚡), the rest executes."
        )
        stop = observe_steps(print_step)
        try:
            asyncio.run(resume_run(detail.run_id))
        finally:
            stop()
        detail = asyncio.run(show_run(detail.run_id))
    console.print()
    if detail.earlier_attempts:
        console.print(_seed_table("Initial run", detail.earlier_attempts[0]))
        console.print(_seed_table("Retry attempt", detail.steps))
    else:
        console.print(_seed_table("Run", detail.steps))
    if detail.state != "completed":
        console.print(f"[red]The run ended {detail.state}: {detail.error}[/red]")
        return 1
    _print_analysis(detail.output)
    if detail.attempt_ledgers:
        console.print(_cost_table(detail.attempt_ledgers))
        saved = detail.attempt_ledgers[-1].saved
        if saved.model_calls:
            console.print(
                f"Replay saved {saved.model_calls} model call(s), {saved.tool_calls} tool call(s) and "
                f"{saved.total_tokens:,} tokens that attempt 1 had already paid for."
            )
    if link and (url := run_url(detail.run_id)):
        console.print(f"Prefect UI: {url}")
    console.print(
        f"[dim]Timing: attempt 1 finished at {first_result:.1f}s, everything at {time.monotonic() - started:.1f}s. "
        f"See it again: {cli_name()} show {key}[/dim]",
        highlight=False,
    )
    return 0


def _first_attempt_in_child(attempt: Callable[[], Coroutine[Any, Any, None]]) -> tuple[int, str]:
    """Run attempt 1 in a forked child process (it may be SIGKILLed); its exit code and failure reason.

    Forking after the imports keeps the demo fast; the child is a real separate process with its own pid, so a
    kill takes down everything it was doing, exactly as a crash would.
    """
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: run the attempt, report why it failed, never return into the parent's code
        os.close(read_end)
        code, reason = 0, ""
        try:
            asyncio.run(attempt())
        except Exception as exc:
            code, reason = 1, f"{type(exc).__name__}: {exc}"
        finally:
            with os.fdopen(write_end, "w") as pipe:
                pipe.write(reason)
            sys.stdout.flush()
            os._exit(code)
    os.close(write_end)
    with os.fdopen(read_end) as pipe:
        reason = pipe.read()
    _, status = os.waitpid(pid, 0)
    return os.waitstatus_to_exitcode(status), reason


def _seed_table(title: str, steps: list[Any]) -> Table:
    table = Table(title=title, title_justify="left")
    table.add_column("")
    table.add_column("Step")
    table.add_column("Status")
    table.add_column("Attempts", justify="right")
    notes = {
        "executed": "executed",
        "replayed": "skipped, loaded from the journal",
        "retried": "executed after retries",
        "failed": "failed",
        "crashed": "interrupted: the process died",
        "awaited": "waited for a decision",
        "not_reached": "not reached",
    }
    for step in steps:
        table.add_row(SYMBOLS[step.status], step.title, notes[step.status], str(step.attempts or "-"))
    return table


REFERENCE_MODEL = "gpt-4o"
"""The model whose price the demo puts on calls that have none (the scripted model), to show dollars."""


def _cost_table(ledgers: list[Any]) -> Table:
    """What every attempt spent and what replay saved it, in dollars: at the calls' own prices, or at
    `REFERENCE_MODEL`'s (labelled so) for calls genai-prices cannot price, such as the scripted model's."""
    from prefect_pydantic_ai.durable.report import usd
    from prefect_pydantic_ai.ledger import format_usd, price_totals_as

    def unpriced(totals: Any) -> bool:  # no call of these could be priced: the reference price stands in
        return bool(totals.model_calls) and totals.unpriced_model_calls == totals.model_calls

    reference = any(unpriced(t) for ledger in ledgers for t in (ledger.spent, ledger.saved))
    caption = (
        f"priced as {REFERENCE_MODEL} for illustration: the scripted model has no price"
        if reference
        else None
    )
    table = Table(
        title="What each attempt spent, and what replay saved",
        title_justify="left",
        caption=caption,
        caption_justify="left",
    )
    for column in ("", "Model calls", "Tool calls", "Tokens", "Cost (USD)"):
        table.add_column(column, justify="left" if not column else "right")

    def cost(totals: Any) -> str:
        if not unpriced(totals):
            return usd(totals)
        priced = price_totals_as(totals, REFERENCE_MODEL)
        return "unknown" if priced is None else format_usd(priced)

    for number, ledger in enumerate(ledgers, start=1):
        spent = ledger.spent
        table.add_row(
            f"Attempt {number} spent",
            str(spent.model_calls),
            str(spent.tool_calls),
            f"{spent.total_tokens:,}",
            cost(spent),
        )
    saved = ledgers[-1].saved
    table.add_row(
        "Replay saved", str(saved.model_calls), str(saved.tool_calls), f"{saved.total_tokens:,}", cost(saved)
    )
    return table


def _print_analysis(output: Any) -> None:
    if not isinstance(output, dict):
        console.print(f"Output: {output}")
        return
    console.rule("The analysis (a validated DataAnalysis)")
    console.print(f"[bold]Summary:[/bold] {output.get('summary', '')}", highlight=False)
    for label, field in (("Key findings", "key_findings"), ("Recommendations", "recommendations")):
        console.print(f"[bold]{label}:[/bold]")
        for item in output.get(field, []):
            console.print(f"  • {item}", highlight=False)
    anomalies = output.get("anomalies", [])
    console.print(f"[bold]Anomalies ({len(anomalies)}):[/bold]")
    for anomaly in anomalies:
        console.print(
            f"  • row {anomaly.get('row')}: {anomaly.get('column')} = {anomaly.get('value')} (modified z = {anomaly.get('z_score', 0):.1f})",
            highlight=False,
        )
