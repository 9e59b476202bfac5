"""A command in a real terminal (a pty), and Ctrl-C typed into it once its output shows a given text."""

from __future__ import annotations

import os
import pty
import select
import signal
import time
from pathlib import Path


def ctrl_c_when(
    argv: list[str], env: dict[str, str], cwd: Path, shown: bytes, timeout: float = 180
) -> tuple[int, str, bool]:
    """Run `argv` with the pty as its controlling terminal; type Ctrl-C once `shown` appears. Returns its exit
    code, everything it wrote, and whether Ctrl-C was typed."""
    pid, terminal = pty.fork()
    if pid == 0:  # the child: a new session whose controlling terminal is the pty
        # as a shell starts a command: Ctrl-C's SIGINT at its default and no signal blocked, whatever the test
        # process had (a signal ignored or blocked there would be inherited, and Ctrl-C would do nothing)
        signal.pthread_sigmask(signal.SIG_SETMASK, [])
        signal.signal(signal.SIGINT, signal.SIG_DFL)
        os.chdir(cwd)
        os.execve(argv[0], argv, env)
    output, deadline, typed = b"", time.monotonic() + timeout, False
    try:
        while time.monotonic() < deadline:
            if not typed and shown in output:
                os.write(
                    terminal, b"\x03"
                )  # what the terminal sends for Ctrl-C: SIGINT to its foreground group
                typed = True
            if select.select([terminal], [], [], 0.2)[0]:
                try:
                    chunk = os.read(terminal, 4096)
                except OSError:  # the child closed the terminal: it ended
                    break
                if not chunk:
                    break
                output += chunk
    finally:
        if time.monotonic() >= deadline:
            os.kill(pid, 9)
        _, status = os.waitpid(pid, 0)
        os.close(terminal)
    return os.waitstatus_to_exitcode(status), output.decode(errors="replace"), typed
