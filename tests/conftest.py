"""Test session isolation: a private PREFECT_HOME, result storage and Prefect server for this session only.

The environment is set at import time, before anything imports Prefect, so the in-process client and every
subprocess a test starts talk to the same throwaway server and never read a previous run's journal.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest

_SESSION_DIR = Path(tempfile.mkdtemp(prefix="ppa-tests-"))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


_PORT = _free_port()
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
    }
)


@pytest.fixture(scope="session", autouse=True)
def prefect_server() -> Iterator[str]:
    """A real local Prefect server on a free loopback port, for the whole session."""
    log = open(_SESSION_DIR / "server.log", "wb")  # noqa: SIM115 - closed at teardown
    proc = subprocess.Popen(
        [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(_PORT)],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=os.environ.copy(),
    )
    url = os.environ["PREFECT_API_URL"]
    deadline = time.monotonic() + 120
    while True:
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as resp:
                if resp.status == 200:
                    break
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"Prefect server did not start; see {_SESSION_DIR / 'server.log'}")
        time.sleep(0.3)
    yield url
    _flush_run_logs()  # send queued run logs while the server is still up
    proc.terminate()
    try:
        proc.wait(timeout=20)
    except subprocess.TimeoutExpired:
        proc.kill()
    log.close()


def _flush_run_logs() -> None:
    import asyncio

    from prefect.logging.handlers import APILogHandler

    asyncio.run(APILogHandler.aflush())


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def storage_dir() -> Path:
    """Where Prefect's result storage (our journal) lives in this session."""
    return Path(os.environ["PREFECT_LOCAL_STORAGE_PATH"])
