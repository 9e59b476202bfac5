"""A budget per logical run: it counts what every attempt spent, stops before the request it cannot cover, and a
resume with a higher budget continues from there without repeating a step."""

from __future__ import annotations

import uuid
from decimal import Decimal

import pytest
from pydantic_ai import Agent
from pydantic_ai.messages import ModelMessage, ModelResponse, TextPart, ToolCallPart, ToolReturnPart
from pydantic_ai.models.function import AgentInfo, FunctionModel
from pydantic_ai.usage import RequestUsage

from prefect_pydantic_ai import Budget, BudgetExceededError, PrefectAgent, resume_run, show_run

pytestmark = pytest.mark.anyio

SIZES = [(1200, 300), (2500, 400), (4000, 500)]
"""Input and output tokens of requests 1, 2 and 3: 1500, 2900 and 4500 tokens."""
CALLS: list[str] = []
"""Every model request and tool call executed, in order."""
FAIL_TOOL: list[int] = [0]


def _model(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    done = [p for m in messages for p in m.parts if isinstance(p, ToolReturnPart)]
    CALLS.append(f"model {len(done) + 1}")
    usage = RequestUsage(input_tokens=SIZES[len(done)][0], output_tokens=SIZES[len(done)][1])
    if len(done) < 2:
        return ModelResponse(parts=[ToolCallPart("measure", {"n": len(done)})], usage=usage)
    return ModelResponse(parts=[TextPart(f"measured {[p.content for p in done]}")], usage=usage)


agent: Agent[None, str] = Agent(FunctionModel(_model, model_name="gpt-4o"), name="budgeted")


@agent.tool_plain
def measure(n: int) -> int:
    CALLS.append(f"tool {n}")
    if n == 1 and FAIL_TOOL[0] > 0:
        FAIL_TOOL[0] -= 1
        raise ValueError("meter offline")
    return n * 10


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
    with pytest.raises(BudgetExceededError, match="4400 of its 5000 tokens spent.*over 3 attempts"):
        await by_tokens.run("measure twice", idempotency_key=key)
    assert CALLS == ["tool 1"]  # the failed tool call executes again; request 3 does not
