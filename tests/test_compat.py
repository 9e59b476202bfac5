"""Code written for pydantic-ai's own Prefect integration keeps working when only the import changes.

Each test takes one form a user of `pydantic_ai.durable_exec.prefect` writes (constructor arguments, dict
configs, merged configs, tool metadata, `run_stream` / `iter`, a realtime session) and counts what it does here:
calls executed, retries applied, task runs and logs read back from Prefect, exact error lines.
"""

from __future__ import annotations

import asyncio
import json
import uuid
import warnings
from collections import Counter
from collections.abc import AsyncIterable, AsyncIterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from fastmcp import FastMCP
from prefect import get_client
from prefect.client.schemas.filters import (
    FlowRunFilter,
    FlowRunFilterTags,
    LogFilter,
    LogFilterFlowRunId,
)
from prefect.client.schemas.objects import FlowRun, TaskRun
from pydantic import ValidationError
from pydantic_ai import Agent, RunContext
from pydantic_ai.exceptions import UserError
from pydantic_ai.mcp import MCPToolset
from pydantic_ai.messages import (
    AgentStreamEvent,
    ModelMessage,
    ModelResponse,
    TextPart,
    ToolCallPart,
    ToolReturnPart,
)
from pydantic_ai.models.function import AgentInfo, DeltaToolCall, DeltaToolCalls, FunctionModel
from pydantic_ai.providers.openai import OpenAIProvider
from pydantic_ai.realtime.openai import OpenAIRealtimeModel

from prefect_pydantic_ai import (
    DurabilityConfigError,
    PrefectAgent,
    PrefectDurability,
    TaskConfig,
)
from prefect_pydantic_ai.store.step_names import parse_task_run_name
from tests.warm import python

pytestmark = pytest.mark.anyio

STREAM_MODES = Path(__file__).parent / "scripts" / "stream_modes.py"
IGNORED_HANDLER_CONFIG = (
    "event_stream_handler_task_config has no effect here: the event stream handler runs in the run's own process, "
    "not as a Prefect task."
)


def _name(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:6]}"


def _returns(messages: list[ModelMessage]) -> list[ToolReturnPart]:
    return [p for m in messages for p in m.parts if isinstance(p, ToolReturnPart)]


def lookup_then_answer(calls: Counter[str], tool: str = "lookup") -> FunctionModel:
    """Model: call `tool` once, then answer with its result; streams the same replies. Counts its calls."""

    def reply(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        calls["model"] += 1
        done = _returns(messages)
        if not done:
            return ModelResponse(parts=[ToolCallPart(tool, {"key": "a"})])
        return ModelResponse(parts=[TextPart(f"answer: {done[0].content}")])

    async def stream(messages: list[ModelMessage], info: AgentInfo) -> AsyncIterator[str | DeltaToolCalls]:
        calls["model"] += 1
        done = _returns(messages)
        if not done:
            yield {0: DeltaToolCall(name=tool, json_args='{"key": "a"}')}
        else:
            yield f"answer: {done[0].content}"

    return FunctionModel(reply, stream_function=stream)


class EventLog:
    """An `event_stream_handler` that records the type of every event it is handed."""

    def __init__(self) -> None:
        self.kinds: list[str] = []

    async def __call__(self, ctx: RunContext[Any], events: AsyncIterable[AgentStreamEvent]) -> None:
        async for event in events:
            self.kinds.append(type(event).__name__)


async def flow_runs_of(agent: str) -> list[FlowRun]:
    """The flow runs that hold a durable run of `agent`, as Prefect recorded them."""
    async with get_client() as client:
        return await client.read_flow_runs(
            flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[f"agent:{agent}"]))
        )


