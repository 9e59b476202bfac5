"""A budget per logical run, in dollars and/or tokens, counted over every attempt of the run, killed ones included.

pydantic-ai's `UsageLimits` sees one attempt; here every attempt's spend is in the run record (a killed attempt's
as far as it got: the record is written after each executed model request), so a run that was resumed five
times still stops at its budget. Before each model request that will execute (a replayed one costs nothing),
the run stops if what it spent plus an estimate of the next request would exceed the budget. The estimate is
the average request of the run so far (spent / executed model requests, over every attempt); there is none
before the first request, which always goes. A run can thus overshoot by what its last request cost above
the average. Dollars are genai-prices' (see `ledger`): a request it cannot price counts as $0.
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from decimal import Decimal
from typing import Any

from prefect import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags
from pydantic import BaseModel, ConfigDict, Field, model_validator

from prefect_pydantic_ai.errors import BudgetExceededError
from prefect_pydantic_ai.infra.server import cli_name
from prefect_pydantic_ai.ledger import UsageTotals, format_usd
from prefect_pydantic_ai.store.prefect_rest import TAG
from prefect_pydantic_ai.store.records import RunRecord, read_record


class Budget(BaseModel):
    """The most a logical run may spend over all its attempts: `usd` dollars and/or `tokens` (input + output)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    usd: Decimal | None = Field(default=None, gt=0)
    tokens: int | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _something(self) -> Budget:
        if self.usd is None and self.tokens is None:
            raise ValueError("a Budget needs usd= and/or tokens=")
        return self

    def raised_by(self, override: Budget | None) -> Budget:
        """This budget with the limits `override` sets replacing these (`resume --budget`)."""
        if override is None:
            return self
        return Budget(
            usd=override.usd if override.usd is not None else self.usd,
            tokens=override.tokens if override.tokens is not None else self.tokens,
        )


_override: contextvars.ContextVar[Budget | None] = contextvars.ContextVar("ppa_budget", default=None)


@contextmanager
def budget_override(budget: Budget | None) -> Iterator[None]:
    """Runs started in this block have `budget`'s limits instead of their configured ones (`resume --budget`),
    and a run with no budget configured gets this one."""
    token = _override.set(budget)
    try:
        yield
    finally:
        _override.reset(token)


def effective(configured: Budget | None) -> Budget | None:
    """The budget of a run starting here: the configured one, with an override's limits over it."""
    override = _override.get()
    return override if configured is None else configured.raised_by(override)


@dataclass
class RunBudget:
    """A run's budget and what its earlier attempts spent: checked before each model request that executes."""

    budget: Budget
    earlier: UsageTotals
    attempts: int
    """How many earlier attempts `earlier` sums."""
    ref: str
    """How `resume` names the run: its idempotency key, else its flow run id."""

    def check(self, spent_now: UsageTotals, request: int) -> None:
        """Raise `BudgetExceededError` if model request number `request` of this attempt, at the estimated cost,
        would take the run past its budget; `spent_now`: what this attempt spent so far."""
        spent = self.earlier + spent_now
        if spent.model_calls == 0:
            return
        over = []
        if (usd := self.budget.usd) is not None:
            estimate = spent.cost_usd / spent.model_calls
            if spent.cost_usd + estimate > usd:
                over.append(
                    f"{format_usd(spent.cost_usd)} of its {format_usd(usd)} budget spent, the next request "
                    f"estimated at {format_usd(estimate)}"
                )
        if (tokens := self.budget.tokens) is not None:
            estimate_tokens = spent.total_tokens // spent.model_calls
            if spent.total_tokens + estimate_tokens > tokens:
                over.append(
                    f"{spent.total_tokens} of its {tokens} tokens spent, the next request estimated at "
                    f"{estimate_tokens}"
                )
        if over:
            attempts = self.attempts + 1
            flag = "--budget <usd>" if self.budget.usd is not None else "--budget-tokens <n>"
            raise BudgetExceededError(
                f"Run {self.ref} stopped before model request {request}: "
                f"{'; '.join(over)} (over {attempts} attempt{'s' if attempts > 1 else ''}); "
                f"resume it with a higher budget: `{cli_name()} resume {self.ref} {flag}`."
            )


async def run_budget(
    configured: Budget | None, record: RunRecord, run_count: int, key: str | None
) -> RunBudget | None:
    """The budget of the run `record` describes at attempt `run_count`, with what every earlier attempt spent:
    this flow run's earlier attempts, and for a keyed run the attempts of the key's earlier flow runs."""
    budget = effective(configured)
    if budget is None:
        return None
    earlier = [a for a in record.attempts if a.run_count != run_count]
    if key is not None and record.parent_step is None:
        for other in await _flow_runs_of_key(key, exclude=record.flow_run_id):
            same = await read_record(other, record.agent, record.ordinal)
            earlier.extend(same.attempts if same is not None else ())
    spent = UsageTotals()
    for attempt in earlier:
        spent = spent + attempt.ledger.spent
    return RunBudget(budget, spent, len(earlier), key or record.flow_run_id)


async def _flow_runs_of_key(key: str, *, exclude: str) -> list[str]:
    async with get_client() as client:
        flow_runs: list[Any] = await client.read_flow_runs(
            flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[TAG, f"key:{key}"]))
        )
    return [str(run.id) for run in flow_runs if str(run.id) != exclude]
