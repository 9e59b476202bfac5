"""Terminal rendering shared by the CLI and the demo: run tables, step timelines, live step lines, ledgers."""

from __future__ import annotations

import json
from collections.abc import Iterator
from datetime import datetime
from typing import Any

from pydantic import BaseModel
from rich.console import Console
from rich.table import Table

console = Console()
errors = Console(stderr=True)

SYMBOLS = {
    "executed": "✓",
    "replayed": "⚡",
    "retried": "↻",
    "failed": "✗",
    "crashed": "✗",
    "awaited": "⏸",
    "not_reached": "⊘",
}
STATE_STYLE = {
    "completed": "green",
    "failed": "red",
    "crashed": "bold red",
    "running": "cyan",
    "paused": "yellow",
    "cancelled": "dim",
    "pending": "dim",
}


def listing(title: str | None = None) -> Table:
    """A table for listings at 80 columns: no rules (they cost a column each), one space between columns."""
    return Table(title=title, title_justify="left", box=None, padding=(0, 1), pad_edge=False)


def when(moment: datetime | None) -> str:
    return moment.astimezone().strftime("%Y-%m-%d %H:%M:%S") if moment else "-"


def seconds(value: float | None) -> str:
    return "-" if value is None else f"{value:.1f}s" if value >= 1 else f"{value * 1000:.0f}ms"


def timeline_table(title: str, steps: list[Any]) -> Table:
    table = Table(title=title, title_justify="left")
    table.add_column("")
    table.add_column("#", justify="right")
    table.add_column("Step")
    table.add_column("Status")
    table.add_column("Attempts", justify="right")
    table.add_column("Duration", justify="right")
    for step, depth in _walk(steps, 0):
        where = f"{'  ' * (depth - 1)}└ {step.agent}: " if depth else ""
        table.add_row(
            SYMBOLS[step.status],
            str(step.index),
            f"{where}{step.title}",
            step.status.replace("_", " "),
            str(step.attempts) if step.attempts else "-",
            seconds(step.duration_s),
        )
    return table


def _walk(steps: list[Any], depth: int) -> Iterator[tuple[Any, int]]:
    """Each step and its depth, a sub-agent's steps right under the step they ran inside."""
    for step in steps:
        yield step, depth
        yield from _walk(step.steps, depth + 1)


def show_json(detail: Any) -> dict[str, Any]:
    """The documented `show --json` document."""
    from prefect_pydantic_ai.durable.report import usage_json
    from prefect_pydantic_ai.ledger import Ledger

    document = detail.model_dump(mode="json", exclude={"ledger", "attempt_ledgers"})
    document.update(usage_json(detail.ledger or Ledger()))
    return dict(document)


def print_ledger(ledger: Any) -> None:
    from prefect_pydantic_ai.durable.report import usd

    table = Table(title="What replay saved", title_justify="left")
    table.add_column("")
    table.add_column("Spent (executed)", justify="right")
    table.add_column("Saved (replayed)", justify="right")
    table.add_row("Model calls", str(ledger.spent.model_calls), str(ledger.saved.model_calls))
    table.add_row("Tool calls", str(ledger.spent.tool_calls), str(ledger.saved.tool_calls))
    table.add_row("Tokens", f"{ledger.spent.total_tokens:,}", f"{ledger.saved.total_tokens:,}")
    table.add_row("Cost (USD)", usd(ledger.spent), usd(ledger.saved))
    for path, part in sorted(ledger.sub_agents.items()):
        table.add_row(
            f"  of which {path}", f"{part.spent.model_calls} calls", f"{part.saved.model_calls} calls"
        )
    console.print(table)


def print_detail(detail: Any) -> None:
    style = STATE_STYLE.get(detail.state, "")
    key = f"  key [bold]{detail.idempotency_key}[/bold]" if detail.idempotency_key else ""
    console.print(
        f"Run [bold]{detail.run_id}[/bold] ({detail.name}){key}  agent {', '.join(detail.agents)}  "
        f"[{style}]{detail.state}[/{style}]"
    )
    if detail.forked_from:
        console.print(
            f"Forked from run [bold]{detail.forked_from}[/bold] at step #{detail.forked_at}: the steps before it "
            "replayed the original's journal."
        )
    for number, steps in enumerate(detail.earlier_attempts, start=1):
        console.print(timeline_table(f"Attempt {number}", steps))
    console.print(timeline_table(f"Attempt {len(detail.earlier_attempts) + 1} (latest)", detail.steps))
    for call in detail.awaiting:
        console.print(
            f"  ⏸ awaiting approval: {call.describe()}  [dim]{call.call_id}[/dim]"
            + (f"  {call.reason}" if call.reason else ""),
            highlight=False,
            soft_wrap=True,
        )
    if detail.awaiting:
        console.print(f"Decide with: prefect-pydantic-ai approve {detail.run_id} [--deny [CALL_ID]]")
    if detail.error:
        console.print(f"[red]Error:[/red] {detail.error}", highlight=False)
    elif detail.output is not None:
        console.print("Output:")
        console.print_json(json.dumps(detail.output, default=str))
    if detail.ledger is not None:
        print_ledger(detail.ledger)


def print_step(event: Any) -> None:
    """One line of live progress for a finished step (resume, demo)."""
    symbol = "✗" if event.error else "⚡" if event.replayed else "↻" if event.attempts > 1 else "✓"
    attempts = f"{event.attempts} attempt(s), " if event.attempts else ""
    error = f"  [red]{event.error}[/red]" if event.error else ""
    console.print(
        f"  {symbol} {event.title}  [dim]{attempts}{seconds(event.seconds)}[/dim]{error}",
        highlight=False,
    )


def dumps(model: BaseModel | list[Any]) -> str:
    """JSON for `--json` output."""
    if isinstance(model, BaseModel):
        return model.model_dump_json(indent=2)
    return json.dumps([m.model_dump(mode="json") if isinstance(m, BaseModel) else m for m in model], indent=2)
