"""Secret-looking deps and metadata are never stored, logged or keyed (README, "Secrets").

A run gets a secret under a secret-looking field name (`api_key`), a secret-looking value under a harmless name
(`note`) and a secret in its metadata. The tests then look for those strings everywhere a run leaves a trace:
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


async def _fail_after_the_first_model_step(
    agent: PrefectAgent[Creds, str], deps: Creds, **kwargs: Any
) -> str:
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
