"""Secret-looking deps and metadata are never stored, logged or keyed (README, "Secrets").

A run gets a secret under a secret-looking field name (`api_key`), a secret-looking value under a harmless name
(`note`) and a secret in its metadata. Another run's deps, metadata and prompt hide secrets in every form the
redactor knows: a value under a credential-like name quoted in free text, a password inside a URL, a bearer
token, a `password=` assignment in a config string, a `SecretStr`, OpenAI / Anthropic / AWS / GitHub / Slack keys
inside longer strings, and an error message quoting them. The tests then look for those strings everywhere a run leaves a trace:
every file of the session's Prefect home and result storage (journal entries, run records, the Prefect server's
database), the logs at DEBUG, and the flow run, task runs, logs and artifacts read back through Prefect's API.
A changed secret still replays the run (it is not part of any key), and a resume rebuilds redacted deps through
`deps_for_resume=`, or says in one line that it needs it.
"""

from __future__ import annotations

import json
import logging
import os
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from prefect import get_run_logger
from prefect.client.orchestration import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    FlowRunFilter,
    FlowRunFilterId,
    FlowRunFilterTags,
    LogFilter,
    LogFilterFlowRunId,
)
from prefect.logging.handlers import APILogHandler
from pydantic import BaseModel, SecretStr
from pydantic_ai import Agent, RunContext
from pydantic_ai.messages import ModelMessage, ModelResponse, TextPart, ToolCallPart, ToolReturnPart
from pydantic_ai.models.function import AgentInfo, FunctionModel

import prefect_pydantic_ai
from prefect_pydantic_ai import PrefectAgent, RunError, TaskConfig
from prefect_pydantic_ai.store.records import read_record

pytestmark = pytest.mark.anyio


@dataclass
class Creds:
    region: str
    api_key: str  # secret by its name
    note: str  # harmless name, secret-looking value


model_calls: list[int] = []
tool_saw: list[str] = []  # the api_key each executed tool call received
fail_tool: list[bool] = []  # while non-empty, the tool fails (the run stops after its first model step)


