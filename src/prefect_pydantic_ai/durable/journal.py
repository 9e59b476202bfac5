"""Step keys and journal entries.

A step key names one model request or tool call of one logical run. It is derived from the run key, the agent
name, the agent-run ordinal, the step ordinal and kind, the tool name, and a running digest of the conversation.
The digest absorbs each message once, when it first appears, with timestamps and generated ids removed, so a step
costs O(new content) and a replay of the same conversation yields the same keys.

A journal entry is the JSON a completed step returns from its Prefect task, wrapped with a format tag and a
SHA-256 of its canonical form, so a corrupt entry is detected and re-executed instead of being trusted.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Sequence
from typing import Any

import pydantic_core
from pydantic import BaseModel, TypeAdapter
from pydantic_ai.messages import ModelMessage, ModelMessagesTypeAdapter, ModelResponse

from prefect_pydantic_ai.durable.errors import NotJournalableError
from prefect_pydantic_ai.durable.fork import forking
from prefect_pydantic_ai.durable.secrets import Redactor, redact, secrets_in
from prefect_pydantic_ai.store.step_names import StepKind

FORMAT = "prefect-pydantic-ai/journal/1"


# Fields that change between attempts of the same logical step and must never enter a key
# (tests/test_instant_replay.py runs one conversation twice and fails on any new one a pydantic-ai release adds).
_VOLATILE_FIELDS = frozenset(
    {
        "timestamp",
        "request_timestamp",  # pydantic-ai >= 2.78: when the request was sent
        "duration",  # pydantic-ai >= 2.78: how long the response took
        "run_id",
        "conversation_id",
        "tool_call_id",
        "id",
        "provider_response_id",
        "provider_details",
        "usage",
        "history_digest",
        "failed_attempts",
        "workspace_ref",
    }
)

_RESPONSE_ADAPTER: TypeAdapter[ModelResponse] = TypeAdapter(ModelResponse)


class JournalCorruptError(ValueError):
    """A stored entry failed its format or checksum check; the step must run again."""


def canonical_json(value: Any) -> bytes:
    """Deterministic JSON bytes: sorted keys, no whitespace."""
    return json.dumps(value, sort_keys=True, separators=(",", ":"), ensure_ascii=False).encode()


def _strip_volatile(value: Any) -> Any:
    if isinstance(value, dict):
        return {k: _strip_volatile(v) for k, v in value.items() if k not in _VOLATILE_FIELDS}
    if isinstance(value, list):
        return [_strip_volatile(v) for v in value]
    return value


def messages_fingerprint(messages: Sequence[ModelMessage]) -> bytes:
    """Canonical bytes of what the model sees in `messages`, without timestamps and generated ids."""
    dumped = ModelMessagesTypeAdapter.dump_python(list(messages), mode="json", fallback=repr)
    return canonical_json(_strip_volatile(dumped))


class ConversationDigest:
    """A running SHA-256 over the conversation, fed each new message exactly once."""

    def __init__(self, seed: bytes) -> None:
        self._seed = seed
        self._hash = hashlib.sha256(seed)
        self._absorbed = 0
        fork = forking()
        # in a fork with another prompt: the digest the original's conversation had, kept alongside
        self._original = hashlib.sha256(seed) if fork is not None and fork.prompt is not None else None

    def absorb(self, messages: Sequence[ModelMessage]) -> str:
        """Feed the messages not seen yet and return the current digest.

        History is append-only during a run; if something shortened it (a history processor rewriting the
        persistent history), the digest restarts from the seed over the whole history, still deterministic.
        """
        if len(messages) < self._absorbed:
            self._hash = hashlib.sha256(self._seed)
            self._original = hashlib.sha256(self._seed) if self._original is not None else None
            self._absorbed = 0
        new = messages[self._absorbed :]
        if new:
            self._hash.update(messages_fingerprint(new))
            self._absorbed = len(messages)
            fork = forking()
            if self._original is not None and fork is not None and fork.prompt is not None:
                self._original.update(_with_prompt(messages_fingerprint(new), *fork.prompt))
                fork.digests[self._hash.hexdigest()] = self._original.hexdigest()
        return self._hash.hexdigest()


def _with_prompt(fingerprint: bytes, prompt: str, original: str) -> bytes:
    """`fingerprint` with each user prompt that reads `prompt` reading `original` instead."""

    def swap(value: Any) -> Any:
        if isinstance(value, dict):
            if value.get("part_kind") == "user-prompt" and value.get("content") == prompt:
                return {**value, "content": original}
            return {k: swap(v) for k, v in value.items()}
        if isinstance(value, list):
            return [swap(v) for v in value]
        return value

    return canonical_json(swap(json.loads(fingerprint)))


def step_key(
    *,
    run_key: str,
    agent: str,
    agent_ordinal: int,
    kind: StepKind,
    step: str,
    digest: str,
    tool_name: str = "",
) -> str:
    """The journal key of one step: a hex SHA-256 of exactly the fields the design names, nothing else.

    In a fork, a top-level run's key is also computed as the original run has it (`ForkSource.aliases`)."""
    key = _key(run_key, agent, str(agent_ordinal), kind, step, tool_name, digest)
    if len(_memo_keys) >= 4096:
        del _memo_keys[next(iter(_memo_keys))]  # the oldest: its step is long done
    _memo_keys[key] = _key("memo", agent, kind, tool_name, digest)
    fork = forking()
    if fork is not None and not run_key.startswith("step:"):
        conversation, sep, rest = digest.partition(":")
        original = fork.digests.get(conversation, conversation) + sep + rest
        fork.aliases[key] = _key(fork.run_key, agent, str(agent_ordinal), kind, step, tool_name, original)
    return key


