"""Durable streaming through real HTTP: pydantic-ai's OpenAI client against `LoopbackOpenAI`, whose streamed
replies reach the socket in the writes of one `Chunking` (one event per write, all at once, random cuts, cuts
inside a UTF-8 character or inside a tool call's arguments). Every streaming entry point of the durable agent
yields, element by element, what the plain agent yields for the same replies, and sends the same requests.

A stream that fails midway and is retried cannot match a plain agent (which fails); there the durable consumer
sees what the plain agent saw of the failed stream, then a `StreamRetryEvent`, the discarded part's end, and the
plain agent's events of the retried reply in new parts (README, "Streaming is live")."""

from __future__ import annotations

import dataclasses
import logging
import uuid
from collections.abc import AsyncIterable, Iterator
from typing import Any

import pytest
from prefect import flow
from pydantic import BaseModel
from pydantic_ai import Agent
from pydantic_ai.exceptions import ModelConnectionError
from pydantic_ai.messages import (
    AgentStreamEvent,
    FinalResultEvent,
    PartDeltaEvent,
    PartEndEvent,
    PartStartEvent,
    TextPart,
)
from pydantic_ai.run import AgentRunResultEvent
from pydantic_ai.tools import RunContext

from prefect_pydantic_ai import PrefectAgent, StreamRetryEvent, TaskConfig, idempotency_key
from prefect_pydantic_ai.testing import Chunking, LoopbackOpenAI, TextReply

pytestmark = pytest.mark.anyio

TEXT = "The capital of México is Ciudad de México 🌮."
"""Eight words, so eight text deltas; 'é' and '🌮' are two and four bytes in UTF-8."""

CHUNKINGS = {
    "per_event": Chunking("per_event"),
    "burst": Chunking("burst"),
    "random": Chunking("random", seed=27),
    "inside_utf8": Chunking("inside_utf8"),
    "inside_tool_args": Chunking("inside_tool_args"),
}
ENTRIES = ["stream_text", "stream_text_delta", "stream_output", "stream_response", "run_stream_events"]
ENTRIES += ["event_stream_handler", "iter_node_stream"]
TEXT_ONLY = frozenset({"stream_text", "stream_text_delta", "stream_response"})
RETRIED = ["run_stream_events", "event_stream_handler", "iter_node_stream"]
"""The consumers that see a retry as events (`StreamRetryEvent`)."""
VOLATILE = frozenset({"timestamp", "tool_call_id", "provider_response_id", "run_id"})
"""Fields that differ between any two runs (the server numbers tool calls across runs)."""


class City(BaseModel):
    name: str
    population: int


CITY = City(name="Ciudad de México", population=9209944)


@pytest.fixture(scope="module")
def server() -> Iterator[LoopbackOpenAI]:
    with LoopbackOpenAI() as running:
        yield running


@pytest.fixture(params=list(CHUNKINGS))
def chunked(request: pytest.FixtureRequest, server: LoopbackOpenAI) -> LoopbackOpenAI:
    server.chunking = CHUNKINGS[request.param]
    return server


def _agent(server: LoopbackOpenAI, output_type: Any = str) -> Agent[None, Any]:
    agent: Agent[None, Any] = Agent(
        server.openai_model(), name=f"http_{uuid.uuid4().hex[:8]}", output_type=output_type
    )

    @agent.tool_plain
    def population(city: str) -> str:
        return f"{city}: 9209944"

    return agent


def _script(server: LoopbackOpenAI, entry: str) -> int:
    """One run's replies: a tool call with non-ASCII arguments (not for `stream_text*`, `stream_response`:
    `run_stream` streams only the answer), then the answer (text, or a City). Returns how many they are."""
    if entry not in TEXT_ONLY:
        server.reply_tool_calls([("population", {"city": "Ciudad de México"})], usage=(20, 9))
    if entry == "stream_output":
        server.reply_json(CITY.model_dump(), usage=(30, 12))
    else:
        server.reply_text(TEXT, usage=(30, 8))
    return 1 if entry in TEXT_ONLY else 2


