"""A budget per logical run, in dollars and/or tokens, counted over every attempt of the run, killed ones included.

pydantic-ai's `UsageLimits` sees one attempt; here every attempt's spend is in the run record (a killed attempt's
as far as it got: the record is written after each executed model request), so a run that was resumed five
times still stops at its budget. Before each model request that will execute (a replayed one costs nothing),
the run stops if what it spent plus an estimate of the next request would exceed the budget. The estimate is
the average request of the run so far (spent / executed model requests, over every attempt); there is none
before the first request, which always goes. A run can thus overshoot by what its last request cost above
the average. Dollars are genai-prices' (see `ledger`): a request it cannot price counts as $0.

`on_exceeded="approve"` makes the run wait for a person instead of stopping, through the wait tool approvals use
(`wait`): approved, the request goes (with new limits, the rest of the attempt has them, as with `resume
--budget`); denied, the run stops as it would have.
"""

from __future__ import annotations

import contextvars
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from decimal import Decimal
from typing import Any, Literal

from prefect import get_client
from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags
from pydantic import BaseModel, ConfigDict, Field, model_validator

from prefect_pydantic_ai.durable.wait import await_budget_decision
from prefect_pydantic_ai.errors import BudgetExceededError
from prefect_pydantic_ai.infra.server import cli_name
from prefect_pydantic_ai.ledger import UsageTotals, format_usd
from prefect_pydantic_ai.store.prefect_rest import TAG
from prefect_pydantic_ai.store.records import RunRecord, read_record
from prefect_pydantic_ai.store.waits import ApprovalMode, PendingCall


class Budget(BaseModel):
    """The most a logical run may spend over all its attempts: `usd` dollars and/or `tokens` (input + output).

    `on_exceeded`: before a request the rest cannot cover, `"stop"` the run (`BudgetExceededError`), or
    `"approve"`: wait for a person to let it go on (or stop it), as a tool call that needs approval waits."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    usd: Decimal | None = Field(default=None, gt=0)
    tokens: int | None = Field(default=None, gt=0)
    on_exceeded: Literal["stop", "approve"] = "stop"

    @model_validator(mode="after")
    def _something(self) -> Budget:
        if self.usd is None and self.tokens is None:
            raise ValueError("a Budget needs usd= and/or tokens=")
        return self

    def raised_by(self, override: Budget | None) -> Budget:
        """This budget with the limits `override` sets replacing these (`resume --budget`)."""
        if override is None:
            return self
        return self.raised_to(override.usd, override.tokens)

    def raised_to(self, usd: Decimal | None, tokens: int | None) -> Budget:
        """This budget with the limits given (not None) replacing these."""
        return self.model_copy(
            update={
                "usd": self.usd if usd is None else usd,
                "tokens": self.tokens if tokens is None else tokens,
            }
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

    async def admit(
        self, spent_now: UsageTotals, request: int, *, identity: str, mode: ApprovalMode, timeout_seconds: int
    ) -> None:
        """Before model request number `request` of this attempt (`spent_now`: what the attempt spent so far):
        return if the budget covers it at its estimated cost; else raise `BudgetExceededError`, or with
        `on_exceeded="approve"` wait for a decision (`identity`: the request's place in the journal; `mode` and
        `timeout_seconds` as for tool approvals). New limits in the decision hold for the rest of the attempt."""
        while (over := self._over(self.earlier + spent_now)) is not None:
            stopped = self._stopped(over, request)
            if self.budget.on_exceeded == "stop":
                raise stopped
            decision = await await_budget_decision(
                PendingCall(
                    call_id=f"budget-{request}",
                    tool="budget",
                    args={"request": request},
                    kind="budget",
                    reason=over,
                ),
                identity=f"{identity}\x1f{self.budget.usd}\x1f{self.budget.tokens}",  # new limits ask anew
                mode=mode,
                timeout_seconds=timeout_seconds,
            )
            if not decision.approved:
                raise stopped
            raised = self.budget.raised_to(decision.usd, decision.tokens)
            if raised == self.budget:  # no new limits: this request only
                return
            self.budget = raised

    def _over(self, spent: UsageTotals) -> str | None:
        """What `spent` plus the estimated next request exceeds, in words; None when the budget covers it."""
        if spent.model_calls == 0:
            return None
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
        if not over:
            return None
        attempts = self.attempts + 1
        return f"{'; '.join(over)} (over {attempts} attempt{'s' if attempts > 1 else ''})"

    def _stopped(self, over: str, request: int) -> BudgetExceededError:
        flag = "--budget <usd>" if self.budget.usd is not None else "--budget-tokens <n>"
        return BudgetExceededError(
            f"Run {self.ref} stopped before model request {request}: {over}; "
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