_memo_keys: dict[str, str] = {}


def memo_key(key: str) -> str | None:
    """Where step `key`'s entry is memoized across runs (`TaskConfig.memoize_seconds`): a key of the request's
    content alone (agent, kind, tool, conversation digest with deps and metadata, arguments), not of the run or
    the step's place in it. `None` for a key not computed in this process."""
    return _memo_keys.get(key)


def _key(*fields: str) -> str:
    material = "\x1f".join([FORMAT, *fields])
    return hashlib.sha256(material.encode()).hexdigest()


@dataclasses.dataclass(frozen=True)
class RunInputs:
    """A run's deps, metadata and prompt as they may be written, with its secrets removed (`redacted` says where),
    and the redactor that removes those secrets from everything else the run writes (`secrets`).

    Secrets never reach a key or a record: rotating an API key does not invalidate a journal, and nothing stored
    or shown by Prefect contains it.
    """

    deps: Any
    metadata: Any
    redacted: tuple[str, ...]
    prompt: str | None = None
    secrets: Redactor = dataclasses.field(default_factory=Redactor)

    @classmethod
    def of(cls, deps: Any, metadata: Any, prompt: str | None = None) -> RunInputs:
        deps_json = to_journal_json(deps, what="deps")
        meta_json = to_journal_json(metadata, what="metadata")
        # the objects (a SecretStr's value, fields excluded from JSON) and their JSON (custom serializers)
        secrets = Redactor.collect(deps, metadata, deps_json, meta_json)
        if prompt is not None:  # free text: only what is a secret by its format
            secrets = secrets.merged(Redactor.of(secrets_in(prompt)))
        clean_deps, hidden = redact(deps_json, "deps", secrets)
        clean_meta, hidden_meta = redact(meta_json, "metadata", secrets)
        clean_prompt = None if prompt is None else secrets.scrub(prompt)
        hidden_prompt = ["prompt"] if clean_prompt != prompt else []
        return cls(
            deps=clean_deps,
            metadata=clean_meta,
            redacted=(*hidden, *hidden_meta, *hidden_prompt),
            prompt=clean_prompt,
            secrets=secrets,
        )

    def seed(self, agent: str) -> bytes:
        """Bytes that start a run's digest: two runs with different deps or metadata never share a step."""
        return canonical_json({"agent": agent, "deps": self.deps, "metadata": self.metadata})


