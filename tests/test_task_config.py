"""`TaskConfig`: how per-tool configs are layered over the defaults, and how it behaves as the dict it is.

The layering rule (README "Use it"): a per-tool config wins on every field it sets and inherits the others,
except that setting `retries` also replaces the backoff (`retry_delay_seconds`, `retry_jitter_factor`). A
layering whose fields do not fit together fails when the agent is wrapped, before any model call.
"""

from __future__ import annotations

import copy
import json
import pickle
import uuid
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast

import pytest
from pydantic import ValidationError
from pydantic_ai import Agent, Tool
from pydantic_ai.durable_exec.prefect._toolset import resolve_tool_task_config
from pydantic_ai.messages import ModelMessage, ModelResponse, TextPart, ToolCallPart, ToolReturnPart
from pydantic_ai.models.function import AgentInfo, FunctionModel
from pydantic_ai.tools import RunContext, ToolDefinition, matches_tool_selector

from prefect_pydantic_ai import DurabilityConfigError, PrefectAgent, PrefectDurability, TaskConfig
from prefect_pydantic_ai.durable.task_config import tool_config_from_metadata
from prefect_pydantic_ai.durable.tool_step import ToolTasks

README = Path(__file__).resolve().parents[1] / "README.md"

# the configs of README's "Use it" example, as written there
MODEL_CONFIG = TaskConfig(retries=3, retry_delay_seconds=[1.0, 2.0, 4.0], timeout_seconds=60.0)
TOOL_CONFIG = TaskConfig(retries=2, retry_delay_seconds=[0.5, 1.0])
BY_NAME: dict[str, TaskConfig | None] = {"send_email": TaskConfig(retries=0), "cheap_lookup": None}


def _name(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:6]}"


def _returns(messages: list[ModelMessage]) -> list[ToolReturnPart]:
    return [p for m in messages for p in m.parts if isinstance(p, ToolReturnPart)]


@pytest.fixture
def no_warnings() -> Iterator[None]:
    """Any warning (pydantic's `PydanticDeprecatedSince20` among them) fails the test."""
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        yield


# -- layering per-tool configs over the defaults -----------------------------------------------------------------


def test_the_readme_use_it_lines_are_the_ones_tested_here() -> None:
    text = README.read_text()
    assert (
        "model_task_config=TaskConfig(retries=3, retry_delay_seconds=[1.0, 2.0, 4.0], timeout_seconds=60.0)"
        in text
    )
    assert "tool_task_config=TaskConfig(retries=2, retry_delay_seconds=[0.5, 1.0])," in text
    assert 'tool_task_config_by_name={"send_email": TaskConfig(retries=0), "cheap_lookup": None}' in text


def test_the_readme_configs_give_the_documented_effective_configs() -> None:
    tasks = ToolTasks(TOOL_CONFIG, BY_NAME, agent="data_analyst")
    assert tasks.config_of("send_email") == {"retries": 0}  # `retries` brings its own (empty) backoff
    assert tasks.config_of("cheap_lookup") is None  # inline, not a task
    assert tasks.config_of("any_other_tool") == {"retries": 2, "retry_delay_seconds": [0.5, 1.0]}
    # the other examples of the README: a field other than `retries` keeps the inherited backoff, and a
    # per-tool `retries` with its own delays keeps them
    assert TaskConfig(timeout_seconds=120).merged_over(TOOL_CONFIG) == {
        "retries": 2,
        "retry_delay_seconds": [0.5, 1.0],
        "timeout_seconds": 120.0,
    }
    assert TaskConfig(retries=5, retry_delay_seconds=10).merged_over(TOOL_CONFIG) == {
        "retries": 5,
        "retry_delay_seconds": 10.0,
    }
    assert TaskConfig(retry_delay_seconds=3).merged_over(TOOL_CONFIG) == {
        "retries": 2,
        "retry_delay_seconds": 3.0,
    }
    jittered = TaskConfig(retries=2, retry_delay_seconds=1, retry_jitter_factor=0.5, timeout_seconds=9)
    assert TaskConfig(retries=1).merged_over(jittered) == {"retries": 1, "timeout_seconds": 9.0}

    # wrapping the agent with exactly these lines succeeds, and resolves the same configs
    durable = PrefectAgent(
        Agent(FunctionModel(lambda m, i: ModelResponse(parts=[TextPart("x")])), name=_name("readme")),
        model_task_config=MODEL_CONFIG,
        tool_task_config=TOOL_CONFIG,
        tool_task_config_by_name=BY_NAME,
    )
    assert durable.model_task_config == MODEL_CONFIG and durable.tool_task_config == TOOL_CONFIG
    resolved = durable.durability.tool_tasks
    assert resolved.config_of("send_email") == {"retries": 0} and resolved.config_of("cheap_lookup") is None


