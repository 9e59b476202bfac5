"""Behaviour of the durable core, counted: which model and tool calls actually execute, and what replays.

Each core test runs under both durable forms (the `form` fixture): `PrefectAgent(agent, ...)` called with
`idempotency_key=`, and an agent built with `capabilities=[PrefectDurability(...)]` called inside
`with idempotency_key(...)`.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from types import NoneType
from typing import Any

import pytest
from prefect import flow
from pydantic_ai import Agent
from pydantic_ai.exceptions import UserError
from pydantic_ai.messages import ModelMessage, ModelResponse, TextPart, ToolCallPart, ToolReturnPart
from pydantic_ai.models import Model
from pydantic_ai.models.function import AgentInfo, FunctionModel

from prefect_pydantic_ai import (
    DurabilityConfigError,
    NotJournalableError,
    PrefectAgent,
    PrefectDurability,
    TaskConfig,
    idempotency_key,
    ledger_of,
)
from prefect_pydantic_ai.durable.capability import durability_of

pytestmark = pytest.mark.anyio


def _key() -> str:
    return f"test-{uuid.uuid4().hex[:10]}"


class Calls:
    """Counts every model and tool call that really executes."""

    def __init__(self) -> None:
        self.log: list[str] = []

    def __call__(self, name: str) -> None:
        self.log.append(name)

    @property
    def counts(self) -> Counter[str]:
        return Counter(self.log)


def _returns(messages: list[ModelMessage]) -> list[ToolReturnPart]:
    return [p for m in messages for p in m.parts if isinstance(p, ToolReturnPart)]


within_key = idempotency_key  # the keyword argument of `Keyed.run` has the same name


class Keyed:
    """A capability-form agent called as a `PrefectAgent` is: `idempotency_key=` becomes `with idempotency_key()`."""

    def __init__(self, agent: Agent[Any, str]) -> None:
        self.agent = agent
        self.durability = durability_of(agent)  # what a flow holding this wrapper is checked by

    async def run(self, user_prompt: str, *, idempotency_key: str | None = None, **kwargs: Any) -> Any:
        with within_key(idempotency_key):
            return await self.agent.run(user_prompt, **kwargs)

    def run_sync(self, user_prompt: str, *, idempotency_key: str | None = None, **kwargs: Any) -> Any:
        with within_key(idempotency_key):
            return self.agent.run_sync(user_prompt, **kwargs)

    @asynccontextmanager
    async def iter(self, user_prompt: str, *, idempotency_key: str | None = None) -> AsyncIterator[Any]:
        with within_key(idempotency_key):
            async with self.agent.iter(user_prompt) as run:
                yield run


@dataclass(frozen=True)
class Form:
    """One way to make an agent durable: `form(model, name=..., **config)` is `(agent, durable)`.

    Tools are registered on `agent`; `durable` is what the test runs. `plain` makes no durable agent at all.
    """

    kind: str

    def __call__(
        self, model: Model | None, *, name: str | None, deps_type: type = NoneType, **config: Any
    ) -> tuple[Agent[Any, str], Any]:
        if self.kind == "capability":
            capable: Agent[Any, str] = Agent(
                model, name=name, deps_type=deps_type, capabilities=[PrefectDurability(**config)]
            )
            return capable, Keyed(capable)
        agent: Agent[Any, str] = Agent(model, name=name, deps_type=deps_type)
        if self.kind == "plain":
            assert not config
            return agent, agent
        return agent, PrefectAgent(agent, **config)


PLAIN = Form("plain")


@pytest.fixture(params=["PrefectAgent", "capability"])
def form(request: pytest.FixtureRequest) -> Form:
    return Form(request.param)


def two_tool_agent(
    calls: Calls,
    name: str = "analyst",
    *,
    fail_second_tool: list[int] | None = None,
    form: Form = PLAIN,
    **config: Any,
) -> Any:
    """model → stats → model → anomalies → model, made durable by `form` with `config`.

    `fail_second_tool` counts down failures of `anomalies`.
    """

    def model(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        calls("model")
        done = _returns(messages)
        if not done:
            return ModelResponse(parts=[ToolCallPart("stats", {"column": "sales"})])
        if len(done) == 1:
            return ModelResponse(parts=[ToolCallPart("anomalies", {"column": "sales"})])
        return ModelResponse(parts=[TextPart(f"stats={done[0].content} anomalies={done[1].content}")])

    agent, durable = form(FunctionModel(model), name=name, **config)

    @agent.tool_plain
    def stats(column: str) -> dict[str, float]:
        calls("stats")
        return {"mean": 101.5}

    @agent.tool_plain
    async def anomalies(column: str) -> list[int]:
        calls("anomalies")
        if fail_second_tool and fail_second_tool[0] > 0:
            fail_second_tool[0] -= 1
            raise ConnectionError("anomaly service unreachable")
        return [1000, 2000]

    return durable


EXPECTED = "stats={'mean': 101.5} anomalies=[1000, 2000]"


async def test_plain_run_executes_each_step_once_and_matches_the_plain_agent(form: Form) -> None:
    calls = Calls()
    plain = await two_tool_agent(calls).run("go")
    plain_counts = calls.counts
    calls.log.clear()
    result = await two_tool_agent(calls, form=form).run("go")
    assert result.output == plain.output == EXPECTED
    assert calls.counts == plain_counts == Counter(model=3, stats=1, anomalies=1)
    assert result.usage == plain.usage


async def test_failed_run_resumes_with_the_same_key_executing_only_the_failed_step_and_after(
    form: Form,
) -> None:
    calls = Calls()
    durable = two_tool_agent(calls, fail_second_tool=[3], form=form, tool_task_config=TaskConfig(retries=2))
    key = _key()
    with pytest.raises(ConnectionError, match="unreachable") as failure:
        await durable.run("go", idempotency_key=key)
    assert "in tool step 'anomalies', after 3 attempt(s)" in str(failure.value.__notes__)
    assert calls.log == ["model", "stats", "model", "anomalies", "anomalies", "anomalies"]

    calls.log.clear()
    result = await durable.run("go", idempotency_key=key)
    assert result.output == EXPECTED
    assert calls.log == ["anomalies", "model"]  # steps 1-3 replayed from the journal

    calls.log.clear()
    again = await durable.run("go", idempotency_key=key)
    assert again.output == EXPECTED
    assert calls.log == []  # a completed logical run executes nothing
    assert again.usage == result.usage


async def test_agent_in_a_user_flow_replays_on_the_flow_retry(form: Form) -> None:
    calls = Calls()
    durable = two_tool_agent(calls, fail_second_tool=[1], form=form, tool_task_config=TaskConfig(retries=0))
    attempts: list[int] = []

    @flow(retries=1, retry_delay_seconds=0)
    async def report() -> str:
        attempts.append(1)
        result = await durable.run("go")
        return str(result.output)

    assert await report() == EXPECTED
    assert len(attempts) == 2
    # attempt 1: model, stats, model, anomalies (fails); attempt 2 replays the first three and runs the rest
    assert calls.log == ["model", "stats", "model", "anomalies", "anomalies", "model"]


async def test_retries_follow_the_backoff_list(form: Form) -> None:
    stamps: list[float] = []

    def model(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        if not _returns(messages):
            return ModelResponse(parts=[ToolCallPart("flaky", {})])
        return ModelResponse(parts=[TextPart("ok")])

    agent, durable = form(
        FunctionModel(model),
        name="backoff",
        tool_task_config=TaskConfig(retries=2, retry_delay_seconds=[0.4, 1.2]),
    )

    @agent.tool_plain
    def flaky() -> str:
        stamps.append(time.monotonic())
        if len(stamps) < 3:
            raise TimeoutError("transient")
        return "fine"

    assert (await durable.run("go")).output == "ok"
    assert len(stamps) == 3
    gaps = [b - a for a, b in itertools.pairwise(stamps)]
    assert gaps[0] >= 0.4 and gaps[1] >= 1.2


@pytest.mark.slow
async def test_timeouts_fire_for_a_slow_async_tool_and_a_slow_model_call(form: Form) -> None:
    tool_attempts: list[int] = []
    model_attempts: list[int] = []

    async def model(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        model_attempts.append(1)
        if len(model_attempts) == 1:
            await asyncio.sleep(60)  # first model attempt hangs past its timeout
        if not _returns(messages):
            return ModelResponse(parts=[ToolCallPart("slow", {})])
        return ModelResponse(parts=[TextPart("ok")])

    agent, durable = form(
        FunctionModel(model),
        name="timeouts",
        model_task_config=TaskConfig(retries=1, timeout_seconds=2.0),
        tool_task_config=TaskConfig(retries=1, timeout_seconds=2.0),
    )

    @agent.tool_plain
    async def slow() -> str:
        tool_attempts.append(1)
        if len(tool_attempts) == 1:
            await asyncio.sleep(60)
        return "done"

    assert (await durable.run("go")).output == "ok"
    assert len(tool_attempts) == 2 and len(model_attempts) == 3  # each hang abandoned at its timeout, retried


async def test_timeout_beyond_retries_fails_the_run_naming_the_step(form: Form) -> None:
    def model(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        return ModelResponse(parts=[ToolCallPart("hang", {})])

    agent, durable = form(
        FunctionModel(model), name="hang_forever", tool_task_config=TaskConfig(retries=1, timeout_seconds=0.3)
    )

    @agent.tool_plain
    async def hang() -> str:
        await asyncio.sleep(10)
        return "never"

    with pytest.raises(TimeoutError) as failure:
        await durable.run("go")
    assert "in tool step 'hang', after 2 attempt(s)" in str(failure.value.__notes__)


async def test_errors_retrying_cannot_fix_are_not_retried(form: Form) -> None:
    attempts: list[int] = []

    def model(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        return ModelResponse(parts=[ToolCallPart("misconfigured", {})])

    agent, durable = form(
        FunctionModel(model), name="user_error", tool_task_config=TaskConfig(retries=3, retry_delay_seconds=0)
    )

    @agent.tool_plain
    def misconfigured() -> str:
        attempts.append(1)
        raise UserError("the tool is not configured: set FOO")

    with pytest.raises(UserError, match="set FOO") as failure:
        await durable.run("go")
    assert len(attempts) == 1
    assert "in tool step 'misconfigured', not retried: retrying cannot fix it" in str(failure.value.__notes__)


async def test_parallel_identical_tool_calls_and_repeated_identical_calls_all_execute(form: Form) -> None:
    calls = Calls()

    def model(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        calls("model")
        done = _returns(messages)
        if len(done) == 0:  # two identical calls in one response
            return ModelResponse(parts=[ToolCallPart("ping", {"x": 1}), ToolCallPart("ping", {"x": 1})])
        if len(done) == 2:  # the same call again at a later step
            return ModelResponse(parts=[ToolCallPart("ping", {"x": 1})])
        return ModelResponse(parts=[TextPart(f"{len(done)} pings")])

    agent, durable = form(FunctionModel(model), name="pinger")

    @agent.tool_plain
    def ping(x: int) -> int:
        calls("ping")
        return x

    key = _key()
    assert (await durable.run("go", idempotency_key=key)).output == "3 pings"
    assert calls.counts == Counter(model=3, ping=3)
    calls.log.clear()
    assert (await durable.run("go", idempotency_key=key)).output == "3 pings"
    assert calls.log == []


@pytest.mark.slow
async def test_two_agents_in_one_flow_and_different_inputs_never_share_steps(form: Form) -> None:
    calls_a, calls_b = Calls(), Calls()
    a = two_tool_agent(calls_a, name="agent_a", form=form)
    b = two_tool_agent(calls_b, name="agent_b", form=form)

    @flow
    async def both() -> None:
        await a.run("same prompt")
        await b.run("same prompt")
        await a.run("same prompt")  # the same agent again in the same flow run: a new agent run

    await both()
    assert calls_a.counts == Counter(model=6, stats=2, anomalies=2)
    assert calls_b.counts == Counter(model=3, stats=1, anomalies=1)

    seen: list[Any] = []

    def echo(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        seen.append(1)
        return ModelResponse(parts=[TextPart(str(messages[0].parts[0].content))])

    _, durable = form(FunctionModel(echo), name="echo", deps_type=dict)
    key = _key()
    assert (await durable.run("one", deps={"n": 1}, idempotency_key=key)).output == "one"
    assert (await durable.run("two", deps={"n": 1}, idempotency_key=key)).output == "two"
    assert (await durable.run("one", deps={"n": 2}, idempotency_key=key)).output == "one"
    assert len(seen) == 3  # same key, different prompt or deps: nothing replayed across them


async def test_a_corrupt_journal_entry_is_re_executed_with_a_warning(
    form: Form, storage_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    calls = Calls()
    durable = two_tool_agent(calls, name="corruptible", form=form)
    key = _key()
    storage_dir.mkdir(parents=True, exist_ok=True)
    before = {p: p.stat().st_mtime_ns for p in storage_dir.iterdir()}
    await durable.run("go", idempotency_key=key)
    written = sorted(
        (p for p in storage_dir.iterdir() if p.is_file() and p not in before),
        key=lambda p: p.stat().st_mtime_ns,
    )
    assert len(written) == 5  # one journal entry per step
    stats_entry = written[1]
    stats_entry.write_text(stats_entry.read_text().replace("101.5", "999.9"))  # tampered: checksum mismatch
    written[3].write_text("{ not json")  # truncated / garbage

    calls.log.clear()
    with caplog.at_level(logging.WARNING, logger="prefect_pydantic_ai"):
        result = await durable.run("go", idempotency_key=key)
    assert result.output == EXPECTED
    assert calls.log == ["stats", "anomalies"]
    assert sum("corrupt" in r.getMessage() for r in caplog.records) == 2


async def test_iter_and_run_sync_are_durable_too(form: Form) -> None:
    calls = Calls()
    durable = two_tool_agent(calls, name="iterated", form=form)
    key = _key()
    nodes = []
    async with durable.iter("go", idempotency_key=key) as run:
        async for node in run:
            nodes.append(type(node).__name__)
    assert run.result is not None and run.result.output == EXPECTED
    assert "CallToolsNode" in nodes and calls.counts == Counter(model=3, stats=1, anomalies=1)
    calls.log.clear()
    result = await asyncio.to_thread(durable.run_sync, "go", idempotency_key=key)
    assert result.output == EXPECTED and calls.log == []


async def test_tools_configured_inline_run_outside_the_journal(form: Form) -> None:
    """README "Use it" and docs/migrating.md "Recall": a re-call executes no model request and no journaled tool
    call; an inline tool is outside the journal, so it runs again (its result keys the steps after it)."""
    calls = Calls()
    durable = two_tool_agent(calls, name="inline", form=form, tool_task_config_by_name={"stats": None})
    key = _key()
    first = await durable.run("go", idempotency_key=key)
    calls.log.clear()
    again = await durable.run("go", idempotency_key=key)
    assert calls.log == ["stats"]  # only the inline tool runs again: no model call, no journaled tool
    assert again.output == first.output


def test_unnamed_agent_is_a_clear_error() -> None:
    with pytest.raises(DurabilityConfigError, match=r"Agent\(\.\.\., name="):
        PrefectAgent(Agent("test"))


async def test_agent_without_model_is_a_clear_error() -> None:
    with pytest.raises(DurabilityConfigError, match="has no model"):
        await PrefectAgent(Agent(name="modelless")).run("go")


async def test_two_different_agents_with_one_name_in_one_flow_is_refused_before_any_call(form: Form) -> None:
    calls = Calls()
    first = two_tool_agent(calls, name="twin", form=form)
    second = two_tool_agent(calls, name="twin", form=form)

    @flow
    async def twins() -> None:
        await first.run("go")
        await second.run("go")

    with pytest.raises(DurabilityConfigError, match="Two different agents are named 'twin'"):
        await twins()
    assert calls.counts == Counter()  # refused before the first agent paid for anything


@dataclass
class Deps:
    region: str
    client: object


async def test_deps_that_cannot_be_journaled_name_the_field_and_the_fix(form: Form) -> None:
    _, durable = form(
        FunctionModel(lambda m, i: ModelResponse(parts=[TextPart("x")])), name="deps_check", deps_type=Deps
    )
    with pytest.raises(
        NotJournalableError, match=r"deps\.client \(object\) cannot be journaled.*Field\(exclude=True\)"
    ):
        await durable.run("go", deps=Deps(region="eu", client=object()))


async def test_tool_result_that_cannot_be_journaled_says_how_to_run_it_inline(form: Form) -> None:
    def model(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        return ModelResponse(parts=[ToolCallPart("handle", {})])

    agent, durable = form(FunctionModel(model), name="handle_tool", tool_task_config=TaskConfig(retries=2))

    @agent.tool_plain
    def handle() -> object:
        return object()

    with pytest.raises(NotJournalableError, match=r"tool_task_config_by_name=\{'handle': None\}"):
        await durable.run("go")


async def test_model_retry_from_a_tool_is_journaled_and_replayed(form: Form) -> None:
    calls = Calls()

    def model(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        calls("model")
        done = [p for p in _returns(messages) if p.outcome == "success"]
        retried = [p for p in _returns(messages) if p.outcome == "retried"]
        if not done and not retried:
            return ModelResponse(parts=[ToolCallPart("lookup", {"column": "salez"})])
        if not done:
            return ModelResponse(parts=[ToolCallPart("lookup", {"column": "sales"})])
        return ModelResponse(parts=[TextPart(f"found {done[-1].content}")])

    agent, durable = form(
        FunctionModel(model), name="self_correcting", tool_task_config=TaskConfig(retries=3)
    )

    @agent.tool_plain
    def lookup(column: str) -> str:
        calls("lookup")
        if column != "sales":
            from pydantic_ai import ModelRetry

            raise ModelRetry(f"unknown column {column!r}; valid: sales")
        return "sales"

    key = _key()
    first = await durable.run("go", idempotency_key=key)
    assert first.output == "found sales"
    assert calls.counts == Counter(model=3, lookup=2)  # ModelRetry went to the model, not to Prefect retries
    calls.log.clear()
    again = await durable.run("go", idempotency_key=key)
    assert again.output == "found sales" and calls.log == []
    assert [m.kind for m in again.all_messages()] == [m.kind for m in first.all_messages()]


async def test_deps_dataframe_is_journaled_by_content(form: Form) -> None:
    import pandas as pd

    seen: list[int] = []

    def model(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        seen.append(1)
        return ModelResponse(parts=[TextPart("ok")])

    _, durable = form(FunctionModel(model), name="frames", deps_type=pd.DataFrame)
    key = _key()
    await durable.run("go", deps=pd.DataFrame({"a": [1, 2]}), idempotency_key=key)
    await durable.run("go", deps=pd.DataFrame({"a": [1, 2]}), idempotency_key=key)
    await durable.run("go", deps=pd.DataFrame({"a": [1, 3]}), idempotency_key=key)
    assert len(seen) == 2


@pytest.mark.slow
async def test_per_tool_config_overrides_the_tool_default_field_by_field(form: Form) -> None:
    attempts: Counter[str] = Counter()

    def model(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        done = len(_returns(messages))
        if done < 2:
            return ModelResponse(parts=[ToolCallPart(["slow_sync", "vetoed"][done], {})])
        return ModelResponse(parts=[TextPart("ok")])

    agent, durable = form(
        FunctionModel(model),
        name="per_tool",
        tool_task_config=TaskConfig(retries=2, retry_delay_seconds=0),
        tool_task_config_by_name={
            "slow_sync": TaskConfig(timeout_seconds=2.0),  # keeps retries=2 from the default
            "vetoed": TaskConfig(retry_condition_fn=lambda task, run, state: False),
        },
    )

    @agent.tool_plain
    def slow_sync() -> str:  # a sync tool: its first attempt outlasts the per-tool timeout
        attempts["slow_sync"] += 1
        if attempts["slow_sync"] == 1:
            time.sleep(4)
        return "done"

    @agent.tool_plain
    def vetoed() -> str:
        attempts["vetoed"] += 1
        if attempts["vetoed"] == 1:
            raise ConnectionError("flaky")
        return "done"

    with pytest.raises(ConnectionError, match="flaky"):
        await durable.run("go")
    assert attempts == Counter(slow_sync=2, vetoed=1)  # timed out once then retried; vetoed: no retry


def test_a_module_level_agent_pickles_by_reference_for_served_flows() -> None:
    import cloudpickle  # what Prefect uses to ship a served flow and the globals it needs

    from tests.scripts import five_step

    assert cloudpickle.loads(cloudpickle.dumps(five_step.durable)) is five_step.durable
    local = two_tool_agent(Calls(), name="local_only", form=Form("PrefectAgent"))
    with pytest.raises(TypeError, match="define it at module level"):
        cloudpickle.dumps(local)


def test_an_unnamed_agent_with_the_capability_fails_at_construction() -> None:
    with pytest.raises(DurabilityConfigError) as failure:
        Agent("test", capabilities=[PrefectDurability()])
    assert str(failure.value) == (
        "A durable agent needs a name: create it with Agent(..., name='my_agent'). The name identifies its steps "
        "in the journal and names its Prefect flow, so it must not change between runs."
    )


def test_prefect_agent_refuses_an_agent_that_already_has_the_capability() -> None:
    agent = Agent("test", name="doubled", capabilities=[PrefectDurability()])
    with pytest.raises(DurabilityConfigError) as failure:
        PrefectAgent(agent)
    assert str(failure.value) == (
        "Agent 'doubled' already has PrefectDurability: use it directly, or drop the capability and wrap it in "
        "PrefectAgent, not both."
    )


async def test_ledger_of_a_result_counts_what_executed_and_what_replayed(form: Form) -> None:
    calls = Calls()
    durable = two_tool_agent(
        calls, name="ledgered", fail_second_tool=[1], form=form, tool_task_config=TaskConfig(retries=0)
    )
    key = _key()
    with pytest.raises(ConnectionError):
        await durable.run("go", idempotency_key=key)
    resumed = ledger_of(await durable.run("go", idempotency_key=key))
    assert calls.log == ["model", "stats", "model", "anomalies", "anomalies", "model"]
    assert resumed is not None
    assert (resumed.spent.model_calls, resumed.spent.tool_calls) == (
        1,
        1,
    )  # anomalies, then the last model call
    assert (resumed.saved.model_calls, resumed.saved.tool_calls) == (2, 1)  # replayed from the journal
    assert resumed.saved.input_tokens > 0

    recall = ledger_of(await durable.run("go", idempotency_key=key))  # the run completed: nothing executes
    assert recall is not None and len(calls.log) == 6
    assert (recall.spent.model_calls, recall.spent.tool_calls) == (0, 0)
    assert (recall.saved.model_calls, recall.saved.tool_calls) == (0, 0)  # a re-call recovers nothing


async def test_an_interrupted_run_ends_cancelled_saying_how_to_resume_and_a_rerun_replays_it() -> None:
    """Ctrl-C in `asyncio.run` cancels the running task: the run ends Cancelled (Prefect's engine would mark it
    Crashed), the step and the record say `interrupted` (not an empty `CancelledError:`), and a rerun of the key
    replays what completed."""
    from prefect import get_client

    from prefect_pydantic_ai import show_run
    from prefect_pydantic_ai.durable.steps import INTERRUPTED, StepEvent, observe_steps

    calls, in_tool = Calls(), asyncio.Event()

    def model(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        calls("model")
        if not _returns(messages):
            return ModelResponse(parts=[ToolCallPart("slow_lookup", {})])
        return ModelResponse(parts=[TextPart("found it")])

    agent = Agent(FunctionModel(model), name="interrupted_one")

    @agent.tool_plain
    async def slow_lookup() -> str:
        calls("slow_lookup")
        if calls.counts["slow_lookup"] == 1:
            in_tool.set()
            await asyncio.sleep(3600)  # the person presses Ctrl-C here
        return "the answer"

    durable, key, events = PrefectAgent(agent), _key(), []
    stop = observe_steps(events.append)
    try:
        run = asyncio.create_task(durable.run("go", idempotency_key=key))
        await in_tool.wait()
        run.cancel()  # what asyncio.run does with the first Ctrl-C
        with pytest.raises(asyncio.CancelledError):
            await run
    finally:
        stop()

    detail = await show_run(key)
    assert (detail.state, detail.error) == ("cancelled", INTERRUPTED)
    async with get_client() as client:
        flow_run = await client.read_flow_run(uuid.UUID(detail.run_id))
    assert flow_run.state is not None and flow_run.state.message == (
        f"Interrupted (Ctrl-C or a cancelled task); resume it with `prefect-pydantic-ai resume {key}`."
    )
    assert [(e.title, e.error) for e in events if isinstance(e, StepEvent) and e.error] == [
        ("tool #2: slow_lookup", INTERRUPTED)
    ]

    assert (await durable.run("go", idempotency_key=key)).output == "found it"
    assert calls.counts == {
        "model": 2,
        "slow_lookup": 2,
    }  # the first model call replayed; the lookup ran again
