"""The durable chat backend over real HTTP: `prefect-pydantic-ai web` in a real process, the model the loopback
OpenAI server streaming word by word, a plain SSE client reading the Vercel AI stream and the AG-UI stream of the
same turns. A reconnect gets exactly the missed events; a server SIGKILLed mid-turn and started again finishes
the turn, each completed call executed once and marked replayed; an approval is decided by whoever comes first,
and the attempt a killed server left waiting ends Crashed in Prefect.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import anyio
import httpx
import pytest
from prefect import get_client

from prefect_pydantic_ai.testing import LoopbackOpenAI
from prefect_pydantic_ai.web.event_log import TurnLog
from tests.chat_server import ChatServer, named, rendered_text, serving
from tests.commands import cli

ANSWER = " ".join(f"word{n}" for n in range(40))


@pytest.fixture(scope="module")
def served(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[LoopbackOpenAI, ChatServer]]:
    with serving(tmp_path_factory.mktemp("chat")) as both:  # one server start for the module: seconds each
        yield both


@pytest.fixture
def model(served: tuple[LoopbackOpenAI, ChatServer]) -> Iterator[LoopbackOpenAI]:
    yield served[0]
    assert served[0].pending == 0, "a scripted reply was left for the next test"


@pytest.fixture
def chat(served: tuple[LoopbackOpenAI, ChatServer]) -> ChatServer:
    return served[1]


def _conversation() -> str:
    return "t" + uuid.uuid4().hex[:8]


def _types(events: list[tuple[int, str]]) -> list[str]:
    return [json.loads(data)["type"] for _, data in events]


async def _state(flow_run_id: str) -> tuple[str, str | None]:
    async with get_client() as client:
        flow_run = await client.read_flow_run(uuid.UUID(flow_run_id))
    assert flow_run.state is not None
    return flow_run.state.type.value, flow_run.state.message


@pytest.mark.slow
def test_a_reconnect_gets_exactly_the_events_it_missed(chat: ChatServer, model: LoopbackOpenAI) -> None:
    model.reply_text(ANSWER, usage=(100, 40))
    requests = model.request_count
    conversation = _conversation()
    turn = chat.send(conversation, "Say forty words.")

    first = list(chat.events(conversation, turn, limit=6))  # the tab closes after six events
    rest = list(chat.events(conversation, turn, last_event_id=first[-1][0]))
    everything = list(chat.events(conversation, turn))  # read again from offset 0, after the turn ended

    offsets = [offset for offset, _ in first + rest]
    assert offsets == list(range(len(everything)))  # no gap, no duplicate
    assert first + rest == everything
    assert rendered_text([data for _, data in everything]) == ANSWER
    assert everything[-1][1] == "[DONE]"
    ledger = next(json.loads(d)["data"] for _, d in everything if '"data-ledger"' in d)
    assert ledger["model_calls"] == {"executed": 1, "replayed": 0}
    assert model.request_count - requests == 1
    # a finished turn read past its end: 204, which stops a browser's EventSource from reconnecting
    url = f"{chat.url}/api/conversations/{conversation}/turns/{turn}/events"
    assert httpx.get(url, headers={"Last-Event-ID": str(len(everything) - 1)}).status_code == 204

    # the same run in AG-UI, from its own log: its own offsets, the same text, the turn as one AG-UI run
    first = list(chat.events(conversation, turn, limit=6, protocol="ag-ui"))
    rest = list(chat.events(conversation, turn, last_event_id=first[-1][0], protocol="ag-ui"))
    agui = list(chat.events(conversation, turn, protocol="ag-ui"))
    assert first + rest == agui and [offset for offset, _ in agui] == list(range(len(agui)))
    assert rendered_text([data for _, data in agui]) == ANSWER
    started, finished = json.loads(agui[0][1]), json.loads(agui[-1][1])
    assert (started["type"], started["threadId"], started["runId"]) == (
        "RUN_STARTED",
        conversation,
        f"chat:{conversation}:{turn}",
    )
    assert (finished["type"], finished["runId"]) == ("RUN_FINISHED", f"chat:{conversation}:{turn}")
    assert _types(agui).count("TEXT_MESSAGE_CONTENT") == 40
    assert [ledger["model_calls"] for ledger in named([d for _, d in agui], "ledger")] == [
        {"executed": 1, "replayed": 0}
    ]
    assert model.request_count - requests == 1  # both logs were written by the one run
    assert httpx.get(url + "?protocol=ag-ui&offset=" + str(len(agui))).status_code == 204
    unknown = httpx.get(url + "?protocol=grpc")
    assert (unknown.status_code, unknown.json()) == (
        400,
        {"error": "Unknown protocol 'grpc': use vercel-ai or ag-ui."},
    )


@pytest.mark.slow
def test_a_server_killed_mid_answer_resumes_the_turn_and_the_stream_continues(
    chat: ChatServer, model: LoopbackOpenAI
) -> None:
    model.reply_tool_calls([("order_status", {"order_id": 7})], usage=(100, 10))
    model.reply_text(ANSWER, usage=(120, 40))  # cut by the kill
    model.reply_text(ANSWER, usage=(120, 40))  # the resumed run sends the request again
    requests, calls = model.request_count, chat.calls.counts()
    conversation = _conversation()
    turn = chat.send(conversation, "Where is order 7?")

    before: list[tuple[int, str]] = []
    for offset, data in chat.events(conversation, turn):
        before.append((offset, data))
        if sum('"text-delta"' in d for _, d in before) == 5:  # five words of the answer are on screen
            break
    agui_before: list[tuple[int, str]] = []  # an AG-UI client of the same turn, three words in
    for offset, data in chat.events(conversation, turn, protocol="ag-ui"):
        agui_before.append((offset, data))
        if _types(agui_before).count("TEXT_MESSAGE_CONTENT") == 3:
            break
    chat.kill()
    chat.start()
    after = list(chat.events(conversation, turn, last_event_id=before[-1][0]))
    agui_after = list(chat.events(conversation, turn, last_event_id=agui_before[-1][0], protocol="ag-ui"))

    for events, protocol in ((before + after, "vercel-ai"), (agui_before + agui_after, "ag-ui")):
        assert [offset for offset, _ in events] == list(range(len(events)))  # no gap, no duplicate
        assert events == list(chat.events(conversation, turn, protocol=protocol))
        shown = [data for _, data in events]
        assert rendered_text(shown) == ANSWER  # the killed attempt's words are discarded, not doubled
        assert len(named(shown, "discard")) == 1
        # the resumed attempt answered the tool-call request and the tool call from the journal
        call_id = json.loads(next(d for d in shown if '"order_status"' in d)).get("toolCallId")
        assert named(shown, "replayed") == [
            {"step": "model", "request": 1, "model": "gpt-4o", "tool_call_ids": [call_id]},
            {"step": "tool", "request": 1, "tool": "order_status", "tool_call_id": call_id},
        ]
        ledger = named(shown, "ledger")[0]
        assert ledger["model_calls"] == {"executed": 1, "replayed": 1}
        assert ledger["tool_calls"] == {"executed": 0, "replayed": 1}
    assert sum('"tool-output-available"' in d for _, d in before + after) == 1
    assert _types(agui_before + agui_after).count("TOOL_CALL_RESULT") == 1
    # what the killed attempt started in AG-UI, it ended before the discard: every message and call is closed
    agui = [json.loads(data) for _, data in agui_before + agui_after]
    for kind, key in (("TEXT_MESSAGE", "messageId"), ("TOOL_CALL", "toolCallId")):
        started = [e[key] for e in agui if e["type"] == f"{kind}_START"]
        assert sorted(started) == sorted(e[key] for e in agui if e["type"] == f"{kind}_END")
    assert chat.calls.counts() - calls == {"order_status": 1}
    # at the model: the tool-call request once, the answer cut by the kill and sent again, nothing else
    assert [e.status for e in model.exchanges[requests:]] == [200, None, 200]


@pytest.mark.slow
def test_an_approval_decided_by_the_cli_first_shows_in_the_stream_and_the_page_is_told(
    chat: ChatServer, model: LoopbackOpenAI
) -> None:
    model.reply_tool_calls([("refund", {"order_id": 42})], usage=(100, 10))
    model.reply_text("Order 42 is refunded.", usage=(120, 8))
    requests, calls = model.request_count, chat.calls.counts()
    conversation = _conversation()
    turn = chat.send(conversation, "Please refund order 42.")

    seen: list[str] = []
    card: dict[str, object] = {}
    for _, data in chat.events(conversation, turn):
        seen.append(data)
        if '"data-approval"' in data:
            card = json.loads(data)["data"]
            break
    run_id = str(card["run_id"])
    assert [(c["tool"], c["args"]) for c in card["calls"]] == [("refund", {"order_id": 42})]  # type: ignore[attr-defined]
    assert any('"tool-approval-request"' in d for d in seen)

    decided = cli("approve", run_id)  # the CLI decides first
    assert decided.returncode == 0, decided.stdout + decided.stderr
    rest = [data for _, data in chat.events(conversation, turn, last_event_id=len(seen) - 1)]
    assert any('"tool-output-available"' in d and "order 42 refunded" in d for d in rest)
    assert rendered_text(seen + rest) == "Order 42 is refunded."

    late = httpx.post(f"{chat.url}/api/approvals/{run_id}", json={"approve": False})  # the page, too late
    assert late.status_code == 409
    assert late.json()["error"].startswith(
        f"Run {run_id} is not waiting for approval (its state is Completed)"
    )
    assert chat.calls.counts() - calls == {"refund": 1}
    assert model.request_count - requests == 2
    # in AG-UI the card is a CUSTOM event with the same payload (AG-UI has no approval request mid-run)
    agui = [data for _, data in chat.events(conversation, turn, protocol="ag-ui")]
    assert named(agui, "approval") == [card]
    assert any('"TOOL_CALL_RESULT"' in d and "order 42 refunded" in d for d in agui)
    assert rendered_text(agui) == "Order 42 is refunded."
    garbled = httpx.post(f"{chat.url}/api/approvals/{run_id}", content=b"yes please")
    assert (garbled.status_code, garbled.json()) == (
        400,
        {"error": 'Send {"approve": true} or {"approve": false, "message": "<why>"}.'},
    )


def test_the_web_command_refuses_an_agent_that_is_not_durable_or_would_leave_at_a_wait() -> None:
    suspending = cli("web", "examples/approve_refund.py:refund_desk")
    assert (suspending.returncode, suspending.stderr.strip()) == (
        2,
        "error: Agent 'refund_desk' waits for approvals in 'suspend' mode; the chat app needs "
        "PrefectAgent(..., approvals='pause'), so the turn continues in the server once someone decides.",
    )
    not_an_agent = cli("web", "examples/approve_refund.py:main")
    assert not_an_agent.returncode == 2
    assert not_an_agent.stderr.startswith("error: <function main at ")
    assert not_an_agent.stderr.strip().endswith("is not a Pydantic AI agent: serve a PrefectAgent(...).")
    plain = cli("web", "examples/approve_refund.py:agent")
    assert (plain.returncode, plain.stderr.strip()) == (
        2,
        "error: Agent 'refund_desk' is not durable: wrap it in PrefectAgent(...) or give it PrefectDurability().",
    )


@pytest.mark.anyio
async def test_the_event_log_keeps_whole_lines_and_follows_from_an_offset(tmp_path: Path) -> None:
    log = TurnLog(tmp_path / "c" / "0001.events.jsonl")
    log.append('{"type":"start"}', 0)
    log.mark_complete(0)
    log.append('{"type":"text-start","id":"a"}', 1)
    with log.path.open("ab") as f:  # a writer killed mid-line
        f.write(b'{"s":1,"d":"{\\"type\\":\\"text-de')
    state = log.read()
    assert (state.events, state.segments, state.complete, state.ended) == (
        ['{"type":"start"}', '{"type":"text-start","id":"a"}'],
        [0, 1],
        {0},
        False,
    )
    log.append('{"type":"text-end","id":"a"}', 1)  # the next writer cuts the torn line off first
    assert log.read().events[-1] == '{"type":"text-end","id":"a"}'

    async def follow(start: int) -> list[tuple[int, str]]:
        return [event async for event in log.follow(start)]

    with anyio.fail_after(10):
        async with anyio.create_task_group() as group:
            results: list[list[tuple[int, str]]] = []

            async def collect() -> None:
                results.append(await follow(1))

            group.start_soon(collect)
            await anyio.sleep(0)  # the follower waits at the end of the log
            log.append("[DONE]", 2)
            log.end()
    assert results == [
        [(1, '{"type":"text-start","id":"a"}'), (2, '{"type":"text-end","id":"a"}'), (3, "[DONE]")]
    ]


@pytest.mark.anyio
async def test_the_example_desk_answers_in_process_through_the_app(tmp_path: Path) -> None:
    """examples/chat_web.py offline, its app driven in this process: the page, a turn, its whole stream."""
    from examples.chat_web import desk
    from prefect_pydantic_ai.web.app import durable_chat_app

    app = durable_chat_app(desk, events_dir=tmp_path)
    await app.state.chat.start()  # what the lifespan does (httpx's ASGI transport runs none)
    try:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=app), base_url="http://chat"
        ) as client:
            page = await client.get("/")
            assert page.status_code == 200 and "<title>support_desk · durable chat</title>" in page.text
            started = await client.post("/api/conversations/ex1/turns", json={"message": "Where is order 7?"})
            assert started.json() == {"turn": 1, "events": "/api/conversations/ex1/turns/1/events"}
            busy = await client.post("/api/conversations/ex1/turns", json={"message": "And order 8?"})
            assert (busy.status_code, busy.json()["error"]) == (
                409,
                "Turn 1 of conversation ex1 has not ended; wait for it.",
            )
            with anyio.fail_after(60):
                body = (await client.get(started.json()["events"])).text  # ends with the turn
            agui_body = (await client.get(started.json()["events"] + "?protocol=ag-ui")).text
            listing = (await client.get("/api/conversations/ex1")).json()
    finally:
        await app.state.chat.stop()
    streams = []
    for text in (body, agui_body):
        events = [line[6:] for line in text.splitlines() if line.startswith("data: ")]
        ids = [int(line[4:]) for line in text.splitlines() if line.startswith("id: ")]
        assert ids == list(range(len(events)))
        assert rendered_text(events) == "Done: order 7 shipped yesterday. Anything else? "
        streams.append(events)
    vercel, agui = streams
    assert vercel[-1] == "[DONE]"
    assert any('"tool-output-available"' in e and "order 7 shipped yesterday" in e for e in vercel)
    assert [json.loads(e)["type"] for e in (agui[0], agui[-1])] == ["RUN_STARTED", "RUN_FINISHED"]
    assert any('"TOOL_CALL_RESULT"' in e and "order 7 shipped yesterday" in e for e in agui)
    assert listing["turns"] == [
        {
            "turn": 1,
            "prompt": "Where is order 7?",
            "ended": True,
            "events": {"vercel-ai": len(vercel), "ag-ui": len(agui)},
        }
    ]


@pytest.mark.slow
def test_a_server_killed_while_a_turn_waits_asks_again_and_the_refund_runs_once(
    chat: ChatServer, model: LoopbackOpenAI
) -> None:
    model.reply_tool_calls([("refund", {"order_id": 9})], usage=(100, 10))
    model.reply_text("Order 9 is refunded.", usage=(120, 8))
    requests, calls = model.request_count, chat.calls.counts()
    conversation = _conversation()
    turn = chat.send(conversation, "Please refund order 9.")
    before: list[tuple[int, str]] = []
    for offset, data in chat.events(conversation, turn):
        before.append((offset, data))
        if '"data-approval"' in data:
            break
    first_wait = json.loads(before[-1][1])["data"]["run_id"]
    chat.kill()
    chat.start()

    after: list[tuple[int, str]] = []
    for offset, data in chat.events(conversation, turn, last_event_id=before[-1][0]):
        after.append((offset, data))
        if '"data-approval"' in data:
            break
    discarded = next(json.loads(d)["data"]["ids"] for _, d in after if '"data-discard"' in d)
    assert f"approval:{first_wait}" in discarded  # the page drops the card of the killed attempt
    second_wait = json.loads(after[-1][1])["data"]["run_id"]
    # the killed attempt's flow run no longer waits in Prefect: it ended Crashed, naming the one that replaced it
    assert anyio.run(_state, first_wait) == (
        "CRASHED",
        f"The chat server waiting in it for a decision stopped; flow run {second_wait}, a later attempt of "
        f"chat:{conversation}:{turn}, continues the turn and asks again.",
    )
    assert anyio.run(_state, second_wait)[0] == "PAUSED"
    stale = httpx.post(f"{chat.url}/api/approvals/{first_wait}", json={"approve": True})
    assert stale.json()["error"].startswith(
        f"Run {first_wait} is not waiting for approval (its state is Crashed)"
    )
    decided = httpx.post(f"{chat.url}/api/approvals/{second_wait}", json={"approve": True})
    assert decided.status_code == 200, decided.text
    rest = list(chat.events(conversation, turn, last_event_id=after[-1][0]))

    events = before + after + rest
    assert [offset for offset, _ in events] == list(range(len(events)))
    assert rendered_text([d for _, d in events]) == "Order 9 is refunded."
    call_id = json.loads(before[-1][1])["data"]["calls"][0]["call_id"]
    assert named([d for _, d in events], "replayed") == [
        {"step": "model", "request": 1, "model": "gpt-4o", "tool_call_ids": [call_id]}
    ]
    agui = [data for _, data in chat.events(conversation, turn, protocol="ag-ui")]
    assert [c["run_id"] for c in named(agui, "approval")] == [first_wait, second_wait]
    assert f"approval:{first_wait}" in named(agui, "discard")[0]["ids"]
    assert named(agui, "replayed") == named([d for _, d in events], "replayed")
    assert rendered_text(agui) == "Order 9 is refunded."
    assert chat.calls.counts() - calls == {"refund": 1}
    assert model.request_count - requests == 2  # the tool-call request replayed from the journal


@pytest.mark.anyio
async def test_conversations_live_beside_the_journal_by_default(storage_dir: Path) -> None:
    from prefect_pydantic_ai.web.conversations import default_directory

    assert await default_directory() == storage_dir.resolve() / "chat"
