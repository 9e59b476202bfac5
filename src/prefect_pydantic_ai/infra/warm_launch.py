"""`python -S warm_launch.py ARGS`: `python ARGS` (a flow run's `-m prefect.engine`) forked from the worker's warm
interpreter (see `warm_start`).

Run by path without `site` (standard library only, so it starts in milliseconds): hands the zygote named in
PREFECT_PYDANTIC_AI_WARM_SOCKET this process's environment, working directory and standard streams, forwards
SIGTERM and SIGINT to the child that runs the engine, and exits as that child does (killed by SIGKILL when the child
died without reporting). Without a zygote, or when the zygote says this run's settings differ from its own, it
becomes `python ARGS` itself, as the worker would have started it.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import sys
from types import FrameType
from typing import IO, NoReturn

SOCKET_ENV = (
    "PREFECT_PYDANTIC_AI_WARM_SOCKET"  # warm_start.SOCKET_ENV (this file imports nothing of the package)
)


def main() -> NoReturn:
    connection = _fork_from_zygote()
    if connection is None:
        os.execv(sys.executable, [sys.executable, *sys.argv[1:]])
    pid, answers = connection

    def forward(number: int, _frame: FrameType | None) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, number)

    for number in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(number, forward)
    code = None
    for line in answers:  # the child's exit code, then end of stream once it is gone
        code = json.loads(line)["returncode"]
    if code is None:  # the child died without reporting: killed
        os.kill(os.getpid(), signal.SIGKILL)
    sys.exit(code)


def _fork_from_zygote() -> tuple[int, IO[bytes]] | None:
    """The forked child's pid and the stream its exit code comes on; None to start fresh."""
    address = os.environ.get(SOCKET_ENV, "")
    if not address.startswith("@"):
        return None
    conn = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        conn.connect("\0" + address[1:])
        job = {"argv": sys.argv[1:], "env": dict(os.environ), "cwd": os.getcwd()}
        socket.send_fds(conn, [json.dumps(job).encode() + b"\n"], [0, 1, 2])
        answers = conn.makefile("rb")
        first = json.loads(answers.readline() or b"{}")
    except (OSError, ValueError):
        return None
    if "pid" not in first:  # {"fresh": true}, or the zygote could not fork
        return None
    return int(first["pid"]), answers


if __name__ == "__main__":
    main()
