"""An agent whose `refund` (and, with two waits, `notify`) tool needs approval, as an importable module and a
script. Every model request and tool call is counted in $APPROVAL_CALLS (a CallLog).

Run as a script: `approval.py KEY`; it prints `OUTPUT <text>`, `AWAITING <run id>` or `ERROR <type>: <message>`.
$APPROVAL_TWO makes the model ask for `notify` (another approval) after the refund; $APPROVAL_PAUSE makes the
run wait in its process (`approvals="pause"`).
"""

from __future__ import annotations

import asyncio
import os
import sys

from pydantic_ai import Agent, ApprovalRequired, RunContext
from pydantic_ai.messages import ModelMessage, ModelResponse, TextPart, ToolCallPart, ToolReturnPart
from pydantic_ai.models.function import AgentInfo, FunctionModel

from prefect_pydantic_ai import PrefectAgent
from prefect_pydantic_ai.durable.wait import AwaitingApproval
from prefect_pydantic_ai.testing import CallLog


def _log() -> CallLog:
    return CallLog(os.environ["APPROVAL_CALLS"])


def clerk(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    _log().record("model")
    returns = {p.tool_name: p.content for m in messages for p in m.parts if isinstance(p, ToolReturnPart)}
    if "refund" not in returns:
        return ModelResponse(parts=[ToolCallPart("refund", {"order_id": 42}, tool_call_id="call-refund")])
    if os.environ.get("APPROVAL_TWO") and "notify" not in returns:
        return ModelResponse(parts=[ToolCallPart("notify", {"customer": "ada"}, tool_call_id="call-notify")])
    return ModelResponse(parts=[TextPart(" | ".join(f"{k}: {v}" for k, v in returns.items()))])


agent = Agent(FunctionModel(clerk), name="refund_clerk")


@agent.tool_plain(requires_approval=True)
def refund(order_id: int) -> str:
    """Refund an order."""
    _log().record("refund", order_id)
    return f"refunded {order_id}"


@agent.tool_plain(requires_approval=True)
def notify(customer: str) -> str:
    """Tell the customer."""
    _log().record("notify", customer)
    return f"notified {customer}"


durable = PrefectAgent(agent, approvals="pause" if os.environ.get("APPROVAL_PAUSE") else "suspend")


def _wirer(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    _log().record("model")
    returns = [p.content for m in messages for p in m.parts if isinstance(p, ToolReturnPart)]
    if not returns:
        return ModelResponse(parts=[ToolCallPart("wire", {"amount": 5000}, tool_call_id="call-wire")])
    return ModelResponse(parts=[TextPart(f"wire: {returns[0]}")])


wire_agent = Agent(FunctionModel(_wirer), name="wire_clerk")


@wire_agent.tool
def wire(ctx: RunContext[None], amount: int) -> str:
    """Wire money; large amounts need a person's approval, which the tool asks for itself."""
    if amount > 1000 and not ctx.tool_call_approved:
        raise ApprovalRequired({"reason": f"{amount} is above the 1000 limit"})
    _log().record("wire", amount)
    return f"wired {amount}"


wire_desk = PrefectAgent(wire_agent)

if __name__ == "__main__":
    try:
        result = asyncio.run(durable.run("Refund order 42", idempotency_key=sys.argv[1]))
    except AwaitingApproval as waiting:
        print(f"AWAITING {waiting.flow_run_id}")
        sys.exit(0)
    except Exception as exc:
        print(f"ERROR {type(exc).__name__}: {exc}")
        sys.exit(1)
    print(f"OUTPUT {result.output}")
