"""Pattern 2: agents in sequence with a typed hand-off.

A research agent searches and reads notes in a knowledge base and returns validated `ResearchFindings`; they are
the ``deps`` of a summary agent, which writes `AudienceSummaries` for technical, executive and general readers.
Both agents' model requests and tool calls are tasks of the flow run, so when the summary agent fails, the
flow's retry replays the research agent from the journal and executes nothing of it again. Run it with::

    python -m examples.research_and_summarize [--topic TOPIC] [--notes DIR] [--model MODEL]

Without ``--model`` both agents run on scripted offline policies (not LLMs) that derive every answer from the
request and the tool results; ``--notes`` researches the ``.md``/``.txt`` files of a directory instead of the
built-in notes.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import sys
from pathlib import Path
from typing import Any, TypeVar

from prefect import flow
from pydantic import BaseModel, Field, TypeAdapter
from pydantic_ai import Agent, ModelRetry, RunContext
from pydantic_ai.messages import (
    BaseToolReturnPart,
    ModelMessage,
    ModelRequest,
    ModelResponse,
    ModelResponsePart,
    ToolCallPart,
    UserPromptPart,
)
from pydantic_ai.models import Model
from pydantic_ai.models.function import AgentInfo, FunctionModel
from pydantic_core import to_jsonable_python

from examples import fault_injection
from prefect_pydantic_ai import PrefectAgent, TaskConfig

__all__ = [
    "DEFAULT_TOPIC",
    "AudienceSummaries",
    "KnowledgeBase",
    "Note",
    "NoteHit",
    "ResearchFindings",
    "builtin_notes",
    "load_notes",
    "main",
    "research_and_summarize",
    "researcher",
    "summarizer",
    "tool_results",
    "user_prompt",
]

DEFAULT_TOPIC = "durable execution for AI agents"


class Note(BaseModel):
    """One note of the knowledge base; `id` is what findings cite as a source."""

    id: str
    title: str
    text: str


class KnowledgeBase(BaseModel):
    """The research agent's deps: the notes it may search and cite."""

    notes: list[Note]


class NoteHit(BaseModel):
    """A search result: which note, and how many query terms it contains."""

    id: str
    title: str
    score: int


class ResearchFindings(BaseModel):
    """What the research agent hands to the summary agent."""

    summary: str = Field(description="A short paragraph answering the research request.")
    key_points: list[str] = Field(min_length=1, description="One point per source, each a full sentence.")
    sources: list[str] = Field(min_length=1, description="Ids of the notes the findings rest on.")


class AudienceSummaries(BaseModel):
    """The findings rewritten for three audiences."""

    technical: str = Field(description="For engineers: every key point, with sources.")
    executive: str = Field(description="For decision makers: the bottom line in two sentences.")
    general: str = Field(description="For anyone: one plain sentence.")


_NOTES = [
    Note(
        id="durable-execution",
        title="Durable execution",
        text="Durable execution records the result of every completed step of a workflow, so a failed run "
        "resumes from the failed step instead of starting over. For AI agents the steps are model requests "
        "and tool calls, which are slow and cost money to repeat.",
    ),
    Note(
        id="agent-failure-modes",
        title="How AI agent runs fail",
        text="AI agent runs fail midway on rate limits, timeouts, network errors and invalid model output. "
        "Without durable execution every failure means paying again for each model request made before it.",
    ),
    Note(
        id="retry-policies",
        title="Retry policies",
        text="Retries with exponential backoff absorb transient failures of a single step, such as an AI model "
        "request hitting a rate limit. Model requests and tool calls deserve separate retry policies because "
        "they fail for different reasons.",
    ),
    Note(
        id="structured-output",
        title="Structured output",
        text="Validating model output against a schema turns free text into typed data that the next step of a "
        "workflow can rely on. Invalid output is sent back to the model for a retry before it reaches any "
        "downstream step.",
    ),
    Note(
        id="vector-search",
        title="Vector search",
        text="Vector databases index embeddings so that similar documents can be found by meaning. They power "
        "retrieval-augmented generation.",
    ),
]


def builtin_notes() -> KnowledgeBase:
    """The notes researched when no directory is given."""
    return KnowledgeBase(notes=list(_NOTES))


def load_notes(directory: str | Path) -> KnowledgeBase:
    """Read every ``.md``/``.txt`` file of `directory` as a note: its first line is the title."""
    files = sorted(p for p in Path(directory).iterdir() if p.suffix in {".md", ".txt"} and p.is_file())
    notes = []
    for file in files:
        title, _, body = file.read_text(encoding="utf-8").strip().partition("\n")
        notes.append(Note(id=file.name, title=title.lstrip("# ").strip(), text=body.strip() or title))
    if not notes:
        raise ValueError(f"{directory} has no .md or .txt notes to research.")
    return KnowledgeBase(notes=notes)


