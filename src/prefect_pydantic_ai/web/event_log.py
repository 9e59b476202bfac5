"""The durable event log of a chat turn: every event the browser is sent, appended with its offset before any
client sees it, so a client that reconnects gets exactly the events it missed, even from another process.

One append-only JSON-lines file per turn and protocol, beside the conversation's prompts. A line is written in one `write()`
to a file opened with `O_APPEND`, so a process killed at any point leaves whole lines and at most one torn last
line, which readers ignore and the next writer cuts off. Three kinds of line:

- `{"s": segment, "d": data}`: an event sent to clients (`data` is its SSE payload); its offset is its index
  among these lines. `segment` says which part of the run produced it (see `turns`).
- `{"m": segment}`: the segment is complete: a resumed run sends none of its events again.
- `{"end": true}`: the turn is over; nothing follows.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

_POLL_SECONDS = 0.5
"""How often a follower looks at the file when no writer in its own process wakes it (a writer elsewhere)."""


@dataclass
class LogState:
    """What a turn's log holds: its events (offset = index), with the segment of each, the complete segments,
    and whether the turn ended."""

    events: list[str] = field(default_factory=list)
    segments: list[int] = field(default_factory=list)
    complete: set[int] = field(default_factory=set)
    ended: bool = False


class TurnLog:
    """The event log of one turn, at `path`."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._followers: set[asyncio.Event] = set()

    def read(self) -> LogState:
        """Everything the log holds now (a torn last line is not part of it)."""
        state = LogState()
        for line in self._lines(0)[0]:
            _apply(state, line)
        return state

    def append(self, data: str, segment: int) -> None:
        """Append one event for clients."""
        self._write({"s": segment, "d": data})

    def mark_complete(self, segment: int) -> None:
        """Record that every event of `segment` is in the log."""
        self._write({"m": segment})

    def end(self) -> None:
        """Record that the turn is over."""
        self._write({"end": True})

    def _write(self, entry: dict[str, object]) -> None:
        line = (json.dumps(entry, separators=(",", ":")) + "\n").encode()
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_APPEND, 0o666)
        try:
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":  # a torn line left by a killed writer
                tail = os.pread(fd, min(size, 1 << 20), max(0, size - (1 << 20)))
                os.ftruncate(fd, size - (len(tail) - tail.rfind(b"\n") - 1))
            os.write(fd, line)
        finally:
            os.close(fd)
        for follower in self._followers:
            follower.set()

    def _lines(self, position: int) -> tuple[list[dict[str, object]], int]:
        """The whole lines from byte `position` on, and the position after the last of them."""
        try:
            with self.path.open("rb") as f:
                f.seek(position)
                data = f.read()
        except FileNotFoundError:
            return [], position
        end = data.rfind(b"\n") + 1
        return [json.loads(line) for line in data[:end].splitlines() if line], position + end

    async def follow(self, start: int) -> AsyncIterator[tuple[int, str]]:
        """The events from offset `start` on, `(offset, data)`, as they are appended, until the turn ends."""
        position, offset = 0, 0
        changed = asyncio.Event()
        self._followers.add(changed)
        try:
            while True:
                changed.clear()
                lines, position = self._lines(position)
                for line in lines:
                    if line.get("end"):
                        return
                    if "d" in line:
                        if offset >= start:
                            yield offset, str(line["d"])
                        offset += 1
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(changed.wait(), _POLL_SECONDS)
        finally:
            self._followers.discard(changed)


def _apply(state: LogState, line: dict[str, object]) -> None:
    if "d" in line:
        state.events.append(str(line["d"]))
        state.segments.append(int(str(line["s"])))
    elif "m" in line:
        state.complete.add(int(str(line["m"])))
    elif line.get("end"):
        state.ended = True