MISFIT = (
    "tool_task_config_by_name['send_email'] over tool_task_config gives an invalid TaskConfig: retry_delay_seconds "
    "has 3 delays but retries=2: give at most 2 (one per retry) or set retries=3."
)


def test_a_layering_that_does_not_fit_fails_when_the_agent_is_wrapped() -> None:
    by_name = {
        "send_email": TaskConfig(retry_delay_seconds=[1, 2, 4])
    }  # inherits retries=2: one delay too many
    plain = Agent(FunctionModel(lambda m, i: ModelResponse(parts=[TextPart("x")])), name=_name("misfit"))
    for wrap in (
        lambda: PrefectAgent(plain, tool_task_config=TOOL_CONFIG, tool_task_config_by_name=by_name),
        lambda: PrefectDurability(tool_task_config=TOOL_CONFIG, tool_task_config_by_name=by_name),
        lambda: PrefectDurability(
            tool_task_config={"retries": 2},
            tool_task_config_by_name={"send_email": {"retry_delay_seconds": [1, 2, 4]}},
        ),
    ):
        with pytest.raises(DurabilityConfigError) as raised:
            wrap()
        assert str(raised.value) == MISFIT


def test_a_misfit_with_tool_metadata_or_mcp_config_fails_when_the_agent_is_wrapped() -> None:
    agent: Agent[None, str] = Agent(
        FunctionModel(lambda m, i: ModelResponse(parts=[TextPart("x")])), name=_name("meta")
    )

    @agent.tool_plain(metadata={"prefect": TaskConfig(retries=1)})
    def send_email() -> str:
        return "sent"

    with pytest.raises(DurabilityConfigError) as raised:
        PrefectAgent(agent, tool_task_config_by_name={"send_email": TaskConfig(retry_delay_seconds=[1, 2])})
    assert str(raised.value) == (
        "tool_task_config_by_name['send_email'] over tool_task_config and the tool's metadata gives an invalid "
        "TaskConfig: retry_delay_seconds has 2 delays but retries=1: give at most 1 (one per retry) or set retries=2."
    )
    with pytest.raises(DurabilityConfigError, match=r"^tool_task_config_by_name\['send_email'\] over"):
        Agent(  # the capability form: checked when the agent is built with it
            FunctionModel(lambda m, i: ModelResponse(parts=[TextPart("x")])),
            name=_name("meta_capability"),
            tools=[Tool(send_email, metadata={"prefect": {"retries": 1}})],
            capabilities=[
                PrefectDurability(tool_task_config_by_name={"send_email": {"retry_delay_seconds": [1, 2]}})
            ],
        )
    with pytest.raises(DurabilityConfigError) as raised:
        PrefectDurability(
            tool_task_config=TOOL_CONFIG,
            mcp_task_config=TaskConfig(retry_delay_seconds=[1, 1, 1]),
        )
    assert str(raised.value) == (
        "mcp_task_config over tool_task_config gives an invalid TaskConfig: retry_delay_seconds has 3 delays but "
        "retries=2: give at most 2 (one per retry) or set retries=3."
    )
    with pytest.raises(DurabilityConfigError, match="Tool 'x' has metadata"):
        tool_config_from_metadata("x", {"prefect": {"retries": -1}})


# -- TaskConfig is a dict --------------------------------------------------------------------------------------