async def task_runs_of(agent: str, count: int | None = None) -> list[TaskRun]:
    """Every task run of the flow runs of `agent`, once Prefect has recorded them all (`count` of them, if given).

    Prefect learns about task runs from events its client sends in the background, so right after a run the last
    ones may still be on their way: read until two reads half a second apart agree and every run is final; a
    loaded machine can hold the last event back longer, so a test that knows how many steps ran says so."""
    seen: list[TaskRun] | None = None
    async with get_client() as client:
        for _ in range(60):
            runs = await client.read_task_runs(
                flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[f"agent:{agent}"]))
            )
            final = all(t.state is not None and t.state.is_final() for t in runs)
            enough = count is None or len(runs) >= count
            if final and enough and seen is not None and {t.id for t in seen} == {t.id for t in runs}:
                return runs
            seen = runs
            await asyncio.sleep(0.5)
    raise AssertionError(
        f"the task runs of {agent} never settled: {[(t.name, t.state_name) for t in seen or []]}"
    )


def step_names(task_runs: list[TaskRun]) -> Counter[str]:
    """How many task runs each step has: `model` for model requests, `tool: <name>` for tool calls."""
    return Counter("model" if kind == "model" else f"tool: {name}" for kind, name in map(_step_of, task_runs))


def _step_of(task_run: TaskRun) -> tuple[str, str]:
    """A step task run's kind and model or tool name, read from its name as `show` reads it."""
    parsed = parse_task_run_name(task_run.name)
    assert parsed is not None, task_run.name
    return parsed[0], parsed[2]


# -- constructor arguments -------------------------------------------------------------------------------------


async def test_prefect_agent_takes_every_argument_of_pydantic_ais_prefect_agent() -> None:
    calls: Counter[str] = Counter()
    agent: Agent[None, str] = Agent(lookup_then_answer(calls), name=_name("inner"))

    @agent.tool_plain
    def lookup(key: str) -> str:
        calls["lookup"] += 1
        return f"value of {key}"

    events = EventLog()
    renamed = _name("renamed")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        durable = PrefectAgent(
            agent,
            name=renamed,
            event_stream_handler=events,
            mcp_task_config={"retries": 1},
            model_task_config={"retries": 1},
            tool_task_config={"retries": 1},
            tool_task_config_by_name={"lookup": {"timeout_seconds": 30}},
            event_stream_handler_task_config={"retries": 1},
        )
    assert [str(w.message) for w in caught] == [IGNORED_HANDLER_CONFIG]

    result = await durable.run("go")
    assert result.output == "answer: value of a" and calls == Counter(model=2, lookup=1)
    assert durable.name == renamed
    (flow_run,) = await flow_runs_of(renamed)  # the journal and the flow are keyed by `name=`
    async with get_client() as client:
        assert (await client.read_flow(flow_run.flow_id)).name == renamed
    assert step_names(await task_runs_of(renamed)) == Counter({"model": 2, "tool: lookup": 1})
    assert (
        events.kinds.count("FunctionToolCallEvent") == 1
        and events.kinds.count("FunctionToolResultEvent") == 1
    )

    per_run = EventLog()  # a handler passed to run() replaces the default, as in pydantic-ai
    events.kinds.clear()
    await durable.run("go again", event_stream_handler=per_run)
    assert events.kinds == [] and per_run.kinds.count("FunctionToolCallEvent") == 1


async def test_prefect_durability_takes_every_argument_of_pydantic_ais_capability() -> None:
    default_calls: Counter[str] = Counter()
    fast_calls: Counter[str] = Counter()
    events = EventLog()
    name = _name("capable")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        capability = PrefectDurability(
            models={"fast": lookup_then_answer(fast_calls)},
            event_stream_handler=events,
            name=name,
            event_stream_handler_task_config={"retries": 1},
            model_task_config={"retries": 1},
            mcp_task_config={"retries": 1},
            tool_task_config={"retries": 1},
        )
    assert [str(w.message) for w in caught] == [IGNORED_HANDLER_CONFIG]
    agent: Agent[None, str] = Agent(
        lookup_then_answer(default_calls), name=_name("inner"), capabilities=[capability]
    )

    @agent.tool_plain
    def lookup(key: str) -> str:
        return f"value of {key}"

    result = await agent.run("go", model="fast")  # a `models=` key selects the registered model
    assert result.output == "answer: value of a"
    assert fast_calls == Counter(model=2) and default_calls == Counter()
    assert len(await flow_runs_of(name)) == 1
    assert step_names(await task_runs_of(name)) == Counter({"model": 2, "tool: lookup": 1})
    assert (
        events.kinds.count("FunctionToolCallEvent") == 1
        and events.kinds.count("FunctionToolResultEvent") == 1
    )


