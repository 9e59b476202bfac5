"""A throwaway Prefect server for one benchmark session (local on SQLite, or the one-machine cluster), and the
environments that point at it."""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

from prefect_pydantic_ai.infra.server import LocalServer, free_port

if TYPE_CHECKING:
    from prefect_pydantic_ai.infra.cluster import Cluster, ClusterConfig

QUIET = {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "PREFECT_LOGGING_LEVEL": "WARNING",
}
"""Settings every benchmark process shares: no analytics, and Prefect logs only warnings (equal for all variants)."""


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
    port = free_port()
    env = isolated_env(session, f"http://127.0.0.1:{port}/api")
    server = LocalServer(port=port, env=env)
    try:
        server.wait_until_ready(timeout)
        yield {**env, "BENCH_SERVER_PID": str(server.process.pid)}, session
    finally:
        server.stop()


@contextmanager
def cluster_session(
    config: ClusterConfig, progress: Callable[[str], None] = print
) -> Iterator[tuple[dict[str, str], Cluster]]:
    """The cluster of `prefect-pydantic-ai cluster` (PostgreSQL, Redis, a Prefect server, `config.workers`
    workers) in a temporary directory; yield (env for clients on it, the cluster). `cluster down` afterwards, and
    the directory is removed."""
    from prefect_pydantic_ai.infra.cluster import cluster_down, cluster_up

    session = Path(tempfile.mkdtemp(prefix="ppa-bench-cluster-"))
    directory = session / "cluster"
    try:
        cluster = cluster_up(directory, config, progress=lambda line: progress(f"  {line}"))
        yield {**isolated_env(session, cluster.api_url), **cluster.client_env()}, cluster
    finally:
        cluster_down(directory)
        shutil.rmtree(session, ignore_errors=True)


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
