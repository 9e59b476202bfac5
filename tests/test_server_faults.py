"""A configured Prefect server (one we did not start, and must not restart) failing in the middle of a run.

The run is a real process (`tests/scripts/slow_tool.py`: model → tool → model) whose PREFECT_API_URL names a
`FaultProxy` in front of this session's server, so its real Prefect client meets the fault: the proxy answers 503
or refuses connections while the tool runs. Every model and tool call is counted in a log file.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest

from tests.commands import cli
from tests.fault_proxy import FaultProxy

pytestmark = pytest.mark.slow

SLOW_TOOL = Path(__file__).parent / "scripts" / "slow_tool.py"
EACH_STEP_ONCE = ["model", "lookup", "model"]
TIMEOUT = 180  # a hang fails the test instead of stalling the suite


@contextmanager
def run_in_a_tool_call(
    proxy: FaultProxy, tmp_path: Path, key: str, **env: str
) -> Iterator[tuple[subprocess.Popen[str], Path]]:
    """The script running with `key` through `proxy`, stopped inside its tool call; the tool goes on when the
    `go` file (the second item) exists. The process is killed if the block leaves it running."""
    go = tmp_path / "go"
    script = subprocess.Popen(
        [sys.executable, str(SLOW_TOOL), key],
        env={
            **os.environ,
            "PREFECT_API_URL": proxy.url,
            "SLOW_TOOL_LOG": str(tmp_path / "calls.log"),
            "SLOW_TOOL_WAIT_FOR": str(go),
            **env,
        },
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert script.stdout is not None and script.stdout.readline() == "WAITING\n"
        yield script, go
    finally:
        script.kill()
        script.wait()


FIRST_STEP = "model #1: function:model: @ slow_tool (attempt 1)"


def _calls(tmp_path: Path) -> list[str]:
    return (tmp_path / "calls.log").read_text().split()


def _states(key: str) -> tuple[str, int, dict[str, str]]:
    """The flow run of `key` as Prefect records it: its state, run count, and each task run's state by name."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterTags

    async def read() -> tuple[str, int, dict[str, str]]:
        async with get_client() as client:
            (flow_run,) = await client.read_flow_runs(
                flow_run_filter=FlowRunFilter(tags=FlowRunFilterTags(all_=[f"key:{key}"]))
            )
            task_runs = await client.read_task_runs(flow_run_filter=FlowRunFilter(id={"any_": [flow_run.id]}))
            by_name = {f"{t.name} (attempt {t.flow_run_run_count})": str(t.state_name) for t in task_runs}
            return str(flow_run.state_name), flow_run.run_count, by_name

    return asyncio.run(read())


def _eventually(read: object, expected: object, timeout: float = 60) -> None:
    """Poll `read()` until it returns `expected` (Prefect records task runs from events in the background)."""
    assert callable(read)
    deadline = time.monotonic() + timeout
    while (got := read()) != expected and time.monotonic() < deadline:
        time.sleep(0.5)
    assert got == expected


def test_a_server_answering_503_for_10s_during_a_tool_call_is_ridden_out_and_each_step_runs_once(
    tmp_path: Path, prefect_server: str
) -> None:
    """Prefect's client retries a 503 after 2 s, 4 s, 8 s, ... (5 times by default, ~62 s in all): the run's
    requests during the outage wait, and the run completes. The task-run events it could not send then are sent
    again when its events client reconnects, so Prefect's record is complete."""
    key = f"503-{uuid.uuid4().hex[:8]}"
    with FaultProxy(prefect_server) as proxy, run_in_a_tool_call(proxy, tmp_path, key) as (script, go):
        # The outage starts once Prefect has recorded the first step, so the run's events client is connected:
        # under load it can still be connecting when the tool starts, and a client that never connected is
        # another fault than this one.
        _eventually(lambda: _states(key)[2].get(FIRST_STEP), "Completed")
        proxy.unavailable()
        since = time.monotonic()
        go.touch()
        assert proxy.first_503.wait(timeout=TIMEOUT)  # the run met the outage
        time.sleep(max(0.0, 10 - (time.monotonic() - since)))  # the fault: 503 for 10 s
        proxy.forward()
        out, err = script.communicate(timeout=TIMEOUT)
    assert script.returncode == 0, err[-3000:]
    assert out.splitlines()[-1] == "OUTPUT found it"
    assert _calls(tmp_path) == EACH_STEP_ONCE
    assert any("/flow_runs/" in line or "/artifacts/" in line for line in proxy.answered_503), (
        proxy.answered_503
    )
    _eventually(
        lambda: _states(key),
        (
            "Completed",
            1,
            {
                FIRST_STEP: "Completed",
                "tool #2: lookup @ slow_tool (attempt 1)": "Completed",
                "model #3: function:model: @ slow_tool (attempt 1)": "Completed",
            },
        ),
    )


