"""The durable chat backend over real HTTP: `prefect-pydantic-ai web` in a real process, the model the loopback
OpenAI server streaming word by word, a plain SSE client. A reconnect gets exactly the missed events; a server
SIGKILLed mid-turn and started again finishes the turn, each completed call executed once; an approval is
decided by whoever comes first.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from prefect_pydantic_ai.testing import Chunking, LoopbackOpenAI
from tests.chat_server import ChatServer, rendered_text

pytestmark = pytest.mark.slow

ANSWER = " ".join(f"word{n}" for n in range(40))


@pytest.fixture
def model() -> Iterator[LoopbackOpenAI]:
    with LoopbackOpenAI(chunking=Chunking("per_event", pause=0.03)) as server:
        yield server


@pytest.fixture
def chat(model: LoopbackOpenAI, tmp_path: Path) -> Iterator[ChatServer]:
    server = ChatServer(model, tmp_path)
    server.start()
    yield server
    server.stop()


def _conversation() -> str:
    return "t" + uuid.uuid4().hex[:8]


def test_a_reconnect_gets_exactly_the_events_it_missed(chat: ChatServer, model: LoopbackOpenAI) -> None:
    model.reply_text(ANSWER, usage=(100, 40))
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
    assert model.request_count == 1
    # a finished turn read past its end: 204, which stops a browser's EventSource from reconnecting
    url = f"{chat.url}/api/conversations/{conversation}/turns/{turn}/events"
    assert httpx.get(url, headers={"Last-Event-ID": str(len(everything) - 1)}).status_code == 204
