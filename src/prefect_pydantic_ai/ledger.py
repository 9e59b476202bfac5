"""What a durable run spent, and what replaying its journal saved.

Every model step is priced with `genai-prices` at the time its response was received; a step that is
replayed from the journal adds its usage to `saved` instead of `spent`. Prices genai-prices does not know are
never guessed: the step's cost is `None` and the totals it lands in count it in `unpriced_model_calls`, so a
partial dollar figure is visible as such. Token counts are always summed.

Money is `Decimal` in USD and serialises to JSON as a string (e.g. `"0.00725"`), so amounts round-trip exactly
and sums of many small per-request costs do not drift.
"""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from decimal import Decimal
from typing import TYPE_CHECKING, TypeVar

from pydantic import BaseModel, ConfigDict, Field, computed_field

if TYPE_CHECKING:  # imported where used: `runs` and `costs` read ledgers without importing pydantic-ai
    from pydantic_ai.messages import ModelResponse
    from pydantic_ai.usage import RequestUsage

UNKNOWN_MODEL = "unknown"
"""Key under which `Ledger.by_model` files steps whose response carries no model name."""

_SMALLEST_4DP = Decimal("0.0001")
_SINCE_DURATION = re.compile(r"(\d+)\s*([dhm])", re.IGNORECASE)
_SINCE_UNITS = {"d": "days", "h": "hours", "m": "minutes"}


def price_request(
    usage: RequestUsage, *, model_name: str, provider: str | None, at: datetime | None = None
) -> Decimal | None:
    """USD cost of one model request per genai-prices, at the prices in force at `at` (default: now).

    `provider` is a pydantic-ai provider name (`ModelResponse.provider_name`); genai-prices maps names such as
    `"google-gla"` or `"bedrock"` onto its own provider ids. With `provider=None` genai-prices infers the
    provider from the model name (`"gpt-4o"` -> OpenAI, `"claude-…"` -> Anthropic). A provider genai-prices does
    not know (`"ollama"`, `"test"`, ...) is not second-guessed from the model name, because a self-hosted or
    resold model costs something else.

    Returns `None` rather than a made-up number when the provider or model is unknown, when the response
    omitted its usage (`unmeasured_requests`), or when the counts are inconsistent (e.g. more cached than
    input tokens): pricing must never fail the agent run it reports on.
    """
    if usage.unmeasured_requests:
        return None
    return _price(usage, model_name, provider, at)


def _price(usage: object, model_name: str, provider: str | None, at: datetime | None) -> Decimal | None:
    from genai_prices import calc_price

    try:
        calculation = calc_price(usage, model_name, provider_id=provider, genai_request_timestamp=at)
    except (LookupError, ValueError):
        return None
    return calculation.total_price


def price_totals_as(totals: UsageTotals, model_name: str) -> Decimal | None:
    """What `totals`' tokens would cost at `model_name`'s current price (genai-prices): a named reference price for
    calls that have none of their own (a scripted model), to show savings in dollars. Exact for models priced
    per token without tiers (gpt-4o)."""
    from genai_prices import Usage  # its own usage type: pricing a total needs no pydantic-ai

    usage = Usage(
        input_tokens=totals.input_tokens,
        output_tokens=totals.output_tokens,
        cache_read_tokens=totals.cache_read_tokens,
        cache_write_tokens=totals.cache_write_tokens,
    )
    return _price(usage, model_name, None, None)


class StepUsage(BaseModel):
    """Tokens and cost of one model step, as read from its `ModelResponse`."""

    model_config = ConfigDict(frozen=True)

    model_name: str | None
    provider: str | None
    input_tokens: int = 0
    """All input tokens, cached ones included (pydantic-ai and genai-prices both count them this way)."""
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    requests: int = 1
    cost_usd: Decimal | None
    """Cost in USD at `timestamp`; `None` when genai-prices cannot price this model or usage."""
    timestamp: datetime

    @classmethod
    def from_response(cls, response: ModelResponse) -> StepUsage:
        """Usage of `response`, priced at the time it was received (kept when the response is replayed)."""
        usage = response.usage
        cost = (
            price_request(
                usage, model_name=response.model_name, provider=response.provider_name, at=response.timestamp
            )
            if response.model_name
            else None
        )
        return cls(
            model_name=response.model_name,
            provider=response.provider_name,
            input_tokens=usage.input_tokens,
            output_tokens=usage.output_tokens,
            cache_read_tokens=usage.cache_read_tokens,
            cache_write_tokens=usage.cache_write_tokens,
            requests=usage.requests,
            cost_usd=cost,
            timestamp=response.timestamp,
        )


