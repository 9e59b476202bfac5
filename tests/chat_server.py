"""The chat backend as its tests use it: `prefect-pydantic-ai web` serving tests/scripts/chat_agent.py in a real
subprocess (which a test can SIGKILL and start again on the same port and event directory), its model the
loopback OpenAI server of the test process, and a plain SSE client reading a turn's events by offset, in either
protocol.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx

from prefect_pydantic_ai.infra.server import free_port
from prefect_pydantic_ai.testing import CallLog, Chunking, LoopbackOpenAI

AGENT = str(Path(__file__).parent / "scripts" / "chat_agent.py") + ":agent"


@contextmanager
def serving(directory: Path, pause: float = 0.03) -> Iterator[tuple[LoopbackOpenAI, ChatServer]]:
    """The loopback model (one streamed event per write, `pause` apart) and a chat server using it, both stopped
    at the end. Tests sharing them use their own conversations and count calls as differences."""
    with LoopbackOpenAI(chunking=Chunking("per_event", pause=pause)) as model:
        server = ChatServer(model, directory)
        server.start()
        try:
            yield model, server
        finally:
            server.stop()


class ChatServer:
    """`prefect-pydantic-ai web` on a free port; `kill()` SIGKILLs it, `start()` starts it again."""

    def __init__(self, model: LoopbackOpenAI, directory: Path) -> None:
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.events_dir = directory / "chat"
        self.calls = CallLog(directory / "calls.jsonl")
        self.env = {**os.environ, "CHAT_OPENAI_URL": model.base_url, "CHAT_CALLS": str(self.calls.path)}
        self.process: subprocess.Popen[bytes] | None = None
        self.output = directory / "server.log"

    def start(self, deadline: float = 120) -> None:
        """Start the server and wait until it answers (a loaded machine takes tens of seconds to import, and
        a restarted server first resumes its unfinished turns)."""
        args = ["web", AGENT, "--port", str(self.port), "--events-dir", str(self.events_dir)]
        with self.output.open("ab") as out:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "prefect_pydantic_ai", *args], env=self.env, stdout=out, stderr=out
            )
        end = time.monotonic() + deadline
        while time.monotonic() < end:
            assert self.process.poll() is None, self.output.read_text()
            try:
                if httpx.get(self.url + "/", timeout=1).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            time.sleep(0.1)
        raise AssertionError(f"the chat server did not answer within {deadline} s: {self.output.read_text()}")

    def kill(self) -> None:
        assert self.process is not None
        self.process.send_signal(signal.SIGKILL)
        self.process.wait(10)

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
            try:
                self.process.wait(20)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(10)

    def send(self, conversation: str, message: str) -> int:
        response = httpx.post(f"{self.url}/api/conversations/{conversation}/turns", json={"message": message})
        assert response.status_code == 200, response.text
        return int(response.json()["turn"])

    def events(
        self,
        conversation: str,
        turn: int,
        *,
        last_event_id: int | None = None,
        limit: int | None = None,
        protocol: str = "vercel-ai",
    ) -> Iterator[tuple[int, str]]:
        """`(offset, data)` of the turn's events in `protocol` after `last_event_id`, until the turn ends (or
        `limit` events)."""
        headers = {} if last_event_id is None else {"Last-Event-ID": str(last_event_id)}
        url = f"{self.url}/api/conversations/{conversation}/turns/{turn}/events?protocol={protocol}"
        with httpx.stream("GET", url, headers=headers, timeout=httpx.Timeout(60, connect=5)) as response:
            if response.status_code == 204:
                return
            assert response.status_code == 200
            offset: int | None = None
            count = 0
            for line in response.iter_lines():
                if line.startswith("id: "):
                    offset = int(line[4:])
                elif line.startswith("data: ") and offset is not None:
                    yield offset, line[6:]
                    offset = None
                    count += 1
                    if limit is not None and count == limit:
                        return


def rendered_text(events: list[str]) -> str:
    """The text a client shows for `events` (Vercel AI or AG-UI): text parts in order, the discarded ones
    removed."""
    parts: dict[str, str] = {}
    for data in events:
        if not data.startswith("{"):
            continue
        event: dict[str, Any] = json.loads(data)
        part = event.get("id") or event.get("messageId")
        if event["type"] in ("text-start", "TEXT_MESSAGE_START"):
            parts[part] = ""
        elif event["type"] in ("text-delta", "TEXT_MESSAGE_CONTENT"):
            parts[part] += event["delta"]
        for discard in named([data], "discard"):
            for gone in discard["ids"]:
                parts.pop(gone, None)
    return "".join(parts.values())


def named(events: list[str], name: str) -> list[Any]:
    """The payloads of our application events `name` among `events`: Vercel `data-<name>` chunks' `data`, AG-UI
    `CUSTOM` events' `value`."""
    found = []
    for data in events:
        if data.startswith("{"):
            event = json.loads(data)
            if event["type"] == f"data-{name}":
                found.append(event["data"])
            elif event["type"] == "CUSTOM" and event["name"] == name:
                found.append(event["value"])
    return found
