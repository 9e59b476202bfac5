"""Flow runs forked from a warm interpreter, so a worker's runs skip the seconds of imports each would pay.

A Prefect process worker starts every flow run as a new `python -m prefect.engine`, which imports Prefect, Pydantic
AI and this package again: ~3 CPU-seconds per run on a 2-core machine, more than an 11-step agent run spends on
its steps. `cluster up` starts each worker as `python -m prefect_pydantic_ai.infra.warm_start -- prefect worker
...`: this imports those once, forks a *zygote* that serves on a Unix socket, and execs the worker in place (same
pid), so the zygote is the worker's child and dies with it. The work pool's command is `warm_launch.py`, a
stdlib-only script that starts in milliseconds: it hands the zygote its environment, working directory and standard
streams, and the zygote forks a child that runs the engine in them.

A flow run stays a process of its own: the launcher forwards SIGTERM and SIGINT to it, exits with its exit code,
and when the launcher is killed (the worker cancelling the run) the child kills itself. A run whose environment
changes a Prefect setting (read once, at import) is started fresh by the launcher instead, as is every run when
the zygote is missing; a run never depends on the zygote to start.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import importlib
import json
import os
import runpy
import signal
import socket
import sys
import threading
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any, NoReturn

SOCKET_ENV = "PREFECT_PYDANTIC_AI_WARM_SOCKET"
"""Where a worker's flow runs find its zygote: `@name`, an abstract Unix socket (Linux)."""

LAUNCHER = Path(__file__).with_name("warm_launch.py")

PRELOAD = (
    "prefect_pydantic_ai",
    "prefect.flow_engine",
    "prefect.task_engine",
    "prefect.runtime",
    "prefect.runner.storage",
    "pydantic_ai.models.openai",
)
"""What a flow run of an agent imports before its first step (not `prefect.engine`: the child runs it as
`__main__`, and a module run as `__main__` must not be imported already)."""

_PR_SET_PDEATHSIG = 1


def available() -> bool:
    """Whether flow runs can be forked here: abstract Unix sockets and a parent-death signal are Linux's."""
    return sys.platform == "linux"


def launch_command() -> list[str]:
    """The work pool's command: the launcher (run without `site`: it needs only the standard library) of what
    Prefect's process worker runs for a flow run, `python -m prefect.engine`."""
    return [sys.executable, "-S", str(LAUNCHER), "-m", "prefect.engine"]


def main(argv: list[str]) -> NoReturn:
    """`warm_start -- COMMAND...`: fork the zygote (when it can serve), then exec COMMAND in this process."""
    if not argv or argv[0] != "--" or len(argv) < 2:
        sys.exit("usage: python -m prefect_pydantic_ai.infra.warm_start -- COMMAND [ARGS...]")
    command = argv[1:]
    if available():
        for name in PRELOAD:
            importlib.import_module(name)
        # What the imports made lives as long as every run: out of the collector's reach (gc.freeze), so no run's
        # collections, nor its exit, walk it and copy the pages it shares with the zygote.
        gc.freeze()
        if threading.active_count() == 1:  # forking is safe only without other threads
            address = f"@prefect-pydantic-ai-warm-{uuid.uuid4().hex}"
            listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            listener.bind("\0" + address[1:])
            listener.listen(64)
            # Set before the fork, so both the worker's runs and the zygote's baseline environment carry it.
            os.environ[SOCKET_ENV] = address
            parent = os.getpid()
            if os.fork() == 0:
                _serve(listener, parent)
            listener.close()
    sys.stdout.flush()
    sys.stderr.flush()
    os.execvp(command[0], command)


def _serve(listener: socket.socket, parent: int) -> NoReturn:
    """The zygote: one forked child per request, until the worker (our parent) is gone."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)
    if os.getppid() != parent:  # the worker died before the death signal was set
        os._exit(0)
    os.setsid()  # signals for the worker's process group are not ours: a run's launcher forwards its own
    signal.signal(signal.SIGCHLD, signal.SIG_IGN)  # the children report their own exit; the kernel reaps them
    baseline = _settings_env(worker_env())
    while True:
        conn, _ = listener.accept()
        fds: list[int] = []
        try:
            job, fds = _receive(conn)
            if _settings_env(job["env"]) != baseline:
                conn.sendall(b'{"fresh": true}\n')  # another Prefect setting: the launcher starts it fresh
            elif os.fork() == 0:  # outside any `finally`: the child's exit must not unwind into this loop
                listener.close()
                _child(conn, fds, job)
        except (OSError, ValueError, KeyError, TypeError):
            pass
        conn.close()
        for fd in fds:
            with contextlib.suppress(OSError):
                os.close(fd)


def _receive(conn: socket.socket) -> tuple[dict[str, Any], list[int]]:
    """One request: a JSON line (argv, env, cwd) with the launcher's stdin, stdout and stderr attached."""
    data, fds, _, _ = socket.recv_fds(conn, 1 << 16, 3)
    while not data.endswith(b"\n"):
        more = conn.recv(1 << 16)
        if not more:
            raise ValueError("the launcher closed its request early")
        data += more
    if len(fds) != 3:
        raise ValueError("a request carries the launcher's three standard streams")
    return dict(json.loads(data)), fds


