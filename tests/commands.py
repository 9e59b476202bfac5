"""Run `prefect-pydantic-ai` as the tests need it: in this process where no process boundary is under test, else
as a real `python -m prefect_pydantic_ai` subprocess.

In-process runs call the console script's own `main()` (argument handling, one-line usage errors, exit codes)
with stdout and stderr captured and the terminal `columns` wide, against this test session's Prefect server;
a process start costs seconds, and read-only checks (`runs`, `show`, `costs`, `--help`) make hundreds of them.
A test that needs another environment (another server, another PREFECT_HOME) or a real process (a pty,
signals, imports from another directory) uses `process=True`: a process forked from the warm interpreter
(tests/warm.py), or a fresh `python` when its environment changes a Prefect setting.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import io
import os
import subprocess
import sys
import threading
from unittest import mock

from tests.warm import python

_CAPTURE = threading.Lock()  # sys.stdout is one per process: one in-process command at a time


def cli(
    *args: str,
    columns: int = 200,
    process: bool = False,
    env: dict[str, str] | None = None,
    timeout: float = 240,
) -> subprocess.CompletedProcess[str]:
    """`prefect-pydantic-ai *args`: its exit code, stdout and stderr. `env` (extra variables) needs `process`."""
    if process or env:
        return python(
            "-m", "prefect_pydantic_ai", *args, env={"COLUMNS": str(columns), **(env or {})}, timeout=timeout
        )
    try:
        asyncio.get_running_loop()
    except RuntimeError:  # the usual case: no event loop runs in this thread
        in_async_test = False
    else:
        in_async_test = True
    if not in_async_test:
        return _in_process(list(args), columns)
    # Called from an async test: the command runs its own event loop, so in a thread (blocking this one, as
    # subprocess.run would).
    with concurrent.futures.ThreadPoolExecutor(1) as thread:
        return thread.submit(_in_process, list(args), columns).result()


def _in_process(args: list[str], columns: int) -> subprocess.CompletedProcess[str]:
    from prefect_pydantic_ai.cli import app, display

    out, err = io.StringIO(), io.StringIO()
    with _CAPTURE, contextlib.ExitStack() as stack:
        stack.enter_context(contextlib.redirect_stdout(out))
        stack.enter_context(contextlib.redirect_stderr(err))
        for console in (display.console, display.errors):
            stack.callback(setattr, console, "_width", console._width)
            console.width = columns
        stack.enter_context(mock.patch.dict(os.environ, COLUMNS=str(columns)))  # click's help reads it
        argv = sys.argv[:]
        stack.callback(setattr, sys, "argv", argv)
        sys.argv = ["prefect-pydantic-ai", *args]
        try:
            app.main()
            code = 0
        except SystemExit as exc:
            code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    return subprocess.CompletedProcess(["prefect-pydantic-ai", *args], code, out.getvalue(), err.getvalue())