UNREACHABLE = re.compile(
    r"prefect_pydantic_ai\.errors\.PrefectUnreachableError: The Prefect API at (?P<url>\S+) did not answer "
    r"\(ConnectError: All connection attempts failed\) through Prefect's client retries "
    r"\(PREFECT_CLIENT_MAX_RETRIES=1, ~2s\), so run '(?P<key>[^']+)' stopped; its completed steps are kept in the "
    r"journal\. Once the server is back, run it again with idempotency_key='(?P=key)' or "
    r"`prefect-pydantic-ai resume (?P=key)`: nothing that completed runs again\."
)


def test_a_server_unreachable_past_the_client_retries_stops_the_run_in_one_line_and_resume_repeats_nothing(
    tmp_path: Path, prefect_server: str
) -> None:
    """The proxy refuses connections from inside the tool call on (the server is gone, as the client sees it).
    The steps go on (they need the journal, not the API); the run's first call that needs the API fails after
    the client's retries (one here, ~2 s; 5 by default, ~62 s), and the run stops with one line. Once the server
    is back, the printed `resume` replays every step: nothing is executed again, and Prefect's record is repaired."""
    key = f"gone-{uuid.uuid4().hex[:8]}"
    with (
        FaultProxy(prefect_server) as proxy,
        run_in_a_tool_call(proxy, tmp_path, key, PREFECT_CLIENT_MAX_RETRIES="1") as (script, go),
    ):
        proxy.refuse()
        since = time.monotonic()
        go.touch()
        _, err = script.communicate(timeout=TIMEOUT)
        gave_up = time.monotonic() - since
    assert script.returncode == 1, err[-3000:]
    stops = [line for line in err.splitlines() if line.startswith("prefect_pydantic_ai.errors.")]
    assert len(stops) == 1, err[-3000:]
    stop = UNREACHABLE.fullmatch(stops[0])
    assert stop is not None and stop["url"] == proxy.url and stop["key"] == key, stops[0]
    assert (
        err.count("Traceback") == 1 and "httpx.ConnectError" not in err
    )  # ours alone, nothing chained to it
    assert _calls(tmp_path) == EACH_STEP_ONCE
    print(f"gave up {gave_up:.1f}s after the server went away")

    resumed = cli("resume", key, env={"SLOW_TOOL_LOG": str(tmp_path / "calls.log")})  # the session's server
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert _calls(tmp_path) == EACH_STEP_ONCE  # every step replayed from the journal
    state, run_count, task_runs = _states(key)
    assert (state, run_count) == ("Completed", 2)
    assert {name: s for name, s in task_runs.items() if name.endswith("(attempt 2)")} == {
        "model #1: function:model: @ slow_tool (attempt 2)": "Cached",
        "tool #2: lookup @ slow_tool (attempt 2)": "Cached",
        "model #3: function:model: @ slow_tool (attempt 2)": "Cached",
    }
    first = {s for name, s in task_runs.items() if name.endswith("(attempt 1)")}
    assert first <= {"Completed"}, task_runs  # settled as the record says: attempt 1's agent run completed
    earlier = json.loads(cli("show", key, "--json").stdout)["earlier_attempts"][0]
    assert [(s["name"], s["status"]) for s in earlier] == [  # Prefect missed the last two
        ("function:model:", "executed"),
        ("lookup", "executed"),
        ("function:model:", "executed"),
    ]
    print("attempt 1 as Prefect records it after the resume:", task_runs)
