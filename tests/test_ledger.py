"""Pricing with genai-prices, spent/saved accounting, and the CLI helpers of `prefect_pydantic_ai.ledger`."""

from __future__ import annotations

import functools
import json
from datetime import UTC, date, datetime, timedelta
from decimal import Decimal

import pytest
from genai_prices import Usage, calc_price
from genai_prices.data_snapshot import get_snapshot
from genai_prices.types import ConditionalPrice, ModelPrice, StartDateConstraint
from pydantic_ai import Agent
from pydantic_ai.messages import ModelMessage, ModelResponse, TextPart
from pydantic_ai.models.function import AgentInfo, FunctionModel
from pydantic_ai.usage import RequestUsage

from prefect_pydantic_ai.ledger import (
    UNKNOWN_MODEL,
    AvoidedShare,
    Ledger,
    SpentSaved,
    StepUsage,
    ToolCallCounts,
    UsageTotals,
    format_usd,
    parse_since,
    price_request,
)

MILLION = Decimal(1_000_000)
WHEN = datetime(2025, 6, 1, 12, tzinfo=UTC)


def _direct(usage: RequestUsage, model: str, provider: str | None, at: datetime) -> Decimal:
    """The price genai-prices computes for `usage`, passed as its own `Usage` type."""
    gp_usage = Usage(
        input_tokens=usage.input_tokens,
        output_tokens=usage.output_tokens,
        cache_read_tokens=usage.cache_read_tokens,
        cache_write_tokens=usage.cache_write_tokens,
    )
    result: Decimal = calc_price(
        gp_usage, model, provider_id=provider, genai_request_timestamp=at
    ).total_price
    return result


def _rate(prices: ModelPrice, key: str) -> Decimal:
    """A flat per-million-token rate genai-prices publishes, e.g. `input_mtok`."""
    rate = getattr(prices, key)
    assert isinstance(rate, Decimal), f"{key} is not a flat rate: {rate!r}"
    return rate


def _step(
    model: str | None, cost: str | None, *, tokens: tuple[int, int, int, int] = (100, 10, 0, 0)
) -> StepUsage:
    input_tokens, output_tokens, cache_read, cache_write = tokens
    return StepUsage(
        model_name=model,
        provider=None,
        input_tokens=input_tokens,
        output_tokens=output_tokens,
        cache_read_tokens=cache_read,
        cache_write_tokens=cache_write,
        cost_usd=None if cost is None else Decimal(cost),
        timestamp=WHEN,
    )


# --- price_request ------------------------------------------------------------------------------------------


def test_openai_price_matches_genai_prices_and_published_rates() -> None:
    usage = RequestUsage(input_tokens=12_345, output_tokens=678, cache_read_tokens=2_000)
    price = price_request(usage, model_name="gpt-4o", provider="openai", at=WHEN)

    assert price == _direct(usage, "gpt-4o", "openai", WHEN)
    rates = calc_price(Usage(), "gpt-4o", provider_id="openai", genai_request_timestamp=WHEN).model_price
    by_hand = (
        (12_345 - 2_000) * _rate(rates, "input_mtok")
        + 2_000 * _rate(rates, "cache_read_mtok")
        + 678 * _rate(rates, "output_mtok")
    ) / MILLION
    assert price == by_hand
    assert price > 0


def test_anthropic_price_matches_genai_prices_and_published_rates() -> None:
    usage = RequestUsage(
        input_tokens=5_000, output_tokens=400, cache_read_tokens=1_000, cache_write_tokens=500
    )
    price = price_request(usage, model_name="claude-haiku-4-5", provider="anthropic", at=WHEN)

    assert price == _direct(usage, "claude-haiku-4-5", "anthropic", WHEN)
    rates = calc_price(
        Usage(), "claude-haiku-4-5", provider_id="anthropic", genai_request_timestamp=WHEN
    ).model_price
    by_hand = (
        3_500 * _rate(rates, "input_mtok")
        + 1_000 * _rate(rates, "cache_read_mtok")
        + 500 * _rate(rates, "cache_write_mtok")
        + 400 * _rate(rates, "output_mtok")
    ) / MILLION
    assert price == by_hand


