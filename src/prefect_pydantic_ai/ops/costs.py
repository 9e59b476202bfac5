"""Spent and saved across runs: the ledgers of every attempt, for `costs`."""

from __future__ import annotations

from datetime import datetime

from prefect_pydantic_ai.ledger import Ledger
from prefect_pydantic_ai.ops.runs import agent_runs
from prefect_pydantic_ai.store.prefect_rest import prefect_api, tag_values
from prefect_pydantic_ai.store.records import read_records


async def ledgers_since(since: datetime | None, agent: str | None) -> list[tuple[str, Ledger]]:
    """The ledgers of every attempt of every agent run since `since` (a killed attempt's as far as it was
    recorded), with their agent names: read from the run records alone, no step timelines needed."""
    async with prefect_api() as api:
        flow_runs = await api.flow_runs(agent_runs(agent, since), "START_TIME_DESC", 100_000)
    found: list[tuple[str, Ledger]] = []
    for flow_run in flow_runs:
        for record in await read_records(str(flow_run.id), tag_values(flow_run, "agent:")):
            if agent is not None and record.agent != agent:
                continue
            for attempt in record.attempts:
                found.append((record.agent, attempt.ledger))
    return found
