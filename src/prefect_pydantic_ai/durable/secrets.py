"""Secrets: what a run must never write, and the one redactor that removes it from everything it does write.

A run's secrets are found once, when it starts, in its deps, metadata and prompt:
- every string under a credential-like name (`api_key`, `db_password`, an `Authorization` header), at any depth
  of dataclasses, pydantic models, dicts and lists, and every `SecretStr` / `SecretBytes` value;
- every substring in the well-known secret formats (`SECRET_PATTERNS`): a password inside a URL, a bearer token,
  a `password=...` assignment, OpenAI / Anthropic / AWS / GitHub / Slack / Google / Stripe keys, a JWT.

The redactor then replaces each of those values wherever it appears, as a substring, in what the run writes (the
run record and its progress log, the flow-run parameters we set, the artifact, log lines, error messages), longest
first, and applies the patterns too, so a secret the run meets later in a known format is removed as well.
Values shorter than `MIN_SECRET_LENGTH` are replaced where they stand (under their name) but not searched for
elsewhere: a four-letter value would mangle ordinary text.

Journal entries (model responses, tool results) are stored verbatim: a replay must hand the model exactly the
conversation it saw, so redacting them would break replay. The journal never holds the prompt or the deps.
"""

from __future__ import annotations

import contextlib
import contextvars
import dataclasses
import functools
import logging
import re
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

from pydantic import BaseModel, SecretBytes, SecretStr

REDACTED = "<redacted>"
MIN_SECRET_LENGTH = 6
"""Shorter values found under a credential-like name are redacted there, but not searched for in other text."""

SECRET_NAME = re.compile(
    r"api[_-]?key|token(?!s)|secret|passw(or)?d|pwd|credential|auth(?!or(?!i[sz]))|private[_-]?key",
    re.IGNORECASE,
)
"""A field, key or assignment name that holds a credential (`author`, `authority` and `max_tokens` do not)."""

_MASKED = "**********"  # how pydantic serializes a SecretStr

# A whole value that starts like a key is a secret, however short its tail (`sk-1`, a test key).
_KEY_PREFIX = re.compile(
    r"^(sk-|sk_|pk_|rk_|ghp_|gho_|ghs_|ghu_|ghr_|github_pat_|xox[abprs]-|AKIA|ASIA|AIza|eyJ)"
)

_EDGE = r"(?<![A-Za-z0-9_-])"  # a key starts at a word edge: `task-force-...` holds no `sk-` key
SECRET_PATTERNS: dict[str, re.Pattern[str]] = {
    # Each pattern's `secret` group is what is removed; the rest (a URL's scheme, user and host) is kept.
    # A bearer token may hold dots (a JWT) but does not end with one: that is the sentence's.
    "url password": re.compile(r"\b[A-Za-z][A-Za-z0-9+.-]*://[^\s:/@]*:(?P<secret>[^\s/@]+)@"),
    "bearer token": re.compile(r"\b[Bb]earer\s+(?P<secret>(?=[\w.~+/-]*\d)[\w.~+/-]{7,}[\w~+/-]=*)"),
    "assignment": re.compile(
        rf"[\w-]*(?:{SECRET_NAME.pattern})[\w-]*(?:\s*=\s*|[\"']\s*:\s*)[\"']?(?P<secret>[^\s\"'&;,]+)",
        re.IGNORECASE,
    ),
    "openai or anthropic key": re.compile(rf"{_EDGE}(?P<secret>sk-[A-Za-z0-9_-]{{16,}})"),
    "stripe key": re.compile(rf"{_EDGE}(?P<secret>[spr]k_(?:live|test)_[A-Za-z0-9]{{10,}})"),
    "aws access key id": re.compile(r"(?<![A-Za-z0-9])(?P<secret>(?:AKIA|ASIA)[A-Z0-9]{16})(?![A-Za-z0-9])"),
    "github token": re.compile(rf"{_EDGE}(?P<secret>gh[pousr]_[A-Za-z0-9]{{20,}}|github_pat_\w{{20,}})"),
    "slack token": re.compile(rf"{_EDGE}(?P<secret>xox[abprs]-[A-Za-z0-9-]{{10,}})"),
    "google api key": re.compile(rf"{_EDGE}(?P<secret>AIza[A-Za-z0-9_-]{{30,}})"),
    "jwt": re.compile(rf"{_EDGE}(?P<secret>eyJ[A-Za-z0-9_-]{{8,}}\.[A-Za-z0-9_-]{{8,}}\.[A-Za-z0-9_-]+)"),
}


