"""Live streaming inside a durable run: events reach the consumer while the model step (one journaled Prefect
task) is still running, a replayed step re-emits its journaled response, and a retried stream starts new parts."""

from __future__ import annotations

import asyncio
import signal
import uuid
from collections.abc import AsyncIterable, AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from pydantic_ai import Agent
from pydantic_ai.messages import (
    AgentStreamEvent,
    ModelMessage,
    PartDeltaEvent,
    PartStartEvent,
    TextPart,
    TextPartDelta,
    ToolCallPart,
    ToolReturnPart,
)
from pydantic_ai.models.function import AgentInfo, DeltaToolCall, DeltaToolCalls, FunctionModel
from pydantic_ai.tools import RunContext

from prefect_pydantic_ai import PrefectAgent, StreamRetryEvent, TaskConfig, idempotency_key
from tests.warm import python

pytestmark = pytest.mark.anyio

SCRIPT = Path(__file__).parent / "scripts" / "streamed.py"
_GUARD = 60.0
"""Seconds before a test that would otherwise hang (the consumer never told the model) fails instead."""


def _key() -> str:
    return f"stream-{uuid.uuid4().hex[:8]}"


def _text(events: list[Any]) -> str:
    """The text the consumer was shown, part by part (`index: text`)."""
    parts: dict[int, str] = {}
    for event in events:
        if isinstance(event, PartStartEvent) and isinstance(event.part, TextPart):
            parts[event.index] = event.part.content
        elif isinstance(event, PartDeltaEvent) and isinstance(event.delta, TextPartDelta):
            parts[event.index] += event.delta.content_delta
    return " | ".join(f"{index}: {text}" for index, text in sorted(parts.items()))


async def test_streamed_text_reaches_the_handler_before_the_model_finishes() -> None:
    order: list[str] = []
    seen_first = asyncio.Event()
    requests: list[int] = []

    async def stream(messages: list[ModelMessage], info: AgentInfo) -> AsyncIterator[str]:
        requests.append(1)
        order.append("produced Hel")
        yield "Hel"
        await asyncio.wait_for(seen_first.wait(), _GUARD)  # the rest waits until the consumer saw the start
        order.append("produced lo")
        yield "lo"

    async def handler(ctx: RunContext[None], events: AsyncIterable[AgentStreamEvent]) -> None:
        async for event in events:
            if isinstance(event, PartStartEvent | PartDeltaEvent) and not seen_first.is_set():
                order.append("consumed first chunk")
                seen_first.set()

    durable = PrefectAgent(Agent(FunctionModel(stream_function=stream), name=f"live_{uuid.uuid4().hex[:6]}"))
    key = _key()
    result = await durable.run("hi", idempotency_key=key, event_stream_handler=handler)
    assert result.output == "Hello"
    assert order == ["produced Hel", "consumed first chunk", "produced lo"]

    # a re-call replays the step from the journal: the model is not asked again, the text is re-emitted at once
    replayed: list[Any] = []

    async def collect(ctx: RunContext[None], events: AsyncIterable[AgentStreamEvent]) -> None:
        replayed.extend([event async for event in events])

    again = await durable.run("hi", idempotency_key=key, event_stream_handler=collect)
    assert again.output == "Hello" and len(requests) == 1
    assert _text(replayed) == "0: Hello"


async def test_run_stream_with_an_idempotency_key_streams_live_and_replays() -> None:
    requests: list[int] = []
    seen_first = asyncio.Event()

    async def stream(messages: list[ModelMessage], info: AgentInfo) -> AsyncIterator[str]:
        requests.append(1)
        yield "one "
        await asyncio.wait_for(seen_first.wait(), _GUARD)
        yield "two"

    durable = PrefectAgent(Agent(FunctionModel(stream_function=stream), name=f"rs_{uuid.uuid4().hex[:6]}"))
    key = _key()
    chunks: list[str] = []
    async with durable.run_stream("hi", idempotency_key=key) as run:
        async for text in run.stream_text(delta=True, debounce_by=None):
            chunks.append(text)
            seen_first.set()
    assert chunks == ["one ", "two"]  # the first chunk arrived while the model still waited on it

    async with durable.run_stream("hi", idempotency_key=key) as run:
        assert await run.get_output() == "one two"
    assert len(requests) == 1


async def _events_of(durable: PrefectAgent[None, str], entry: str) -> tuple[str, list[Any]]:
    """The output of one run through `entry` (one of pydantic-ai's streaming entry points), and its events."""
    events: list[Any] = []
    if entry == "handler":

        async def handler(ctx: RunContext[None], stream_events: AsyncIterable[AgentStreamEvent]) -> None:
            events.extend([event async for event in stream_events])

        result = await durable.run("hi", idempotency_key=_key(), event_stream_handler=handler)
        return result.output, events
    if entry == "run_stream_events":
        with idempotency_key(_key()):
            async with durable.run_stream_events("hi") as stream_events:
                events.extend([event async for event in stream_events])
        return events[-1].result.output, events
    async with durable.iter("hi", idempotency_key=_key()) as run:
        async for node in run:
            if Agent.is_model_request_node(node):
                async with node.stream(run.ctx) as node_events:
                    events.extend([event async for event in node_events])
    assert run.result is not None
    return run.result.output, events


