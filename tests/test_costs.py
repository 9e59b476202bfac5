"""What runs spend and what replay saves: exact genai-prices costs, usage that survives replay, `costs`, artifacts."""

from __future__ import annotations

import json
import uuid
from decimal import Decimal
from typing import Any

import pytest
from genai_prices import calc_price
from prefect import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId
from pydantic_ai import Agent
from pydantic_ai.messages import ModelMessage, ModelResponse, TextPart, ToolCallPart, ToolReturnPart
from pydantic_ai.models.function import AgentInfo, FunctionModel
from pydantic_ai.usage import RequestUsage

from prefect_pydantic_ai import PrefectAgent, TaskConfig, ledger_of, show_run
from prefect_pydantic_ai.testing import LoopbackOpenAI
from tests.commands import cli

pytestmark = pytest.mark.anyio


def _priced_agent(name: str, model_name: str, fail_tool: list[int] | None = None) -> Agent[None, str]:
    """model (1200 in / 300 out) → tool → model (2500 in / 400 out) → tool → model (4000 in / 500 out)."""
    sizes = [(1200, 300), (2500, 400), (4000, 500)]

    def model(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        done = [p for m in messages for p in m.parts if isinstance(p, ToolReturnPart)]
        usage = RequestUsage(input_tokens=sizes[len(done)][0], output_tokens=sizes[len(done)][1])
        if len(done) < 2:
            return ModelResponse(parts=[ToolCallPart("measure", {"n": len(done)})], usage=usage)
        return ModelResponse(parts=[TextPart(f"measured {[p.content for p in done]}")], usage=usage)

    agent: Agent[None, str] = Agent(FunctionModel(model, model_name=model_name), name=name)

    @agent.tool_plain
    def measure(n: int) -> int:
        if n == 1 and fail_tool and fail_tool[0] > 0:
            fail_tool[0] -= 1
            raise ConnectionError("meter offline")
        return n * 10

    return agent


def _genai_cost(responses: list[ModelResponse], provider: str | None = None) -> Decimal:
    total = Decimal(0)
    for r in responses:
        price = calc_price(
            r.usage, r.model_name or "", provider_id=provider, genai_request_timestamp=r.timestamp
        )
        total += price.total_price
    return total


def _responses(result: Any) -> list[ModelResponse]:
    return [m for m in result.all_messages() if isinstance(m, ModelResponse)]


async def test_cost_of_a_run_is_exactly_what_genai_prices_computes() -> None:
    result = await PrefectAgent(_priced_agent(f"priced_{uuid.uuid4().hex[:6]}", "gpt-4o")).run("go")
    ledger = ledger_of(result)
    assert ledger is not None
    expected = _genai_cost(_responses(result))
    assert expected > 0 and ledger.spent.cost_usd == expected
    assert ledger.spent.input_tokens == 7700 and ledger.spent.output_tokens == 1200
    assert ledger.spent.model_calls == 3 and ledger.spent.tool_calls == 2
    assert ledger.saved.model_calls == 0 and not ledger.is_partial


async def test_cost_through_the_real_openai_client_and_a_loopback_server() -> None:
    with LoopbackOpenAI() as server:
        server.reply_tool_calls([("lookup", {"q": "x"})], usage=(1500, 120))
        server.reply_text("found it", usage=(1800, 60))
        agent: Agent[None, str] = Agent(
            server.openai_model("gpt-4o"), name=f"loopback_{uuid.uuid4().hex[:6]}"
        )

        @agent.tool_plain
        def lookup(q: str) -> str:
            return f"result for {q}"

        result = await PrefectAgent(agent).run("find x")
    ledger = ledger_of(result)
    assert ledger is not None and result.output == "found it"
    assert ledger.spent.input_tokens == 3300 and ledger.spent.output_tokens == 180
    assert ledger.spent.cost_usd == _genai_cost(_responses(result), provider="openai") > 0


async def test_resumed_run_reports_the_same_usage_and_saves_what_replayed_steps_had_spent() -> None:
    name = f"resumable_{uuid.uuid4().hex[:6]}"
    plain = await PrefectAgent(_priced_agent(name + "_ref", "gpt-4o")).run("go")
    durable = PrefectAgent(
        _priced_agent(name, "gpt-4o", fail_tool=[1]), tool_task_config=TaskConfig(retries=0)
    )
    key = f"resume-{uuid.uuid4().hex[:6]}"
    with pytest.raises(ConnectionError):
        await durable.run("go", idempotency_key=key)
    first = await show_run(key)
    assert (
        first.ledger is not None and first.ledger.spent.model_calls == 2
    )  # attempt 1 paid for two model calls

    resumed = await durable.run("go", idempotency_key=key)
    assert resumed.output == plain.output
    assert resumed.usage == plain.usage  # replayed steps restore their usage
    ledger = ledger_of(resumed)
    assert ledger is not None
    assert ledger.saved.model_calls == 2 and ledger.spent.model_calls == 1
    assert ledger.saved.input_tokens == first.ledger.spent.input_tokens == 3700
    assert ledger.saved.cost_usd == first.ledger.spent.cost_usd > 0
    assert ledger.saved.tool_calls == 1 and ledger.spent.tool_calls == 1
    reference = ledger_of(plain)
    assert reference is not None
    assert ledger.spent.cost_usd + ledger.saved.cost_usd == reference.spent.cost_usd


@pytest.mark.slow
async def test_costs_sums_several_runs_and_unknown_models_show_usage_with_unknown_price() -> None:
    name = f"costs_probe_{uuid.uuid4().hex[:6]}"
    ledgers = []
    for model_name in ("gpt-4o", "gpt-4o", "my-private-model"):
        result = await PrefectAgent(_priced_agent(name, model_name)).run("go")
        ledgers.append(ledger_of(result))
    assert all(ledgers)
    done = cli("costs", "--agent", name, "--since", "1h", "--json")
    assert done.returncode == 0, done.stderr[-2000:]
    report = json.loads(done.stdout)
    assert report["runs"] == 3
    total = report["total"]
    assert total["model_calls"] == {"executed": 9, "replayed": 0}
    assert total["usage"]["spent"]["input_tokens"] == 3 * 7700
    assert Decimal(total["cost_usd"]["spent"]) == ledgers[0].spent.cost_usd + ledgers[1].spent.cost_usd  # type: ignore[union-attr]
    assert total["cost_partial"] is True  # the private model could not be priced
    private = report["by_model"]["my-private-model"]["spent"]
    assert private["input_tokens"] == 7700 and private["unpriced_model_calls"] == 3
    unknown = ledgers[2]
    assert (
        unknown is not None and unknown.spent.input_tokens == 7700 and unknown.spent.unpriced_model_calls == 3
    )
    human = cli("costs", "--agent", name, "--since", "1h", columns=80)
    assert human.returncode == 0 and "my-private-model" in human.stdout and "unknown" in human.stdout
    assert name in human.stdout and "…" not in human.stdout, human.stdout  # names are not cut at 80 columns
    assert max(len(line) for line in human.stdout.splitlines()) <= 80, human.stdout
    summary = " ".join(human.stdout.split())
    assert "(not counting my-private-model: no price)." in summary, summary
    only_unpriced = f"{name}_private"
    await PrefectAgent(_priced_agent(only_unpriced, "my-private-model")).run("go")
    unpriced = " ".join(cli("costs", "--agent", only_unpriced, "--since", "1h").stdout.split())
    assert "their cost is unknown: genai-prices has no price for my-private-model." in unpriced, unpriced
    assert "saved unknown of unknown" not in unpriced
    bad = cli("costs", "--since", "last tuesday")
    assert bad.returncode == 2 and "Traceback" not in bad.stderr


async def test_each_run_publishes_a_spent_vs_saved_artifact() -> None:
    key = f"artifact-{uuid.uuid4().hex[:6]}"
    agent = f"Artifacts_{uuid.uuid4().hex[:6]}"
    await PrefectAgent(_priced_agent(agent, "gpt-4o")).run("go", idempotency_key=key)
    detail = await show_run(key)
    async with get_client() as client:
        artifacts = await client.read_artifacts(
            artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[uuid.UUID(detail.run_id)])
            )
        )
    markdown = [a for a in artifacts if a.type == "markdown"]
    assert len(markdown) == 1
    # keyed, so the UI's Artifacts page lists it (one entry per agent, a version per run)
    assert markdown[0].key == f"{agent.lower().replace('_', '-')}-spent-and-saved"
    text = str(markdown[0].data)
    assert "spent vs saved by replay" in text and "| Model calls | 3 | 0 |" in text and "$" in text