@pytest.mark.usefixtures("no_warnings")
def test_copy_and_dict_give_the_set_fields_without_a_warning() -> None:
    cfg = TaskConfig(retries=2, retry_delay_seconds=[0.5, 1.0], timeout_seconds=None)
    copied = cfg.copy()
    assert type(copied) is TaskConfig and copied == cfg and copied is not cfg
    assert dict(cfg) == {"retries": 2, "retry_delay_seconds": [0.5, 1.0]}  # only the fields that were set
    assert type(dict(cfg)) is dict and {**cfg} == dict(cfg)
    assert list(cfg) == list(cfg.keys()) == ["retries", "retry_delay_seconds"] and len(cfg) == 2
    assert cfg["retries"] == 2 and cfg.get("timeout_seconds") is None and "timeout_seconds" not in cfg
    assert cfg.retries == 2 and cfg.timeout_seconds is None  # the fields read as attributes too
    assert copy.copy(cfg) == copy.deepcopy(cfg) == pickle.loads(pickle.dumps(cfg)) == cfg
    assert type(pickle.loads(pickle.dumps(cfg))) is TaskConfig
    assert json.loads(json.dumps(cfg)) == {"retries": 2, "retry_delay_seconds": [0.5, 1.0]}
    assert TaskConfig({"retries": 2}, timeout_seconds=5) == TaskConfig(retries=2, timeout_seconds=5)
    assert repr(TaskConfig(retries=0)) == "TaskConfig(retries=0)"


@pytest.mark.usefixtures("no_warnings")
def test_union_gives_a_validated_task_config() -> None:
    cfg = TaskConfig(retries=2, retry_delay_seconds=[0.5, 1.0])
    merged = cfg | {"timeout_seconds": 30}
    assert type(merged) is TaskConfig
    assert merged == {"retries": 2, "retry_delay_seconds": [0.5, 1.0], "timeout_seconds": 30.0}
    left = {"log_prints": True, "retries": 9} | cfg
    assert type(left) is TaskConfig and left == {
        "log_prints": True,
        "retries": 2,
        "retry_delay_seconds": [0.5, 1.0],
    }
    assert type(cfg | TaskConfig(retries=3)) is TaskConfig
    with pytest.raises(DurabilityConfigError, match="retry_delay_seconds has 2 delays but retries=0"):
        cfg | {"retries": 0}  # a union is the dict union, checked as a whole
    with pytest.raises(DurabilityConfigError, match="TaskConfig timeout_seconds=-1 is invalid"):
        cfg | {"timeout_seconds": -1}
    grown = cfg
    grown |= {"retries": 3}  # binds a new config; `cfg` is unchanged
    assert grown == {"retries": 3, "retry_delay_seconds": [0.5, 1.0]} and cfg["retries"] == 2


@pytest.mark.usefixtures("no_warnings")
def test_equality_with_a_plain_dict_of_the_same_set_fields() -> None:
    cfg = TaskConfig(retries=2, timeout_seconds=10, tags=["a"])
    assert cfg == {"retries": 2, "timeout_seconds": 10, "tags": ["a"]}
    assert {"retries": 2, "timeout_seconds": 10.0, "tags": ("a",)} == cfg  # noqa: SIM300 (the dict on the left)
    assert cfg == {"retries": 2, "timeout_seconds": 10, "tags": ["a"], "log_prints": None}  # None: not set
    assert cfg != {"retries": 2} and {"retries": 2} != cfg  # noqa: SIM300 (both sides)
    assert cfg != {"retries": -1} and cfg != "retries"  # an invalid dict or another type is simply not equal
    assert TaskConfig() == {} and isinstance(cfg, dict)


@pytest.mark.usefixtures("no_warnings")
def test_a_task_config_is_frozen() -> None:
    cfg = TaskConfig(retries=2)
    mutations: list[Callable[[], object]] = [
        lambda: cfg.__setitem__("retries", 3),
        lambda: cfg.__delitem__("retries"),
        lambda: cfg.update(retries=3),
        lambda: cfg.pop("retries"),
        lambda: cfg.setdefault("timeout_seconds", 1.0),
        cfg.clear,
        cfg.popitem,
        lambda: cfg.copy().__setitem__("retries", 3),
    ]
    for mutate in mutations:
        with pytest.raises(TypeError, match="frozen"):
            mutate()
    with pytest.raises(ValidationError, match="frozen"):
        cfg.retries = 3  # type: ignore[misc]
    assert cfg == {"retries": 2}


