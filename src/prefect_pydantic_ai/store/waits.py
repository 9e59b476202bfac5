"""What a run waiting for a human waits for: the pending calls, stored with its flow run as a Prefect run input
(read by `runs`, `show` and `approve`, written by the wait in `durable.wait`)."""

from __future__ import annotations

import json
from typing import Any, Literal

from pydantic import BaseModel

from prefect_pydantic_ai.store.prefect_rest import ApiFlowRun, PrefectApi

ApprovalMode = Literal["suspend", "pause"]

PENDING_INPUT = "prefect-pydantic-ai-pending"
"""The flow run input (suffixed with the wait's key) that holds the pending calls of a wait."""


class PendingCall(BaseModel):
    """One call waiting for a decision: an approval, a result given from outside (`external`), or a model request
    its run's budget cannot cover (`budget`: `tool` is "budget", `args` `{"request": n}`, `reason` the figures)."""

    call_id: str
    tool: str
    args: Any
    kind: Literal["approval", "external", "budget"]
    reason: str | None = None

    def describe(self) -> str:
        """`refund(order_id=42, amount=10.0)`: the call as a person reads it."""
        if self.kind == "budget":
            return f"model request {self.args['request']} over budget"
        args = self.args if isinstance(self.args, dict) else {"args": self.args}
        shown = ", ".join(f"{k}={json.dumps(v, default=str)}" for k, v in args.items())
        return f"{self.tool}({shown})"


class Waiting(BaseModel):
    """What a waiting run waits for (stored with the run, read by `runs`, `show` and `approve`)."""

    key: str
    mode: ApprovalMode
    calls: list[PendingCall]


async def waiting_for(api: PrefectApi, flow_run: ApiFlowRun) -> Waiting | None:
    """What `flow_run` waits for, if it is paused at a wait of ours; an API error is raised, not taken for "not
    waiting"."""
    state = flow_run.state
    if state is None or not state.is_paused() or not state.state_details.pause_key:
        return None
    stored = await api.flow_run_input(flow_run.id, f"{PENDING_INPUT}-{state.state_details.pause_key}")
    return None if stored is None else Waiting.model_validate(stored)
