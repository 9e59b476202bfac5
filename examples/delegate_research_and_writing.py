"""Pattern 5: agent delegation, a coordinator whose tools run other durable agents.

An editor agent answers a brief by delegating: its `research` tool runs the research agent of pattern 2 and
returns its `ResearchFindings`, its `write` tool runs the summary agent on those findings and returns
`AudienceSummaries`, which the editor hands back. Each sub-agent run is keyed under the editor's tool step that
started it, and each of its steps is journaled the moment it completes, so when a sub-agent fails or its process
dies, the retried tool step (or the resumed run) replays what the sub-agent had done and continues. The editor's
ledger includes both sub-agents' usage (`ledger.sub_agents` says how much). Run it with::

    python -m examples.delegate_research_and_writing [--topic TOPIC] [--notes DIR] [--model MODEL]

Without ``--model`` the three agents run on scripted offline policies (not LLMs) that derive every answer from
the request and the tool results.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import Any

from prefect import flow
from pydantic import TypeAdapter
from pydantic_ai import Agent, RunContext
from pydantic_ai.messages import ModelMessage, ModelResponse, ToolCallPart
from pydantic_ai.models import Model
from pydantic_ai.models.function import AgentInfo, FunctionModel

from examples import fault_injection
from examples.research_and_summarize import (
    DEFAULT_TOPIC,
    AudienceSummaries,
    KnowledgeBase,
    ResearchFindings,
    builtin_notes,
    load_notes,
    researcher,
    summarizer,
    tool_results,
    user_prompt,
)
from prefect_pydantic_ai import PrefectAgent, TaskConfig, ledger_of

__all__ = ["Brief", "build_editor_agent", "delegate_research_and_writing", "editor", "main"]


class Brief(KnowledgeBase):
    """The editor's deps: the notes its researcher may use, and the model the sub-agents run on."""

    model: str | None = None


EDITOR_INSTRUCTIONS = (
    "You answer a brief by delegating. Call research with the topic, then write with the findings it returned, "
    "then answer with the summaries write returned, unchanged."
)


async def research(ctx: RunContext[Brief], topic: str) -> ResearchFindings:
    """Have the research agent research `topic` in the notes; returns its validated findings."""
    knowledge = KnowledgeBase(notes=ctx.deps.notes)
    result = await researcher.run(
        f"Research {topic}",
        deps=knowledge,
        model=ctx.deps.model,
        capabilities=fault_injection(researcher.name),
    )
    findings: ResearchFindings = result.output
    return findings


async def write(ctx: RunContext[Brief], findings: ResearchFindings) -> AudienceSummaries:
    """Have the summary agent write `findings` up for technical, executive and general readers."""
    result = await summarizer.run(
        "Summarise the findings for technical, executive and general audiences.",
        deps=findings,
        model=ctx.deps.model,
        capabilities=fault_injection(summarizer.name),
    )
    summaries: AudienceSummaries = result.output
    return summaries


def build_editor_agent(model: Model | str | None = None) -> Agent[Brief, AudienceSummaries]:
    """The editor; `model=None` uses the scripted offline editor."""
    return Agent(
        FunctionModel(_editor_policy, model_name="offline-editor (scripted)") if model is None else model,
        name="editor",
        deps_type=Brief,
        output_type=AudienceSummaries,
        instructions=EDITOR_INSTRUCTIONS,
        tools=[research, write],
        retries=2,
    )


_FINDINGS = TypeAdapter(ResearchFindings)
_SUMMARIES = TypeAdapter(AudienceSummaries)


def _editor_policy(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    """Research the brief's topic, have the findings written up, hand the write-up back."""
    findings = tool_results(messages, "research", _FINDINGS)
    if not findings:
        topic = user_prompt(messages).removeprefix("Brief: ").strip()
        return ModelResponse(parts=[ToolCallPart("research", {"topic": topic})])
    written = tool_results(messages, "write", _SUMMARIES)
    if not written:
        return ModelResponse(parts=[ToolCallPart("write", {"findings": findings[-1].model_dump()})])
    output: dict[str, Any] = written[-1].model_dump()
    return ModelResponse(parts=[ToolCallPart(info.output_tools[0].name, output)])


editor = PrefectAgent(
    build_editor_agent(),
    model_task_config=TaskConfig(retries=3, retry_delay_seconds=[1.0, 2.0, 4.0], timeout_seconds=60.0),
    # A failed delegation is retried as a whole step: the sub-agent replays what it completed and continues.
    tool_task_config=TaskConfig(retries=1, retry_delay_seconds=1.0),
)


@flow(name="delegate-research-and-writing", retries=1, retry_delay_seconds=1)
async def delegate_research_and_writing(
    topic: str = DEFAULT_TOPIC, notes_dir: str | None = None, model: str | None = None
) -> AudienceSummaries:
    """Have the editor research `topic` (in the built-in notes by default) and write it up for three audiences."""
    knowledge = builtin_notes() if notes_dir is None else load_notes(notes_dir)
    result = await editor.run(
        f"Brief: {topic}",
        deps=Brief(notes=knowledge.notes, model=model),
        model=model,
        capabilities=fault_injection(editor.name),
    )
    ledger = ledger_of(result)
    if ledger is not None:
        for path, part in sorted(ledger.sub_agents.items()):
            print(f"{path}: {part.spent.model_calls} model calls executed, {part.saved.model_calls} replayed")
    summaries: AudienceSummaries = result.output
    return summaries


def main(argv: list[str] | None = None) -> int:
    """Delegate the research and the write-up of a topic, and print the three summaries."""
    parser = argparse.ArgumentParser(
        prog="python -m examples.delegate_research_and_writing", description=__doc__
    )
    parser.add_argument(
        "--topic", default=DEFAULT_TOPIC, help=f"what to research (default: {DEFAULT_TOPIC!r})"
    )
    parser.add_argument(
        "--notes", metavar="DIR", help="directory of .md/.txt notes (default: built-in notes)"
    )
    parser.add_argument("--model", help="pydantic-ai model string, e.g. openai:gpt-4o (default: offline)")
    args = parser.parse_args(argv)
    summaries = asyncio.run(
        delegate_research_and_writing(topic=args.topic, notes_dir=args.notes, model=args.model)
    )
    for audience, text in summaries.model_dump().items():
        print(f"{audience}:\n  {text}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