@pytest.mark.usefixtures("no_warnings")
def test_a_task_config_is_accepted_where_a_dict_is() -> None:
    cfg = TaskConfig(retries=1, timeout_seconds=30)
    metadata: dict[str, Any] = {"prefect": cfg}
    assert tool_config_from_metadata("send_email", metadata) is cfg  # ours
    assert TaskConfig.of(cfg) is cfg and TaskConfig.of({"retries": 1}) == {"retries": 1}
    assert PrefectDurability(tool_task_config_by_name={"send_email": cfg}).tool_task_config_by_name == {
        "send_email": cfg
    }
    tool = SimpleNamespace(tool_def=ToolDefinition(name="send_email", metadata=metadata))
    # pydantic-ai's own Prefect integration, which refused anything that is not a dict
    assert resolve_tool_task_config(cast(Any, tool), "send_email", {}) is cfg


@pytest.mark.anyio
async def test_pydantic_ais_tool_selectors_read_a_task_config_in_metadata_as_a_dict() -> None:
    tool_def = ToolDefinition(
        name="send_email", metadata={"prefect": TaskConfig(retries=1, timeout_seconds=30)}
    )
    ctx = cast(RunContext[None], None)
    assert await matches_tool_selector({"prefect": {"retries": 1}}, ctx, tool_def)
    assert not await matches_tool_selector({"prefect": {"retries": 2}}, ctx, tool_def)


# -- a real run ------------------------------------------------------------------------------------------------


@pytest.mark.anyio
async def test_the_readme_config_runs_send_email_once_and_a_metadata_config_retries() -> None:
    calls: Counter[str] = Counter()

    def model(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        calls["model"] += 1
        done = _returns(messages)
        if not done:
            return ModelResponse(
                parts=[
                    ToolCallPart("send_email", {"to": "cfo@example.com"}),
                    ToolCallPart("cheap_lookup", {}),
                    ToolCallPart("flaky_report", {}),
                ]
            )
        return ModelResponse(parts=[TextPart(" ".join(sorted(str(p.content) for p in done)))])

    agent: Agent[None, str] = Agent(FunctionModel(model), name=_name("readme_run"))

    @agent.tool_plain
    def send_email(to: str) -> str:
        calls["send_email"] += 1
        return f"sent to {to}"

    @agent.tool_plain
    def cheap_lookup() -> str:
        calls["cheap_lookup"] += 1
        return "42"

    @agent.tool_plain(metadata={"prefect": TaskConfig(retries=1, retry_delay_seconds=0)})
    def flaky_report() -> str:
        calls["flaky_report"] += 1
        if calls["flaky_report"] == 1:
            raise ConnectionError("report service unreachable")
        return "report"

    durable = PrefectAgent(
        agent,
        model_task_config=MODEL_CONFIG,
        tool_task_config=TOOL_CONFIG,
        tool_task_config_by_name=BY_NAME,
    )
    result = await durable.run("Email the Q4 numbers")
    assert result.output == "42 report sent to cfo@example.com"
    assert calls == Counter(
        model=2, send_email=1, cheap_lookup=1, flaky_report=2
    )  # flaky: its metadata's retry
    resolved = durable.durability.tool_tasks
    send_email_tasks = resolved.for_tool("send_email")
    assert send_email_tasks is not None and send_email_tasks.config == {"retries": 0}
    assert send_email_tasks.task("send_email").retries == 0


@pytest.mark.anyio
async def test_a_misfit_in_a_tool_added_after_wrapping_fails_before_any_model_call() -> None:
    calls: Counter[str] = Counter()

    def model(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        calls["model"] += 1
        return ModelResponse(parts=[TextPart("x")])

    agent: Agent[None, str] = Agent(FunctionModel(model), name=_name("late_tool"))
    durable = PrefectAgent(agent, tool_task_config_by_name={"send_email": {"retry_delay_seconds": [1, 2]}})

    @agent.tool_plain(metadata={"prefect": {"retries": 1}})
    def send_email() -> str:
        return "sent"

    with pytest.raises(DurabilityConfigError, match="retry_delay_seconds has 2 delays but retries=1"):
        await durable.run("go")
    assert calls["model"] == 0