def shape(value: Any) -> Any:
    """`value` as comparable data: dataclasses (events, parts, deltas) as their type and fields, without the
    fields that differ between any two runs; a run's result as its output."""
    if isinstance(value, AgentRunResultEvent):
        return ("AgentRunResultEvent", shape(value.result.output))
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        fields = {f.name: shape(getattr(value, f.name)) for f in dataclasses.fields(value)}
        return (type(value).__name__, {k: v for k, v in fields.items() if k not in VOLATILE})
    if isinstance(value, list | tuple):
        return [shape(item) for item in value]
    if isinstance(value, dict):
        return {k: shape(v) for k, v in value.items()}
    if isinstance(value, BaseModel):
        return value.model_dump()
    return value


async def _streamed(agent: Agent[None, Any] | PrefectAgent[None, Any], entry: str) -> list[Any]:
    """What the consumer of `entry` is given, in order, and finally the run's output."""
    seen: list[Any] = []
    with idempotency_key(f"http-{uuid.uuid4().hex[:8]}"):  # the plain agent ignores it
        if entry == "event_stream_handler":

            async def handler(ctx: RunContext[None], events: AsyncIterable[AgentStreamEvent]) -> None:
                seen.extend([event async for event in events])

            result = await agent.run("capital?", event_stream_handler=handler)
            return [*seen, result.output]
        if entry == "run_stream_events":
            async with agent.run_stream_events("capital?") as events:
                seen.extend([event async for event in events])
            return seen
        if entry == "iter_node_stream":
            async with agent.iter("capital?") as run:
                async for node in run:
                    if Agent.is_model_request_node(node) or Agent.is_call_tools_node(node):
                        async with node.stream(run.ctx) as events:
                            seen.extend([event async for event in events])
            assert run.result is not None
            return [*seen, run.result.output]
        async with agent.run_stream("capital?") as stream:
            if entry == "stream_text":
                seen.extend([text async for text in stream.stream_text(debounce_by=None)])
            elif entry == "stream_text_delta":
                seen.extend([text async for text in stream.stream_text(delta=True, debounce_by=None)])
            elif entry == "stream_output":
                seen.extend([output async for output in stream.stream_output(debounce_by=None)])
            else:
                seen.extend([(r.parts, r.state) async for r in stream.stream_response(debounce_by=None)])
            return [*seen, await stream.get_output()]


async def _plain_and_durable(server: LoopbackOpenAI, entry: str) -> tuple[list[Any], list[Any]]:
    """The elements `entry` gives a plain agent, then the same agent made durable; each run sends the
    requests of its script, no more."""
    agent = _agent(server, City if entry == "stream_output" else str)
    elements = []
    for form in (agent, PrefectAgent(agent)):
        requests, before = _script(server, entry), server.request_count
        elements.append(await _streamed(form, entry))
        assert (server.request_count - before, server.pending) == (requests, 0), entry
    plain, durable = elements
    last = durable[-1].result.output if entry == "run_stream_events" else durable[-1]
    assert last == (CITY if entry == "stream_output" else TEXT), entry
    assert len(plain) > 3, entry  # it streamed: several elements before the output
    return plain, durable


async def test_every_entry_point_streams_what_the_plain_agent_streams_for_every_chunking(
    chunked: LoopbackOpenAI,
) -> None:
    @flow
    async def streams() -> dict[str, tuple[list[Any], list[Any]]]:  # one flow run: a bare run costs 0.3 s
        return {entry: await _plain_and_durable(chunked, entry) for entry in ENTRIES}

    compared = await streams()
    assert {entry: shape(durable) for entry, (_, durable) in compared.items()} == {
        entry: shape(plain) for entry, (plain, _) in compared.items()
    }


@pytest.mark.parametrize("entry", ["stream_text", "event_stream_handler"])
async def test_a_bare_run_streams_a_burst_of_deltas_as_the_plain_agent_does(
    server: LoopbackOpenAI, entry: str
) -> None:
    server.chunking = CHUNKINGS["burst"]  # the provider's deltas are parsed at once: the step runs ahead
    plain, durable = await _plain_and_durable(server, entry)
    assert shape(durable) == shape(plain)


