"""Flow runs forked from a worker's warm interpreter (`infra.warm_start`, `infra.warm_launch`): each run is a
process of its own that gets the launcher's streams, environment and directory, exits as the launcher says, dies
with its launcher, and a run whose Prefect settings differ starts fresh. A "worker" here is a small script the
wrapper execs, as `cluster up` execs `prefect worker start`; the "flow run" is a script that reports itself.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from prefect_pydantic_ai.infra import warm_start
from prefect_pydantic_ai.infra.cluster import _parent, _start_time  # /proc readers the cluster uses

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not warm_start.available(), reason="forking flow runs needs Linux"),
]

# Prints the environment a process worker gives a flow run whose job adds nothing (its own and its settings).
WORKER = (
    "import json, time; from prefect_pydantic_ai.infra.warm_start import worker_env; "
    "print(json.dumps(worker_env()), flush=True); time.sleep(600)"
)

RUN = """
import json, os, sys, time
print(json.dumps({"pid": os.getpid(), "ppid": os.getppid(), "cwd": os.getcwd(), "argv": sys.argv[1:],
                  "marker": os.environ.get("RUN_MARKER"), "prefect": "prefect" in sys.modules}), flush=True)
print("to stderr", file=sys.stderr, flush=True)
if sys.argv[1] == "sleep":
    time.sleep(600)
sys.exit(int(sys.argv[2]))
"""


def _gone(pid: int, within: float = 20) -> bool:
    """Whether `pid` is gone (or a zombie) within `within` seconds."""
    deadline = time.monotonic() + within
    while _start_time(pid) is not None:
        if time.monotonic() > deadline:
            return False
        time.sleep(0.05)
    return True


def _start_worker() -> tuple[subprocess.Popen[str], dict[str, str]]:
    """The wrapper, exec'ed into a worker: its pid, and the environment it gives a flow run."""
    process = subprocess.Popen(
        [sys.executable, "-m", "prefect_pydantic_ai.infra.warm_start", "--", sys.executable, "-c", WORKER],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert process.stdout is not None
    env = json.loads(process.stdout.readline())
    assert env[warm_start.SOCKET_ENV].startswith("@prefect-pydantic-ai-warm-"), env
    return process, env


@pytest.fixture(scope="module")
def worker() -> Iterator[tuple[subprocess.Popen[str], dict[str, str]]]:
    """A worker whose zygote (its only child) serves the module's tests."""
    process, env = _start_worker()
    try:
        yield process, env
    finally:
        process.kill()
        process.wait()
        process.stdout.close()  # type: ignore[union-attr]


@pytest.fixture
def run_script(tmp_path: Path) -> Path:
    script = tmp_path / "run.py"
    script.write_text(RUN)
    return script


def _children(pid: int) -> list[int]:
    return [int(entry.name) for entry in Path("/proc").glob("[0-9]*") if _parent(int(entry.name)) == pid]


def _launch(
    worker_env: dict[str, str],
    script: Path,
    *args: str,
    env: dict[str, str] | None = None,
    cwd: Path | None = None,
) -> subprocess.Popen[str]:
    """The launcher of `python SCRIPT ARGS`, as the worker starts it (its environment plus the job's `env`)."""
    return subprocess.Popen(
        [sys.executable, "-S", str(warm_start.LAUNCHER), str(script), *args],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd=cwd,
        env={**worker_env, **(env or {})},
    )


def test_a_run_is_forked_with_the_launchers_streams_environment_and_directory_and_exits_with_its_code(
    worker: tuple[subprocess.Popen[str], dict[str, str]], run_script: Path, tmp_path: Path
) -> None:
    process, worker_env = worker
    [zygote] = _children(process.pid)
    launcher = _launch(
        worker_env,
        run_script,
        "exit",
        "3",
        env={"RUN_MARKER": "this run", "PREFECT_PYDANTIC_AI_LOCK_LEASE_SECONDS": "10"},
        cwd=tmp_path,
    )
    out, err = launcher.communicate(timeout=60)
    run = json.loads(out)
    assert launcher.returncode == 3
    assert err == "to stderr\n"
    assert run["pid"] != launcher.pid and run["ppid"] == zygote  # forked from the warm interpreter
    assert run["prefect"]  # which had imported Prefect before the run started
    # (this package's own settings may differ: it reads them when a run first needs them, after the fork)
    assert (run["cwd"], run["argv"], run["marker"]) == (str(tmp_path), ["exit", "3"], "this run")


def test_a_changed_prefect_setting_starts_the_run_fresh_in_the_launchers_own_process(
    worker: tuple[subprocess.Popen[str], dict[str, str]], run_script: Path
) -> None:
    _, worker_env = worker
    launcher = _launch(worker_env, run_script, "exit", "0", env={"PREFECT_LOGGING_LEVEL": "DEBUG"})
    out, _ = launcher.communicate(timeout=60)
    run = json.loads(out)
    assert launcher.returncode == 0
    assert run["pid"] == launcher.pid and not run["prefect"]  # `python script` itself, nothing preloaded


def test_sigterm_reaches_the_run_and_a_killed_launcher_takes_its_run_with_it(
    worker: tuple[subprocess.Popen[str], dict[str, str]], run_script: Path
) -> None:
    _, worker_env = worker
    for sig in (signal.SIGTERM, signal.SIGKILL):
        launcher = _launch(worker_env, run_script, "sleep", "0")
        assert launcher.stdout is not None
        run = json.loads(launcher.stdout.readline())
        launcher.send_signal(sig)
        assert launcher.wait(timeout=30) == -signal.SIGKILL  # the run died without reporting an exit code
        assert _gone(run["pid"]), f"the run outlived its launcher after {sig.name}"
        launcher.communicate()


def test_the_zygote_dies_with_its_worker() -> None:
    process, _ = _start_worker()
    try:
        [zygote] = _children(process.pid)
    finally:
        process.kill()
        process.wait()
        process.stdout.close()  # type: ignore[union-attr]
    assert _gone(zygote)
