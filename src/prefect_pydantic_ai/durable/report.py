"""What a run spent and what replay saved, as the documented JSON shape and as Prefect artifact markdown."""

from __future__ import annotations

import json
import re
import weakref
from typing import TYPE_CHECKING, Any

from prefect_pydantic_ai.ledger import Ledger, UsageTotals, format_usd

if TYPE_CHECKING:
    from prefect_pydantic_ai.store.records import AttemptRecord

_ledgers: dict[int, Ledger] = {}


def remember_ledger(result: object, ledger: Ledger) -> None:
    """Attach `ledger` to a run result for `ledger_of`, for as long as the result lives."""
    _ledgers[id(result)] = ledger
    weakref.finalize(result, _ledgers.pop, id(result), None)


def ledger_of(result: object) -> Ledger | None:
    """The spent/saved ledger of a finished `PrefectAgent` run, given the result it returned."""
    return _ledgers.get(id(result))


def _usage(totals: UsageTotals) -> dict[str, int]:
    return {
        "input_tokens": totals.input_tokens,
        "output_tokens": totals.output_tokens,
        "cache_read_tokens": totals.cache_read_tokens,
        "cache_write_tokens": totals.cache_write_tokens,
        "total_tokens": totals.total_tokens,
    }


def _cost(totals: UsageTotals) -> str | None:
    """Dollars as an exact decimal string; `None` when no call in the totals could be priced."""
    if totals.model_calls and totals.unpriced_model_calls == totals.model_calls:
        return None
    return str(totals.cost_usd)


def usage_json(ledger: Ledger) -> dict[str, Any]:
    """The documented spent/saved shape used by `show --json` and `costs --json`."""
    return {
        "usage": {"spent": _usage(ledger.spent), "saved": _usage(ledger.saved)},
        "cost_usd": {"spent": _cost(ledger.spent), "saved": _cost(ledger.saved)},
        "cost_partial": ledger.is_partial,
        "model_calls": {"executed": ledger.spent.model_calls, "replayed": ledger.saved.model_calls},
        "tool_calls": {"executed": ledger.spent.tool_calls, "replayed": ledger.saved.tool_calls},
        "share_avoided": ledger.share_avoided().model_dump(),
        "sub_agents": {
            path: {
                "usage": {"spent": _usage(part.spent), "saved": _usage(part.saved)},
                "model_calls": {"executed": part.spent.model_calls, "replayed": part.saved.model_calls},
                "tool_calls": {"executed": part.spent.tool_calls, "replayed": part.saved.tool_calls},
            }
            for path, part in sorted(ledger.sub_agents.items())
        },
    }


def usd(totals: UsageTotals) -> str:
    """Dollars for people: `unknown` when nothing could be priced, a `≥` lower bound when only some could."""
    cost = _cost(totals)
    if cost is None:
        return "unknown"
    return ("≥ " if totals.is_partial else "") + format_usd(totals.cost_usd)


def artifact_key(agent: str) -> str:
    """The key of an agent's spent/saved artifact: one per agent, so the UI's Artifacts page lists each agent once,
    with every run's ledger as a version of it (Prefect lists only keyed artifacts there; keys allow lowercase
    letters, digits and dashes)."""
    return f"{re.sub(r'[^a-z0-9]+', '-', agent.lower()).strip('-') or 'agent'}-spent-and-saved"


def ledger_markdown(agent: str, ledger: Ledger, attempt: AttemptRecord) -> str:
    """The artifact shown in the Prefect UI for one attempt of one agent run."""
    rows = [
        ("Model calls", str(ledger.spent.model_calls), str(ledger.saved.model_calls)),
        ("Tool calls", str(ledger.spent.tool_calls), str(ledger.saved.tool_calls)),
        ("Input tokens", str(ledger.spent.input_tokens), str(ledger.saved.input_tokens)),
        ("Output tokens", str(ledger.spent.output_tokens), str(ledger.saved.output_tokens)),
        ("Cost (USD)", usd(ledger.spent), usd(ledger.saved)),
    ]
    lines = [
        f"# {agent}: spent vs saved by replay",
        "",
        f"Attempt {attempt.run_count} {attempt.state}.",
        "",
        "| | Spent (executed) | Saved (replayed) |",
        "|---|---:|---:|",
        *(f"| {label} | {spent} | {saved} |" for label, spent, saved in rows),
    ]
    if ledger.by_model:
        lines += ["", "| Model | Calls spent | Calls saved | Spent | Saved |", "|---|---:|---:|---:|---:|"]
        lines += [
            f"| {name} | {m.spent.model_calls} | {m.saved.model_calls} | {usd(m.spent)} | {usd(m.saved)} |"
            for name, m in sorted(ledger.by_model.items())
        ]
    if ledger.sub_agents:
        lines += [
            "",
            "| Of which sub-agent | Calls spent | Calls saved | Spent | Saved |",
            "|---|---:|---:|---:|---:|",
        ]
        lines += [
            f"| {path} | {part.spent.model_calls} | {part.saved.model_calls} | {usd(part.spent)} | {usd(part.saved)} |"
            for path, part in sorted(ledger.sub_agents.items())
        ]
    if attempt.error:
        lines += ["", f"**Error:** `{attempt.error}`"]
    elif attempt.output is not None:
        lines += [
            "",
            "## Output",
            "",
            "```json",
            json.dumps(attempt.output, indent=2, default=str)[:20_000],
            "```",
        ]
    return "\n".join(lines)