def test_dated_model_name_and_inferred_provider() -> None:
    usage = RequestUsage(input_tokens=1_000, output_tokens=100)
    base = price_request(usage, model_name="gpt-4o", provider="openai", at=WHEN)

    assert price_request(usage, model_name="gpt-4o-2024-08-06", provider="openai", at=WHEN) == base
    assert price_request(usage, model_name="gpt-4o", provider=None, at=WHEN) == base
    assert price_request(usage, model_name="claude-haiku-4-5", provider=None, at=WHEN) == price_request(
        usage, model_name="claude-haiku-4-5", provider="anthropic", at=WHEN
    )
    # pydantic-ai provider names that differ from genai-prices' ids are still matched.
    assert price_request(usage, model_name="gemini-2.5-flash", provider="google-gla", at=WHEN) == _direct(
        usage, "gemini-2.5-flash", "google", WHEN
    )


@pytest.mark.parametrize(
    ("model_name", "provider"),
    [
        ("function:my_fn:", None),  # FunctionModel
        ("test", "test"),  # TestModel
        ("no-such-model-xyz", "openai"),  # known provider, unknown model
        ("gpt-4o", "google-gla"),  # model not sold by that provider
        ("gpt-4o", "ollama"),  # unknown provider: not priced as if it were OpenAI
    ],
)
def test_unknown_model_or_provider_is_none(model_name: str, provider: str | None) -> None:
    usage = RequestUsage(input_tokens=1_000, output_tokens=100)
    assert price_request(usage, model_name=model_name, provider=provider, at=WHEN) is None


def test_unmeasured_or_inconsistent_usage_is_none() -> None:
    assert price_request(RequestUsage(unmeasured_requests=1), model_name="gpt-4o", provider="openai") is None
    inconsistent = RequestUsage(input_tokens=10, cache_read_tokens=50)
    assert price_request(inconsistent, model_name="gpt-4o", provider="openai") is None


def _model_with_one_price_change() -> tuple[str, str, date, ConditionalPrice, ConditionalPrice] | None:
    """A bundled model whose flat input/output rates change exactly once, on a start date."""
    snapshot = get_snapshot()
    for provider in snapshot.providers:
        for model in provider.models:
            if not isinstance(model.prices, list) or len(model.prices) != 2:
                continue
            before, after = model.prices
            if before.constraint is not None or not isinstance(after.constraint, StartDateConstraint):
                continue
            rates = [(p.prices.input_mtok, p.prices.output_mtok) for p in (before, after)]
            if rates[0] == rates[1] or not all(isinstance(r, Decimal) for pair in rates for r in pair):
                continue
            try:
                found = snapshot.find_provider_model(model.id, None, provider.id, None)
            except LookupError:
                continue
            if found == (provider, model):
                return provider.id, model.id, after.constraint.start_date, before, after
    return None


def test_price_in_force_at_the_request_time() -> None:
    change = _model_with_one_price_change()
    if change is None:
        pytest.skip("the bundled genai-prices data has no model with a dated price change")
    provider, model, start, before, after = change
    usage = RequestUsage(input_tokens=100_000, output_tokens=20_000)
    new_time = datetime.combine(start, datetime.min.time(), UTC)
    old_time = new_time - timedelta(seconds=1)

    old = price_request(usage, model_name=model, provider=provider, at=old_time)
    new = price_request(usage, model_name=model, provider=provider, at=new_time)

    assert old == _direct(usage, model, provider, old_time)
    assert new == _direct(usage, model, provider, new_time)
    assert old != new
    for price, rates in ((old, before.prices), (new, after.prices)):
        assert (
            price == (100_000 * _rate(rates, "input_mtok") + 20_000 * _rate(rates, "output_mtok")) / MILLION
        )
    # A step is priced at its response's timestamp, so a replayed step keeps the price it was paid at.
    for when, price in ((old_time, old), (new_time, new)):
        response = ModelResponse(
            parts=[TextPart("x")], usage=usage, model_name=model, provider_name=provider, timestamp=when
        )
        assert StepUsage.from_response(response).cost_usd == price


# --- StepUsage ----------------------------------------------------------------------------------------------


def test_step_from_response_prices_at_response_time() -> None:
    usage = RequestUsage(input_tokens=2_000, output_tokens=300, cache_read_tokens=500, cache_write_tokens=0)
    response = ModelResponse(
        parts=[TextPart("hi")],
        usage=usage,
        model_name="gpt-4o-2024-08-06",
        provider_name="openai",
        timestamp=WHEN,
    )

    step = StepUsage.from_response(response)

    assert step == StepUsage(
        model_name="gpt-4o-2024-08-06",
        provider="openai",
        input_tokens=2_000,
        output_tokens=300,
        cache_read_tokens=500,
        cache_write_tokens=0,
        requests=1,
        cost_usd=_direct(usage, "gpt-4o-2024-08-06", "openai", WHEN),
        timestamp=WHEN,
    )
    dumped = step.model_dump(mode="json")
    assert dumped["cost_usd"] == str(step.cost_usd)
    assert StepUsage.model_validate(json.loads(json.dumps(dumped))) == step