def _child(conn: socket.socket, fds: list[int], job: dict[str, Any]) -> NoReturn:
    """A flow run's process: the launcher's streams, environment and directory, then its `python` arguments."""
    code: int | str | None = 1
    try:
        os.setsid()
        for target, fd in enumerate(fds):
            os.dup2(fd, target)
            os.close(fd)
        for number in (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP):
            signal.signal(number, signal.SIG_DFL)
        signal.signal(signal.SIGINT, signal.default_int_handler)
        os.environ.clear()
        os.environ.update(job["env"])
        os.chdir(job["cwd"])
        reported = threading.Event()
        threading.Thread(target=_die_with_launcher, args=(conn, reported), daemon=True).start()
        import atexit

        def report() -> None:  # registered first, so it runs after the run's own exit handlers
            reported.set()
            with contextlib.suppress(OSError):
                conn.sendall(json.dumps({"returncode": _exit_code(code)}).encode() + b"\n")

        atexit.register(report)
        conn.sendall(json.dumps({"pid": os.getpid()}).encode() + b"\n")
        run_python(list(job["argv"]))
        code = 0
    except SystemExit as exit:
        code = exit.code
    except BaseException:
        import traceback

        traceback.print_exc()
        code = 1
    sys.exit(code)


def run_python(args: list[str]) -> None:
    """What `python ARGS` runs, for `-c CODE ...`, `-m MODULE ...` and `SCRIPT ...`, in this interpreter (a
    forked child of a warm one: here and in the test suite's warm interpreter)."""
    if args[:1] == ["-c"] and len(args) > 1:
        sys.argv, sys.path[0] = ["-c", *args[2:]], ""
        exec(compile(args[1], "<string>", "exec"), {"__name__": "__main__"})
    elif args[:1] == ["-m"] and len(args) > 1:
        sys.argv, sys.path[0] = [args[1], *args[2:]], os.getcwd()
        runpy.run_module(args[1], run_name="__main__", alter_sys=True)
    elif args and not args[0].startswith("-"):
        sys.argv, sys.path[0] = list(args), os.path.dirname(os.path.abspath(args[0]))
        runpy.run_path(args[0], run_name="__main__")
    else:
        raise ValueError(f"python {' '.join(args)}: only -c CODE, -m MODULE and SCRIPT are forked")


def _die_with_launcher(conn: socket.socket, reported: threading.Event) -> None:
    """The launcher never writes after its request: end of stream means it is gone (killed, or the worker
    cancelled the run), and a flow run must not outlive the process its worker watches."""
    with contextlib.suppress(OSError):
        while conn.recv(1024):
            pass
    if not reported.is_set():
        os.kill(os.getpid(), signal.SIGKILL)


def _exit_code(code: int | str | None) -> int:
    """What `sys.exit(code)` makes the process's exit status."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code & 0xFF
    return 1


def worker_env() -> dict[str, str]:
    """The environment the worker gives a flow run whose job adds nothing: its own, plus its settings as
    variables (Prefect's process worker adds those to every run's environment)."""
    from prefect.settings import get_current_settings

    return {**os.environ, **get_current_settings().to_environment_variables(exclude_unset=True)}


def _settings_env(env: Mapping[str, str]) -> dict[str, str]:
    """The variables that are Prefect's settings, which it reads at import. `PREFECT__*` are a run's runtime
    values, and this package reads its own settings (`PREFECT_PYDANTIC_AI_*`) when a run first needs them."""
    return {
        k: v
        for k, v in env.items()
        if k.startswith("PREFECT_") and not k.startswith(("PREFECT__", "PREFECT_PYDANTIC_AI_"))
    }


if __name__ == "__main__":
    main(sys.argv[1:])
