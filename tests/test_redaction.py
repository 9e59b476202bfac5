"""The redactor, alone: which values are secrets, and what is left of a text once they are removed (README, "Secrets").

Each known format is removed as a substring of longer text, and kept text around it survives; ordinary words
that merely look alike (`task-force`, `author=`, `max_tokens=`) are left alone. Values found under
credential-like names, at any depth, are removed wherever else they appear. These tests need no server.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import pytest
from pydantic import BaseModel, Field, SecretStr

from prefect_pydantic_ai.durable.journal import RunInputs
from prefect_pydantic_ai.durable.secrets import (
    MIN_SECRET_LENGTH,
    REDACTED,
    Redactor,
    current,
    redacting,
    secrets_in,
)

R = REDACTED
PATTERN_CASES = [
    ("url password", "db at postgresql://app:hunter2@db/prod now", f"db at postgresql://app:{R}@db/prod now"),
    ("url password, no user", "redis://:s3cr3t-pw@cache:6379/0", f"redis://:{R}@cache:6379/0"),
    ("bearer token", "Authorization: Bearer abc123XYZ.def-456", f"Authorization: Bearer {R}"),
    ("bearer token ending a sentence", "Send Bearer abc123def456.", f"Send Bearer {R}."),
    ("assignment", "host=db user=app password=hunter2 port=5432", f"host=db user=app password={R} port=5432"),
    ("quoted key", '{"api_key": "k-9f8e7d6c", "region": "eu"}', f'{{"api_key": "{R}", "region": "eu"}}'),
    ("env assignment", "export PGPASSWORD=hunter2;", f"export PGPASSWORD={R};"),
    ("openai key", "use sk-abcdefghijklmnop1234 here", f"use {R} here"),
    ("openai project key", "key sk-proj-AbCdEf0123456789_xyz-ok.", f"key {R}."),
    ("anthropic key", "(sk-ant-api03-AbCdEf0123456789xyz)", f"({R})"),
    ("aws access key id", "id AKIAIOSFODNN7EXAMPLE, session ASIAY34FZKBOKMUTVV7A", f"id {R}, session {R}"),
    ("github token", "ghp_0123456789abcdefghijABCDEFGHIJ and gho_0123456789abcdefghijABCD", f"{R} and {R}"),
    ("github app token", "ghs_0123456789abcdefghijABCD end", f"{R} end"),
    ("github fine-grained token", "github_pat_11ABCDEFG0123456789_abcdefghijklmnop", R),
    ("slack token", "post with xoxb-123456789012-abcdefABCDEF today", f"post with {R} today"),
    ("slack user token", "xoxp-1234-5678-abcdef0123", R),
    ("stripe key", "sk_live_51Habcdef0123456789", R),
    ("google api key", "AIzaSyA-abcdefghijklmnopqrstuvwxyz01234", R),
    ("jwt", "token eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0In0.sig_part-1 ok", f"token {R} ok"),
]


@pytest.mark.parametrize(("case", "text", "expected"), PATTERN_CASES, ids=[c[0] for c in PATTERN_CASES])
def test_a_secret_in_a_known_format_is_removed_from_inside_longer_text(
    case: str, text: str, expected: str
) -> None:
    assert Redactor().scrub(text) == expected


LOOKALIKES = [
    "a task-force-of-twelve-people met",  # `sk-` inside a word
    "author=Jane Doe wrote it",  # `auth` inside `author`
    "max_tokens=1024 and input_tokens=12",  # token counts are not tokens
    "see https://example.com:8080/path and user@example.com",  # a port, an address: no password
    "Bearer tokens are short-lived",  # the word, not a token (no digit, too short)
    "AKIA is a prefix, AKIA123 is too short",
]


@pytest.mark.parametrize("text", LOOKALIKES)
def test_ordinary_text_that_looks_alike_is_left_alone(text: str) -> None:
    assert Redactor().scrub(text) == text


class Login(BaseModel):
    user: str
    password: SecretStr
    cache: str = Field(default="", exclude=True)  # not serialized, still searched


@dataclass
class Deps:
    customer: str
    api_key: str
    login: Login
    headers: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)


def test_values_under_credential_names_are_found_at_any_depth_and_removed_everywhere() -> None:
    deps = Deps(
        customer="acme",
        api_key="k-plain-8f3a",  # no known format: a secret by its name alone
        login=Login(user="app", password=SecretStr("pw-9d8c7b"), cache="token=zz-cache-77"),
        headers={"X-Trace": "t1", "Authorization": "Basic dXNlcjpwYXNz"},
        notes=["call with k-plain-8f3a", "db postgresql://app:hunter2@db/prod"],
    )
    redactor = Redactor.collect(deps)

    assert set(redactor.values) == {
        "k-plain-8f3a",
        "pw-9d8c7b",
        "Basic dXNlcjpwYXNz",
        "hunter2",
        "zz-cache-77",
    }
    assert redactor.values[0] == "Basic dXNlcjpwYXNz"  # longest first: a secret inside another goes with it
    text = "failed: k-plain-8f3a rejected, pw-9d8c7b wrong, hunter2 expired (dXNlcjpwYXNz)"
    assert redactor.scrub(text) == f"failed: {R} rejected, {R} wrong, {R} expired (dXNlcjpwYXNz)"


def test_short_values_are_redacted_where_they_stand_but_not_searched_for() -> None:
    inputs = RunInputs.of({"pin": "x", "password": "abc12", "note": "abc12 is short"}, None)

    assert MIN_SECRET_LENGTH == 6
    assert inputs.deps == {"pin": "x", "password": R, "note": "abc12 is short"}
    assert inputs.secrets.values == ()


def test_run_inputs_say_which_fields_they_changed_and_scrub_the_prompt() -> None:
    key = "k-plain-8f3a"
    deps = {"api_key": key, "customer": "acme", "note": f"token {key}", "url": "mysql://u:hunter2@h/d"}
    inputs = RunInputs.of(
        deps, {"team": "data"}, prompt="Use Bearer abc123def456 and sk-abcdefghijklmnop1234"
    )

    assert inputs.deps == {
        "api_key": R,
        "customer": "acme",
        "note": f"token {R}",
        "url": f"mysql://u:{R}@h/d",
    }
    assert inputs.redacted == ("deps.api_key", "deps.note", "deps.url", "prompt")
    assert inputs.prompt == f"Use Bearer {R} and {R}"
    assert "abc123def456" in inputs.secrets.values  # the prompt's token is hidden from the run's logs too


def test_a_rotated_secret_leaves_the_seed_unchanged() -> None:
    def inputs(key: str) -> RunInputs:
        return RunInputs.of({"api_key": key, "note": f"token {key}", "dsn": f"pg://a:{key}@h"}, None)

    assert inputs("first-secret-1").seed("a") == inputs("second-secret-2").seed("a")
    assert inputs("first-secret-1").seed("a") != RunInputs.of({"api_key": "x"}, None).seed("a")


def test_an_exception_and_its_cause_lose_the_secret_in_place() -> None:
    redactor = Redactor.of(["hunter2-pw"])
    try:
        try:
            raise OSError(2, "no such file hunter2-pw", "/tmp/hunter2-pw")
        except OSError as cause:
            raise ConnectionError("cannot reach postgresql://app:hunter2-pw@db") from cause
    except ConnectionError as exc:
        error = exc

    redactor.scrub_exception(error)

    assert str(error) == f"cannot reach postgresql://app:{R}@db"
    assert isinstance(error.__cause__, OSError)
    assert (error.__cause__.strerror, error.__cause__.filename) == (f"no such file {R}", f"/tmp/{R}")


def test_log_records_are_scrubbed_as_they_are_created_only_inside_a_run(
    caplog: pytest.LogCaptureFixture,
) -> None:
    logger = logging.getLogger("some.library")
    with caplog.at_level(logging.DEBUG, logger="some.library"):
        logger.debug("outside %s", "k-plain-8f3a")
        with redacting(Redactor.of(["k-plain-8f3a"])) as active:
            assert current() is active
            logger.debug("inside %s and %s", "k-plain-8f3a", "ghp_0123456789abcdefghijABCD")
            try:
                raise ValueError("bad key k-plain-8f3a")
            except ValueError:
                logger.exception("failed")
        assert current().values == ()

    outside, inside, failed = caplog.records
    assert outside.getMessage() == "outside k-plain-8f3a"
    assert inside.getMessage() == f"inside {R} and {R}"
    assert failed.exc_text is not None and "k-plain-8f3a" not in failed.exc_text and R in failed.exc_text
    assert caplog.text.count("k-plain-8f3a") == 1  # the line logged outside the run, alone


def test_a_nested_run_hides_its_own_secrets_and_the_enclosing_runs() -> None:
    with redacting(Redactor.of(["outer-secret"])), redacting(Redactor.of(["inner-secret"])) as nested:
        assert nested.scrub("outer-secret inner-secret") == f"{R} {R}"


def test_secrets_in_finds_only_the_secret_part() -> None:
    assert secrets_in("postgresql://app:hunter2@db/prod Bearer abc123def456") == ["hunter2", "abc123def456"]