@pytest.mark.parametrize("entry", ["handler", "run_stream_events", "iter"])
async def test_a_stream_failing_midway_is_retried_in_new_parts_after_telling_the_consumer(entry: str) -> None:
    attempts: list[int] = []

    async def stream(messages: list[ModelMessage], info: AgentInfo) -> AsyncIterator[str]:
        attempts.append(1)
        yield "partial "
        if len(attempts) == 1:
            raise ConnectionError("connection reset mid-stream")
        yield "answer"

    durable = PrefectAgent(
        Agent(FunctionModel(stream_function=stream), name=f"retry_{uuid.uuid4().hex[:6]}"),
        model_task_config=TaskConfig(retries=1),
    )
    output, events = await _events_of(durable, entry)
    assert len(attempts) == 2
    assert output == "partial answer"  # the retry's text only, not "partial partial answer"
    assert _text(events) == "0: partial  | 1: partial answer"  # the retry is a new part, not more of part 0
    # and the consumer is told, before the retry's first part, that part 0 is discarded
    [retry] = [i for i, event in enumerate(events) if isinstance(event, StreamRetryEvent)]
    assert events[retry].attempt == 2 and events[retry].discarded_parts == [0]
    starts = [i for i, event in enumerate(events) if isinstance(event, PartStartEvent)]
    assert [events[i].index for i in starts] == [0, 1] and starts[0] < retry < starts[1]


async def test_tool_call_events_stream_live_and_the_tool_runs_once() -> None:
    ran: list[str] = []

    async def stream(messages: list[ModelMessage], info: AgentInfo) -> AsyncIterator[str | DeltaToolCalls]:
        if not any(isinstance(p, ToolReturnPart) for m in messages for p in m.parts):
            yield {0: DeltaToolCall(name="lookup", json_args='{"q": ')}
            yield {0: DeltaToolCall(json_args='"x"}')}
        else:
            yield "done"

    agent: Agent[None, str] = Agent(
        FunctionModel(stream_function=stream), name=f"tools_{uuid.uuid4().hex[:6]}"
    )

    @agent.tool_plain
    def lookup(q: str) -> str:
        ran.append(q)
        return "found"

    events: list[Any] = []

    async def handler(ctx: RunContext[None], stream_events: AsyncIterable[AgentStreamEvent]) -> None:
        events.extend([event async for event in stream_events])

    result = await PrefectAgent(agent).run("hi", idempotency_key=_key(), event_stream_handler=handler)
    assert result.output == "done" and ran == ["x"]
    starts = [e.part for e in events if isinstance(e, PartStartEvent)]
    assert isinstance(starts[0], ToolCallPart) and starts[0].tool_name == "lookup"
    assert sum(isinstance(e, PartDeltaEvent) for e in events) >= 1  # the arguments arrived in pieces


async def test_run_stream_events_and_iter_node_stream_are_live() -> None:
    seen_first = asyncio.Event()

    async def stream(messages: list[ModelMessage], info: AgentInfo) -> AsyncIterator[str]:
        yield "a"
        await asyncio.wait_for(seen_first.wait(), _GUARD)
        yield "b"

    agent: Agent[None, str] = Agent(FunctionModel(stream_function=stream), name=f"ev_{uuid.uuid4().hex[:6]}")
    durable = PrefectAgent(agent)
    texts: list[str] = []
    with idempotency_key(_key()):  # run_stream_events takes the key from the context
        async with durable.run_stream_events("hi") as stream_events:
            async for event in stream_events:
                if isinstance(event, PartStartEvent) and isinstance(event.part, TextPart):
                    texts.append(event.part.content)
                    seen_first.set()
    assert texts == ["a"]

    seen_first.clear()
    deltas: list[str] = []
    async with durable.iter("hi", idempotency_key=_key()) as run:
        async for node in run:
            if Agent.is_model_request_node(node):
                async with node.stream(run.ctx) as events:
                    async for event in events:
                        if isinstance(event, PartStartEvent):
                            seen_first.set()
                        elif isinstance(event, PartDeltaEvent) and isinstance(event.delta, TextPartDelta):
                            deltas.append(event.delta.content_delta)
    assert deltas == ["b"] and run.result is not None and run.result.output == "ab"


@pytest.mark.slow
def test_a_killed_streamed_run_resumes_without_re_requesting_its_streamed_steps(tmp_path: Path) -> None:
    log = tmp_path / "calls.log"
    key = _key()
    env = {"STREAMED_LOG": str(log)}
    killed = python(str(SCRIPT), key, env={**env, "STREAMED_KILL_IN_TOOL": "1"})
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    assert log.read_text().split() == ["model", "tool"]

    resumed = python(str(SCRIPT), key, env=env)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert '"the answer is 42"' in resumed.stdout
    assert log.read_text().split() == ["model", "tool", "tool", "model"]  # the streamed step 1 replayed
