"""`python ARGS` as real processes forked from a warm interpreter, so a test's scripts skip the imports.

A script that runs an agent spends ~3 s of CPU importing Prefect and Pydantic AI before its first step, and the
suite starts hundreds of them on two cores. The warm interpreter (one per test session, started on first use)
imports them once and forks a child per command: a real process with its own pid, environment, arguments, working
directory and output files, which a test or the script itself can SIGKILL, and which exits through Python's normal
shutdown (atexit, Prefect's flushes). What the child inherits is the imported modules; every Prefect setting is
read at import, so a command whose environment changes a `PREFECT*` variable (another server, another home, a
setting under test) runs as a fresh `python` instead, as does anything while the warm interpreter is unavailable,
and everything when PPA_TESTS_FRESH_PROCESSES=1 is set (to compare, or to rule the warm interpreter out).
"""

from __future__ import annotations

import atexit
import json
import os
import select
import signal
import subprocess
import sys
import tempfile
import threading
from collections.abc import Mapping
from pathlib import Path

PRELOAD = (
    "prefect_pydantic_ai",
    "prefect.flow_engine",
    "prefect.task_engine",
    "prefect.runtime",
    "pydantic_ai.models.function",
    "pydantic_ai.models.openai",
)

# The warm interpreter: imports PRELOAD (not the CLI: its consoles read COLUMNS when they are made), then serves
# one JSON request per line on the pipe given first (answers on the second): fork a child, answer its pid, wait
# for it, answer its exit status. It stays single-threaded, so forking is safe. What the imports made is frozen
# out of the collector's reach (gc.freeze), so a child's collections and its exit do not walk it (and copy the
# pages it shares with the warm interpreter): a child exits ~1 s sooner.
_SERVE = r"""
import gc, importlib, json, os, sys, threading
for name in sys.argv[3:]:
    importlib.import_module(name)
from prefect_pydantic_ai.infra.warm_start import run_python
gc.freeze()
requests, answers = os.fdopen(int(sys.argv[1]), "r"), os.fdopen(int(sys.argv[2]), "w", buffering=1)
answers.write(json.dumps({"ready": threading.active_count() == 1}) + "\n")
for line in requests:
    job = json.loads(line)
    sys.stdout.flush(); sys.stderr.flush()
    pid = os.fork()
    if pid == 0:
        requests.close(); answers.close()
        out = os.open(job["stdout"], os.O_WRONLY); err = os.open(job["stderr"], os.O_WRONLY)
        os.dup2(os.open(os.devnull, os.O_RDONLY), 0); os.dup2(out, 1); os.dup2(err, 2)
        os.environ.clear(); os.environ.update(job["env"]); os.chdir(job["cwd"])
        code = 0
        try:
            run_python(job["args"])
        except SystemExit as exit:
            code = exit.code
        sys.exit(code)
    answers.write(json.dumps({"pid": pid}) + "\n")
    _, status = os.waitpid(pid, 0)
    answers.write(json.dumps({"returncode": os.waitstatus_to_exitcode(status)}) + "\n")
"""


class _Warm:
    """The session's warm interpreter; one command at a time (a lock), as `subprocess.run` blocks."""

    def __init__(self) -> None:
        self.env = dict(os.environ)
        requests_r, self._requests = os.pipe()
        self._answers, answers_w = os.pipe()
        self.process = subprocess.Popen(
            [sys.executable, "-c", _SERVE, str(requests_r), str(answers_w), *PRELOAD],
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            pass_fds=(requests_r, answers_w),
            env=self.env,
        )
        os.close(requests_r)
        os.close(answers_w)
        self.lock = threading.Lock()
        try:  # not ready (slow to start, gone, or threads it must not fork with): commands start fresh
            self.ready = self._answer(timeout=180).get("ready") is True
        except (TimeoutError, EOFError, ValueError):
            self.ready = False

    def _answer(self, timeout: float | None) -> dict[str, object]:
        line = b""
        while not line.endswith(b"\n"):
            readable, _, _ = select.select([self._answers], [], [], timeout)
            if not readable:
                raise TimeoutError
            chunk = os.read(self._answers, 1)
            if not chunk:
                raise EOFError("the warm interpreter is gone")
            line += chunk
        return dict(json.loads(line))

    def run(
        self, args: list[str], env: Mapping[str, str], cwd: str, timeout: float
    ) -> subprocess.CompletedProcess[str]:
        with self.lock, tempfile.TemporaryDirectory(prefix="ppa-warm-") as scratch:
            out, err = Path(scratch, "stdout"), Path(scratch, "stderr")
            out.touch()
            err.touch()
            job = {"args": args, "env": dict(env), "cwd": cwd, "stdout": str(out), "stderr": str(err)}
            os.write(self._requests, (json.dumps(job) + "\n").encode())
            pid = int(str(self._answer(timeout=30)["pid"]))
            try:
                code = int(str(self._answer(timeout=timeout)["returncode"]))
            except TimeoutError:
                os.kill(pid, signal.SIGKILL)
                self._answer(timeout=30)
                raise subprocess.TimeoutExpired(
                    [sys.executable, *args], timeout, out.read_text(), err.read_text()
                ) from None
            return subprocess.CompletedProcess(
                [sys.executable, *args],
                code,
                out.read_text(errors="replace"),
                err.read_text(errors="replace"),
            )

    def stop(self) -> None:
        os.close(self._requests)  # end of requests: it leaves its loop and exits
        try:
            self.process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        os.close(self._answers)


_warm: _Warm | None = None
_starting = threading.Lock()


def _interpreter() -> _Warm | None:
    global _warm
    with _starting:
        if _warm is None:
            _warm = _Warm()
            atexit.register(stop)
        return _warm if _warm.ready and _warm.process.poll() is None else None


def stop() -> None:
    """Stop the warm interpreter (the session's end)."""
    global _warm
    if _warm is not None:
        _warm.stop()
        _warm = None


def python(
    *args: str, env: Mapping[str, str] | None = None, cwd: Path | str | None = None, timeout: float = 240
) -> subprocess.CompletedProcess[str]:
    """`python ARGS` with this process's environment plus `env`, in `cwd`: its exit code (negative: the signal
    that ended it), stdout and stderr, as `subprocess.run` returns them."""
    full = {**os.environ, **(env or {})}
    fresh = os.environ.get("PPA_TESTS_FRESH_PROCESSES") == "1"
    warm = None if fresh or _prefect_settings(full) != _prefect_settings(_warm_env()) else _interpreter()
    if warm is None:
        return subprocess.run(
            [sys.executable, *args], capture_output=True, text=True, timeout=timeout, env=full, cwd=cwd
        )
    return warm.run(list(args), full, str(cwd or os.getcwd()), timeout)


def _warm_env() -> Mapping[str, str]:
    return _warm.env if _warm is not None else os.environ


def _prefect_settings(env: Mapping[str, str]) -> dict[str, str]:
    return {key: value for key, value in env.items() if key.upper().startswith("PREFECT")}
