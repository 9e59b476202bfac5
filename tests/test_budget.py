"""A budget per logical run: it counts what every attempt spent, stops before the request it cannot cover, and a
resume with a higher budget continues from there without repeating a step."""

from __future__ import annotations

import os
import subprocess
import sys
import uuid
from decimal import Decimal
from pathlib import Path

import pytest

from prefect_pydantic_ai import Budget, BudgetExceededError, PrefectAgent, resume_run, show_run
from tests.scripts.budgeted import CALLS, FAIL_TOOL, agent

pytestmark = pytest.mark.anyio

BUDGETED = Path(__file__).parent / "scripts" / "budgeted.py"
by_tokens = PrefectAgent(agent, budget=Budget(tokens=5000))


async def test_a_token_budget_stops_before_the_request_it_cannot_cover_and_resume_with_more_repeats_nothing() -> (
    None
):
    key = f"budget-{uuid.uuid4().hex[:8]}"
    CALLS.clear()
    with pytest.raises(BudgetExceededError) as stopped:
        await by_tokens.run("measure twice", idempotency_key=key)
    assert CALLS == ["model 1", "tool 0", "model 2", "tool 1"]
    assert str(stopped.value) == (
        f"Run {key} stopped before model request 3: 4400 of its 5000 tokens spent, the next request estimated "
        f"at 2200 (over 1 attempt); resume it with a higher budget: `prefect-pydantic-ai resume {key} "
        "--budget-tokens <n>`."
    )
    CALLS.clear()
    result = await resume_run(key, budget=Budget(tokens=20_000))
    assert result.output == "measured [0, 10]" and CALLS == ["model 3"]
    detail = await show_run(key)
    assert detail.state == "completed"


async def test_the_budget_counts_the_spend_of_earlier_failed_attempts() -> None:
    """Attempt 1 spends 1500 tokens and fails in a tool; attempt 2 (a new process would do the same: the key)
    replays request 1 and spends 2900: 4400 over two attempts stops it before request 3."""
    key = f"budget-{uuid.uuid4().hex[:8]}"
    CALLS.clear()
    FAIL_TOOL[0] = 1
    generous = PrefectAgent(agent, budget=Budget(usd=Decimal("0.0001")))  # $: stops before request 2
    with pytest.raises(BudgetExceededError, match=r"before model request 2: \$0\.0060 of its \$0\.0001"):
        await generous.run("measure twice", idempotency_key=key)
    assert CALLS == ["model 1", "tool 0"]
    CALLS.clear()
    with pytest.raises(ValueError, match="meter offline"):
        await PrefectAgent(agent, budget=Budget(tokens=100_000)).run("measure twice", idempotency_key=key)
    assert CALLS == ["model 2", "tool 1"]  # request 1 and tool 0 replayed
    CALLS.clear()
    with pytest.raises(BudgetExceededError, match=r"4400 of its 5000 tokens spent.*over 3 attempts"):
        await by_tokens.run("measure twice", idempotency_key=key)
    assert CALLS == ["tool 1"]  # the failed tool call executes again; request 3 does not


@pytest.mark.slow
async def test_the_budget_counts_what_a_killed_attempt_spent() -> None:
    """A process SIGKILLed in its second tool call had paid for requests 1 and 2 (4400 tokens): the next attempt
    replays them, calls the tool again and stops before request 3."""
    key = f"budget-{uuid.uuid4().hex[:8]}"
    killed = subprocess.run(
        [sys.executable, str(BUDGETED), key],
        env=dict(os.environ),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert killed.returncode == -9, killed.stderr[-2000:]
    CALLS.clear()
    with pytest.raises(BudgetExceededError, match=r"4400 of its 5000 tokens spent.*over 2 attempts"):
        await by_tokens.run("measure twice", idempotency_key=key)
    assert CALLS == ["tool 1"]