def test_prefectify_toolset_func_is_refused_with_what_to_use_instead() -> None:
    with pytest.raises(DurabilityConfigError) as raised:
        PrefectAgent(Agent("test", name=_name("toolsets")), prefectify_toolset_func=lambda *args: args[0])
    assert str(raised.value) == (
        "prefectify_toolset_func has no equivalent here: every tool call of every toolset is already a durable "
        "step; configure tools with tool_task_config_by_name= or metadata={'prefect': ...}."
    )


# -- TaskConfig as pydantic-ai's TypedDict ---------------------------------------------------------------------


def test_task_config_reads_and_merges_like_pydantic_ais_typed_dict() -> None:
    base = TaskConfig(retries=3, timeout_seconds=10)
    assert base["retries"] == 3 and base.get("retries") == 3
    assert base.get("log_prints") is None and base.get("log_prints", False) is False
    with pytest.raises(KeyError):
        base["log_prints"]  # an unset field is an absent key
    assert {**base} == {"retries": 3, "timeout_seconds": 10.0} and dict(base) == {**base}
    assert "retries" in base and "log_prints" not in base

    assert base | {"retries": 5} == TaskConfig(retries=5, timeout_seconds=10)  # the right side wins
    assert {"retries": 5, "log_prints": True} | base == TaskConfig(
        retries=3, timeout_seconds=10, log_prints=True
    )
    assert base | TaskConfig(retry_delay_seconds=[1, 2]) == TaskConfig(
        retries=3, timeout_seconds=10, retry_delay_seconds=[1, 2]
    )
    assert isinstance(base | {}, TaskConfig) and isinstance({} | base, TaskConfig)
    with pytest.raises(ValidationError, match="frozen"):  # still a frozen model
        base.retries = 1  # type: ignore[misc]


@pytest.mark.parametrize(
    ("config", "message"),
    [
        (
            {"retries": -1},
            "TaskConfig retries=-1 is invalid: use a whole number >= 0 (attempts after the first).",
        ),
        ({"timeout_seconds": 0}, "TaskConfig timeout_seconds=0 is invalid: use seconds > 0."),
        (
            {"retry_delay_seconds": "soon"},
            "TaskConfig retry_delay_seconds='soon' is invalid: use seconds >= 0, or a list of them "
            "(the backoff of retry 1, 2, ...).",
        ),
        (
            {"on_unverified": "ignore"},
            "TaskConfig on_unverified='ignore' is invalid: use one of 'fail', 'tell_model', 'rerun'.",
        ),
        (
            {"retries": 2, "retry_delay_seconds": [1, 2, 4, 8]},
            "Invalid TaskConfig: retry_delay_seconds has 4 delays but retries=2: give at most 2 (one per retry) "
            "or set retries=4.",
        ),
        ({"retry_delay_seconds": -1}, "Invalid TaskConfig: retry_delay_seconds=-1.0 must be seconds >= 0."),
        (
            {"retry": 3},
            "TaskConfig has no field 'retry': did you mean 'retries'? its fields are retries, retry_delay_seconds, "
            "retry_jitter_factor, timeout_seconds, retry_condition_fn, cache_policy, persist_result, "
            "result_storage, log_prints, tags, on_unverified, memoize_seconds, concurrency_limit.",
        ),
        (
            {"concurrency_limit": 3},
            "TaskConfig concurrency_limit=3 is invalid: use a Prefect global concurrency limit name, or a "
            "ConcurrencyLimit(name=...).",
        ),
        (
            {"concurrency_limit": {"name": "openai", "lease_seconds": 5}},
            "TaskConfig concurrency_limit.lease_seconds=5 is invalid: Input should be greater than or equal to 60.",
        ),
    ],
)
def test_an_invalid_config_fails_with_one_line_naming_the_field_and_the_fix(
    config: dict[str, Any], message: str
) -> None:
    for build in (
        lambda: TaskConfig(**config),
        lambda: TaskConfig() | config,  # a merge is checked as a whole
        lambda: PrefectAgent(Agent("test", name=_name("invalid")), model_task_config=config),
        lambda: PrefectDurability(tool_task_config_by_name={"lookup": config}),
    ):
        with pytest.raises(DurabilityConfigError) as raised:
            build()
        assert str(raised.value) == message
        assert isinstance(raised.value, UserError)  # the CLI reports it as one line with exit code 2


