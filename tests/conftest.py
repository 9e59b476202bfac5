"""Test session isolation: a private PREFECT_HOME, result storage and Prefect server for this session only.

`python3 dev.py test` runs the suite on parallel pytest-xdist workers (`-n 0` for one process); each worker is
a session of its own here, with its own server. HEAVY: the tests that load the whole machine (fifty concurrent
runs, the one-machine cluster, several machines with Redis leases) are marked `xdist_group("heavy")`, so they run
one after another on one worker and never two at once (on pytest 9 through `pytest_collection_modifyitems` below).

The environment is set at import time, before anything imports Prefect, so the in-process client and every
subprocess a test starts talk to the same throwaway server and never read a previous run's journal.
"""

from __future__ import annotations

import atexit
import os
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from prefect_pydantic_ai.infra.server import LocalServer, free_port  # imports no Prefect yet
from tests import warm  # imports no Prefect either

_SESSION_DIR = Path(tempfile.mkdtemp(prefix="ppa-tests-"))
atexit.register(shutil.rmtree, _SESSION_DIR, True)  # last, after the session's servers stopped (~7 MB each)


_PORT = free_port()  # chosen before anything imports Prefect, which reads PREFECT_API_URL at import
os.environ.update(
    {
        "PREFECT_HOME": str(_SESSION_DIR / "prefect-home"),
        "PREFECT_LOCAL_STORAGE_PATH": str(_SESSION_DIR / "storage"),
        "PREFECT_API_URL": f"http://127.0.0.1:{_PORT}/api",
        "PREFECT_UI_API_URL": f"http://127.0.0.1:{_PORT}/api",  # the browser test's UI talks to this server
        "PREFECT_SERVER_UI_API_URL": f"http://127.0.0.1:{_PORT}/api",
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_LOGGING_LEVEL": "WARNING",
        "PREFECT_LOGGING_TO_API_BATCH_INTERVAL": "0.3",
        # a concurrency slot whose lease expired is freed within a second, not 15 (test_limits)
        "PREFECT_SERVER_SERVICES_REPOSSESSOR_LOOP_SECONDS": "1",
    }
)


@pytest.fixture(scope="session", autouse=True)
def prefect_server() -> Iterator[str]:
    """A real local Prefect server on a free loopback port, for the whole session."""
    server = LocalServer(port=_PORT)
    server.wait_until_ready()
    _snapshot(Path(os.environ["PREFECT_HOME"]) / "prefect.db", MIGRATED_DATABASE)
    yield server.url
    warm.stop()  # the session's warm interpreter, if a test started it
    _flush_run_logs()  # send queued run logs while the server is still up
    server.stop()


@pytest.fixture(scope="session", autouse=True)
def _prefect_sync_client() -> Iterator[None]:
    """One sync Prefect client for the session, closed at its end: Prefect 3.9.1 leaves an unclosed socket
    behind at the start of every async flow run outside a client context
    (`prefect.results._read_server_default_result_storage_block_id` opens a sync client and never closes it). A test's own `@flow` is such a run; the agent's own flow runs and every
    agent run are not (`PrefectDurability` runs inside Prefect's client contexts, test_process_hygiene.py).
    With this context, Prefect takes its client instead of opening one. Entering it checks no server version
    (a module may skip the session's server), and it connects only when Prefect first uses it."""
    from prefect.context import SyncClientContext
    from prefect.settings import PREFECT_CLIENT_SERVER_VERSION_CHECK_ENABLED, temporary_settings

    with temporary_settings({PREFECT_CLIENT_SERVER_VERSION_CHECK_ENABLED: False}):
        context = SyncClientContext()
        context.__enter__()
    try:
        yield
    finally:
        context.__exit__(None, None, None)


MIGRATED_DATABASE = _SESSION_DIR / "migrated-prefect.db"


def _snapshot(database: Path, to: Path) -> None:
    import sqlite3

    source, copy = sqlite3.connect(database), sqlite3.connect(to)
    try:
        source.backup(copy)  # consistent while the server writes
    finally:
        source.close()
        copy.close()


@pytest.fixture(scope="session")
def migrated_database(prefect_server: str) -> Path:
    """The session server's database as it stood when the server first answered: migrated, with no run in it.
    A test that starts servers in fresh PREFECT_HOMEs copies it in as `prefect.db`, so their first boot skips
    the ~13 s of migrations; the first boot itself keeps a test of its own (test_demo_own_server)."""
    return MIGRATED_DATABASE


def _flush_run_logs() -> None:
    import asyncio

    from prefect.logging.handlers import APILogHandler

    asyncio.run(APILogHandler.aflush())


@pytest.fixture(autouse=True)
def _quick_tests_start_no_process(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> None:
    """Keeps the `slow` mark honest: a test without it that starts a process fails, naming the mark (the quick
    loop, `-m "not slow"`, is meant to take a couple of minutes)."""
    if request.node.get_closest_marker("slow") is not None:
        return

    def refuse(self: subprocess.Popen[Any], args: Any, *rest: Any, **kwargs: Any) -> None:
        raise AssertionError(f"this test starts a process ({args!r}): mark it `slow` (pyproject.toml)")

    monkeypatch.setattr(subprocess.Popen, "_execute_child", refuse)


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """HEAVY, on pytest 9: `--dist loadgroup` sends the tests of one `xdist_group` to one worker by the `@group`
    suffix pytest-xdist (3.8) appends to each item's node id on the worker, but it writes `_nodeid`, which pytest
    9 no longer reads (it keeps the id in `_id`). Unfixed, every group was spread over both workers: the
    one-machine cluster was started on each, and heavy tests ran two at once. Where the suffix is missing, it
    is appended where pytest reads it; where xdist's own took effect, nothing changes."""
    if not getattr(config.option, "loadgroup", False):  # set on xdist's workers under `--dist loadgroup`
        return
    try:
        from _pytest.nodeid import NodeId
    except ImportError:  # pytest 8: xdist's suffix works
        return
    for item in items:
        names = {
            m.args[0] if m.args else m.kwargs.get("name", "default") for m in item.iter_markers("xdist_group")
        }
        suffix = "@" + "_".join(sorted(str(name) for name in names))
        if names and not item.nodeid.endswith(suffix):
            item._id = NodeId.parse(item.nodeid + suffix)


@pytest.fixture
def storage_dir() -> Path:
    """Where Prefect's result storage (our journal) lives in this session."""
    return Path(os.environ["PREFECT_LOCAL_STORAGE_PATH"])