def test_step_from_function_model_run_is_unpriced_but_counted() -> None:
    def reply(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        return ModelResponse(parts=[TextPart("done")])

    result = Agent(FunctionModel(reply)).run_sync("hello")
    response = result.all_messages()[-1]
    assert isinstance(response, ModelResponse)

    step = StepUsage.from_response(response)

    assert step.cost_usd is None
    assert step.provider is None
    assert step.input_tokens == response.usage.input_tokens > 0
    assert step.output_tokens == response.usage.output_tokens > 0


def test_step_without_model_name_is_unpriced() -> None:
    response = ModelResponse(parts=[TextPart("x")], usage=RequestUsage(input_tokens=5), timestamp=WHEN)
    step = StepUsage.from_response(response)
    assert step.model_name is None
    assert step.cost_usd is None


# --- Ledger -------------------------------------------------------------------------------------------------


def _recorded_ledger() -> Ledger:
    ledger = Ledger()
    ledger.record_model(_step("gpt-4o", "0.0100", tokens=(1_000, 100, 200, 0)), replayed=False)
    ledger.record_model(_step("gpt-4o", "0.0200", tokens=(2_000, 200, 0, 0)), replayed=True)
    ledger.record_model(_step("claude-haiku-4-5", "0.0030", tokens=(300, 30, 0, 50)), replayed=False)
    ledger.record_model(_step("function:f:", None, tokens=(40, 4, 0, 0)), replayed=True)
    ledger.record_model(_step(None, None, tokens=(7, 1, 0, 0)), replayed=False)
    ledger.record_tool("search", replayed=False)
    ledger.record_tool("search", replayed=True)
    ledger.record_tool("fetch", replayed=True)
    return ledger


def test_ledger_spent_and_saved() -> None:
    ledger = _recorded_ledger()

    assert ledger.spent == UsageTotals(
        input_tokens=1_307,
        output_tokens=131,
        cache_read_tokens=200,
        cache_write_tokens=50,
        model_calls=3,
        tool_calls=1,
        cost_usd=Decimal("0.0130"),
        unpriced_model_calls=1,
    )
    assert ledger.saved == UsageTotals(
        input_tokens=2_040,
        output_tokens=204,
        model_calls=2,
        tool_calls=2,
        cost_usd=Decimal("0.0200"),
        unpriced_model_calls=1,
    )
    assert ledger.spent.total_tokens == 1_438
    assert ledger.spent.is_partial and ledger.saved.is_partial and ledger.is_partial
    assert ledger.by_model["gpt-4o"] == SpentSaved(
        spent=UsageTotals(
            input_tokens=1_000,
            output_tokens=100,
            cache_read_tokens=200,
            model_calls=1,
            cost_usd=Decimal("0.0100"),
        ),
        saved=UsageTotals(input_tokens=2_000, output_tokens=200, model_calls=1, cost_usd=Decimal("0.0200")),
    )
    assert not ledger.by_model["gpt-4o"].spent.is_partial
    assert ledger.by_model["function:f:"].saved.unpriced_model_calls == 1
    assert ledger.by_model[UNKNOWN_MODEL].spent.input_tokens == 7
    assert ledger.by_tool == {"search": ToolCallCounts(spent=1, saved=1), "fetch": ToolCallCounts(saved=1)}


def test_unpriced_step_keeps_tokens_and_marks_totals_partial() -> None:
    ledger = Ledger()
    ledger.record_model(_step("gpt-4o", "0.5"), replayed=False)
    assert not ledger.is_partial
    ledger.record_model(_step("my-local-llama", None, tokens=(900, 90, 0, 0)), replayed=False)

    assert ledger.spent.input_tokens == 1_000
    assert ledger.spent.output_tokens == 100
    assert ledger.spent.model_calls == 2
    assert ledger.spent.unpriced_model_calls == 1
    assert ledger.spent.cost_usd == Decimal("0.5")
    assert ledger.is_partial


def test_share_avoided() -> None:
    assert _recorded_ledger().share_avoided() == AvoidedShare(
        model_calls=2 / 5, tokens=2_244 / (2_244 + 1_438)
    )
    assert Ledger().share_avoided() == AvoidedShare(model_calls=0.0, tokens=0.0)
    replay_only = Ledger()
    replay_only.record_model(_step("gpt-4o", "0.1"), replayed=True)
    assert replay_only.share_avoided() == AvoidedShare(model_calls=1.0, tokens=1.0)


def test_merge_sums_exactly_and_leaves_inputs_unchanged() -> None:
    first, second = Ledger(), Ledger()
    first.record_model(_step("gpt-4o", "0.1"), replayed=False)
    first.record_tool("search", replayed=False)
    second.record_model(_step("gpt-4o", "0.2"), replayed=True)
    second.record_model(_step("claude-haiku-4-5", None), replayed=False)
    second.record_tool("fetch", replayed=True)
    third = _recorded_ledger()
    before = [ledger.model_copy(deep=True) for ledger in (first, second, third)]

    merged = functools.reduce(Ledger.merge, (first, second, third), Ledger())

    everything = Ledger()
    everything.record_model(_step("gpt-4o", "0.1"), replayed=False)
    everything.record_tool("search", replayed=False)
    everything.record_model(_step("gpt-4o", "0.2"), replayed=True)
    everything.record_model(_step("claude-haiku-4-5", None), replayed=False)
    everything.record_tool("fetch", replayed=True)
    for model, cost, tokens, replayed in [
        ("gpt-4o", "0.0100", (1_000, 100, 200, 0), False),
        ("gpt-4o", "0.0200", (2_000, 200, 0, 0), True),
        ("claude-haiku-4-5", "0.0030", (300, 30, 0, 50), False),
        ("function:f:", None, (40, 4, 0, 0), True),
        (None, None, (7, 1, 0, 0), False),
    ]:
        everything.record_model(_step(model, cost, tokens=tokens), replayed=replayed)
    for tool, replayed in [("search", False), ("search", True), ("fetch", True)]:
        everything.record_tool(tool, replayed=replayed)

    assert merged == everything
    assert merged.spent.cost_usd == Decimal("0.1130")
    assert merged.saved.cost_usd == Decimal("0.2200")
    assert [first, second, third] == before


def test_ledger_json_round_trip() -> None:
    ledger = _recorded_ledger()
    dumped = ledger.model_dump(mode="json")

    assert dumped["spent"]["cost_usd"] == "0.0130"
    assert dumped["spent"]["total_tokens"] == 1_438
    restored = Ledger.model_validate(json.loads(json.dumps(dumped)))
    assert restored == ledger
    assert Ledger.model_validate_json(ledger.model_dump_json()) == ledger


# --- format_usd and parse_since -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("amount", "text"),
    [
        (Decimal("0.0123"), "$0.0123"),
        (Decimal("0.01234"), "$0.0123"),
        (Decimal("2.5"), "$2.5000"),
        (Decimal("1234.5"), "$1,234.5000"),
        (Decimal(0), "$0.0000"),
        (Decimal("0.0000123"), "$0.000012"),
        (None, "unknown"),
    ],
)
def test_format_usd(amount: Decimal | None, text: str) -> None:
    assert format_usd(amount) == text


