"""A step lock left by a killed process is reclaimed exactly once, however many processes find it at once.

The unit test races real processes on real lock files: every contender waits at one barrier, then all of them try
to take a lock whose holder is dead. Each holder creates an "inside" marker with O_EXCL while it holds the lock,
so two holders at once fail the test deterministically (the second marker cannot be created). The end-to-end test
resumes a run killed in a tool from two processes that wait at a gate in front of the dead lock, and counts the
executions of that tool. Against the old check-then-unlink reclaim both tests failed on every run.
"""

from __future__ import annotations

import json
import logging
import multiprocessing
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from multiprocessing.context import SpawnProcess
from multiprocessing.synchronize import Barrier
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

# Light imports only (no Prefect, no pydantic-ai): every contender process imports this module again.
from prefect_pydantic_ai.store.file_locks import ReclaimingLockManager, process_alive

if TYPE_CHECKING:
    from prefect_pydantic_ai.testing import FaultPlan

CONTENDERS = 6
# Each round is one dead lock raced by every contender: the old check-then-unlink let two in on most runs.
ROUNDS = 8
HOLD_SECONDS = 0.05
SLOW_LOG_SECONDS = 0.05

# A fresh interpreter per process: no Prefect threads inherited through fork.
_spawn = multiprocessing.get_context("spawn")


def _take_and_die(directory: str, keys: list[str]) -> None:
    """Take every lock, then exit without releasing them, as a SIGKILLed holder would."""
    manager = ReclaimingLockManager(Path(directory))
    for key in keys:
        assert manager.acquire_lock(key, holder="killed", acquire_timeout=10)
    os._exit(0)


class _ReclaimsTo(logging.Handler):
    """Appends one `reclaim <key>` line to the shared log per reclaim warning of the lock manager, slowly.

    A slow handler (Prefect's console handler on a loaded machine is one) keeps a reclaimer between judging the
    lock dead and removing it for a while: with the old check-then-unlink, a second reclaimer always got in.
    """

    def __init__(self, log: Path) -> None:
        super().__init__(logging.WARNING)
        self.log = log

    def emit(self, record: logging.LogRecord) -> None:
        if record.getMessage().startswith("Reclaiming the lock"):
            _append(self.log, f"reclaim {record.args[0] if record.args else '?'}")
            time.sleep(SLOW_LOG_SECONDS)


def _append(log: Path, line: str) -> None:
    """One O_APPEND write per line: lines from several processes never interleave."""
    fd = os.open(log, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, f"{line}\n".encode())
    finally:
        os.close(fd)


