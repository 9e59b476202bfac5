"""A stdio MCP server for the MCP tests: `stock(sku)` logs every call it serves to $MCP_CALL_LOG."""

from __future__ import annotations

import os

from fastmcp import FastMCP

from prefect_pydantic_ai.testing import CallLog

server = FastMCP("inventory")


@server.tool
def stock(sku: str) -> str:
    """How many items of a SKU are in stock."""
    CallLog(os.environ["MCP_CALL_LOG"]).record("stock", {"sku": sku})
    return f"{sku}: {len(sku) * 3} in stock"


if __name__ == "__main__":
    server.run(show_banner=False)