NOW = datetime(2025, 3, 10, 15, 30, tzinfo=UTC)


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("7d", NOW - timedelta(days=7)),
        ("24h", NOW - timedelta(hours=24)),
        ("30m", NOW - timedelta(minutes=30)),
        (" 2D ", NOW - timedelta(days=2)),
        ("2025-01-31", datetime(2025, 1, 31, tzinfo=UTC)),
        ("2025-01-31T09:30:00", datetime(2025, 1, 31, 9, 30, tzinfo=UTC)),
        ("2025-01-31T09:30:00+02:00", datetime(2025, 1, 31, 7, 30, tzinfo=UTC)),
    ],
)
def test_parse_since(value: str, expected: datetime) -> None:
    parsed = parse_since(value, now=NOW)
    assert parsed == expected
    assert parsed.tzinfo is UTC


def test_parse_since_defaults_to_now() -> None:
    before = datetime.now(UTC)
    parsed = parse_since("1h")
    assert before - timedelta(hours=1) <= parsed <= datetime.now(UTC) - timedelta(hours=1)


@pytest.mark.parametrize("value", ["", "7", "7x", "-5d", "d", "yesterday", "2025-13-01", "7 days"])
def test_parse_since_rejects_bad_input(value: str) -> None:
    with pytest.raises(ValueError, match=r"'7d'.*ISO date"):
        parse_since(value, now=NOW)


def test_parse_since_rejects_overflowing_duration() -> None:
    with pytest.raises(ValueError, match="too far back"):
        parse_since("99999999999d", now=NOW)
