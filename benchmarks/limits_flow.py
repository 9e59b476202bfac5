"""The flow `limits.py --cluster` deploys to the cluster's work pool: one durable run of model → `stamp` → model
against the loopback provider at `base_url`, each model request retried up to 10 times 1 s apart (the provider
answers 429 when overloaded) and, when `limit` names one, holding a slot of that Prefect global concurrency limit.

The agent is built per run from the parameters, so one deployment serves both variants.
"""

from __future__ import annotations

from openai import AsyncOpenAI
from prefect import flow
from pydantic_ai import Agent
from pydantic_ai.models.openai import OpenAIChatModel
from pydantic_ai.providers.openai import OpenAIProvider

from prefect_pydantic_ai import PrefectAgent, TaskConfig


def stamp(n: int) -> int:
    return n + 1


@flow(name="limits-storm")
async def storm_flow(base_url: str, limit: str | None = None) -> str:
    # no retries in the OpenAI client: Prefect's task retries are the one retry layer, as in the in-process storm
    client = AsyncOpenAI(base_url=base_url, api_key="loopback", max_retries=0)
    agent = Agent(
        OpenAIChatModel("gpt-4o", provider=OpenAIProvider(openai_client=client)), name="limits_storm"
    )
    agent.tool_plain(stamp)
    config = TaskConfig(retries=10, retry_delay_seconds=1, concurrency_limit=limit)
    result = await PrefectAgent(agent, model_task_config=config).run("stamp it")
    return result.output