def _contend(directory: str, keys: list[str], log: str, barrier: Barrier, name: str) -> None:
    """For each key: wait for every contender, take the lock, hold it (inside marker), release it."""
    shared = Path(log)
    logger = logging.getLogger("prefect_pydantic_ai")
    logger.setLevel(logging.WARNING)
    logger.addHandler(_ReclaimsTo(shared))
    manager = ReclaimingLockManager(Path(directory), poll_interval=0.005)
    for key in keys:
        barrier.wait(timeout=120)
        if not manager.acquire_lock(key, holder=name, acquire_timeout=60):
            _append(shared, f"timeout {key} {name}")
            continue
        inside = Path(directory) / f"{key}.inside"
        try:
            fd = os.open(inside, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            _append(shared, f"overlap {key} {name}")
        else:
            os.close(fd)
            _append(shared, f"hold {key} {name}")
            time.sleep(HOLD_SECONDS)
            inside.unlink()
        manager.release_lock(key, holder=name)


@pytest.fixture
def processes() -> Iterator[list[SpawnProcess]]:
    """Processes a test starts; any still running at the end are killed."""
    started: list[SpawnProcess] = []
    yield started
    for proc in started:
        if proc.is_alive():
            proc.kill()
        proc.join(10)


@pytest.mark.slow
def test_a_dead_holders_lock_is_reclaimed_once_when_many_processes_find_it_at_once(
    tmp_path: Path, processes: list[SpawnProcess]
) -> None:
    directory, log = tmp_path / "locks", tmp_path / "holds.log"
    keys = [f"step-{n}-{uuid.uuid4().hex[:8]}" for n in range(ROUNDS)]
    killed = _spawn.Process(target=_take_and_die, args=(str(directory), keys))
    processes.append(killed)
    killed.start()
    killed.join(60)
    assert killed.exitcode == 0
    assert not process_alive(killed.pid or -1)
    assert len(list(directory.glob("*.lock"))) == ROUNDS  # the dead holder's locks are all still there

    barrier = _spawn.Barrier(CONTENDERS)
    for n in range(CONTENDERS):
        proc = _spawn.Process(target=_contend, args=(str(directory), keys, str(log), barrier, f"p{n}"))
        processes.append(proc)
        proc.start()
    for proc in processes[1:]:
        proc.join(240)
        assert proc.exitcode == 0, f"contender {proc.pid} exited with {proc.exitcode}"

    lines = log.read_text().splitlines()
    surprises = [line for line in lines if not line.startswith(("hold ", "reclaim "))]
    assert surprises == []  # no overlap, no timeout
    for key in keys:
        holders = sorted(line.split()[2] for line in lines if line.startswith(f"hold {key} "))
        assert holders == sorted(f"p{n}" for n in range(CONTENDERS)), key  # each held it once, one at a time
    reclaims = sorted(line.split()[1] for line in lines if line.startswith("reclaim "))
    assert reclaims == sorted(key[:12] for key in keys)  # exactly one reclaim per dead lock
    assert list(directory.glob("*.lock")) == []


def test_a_lock_of_a_live_holder_is_not_reclaimed(tmp_path: Path) -> None:
    directory = tmp_path / "locks"
    holder = ReclaimingLockManager(directory)
    other = ReclaimingLockManager(directory)
    assert holder.acquire_lock("step", holder="a")

    assert other.is_locked("step")
    assert not other.acquire_lock("step", holder="b", acquire_timeout=0.2)
    assert not other.is_lock_holder("step", "b")
    holder.release_lock("step", holder="a")
    assert other.acquire_lock("step", holder="b", acquire_timeout=1)
    assert other.is_lock_holder("step", "b")


# -- end to end: two resumers of a killed run whose in-flight step is locked by the dead process ---------------

SCRIPT = Path(__file__).parent / "scripts" / "matrix_resume.py"
FULL_OUTPUT = '"done: order-42-fetched-saved"'


@pytest.fixture
def scripts() -> Iterator[list[subprocess.Popen[str]]]:
    started: list[subprocess.Popen[str]] = []
    yield started
    for proc in started:
        if proc.poll() is None:
            proc.kill()
        proc.communicate()


def _start(
    scripts: list[subprocess.Popen[str]],
    key: str,
    calls: Path,
    plan: FaultPlan,
    gated: dict[str, str] | None = None,
) -> subprocess.Popen[str]:
    """Run matrix_resume.py (behind the lock gate when `gated` gives its environment)."""
    command = [sys.executable, *(("-c", GATED) if gated else ()), str(SCRIPT)]
    proc = subprocess.Popen(
        [*command, "--key", key, "--calls", str(calls)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, **plan.to_env(), **(gated or {})},
    )
    scripts.append(proc)
    return proc


def _locks_of(pid: int) -> list[Path]:
    """The step locks recorded for process `pid` in this session's lock directory."""
    from prefect_pydantic_ai.durable.steps import step_lock_manager

    found = []
    for path in step_lock_manager().directory.glob("*.lock"):
        try:
            if json.loads(path.read_bytes()).get("pid") == pid:
                found.append(path)
        except (OSError, ValueError):
            continue
    return found


GATED = """
import os, runpy, sys
from prefect_pydantic_ai.store.file_locks import ReclaimingLockManager

gate, gated_key, waited = os.environ["LOCK_GATE"], os.environ["LOCK_GATE_KEY"], []


def wait_at_gate(key):
    # Before taking the dead lock, block on the gate FIFO until the test closes its end: all resumers wake at once.
    if key == gated_key and not waited:
        waited.append(key)
        fd = os.open(os.path.join(gate, "fifo"), os.O_RDONLY)
        open(os.path.join(gate, str(os.getpid())), "w").close()
        os.read(fd, 1)
        os.close(fd)


def gated(acquire):
    def acquire_after_the_gate(self, key, *args, **kwargs):
        wait_at_gate(key)
        return acquire(self, key, *args, **kwargs)
    return acquire_after_the_gate


ReclaimingLockManager.acquire_lock = gated(ReclaimingLockManager.acquire_lock)
ReclaimingLockManager.aacquire_lock = gated(ReclaimingLockManager.aacquire_lock)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""
"""Runs matrix_resume.py with a gate in front of one lock: resumers that reach it wait until the test opens it."""


def _open_gate_when(gate: Path, arrived: int, procs: list[subprocess.Popen[str]], hold: int) -> None:
    deadline = time.monotonic() + 120
    while len([p for p in gate.iterdir() if p.name != "fifo"]) < arrived:
        for proc in procs:
            assert proc.poll() is None, (
                f"pid {proc.pid} exited with {proc.returncode}: {proc.communicate()[1][-3000:]}"
            )
        assert time.monotonic() < deadline, "the resumers never reached the dead lock"
        time.sleep(0.01)
    os.close(hold)  # end of file for every waiting reader at once


@pytest.mark.slow
def test_two_resumers_of_a_run_killed_in_a_tool_run_that_tool_once_more_in_total(
    tmp_path: Path, scripts: list[subprocess.Popen[str]]
) -> None:
    from prefect_pydantic_ai.testing import CallLog, FaultPlan

    key, calls = f"locks-{uuid.uuid4().hex[:10]}", tmp_path / "calls.jsonl"
    plan = FaultPlan(state_file=tmp_path / "plan.jsonl").kill("tool:save", on_call=1)
    killed = _start(scripts, key, calls, plan)
    _, stderr = killed.communicate(timeout=120)
    assert killed.returncode == -signal.SIGKILL, stderr[-3000:]
    tools = [e.name for e in CallLog(calls).entries() if e.name.startswith("tool:")]
    assert tools == ["tool:fetch", "tool:save"]
    [dead_lock] = _locks_of(killed.pid)  # the lock of `save`, held by a process that is gone

    # Both resumers replay model 1, fetch and model 2, then wait in front of the dead lock until both are there.
    gate = tmp_path / "gate"
    gate.mkdir()
    os.mkfifo(gate / "fifo")
    hold = os.open(
        gate / "fifo", os.O_RDWR
    )  # a writer, so the resumers' opens do not block; closed to open the gate
    env = {"LOCK_GATE": str(gate), "LOCK_GATE_KEY": dead_lock.stem}
    resumers = [_start(scripts, key, calls, FaultPlan(), gated=env) for _ in range(2)]
    try:
        _open_gate_when(gate, 2, resumers, hold)
    except BaseException:
        os.close(hold)
        raise
    for proc in resumers:
        stdout, stderr = proc.communicate(timeout=120)
        assert proc.returncode == 0, stderr[-3000:]
        assert f"OUTPUT {FULL_OUTPUT}" in stdout.splitlines()

    executed = [e.name for e in CallLog(calls).entries() if e.name != "boundary"]
    assert executed.count("tool:save") == 2  # the killed attempt, then exactly one of the two resumers
    assert (executed.count("model"), executed.count("tool:fetch")) == (3, 1)
    assert _locks_of(killed.pid) == []