def script(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    model_calls.append(1)
    if not [p for m in messages for p in m.parts if isinstance(p, ToolReturnPart)]:
        return ModelResponse(parts=[ToolCallPart("who_am_i", {})])
    return ModelResponse(parts=[TextPart("done")])


agent: Agent[Creds, str] = Agent(FunctionModel(script), name="secrets_agent", deps_type=Creds)


@agent.tool
def who_am_i(ctx: RunContext[Creds]) -> str:
    tool_saw.append(ctx.deps.api_key)
    if fail_tool:
        raise ConnectionError("the tool's service is down")
    return f"user in {ctx.deps.region}"  # never echoes a secret into the conversation


REBUILT_KEY = f"sk-rebuilt-{uuid.uuid4().hex}"


def rebuild(stored: Any) -> Creds:
    """What a user's deps_for_resume does: non-secret fields from the record, secrets from the environment."""
    return Creds(region=stored["region"], api_key=REBUILT_KEY, note=f"sk-note-{REBUILT_KEY}")


no_retries = TaskConfig(retries=0)
durable = PrefectAgent(agent, tool_task_config=no_retries, deps_for_resume=rebuild)
durable_without_rebuild = PrefectAgent(agent, tool_task_config=no_retries)


@pytest.fixture(autouse=True)
def _fresh_counts() -> Iterator[None]:
    for calls in (model_calls, tool_saw, fail_tool):
        calls.clear()
    yield
    fail_tool.clear()


def _secrets() -> tuple[Creds, str]:
    """Deps and a metadata value holding three different secrets, unique to this test."""
    tag = uuid.uuid4().hex
    return Creds(region="eu", api_key=f"sk-live-{tag}", note=f"sk-abc-{tag}"), f"tok-meta-{tag}"


class _Capture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.lines: list[str] = []
        self.levels: set[int] = set()

    def emit(self, record: logging.LogRecord) -> None:
        self.levels.add(record.levelno)
        self.lines.append(f"{record.name} {record.getMessage()} {record.__dict__}")


@pytest.fixture
def debug_logs() -> Iterator[_Capture]:
    """Every log record of this process at DEBUG, from Prefect, pydantic-ai, us and anything else."""
    capture = _Capture()
    names = ["", "prefect", "prefect_pydantic_ai", "pydantic_ai"]
    names += [n for n in logging.root.manager.loggerDict if n.startswith(("prefect", "pydantic_ai", "httpx"))]
    loggers = [logging.getLogger(name) for name in dict.fromkeys(names)]
    levels = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(logging.DEBUG)
        logger.addHandler(capture)  # also on loggers that do not propagate (prefect._internal, prefect.extra)
    yield capture
    for logger, level in zip(loggers, levels, strict=True):
        logger.removeHandler(capture)
        logger.setLevel(level)


def _session_files() -> Iterator[Path]:
    """Every file of this test session: Prefect home (with the server's database) and result storage."""
    session = Path(os.environ["PREFECT_HOME"]).parent  # conftest puts the result storage there too
    assert Path(os.environ["PREFECT_LOCAL_STORAGE_PATH"]).is_relative_to(session)
    yield from (path for path in session.rglob("*") if path.is_file())


def _files_containing(secrets: list[str]) -> list[str]:
    found = []
    for path in _session_files():
        try:
            data = path.read_bytes()
        except OSError:
            continue
        found += [f"{path}: {s}" for s in secrets if s.encode() in data]
    return found


async def _api_view(flow_run_id: Any) -> str:
    """The flow run, its task runs, logs and artifacts as Prefect's API returns them, as one JSON text."""
    await APILogHandler.aflush()
    async with get_client() as client:
        flow_run = await client.read_flow_run(flow_run_id)
        task_runs = await client.read_task_runs(
            flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id]))
        )
        logs = await client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
        artifacts = await client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id]))
        )
    assert task_runs and artifacts  # there is something to look at
    parts = [flow_run, *task_runs, *logs, *artifacts]
    return json.dumps([part.model_dump(mode="json") for part in parts])


async def test_secrets_are_not_stored_logged_or_shown_and_a_changed_secret_still_replays(
    debug_logs: _Capture,
) -> None:
    deps, meta_secret = _secrets()
    key = f"secrets-{uuid.uuid4().hex[:10]}"
    metadata = {"team": "data", "auth_token": meta_secret}
    fail_tool.append(True)

    with pytest.raises(ConnectionError):
        await durable.run("Who am I?", deps=deps, metadata=metadata, idempotency_key=key)
    assert (len(model_calls), tool_saw) == (1, [deps.api_key])  # stopped after the first model step

    rotated, rotated_meta = _secrets()
    rotated_metadata = {"team": "data", "auth_token": rotated_meta}
    fail_tool.clear()
    result = await durable.run("Who am I?", deps=rotated, metadata=rotated_metadata, idempotency_key=key)

    assert result.output == "done"
    assert len(model_calls) == 2  # the first model step replayed although every secret changed: none is keyed
    assert tool_saw == [deps.api_key, rotated.api_key]  # the live deps reach the tool, secrets included
    flow_runs = await _flow_runs_of(key)
    assert len(flow_runs) == 2  # the failed attempt and the one that completed
    for flow_run_id in flow_runs:
        record = await read_record(str(flow_run_id), "secrets_agent", 0)
        assert record is not None
        assert record.redacted == ["deps.api_key", "deps.note", "metadata.auth_token"]
        assert record.deps == {"region": "eu", "api_key": "<redacted>", "note": "<redacted>"}

    secrets = [deps.api_key, deps.note, meta_secret, rotated.api_key, rotated.note, rotated_meta]
    for flow_run_id in flow_runs:
        api = await _api_view(flow_run_id)
        assert [s for s in secrets if s in api] == []
    assert [s for s in secrets if any(s in line for line in debug_logs.lines)] == []
    assert logging.DEBUG in debug_logs.levels  # the capture really ran at DEBUG, and saw the run's own logs
    assert any(line.startswith(("prefect.flow_runs ", "prefect.task_runs ")) for line in debug_logs.lines)
    assert _files_containing(secrets) == []


