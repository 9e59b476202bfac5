"""Where a chat's conversations live: per conversation a directory with, per turn, the user's prompt, the
turn's event log in each protocol and (once it completed) the messages the next turn continues from.

By default the directory `chat/` beside the journal when the journal is on the local disk (Prefect's default
result storage, `store.journal_storage`): a turn's events then live, and are lost or kept, with the steps that
produced them, and a server restarted on the same machine finds both. With another result storage (S3, GCS),
whose objects cannot be appended to event by event, the log lives under `PREFECT_HOME/chat/` of the server's
machine; `durable_chat_app(events_dir=)` chooses any directory.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from prefect.settings import PREFECT_HOME
from pydantic_ai.messages import ModelMessage, ModelMessagesTypeAdapter

from prefect_pydantic_ai.errors import RunError
from prefect_pydantic_ai.store.journal_storage import journal_storage
from prefect_pydantic_ai.web.event_log import TurnLog
from prefect_pydantic_ai.web.protocols import PROTOCOLS, ProtocolName

_CONVERSATION_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")


async def default_directory() -> Path:
    """`chat/` beside the journal when it is on the local disk, else under `PREFECT_HOME`."""
    journal = await journal_storage(None)
    if journal is not None:
        return journal.root() / "chat"
    return Path(PREFECT_HOME.value()).expanduser() / "chat"


def check_conversation_id(conversation: str) -> str:
    """`conversation` if it is a valid id (letters, digits, `_` and `-`, up to 64), else `RunError`."""
    if not _CONVERSATION_ID.match(conversation):
        raise RunError(
            f"Invalid conversation id {conversation!r}: use up to 64 letters, digits, '_' and '-'."
        )
    return conversation


class Conversations:
    """The conversations under `root`; one `TurnLog` object per turn and protocol, shared by its writer and
    followers."""

    def __init__(self, root: Path) -> None:
        self.root = root
        self._logs: dict[tuple[str, int, ProtocolName], TurnLog] = {}

    def turns(self, conversation: str) -> list[int]:
        """The turn numbers (from 1) the conversation has, in order."""
        directory = self.root / check_conversation_id(conversation)
        return sorted(int(p.name.split(".")[0]) for p in directory.glob("*.prompt.json"))

    def all(self) -> list[str]:
        """Every conversation id under the root."""
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir() and _CONVERSATION_ID.match(p.name))

    def log(self, conversation: str, turn: int, protocol: ProtocolName) -> TurnLog:
        """The turn's event log in `protocol`."""
        found = self._logs.get((conversation, turn, protocol))
        if found is None:
            path = self._turn_path(conversation, turn, f"{protocol}.jsonl")
            found = self._logs[(conversation, turn, protocol)] = TurnLog(path)
        return found

    def ended(self, conversation: str, turn: int) -> bool:
        """Whether the turn is over: its log ended in every protocol."""
        return all(self.log(conversation, turn, protocol).read().ended for protocol in PROTOCOLS)

    def add_turn(self, conversation: str, prompt: str) -> int:
        """Record a new turn with `prompt`; its number."""
        turn = (self.turns(conversation) or [0])[-1] + 1
        path = self._turn_path(conversation, turn, "prompt.json")
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps({"prompt": prompt}))
        return turn

    def prompt(self, conversation: str, turn: int) -> str:
        return str(json.loads(self._turn_path(conversation, turn, "prompt.json").read_text())["prompt"])

    def history(self, conversation: str, turn: int) -> list[ModelMessage]:
        """The messages turn `turn` continues from: those of the turn before it, when it completed."""
        path = self._turn_path(conversation, turn - 1, "messages.json")
        return ModelMessagesTypeAdapter.validate_json(path.read_bytes()) if path.exists() else []

    def save_messages(self, conversation: str, turn: int, messages_json: bytes) -> None:
        path = self._turn_path(conversation, turn, "messages.json")
        temporary = path.with_suffix(".tmp")
        temporary.write_bytes(messages_json)
        temporary.replace(path)

    def _turn_path(self, conversation: str, turn: int, suffix: str) -> Path:
        return self.root / check_conversation_id(conversation) / f"{turn:04d}.{suffix}"
