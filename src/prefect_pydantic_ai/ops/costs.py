"""Spent and saved across runs: the ledgers of every finished attempt, for `costs`."""

from __future__ import annotations

from datetime import datetime

from prefect_pydantic_ai.ledger import Ledger
from prefect_pydantic_ai.ops.runs import list_runs
from prefect_pydantic_ai.store.records import read_records


async def ledgers_since(since: datetime | None, agent: str | None) -> list[tuple[str, Ledger]]:
    """The finished attempts' ledgers of every agent run since `since`, with their agent names."""
    found: list[tuple[str, Ledger]] = []
    for summary in await list_runs(agent=agent, limit=10_000, since=since):
        for record in await read_records(summary.run_id, summary.agents):
            if agent is not None and record.agent != agent:
                continue
            for attempt in record.attempts:
                found.append((record.agent, attempt.ledger))
    return found
