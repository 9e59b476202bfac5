"""The command line's documented promises that no other test pins: `resume --unverified rerun`, exit code 1 when
a resumed run fails again, and the ↻ (retried) status of `show`. Resume runs the user's script as a real subprocess."""

from __future__ import annotations

import signal
import uuid
from collections import Counter
from pathlib import Path

import pytest
from pydantic_ai import Agent
from pydantic_ai.messages import ModelMessage, ModelResponse, TextPart, ToolCallPart, ToolReturnPart
from pydantic_ai.models.function import AgentInfo, FunctionModel

from prefect_pydantic_ai import PrefectAgent, TaskConfig
from tests.test_cli import FIVE, SCRIPTS, SHAPE, calls, cli, script, show

pytestmark = pytest.mark.slow  # starts processes


def test_resume_unverified_rerun_calls_the_non_idempotent_tool_again_exactly_once(tmp_path: Path) -> None:
    sent = tmp_path / "sent.log"
    env = {"SEND_EMAIL_LOG": str(sent)}
    key = f"email-rerun-{uuid.uuid4().hex[:8]}"
    killed = script(SCRIPTS / "send_email.py", key, {**env, "SEND_EMAIL_KILL": "1"})
    assert killed.returncode == -signal.SIGKILL
    assert len(sent.read_text().splitlines()) == 1  # sent, never journaled

    resumed = cli("resume", key, "--unverified", "rerun", env=env)

    assert resumed.returncode == 0, resumed.stdout + resumed.stderr[-2000:]
    emails = sent.read_text().splitlines()
    assert len(emails) == 2  # called again exactly once
    assert emails[0] == emails[1]  # with the same step idempotency key, so the mail API can drop it
    detail = show(key)
    assert detail["state"] == "completed"
    assert detail["output"] == "send_email said: sent to ops@example.com"
    again = cli("resume", key, "--unverified", "rerun", env=env)  # completed: nothing runs again
    assert again.returncode == 0 and len(sent.read_text().splitlines()) == 2


def test_resume_exits_1_when_the_resumed_run_fails_again_and_0_once_it_completes(tmp_path: Path) -> None:
    log = tmp_path / "calls.log"
    env = {"FIVE_STEP_LOG": str(log)}
    key = f"fails-again-{uuid.uuid4().hex[:8]}"
    failing = {**env, "FIVE_STEP_FAIL": "tool:detect_anomalies"}
    assert script(FIVE, key, failing).returncode == 1
    assert show(key)["state"] == "failed"

    again = cli("resume", key, env=failing)

    assert again.returncode == 1, again.stdout + again.stderr[-2000:]
    assert "The resumed run failed: ConnectionError: tool:detect_anomalies is down" in again.stderr
    assert show(key)["state"] == "failed"
    assert calls(log) == [*SHAPE[:4], "tool:detect_anomalies"]  # the resume executed only the failing step

    fixed = cli("resume", key, env=env)
    assert fixed.returncode == 0, fixed.stdout + fixed.stderr[-2000:]
    assert show(key)["state"] == "completed"
    assert calls(log) == [*SHAPE[:4], "tool:detect_anomalies", "tool:detect_anomalies", "model"]


def test_a_step_that_succeeded_on_its_second_attempt_shows_retried() -> None:
    attempts = Counter[str]()

    def model(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        if not any(isinstance(p, ToolReturnPart) for m in messages for p in m.parts):
            return ModelResponse(parts=[ToolCallPart("flaky", {})])
        return ModelResponse(parts=[TextPart("ok")])

    agent: Agent[None, str] = Agent(FunctionModel(model), name="shows_retried")

    @agent.tool_plain
    def flaky() -> str:
        attempts["flaky"] += 1
        if attempts["flaky"] == 1:
            raise ConnectionError("blip")
        return "fine"

    key = f"retried-{uuid.uuid4().hex[:8]}"
    durable = PrefectAgent(agent, tool_task_config=TaskConfig(retries=1, retry_delay_seconds=0))
    assert durable.run_sync("go", idempotency_key=key).output == "ok"
    assert attempts == Counter(flaky=2)

    detail = show(key)
    assert [(s["kind"], s["status"], s["attempts"]) for s in detail["steps"]] == [
        ("model", "executed", 1),
        ("tool", "retried", 2),
        ("model", "executed", 1),
    ]
    table = cli("show", key, columns=160)
    assert table.returncode == 0, table.stderr
    [row] = [line for line in table.stdout.splitlines() if "tool #2: flaky" in line]
    assert "↻" in row and "retried" in row
