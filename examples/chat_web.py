"""Chat with a durable support agent in the browser: close the tab or kill the server mid-answer, lose nothing.

    prefect-pydantic-ai web examples/chat_web.py:desk        # then open http://127.0.0.1:8000/

Each message is a turn, run as a durable Prefect flow run keyed by conversation and turn; the answer streams to
the page (the Vercel AI data stream protocol; AG-UI clients add `?protocol=ag-ui` to the events URL) from a
durable event log, so a reopened tab, or a server killed and started again, continues the answer where it
stopped, with ⚡ on each call the resumed run answered from the journal. Ask for a refund ("please refund order
42") and the `refund` tool waits for a person: Approve or Deny on the page's card, with `prefect-pydantic-ai
approve <run>`, or in the Prefect UI's Resume form, whichever comes first.

Without $CHAT_MODEL (e.g. `openai:gpt-4o`) the agent is a scripted offline policy (not an LLM) that streams its
answer word by word.
"""

from __future__ import annotations

import asyncio
import os
import re
from collections.abc import AsyncIterator

from pydantic_ai import Agent
from pydantic_ai.messages import ModelMessage, ModelRequest, ToolReturnPart, UserPromptPart
from pydantic_ai.models.function import AgentInfo, DeltaToolCall, DeltaToolCalls, FunctionModel

from prefect_pydantic_ai import PrefectAgent


async def _scripted(messages: list[ModelMessage], info: AgentInfo) -> AsyncIterator[str | DeltaToolCalls]:
    last = messages[-1]
    returned = (
        [p for p in last.parts if isinstance(p, ToolReturnPart)] if isinstance(last, ModelRequest) else []
    )
    if returned:
        answer = f"Done: {returned[-1].content}. Anything else?"
    else:
        prompt = next((str(p.content) for p in last.parts if isinstance(p, UserPromptPart)), "")
        order = re.search(r"\d+", prompt)
        if order and "refund" in prompt.lower():
            yield {0: DeltaToolCall(name="refund", json_args=f'{{"order_id": {order.group()}}}')}
            return
        if order:
            yield {0: DeltaToolCall(name="order_status", json_args=f'{{"order_id": {order.group()}}}')}
            return
        answer = "I can look up an order (give its number) or refund one. Every word here is streamed."
    for word in answer.split(" "):
        await asyncio.sleep(0.05)
        yield word + " "


_agent = Agent(
    os.environ.get("CHAT_MODEL") or FunctionModel(stream_function=_scripted, model_name="offline-desk"),
    name="support_desk",
    system_prompt="You are a support desk: look up orders, refund them when asked.",
)


@_agent.tool_plain
def order_status(order_id: int) -> str:
    """Where an order is."""
    return f"order {order_id} shipped yesterday"


@_agent.tool_plain(requires_approval=True)
def refund(order_id: int) -> str:
    """Refund an order in full (a person approves each refund first)."""
    return f"order {order_id} refunded"


desk = PrefectAgent(_agent, approvals="pause")
