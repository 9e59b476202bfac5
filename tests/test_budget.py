"""A budget per logical run: it counts what every attempt spent, stops before the request it cannot cover (or waits
there for a person's decision), and a resume with a higher budget continues from there without repeating a step."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import uuid
from decimal import Decimal
from pathlib import Path

import pytest
from prefect import get_client

from prefect_pydantic_ai import (
    AwaitingApproval,
    Budget,
    BudgetExceededError,
    PrefectAgent,
    approve_run,
    resume_run,
    show_run,
)
from prefect_pydantic_ai.durable.wait import observing_waits
from prefect_pydantic_ai.store.waits import PendingCall
from tests.scripts.budgeted import CALLS, FAIL_TOOL, agent
from tests.warm import python

pytestmark = pytest.mark.anyio

BUDGETED = Path(__file__).parent / "scripts" / "budgeted.py"
by_tokens = PrefectAgent(agent, budget=Budget(tokens=5000))
asks = PrefectAgent(agent, budget=Budget(tokens=5000, on_exceeded="approve"))
OVER = "4400 of its 5000 tokens spent, the next request estimated at 2200"


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


async def _state(run_id: str) -> str:
    async with get_client() as client:
        flow_run = await client.read_flow_run(uuid.UUID(run_id))
    assert flow_run.state is not None
    return flow_run.state.type.value


async def test_a_budget_that_asks_waits_before_the_request_and_approving_lets_that_request_go() -> None:
    key = f"budget-{uuid.uuid4().hex[:8]}"
    CALLS.clear()
    with pytest.raises(AwaitingApproval) as waiting:
        await asks.run("measure twice", idempotency_key=key)
    run_id = waiting.value.flow_run_id
    assert CALLS == ["model 1", "tool 0", "model 2", "tool 1"]
    assert str(waiting.value) == (
        f"Run {run_id} is awaiting approval: model request 3 over budget. Decide with "
        f"`prefect-pydantic-ai approve {run_id}` (or --deny), or in the Prefect UI."
    )
    assert [(c.call_id, c.kind, c.reason) for c in waiting.value.calls] == [
        ("budget-3", "budget", f"{OVER} (over 1 attempt)")
    ]
    assert await _state(run_id) == "PAUSED"
    CALLS.clear()
    decision = await approve_run(key)  # no new limit: this request only
    assert decision.approved == ["budget-3"] and decision.output == "measured [0, 10]"
    assert CALLS == ["model 3"]  # requests 1 and 2 and both tool calls replayed
    assert await _state(run_id) == "COMPLETED"


async def test_a_denied_budget_stops_the_run_with_the_budget_error() -> None:
    key = f"budget-{uuid.uuid4().hex[:8]}"
    with pytest.raises(AwaitingApproval) as waiting:
        await asks.run("measure twice", idempotency_key=key)
    CALLS.clear()
    decision = await approve_run(key, deny=[])
    assert decision.denied == ["budget-3"] and CALLS == []
    assert decision.stopped == (
        f"Run {key} stopped before model request 3: {OVER} (over 2 attempts); resume it with a higher budget: "
        f"`prefect-pydantic-ai resume {key} --budget-tokens <n>`."
    )
    assert await _state(waiting.value.flow_run_id) == "FAILED"  # resumable as any stopped run (above)


@pytest.mark.slow
async def test_a_run_killed_while_waiting_at_its_budget_asks_again_on_resume_and_a_raised_budget_repeats_nothing() -> (
    None
):
    """`budgeted.py KEY ask` waits in its process (approvals="pause") before request 3 and SIGKILLs itself
    there; `resume` replays everything before the wait and asks again, and the approval raising the budget
    lets request 3 execute, once."""
    key = f"budget-{uuid.uuid4().hex[:8]}"
    killed = python(str(BUDGETED), key, "ask")
    assert killed.returncode == -9, killed.stderr[-2000:]
    detail = await show_run(key)
    assert detail.state == "paused" and [c.call_id for c in detail.awaiting] == ["budget-3"]

    asked = asyncio.Event()

    async def waiting(flow_run_id: str, calls: list[PendingCall]) -> None:
        assert [c.reason for c in calls] == [f"{OVER} (over 2 attempts)"]
        asked.set()

    CALLS.clear()
    with observing_waits(waiting):
        resumed = asyncio.create_task(resume_run(key, entrypoint="tests.scripts.budgeted:asking"))
        await asyncio.wait_for(asked.wait(), 60)
    assert CALLS == []  # the killed attempt's requests and tool calls replayed
    decision = await approve_run(key, budget=Budget(tokens=20_000))
    assert not decision.continued  # the waiting process (the resume) takes it from here
    result = await asyncio.wait_for(resumed, 60)
    assert result.output == "measured [0, 10]" and CALLS == ["model 3"]
    assert (await show_run(key)).state == "completed"