class UsageTotals(BaseModel):
    """Summed usage of a set of model and tool calls.

    `cost_usd` sums the priced model calls only; when `unpriced_model_calls` is non-zero it is a lower bound.
    """

    model_config = ConfigDict(frozen=True)

    input_tokens: int = 0
    output_tokens: int = 0
    cache_read_tokens: int = 0
    cache_write_tokens: int = 0
    model_calls: int = 0
    tool_calls: int = 0
    cost_usd: Decimal = Decimal(0)
    unpriced_model_calls: int = 0

    @computed_field  # type: ignore[prop-decorator]
    @property
    def total_tokens(self) -> int:
        """Input plus output tokens."""
        return self.input_tokens + self.output_tokens

    @property
    def is_partial(self) -> bool:
        """Whether `cost_usd` leaves out model calls genai-prices could not price."""
        return self.unpriced_model_calls > 0

    @classmethod
    def of_step(cls, step: StepUsage) -> UsageTotals:
        """Totals holding the one model step `step`."""
        return cls(
            input_tokens=step.input_tokens,
            output_tokens=step.output_tokens,
            cache_read_tokens=step.cache_read_tokens,
            cache_write_tokens=step.cache_write_tokens,
            model_calls=step.requests,
            cost_usd=step.cost_usd or Decimal(0),
            unpriced_model_calls=step.requests if step.cost_usd is None else 0,
        )

    def __add__(self, other: UsageTotals) -> UsageTotals:
        return UsageTotals(
            input_tokens=self.input_tokens + other.input_tokens,
            output_tokens=self.output_tokens + other.output_tokens,
            cache_read_tokens=self.cache_read_tokens + other.cache_read_tokens,
            cache_write_tokens=self.cache_write_tokens + other.cache_write_tokens,
            model_calls=self.model_calls + other.model_calls,
            tool_calls=self.tool_calls + other.tool_calls,
            cost_usd=self.cost_usd + other.cost_usd,
            unpriced_model_calls=self.unpriced_model_calls + other.unpriced_model_calls,
        )


class SpentSaved(BaseModel):
    """Usage that was executed (`spent`) next to usage that replay avoided (`saved`)."""

    model_config = ConfigDict(frozen=True)

    spent: UsageTotals = UsageTotals()
    saved: UsageTotals = UsageTotals()

    def plus(self, delta: UsageTotals, *, replayed: bool) -> SpentSaved:
        """A copy with `delta` added to `saved` if it was replayed, else to `spent`."""
        if replayed:
            return SpentSaved(spent=self.spent, saved=self.saved + delta)
        return SpentSaved(spent=self.spent + delta, saved=self.saved)

    def __add__(self, other: SpentSaved) -> SpentSaved:
        return SpentSaved(spent=self.spent + other.spent, saved=self.saved + other.saved)

    def all_saved(self) -> SpentSaved:
        """Everything counted as saved: what a replayed step that stood for all of it avoided."""
        return SpentSaved(saved=self.spent + self.saved)


class ToolCallCounts(BaseModel):
    """Executed (`spent`) and replayed (`saved`) calls of one tool."""

    model_config = ConfigDict(frozen=True)

    spent: int = 0
    saved: int = 0

    def __add__(self, other: ToolCallCounts) -> ToolCallCounts:
        return ToolCallCounts(spent=self.spent + other.spent, saved=self.saved + other.saved)

    def all_saved(self) -> ToolCallCounts:
        return ToolCallCounts(saved=self.spent + self.saved)


class AvoidedShare(BaseModel):
    """Fractions (0 to 1) of all model calls and of all tokens that replay avoided."""

    model_config = ConfigDict(frozen=True)

    model_calls: float
    tokens: float


