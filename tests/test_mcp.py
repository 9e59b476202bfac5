"""MCP tool calls are durable steps like any other tool: a `tool: <name>` task, journaled, never re-sent on resume.

The MCP server is a real stdio subprocess (FastMCP) that logs every call it serves, so the log counts what
really reached the server across attempts.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest
from fastmcp.client.transports import PythonStdioTransport
from pydantic_ai import Agent
from pydantic_ai.mcp import MCPToolset
from pydantic_ai.messages import ModelMessage, ModelResponse, TextPart, ToolCallPart, ToolReturnPart
from pydantic_ai.models.function import AgentInfo, FunctionModel

from prefect_pydantic_ai import PrefectAgent, TaskConfig, show_run
from prefect_pydantic_ai.testing import CallLog

pytestmark = [pytest.mark.slow, pytest.mark.anyio]  # starts processes

SERVER = Path(__file__).parent / "scripts" / "mcp_inventory.py"


def inventory_agent(log: Path, model_calls: list[int], *, fail_final_once: bool) -> PrefectAgent[None, str]:
    """Model: ask the MCP tool `stock` for two SKUs (one call each), then answer from both results."""

    def script(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        model_calls.append(1)
        returns = [str(p.content) for m in messages for p in m.parts if isinstance(p, ToolReturnPart)]
        if len(returns) < 2:
            assert "stock" in [t.name for t in info.function_tools], "the MCP tool was not offered"
            sku = ["A-1", "BB-22"][len(returns)]
            return ModelResponse(parts=[ToolCallPart("stock", {"sku": sku})])
        if fail_final_once and len(model_calls) == 3:
            raise ConnectionError("injected: the model API went away")
        return ModelResponse(parts=[TextPart(" / ".join(returns))])

    # init_timeout: the server's start (a Python process importing fastmcp) can take seconds on a busy machine
    toolset = MCPToolset(PythonStdioTransport(SERVER, env={"MCP_CALL_LOG": str(log)}), init_timeout=60)
    agent: Agent[None, str] = Agent(FunctionModel(script), toolsets=[toolset], name="mcp_inventory")
    return PrefectAgent(agent, model_task_config=TaskConfig(retries=0))


async def test_mcp_tool_calls_are_tool_tasks_and_replay_without_reaching_the_server(tmp_path: Path) -> None:
    log = tmp_path / "mcp-calls.jsonl"
    model_calls: list[int] = []
    durable = inventory_agent(log, model_calls, fail_final_once=True)
    key = f"mcp-{uuid.uuid4().hex[:8]}"

    with pytest.raises(ConnectionError, match="injected"):
        await durable.run("Check stock of A-1 and BB-22", idempotency_key=key)
    assert CallLog(log).counts() == {"stock": 2}

    result: Any = await durable.run("Check stock of A-1 and BB-22", idempotency_key=key)
    assert result.output == "A-1: 9 in stock / BB-22: 15 in stock"
    assert CallLog(log).counts() == {"stock": 2}  # both MCP calls replayed from the journal
    assert len(model_calls) == 4  # 3 in the first attempt (the last failed), then only the final request
    assert result.usage.tool_calls == 2

    detail = await show_run(key)
    assert [(s.kind, s.name, s.status) for s in detail.steps] == [
        ("model", "function:script:", "replayed"),
        ("tool", "stock", "replayed"),
        ("model", "function:script:", "replayed"),
        ("tool", "stock", "replayed"),
        ("model", "function:script:", "executed"),
    ]
