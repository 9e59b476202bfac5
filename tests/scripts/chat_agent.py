"""The agent the chat backend's tests serve (`prefect-pydantic-ai web tests/scripts/chat_agent.py:agent`): a
support desk on the loopback OpenAI server at $CHAT_OPENAI_URL, with `order_status` (runs freely) and `refund`
(needs approval). Every tool call is counted in $CHAT_CALLS (a CallLog); model calls are counted at the server.
"""

from __future__ import annotations

import os

from openai import AsyncOpenAI
from pydantic_ai import Agent
from pydantic_ai.models.openai import OpenAIChatModel
from pydantic_ai.providers.openai import OpenAIProvider

from prefect_pydantic_ai import PrefectAgent
from prefect_pydantic_ai.testing import CallLog

_client = AsyncOpenAI(base_url=os.environ["CHAT_OPENAI_URL"], api_key="loopback", max_retries=0)
_desk = Agent(OpenAIChatModel("gpt-4o", provider=OpenAIProvider(openai_client=_client)), name="chat_desk")


@_desk.tool_plain
def order_status(order_id: int) -> str:
    """Where an order is."""
    CallLog(os.environ["CHAT_CALLS"]).record("order_status", order_id)
    return f"order {order_id} shipped"


@_desk.tool_plain(requires_approval=True)
def refund(order_id: int) -> str:
    """Refund an order (a person approves it first)."""
    CallLog(os.environ["CHAT_CALLS"]).record("refund", order_id)
    return f"order {order_id} refunded"


agent = PrefectAgent(_desk, approvals="pause", approval_timeout_seconds=600)