# -- configs in use ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Form:
    """`PrefectAgent(agent, **config)` or `Agent(..., capabilities=[PrefectDurability(**config)])`."""

    kind: str

    def __call__(
        self, model: FunctionModel, name: str, toolsets: Sequence[MCPToolset[None]] = (), **config: Any
    ) -> tuple[Agent[None, str], Any]:
        if self.kind == "capability":
            capable: Agent[None, str] = Agent(
                model, name=name, toolsets=toolsets, capabilities=[PrefectDurability(**config)]
            )
            return capable, capable
        agent: Agent[None, str] = Agent(model, name=name, toolsets=toolsets)
        return agent, PrefectAgent(agent, **config)


@pytest.fixture(params=["PrefectAgent", "capability"])
def form(request: pytest.FixtureRequest) -> Form:
    return Form(request.param)


async def test_dict_and_merged_configs_apply_their_retries(form: Form) -> None:
    calls: Counter[str] = Counter()

    def model(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        calls["model"] += 1
        if calls["model"] <= 2:
            raise ConnectionError("model API unreachable")
        done = _returns(messages)
        if not done:
            return ModelResponse(parts=[ToolCallPart("flaky", {})])
        return ModelResponse(parts=[TextPart(f"answer: {done[0].content}")])

    fast = TaskConfig(retry_delay_seconds=0)
    agent, durable = form(
        FunctionModel(model),
        _name("dicts"),
        model_task_config={"retries": 2, "retry_delay_seconds": 0},
        tool_task_config=fast | {"retries": 0},
        tool_task_config_by_name={"flaky": {"retries": 1} | fast},
    )

    @agent.tool_plain
    def flaky() -> str:
        calls["flaky"] += 1
        if calls["flaky"] == 1:
            raise ConnectionError("tool service unreachable")
        return "ok"

    result = await durable.run("go")
    assert result.output == "answer: ok"
    assert calls == Counter(
        model=4, flaky=2
    )  # two model retries from the dict, one tool retry from the merge


@pytest.mark.slow
async def test_tool_metadata_configures_a_tool_and_false_runs_it_inline(form: Form) -> None:
    calls: Counter[str] = Counter()

    def model(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        calls["model"] += 1
        if not _returns(messages):
            return ModelResponse(
                parts=[ToolCallPart("flaky", {}), ToolCallPart("clock", {}), ToolCallPart("typed", {})]
            )
        return ModelResponse(parts=[TextPart("done")])

    name = _name("metadata")
    agent, durable = form(FunctionModel(model), name)

    @agent.tool_plain(metadata={"prefect": {"retries": 2, "retry_delay_seconds": 0}})
    def flaky() -> str:
        calls["flaky"] += 1
        if calls["flaky"] <= 2:
            raise ConnectionError("tool service unreachable")
        return "ok"

    @agent.tool_plain(metadata={"prefect": False})
    def clock() -> str:
        calls["clock"] += 1
        return "12:00"

    @agent.tool_plain(metadata={"prefect": TaskConfig(timeout_seconds=30)})
    def typed() -> str:
        calls["typed"] += 1
        return "typed"

    assert (await durable.run("go")).output == "done"
    assert calls == Counter(model=2, flaky=3, clock=1, typed=1)  # flaky: two retries from its metadata
    steps = step_names(await task_runs_of(name, count=4))
    assert steps == Counter({"model": 2, "tool: flaky": 1, "tool: typed": 1})  # no `tool: clock`


async def test_mcp_task_config_configures_the_tools_of_mcp_toolsets(form: Form) -> None:
    def model(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        if not _returns(messages):
            return ModelResponse(parts=[ToolCallPart("stock", {"sku": "A-1"}), ToolCallPart("local", {})])
        return ModelResponse(parts=[TextPart("done")])

    name = _name("mcp")
    # In this process: the config is under test here, not a transport (test_mcp.py's stdio server).
    inventory = FastMCP("inventory")
    served: list[str] = []

    @inventory.tool
    def stock(sku: str) -> str:
        served.append(sku)
        return f"{sku}: 9 in stock"

    toolset = MCPToolset(inventory)
    agent, durable = form(
        FunctionModel(model),
        name,
        toolsets=[toolset],
        tool_task_config={"retries": 1, "timeout_seconds": 30},
        mcp_task_config={"retries": 4},
    )

    @agent.tool_plain
    def local() -> str:
        return "local"

    assert (await durable.run("go")).output == "done"
    assert served == ["A-1"]
    policies = {": ".join(_step_of(t)): t.empirical_policy for t in await task_runs_of(name)}
    assert (
        policies["tool: stock"].retries == 4 and policies["tool: local"].retries == 1
    )  # MCP over the default


async def test_a_misspelled_tool_in_tool_task_config_by_name_fails_before_any_model_call(form: Form) -> None:
    calls: Counter[str] = Counter()
    name = _name("typo")
    agent, durable = form(
        lookup_then_answer(calls), name, tool_task_config_by_name={"send_emial": {"retries": 1}}
    )

    @agent.tool_plain
    def send_email(to: str) -> str:
        return "sent"

    @agent.tool_plain(prepare=lambda ctx, tool_def: None)  # hidden from this step, still a tool of the agent
    async def lookup(key: str) -> str:
        return key

    with pytest.raises(DurabilityConfigError) as raised:
        await durable.run("go")
    assert str(raised.value) == (
        f"tool_task_config_by_name names 'send_emial', which is not a tool of agent {name!r} "
        "(did you mean 'send_email'?); its tools are: lookup, send_email."
    )
    assert calls == Counter()


# -- streamed and iterated runs --------------------------------------------------------------------------------


@pytest.mark.slow
def test_streamed_and_iterated_runs_run_every_step_inside_their_flow_run() -> None:
    prefix = _name("streamed")
    ran = python(str(STREAM_MODES), prefix, timeout=300)
    assert ran.returncode == 0, ran.stderr[-2000:]
    lines = [json.loads(line) for line in ran.stdout.splitlines() if line.startswith("{")]
    runs = [line for line in lines if line["agent"] != "baseline"]
    assert len(runs) == 6
    for run in runs:  # no log without a flow run id, no unclosed transport, beyond Prefect's own API sockets
        assert run["warnings"] == [] and run["output"] == "answer: value of a", run
        assert run["calls"] == {"model": 2, "lookup": 1}, run

    async def read_back() -> None:
        async with get_client() as client:
            for run in runs:
                (flow_run,) = await flow_runs_of(run["agent"])  # one flow run, holding every step
                task_runs = await task_runs_of(run["agent"])
                assert step_names(task_runs) == Counter({"model": 2, "tool: lookup": 1})
                assert {t.flow_run_id for t in task_runs} == {flow_run.id}
                logs = await client.read_logs(
                    log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run.id]))
                )
                marker = f"looked up in {run['agent']}"
                assert [log.message for log in logs if log.message == marker] == [marker]

    asyncio.run(read_back())


# -- realtime ----------------------------------------------------------------------------------------------------


async def test_a_realtime_session_of_a_durable_agent_is_refused_in_one_line(form: Form) -> None:
    name = _name("voice")
    calls: Counter[str] = Counter()
    _, durable = form(lookup_then_answer(calls), name)
    unreachable = OpenAIProvider(api_key="unused", base_url="http://127.0.0.1:9/v1")  # never dialled
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydantic-ai lists the hooks a realtime session never calls
        with pytest.raises(DurabilityConfigError) as raised:
            async with durable.realtime(OpenAIRealtimeModel("gpt-realtime", provider=unreachable)).session():
                pass
    assert str(raised.value) == (
        f"Agent {name!r} is durable, and a realtime session cannot be: its live connection can be neither "
        "journaled nor replayed. Open the session on the agent without PrefectDurability (a PrefectAgent's "
        ".wrapped)."
    )
    assert await flow_runs_of(name) == []