async def _flow_runs_of(key: str) -> list[Any]:
    """The ids of the flow runs (one per attempt started by `run`) of the logical run `key`."""
    async with get_client() as client:
        flow_runs = await client.read_flow_runs(
            flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[f"key:{key}"]))
        )
    return [flow_run.id for flow_run in flow_runs]


async def _fail_after_the_first_model_step(agent: PrefectAgent[Any, str], deps: Any, **kwargs: Any) -> str:
    """Run until the tool fails; return the flow run id."""
    key = f"secrets-{uuid.uuid4().hex[:10]}"
    fail_tool.append(True)
    with pytest.raises(ConnectionError):
        await agent.run("Who am I?", deps=deps, idempotency_key=key, **kwargs)
    fail_tool.clear()
    assert (len(model_calls), tool_saw) == (1, [deps.api_key])
    [flow_run_id] = await _flow_runs_of(key)
    return str(flow_run_id)


async def test_a_resume_rebuilds_redacted_deps_with_deps_for_resume() -> None:
    deps, _ = _secrets()
    flow_run_id = await _fail_after_the_first_model_step(durable, deps)

    result = await prefect_pydantic_ai.resume_run(flow_run_id)

    assert result.output == "done"
    assert tool_saw == [deps.api_key, REBUILT_KEY]  # the resumed tool call got the rebuilt secret
    assert len(model_calls) == 2  # the first model step replayed: the rebuilt deps key the same steps


async def test_a_resume_with_metadata_rebuilds_redacted_deps_and_replays() -> None:
    deps, meta_secret = _secrets()
    flow_run_id = await _fail_after_the_first_model_step(
        durable, deps, metadata={"team": "data", "auth_token": meta_secret}
    )

    result = await prefect_pydantic_ai.resume_run(flow_run_id)

    assert result.output == "done"
    assert tool_saw == [deps.api_key, REBUILT_KEY]
    assert len(model_calls) == 2


async def test_a_resume_of_redacted_deps_without_deps_for_resume_fails_in_one_line() -> None:
    deps, _ = _secrets()
    flow_run_id = await _fail_after_the_first_model_step(durable_without_rebuild, deps)

    with pytest.raises(RunError) as failure:
        await prefect_pydantic_ai.resume_run(flow_run_id)

    assert str(failure.value) == (
        f"The deps of run {flow_run_id} held secret-looking values that were not stored (deps.api_key, "
        "deps.note); pass deps_for_resume= to PrefectAgent('secrets_agent') to rebuild them on resume."
    )
    assert (len(model_calls), tool_saw) == (1, [deps.api_key])  # nothing ran


async def test_a_refused_resume_leaves_the_run_failed() -> None:
    deps, _ = _secrets()
    flow_run_id = await _fail_after_the_first_model_step(durable_without_rebuild, deps)

    with pytest.raises(RunError):
        await prefect_pydantic_ai.resume_run(flow_run_id)

    async with get_client() as client:
        state = (await client.read_flow_run(flow_run_id)).state
    assert state is not None and state.type.value == "FAILED"


# -- secrets hidden in free text, URLs, headers, configs, SecretStr and the prompt -----------------------------


class Login(BaseModel):
    user: str
    password: SecretStr


@dataclass
class Service:
    customer: str  # not a secret: stored, unless the agent stores no deps
    api_key: str  # a secret by its name alone (no known format), quoted again in `note`
    note: str
    db_url: str  # a password inside a URL
    headers: dict[str, str]  # a bearer token under `Authorization`
    config: str  # a `password=` assignment
    login: Login  # a SecretStr
    keys: list[str]  # well-known key formats inside longer strings


