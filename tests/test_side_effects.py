"""Non-idempotent tools: a call interrupted after its effect but before its result was journaled is never
silently repeated; every attempt of a call sees the same `step_idempotency_key()`."""

from __future__ import annotations

import asyncio
import subprocess
import uuid
from pathlib import Path

import pytest
from prefect.filesystems import RemoteFileSystem
from pydantic_ai import Agent
from pydantic_ai.messages import ModelMessage, ModelResponse, TextPart, ToolCallPart, ToolReturnPart
from pydantic_ai.models.function import AgentInfo, FunctionModel

from prefect_pydantic_ai import (
    PrefectAgent,
    StorageReadError,
    TaskConfig,
    UnverifiedEffectError,
    show_run,
    step_idempotency_key,
)
from tests.warm import python

SCRIPT = Path(__file__).parent / "scripts" / "send_email.py"


def _run(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return python(*args, env=env)


@pytest.mark.slow
def test_a_killed_non_idempotent_call_stops_the_run_until_a_human_decides(tmp_path: Path) -> None:
    sent = tmp_path / "sent.log"
    env = {"SEND_EMAIL_LOG": str(sent)}
    key = f"email-{uuid.uuid4().hex[:8]}"

    killed = _run(str(SCRIPT), key, env={**env, "SEND_EMAIL_KILL": "1"})
    assert killed.returncode == -9
    assert len(sent.read_text().splitlines()) == 1  # the email went out, its result was never journaled

    again = _run(str(SCRIPT), key, env=env)
    assert again.returncode == 1, again.stdout + again.stderr[-2000:]
    assert "ERROR UnverifiedEffectError: Tool 'send_email' was called in an earlier attempt" in again.stdout
    assert "--unverified rerun" in again.stdout
    assert len(sent.read_text().splitlines()) == 1  # not sent twice

    resumed = _run("-m", "prefect_pydantic_ai", "resume", key, "--unverified", "tell_model", env=env)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr[-2000:]
    assert len(sent.read_text().splitlines()) == 1
    detail = asyncio.run(show_run(key))
    assert detail.state == "completed"
    assert str(detail.output).startswith(
        "send_email said: This call of 'send_email' was started in an earlier"
    )

    bad = _run("-m", "prefect_pydantic_ai", "resume", key, "--unverified", "maybe", env=env)
    assert bad.returncode == 2 and "Unknown --unverified 'maybe'" in bad.stderr


@pytest.mark.anyio
@pytest.mark.slow
async def test_rerun_policy_repeats_an_abandoned_call_under_the_same_idempotency_key(
    caplog: pytest.LogCaptureFixture,
) -> None:
    calls: list[str] = []

    def model(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        returns = [p for m in messages for p in m.parts if isinstance(p, ToolReturnPart)]
        if not returns:
            return ModelResponse(
                parts=[ToolCallPart("charge", {"cents": 500}), ToolCallPart("charge", {"cents": 500})]
            )
        return ModelResponse(parts=[TextPart(" | ".join(str(r.content) for r in returns))])

    agent: Agent[None, str] = Agent(FunctionModel(model), name="charger")

    @agent.tool_plain
    async def charge(cents: int) -> str:
        calls.append(step_idempotency_key())
        if len(calls) == 1:
            await asyncio.sleep(60)  # the first attempt hangs past its timeout and is abandoned
        return f"charged {cents}"

    # Every call of `charge` has this timeout: generous, so that only the hung attempt reaches it.
    config = TaskConfig(retries=1, retry_delay_seconds=0, timeout_seconds=5.0, on_unverified="rerun")
    durable = PrefectAgent(agent, tool_task_config_by_name={"charge": config})
    result = await durable.run("Charge twice", idempotency_key=f"charge-{uuid.uuid4().hex[:8]}")

    assert result.output == "charged 500 | charged 500"
    assert len(calls) == 3  # the abandoned attempt, its rerun, and the second (identical) charge
    first, rerun, second = (
        (calls[0], calls[1], calls[2]) if calls[0] == calls[1] else (calls[0], calls[2], calls[1])
    )
    assert first == rerun and len(first) == 64  # every attempt of one call: one key
    assert second != first  # an identical call at another position: its own key
    unverified = [r.getMessage() for r in caplog.records if "effect is unverified" in r.getMessage()]
    assert unverified == ["Tool 'charge': an earlier attempt's effect is unverified; calling it again."]

    with pytest.raises(RuntimeError, match="only inside a model or tool step"):
        step_idempotency_key()


@pytest.mark.anyio
async def test_an_attempt_abandoned_at_its_timeout_is_unverified_and_the_fail_policy_stops_the_run() -> None:
    calls: list[str] = []

    def model(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        if not any(isinstance(p, ToolReturnPart) for m in messages for p in m.parts):
            return ModelResponse(parts=[ToolCallPart("transfer", {"cents": 100})])
        return ModelResponse(parts=[TextPart("done")])

    agent: Agent[None, str] = Agent(FunctionModel(model), name="transferer")

    @agent.tool_plain
    async def transfer(cents: int) -> str:
        calls.append(step_idempotency_key())
        await asyncio.sleep(30)  # hangs past its timeout: did the transfer happen? unknown
        return "transferred"

    config = TaskConfig(retries=3, retry_delay_seconds=0, timeout_seconds=0.5, on_unverified="fail")
    durable = PrefectAgent(agent, tool_task_config_by_name={"transfer": config})
    with pytest.raises(UnverifiedEffectError, match="step idempotency key") as failure:
        await durable.run("Transfer", idempotency_key=f"transfer-{uuid.uuid4().hex[:8]}")
    assert len(calls) == 1  # the retry found the call unverified and did not repeat it (nor retry further)
    assert calls[0] in str(failure.value)


class FlakyStorage(RemoteFileSystem):
    """A result storage whose reads fail (as a flaky S3 does) while `failing` holds a reason."""

    _block_type_name = "Test Flaky Storage"
    failing: str | None = None

    async def aread_path(self, path: str) -> bytes:
        if self.failing is not None:
            raise ConnectionError(self.failing)
        return await super().aread_path(path)


@pytest.mark.anyio
async def test_an_unreadable_started_marker_stops_a_non_idempotent_call_naming_the_storage() -> None:
    charged: list[int] = []

    def model(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        if not any(isinstance(p, ToolReturnPart) for m in messages for p in m.parts):
            return ModelResponse(parts=[ToolCallPart("charge", {"cents": 500})])
        return ModelResponse(parts=[TextPart("charged")])

    agent: Agent[None, str] = Agent(FunctionModel(model), name=f"charger_{uuid.uuid4().hex[:6]}")

    @agent.tool_plain
    def charge(cents: int) -> str:
        charged.append(cents)
        return "ok"

    storage = FlakyStorage(basepath=f"memory://flaky-{uuid.uuid4().hex[:8]}")
    await storage.save(f"flaky-{uuid.uuid4().hex[:8]}")  # Prefect takes only saved blocks as a task's storage
    config = TaskConfig(on_unverified="fail", retries=0, result_storage=storage)
    durable = PrefectAgent(agent, tool_task_config_by_name={"charge": config})
    key = f"flaky-{uuid.uuid4().hex[:8]}"
    storage.failing = "s3.amazonaws.com: read timed out"
    with pytest.raises(StorageReadError) as failure:
        await durable.run("Charge", idempotency_key=key)
    assert charged == []  # whether an earlier attempt charged is unknown: it does not charge on a guess
    message = str(failure.value)
    # its journal entry is read before its "started" marker: that read is the one that fails
    assert (
        "Tool step 'charge' cannot tell whether it completed in an earlier attempt, so it does not run"
        in message
    )
    assert (
        "FlakyStorage('memory://flaky-" in message
        and "ConnectionError: s3.amazonaws.com: read timed out" in message
    )

    storage.failing = None  # the storage is back: nothing was marked, the call runs once
    assert (await durable.run("Charge", idempotency_key=key)).output == "charged" and charged == [500]
