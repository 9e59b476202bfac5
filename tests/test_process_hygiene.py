"""What an agent run leaves behind in the caller's process: no unclosed connection and no warning from our code.

The whole suite fails on a warning from our code (pyproject `filterwarnings`); an unclosed connection is checked
here, where each form of run runs in a fresh context, without the session's sync Prefect client (conftest), as it
runs in a user's process."""

from __future__ import annotations

import asyncio
import contextvars
import gc
import uuid
import warnings
from collections.abc import Callable

import pytest
from prefect import flow
from pydantic_ai import Agent
from pydantic_ai.messages import ModelMessage, ModelResponse, TextPart, ToolCallPart, ToolReturnPart
from pydantic_ai.models.function import AgentInfo, FunctionModel

from prefect_pydantic_ai import AwaitingApproval, PrefectAgent


def _clerk(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    if not any(isinstance(part, ToolReturnPart) for message in messages for part in message.parts):
        return ModelResponse(parts=[ToolCallPart("refund", {"order_id": 42})])
    return ModelResponse(parts=[TextPart("refunded")])


def _durable(prefix: str) -> PrefectAgent[None, str]:
    agent: Agent[None, str] = Agent(FunctionModel(_clerk), name=f"{prefix}_{uuid.uuid4().hex[:8]}")

    @agent.tool_plain(requires_approval=True)
    def refund(order_id: int) -> str:
        return f"refunded {order_id}"

    return PrefectAgent(agent)


def _run_sync_in_a_user_flow() -> None:
    durable = _answering("in_flow")

    @flow
    def month_end() -> str:
        return durable.run_sync("hi").output

    assert month_end() == "ok"


def _run_sync_waiting_for_approval() -> None:
    with pytest.raises(AwaitingApproval):
        _durable("waits").run_sync("Refund order 42", idempotency_key=f"hygiene-{uuid.uuid4().hex[:8]}")


def _answering(prefix: str) -> PrefectAgent[None, str]:
    agent: Agent[None, str] = Agent(
        FunctionModel(lambda m, i: ModelResponse(parts=[TextPart("ok")])), name="ok"
    )
    return PrefectAgent(agent, name=f"{prefix}_{uuid.uuid4().hex[:8]}")


def _run_sync() -> None:
    assert _answering("sync").run_sync("hi").output == "ok"


def _run_stream() -> None:
    async def streamed() -> list[str]:
        agent: Agent[None, str] = Agent(FunctionModel(stream_function=_words), name="streamed")
        durable = PrefectAgent(agent, name=f"stream_{uuid.uuid4().hex[:8]}")
        async with durable.run_stream("hi") as stream:
            return [text async for text in stream.stream_text(delta=True, debounce_by=None)]

    assert asyncio.run(streamed()) == ["one", " two"]


async def _words(messages: list[ModelMessage], info: AgentInfo):  # type: ignore[no-untyped-def]
    yield "one"
    yield " two"


RUNS: dict[str, Callable[[], None]] = {
    "run_sync in a user's flow": _run_sync_in_a_user_flow,
    "run_sync waiting for approval": _run_sync_waiting_for_approval,
    "run_sync": _run_sync,
    "run_stream": _run_stream,
}


def _close_leftover_loop() -> None:
    """Close the event loop that pydantic-ai's `run_sync` keeps as the thread's current one for its next call (the
    plain agent's does the same): whichever later `asyncio.run` replaces it reports it unclosed, in whatever test
    that happens to be."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        try:
            loop = asyncio.get_event_loop_policy().get_event_loop()
        except RuntimeError:  # none in this thread
            return
    loop.close()
    asyncio.set_event_loop(None)


@pytest.mark.parametrize("form", list(RUNS))
def test_a_run_leaves_no_unclosed_connection_behind(form: str) -> None:
    _close_leftover_loop()  # an earlier test's
    gc.collect()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", ResourceWarning)
            contextvars.Context().run(RUNS[form])  # no client context of the suite's
            gc.collect()
    finally:
        _close_leftover_loop()
    assert [str(w.message) for w in caught if issubclass(w.category, ResourceWarning)] == []


def test_a_warning_raised_in_our_package_fails_the_suite() -> None:
    with pytest.raises(DeprecationWarning, match="from our code"):
        warnings.warn_explicit(
            "from our code",
            DeprecationWarning,
            "task_config.py",
            1,
            module="prefect_pydantic_ai.durable.task_config",
        )
    with pytest.warns(UserWarning, match="from elsewhere"):  # another package's warning stays a warning
        warnings.warn_explicit(
            "from elsewhere", UserWarning, "other.py", 1, module="prefect_pydantic_ai_other"
        )


@pytest.mark.slow  # a fresh process: what it does at exit
def test_a_process_that_imported_the_package_skips_the_shutdown_collection_after_its_exit_handlers() -> None:
    import subprocess
    import sys

    # Exit handlers run last-registered first: the one registered before the import runs after ours, and sees the
    # objects frozen; the one registered after it runs before, and sees them not yet frozen.
    code = (
        "import atexit, gc\n"
        "atexit.register(lambda: print('after', gc.get_freeze_count() > 0))\n"
        "import prefect_pydantic_ai\n"
        "atexit.register(lambda: print('before', gc.get_freeze_count() > 0))\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert (done.returncode, done.stdout) == (0, "before False\nafter True\n"), done.stderr