def service(tag: str) -> Service:
    """Deps holding a dozen secrets, all made from `tag`; their stored form does not depend on it."""
    api_key = f"plain-{tag[:12]}"
    return Service(
        customer=f"acme-{tag[:8]}",
        api_key=api_key,
        note=f"key {api_key}, fallback sk-proj-{tag}",
        db_url=f"postgresql://app:pw{tag[:10]}@db/prod",
        headers={"Authorization": f"Bearer tok{tag[:16]}9", "X-Team": "data"},
        config=f"host=db password=cfg{tag[:8]} sslmode=require",
        login=Login(user="app", password=SecretStr(f"secret-{tag[:10]}")),
        keys=[
            f"aws AKIA{tag[:16].upper()}",
            f"gh ghp_{tag[:30]}",
            f"slack xoxb-{tag[:20]}",
            f"claude sk-ant-api03-{tag}",
        ],
    )


def secrets_of(deps: Service) -> list[str]:
    """Every secret `deps` holds, as the bytes that must be found nowhere."""
    return [
        deps.api_key,
        deps.note.rpartition(" ")[2],
        deps.db_url.split(":")[2].split("@")[0],
        deps.headers["Authorization"].split()[1],
        deps.config.split("password=")[1].split()[0],
        deps.login.password.get_secret_value(),
        *(text.split()[1] for text in deps.keys),
    ]


STORED_SERVICE = {
    "api_key": "<redacted>",
    "note": "key <redacted>, fallback <redacted>",
    "db_url": "postgresql://app:<redacted>@db/prod",
    "headers": {"Authorization": "<redacted>", "X-Team": "data"},
    "config": "host=db password=<redacted> sslmode=require",
    "login": {"user": "app", "password": "<redacted>"},
    "keys": ["aws <redacted>", "gh <redacted>", "slack <redacted>", "claude <redacted>"],
}
SERVICE_PATHS = [
    "deps.api_key",
    "deps.note",
    "deps.db_url",
    "deps.headers.Authorization",
    "deps.config",
    "deps.login.password",
    *(f"deps.keys[{i}]" for i in range(4)),
]

service_agent: Agent[Service, str] = Agent(FunctionModel(script), name="service_agent", deps_type=Service)


@service_agent.tool(name="who_am_i")
def who_am_i_at_the_service(ctx: RunContext[Service]) -> str:
    tool_saw.append(ctx.deps.api_key)
    # code in a run logs its secrets, as drivers and clients do at DEBUG: to the process and to Prefect's API
    logging.getLogger("service.driver").debug("connecting to %s with %s", ctx.deps.db_url, ctx.deps.headers)
    get_run_logger().info("calling the service with key %s (%s)", ctx.deps.api_key, ctx.deps.keys)
    if fail_tool:  # the error quotes the secrets, as a driver's connection error does
        deps = ctx.deps
        raise ConnectionError(f"cannot reach {deps.db_url} as {deps.login.password.get_secret_value()}")
    return "user found"  # never echoes a secret (or the customer) into the conversation


REBUILT_TAG = uuid.uuid4().hex


def rebuild_service(stored: Any) -> Service:
    """A user's deps_for_resume: the deps made again from the environment's secrets (here: a new tag)."""
    rebuilt = service(REBUILT_TAG)
    rebuilt.customer = stored["customer"] if stored is not None else rebuilt.customer
    return rebuilt


durable_service = PrefectAgent(service_agent, tool_task_config=no_retries, deps_for_resume=rebuild_service)

UNSTORED_TAG = uuid.uuid4().hex  # with store_deps=False, deps_for_resume rebuilds every field, secrets or not
rebuilt_from: list[Any] = []


def rebuild_unstored(stored: Any) -> Service:
    rebuilt_from.append(stored)
    return service(UNSTORED_TAG)


