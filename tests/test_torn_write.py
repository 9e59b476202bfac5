"""A process SIGKILLed while it writes a journal entry leaves no torn entry: the entry's path holds nothing or the
complete previous entry, and the step over it re-executes or replays."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest
from pydantic_ai import Agent
from pydantic_ai.messages import ModelMessage, ModelResponse, TextPart
from pydantic_ai.models.function import AgentInfo, FunctionModel

from prefect_pydantic_ai import PrefectAgent

pytestmark = pytest.mark.slow  # starts processes

ENTRY_BYTES = 256 * 1024 * 1024
"""Large enough that writing it takes many polls of the test, so the kill lands while the write is under way."""

WRITER = """
import asyncio, sys
from prefect_pydantic_ai.store.journal_storage import JournalFileSystem

journal = JournalFileSystem(basepath=sys.argv[1])
asyncio.run(journal.awrite_path(sys.argv[2], b"x" * int(sys.argv[3])))
print("finished", flush=True)
"""


def kill_mid_write(directory: Path, name: str) -> None:
    """Start a process writing a huge entry called `name` through `JournalFileSystem.awrite_path`; SIGKILL it
    once its temporary file holds part of the entry; check it died with the write unfinished."""
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(directory), name, str(ENTRY_BYTES)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while not any(p.stat().st_size > 0 for p in directory.glob(f".{name}.{writer.pid}.*.tmp")):
            assert writer.poll() is None, f"the writer exited first: {writer.communicate()}"
            assert time.monotonic() < deadline, "the writer never started writing"
            time.sleep(0.001)
        writer.send_signal(signal.SIGKILL)
        stdout, _ = writer.communicate(timeout=30)
    finally:
        if writer.poll() is None:
            writer.kill()
            writer.communicate()
    assert writer.returncode == -signal.SIGKILL and "finished" not in stdout
    [temporary] = directory.glob(f".{name}.{writer.pid}.*.tmp")
    assert 0 < temporary.stat().st_size < ENTRY_BYTES  # killed mid-write: only part of the entry was written
    temporary.unlink()


def test_a_writer_killed_mid_write_leaves_no_entry_or_the_previous_one(storage_dir: Path) -> None:
    calls = Counter[str]()

    def model(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        calls["model"] += 1
        return ModelResponse(parts=[TextPart("the answer")])

    durable = PrefectAgent(Agent(FunctionModel(model), name="torn_write"))
    key = f"torn-{uuid.uuid4().hex[:10]}"
    storage_dir.mkdir(parents=True, exist_ok=True)
    before = set(storage_dir.iterdir())
    assert durable.run_sync("go", idempotency_key=key).output == "the answer"
    [entry] = [p for p in set(storage_dir.iterdir()) - before if p.is_file()]  # the step's entry: its key

    entry.unlink()  # as if the step had never been journaled
    kill_mid_write(storage_dir, entry.name)
    assert not entry.exists()  # no torn entry: nothing at all
    assert durable.run_sync("go", idempotency_key=key).output == "the answer"
    assert calls == Counter(model=2)  # the step found no entry and executed again
    previous = entry.read_bytes()  # ... and journaled it again

    kill_mid_write(storage_dir, entry.name)
    assert entry.read_bytes() == previous  # no torn entry: the complete previous one
    assert durable.run_sync("go", idempotency_key=key).output == "the answer"
    assert calls == Counter(model=2)  # replayed from the intact entry
