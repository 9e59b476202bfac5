"""Human approval without holding compute: a support agent asks before it refunds.

The `refund` tool is registered with ``requires_approval=True``. When the model calls it, the durable run waits at
the flow level: the flow run is suspended with a Resume form in the Prefect UI (one approve box and one message per
pending call) and this process exits. Decide from the terminal, and the same flow run continues in place, with
the first model request replayed from the journal and the refund executed once::

    python -m examples.approve_refund 42           # prints: Run <id> is awaiting approval: refund(order_id=42) ...
    prefect-pydantic-ai runs                       # paused, awaiting approval: refund(order_id=42)
    prefect-pydantic-ai approve <id>               # or: --deny --message "Refunds need a receipt."

Without ``--model`` the agent is a scripted offline policy (not an LLM): it asks for the refund, then reports
what the tool (or the denial) said.
"""

from __future__ import annotations

import argparse
import sys

from pydantic_ai import Agent
from pydantic_ai.messages import ModelMessage, ModelResponse, TextPart, ToolCallPart, ToolReturnPart
from pydantic_ai.models.function import AgentInfo, FunctionModel

from prefect_pydantic_ai import AwaitingApproval, PrefectAgent


def _scripted(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    returns = [p for m in messages for p in m.parts if isinstance(p, ToolReturnPart)]
    if not returns:
        prompt = str(messages[0].parts[-1].content) if messages[0].parts else ""
        order = int("".join(ch for ch in prompt if ch.isdigit()) or 0)
        return ModelResponse(parts=[ToolCallPart("refund", {"order_id": order})])
    return ModelResponse(parts=[TextPart(f"Refund outcome: {returns[-1].content}")])


agent = Agent(FunctionModel(_scripted), name="refund_desk", system_prompt="You handle refund requests.")


@agent.tool_plain(requires_approval=True)
def refund(order_id: int) -> str:
    """Refund an order in full (a person approves each refund first)."""
    return f"order {order_id} refunded"


refund_desk = PrefectAgent(agent)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m examples.approve_refund", description=__doc__)
    parser.add_argument("order_id", type=int)
    parser.add_argument("--model", help="pydantic-ai model string, e.g. openai:gpt-4o (default: offline)")
    args = parser.parse_args(argv)
    try:
        result = refund_desk.run_sync(f"Please refund order {args.order_id}.", model=args.model)
    except AwaitingApproval as waiting:
        print(waiting)
        return 0
    print(result.output)
    return 0


if __name__ == "__main__":
    sys.exit(main())
