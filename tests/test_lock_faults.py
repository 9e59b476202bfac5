"""Step locks failing under a run: Redis restarted without its data, and machines that share a journal but keep
their locks in files of their own.

Machines are simulated as in `test_multihost` (own hostname and PREFECT_HOME, one Prefect server, one journal
directory); every call of the run is counted across them, and every process and server a test starts is stopped.
"""

from __future__ import annotations

import logging
import re
import signal
import time
import uuid
from pathlib import Path

import pytest

from prefect_pydantic_ai.infra.server import free_port
from prefect_pydantic_ai.store.redis_locks import (
    LeasedRedisLockManager,
)  # at import: it sets up Prefect's logging
from prefect_pydantic_ai.testing import CallLog, FaultPlan
from tests.test_multihost import (  # the machines, their run script and their fixtures
    _UTS,
    FULL_OUTPUT,
    _executions,
    _matrix,
    _no_leftover_processes,  # noqa: F401 - autouse: a failed test leaves no machine running
    _wait_for_call,
    _wait_until,
    finished,
    machine,
    redis_server,
    start_redis,
)

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("heavy")]

LEASE = 3.0


def _warnings(stderr: str, starting: str) -> list[str]:
    """Our warnings on a machine's stderr that start with `starting`, without the time and level Prefect's
    console handler puts in front."""
    lines = [line.partition(" | WARNING | prefect_pydantic_ai - ")[2] for line in stderr.splitlines()]
    return [line for line in lines if line.startswith(starting)]


def _lock_keys(url: str) -> list[bytes]:
    import redis

    with redis.Redis.from_url(url) as client:
        return list(client.scan_iter("lock:*"))


@pytest.mark.parametrize("loss", ["restart", "flushall"])
def test_redis_losing_its_data_while_a_step_holds_its_lock_still_runs_that_step_once(
    tmp_path: Path, loss: str
) -> None:
    """Machine A is inside `save`, holding its lock; machine B reached `save` and waits for that lock. Redis loses
    every lock: SIGKILLed and a fresh one (no data) started on its port, or `FLUSHALL` on the same server. B is
    granted no lock for one lease, A's renewal takes its lock back meanwhile, and B replays A's `save` instead of
    executing it again."""
    import redis

    port, key, calls, gate = (
        free_port(),
        f"lost-{uuid.uuid4().hex[:8]}",
        tmp_path / "calls.jsonl",
        tmp_path / "go",
    )
    url = f"redis://127.0.0.1:{port}/0"
    env = {"PREFECT_PYDANTIC_AI_LOCKS": url, "PREFECT_PYDANTIC_AI_LOCK_LEASE_SECONDS": f"{LEASE:g}"}
    servers = [start_redis(port, tmp_path / "redis-1")[0]]
    try:
        a = machine("host-a", tmp_path, _matrix(key, calls, "--save-waits-for", str(gate)), env)
        _wait_for_call(calls, "tool:save", a)  # A holds save's lock
        b = machine("host-b", tmp_path, _matrix(key, calls), env)
        _wait_until(lambda: CallLog(calls).counts()["reach:save"] == 2, "machine B at save", timeout=120)

        if loss == "restart":  # Redis dies with every lock it held
            servers[0].send_signal(signal.SIGKILL)
            servers[0].wait(timeout=10)
            servers.append(start_redis(port, tmp_path / "redis-2")[0])
        else:
            with redis.Redis.from_url(url) as client:
                client.flushall()
        lost = time.monotonic()
        _wait_until(lambda: len(_lock_keys(url)) == 1, "save's lock taken back", timeout=2 * LEASE)
        print(f"A took its lock back {time.monotonic() - lost:.2f}s after Redis lost it")
        gate.touch()  # A's save completes
        (out_a, err_a), (out_b, err_b) = finished(a), finished(b)
    finally:
        for server in servers:
            server.kill()
            server.wait(timeout=10)

    assert (out_a, out_b) == (FULL_OUTPUT, FULL_OUTPUT)
    assert _executions(calls) == {"model#1": 1, "tool:fetch": 1, "model#2": 1, "tool:save": 1, "model#3": 1}
    [saved] = [e.pid for e in CallLog(calls).entries() if e.name == "tool:save"]
    assert saved == a.pid
    took_back = _warnings(err_a, "Step lock ")
    assert len(took_back) == 1 and re.fullmatch(
        rf"Step lock \w{{1,12}} was gone from Redis at {re.escape(url)} \(it restarted without its data, or the "
        r"lease lapsed while it was unreachable\); this process, still running the step, holds it again\.",
        took_back[0],
    ), err_a
    waited = _warnings(err_b, "Step locks: ")
    assert len(waited) == 1 and re.fullmatch(
        rf"Step locks: Redis at {re.escape(url)} may have lost the locks of steps still running: it restarted, "
        r"was flushed or failed over less than a lease \(3s\) ago, or holds step locks for the first time\. No "
        r"step lock is taken for \d\.\ds, so that their holders take them back\.",
        waited[0],
    ), err_b


