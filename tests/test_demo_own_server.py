"""`prefect-pydantic-ai demo` with no Prefect API configured: it brings up a local server of its own (a fresh
Prefect home, no profile, no PREFECT_API_URL), completes, and every process it started is stopped by the test."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow  # starts processes


def processes_with(variable: str, value: str) -> list[int]:
    """Pids of the live processes whose environment has `variable=value`."""
    wanted = f"{variable}={value}".encode()
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit() or int(proc.name) == os.getpid():
            continue
        try:
            environment = (proc / "environ").read_bytes().split(b"\0")
            state = (proc / "stat").read_text().rsplit(")", 1)[1].split()[0]
        except OSError:  # gone meanwhile, or not ours to read
            continue
        if wanted in environment and state != "Z":
            found.append(int(proc.name))
    return found


@pytest.fixture
def fresh_home(tmp_path: Path) -> Iterator[Path]:
    """A Prefect home nothing has used; at the end, every process started with it is killed, and none is left."""
    home = tmp_path / "prefect-home"
    yield home
    for pid in processes_with("PREFECT_HOME", str(home)):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    deadline = time.monotonic() + 30
    while (left := processes_with("PREFECT_HOME", str(home))) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert left == [], f"processes of the demo still running: {left}"


def test_demo_without_a_configured_api_completes_on_a_local_server_of_its_own(
    fresh_home: Path, tmp_path: Path
) -> None:
    env = {
        name: value
        for name, value in os.environ.items()
        if name not in ("PREFECT_API_URL", "PREFECT_UI_API_URL", "PREFECT_SERVER_UI_API_URL")
    }
    env.update(
        PREFECT_HOME=str(fresh_home),
        PREFECT_LOCAL_STORAGE_PATH=str(tmp_path / "storage"),
        COLUMNS="160",
    )
    demo = subprocess.run(
        [sys.executable, "-m", "prefect_pydantic_ai", "demo", "--no-failure"],
        capture_output=True,
        text=True,
        timeout=400,
        env=env,
    )
    assert demo.returncode == 0, demo.stdout[-3000:] + demo.stderr[-3000:]
    assert "row 10: sales = 1000.0" in demo.stdout and "row 65: sales = 2000.0" in demo.stdout  # the analysis
    assert "prefect-pydantic-ai show demo-" in demo.stdout