# -- the research agent --------------------------------------------------------------------------------------

_STOPWORDS = frozenset(
    {"a", "an", "and", "are", "for", "how", "in", "is", "it", "of", "on", "or", "the", "to"}
)


def _terms(text: str) -> set[str]:
    return {word for word in re.findall(r"[a-z0-9]+", text.lower()) if word not in _STOPWORDS}


def search_notes(ctx: RunContext[KnowledgeBase], query: str, limit: int = 3) -> list[NoteHit]:
    """Find the notes sharing the most words with `query`, best first.

    Args:
        query: What to look for, in plain words.
        limit: The most notes to return.
    """
    wanted = _terms(query)
    hits = [
        NoteHit(id=note.id, title=note.title, score=len(wanted & _terms(f"{note.title} {note.text}")))
        for note in ctx.deps.notes
    ]
    ranked = sorted((hit for hit in hits if hit.score > 0), key=lambda hit: -hit.score)
    return ranked[:limit]


def read_note(ctx: RunContext[KnowledgeBase], note_id: str) -> Note:
    """Read the full note `note_id` (an id returned by search_notes)."""
    for note in ctx.deps.notes:
        if note.id == note_id:
            return note
    raise ModelRetry(f"There is no note {note_id!r}; use an id returned by search_notes.")


RESEARCH_INSTRUCTIONS = (
    "You research a request in a knowledge base of notes. Call search_notes with the request's key words, "
    "read_note on the relevant hits, then answer with ResearchFindings built only from the notes you read: "
    "cite their ids as sources."
)


def build_research_agent(model: Model | str | None = None) -> Agent[KnowledgeBase, ResearchFindings]:
    """The research agent; `model=None` uses the scripted offline researcher."""
    agent = Agent(
        FunctionModel(_research_policy, model_name="offline-researcher (scripted)")
        if model is None
        else model,
        name="researcher",
        deps_type=KnowledgeBase,
        output_type=ResearchFindings,
        instructions=RESEARCH_INSTRUCTIONS,
        tools=[search_notes, read_note],
        retries=2,
    )

    @agent.output_validator
    def cite_real_notes(ctx: RunContext[KnowledgeBase], findings: ResearchFindings) -> ResearchFindings:
        known = {note.id for note in ctx.deps.notes}
        unknown = [source for source in findings.sources if source not in known]
        if unknown:
            raise ModelRetry(f"Sources {unknown} are not notes of the knowledge base; cite note ids only.")
        return findings

    return agent


# -- the summary agent ---------------------------------------------------------------------------------------


def get_findings(ctx: RunContext[ResearchFindings]) -> ResearchFindings:
    """The research findings to summarise."""
    return ctx.deps


SUMMARY_INSTRUCTIONS = (
    "Call get_findings, then summarise them for three audiences: technical (every key point, with sources), "
    "executive (the bottom line) and general (one plain sentence). Add nothing the findings do not say."
)


def build_summary_agent(model: Model | str | None = None) -> Agent[ResearchFindings, AudienceSummaries]:
    """The summary agent, whose deps are the research findings; `model=None` uses the scripted summariser."""
    return Agent(
        FunctionModel(_summary_policy, model_name="offline-summarizer (scripted)")
        if model is None
        else model,
        name="summarizer",
        deps_type=ResearchFindings,
        output_type=AudienceSummaries,
        instructions=SUMMARY_INSTRUCTIONS,
        tools=[get_findings],
        retries=2,
    )


# -- the scripted offline policies: they read only the messages and tool definitions a model receives ---------

_T = TypeVar("_T")


def user_prompt(messages: list[ModelMessage]) -> str:
    """The text of the run's first user prompt."""
    return next(
        part.content
        for message in messages
        if isinstance(message, ModelRequest)
        for part in message.parts
        if isinstance(part, UserPromptPart) and isinstance(part.content, str)
    )


def tool_results(messages: list[ModelMessage], tool: str, adapter: TypeAdapter[_T]) -> list[_T]:
    """The successful results of `tool`, in call order."""
    calls = [
        part.tool_call_id
        for message in messages
        if isinstance(message, ModelResponse)
        for part in message.parts
        if isinstance(part, ToolCallPart) and part.tool_name == tool
    ]
    returns = {
        part.tool_call_id: part
        for message in messages
        if isinstance(message, ModelRequest)
        for part in message.parts
        if isinstance(part, BaseToolReturnPart) and part.outcome == "success"
    }
    return [
        adapter.validate_python(to_jsonable_python(returns[call].content))
        for call in calls
        if call in returns
    ]