CUT_AFTER = 3
PARTIAL = "The capital of"


async def _retried(server: LoopbackOpenAI, entry: str) -> tuple[list[Any], list[Any], list[Any]]:
    """(the plain agent's events of a stream cut after three deltas, its elements of the whole stream, the
    durable agent's elements of the cut stream retried into the whole one): the durable run sends the two
    requests, no more."""
    plain_agent: Agent[None, str] = Agent(server.openai_model(), name="plain")
    server.fault_cut_stream(TextReply(TEXT, usage=(30, 8)), after_deltas=CUT_AFTER)
    cut: list[Any] = []
    with pytest.raises(ModelConnectionError) as failed:
        async with plain_agent.run_stream_events("capital?") as events:
            async for event in events:
                cut.append(event)
    assert "peer closed connection" in str(failed.value.__cause__.__cause__)  # httpx's, under openai's
    server.reply_text(TEXT, usage=(30, 8))
    whole = await _streamed(plain_agent, entry)

    durable = PrefectAgent(
        Agent(server.openai_model(), name=f"retried_{uuid.uuid4().hex[:8]}"),
        model_task_config=TaskConfig(retries=1),
    )
    server.fault_cut_stream(TextReply(TEXT, usage=(30, 8)), after_deltas=CUT_AFTER)
    server.reply_text(TEXT, usage=(30, 8))
    before = server.request_count
    retried = await _streamed(durable, entry)
    assert (server.request_count - before, server.pending) == (2, 0)
    return cut, whole, retried


async def test_a_stream_failing_midway_is_retried_in_new_parts_after_what_the_plain_agent_saw(
    chunked: LoopbackOpenAI,
) -> None:
    @flow
    async def retries() -> dict[str, tuple[list[Any], list[Any], list[Any]]]:
        return {entry: await _retried(chunked, entry) for entry in RETRIED}

    for entry, (cut, whole, retried) in (await retries()).items():
        assert [e.delta.content_delta for e in cut if isinstance(e, PartDeltaEvent)] == [" capital", " of"]
        # what the plain agent saw of the failed stream, the discarded part's end, then the notice...
        retry = next(i for i, event in enumerate(retried) if isinstance(event, StreamRetryEvent))
        assert shape(retried[: retry - 1]) == shape(cut), entry
        ended = retried[retry - 1]
        assert isinstance(ended, PartEndEvent) and (ended.index, ended.part) == (0, TextPart(PARTIAL)), entry
        assert (retried[retry].attempt, retried[retry].discarded_parts) == (2, [0]), entry
        # ...then the plain agent's events of the whole reply, in part 1 (the final-result marker came once)
        again = [_in_part_1(event) for event in whole if not isinstance(event, FinalResultEvent)]
        again[0].previous_part_kind = "text"  # the retry's part follows the discarded one
        assert shape(retried[retry + 1 :]) == shape(again), entry


def _in_part_1(event: Any) -> Any:
    if isinstance(event, PartStartEvent | PartDeltaEvent | PartEndEvent):
        return dataclasses.replace(event, index=event.index + 1)
    return event


async def test_a_retried_stream_text_shows_the_discarded_text_first_and_outputs_the_retry_alone(
    server: LoopbackOpenAI, caplog: pytest.LogCaptureFixture
) -> None:
    server.chunking = CHUNKINGS["burst"]
    with caplog.at_level(logging.WARNING, logger="prefect_pydantic_ai"):
        _, whole, retried = await _retried(server, "stream_text_delta")
    assert retried == ["The", " capital", " of", *whole]  # stream_text cannot retract a delta it yielded
    assert retried[-1] == whole[-1] == TEXT  # get_output(): the retry's response alone
    assert any("streamed 1 part(s); they are discarded" in r.getMessage() for r in caplog.records)
