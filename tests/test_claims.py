"""Documented promises of the durable core that no other test pins, each counted by what really executes.

README: exhausted tool retries are not retried; a tool-schema change makes the digest diverge; corrupt entries
are detected on any result storage. config.TaskConfig: `NO_CACHE`, `result_storage`, `persist_result=False`.
tool_step: every control-flow outcome of a tool (deferred, approval, failed, skipped) replays with its effect.
"""

from __future__ import annotations

import logging
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import fsspec
import pytest
from prefect.cache_policies import NO_CACHE
from prefect.filesystems import RemoteFileSystem
from pydantic_ai import Agent, ModelRetry, RunContext
from pydantic_ai.capabilities import AbstractCapability
from pydantic_ai.exceptions import (
    ApprovalRequired,
    CallDeferred,
    SkipToolExecution,
    ToolFailed,
    UnexpectedModelBehavior,
)
from pydantic_ai.messages import ModelMessage, ModelResponse, TextPart, ToolCallPart, ToolReturnPart
from pydantic_ai.models.function import AgentInfo, FunctionModel
from pydantic_ai.tools import DeferredToolRequests, ToolDefinition

from prefect_pydantic_ai import PrefectAgent, TaskConfig

pytestmark = pytest.mark.anyio


def _key() -> str:
    return f"claims-{uuid.uuid4().hex[:10]}"


def _returns(messages: list[ModelMessage]) -> list[ToolReturnPart]:
    return [p for m in messages for p in m.parts if isinstance(p, ToolReturnPart)]


