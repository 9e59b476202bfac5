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
from collections.abc import Iterator
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
from pydantic_ai.models.function import AgentInfo, FunctionModel

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
    assert result.output == DataAnalysis.model_validate(document["output"])
    assert replay.tool_calls == 2  # calculate_statistics and detect_anomalies, from the recording


def test_a_changed_prompt_fails_with_a_diff_of_the_request() -> None:
    with pytest.raises(CassetteMismatch) as caught:
        _analyst_replay(json.loads(ANALYST_CASSETTE.read_text()), prompt="Analyze the sales data for Q3")
    assert str(caught.value).splitlines() == [
        "analyst.json: model step #1 was asked something else:",
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
    edited["steps"][1]["args"] = {"column": "price"}  # recorded: calculate_statistics(column="price")
    with pytest.raises(CassetteMismatch) as caught:
        _analyst_replay(edited)
    assert '-   "column": "price"' in str(caught.value) and '+  "column": "sales"' in str(caught.value)


def test_a_request_past_the_end_of_the_cassette_fails_naming_it() -> None:
    document = json.loads(ANALYST_CASSETTE.read_text())
    document["steps"] = document["steps"][:4]  # the final model step is gone
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


def _journal_files(run_id: str) -> list[Path]:
    """The run's record, its progress log and the journal entries the record indexes, in this session's local
    storage."""
    import anyio

    from prefect_pydantic_ai.store.records import read_record, result_storage

    record = anyio.run(read_record, run_id, "journal_gc", 0)
    assert record is not None
    root = Path(anyio.run(result_storage).root())
    keys = {s.key for a in record.attempts for s in a.steps}
    runs = root / "prefect-pydantic-ai" / "runs" / run_id
    return [
        runs / "journal_gc.0.json",
        runs / "journal_gc.0.progress.jsonl",
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
