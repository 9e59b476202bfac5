"""Runnable examples: durable Pydantic AI agents as building blocks of Prefect workflows.

Run each one from the repository root, offline by default (``--model`` takes a pydantic-ai model string):

- ``python -m examples.data_analyst``: the analyst agent alone.
- ``python -m examples.analyze_and_report``: agent output feeds downstream tasks.
- ``python -m examples.research_and_summarize``: two agents in sequence, with typed deps.
- ``python -m examples.triage_ticket``: a conditional workflow routed by the agent's typed output.
- ``python -m examples.serve_analyst``: the analyze-and-report flow served as a deployment.
- ``python -m examples.delegate_research_and_writing``: a coordinator agent delegating to durable sub-agents.

Every example flow passes its agents' steps through `fault_injection(agent_name)`: when the environment
variable ``PPAI_FAULT_PLAN`` holds a `prefect_pydantic_ai.testing.FaultPlan`, each model request and tool call
that really executes is counted in the plan's state file and may fail on a chosen call. Steps replayed from the
journal never reach it, so the state file shows exactly what a resumed run executed again.
"""

from __future__ import annotations

import functools
import os
from typing import Any

from pydantic_ai.capabilities import AbstractCapability

from prefect_pydantic_ai.testing import ENV_VAR, FaultInjection, FaultPlan

__all__ = ["FAULT_PLAN_ENV", "fault_injection"]

FAULT_PLAN_ENV = ENV_VAR
"""The environment variable that hands a `FaultPlan` (as JSON) to the example flows."""


def fault_injection(agent: str) -> list[AbstractCapability[Any]]:
    """The run capabilities for `agent`: a `FaultInjection` (steps named "<agent>:...") if ``PPAI_FAULT_PLAN`` is
    set, else none."""
    text = os.environ.get(FAULT_PLAN_ENV)
    return [] if text is None else [FaultInjection(_plan(text), prefix=agent)]


@functools.cache
def _plan(text: str) -> FaultPlan:
    """One plan per process and value, so a plan without a state file still counts across agent runs."""
    return FaultPlan.from_json(text)
