"""An agent whose `send_email` tool is not idempotent (`on_unverified="fail"`), as an importable module and a script.

`send_email` appends `<to> <step idempotency key>` to $SEND_EMAIL_LOG (the "email" it sent), then SIGKILLs the
process if $SEND_EMAIL_KILL is set: the effect happened but its result was never journaled.
Run as a script: `send_email.py KEY`; it prints `OUTPUT <text>` or `ERROR <type>: <message>`.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
from pathlib import Path

from pydantic_ai import Agent
from pydantic_ai.messages import ModelMessage, ModelResponse, TextPart, ToolCallPart, ToolReturnPart
from pydantic_ai.models.function import AgentInfo, FunctionModel

from prefect_pydantic_ai import PrefectAgent, TaskConfig, step_idempotency_key


def mailer(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    returns = [p for m in messages for p in m.parts if isinstance(p, ToolReturnPart)]
    if not returns:
        return ModelResponse(parts=[ToolCallPart("send_email", {"to": "ops@example.com"})])
    return ModelResponse(parts=[TextPart(f"send_email said: {returns[0].content}")])


agent = Agent(FunctionModel(mailer), name="mailer")


@agent.tool_plain
def send_email(to: str) -> str:
    """Send the report by email."""
    with Path(os.environ["SEND_EMAIL_LOG"]).open("a") as f:
        f.write(f"{to} {step_idempotency_key()}\n")
        f.flush()
        os.fsync(f.fileno())
    if os.environ.get("SEND_EMAIL_KILL"):
        os.kill(os.getpid(), signal.SIGKILL)
    return f"sent to {to}"


durable = PrefectAgent(agent, tool_task_config_by_name={"send_email": TaskConfig(on_unverified="fail")})

if __name__ == "__main__":
    try:
        result = asyncio.run(durable.run("Email the report", idempotency_key=sys.argv[1]))
    except Exception as exc:
        print(f"ERROR {type(exc).__name__}: {exc}")
        sys.exit(1)
    print(f"OUTPUT {result.output}")
