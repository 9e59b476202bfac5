"""A throwaway local Prefect server for one benchmark session, and the environments that point at it."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

QUIET = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_LOGGING_LEVEL": "WARNING",
}
"""Settings every benchmark process shares: no analytics, and Prefect logs only warnings (equal for all variants)."""


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def isolated_env(home: Path, api_url: str | None) -> dict[str, str]:
    """The current environment with a private PREFECT_HOME and result storage, and the given API (or none)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_")}
    env.update(QUIET)
    env["PREFECT_HOME"] = str(home / "prefect-home")
    env["PREFECT_LOCAL_STORAGE_PATH"] = str(home / "storage")
    if api_url is not None:
        env["PREFECT_API_URL"] = api_url
    else:  # Prefect's 20 s for its temporary server to come up (and migrate a new database) can be too short
        env["PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS"] = "120"
    return env


@contextmanager
def local_prefect_server(timeout: float = 120.0) -> Iterator[tuple[dict[str, str], Path]]:
    """Start `prefect server start` on a free loopback port; yield (env for clients, session directory)."""
    session = Path(tempfile.mkdtemp(prefix="ppa-bench-"))
    port = _free_port()
    env = isolated_env(session, f"http://127.0.0.1:{port}/api")
    log_path = session / "server.log"
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)],
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        try:
            deadline = time.monotonic() + timeout
            while not _healthy(env["PREFECT_API_URL"]):
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the Prefect server did not start; see {log_path}")
                time.sleep(0.3)
            yield {**env, "BENCH_SERVER_PID": str(proc.pid)}, session
        finally:
            proc.terminate()
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()


def settle(
    pid: int | None = None, *, window: float = 0.25, busy: float = 0.05, timeout: float = 60.0
) -> float:
    """Wait until the benchmark's server is idle (under `busy` of a CPU over `window` seconds); return the wait.

    The server persists the events of each run after it returned; a run started meanwhile would pay for its
    predecessor's backlog. Defaults to BENCH_SERVER_PID; without a server it returns at once.
    """
    if pid is None:
        pid = int(os.environ.get("BENCH_SERVER_PID", "0")) or None
    if pid is None:
        return 0.0
    start = time.monotonic()
    before = cpu_seconds(pid)
    while time.monotonic() - start < timeout:
        time.sleep(window)
        now = cpu_seconds(pid)
        if now - before < busy * window:
            break
        before = now
    return time.monotonic() - start


def cpu_seconds(proc: int | str) -> float:
    """User + system CPU seconds of /proc/<proc>: a process id, or `self/task/<thread id>`."""
    fields = Path(f"/proc/{proc}/stat").read_text().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _healthy(api_url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{api_url}/health", timeout=2) as resp:
            return bool(resp.status == 200)
    except OSError:
        return False