class Ledger(BaseModel):
    """Per-run account of executed and replayed steps; `merge` sums several runs."""

    spent: UsageTotals = UsageTotals()
    saved: UsageTotals = UsageTotals()
    by_model: dict[str, SpentSaved] = Field(default_factory=dict)
    """Model steps by `StepUsage.model_name` (`UNKNOWN_MODEL` when the response named none)."""
    by_tool: dict[str, ToolCallCounts] = Field(default_factory=dict)
    sub_agents: dict[str, SpentSaved] = Field(default_factory=dict)
    """The part of `spent` and `saved` that sub-agent runs (agents run inside this run's steps) account for, by
    path (`researcher`, `researcher/fact_checker`); a path's usage includes the paths below it."""

    @property
    def is_partial(self) -> bool:
        """Whether some model call, executed or replayed, could not be priced."""
        return self.spent.is_partial or self.saved.is_partial

    def record_model(self, step: StepUsage, replayed: bool) -> None:
        """Add one model step: to `saved` if it was replayed from the journal, else to `spent`."""
        delta = UsageTotals.of_step(step)
        if replayed:
            self.saved += delta
        else:
            self.spent += delta
        key = step.model_name or UNKNOWN_MODEL
        self.by_model[key] = self.by_model.get(key, SpentSaved()).plus(delta, replayed=replayed)

    def record_tool(self, name: str, replayed: bool) -> None:
        """Add one call of tool `name`: to `saved` if its result was replayed, else to `spent`."""
        delta = UsageTotals(tool_calls=1)
        if replayed:
            self.saved += delta
        else:
            self.spent += delta
        counts = ToolCallCounts(saved=1) if replayed else ToolCallCounts(spent=1)
        self.by_tool[name] = self.by_tool.get(name, ToolCallCounts()) + counts

    def merge(self, other: Ledger) -> Ledger:
        """A new ledger holding both ledgers' usage; neither input is changed."""
        return Ledger(
            spent=self.spent + other.spent,
            saved=self.saved + other.saved,
            by_model=_summed(self.by_model, other.by_model),
            by_tool=_summed(self.by_tool, other.by_tool),
            sub_agents=_summed(self.sub_agents, other.sub_agents),
        )

    def all_saved(self) -> Ledger:
        """This ledger with everything counted as saved: a replayed step that stood for a whole sub-agent run
        avoided all of it, what that run had spent and what it had saved alike."""
        return Ledger(
            saved=self.spent + self.saved,
            by_model={name: usage.all_saved() for name, usage in self.by_model.items()},
            by_tool={name: counts.all_saved() for name, counts in self.by_tool.items()},
            sub_agents={path: usage.all_saved() for path, usage in self.sub_agents.items()},
        )

    def with_sub_run(self, agent: str, sub_run: Ledger) -> Ledger:
        """This ledger plus the run of sub-agent `agent` (its ledger `sub_run`), which `sub_agents` accounts for."""
        below = {f"{agent}/{path}": usage for path, usage in sub_run.sub_agents.items()}
        own = Ledger(sub_agents={agent: SpentSaved(spent=sub_run.spent, saved=sub_run.saved), **below})
        return self.merge(sub_run.model_copy(update={"sub_agents": {}})).merge(own)

    def share_avoided(self) -> AvoidedShare:
        """Share of model calls and of tokens that replay avoided; 0.0 where nothing was recorded."""
        return AvoidedShare(
            model_calls=_fraction(self.saved.model_calls, self.spent.model_calls),
            tokens=_fraction(self.saved.total_tokens, self.spent.total_tokens),
        )


_Summable = TypeVar("_Summable", SpentSaved, ToolCallCounts)


def _summed(left: dict[str, _Summable], right: dict[str, _Summable]) -> dict[str, _Summable]:
    """Both tables, adding the values of names found in both."""
    summed = dict(left)
    for name, value in right.items():
        summed[name] = summed[name] + value if name in summed else value
    return summed


def _fraction(saved: int, spent: int) -> float:
    total = saved + spent
    return saved / total if total else 0.0


def format_usd(amount: Decimal | None) -> str:
    """`"$0.0123"` (four decimals), two significant digits below $0.0001, `"unknown"` for `None`."""
    if amount is None:
        return "unknown"
    if amount == 0 or abs(amount) >= _SMALLEST_4DP:
        return f"${amount:,.4f}"
    return f"${amount:.{1 - amount.adjusted()}f}"


def parse_since(value: str, *, now: datetime | None = None) -> datetime:
    """Start of a time window: `"7d"`, `"24h"`, `"30m"` (minutes) before `now`, or an ISO date/datetime.

    Returns an aware UTC datetime; an ISO value or `now` without a timezone is taken as UTC.
    """
    text = value.strip()
    if match := _SINCE_DURATION.fullmatch(text):
        amount, unit = int(match[1]), match[2].lower()
        try:
            return _as_utc(now or datetime.now(UTC)) - timedelta(**{_SINCE_UNITS[unit]: amount})
        except OverflowError:
            raise ValueError(f"Duration {value!r} reaches too far back.") from None
    try:
        parsed = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(
            f"Cannot read {value!r} as a point in time: use a duration such as '7d', '24h' or '30m' "
            "(days, hours, minutes), or an ISO date such as '2025-01-31' or '2025-01-31T09:30:00+00:00'."
        ) from None
    return _as_utc(parsed)


def _as_utc(moment: datetime) -> datetime:
    """`moment` in UTC, reading a naive datetime as UTC (as genai-prices does)."""
    return moment.replace(tzinfo=UTC) if moment.tzinfo is None else moment.astimezone(UTC)