durable_unstored = PrefectAgent(
    service_agent, tool_task_config=no_retries, deps_for_resume=rebuild_unstored, store_deps=False
)
durable_unstored_without_rebuild = PrefectAgent(service_agent, tool_task_config=no_retries, store_deps=False)


async def _assert_written_nowhere(secrets: list[str], flow_runs: list[Any], debug_logs: _Capture) -> None:
    """No byte of `secrets` in the flow runs, their task runs, logs and artifacts (API), the DEBUG logs of this
    process, or any file of the session (result storage, run records, progress logs, the server's database)."""
    for flow_run_id in flow_runs:
        api = await _api_view(flow_run_id)
        assert [s for s in secrets if s in api] == []
    assert [s for s in secrets if any(s in line for line in debug_logs.lines)] == []
    assert any(line.startswith(("prefect.flow_runs ", "prefect.task_runs ")) for line in debug_logs.lines)
    assert _files_containing(secrets) == []


async def test_secrets_in_free_text_urls_configs_and_the_prompt_are_written_nowhere_and_the_run_replays(
    debug_logs: _Capture,
) -> None:
    tag = uuid.uuid4().hex
    deps = service(tag)
    prompt_token, prompt_bearer = f"ghp_{tag[::-1][:30]}", f"b{tag[-12:]}9"
    prompt = f"Who am I? Use {prompt_token} or Bearer {prompt_bearer}."
    hook_password = f"hook{tag[:9]}"
    metadata = {
        "team": "data",
        "auth_token": f"meta-{tag}",
        "callback": f"https://ci:{hook_password}@hooks.io/x",
    }
    key = f"secrets-{uuid.uuid4().hex[:10]}"
    fail_tool.append(True)

    with pytest.raises(ConnectionError) as failure:
        await durable_service.run(prompt, deps=deps, metadata=metadata, idempotency_key=key)
    assert str(failure.value) == "cannot reach postgresql://app:<redacted>@db/prod as <redacted>"
    fail_tool.clear()
    result = await durable_service.run(prompt, deps=deps, metadata=metadata, idempotency_key=key)

    assert result.output == "done"
    assert len(model_calls) == 2  # the first model step replayed: scrubbing is deterministic, keys unchanged
    flow_runs = await _flow_runs_of(key)
    assert len(flow_runs) == 2
    for flow_run_id in flow_runs:
        record = await read_record(str(flow_run_id), "service_agent", 0)
        assert record is not None
        assert record.deps == {"customer": deps.customer, **STORED_SERVICE}
        assert record.metadata == {
            "team": "data",
            "auth_token": "<redacted>",
            "callback": "https://ci:<redacted>@hooks.io/x",
        }
        assert record.prompt == "Who am I? Use <redacted> or Bearer <redacted>."
        assert record.redacted == [*SERVICE_PATHS, "metadata.auth_token", "metadata.callback", "prompt"]
        async with get_client() as client:
            parameters = (await client.read_flow_run(flow_run_id)).parameters
        assert parameters["prompt"] == record.prompt
    records = [await read_record(str(flow_run_id), "service_agent", 0) for flow_run_id in flow_runs]
    failed = [(r.flow_run_id, a.error) for r in records if r is not None for a in r.attempts if a.error]
    assert [error for _, error in failed] == [
        "ConnectionError: cannot reach postgresql://app:<redacted>@db/prod as <redacted>"
    ]

    driver_line = "connecting to postgresql://app:<redacted>@db/prod with {'Authorization': '<redacted>'"
    assert any(line.startswith(f"service.driver {driver_line}") for line in debug_logs.lines)
    async with get_client() as client:  # the run logger's line reached Prefect, scrubbed
        logs = await client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=flow_runs)))
    assert any(
        log.message.startswith("calling the service with key <redacted> (['aws <redacted>'") for log in logs
    )
    secrets = [*secrets_of(deps), prompt_token, prompt_bearer, metadata["auth_token"], hook_password]
    assert len(set(secrets)) == 14
    await _assert_written_nowhere(secrets, flow_runs, debug_logs)

    with pytest.raises(RunError) as refused:  # `resume` needs the prompt, which was not stored
        await prefect_pydantic_ai.resume_run(failed[0][0])
    assert str(refused.value).startswith(
        f"The prompt of run {failed[0][0]} held secret-looking values that were not stored, so `resume` cannot "
        "re-create it; run the agent again from your code with the same prompt and idempotency_key="
    )