_MAYBE = re.compile(r"://|earer|=|[\"']\s*:|sk-|k_|AKIA|ASIA|gh[pousr]_|github_pat_|xox|AIza|eyJ")
"""What every match of a pattern contains: a text without any is skipped at the cost of one search (a deps
DataFrame has thousands of strings, nearly all of them without)."""


def secrets_in(text: str) -> list[str]:
    """The substrings of `text` that are secrets by their format alone (`SECRET_PATTERNS`)."""
    if not _MAYBE.search(text):
        return []
    return [m["secret"] for pattern in SECRET_PATTERNS.values() for m in pattern.finditer(text)]


def _cut(match: re.Match[str]) -> str:
    start, end = match.span("secret")
    whole = match.group(0)
    offset = match.start()
    return whole[: start - offset] + REDACTED + whole[end - offset :]


@dataclasses.dataclass(frozen=True)
class Redactor:
    """The secret values of a run (longest first), and how to remove them and the known formats from text."""

    values: tuple[str, ...] = ()

    @classmethod
    def of(cls, values: Iterable[str]) -> Redactor:
        kept = {v for v in values if len(v) >= MIN_SECRET_LENGTH and v not in (REDACTED, _MASKED)}
        return cls(tuple(sorted(kept, key=lambda v: (-len(v), v))))

    @classmethod
    def collect(cls, *sources: Any) -> Redactor:
        """The secrets of `sources` (a run's deps, metadata, prompt, as objects or as their JSON)."""
        found: list[str] = []
        for source in sources:
            _collect(source, False, found, 0, set())
        return cls.of(found)

    def merged(self, other: Redactor) -> Redactor:
        """Both redactors' secrets: a sub-agent run also hides the secrets of the run that started it."""
        return self if not other.values else Redactor.of((*self.values, *other.values))

    @functools.cached_property
    def _values_pattern(self) -> re.Pattern[str] | None:
        """One pattern matching any of the values, longest first (compiled once per redactor)."""
        return re.compile("|".join(map(re.escape, self.values))) if self.values else None

    def scrub(self, text: str) -> str:
        """`text` with every secret value and every known secret format replaced by `<redacted>`."""
        if (values := self._values_pattern) is not None:
            text = values.sub(REDACTED, text)
        if _MAYBE.search(text):
            for pattern in SECRET_PATTERNS.values():
                text = pattern.sub(_cut, text)
        return text

    def scrub_data(self, value: Any) -> Any:
        """Plain JSON data with every string scrubbed (keys are kept: they are names, not values)."""
        if isinstance(value, str):
            return self.scrub(value)
        if isinstance(value, dict):
            return {k: self.scrub_data(v) for k, v in value.items()}
        if isinstance(value, list):
            return [self.scrub_data(v) for v in value]
        return value

    def scrub_exception(self, exc: BaseException) -> None:
        """Scrub the message of `exc` and of the exceptions it was raised from, in place: Prefect records it as
        the step's and the flow run's state message, and it reaches the caller and the logs."""
        seen: set[int] = set()
        current: BaseException | None = exc
        while current is not None and id(current) not in seen and len(seen) < 16:
            seen.add(id(current))
            self._scrub_one_exception(current)
            current = current.__cause__ or current.__context__

    def _scrub_one_exception(self, exc: BaseException) -> None:
        with contextlib.suppress(Exception):  # an exception that refuses new arguments keeps its own
            exc.args = tuple(self.scrub_data(a) for a in exc.args)
        for name, attr in list(getattr(exc, "__dict__", {}).items()):  # a custom `__str__` reads these
            if isinstance(attr, str | dict | list):
                with contextlib.suppress(Exception):
                    setattr(exc, name, self.scrub_data(attr))
        if isinstance(exc, OSError):  # its text comes from these, not from `args`
            for name in ("strerror", "filename", "filename2"):
                if isinstance(attr := getattr(exc, name), str):
                    setattr(exc, name, self.scrub(attr))

    def scrub_log_record(self, record: logging.LogRecord) -> None:
        """Scrub a log record's message, its exception and its stack text before any handler sees it."""
        try:
            message = record.getMessage()
        except Exception:  # a malformed record: logging reports it itself
            return
        clean = self.scrub(message)
        if clean != message:
            record.msg, record.args = clean, None
        if record.exc_info and record.exc_info[1] is not None:
            self.scrub_exception(record.exc_info[1])
            record.exc_text = self.scrub(logging.Formatter().formatException(record.exc_info))
        if record.stack_info:
            record.stack_info = self.scrub(record.stack_info)


