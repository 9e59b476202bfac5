"""The seed's research → summaries pattern as a user @flow with two agents, for kill-and-resume tests.

Calls are logged to $TWO_AGENTS_LOG; $TWO_AGENTS_KILL_AT=<call name> SIGKILLs the process when that call starts
for the first time (the summary agent's `draft` tool, say); $TWO_AGENTS_SUFFIX is appended to both agents' names
(`researcher`, `summarizer`), so a test that lists runs by agent sees only its own; $TWO_AGENTS_SYNC=1 runs the
synchronous flow. Run as a script: `two_agents_flow.py TOPIC`.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

from prefect import flow
from pydantic import BaseModel
from pydantic_ai import Agent, RunContext
from pydantic_ai.messages import ModelMessage, ModelResponse, ToolCallPart, ToolReturnPart
from pydantic_ai.models.function import AgentInfo, FunctionModel

from prefect_pydantic_ai import PrefectAgent


class ResearchFindings(BaseModel):
    summary: str
    key_points: list[str]


class AudienceSummaries(BaseModel):
    technical: str
    executive: str


def _call(name: str) -> None:
    log = Path(os.environ["TWO_AGENTS_LOG"])
    seen = log.read_text().splitlines() if log.exists() else []
    with log.open("a") as f:
        f.write(name + "\n")
        f.flush()
        os.fsync(f.fileno())
    if os.environ.get("TWO_AGENTS_KILL_AT") == name and name not in seen:
        os.kill(os.getpid(), signal.SIGKILL)


def _returns(messages: list[ModelMessage]) -> list[ToolReturnPart]:
    return [p for m in messages for p in m.parts if isinstance(p, ToolReturnPart)]


def research_model(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    _call("research:model")
    done = _returns(messages)
    if not done:
        return ModelResponse(parts=[ToolCallPart("search", {"query": "durable agents"})])
    points = done[0].content
    findings = {"summary": f"{len(points)} findings", "key_points": points}
    return ModelResponse(parts=[ToolCallPart(info.output_tools[0].name, findings)])


def summary_model(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    _call("summary:model")
    done = _returns(messages)
    if not done:
        return ModelResponse(parts=[ToolCallPart("draft", {"audience": "technical"})])
    draft = str(done[0].content)
    out = {"technical": draft, "executive": draft.upper()}
    return ModelResponse(parts=[ToolCallPart(info.output_tools[0].name, out)])


SUFFIX = os.environ.get("TWO_AGENTS_SUFFIX", "")
research = Agent(FunctionModel(research_model), name=f"researcher{SUFFIX}", output_type=ResearchFindings)
summarizer = Agent(
    FunctionModel(summary_model),
    name=f"summarizer{SUFFIX}",
    output_type=AudienceSummaries,
    deps_type=ResearchFindings,
)


@research.tool_plain
def search(query: str) -> list[str]:
    _call("research:search")
    return [f"{query}: resume from the journal", f"{query}: never pay twice"]


@summarizer.tool
def draft(ctx: RunContext[ResearchFindings], audience: str) -> str:
    _call("summary:draft")
    return f"{audience}: " + "; ".join(ctx.deps.key_points)


research_agent = PrefectAgent(research)
summary_agent = PrefectAgent(summarizer)


@flow(name="research-and-summarize")
async def research_and_summarize(topic: str) -> dict[str, str]:
    findings = await research_agent.run(f"Research {topic}")
    summaries = await summary_agent.run("Summarize for each audience", deps=findings.output)
    return dict(summaries.output.model_dump())


@flow(name="research-and-summarize-sync")
def research_and_summarize_sync(topic: str) -> dict[str, str]:
    """The same flow written the way most Prefect flows are: a plain `def` with `run_sync`."""
    findings = research_agent.run_sync(f"Research {topic}")
    summaries = summary_agent.run_sync("Summarize for each audience", deps=findings.output)
    return dict(summaries.output.model_dump())


if __name__ == "__main__":
    import asyncio

    if os.environ.get("TWO_AGENTS_SYNC"):
        print("OUTPUT " + json.dumps(research_and_summarize_sync(sys.argv[1])))
    else:
        print("OUTPUT " + json.dumps(asyncio.run(research_and_summarize(sys.argv[1]))))
