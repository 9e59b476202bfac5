"""The demo's durable analyst, built at import from the environment `prefect-pydantic-ai demo` sets.

It is a module-level `PrefectAgent` so that its runs record an import path and can be resumed by
`prefect-pydantic-ai resume`. `first_attempt()` is the demo's first attempt, run in a child process: it gives
the run the `FaultPlan` from the environment as a `FaultInjection` capability, so it fails (or is killed) at the
chosen step. The recovery re-imports this agent and runs without faults.
"""

from __future__ import annotations

import os

from prefect.logging.handlers import APILogHandler
from pydantic_ai.models import Model, infer_model

from prefect_pydantic_ai.demo.analyst import (
    DEFAULT_PROMPT,
    build_analyst_agent,
    load_csv,
    offline_analyst_model,
    sales_dataset,
)
from prefect_pydantic_ai.durable.agent import PrefectAgent
from prefect_pydantic_ai.durable.task_config import TaskConfig
from prefect_pydantic_ai.testing import FaultInjection, FaultPlan

PLAN = FaultPlan.from_env()
MODEL_CONFIG = TaskConfig(retries=2, retry_delay_seconds=[0.5, 1.0], timeout_seconds=60.0)
TOOL_CONFIG = TaskConfig(retries=2, retry_delay_seconds=[0.5, 1.0], timeout_seconds=1.0)


def _model() -> Model:
    name = os.environ.get("PPA_DEMO_MODEL")
    return offline_analyst_model() if not name else infer_model(name)


analyst = PrefectAgent(
    build_analyst_agent(_model()), model_task_config=MODEL_CONFIG, tool_task_config=TOOL_CONFIG
)


async def first_attempt() -> None:
    """Attempt 1 of the demo: run the analysis under the demo's idempotency key (it may fail or be killed)."""
    from prefect_pydantic_ai.cli.display import print_step
    from prefect_pydantic_ai.durable.steps import observe_steps

    csv = os.environ.get("PPA_DEMO_CSV")
    data = load_csv(csv) if csv else sales_dataset()
    observe_steps(print_step)
    try:
        await analyst.run(
            DEFAULT_PROMPT,
            deps=data,
            idempotency_key=os.environ["PPA_DEMO_KEY"],
            capabilities=[FaultInjection(PLAN)],
        )
    finally:
        await APILogHandler.aflush()  # the child exits without running atexit handlers