async def test_a_resume_rebuilds_deps_whose_secrets_hid_in_free_text_and_replays(
    debug_logs: _Capture,
) -> None:
    deps = service(uuid.uuid4().hex)
    key = f"secrets-{uuid.uuid4().hex[:10]}"
    fail_tool.append(True)
    with pytest.raises(ConnectionError):
        await durable_service.run("Who am I?", deps=deps, idempotency_key=key)
    fail_tool.clear()
    [flow_run_id] = await _flow_runs_of(key)

    result = await prefect_pydantic_ai.resume_run(str(flow_run_id))

    assert result.output == "done"
    assert tool_saw == [deps.api_key, service(REBUILT_TAG).api_key]
    assert len(model_calls) == 2  # the rebuilt deps are stored alike: the first model step replayed
    await _assert_written_nowhere(
        [*secrets_of(deps), *secrets_of(service(REBUILT_TAG))], [flow_run_id], debug_logs
    )


async def test_with_store_deps_false_the_record_keeps_nothing_of_the_deps_and_a_resume_rebuilds_them() -> (
    None
):
    deps = service(UNSTORED_TAG)
    rebuilt_from.clear()
    flow_run_id = await _fail_after_the_first_model_step(durable_unstored, deps)

    record = await read_record(flow_run_id, "service_agent", 0)
    assert record is not None and (record.deps, record.redacted) == (None, ["deps"])
    assert _files_containing([deps.customer, *secrets_of(deps)]) == []  # not even the harmless fields
    result = await prefect_pydantic_ai.resume_run(flow_run_id)

    assert result.output == "done"
    assert rebuilt_from == [None]  # nothing stored to start from
    assert tool_saw == [deps.api_key, deps.api_key]
    assert len(model_calls) == 2  # the deps still seed the keys (in memory): the first model step replayed


async def test_with_store_deps_false_a_resume_without_deps_for_resume_fails_in_one_line() -> None:
    flow_run_id = await _fail_after_the_first_model_step(
        durable_unstored_without_rebuild, service(uuid.uuid4().hex)
    )

    with pytest.raises(RunError) as failure:
        await prefect_pydantic_ai.resume_run(flow_run_id)

    assert str(failure.value) == (
        f"The deps of run {flow_run_id} were not stored (store_deps=False); pass deps_for_resume= to "
        "PrefectAgent('service_agent') to rebuild them on resume."
    )


async def test_a_step_error_is_scrubbed_before_prefect_records_it_even_with_its_run_logs_off() -> None:
    """With Prefect's run loggers off no log record is made (and scrubbed) of the failure: the error must
    already be clean when it leaves the step, because Prefect makes it the task run's state message."""
    quiet = [logging.getLogger(name) for name in ("prefect.task_runs", "prefect.flow_runs")]
    levels = [logger.level for logger in quiet]
    for logger in quiet:
        logger.setLevel(logging.CRITICAL + 1)
    try:
        deps = service(uuid.uuid4().hex)
        flow_run_id = await _fail_after_the_first_model_step(durable_service, deps)
    finally:
        for logger, level in zip(quiet, levels, strict=True):
            logger.setLevel(level)

    api = await _api_view(flow_run_id)
    assert "cannot reach postgresql://app:<redacted>@db/prod as <redacted>" in api  # the task run's state
    assert [s for s in secrets_of(deps) if s in api] == []
