"""The journal as a tool (issue #30): fork a run at a step, export it as a cassette and replay that offline.

Calls are counted: `CALLS` lists every model request and tool call that really executed in this process.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import signal
import subprocess
import sys
import textwrap
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
from prefect import flow
from pydantic_ai import Agent
from pydantic_ai.messages import (
    ModelMessage,
    ModelResponse,
    TextPart,
    ToolCallPart,
    ToolReturnPart,
    UserPromptPart,
)
from pydantic_ai.models.function import AgentInfo, DeltaToolCall, DeltaToolCalls, FunctionModel

from prefect_pydantic_ai import PrefectAgent, TaskConfig, ledger_of, show_run
from prefect_pydantic_ai.demo.analyst import DataAnalysis, build_analyst_agent, sales_dataset
from prefect_pydantic_ai.ops.fork import fork_run
from prefect_pydantic_ai.ops.runs import resolve_run
from prefect_pydantic_ai.store.prefect_rest import prefect_api
from prefect_pydantic_ai.testing import Cassette, CassetteMismatch
from tests import commands

pytestmark = pytest.mark.anyio

ANALYST_CASSETTE = Path(__file__).parent / "cassettes" / "analyst.json"
CALLS: list[str] = []
FAIL_TOOL: list[bool] = []  # while it holds True, `lookup` raises


def _policy(label: str) -> Any:
    def respond(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        CALLS.append(label)
        returns = [p for m in messages for p in m.parts if isinstance(p, ToolReturnPart)]
        if len(returns) < 2:
            return ModelResponse(parts=[ToolCallPart("lookup", {"key": f"k{len(returns)}"})])
        prompt = next(p.content for m in messages for p in m.parts if isinstance(p, UserPromptPart))
        return ModelResponse(parts=[TextPart(f"{prompt}: " + ",".join(str(r.content) for r in returns))])

    return respond


agent: Agent[None, str] = Agent(FunctionModel(_policy("model")), name="journal_tools")


@agent.tool_plain
def lookup(key: str) -> str:
    CALLS.append("lookup")
    if FAIL_TOOL:
        raise RuntimeError("lookup is down")
    return key.upper()


durable = PrefectAgent(agent)


@flow
async def lookup_flow(prompt: str) -> str:
    return (await durable.run(prompt)).output  # type: ignore[no-any-return]


@pytest.fixture(autouse=True)
def _calls() -> Iterator[None]:
    CALLS.clear()
    FAIL_TOOL.clear()
    yield
    FAIL_TOOL.clear()


async def _original(prompt: str = "hello") -> str:
    """A completed bare run of five steps (model, lookup, model, lookup, model); its flow run id."""
    async with prefect_api() as api:
        key = f"jt-{uuid.uuid4().hex[:8]}"
        await durable.run(prompt, idempotency_key=key)
        run_id = str((await resolve_run(api, key)).id)
    assert CALLS == ["model", "lookup", "model", "lookup", "model"]
    CALLS.clear()
    return run_id


async def test_a_fork_pays_only_for_the_steps_from_at_and_names_its_origin() -> None:
    original = await _original()
    forked = await fork_run(original, at=4)
    assert CALLS == ["lookup", "model"]  # steps 4 and 5; 1-3 came from the original's journal
    assert (forked.replayed, forked.output, forked.forked_from) == (3, "hello: K0,K1", original)
    assert forked.ledger is not None
    assert (forked.ledger.spent.model_calls, forked.ledger.saved.model_calls) == (1, 2)
    detail = await show_run(forked.run_id)
    assert (detail.forked_from, detail.forked_at) == (original, 4)
    assert [s.status for s in detail.steps] == ["replayed"] * 3 + ["executed"] * 2
    async with prefect_api() as api:
        assert f"forked-from:{original}" in (await resolve_run(api, forked.run_id)).tags
    CALLS.clear()
    again = await fork_run(original, at=1)  # nothing replayed: a rerun from scratch
    assert (again.replayed, len(CALLS)) == (0, 5)


async def test_a_fork_runs_on_another_model_with_another_prompt() -> None:
    original = await _original()
    forked = await fork_run(original, at=3, prompt="bonjour", model=FunctionModel(_policy("other")))
    assert CALLS == [
        "other",
        "lookup",
        "other",
    ]  # step 1 (model) and 2 (lookup) replayed under the old prompt
    assert (forked.replayed, forked.output) == (2, "bonjour: K0,K1")


async def test_a_fork_of_a_failed_run_replays_what_completed() -> None:
    FAIL_TOOL.append(True)
    key = f"jt-{uuid.uuid4().hex[:8]}"
    with pytest.raises(RuntimeError, match="lookup is down"):
        await durable.run("hello", idempotency_key=key)
    assert CALLS == ["model", "lookup"]
    FAIL_TOOL.clear()
    CALLS.clear()
    forked = await fork_run(key, at=2)
    assert CALLS == ["lookup", "model", "lookup", "model"]
    assert (forked.replayed, forked.output) == (1, "hello: K0,K1")


async def test_a_fork_of_a_user_flow_replays_its_agent_steps() -> None:
    await lookup_flow("from a flow")
    assert len(CALLS) == 5
    CALLS.clear()
    async with prefect_api() as api:
        runs = await api.flow_runs({"tags": {"all_": ["agent:journal_tools"]}}, "START_TIME_DESC", 1)
    forked = await fork_run(str(runs[0].id), at=5)
    assert CALLS == ["model"]
    assert (forked.replayed, forked.output) == (4, "from a flow: K0,K1")


def test_fork_from_the_command_line_with_an_edited_tool_result(anyio_backend: str) -> None:
    import anyio

    original = anyio.run(_original)
    out = commands.cli("fork", original, "--at", "4", "--tool-result", '"EDITED"')
    assert out.returncode == 0, out.stderr
    assert CALLS == ["model"]  # step 4's tool did not run, step 5 did
    assert re.search(rf"Forked run \S+ from {original} at step #4: 3 step\(s\) replayed", out.stdout), (
        out.stdout
    )
    assert f"Forked from run {original} at step #4" in out.stdout
    assert "hello: K0,EDITED" in out.stdout


def test_fork_refuses_a_step_it_cannot_fork_at_in_one_line(anyio_backend: str) -> None:
    import anyio

    original = anyio.run(_original)
    out = commands.cli("fork", original, "--at", "3", "--tool-result", "x")
    assert (out.returncode, out.stderr.strip()) == (
        2,
        "error: --tool-result edits a tool step, and step #3 is a model step; use --at with a tool step's number "
        "(`show` lists them).",
    )
    out = commands.cli("fork", original, "--at", "0")
    assert out.returncode == 2 and out.stderr.count("\n") == 1, out.stderr
    assert CALLS == []


def test_export_writes_a_cassette_the_plain_agent_replays_offline(tmp_path: Path, anyio_backend: str) -> None:
    import anyio

    original = anyio.run(_original)
    out = commands.cli("export", original, "-o", str(tmp_path / "run.json"))
    assert (out.returncode, out.stdout.strip()) == (
        0,
        f"Wrote 5 steps of run {original} to {tmp_path / 'run.json'}.",
    )
    cassette = Cassette.load(tmp_path / "run.json")
    assert [s["kind"] for s in cassette.steps] == ["model", "tool", "model", "tool", "model"]
    assert cassette.steps[1]["args"] == {"key": "k0"}
    replay = cassette.replay()
    result = agent.run_sync(cassette.prompt, capabilities=[replay])  # the plain agent: no Prefect at all
    replay.assert_done()
    assert (result.output, cassette.output, CALLS, replay.tool_calls) == (
        "hello: K0,K1",
        "hello: K0,K1",
        [],
        2,
    )


# -- a cassette of several agents, and of streamed requests -------------------------------------------------------


def _replying(label: str, reply: Any) -> Any:
    """A scripted model: counts its calls as `label`; `reply(prompt, tool results)` is its response's parts."""

    def respond(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        CALLS.append(label)
        prompt = next(p.content for m in messages for p in m.parts if isinstance(p, UserPromptPart))
        returns = [str(p.content) for m in messages for p in m.parts if isinstance(p, ToolReturnPart)]
        return ModelResponse(parts=reply(prompt, returns))

    return FunctionModel(respond)


researcher_agent: Agent[None, str] = Agent(
    _replying(
        "researcher",
        lambda prompt, found: (
            [TextPart(f"found {found[0]}")]
            if found
            else [ToolCallPart("lookup", {"key": prompt.split()[-1]})]
        ),
    ),
    name="jt_researcher",
    tools=[lookup],
)
researcher = PrefectAgent(researcher_agent)
coordinator_agent: Agent[None, str] = Agent(
    _replying(
        "coordinator",
        lambda prompt, found: (
            [TextPart(f"report: {found[0]}")]
            if found
            else [ToolCallPart("delegate", {"topic": prompt.split()[-1]})]
        ),
    ),
    name="jt_coordinator",
)


@coordinator_agent.tool_plain
async def delegate(topic: str) -> str:
    """Have the researcher research `topic` (a durable sub-agent run inside this tool step)."""
    CALLS.append("delegate")
    return (await researcher.run(f"Research {topic}")).output  # type: ignore[no-any-return]


coordinator = PrefectAgent(coordinator_agent)
writer_agent: Agent[None, str] = Agent(
    _replying("writer", lambda prompt, found: [TextPart(prompt.replace("Summarise ", "summary of "))]),
    name="jt_writer",
)
writer = PrefectAgent(writer_agent)


@flow
async def report_flow(topic: str) -> str:
    """Two agents in one flow run, the first delegating to a third from a tool."""
    found = (await coordinator.run(f"Report on {topic}")).output
    return (await writer.run(f"Summarise {found}")).output  # type: ignore[no-any-return]


@pytest.fixture(scope="module")
def report_cassette() -> dict[str, Any]:
    """`report_flow` run once and exported; the model and tool calls it executed are checked here."""
    import anyio

    from prefect_pydantic_ai import export_run

    async def record() -> dict[str, Any]:
        CALLS.clear()
        await report_flow("k9")
        assert CALLS == [
            "coordinator",
            "delegate",
            "researcher",
            "lookup",
            "researcher",
            "coordinator",
            "writer",
        ]
        async with prefect_api() as api:
            runs = await api.flow_runs({"tags": {"all_": ["agent:jt_writer"]}}, "START_TIME_DESC", 1)
        return await export_run(str(runs[0].id))

    return anyio.run(record)


def test_a_flow_of_agents_that_delegate_exports_every_run_and_each_replays_offline(
    report_cassette: dict[str, Any],
) -> None:
    runs = report_cassette["runs"]
    assert [(r["agent"], r["within"], len(r["steps"])) for r in runs] == [
        ("jt_coordinator", None, 3),
        ("jt_researcher", {"run": 0, "step": 2}, 3),  # started by the coordinator's step #2, `delegate`
        ("jt_writer", None, 1),
    ]
    replay = Cassette(report_cassette, "report.json").replay()
    outputs = [
        agent.run_sync(run["prompt"], capabilities=[replay]).output
        for agent, run in zip([coordinator_agent, researcher_agent, writer_agent], runs, strict=True)
    ]
    replay.assert_done()
    assert outputs == ["report: found K9", "found K9", "summary of report: found K9"]
    assert (CALLS, replay.tool_calls) == ([], 2)  # delegate and lookup answered from the recording


def test_a_multi_agent_cassette_names_the_agent_that_asked_something_else(
    report_cassette: dict[str, Any],
) -> None:
    cassette = Cassette(report_cassette, "report.json")
    replay = cassette.replay()
    coordinator_agent.run_sync("Report on k9", capabilities=[replay])
    first = cassette.runs[1].steps[0]["step"]  # `show`'s numbering: the flow run's steps, in order
    with pytest.raises(CassetteMismatch) as caught:
        researcher_agent.run_sync("Research k10", capabilities=[replay])
    assert str(caught.value).splitlines()[:1] == [
        f"report.json: jt_researcher: model step #{first} was asked something else:"
    ]
    with pytest.raises(CassetteMismatch) as caught:
        agent.run_sync("hello", capabilities=[replay])
    assert str(caught.value) == (
        "report.json: agent 'journal_tools' ran, and the cassette holds no other run of it "
        "(it holds runs of jt_coordinator, jt_researcher, jt_writer)"
    )
    with pytest.raises(CassetteMismatch) as caught:
        replay.assert_done()
    assert str(caught.value) == (
        f"report.json: the runs ended before these steps: jt_researcher #{first} model function:respond:, "
        f"jt_researcher #{first + 1} tool lookup, jt_researcher #{first + 2} model function:respond:, "
        f"jt_writer #{cassette.runs[2].steps[0]['step']} model function:respond:"
    )
    assert CALLS == []


async def _streamed_words(
    messages: list[ModelMessage], info: AgentInfo
) -> AsyncIterator[str | DeltaToolCalls]:
    """`_policy`'s responses as a provider streams them: text word by word, a tool call's name then its args."""
    for part in _policy("model")(messages, info).parts:
        if isinstance(part, ToolCallPart):
            yield {0: DeltaToolCall(name=part.tool_name)}
            yield {0: DeltaToolCall(json_args=part.args_as_json_str())}
        else:
            for word in part.content.split(","):
                yield word + ","


streaming_agent: Agent[None, str] = Agent(
    FunctionModel(_policy("model"), stream_function=_streamed_words), name="journal_stream", tools=[lookup]
)


async def test_a_streamed_run_exports_and_its_cassette_replays_as_a_stream() -> None:
    from prefect_pydantic_ai import export_run

    key = f"jt-stream-{uuid.uuid4().hex[:8]}"
    events: list[str] = []

    async def handler(ctx: Any, stream: Any) -> None:
        async for event in stream:
            events.append(type(event).__name__)

    async with PrefectAgent(streaming_agent).run_stream(
        "hi", idempotency_key=key, event_stream_handler=handler
    ) as stream:
        recorded = await stream.get_output()
    assert (recorded, CALLS) == ("hi: K0,K1,", ["model", "lookup", "model", "lookup", "model"])
    CALLS.clear()
    cassette = Cassette(await export_run(key), "stream.json")
    replay = cassette.replay()
    events.clear()
    async with streaming_agent.run_stream(
        "hi", capabilities=[replay], event_stream_handler=handler
    ) as stream:
        chunks = [chunk async for chunk in stream.stream_text(delta=True)]
    replay.assert_done()
    assert ("".join(chunks), CALLS, replay.tool_calls) == ("hi: K0,K1,", [], 2)
    assert events.count("FunctionToolCallEvent") == 2 and "PartStartEvent" in events
    replay = cassette.replay()
    async with streaming_agent.iter("hi", capabilities=[replay]) as run:
        async for node in run:
            if Agent.is_model_request_node(node):
                async with node.stream(run.ctx) as request_stream:
                    async for _ in request_stream:
                        pass
    replay.assert_done()
    assert run.result is not None and (run.result.output, CALLS) == ("hi: K0,K1,", [])


# -- the shipped cassette of the analyst demo --------------------------------------------------------------------


def _never(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    raise AssertionError("the cassette answers every model request")


def _analyst_replay(document: dict[str, Any], prompt: str | None = None) -> Any:
    cassette = Cassette(document, "analyst.json")
    replay = cassette.replay()
    result = build_analyst_agent(FunctionModel(_never)).run_sync(
        prompt or cassette.prompt, deps=sales_dataset(), capabilities=[replay]
    )
    replay.assert_done()
    return result, replay


def test_the_analyst_cassette_replays_the_demo_without_its_model_or_tools() -> None:
    document = json.loads(ANALYST_CASSETTE.read_text())
    result, replay = _analyst_replay(document)
    assert result.output == DataAnalysis.model_validate(document["runs"][0]["output"])
    assert replay.tool_calls == 2  # calculate_statistics and detect_anomalies, from the recording


def test_a_changed_prompt_fails_with_a_diff_of_the_request() -> None:
    with pytest.raises(CassetteMismatch) as caught:
        _analyst_replay(json.loads(ANALYST_CASSETTE.read_text()), prompt="Analyze the sales data for Q3")
    assert str(caught.value).splitlines() == [
        "analyst.json: data_analyst: model step #1 was asked something else:",
        "--- recorded",
        "+++ asked",
        "@@ -1,5 +1,5 @@",
        " [",
        "  {",
        '-  "user_prompt": "Analyze the sales data for Q4"',
        '+  "user_prompt": "Analyze the sales data for Q3"',
        "  }",
        " ]",
    ]


def test_a_tool_call_the_cassette_does_not_hold_fails_with_a_diff() -> None:
    document = json.loads(ANALYST_CASSETTE.read_text())
    edited = copy.deepcopy(document)
    edited["runs"][0]["steps"][1]["args"] = {
        "column": "price"
    }  # recorded: calculate_statistics(column="price")
    with pytest.raises(CassetteMismatch) as caught:
        _analyst_replay(edited)
    assert '-   "column": "price"' in str(caught.value) and '+  "column": "sales"' in str(caught.value)


def test_a_request_past_the_end_of_the_cassette_fails_naming_it() -> None:
    document = json.loads(ANALYST_CASSETTE.read_text())
    document["runs"][0]["steps"] = document["runs"][0]["steps"][:4]  # the final model step is gone
    with pytest.raises(CassetteMismatch, match=r"model request 3 is not in the cassette \(it holds 2\)"):
        _analyst_replay(document)


@pytest.mark.slow
def test_the_cassette_replays_with_no_server_and_no_network(tmp_path: Path) -> None:
    script = tmp_path / "offline.py"
    script.write_text(
        textwrap.dedent(
            f"""
            import socket

            def refuse(*args, **kwargs):
                raise OSError("no network in this test")

            socket.socket.connect = refuse
            socket.create_connection = refuse
            from pydantic_ai.models.test import TestModel
            from prefect_pydantic_ai.demo.analyst import build_analyst_agent, sales_dataset
            from prefect_pydantic_ai.testing import Cassette

            cassette = Cassette.load({str(ANALYST_CASSETTE)!r})
            replay = cassette.replay()
            result = build_analyst_agent(TestModel()).run_sync(
                cassette.prompt, deps=sales_dataset(), capabilities=[replay]
            )
            replay.assert_done()
            print(result.output.columns_analyzed, replay.tool_calls)
            """
        )
    )
    out = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=120,
        env={**os.environ, "PREFECT_API_URL": "http://127.0.0.1:9/api"},  # nothing listens there
    )
    assert (out.returncode, out.stdout.strip()) == (0, "['sales'] 2"), out.stderr


# -- retention -----------------------------------------------------------------------------------------------------

gc_agent = PrefectAgent(Agent(FunctionModel(_policy("model")), name="journal_gc", tools=[lookup]))


def _journal_files(run_id: str, agent_name: str = "journal_gc") -> list[Path]:
    """The run's record, its progress log and the journal entries the record indexes, in this session's local
    storage."""
    import anyio

    from prefect_pydantic_ai.store.records import read_record, result_storage

    record = anyio.run(read_record, run_id, agent_name, 0)
    assert record is not None
    root = Path(anyio.run(result_storage).root())
    keys = {s.key for a in record.attempts for s in a.steps}
    runs = root / "prefect-pydantic-ai" / "runs" / run_id
    return [
        runs / f"{agent_name}.0.json",
        runs / f"{agent_name}.0.progress.jsonl",
        *(root / k for k in sorted(keys)),
    ]


def _gc_runs(anyio_backend: str) -> tuple[str, str, str]:
    """A completed and a failed run of `journal_gc`, and a cutoff after both: (completed, failed, cutoff)."""
    import anyio

    async def runs() -> tuple[str, str]:
        completed, failed = f"gc-{uuid.uuid4().hex[:8]}", f"gc-{uuid.uuid4().hex[:8]}"
        await gc_agent.run("hello", idempotency_key=completed)
        FAIL_TOOL.append(True)
        with pytest.raises(RuntimeError):
            await gc_agent.run("hello", idempotency_key=failed)
        FAIL_TOOL.clear()
        async with prefect_api() as api:
            return str((await resolve_run(api, completed)).id), str((await resolve_run(api, failed)).id)

    completed, failed = anyio.run(runs)
    return completed, failed, __import__("datetime").datetime.now(__import__("datetime").UTC).isoformat()


def test_gc_removes_old_finished_runs_and_keeps_resumable_ones_unless_asked(anyio_backend: str) -> None:
    completed, failed, cutoff = _gc_runs(anyio_backend)
    done_files, failed_files = _journal_files(completed), _journal_files(failed)
    # the record, its progress log and the journal entries: of 5 steps; of the one (model) step that completed
    assert (len(done_files), len(failed_files)) == (7, 3)
    done_bytes = sum(p.stat().st_size for p in done_files)

    dry = commands.cli("gc", "--older-than", cutoff, "--agent", "journal_gc", "--dry-run", "--json")
    assert dry.returncode == 0, dry.stderr
    report = json.loads(dry.stdout)
    assert (report["runs"], report["files"], report["bytes"], report["dry_run"]) == (
        [completed],
        7,
        done_bytes,
        True,
    )
    assert "can be resumed" in report["kept"][failed]
    assert all(p.exists() for p in done_files)

    out = commands.cli("gc", "--older-than", cutoff, "--agent", "journal_gc")
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(f"Removed 7 files ({done_bytes:,} bytes) of 1 runs"), out.stdout
    assert not any(p.exists() for p in done_files) and all(p.exists() for p in failed_files)

    out = commands.cli(
        "gc", "--older-than", cutoff, "--agent", "journal_gc", "--include-unfinished", "--json"
    )
    assert json.loads(out.stdout)["runs"] == [failed]
    assert not any(p.exists() for p in failed_files)

    CALLS.clear()
    out = commands.cli("export", completed)  # its journal is gone: one line, exit 2
    assert out.returncode == 2 and "has no run record" in out.stderr, out.stderr


gc_key_agent = PrefectAgent(Agent(FunctionModel(_policy("model")), name="journal_gc_key", tools=[lookup]))


def test_gc_collects_a_failed_flow_run_once_a_later_one_of_its_key_completed(anyio_backend: str) -> None:
    import datetime

    import anyio

    key = f"gc-key-{uuid.uuid4().hex[:8]}"

    async def runs() -> list[str]:
        FAIL_TOOL.append(True)
        with pytest.raises(RuntimeError):
            await gc_key_agent.run("hello", idempotency_key=key)
        FAIL_TOOL.clear()
        await gc_key_agent.run(
            "hello", idempotency_key=key
        )  # another flow run: it replays the first's model step
        async with prefect_api() as api:
            found = await api.flow_runs({"tags": {"all_": [f"key:{key}"]}}, "START_TIME_ASC", 10)
        return [str(run.id) for run in found]

    failed, completed = anyio.run(runs)
    assert CALLS == ["model", "lookup", "lookup", "model", "lookup", "model"]
    files = _journal_files(failed, "journal_gc_key") + _journal_files(completed, "journal_gc_key")
    cutoff = datetime.datetime.now(datetime.UTC).isoformat()
    out = commands.cli("gc", "--older-than", cutoff, "--agent", "journal_gc_key", "--json")
    report = json.loads(out.stdout)
    # the failed flow run cannot be resumed into anything but the completed result: no --include-unfinished
    assert (report["runs"], report["kept"], report["files"]) == ([failed, completed], {}, len(set(files)))
    assert not any(p.exists() for p in files)


@pytest.mark.slow
def test_gc_removes_a_runs_files_from_s3(tmp_path: Path, anyio_backend: str) -> None:
    import datetime

    import anyio
    from prefect.settings import PREFECT_DEFAULT_RESULT_STORAGE_BLOCK, temporary_settings

    from tests.s3_servers import moto_s3, s3_client, save_bucket

    with moto_s3(tmp_path) as (endpoint, bucket), contextlib.closing(s3_client(endpoint)) as client:

        def objects() -> dict[str, int]:
            listed = client.list_objects_v2(Bucket=bucket).get("Contents", [])
            return {o["Key"]: o["Size"] for o in listed}

        with temporary_settings({PREFECT_DEFAULT_RESULT_STORAGE_BLOCK: save_bucket(bucket, endpoint)}):
            key = f"gc-s3-{uuid.uuid4().hex[:8]}"
            anyio.run(lambda: gc_agent.run("hello", idempotency_key=key))
            stored = objects()
            assert (
                len([k for k in stored if not k.startswith("prefect-pydantic-ai/")]) == 5
            )  # the five entries
            cutoff = datetime.datetime.now(datetime.UTC).isoformat()
            out = commands.cli("gc", "--older-than", cutoff, "--agent", "journal_gc", "--json")
        report = json.loads(out.stdout)
        assert (report["files"], report["bytes"]) == (len(stored), sum(stored.values()))
        assert objects() == {}


# -- memoization across runs -----------------------------------------------------------------------------------------

memo_agent = Agent(FunctionModel(_policy("model")), name="journal_memo", deps_type=str, tools=[lookup])


def _memoized(seconds: float | None) -> PrefectAgent[str, str]:
    config = TaskConfig(memoize_seconds=seconds) if seconds else TaskConfig()
    return PrefectAgent(memo_agent, model_task_config=config, tool_task_config=config)


async def test_memoized_steps_answer_identical_requests_of_later_runs_within_their_ttl() -> None:
    prompt, deps = f"memo {uuid.uuid4().hex[:6]}", "shop-1"
    first = await _memoized(3600).run(prompt, deps=deps)
    assert CALLS == ["model", "lookup", "model", "lookup", "model"]
    CALLS.clear()
    second = await _memoized(3600).run(
        prompt, deps=deps
    )  # another run, no key: answered by the first's steps
    assert (CALLS, second.output) == ([], first.output)
    ledger = ledger_of(second)
    assert ledger is not None and (ledger.spent.model_calls, ledger.saved.model_calls) == (0, 3)
    await _memoized(3600).run(prompt, deps="shop-2")  # other deps: another request
    assert len(CALLS) == 5
    CALLS.clear()
    await _memoized(None).run(prompt, deps=deps)  # not asked for: off
    assert len(CALLS) == 5
    CALLS.clear()
    await _memoized(0.001).run(prompt + "!", deps=deps)
    await _memoized(0.001).run(
        prompt + "!", deps=deps
    )  # each entry expired a millisecond after it was written
    assert len(CALLS) == 10


@pytest.mark.slow
def test_a_fork_of_a_crashed_run_replays_the_steps_completed_before_the_kill(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tests.test_cli import FIVE, calls, script

    log = tmp_path / "calls.log"
    env = {"FIVE_STEP_LOG": str(log), "FIVE_STEP_AGENT": f"five_step_{uuid.uuid4().hex[:6]}"}
    key = f"jt-killed-{uuid.uuid4().hex[:8]}"
    killed = script(FIVE, key, {**env, "FIVE_STEP_KILL_IN_TOOL": "4"})
    assert killed.returncode == -signal.SIGKILL
    assert calls(log) == ["model", "tool:calculate_statistics", "model", "tool:detect_anomalies"]
    for name, value in env.items():
        monkeypatch.setenv(name, value)  # the fork re-creates the script's agent in this process
    out = commands.cli("fork", key, "--at", "4")
    assert out.returncode == 0, out.stderr
    assert "3 step(s) replayed" in out.stdout
    # the killed call and the final model call ran again; the first three steps came from the journal
    assert calls(log)[4:] == ["tool:detect_anomalies", "model"]

    # The killed attempt never recorded its steps; its progress log names the key of each step it started.
    import datetime

    import anyio

    from prefect_pydantic_ai.store.records import result_storage

    async def killed_run() -> str:
        async with prefect_api() as api:
            return str((await resolve_run(api, key)).id)

    killed_id, root = anyio.run(killed_run), Path(anyio.run(result_storage).root())
    runs = root / "prefect-pydantic-ai" / "runs" / killed_id
    progress = (runs / f"{env['FIVE_STEP_AGENT']}.0.progress.jsonl").read_text().splitlines()
    started = [json.loads(line)["started"] for line in progress if '"started":"' in line]
    entries = [root / k for k in started if (root / k).exists()]
    assert (len(started), len(entries)) == (4, 3)  # the fourth step was killed before its entry was written
    cutoff = datetime.datetime.now(datetime.UTC).isoformat()
    gc = ["gc", "--older-than", cutoff, "--agent", env["FIVE_STEP_AGENT"], "--json"]
    kept = json.loads(commands.cli(*gc).stdout)
    assert kept["kept"] == {
        killed_id: "it is crashed and can be resumed (pass --include-unfinished to remove it)"
    }
    assert all(p.exists() for p in entries)
    removed = json.loads(commands.cli(*gc, "--include-unfinished").stdout)
    assert removed["runs"] == [killed_id] and not runs.exists()
    assert not any(p.exists() for p in entries)