def test_a_failover_to_a_replica_that_missed_the_latest_lock_grants_no_lock_for_a_lease(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A replica that has the primary's lock data up to a point is promoted (`REPLICAOF NO ONE`); the primary then
    grants a lock the replica never sees. Asked of the promoted replica, that lock is not granted until a lease
    has passed (its holder would take it back meanwhile), though the replica has been up longer than a lease."""
    import redis

    lease = 1.0
    with (
        redis_server(free_port(), tmp_path / "primary") as primary_url,
        redis_server(free_port(), tmp_path / "replica") as replica_url,
    ):
        primary = LeasedRedisLockManager(primary_url, lease_seconds=lease)
        replica = LeasedRedisLockManager(replica_url, lease_seconds=lease)
        try:
            primary_port = int(primary_url.rsplit(":", 1)[1].split("/")[0])
            with redis.Redis.from_url(replica_url) as client:
                client.replicaof("127.0.0.1", primary_port)
                assert primary.acquire_lock("earlier", holder="machine-a")  # writes the marker, after a lease
                _wait_until(lambda: client.exists("lock:earlier") == 1, "the replica in sync", timeout=10)
                client.replicaof("NO", "ONE")  # promoted; it misses everything the primary writes from here
            assert primary.acquire_lock("step-key", holder="machine-a")
            caplog.clear()
            with caplog.at_level(logging.WARNING, logger="prefect_pydantic_ai"):
                assert not replica.acquire_lock("step-key", holder="machine-b", acquire_timeout=lease / 2)
                started = time.monotonic()
                assert replica.acquire_lock("step-key", holder="machine-b", acquire_timeout=2 * lease)
            print(f"granted {time.monotonic() - started:.2f}s after the first refusal")
        finally:
            primary.client.close()
            replica.client.close()
    assert [r.getMessage() for r in caplog.records] == [
        f"Step locks: Redis at {replica_url} may have lost the locks of steps still running: it restarted, was "
        "flushed or failed over less than a lease (1s) ago, or holds step locks for the first time. No step lock "
        "is taken for 1.0s, so that their holders take them back."
    ]


def test_a_holder_whose_lock_another_took_forgets_it_and_says_so(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """The lock is rewritten under another holder (as after a lapsed lease): the next renewal, a third of a lease
    later, finds it and this process no longer counts itself the holder (so Prefect will not journal its result
    over the other's)."""
    import redis

    with redis_server(free_port(), tmp_path) as url:
        manager = LeasedRedisLockManager(url, lease_seconds=1.0)
        try:
            assert manager.acquire_lock("step-key", holder="machine-a")  # after the new server's first lease
            caplog.clear()
            with redis.Redis.from_url(url) as client:
                client.set("lock:step-key", "machine-b", px=60_000)
            with caplog.at_level(logging.WARNING, logger="prefect_pydantic_ai"):
                _wait_until(
                    lambda: not manager.is_lock_holder("step-key", "machine-a"), "the loss", timeout=5
                )
        finally:
            manager.client.close()
    assert [r.getMessage() for r in caplog.records] == [
        f"Step lock step-key is held by another process now (Redis at {url} lost it, or it expired while Redis "
        "was unreachable for a lease): that process may execute this step too."
    ]


_MOVED = (
    "Run {key} last ran on host-a and now runs on host-b, but step locks are files on each machine: two machines "
    "running it at once can each execute a step. Machines that share a journal need shared step locks: set "
    "PREFECT_PYDANTIC_AI_LOCKS=redis://<host>:6379/0 on every one (docs/scale-out.md)."
)


@pytest.mark.skipif(not _UTS, reason="simulated machines need their own hostnames (root, Linux)")
def test_a_run_resumed_on_another_machine_with_file_locks_says_so_in_one_line_and_with_redis_locks_does_not(
    tmp_path: Path,
) -> None:
    """Machine A is killed inside `save`; machine B resumes the key with file locks (warned, before any step),
    machine C with Redis locks (not warned). The shared journal makes both correct one after the other."""
    key, calls = f"moved-{uuid.uuid4().hex[:8]}", tmp_path / "calls.jsonl"
    plan = FaultPlan(state_file=tmp_path / "plan.jsonl").kill("tool:save", on_call=1)
    killed = machine("host-a", tmp_path, _matrix(key, calls), plan.to_env())
    killed.communicate(timeout=120)
    assert killed.returncode == -signal.SIGKILL

    output, stderr = finished(machine("host-b", tmp_path, _matrix(key, calls)))
    assert output == FULL_OUTPUT
    [warning] = _warnings(stderr, "Run ")
    assert warning == _MOVED.format(key=key)
    with redis_server(free_port(), tmp_path / "redis") as url:
        env = {"PREFECT_PYDANTIC_AI_LOCKS": url, "PREFECT_PYDANTIC_AI_LOCK_LEASE_SECONDS": f"{LEASE:g}"}
        output, stderr = finished(machine("host-c", tmp_path, _matrix(key, calls), env))
    assert output == FULL_OUTPUT
    assert "step locks are files" not in stderr
    assert _executions(calls) == {"model#1": 1, "tool:fetch": 1, "model#2": 1, "tool:save": 2, "model#3": 1}