def _children(value: Any) -> list[tuple[Any, Any]]:
    """(name, child) pairs of a named container; every field of a model or dataclass, excluded ones too."""
    if isinstance(value, BaseModel):
        return [(name, getattr(value, name, None)) for name in type(value).model_fields]
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return [(f.name, getattr(value, f.name, None)) for f in dataclasses.fields(value)]
    if isinstance(value, Mapping):
        return list(value.items())
    return []


def _collect(value: Any, under_secret_name: bool, found: list[str], depth: int, seen: set[int]) -> None:
    if isinstance(value, str):
        if under_secret_name or _KEY_PREFIX.match(value):
            found.append(value)
        found += secrets_in(value)
        return
    if value is None or isinstance(value, int | float):
        return
    if isinstance(value, SecretStr):
        found.append(value.get_secret_value())
        return
    if isinstance(value, SecretBytes):
        found.append(value.get_secret_value().decode(errors="replace"))
        return
    if depth > 32 or id(value) in seen:
        return
    seen.add(id(value))
    if isinstance(value, list | tuple | set | frozenset):  # unnamed items: the common, long case (rows)
        for item in value:
            if not (item is None or isinstance(item, int | float)):
                _collect(item, under_secret_name, found, depth + 1, seen)
        return
    for name, child in _children(value):
        secret_name = isinstance(name, str) and SECRET_NAME.search(name) is not None
        _collect(child, under_secret_name or secret_name, found, depth + 1, seen)


def redact(value: Any, path: str, redactor: Redactor) -> tuple[Any, list[str]]:
    """`value` (plain JSON data) as it may be written, and the paths of what was changed: a field under a
    credential-like name, or a whole value in a key format, is replaced by `<redacted>`; any other string has the
    run's secrets removed from it."""
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        hidden: list[str] = []
        for key, item in value.items():
            child = f"{path}.{key}"
            if isinstance(key, str) and SECRET_NAME.search(key) and item not in (None, ""):
                out[key] = REDACTED
                hidden.append(child)
            else:
                out[key], more = redact(item, child, redactor)
                hidden += more
        return out, hidden
    if isinstance(value, list):
        items: list[Any] = []
        hidden = []
        for index, item in enumerate(value):
            clean, more = redact(item, f"{path}[{index}]", redactor)
            items.append(clean)
            hidden += more
        return items, hidden
    if isinstance(value, str):
        if _KEY_PREFIX.match(value) or value == _MASKED:
            return REDACTED, [path]
        clean = redactor.scrub(value)
        return clean, [path] if clean != value else []
    return value, []


_active: contextvars.ContextVar[Redactor | None] = contextvars.ContextVar("ppa_redactor", default=None)
_PATTERNS_ONLY = Redactor()


def current() -> Redactor:
    """The redactor of the run in this context (the known formats alone outside a run)."""
    return _active.get() or _PATTERNS_ONLY


@contextlib.contextmanager
def redacting(redactor: Redactor) -> Iterator[Redactor]:
    """Within the block, everything this context writes or logs is scrubbed by `redactor` (merged with the
    enclosing run's, if any). Log records are scrubbed as they are created, so every handler (Prefect's API
    handler, the console, a user's own) sees only the scrubbed text."""
    install_log_scrubbing()
    enclosing = _active.get()
    merged = redactor if enclosing is None else enclosing.merged(redactor)
    token = _active.set(merged)
    try:
        yield merged
    finally:
        _active.reset(token)


_installed: list[Callable[..., logging.LogRecord]] = []


def install_log_scrubbing() -> None:
    """Make every log record created inside a run scrubbed by that run's redactor (once per process).

    A logger filter sees only the records of its own logger, not of its children nor of other libraries
    (httpx, a provider client at DEBUG), so the record factory, which every logger uses, is where this happens.
    It wraps the factory in place before it, and outside a run it changes nothing."""
    if _installed:
        return
    previous = logging.getLogRecordFactory()

    def make_record(*args: Any, **kwargs: Any) -> logging.LogRecord:
        record = previous(*args, **kwargs)
        redactor = _active.get()
        if redactor is not None:
            redactor.scrub_log_record(record)
        return record

    _installed.append(make_record)
    logging.setLogRecordFactory(make_record)