def _dataframe_json(value: Any) -> Any:
    # pandas objects know how to write themselves; `split` keeps index, columns and values in order.
    return json.loads(value.to_json(orient="split", date_format="iso", double_precision=15))


def _fallback(value: Any) -> Any:
    if type(value).__module__.partition(".")[0] == "pandas" and hasattr(value, "to_json"):
        return _dataframe_json(value)
    if type(value).__module__ == "numpy" and hasattr(value, "tolist"):
        return value.tolist()
    raise pydantic_core.PydanticSerializationError(f"Unable to serialize unknown type: {type(value)!r}")


def to_journal_json(value: Any, *, what: str) -> Any:
    """`value` as plain JSON data, or a `NotJournalableError` that names the offending field and the fix."""
    try:
        return pydantic_core.to_jsonable_python(value, fallback=_fallback)
    except (pydantic_core.PydanticSerializationError, ValueError, TypeError) as exc:
        path, bad = _find_unserializable(value, what)
        raise NotJournalableError(
            f"{path} ({type(bad).__qualname__}) cannot be journaled as JSON. Make it plain data (a pydantic model, "
            f"dataclass, dict or DataFrame), exclude it from serialization (pydantic `Field(exclude=True)`), "
            f"or keep such objects out of {what} (e.g. build clients inside the tool)."
        ) from exc


def _children(value: Any) -> list[tuple[str, Any]]:
    if isinstance(value, BaseModel):
        return [
            (f".{name}", getattr(value, name))
            for name, info in type(value).model_fields.items()
            if not info.exclude
        ]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return [(f".{f.name}", getattr(value, f.name)) for f in dataclasses.fields(value)]
    if isinstance(value, dict):
        return [(f"[{k!r}]", v) for k, v in value.items()]
    if isinstance(value, list | tuple | set | frozenset):
        return [(f"[{i}]", v) for i, v in enumerate(value)]
    return []


def _find_unserializable(value: Any, path: str) -> tuple[str, Any]:
    """The deepest field of `value` that JSON serialization rejects (the value itself if none is deeper)."""
    for suffix, child in _children(value):
        try:
            pydantic_core.to_jsonable_python(child, fallback=_fallback)
        except (pydantic_core.PydanticSerializationError, ValueError, TypeError):
            return _find_unserializable(child, path + suffix)
    return path, value


def seal(kind: StepKind, data: Any) -> dict[str, Any]:
    """Wrap step data as a journal entry with its checksum."""
    return {
        "format": FORMAT,
        "kind": kind,
        "data": data,
        "sha256": hashlib.sha256(canonical_json(data)).hexdigest(),
    }


def unseal(entry: Any, kind: StepKind) -> Any:
    """The data of a journal entry, after checking its format, kind and checksum."""
    if not isinstance(entry, dict) or entry.get("format") != FORMAT or entry.get("kind") != kind:
        raise JournalCorruptError(f"not a {kind} journal entry of format {FORMAT}")
    data = entry.get("data")
    if hashlib.sha256(canonical_json(data)).hexdigest() != entry.get("sha256"):
        raise JournalCorruptError("checksum mismatch")
    return data


def dump_response(response: ModelResponse) -> Any:
    """A model response as readable JSON data (pydantic-ai's own message schema)."""
    return _RESPONSE_ADAPTER.dump_python(response, mode="json")


def load_response(data: Any) -> ModelResponse:
    """The model response stored by `dump_response`."""
    try:
        return _RESPONSE_ADAPTER.validate_python(data)
    except pydantic_core.ValidationError as exc:
        raise JournalCorruptError(
            f"stored model response does not validate: {exc.error_count()} errors"
        ) from exc