def _answer(info: AgentInfo, output: dict[str, Any]) -> ModelResponse:
    return ModelResponse(parts=[ToolCallPart(info.output_tools[0].name, output)])


def _first_sentence(text: str) -> str:
    return re.split(r"(?<=[.!?])\s", text.strip(), maxsplit=1)[0]


_HITS = TypeAdapter(list[NoteHit])
_NOTE = TypeAdapter(Note)
_FINDINGS = TypeAdapter(ResearchFindings)


def _research_policy(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    """Search with the request's words, read every hit, then cite what was read."""
    searches = tool_results(messages, "search_notes", _HITS)
    if not searches:
        query = re.sub(r"^\s*research\s+", "", user_prompt(messages), flags=re.IGNORECASE)
        return ModelResponse(parts=[ToolCallPart("search_notes", {"query": query})])
    hits = searches[-1]
    read = {note.id: note for note in tool_results(messages, "read_note", _NOTE)}
    unread: list[ModelResponsePart] = [
        ToolCallPart("read_note", {"note_id": hit.id}) for hit in hits if hit.id not in read
    ]
    if unread:
        return ModelResponse(parts=unread)
    notes = [read[hit.id] for hit in hits]
    points = [_first_sentence(note.text) for note in notes]
    summary = " ".join(points[:2])
    if notes:
        summary += f" (Notes read: {', '.join(note.title for note in notes)}.)"
    # Written as JSON, like a model would: with no hits the lists are empty and the agent's validation objects.
    return _answer(info, {"summary": summary, "key_points": points, "sources": [note.id for note in notes]})


def _summary_policy(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    """Fetch the findings, then rewrite them at three levels of detail."""
    fetched = tool_results(messages, "get_findings", _FINDINGS)
    if not fetched:
        return ModelResponse(parts=[ToolCallPart("get_findings", {})])
    findings = fetched[-1]
    lead = _first_sentence(findings.summary)
    technical = " ".join(findings.key_points) + f" Sources: {', '.join(findings.sources)}."
    executive = (
        f"Bottom line: {lead} ({len(findings.key_points)} key points from {len(findings.sources)} sources.)"
    )
    return _answer(info, {"technical": technical, "executive": executive, "general": lead})


researcher = PrefectAgent(
    build_research_agent(),
    model_task_config=TaskConfig(retries=3, retry_delay_seconds=[1.0, 2.0, 4.0], timeout_seconds=60.0),
    tool_task_config=TaskConfig(retries=2, retry_delay_seconds=[0.5, 1.0]),
)
summarizer = PrefectAgent(
    build_summary_agent(),
    model_task_config=TaskConfig(retries=3, retry_delay_seconds=[1.0, 2.0, 4.0], timeout_seconds=60.0),
    tool_task_config=TaskConfig(retries=2, retry_delay_seconds=[0.5, 1.0]),
)


@flow(name="research-and-summarize", retries=1, retry_delay_seconds=1)
async def research_and_summarize(
    topic: str = DEFAULT_TOPIC, notes_dir: str | None = None, model: str | None = None
) -> AudienceSummaries:
    """Research `topic` in the notes (default: built-in), then summarise the findings for three audiences."""
    knowledge = builtin_notes() if notes_dir is None else load_notes(notes_dir)
    research = await researcher.run(
        f"Research {topic}", deps=knowledge, model=model, capabilities=fault_injection(researcher.name)
    )
    findings: ResearchFindings = research.output
    summary = await summarizer.run(
        "Summarise the findings for technical, executive and general audiences.",
        deps=findings,
        model=model,
        capabilities=fault_injection(summarizer.name),
    )
    summaries: AudienceSummaries = summary.output
    return summaries


def main(argv: list[str] | None = None) -> int:
    """Research a topic, summarise it, and print the three summaries."""
    parser = argparse.ArgumentParser(prog="python -m examples.research_and_summarize", description=__doc__)
    parser.add_argument(
        "--topic", default=DEFAULT_TOPIC, help=f"what to research (default: {DEFAULT_TOPIC!r})"
    )
    parser.add_argument(
        "--notes", metavar="DIR", help="directory of .md/.txt notes (default: built-in notes)"
    )
    parser.add_argument("--model", help="pydantic-ai model string, e.g. openai:gpt-4o (default: offline)")
    args = parser.parse_args(argv)
    summaries = asyncio.run(research_and_summarize(topic=args.topic, notes_dir=args.notes, model=args.model))
    for audience, text in summaries.model_dump().items():
        print(f"{audience}:\n  {text}\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