def lookup_agent(calls: Counter[str], name: str, *, description: str = "Look a city up.") -> Agent[None, str]:
    """model → lookup(city) → model; `description` is the tool's description the model is offered."""

    def model(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        calls["model"] += 1
        done = _returns(messages)
        if not done:
            return ModelResponse(parts=[ToolCallPart("lookup", {"city": "Paris"})])
        return ModelResponse(parts=[TextPart(f"found {done[0].content}")])

    agent: Agent[None, str] = Agent(FunctionModel(model), name=name)

    def lookup(city: str) -> str:
        calls["lookup"] += 1
        return f"{city}: sunny"

    agent.tool_plain(description=description)(lookup)
    return agent


# -- errors retrying cannot fix ---------------------------------------------------------------------------------


async def test_exhausted_tool_retries_are_not_multiplied_by_the_steps_prefect_retries() -> None:
    executions: list[str] = []

    def model(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        return ModelResponse(parts=[ToolCallPart("picky", {"column": f"col{len(messages)}"})])

    agent: Agent[None, str] = Agent(FunctionModel(model), name="claims_exhausted")

    @agent.tool_plain(retries=2)
    def picky(column: str) -> str:
        executions.append(column)
        raise ModelRetry(f"no column {column!r}")

    durable = PrefectAgent(agent, tool_task_config=TaskConfig(retries=3, retry_delay_seconds=0))
    with pytest.raises(UnexpectedModelBehavior, match="exceeded max retries count of 2") as failure:
        await durable.run("go", idempotency_key=_key())
    assert (
        len(executions) == 3
    )  # the tool's max_retries + 1, not (max_retries + 1) * (TaskConfig.retries + 1)
    assert "in tool step 'picky', not retried: retrying cannot fix it" in str(failure.value.__notes__)


# -- the digest: what the model is offered keys its steps -------------------------------------------------------


@pytest.mark.slow
async def test_a_changed_tool_description_runs_the_steps_live_and_an_unchanged_agent_replays() -> None:
    key = _key()
    first = Counter[str]()
    result = await PrefectAgent(lookup_agent(first, "claims_schema")).run("go", idempotency_key=key)
    assert result.output == "found Paris: sunny"
    assert first == Counter(model=2, lookup=1)

    unchanged = Counter[str]()  # a new agent object, as a new process builds it: the same steps
    await PrefectAgent(lookup_agent(unchanged, "claims_schema")).run("go", idempotency_key=key)
    assert unchanged == Counter()

    described = Counter[str]()
    changed = lookup_agent(described, "claims_schema", description="Look a city up, in Celsius.")
    await PrefectAgent(changed).run("go", idempotency_key=key)
    assert described == Counter(model=2, lookup=1)  # from the first model request on, everything ran live

    reshaped = Counter[str]()
    agent = lookup_agent(reshaped, "claims_schema")

    @agent.tool_plain
    def units() -> str:  # another tool offered: the parameters the model sees changed
        return "celsius"

    await PrefectAgent(agent).run("go", idempotency_key=key)
    assert reshaped == Counter(model=2, lookup=1)

    again = Counter[str]()  # each variant's own steps are journaled too
    await PrefectAgent(lookup_agent(again, "claims_schema", description="Look a city up, in Celsius.")).run(
        "go", idempotency_key=key
    )
    assert again == Counter()


async def test_a_changed_tool_parameter_schema_runs_the_steps_live_again() -> None:
    key = _key()

    def agent_with(parameter_type: type) -> tuple[Agent[None, str], Counter[str]]:
        calls = Counter[str]()

        def model(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
            calls["model"] += 1
            if not _returns(messages):
                return ModelResponse(parts=[ToolCallPart("scale", {"x": 2})])
            return ModelResponse(parts=[TextPart("scaled")])

        agent: Agent[None, str] = Agent(FunctionModel(model), name="claims_parameters")

        def scale(x: Any) -> str:
            calls["scale"] += 1
            return str(x)

        scale.__annotations__ = {"x": parameter_type, "return": str}
        agent.tool_plain(scale)
        return agent, calls

    agent, calls = agent_with(int)
    await PrefectAgent(agent).run("go", idempotency_key=key)
    agent, replayed = agent_with(int)
    await PrefectAgent(agent).run("go", idempotency_key=key)
    agent, changed = agent_with(float)  # `x: float`: a different JSON schema for the same tool
    await PrefectAgent(agent).run("go", idempotency_key=key)
    assert (calls, replayed, changed) == (Counter(model=2, scale=1), Counter(), Counter(model=2, scale=1))


# -- TaskConfig's result handling -------------------------------------------------------------------------------


async def test_no_cache_steps_always_execute_again_and_the_others_replay() -> None:
    calls = Counter[str]()
    durable = PrefectAgent(
        lookup_agent(calls, "claims_no_cache"),
        tool_task_config_by_name={"lookup": TaskConfig(cache_policy=NO_CACHE)},
    )
    key = _key()
    await durable.run("go", idempotency_key=key)
    calls.clear()
    assert (await durable.run("go", idempotency_key=key)).output == "found Paris: sunny"
    assert calls == Counter(lookup=1)  # the models replayed, the NO_CACHE tool executed again


async def test_persist_result_false_journals_nothing_and_the_step_executes_again(storage_dir: Path) -> None:
    calls = Counter[str]()
    durable = PrefectAgent(
        lookup_agent(calls, "claims_no_persist"),
        tool_task_config_by_name={"lookup": TaskConfig(persist_result=False)},
    )
    key = _key()
    storage_dir.mkdir(parents=True, exist_ok=True)
    before = set(storage_dir.iterdir())
    await durable.run("go", idempotency_key=key)
    assert len(set(storage_dir.iterdir()) - before) == 2  # the two model steps' entries, none for the tool
    calls.clear()
    await durable.run("go", idempotency_key=key)
    assert calls == Counter(lookup=1)


class RemoteStorage:
    """A saved result-storage block that is not a local directory (fsspec's in-memory filesystem), so the journal
    uses it as configured instead of its local fast path; `entries()` are the files stored in it."""

    def __init__(self) -> None:
        self.name = f"claims-{uuid.uuid4().hex[:8]}"
        self.root = f"/{self.name}"
        self.block = RemoteFileSystem(basepath=f"memory://{self.name}")
        self._fs = fsspec.filesystem("memory")

    async def save(self) -> RemoteFileSystem:
        await self.block.save(self.name)
        return self.block

    def entries(self) -> list[str]:
        return list(self._fs.ls(self.root, detail=False)) if self._fs.exists(self.root) else []

    def read(self, path: str) -> bytes:
        return bytes(self._fs.cat(path))

    def write(self, path: str, content: bytes) -> None:
        self._fs.pipe(path, content)


async def test_entries_land_in_a_custom_result_storage_and_replay_from_it(storage_dir: Path) -> None:
    calls = Counter[str]()
    custom = RemoteStorage()
    durable = PrefectAgent(
        lookup_agent(calls, "claims_custom_storage"),
        tool_task_config=TaskConfig(result_storage=await custom.save()),
    )
    key = _key()
    storage_dir.mkdir(parents=True, exist_ok=True)
    before = set(storage_dir.iterdir())
    await durable.run("go", idempotency_key=key)
    assert len(custom.entries()) == 1  # the tool's entry, and only it, is in the custom storage
    assert len(set(storage_dir.iterdir()) - before) == 2  # the model steps' entries stay in the default one
    calls.clear()
    await durable.run("go", idempotency_key=key)
    assert calls == Counter()


@pytest.mark.parametrize("damage", ["tampered", "garbage"])
async def test_a_corrupt_entry_in_a_non_local_storage_is_re_executed_with_a_warning(
    damage: str, caplog: pytest.LogCaptureFixture
) -> None:
    calls = Counter[str]()
    custom = RemoteStorage()
    durable = PrefectAgent(
        lookup_agent(calls, f"claims_corrupt_{damage}"),
        tool_task_config=TaskConfig(result_storage=await custom.save()),
    )
    key = _key()
    await durable.run("go", idempotency_key=key)
    [entry] = custom.entries()
    if damage == "tampered":  # still valid JSON, but its checksum no longer matches
        custom.write(entry, custom.read(entry).replace(b"sunny", b"rainy"))
    else:
        custom.write(entry, b"{ not json")

    calls.clear()
    with caplog.at_level(logging.WARNING, logger="prefect_pydantic_ai"):
        result = await durable.run("go", idempotency_key=key)
    assert result.output == "found Paris: sunny"
    assert calls == Counter(lookup=1)
    warnings = [r.getMessage() for r in caplog.records if r.name == "prefect_pydantic_ai"]
    assert len(warnings) == 1 and "corrupt" in warnings[0] and "'lookup'" in warnings[0]

    calls.clear()
    await durable.run("go", idempotency_key=key)  # the re-executed step replaced the bad entry
    assert calls == Counter()


# -- control-flow outcomes of a tool replay with the same effect ------------------------------------------------


def deferring_agent(calls: Counter[str], name: str) -> Agent[None, str | DeferredToolRequests]:
    """One response calling `external` (CallDeferred) and `dangerous` (ApprovalRequired): the run ends with both
    as deferred tool requests."""

    def model(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        calls["model"] += 1
        return ModelResponse(
            parts=[ToolCallPart("external", {"job": 7}), ToolCallPart("dangerous", {"rm": "/"})]
        )

    agent: Agent[None, str | DeferredToolRequests] = Agent(
        FunctionModel(model), name=name, output_type=[str, DeferredToolRequests]
    )

    @agent.tool_plain
    def external(job: int) -> str:
        calls["external"] += 1
        raise CallDeferred({"job": job}, kind="question")

    @agent.tool
    def dangerous(ctx: RunContext[None], rm: str) -> str:
        calls["dangerous"] += 1
        raise ApprovalRequired({"reason": f"removes {rm}"})

    return agent


async def test_deferred_and_approval_outcomes_replay_as_the_same_requests_without_the_tools() -> None:
    calls = Counter[str]()
    durable = PrefectAgent(deferring_agent(calls, "claims_deferred"))
    key = _key()
    first = await durable.run("go", idempotency_key=key)
    assert calls == Counter(model=1, external=1, dangerous=1)
    assert isinstance(first.output, DeferredToolRequests)
    assert [c.tool_name for c in first.output.calls] == ["external"]
    assert [c.tool_name for c in first.output.approvals] == ["dangerous"]

    calls.clear()
    again = await durable.run("go", idempotency_key=key)
    assert calls == Counter()
    assert isinstance(again.output, DeferredToolRequests)
    assert again.output.calls == first.output.calls and again.output.approvals == first.output.approvals
    assert again.output.metadata == first.output.metadata
    assert again.output.metadata[first.output.calls[0].tool_call_id] == {"job": 7}
    assert again.output.kind(first.output.calls[0].tool_call_id) == "question"
    assert again.usage == first.usage


async def test_a_failed_tool_outcome_replays_as_the_same_failure_the_model_saw() -> None:
    calls = Counter[str]()

    def model(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        calls["model"] += 1
        done = _returns(messages)
        if not done:
            return ModelResponse(parts=[ToolCallPart("fetch", {"id": 9})])
        return ModelResponse(parts=[TextPart(f"{done[0].outcome}: {done[0].content}")])

    agent: Agent[None, str] = Agent(FunctionModel(model), name="claims_tool_failed")

    @agent.tool_plain
    def fetch(id: int) -> str:
        calls["fetch"] += 1
        raise ToolFailed(f"record {id} was deleted")

    durable = PrefectAgent(agent, tool_task_config=TaskConfig(retries=2))
    key = _key()
    first = await durable.run("go", idempotency_key=key)
    assert calls == Counter(model=2, fetch=1)  # a failure the model sees, not an error Prefect retries
    assert "record 9 was deleted" in first.output and first.output.startswith("failed")

    calls.clear()
    again = await durable.run("go", idempotency_key=key)
    assert calls == Counter() and again.output == first.output and again.usage == first.usage
    assert [m.kind for m in again.all_messages()] == [m.kind for m in first.all_messages()]


class SkipLookups(AbstractCapability[Any]):
    """A hook that answers `lookup` itself (`SkipToolExecution`), counting the times it is asked."""

    def __init__(self, asked: Counter[str]) -> None:
        self.asked = asked

    async def before_tool_execute(
        self, ctx: RunContext[Any], *, call: ToolCallPart, tool_def: ToolDefinition, args: dict[str, Any]
    ) -> dict[str, Any]:
        self.asked["hook"] += 1
        raise SkipToolExecution(f"cached answer for {args['city']}")


async def test_a_skipped_tool_execution_replays_its_result_without_the_hook_or_the_tool() -> None:
    calls = Counter[str]()
    durable = PrefectAgent(lookup_agent(calls, "claims_skipped"))
    key = _key()
    first = await durable.run("go", idempotency_key=key, capabilities=[SkipLookups(calls)])
    assert first.output == "found cached answer for Paris"
    assert calls == Counter(model=2, hook=1)  # the tool body never ran

    calls.clear()
    again = await durable.run("go", idempotency_key=key, capabilities=[SkipLookups(calls)])
    assert again.output == first.output and calls == Counter()
    assert again.usage == first.usage
