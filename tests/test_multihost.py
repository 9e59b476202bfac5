"""Several machines, one Prefect server and one result storage: every guarantee still holds.

A "machine" is a process with its own hostname (`unshare --uts`, as root) and its own PREFECT_HOME, so nothing
host-local (file locks, pids) is shared; they share only the test session's Prefect server, the result storage
(a directory, or a bucket on a real S3-compatible server) and, where a test says so, a real `redis-server`.
Every server and process a test starts is stopped by it.
"""

from __future__ import annotations

import contextlib
import os
import re
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from prefect_pydantic_ai.infra.server import free_port
from prefect_pydantic_ai.testing import CallLog, FaultPlan
from tests.s3_servers import moto_s3, save_bucket

pytestmark = [pytest.mark.slow, pytest.mark.xdist_group("heavy")]  # conftest: HEAVY

SCRIPTS = Path(__file__).parent / "scripts"
MATRIX = SCRIPTS / "matrix_resume.py"
FULL_OUTPUT = '"done: order-42-fetched-saved"'
LEASE = 3.0
_UTS = sys.platform == "linux" and os.geteuid() == 0
_CLONE_NEWUTS = 0x04000000


def _own_hostname(name: str) -> None:
    """In the child before exec: a UTS namespace of its own (what `unshare --uts` does), named `name`."""
    import ctypes
    import socket

    if ctypes.CDLL(None, use_errno=True).unshare(_CLONE_NEWUTS) != 0:
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWUTS)")
    socket.sethostname(name)


_started: list[subprocess.Popen[str]] = []


@pytest.fixture(autouse=True)
def _no_leftover_processes() -> Iterator[None]:
    """A failed test must not leave its machines running (each is killed with its whole process tree)."""
    yield
    while _started:
        proc = _started.pop()
        if proc.poll() is None:
            _kill_machine(proc)
        proc.communicate()


def _wait_until(ready: Any, what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert time.monotonic() < deadline, f"{what} not ready after {timeout:g}s"
        time.sleep(0.05)


def start_redis(port: int, directory: Path) -> tuple[subprocess.Popen[str], str]:
    """A real redis-server on 127.0.0.1:`port` (data in `directory`, never saved), once it answers: its process,
    which the caller stops, and its URL."""
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed (apt-get install redis-server)")
    import redis

    directory.mkdir(parents=True, exist_ok=True)
    server = subprocess.Popen(
        ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(directory), "--save", ""],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    url = f"redis://127.0.0.1:{port}/0"

    def pong() -> bool:
        with redis.Redis.from_url(url) as client:
            try:
                return bool(client.ping())
            except redis.ConnectionError:
                return False

    try:
        _wait_until(pong, "redis-server")
    except BaseException:
        server.kill()
        server.wait(timeout=10)
        raise
    return server, url


@contextlib.contextmanager
def redis_server(port: int, directory: Path) -> Iterator[str]:
    """A real redis-server on 127.0.0.1:`port` (data in `directory`) while the block runs; its URL."""
    server, url = start_redis(port, directory)
    try:
        yield url
    finally:
        server.terminate()
        server.wait(timeout=10)


@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real redis-server on a free loopback port, in a temporary directory, for this module."""
    with redis_server(free_port(), tmp_path_factory.mktemp("redis")) as url:
        yield url


@pytest.fixture(scope="module")
def s3_journal(tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    """A real S3-compatible server (moto's, in its own process) on a free loopback port, with a bucket saved as
    the `S3Bucket` block `s3-bucket/<name>` on the shared Prefect server; yields the environment that points a
    machine's default result storage (records and journal) at it."""
    with moto_s3(tmp_path_factory.mktemp("moto")) as (endpoint, bucket):
        yield {"PREFECT_DEFAULT_RESULT_STORAGE_BLOCK": save_bucket(bucket, endpoint)}


def machine(
    name: str, root: Path, args: list[str], env: dict[str, str] | None = None
) -> subprocess.Popen[str]:
    """Start `python args...` as machine `name`: its own hostname (as root) and PREFECT_HOME, in a session of its
    own. (The process itself enters the new namespace, so its pid is the one a SIGKILL test sees.)"""
    home = root / name / "prefect-home"
    home.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        [sys.executable, *args],
        preexec_fn=(lambda: _own_hostname(name)) if _UTS else None,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env={**os.environ, "PREFECT_HOME": str(home), **(env or {})},
        start_new_session=True,
    )
    _started.append(proc)
    return proc


def _finish(proc: subprocess.Popen[str], timeout: float = 180) -> str:
    """The run's output line, once the machine's process exits successfully."""
    return finished(proc, timeout)[0]


def finished(proc: subprocess.Popen[str], timeout: float = 180) -> tuple[str, str]:
    """The run's output line and the machine's stderr, once its process exits successfully."""
    try:
        stdout, stderr = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        _kill_machine(proc)
        stdout, stderr = proc.communicate()
        stderr = f"still running after {timeout}s, killed\n{stderr}"
    assert proc.returncode == 0, f"pid {proc.pid} exited with {proc.returncode}: {stderr[-3000:]}"
    output = next(line for line in stdout.splitlines() if line.startswith("OUTPUT "))
    return output.removeprefix("OUTPUT "), stderr


def _executions(calls: Path) -> dict[str, int]:
    """How many times each step started, over all machines (`model#2` is the second model request)."""
    counts: dict[str, int] = {}
    for entry in CallLog(calls).entries():
        if entry.name in ("model", "tool:fetch", "tool:save"):
            step = f"model#{entry.args}" if entry.name == "model" else entry.name
            counts[step] = counts.get(step, 0) + 1
    return counts


def _matrix(key: str, calls: Path, *extra: str) -> list[str]:
    return [str(MATRIX), "--key", key, "--calls", str(calls), *extra]


def _two_resumers_after_a_kill_in_a_tool(tmp_path: Path, env: dict[str, str]) -> None:
    """Machine A is killed inside `save`; B and C resume the same key at the same moment: `save` runs once more
    (its first execution never finished), on one of them only, and both return the full output."""
    key, calls = f"mh-{uuid.uuid4().hex[:8]}", tmp_path / "calls.jsonl"
    plan = FaultPlan(state_file=tmp_path / "plan.jsonl").kill("tool:save", on_call=1)
    killed = machine("host-a", tmp_path, _matrix(key, calls), {**env, **plan.to_env()})
    killed.communicate(timeout=120)
    assert killed.returncode == -signal.SIGKILL
    assert _executions(calls) == {"model#1": 1, "tool:fetch": 1, "model#2": 1, "tool:save": 1}

    extra = ("--step-seconds", "1", "--barrier", str(tmp_path / "barrier"), "--barrier-at", "2")
    resumers = [machine(name, tmp_path, _matrix(key, calls, *extra), env) for name in ("host-b", "host-c")]
    outputs = [_finish(proc) for proc in resumers]

    assert outputs == [FULL_OUTPUT] * 2
    assert _executions(calls) == {"model#1": 1, "tool:fetch": 1, "model#2": 1, "tool:save": 2, "model#3": 1}
    saves = [e.pid for e in CallLog(calls).entries() if e.name == "tool:save"]
    assert saves[0] == killed.pid and saves[1] in {p.pid for p in resumers}


def _redis_locks(redis_url: str) -> dict[str, str]:
    return {"PREFECT_PYDANTIC_AI_LOCKS": redis_url, "PREFECT_PYDANTIC_AI_LOCK_LEASE_SECONDS": str(LEASE)}


def test_two_machines_resuming_one_killed_run_execute_each_step_once(tmp_path: Path, redis_url: str) -> None:
    _two_resumers_after_a_kill_in_a_tool(tmp_path, _redis_locks(redis_url))


def test_two_machines_resuming_one_killed_run_with_the_journal_in_s3_execute_each_step_once(
    tmp_path: Path, redis_url: str, s3_journal: dict[str, str]
) -> None:
    _two_resumers_after_a_kill_in_a_tool(tmp_path, {**_redis_locks(redis_url), **s3_journal})


def test_resuming_on_a_machine_that_cannot_see_the_journal_fails_with_one_clear_line(
    tmp_path: Path, s3_journal: dict[str, str]
) -> None:
    key, calls = f"mh-{uuid.uuid4().hex[:8]}", tmp_path / "calls.jsonl"
    plan = FaultPlan(state_file=tmp_path / "plan.jsonl").kill("tool:save", on_call=1)
    killed = machine("host-a", tmp_path, _matrix(key, calls), {**s3_journal, **plan.to_env()})
    killed.communicate(timeout=120)
    assert killed.returncode == -signal.SIGKILL

    # Machine B kept the default local result storage: the run's records are in the bucket, not there.
    local = tmp_path / "host-b" / "storage"
    resume = machine(
        "host-b",
        tmp_path,
        ["-m", "prefect_pydantic_ai", "resume", key],
        {"PREFECT_LOCAL_STORAGE_PATH": str(local), "COLUMNS": "400"},
    )
    stdout, stderr = resume.communicate(timeout=120)
    assert resume.returncode == 2, stdout + stderr
    [line] = stderr.strip().splitlines()
    assert line.startswith("error: Run ") and line.endswith(
        f"has no run record in this machine's result storage (local directory {local.resolve()}), so its "
        "journal is not visible here: point this machine at the storage its runs share "
        "(PREFECT_DEFAULT_RESULT_STORAGE_BLOCK=<block type>/<name>, see docs/scale-out.md) and resume again."
    )
    assert _executions(calls) == {
        "model#1": 1,
        "tool:fetch": 1,
        "model#2": 1,
        "tool:save": 1,
    }  # nothing re-ran


def test_an_unverified_call_started_on_a_dead_machine_is_not_repeated_with_the_journal_in_s3(
    tmp_path: Path, s3_journal: dict[str, str]
) -> None:
    """The "started" marker of a non-idempotent tool lives in the bucket beside its journal entry, so machine B
    sees that machine A's call may have had its effect, and stops instead of sending the email again."""
    key, sent = f"mh-email-{uuid.uuid4().hex[:8]}", tmp_path / "sent.log"
    env = {**s3_journal, "SEND_EMAIL_LOG": str(sent)}
    killed = machine(
        "host-a", tmp_path, [str(SCRIPTS / "send_email.py"), key], {**env, "SEND_EMAIL_KILL": "1"}
    )
    killed.communicate(timeout=120)
    assert killed.returncode == -signal.SIGKILL
    assert len(sent.read_text().splitlines()) == 1

    again = machine("host-b", tmp_path, [str(SCRIPTS / "send_email.py"), key], env)
    stdout, stderr = again.communicate(timeout=120)
    assert again.returncode == 1, stdout + stderr[-2000:]
    assert "ERROR UnverifiedEffectError: Tool 'send_email' was called in an earlier attempt" in stdout
    assert len(sent.read_text().splitlines()) == 1  # not sent twice


HOLD = """
import sys, time
from prefect_pydantic_ai.store.redis_locks import LeasedRedisLockManager
manager = LeasedRedisLockManager(sys.argv[1], lease_seconds=float(sys.argv[2]))
assert manager.acquire_lock("step-key", holder="machine-a")
print("held", flush=True)
time.sleep(600)
"""


def test_a_lock_whose_holder_machine_died_is_taken_over_after_its_lease(
    tmp_path: Path, redis_url: str
) -> None:
    from prefect_pydantic_ai.store.redis_locks import LeasedRedisLockManager

    holder = machine("host-a", tmp_path, ["-c", HOLD, redis_url, str(LEASE)])
    assert holder.stdout is not None and holder.stdout.readline().strip() == "held"
    manager = LeasedRedisLockManager(redis_url, lease_seconds=LEASE)

    # Alive, the holder renews its lease: two leases later the lock is still its own.
    assert not manager.acquire_lock("step-key", holder="machine-b", acquire_timeout=2 * LEASE)
    _kill_machine(holder)

    # Dead, it renews nothing: the lock expires within one lease and the next machine takes it.
    assert manager.acquire_lock("step-key", holder="machine-b", acquire_timeout=2 * LEASE)
    assert manager.is_lock_holder("step-key", "machine-b")
    manager.release_lock("step-key", "machine-b")
    assert not manager.is_locked("step-key")


@pytest.mark.anyio
async def test_installing_the_crash_automation_twice_leaves_one() -> None:
    from prefect import get_client

    from prefect_pydantic_ai.infra.automations import CRASH_AUTOMATION, install_crash_automation

    first, created = await install_crash_automation(within=600)
    again, created_again = await install_crash_automation(within=900)
    async with get_client() as client:
        [automation] = await client.read_automations_by_name(CRASH_AUTOMATION)
        await client.delete_automation(automation.id)
    assert (created, created_again) == (True, False)
    assert automation.id == first == again
    assert automation.trigger.within.total_seconds() == 900  # type: ignore[union-attr]
    assert [a.type for a in automation.actions] == ["change-flow-run-state"]


def _process_tree(pid: int) -> list[int]:
    """`pid` and all its descendants (read from /proc: a worker starts each flow run in a session of its own)."""
    children: dict[int, list[int]] = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    tree, todo = [], [pid]
    while todo:
        tree.append(current := todo.pop())
        todo += children.get(current, [])
    return tree


def _kill_machine(proc: subprocess.Popen[str]) -> None:
    """SIGKILL a machine's whole process tree at once, as a machine dying would stop it."""
    for pid in _process_tree(proc.pid):
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
    proc.wait()


def _wait_for_call(calls: Path, name: str, worker: subprocess.Popen[str], timeout: float = 120) -> None:
    """Wait until a flow run of `worker` logged a call of `name`; on timeout, fail with the worker's output."""
    deadline = time.monotonic() + timeout
    while name not in CallLog(calls).counts():
        if time.monotonic() > deadline:
            _kill_machine(worker)
            stdout, stderr = worker.communicate()
            raise AssertionError(
                f"no {name} call within {timeout:g}s; worker output:\n{(stdout + stderr)[-4000:]}"
            )
        time.sleep(0.05)


def _worker(name: str, root: Path, pool: str, env: dict[str, str]) -> subprocess.Popen[str]:
    return machine(
        name,
        root,
        ["-m", "prefect", "worker", "start", "--pool", pool, "--type", "process", "--name", name],
        {"PREFECT_WORKER_QUERY_SECONDS": "1", "PREFECT_WORKER_HEARTBEAT_SECONDS": "5", **env},
    )


async def _state_of(flow_run_id: Any, wanted: str, timeout: float) -> Any:
    """The flow run once its state type is `wanted` (polled for up to `timeout` seconds)."""
    import anyio
    from prefect import get_client

    deadline = time.monotonic() + timeout
    async with get_client() as client:
        while (flow_run := await client.read_flow_run(flow_run_id)).state_type.value != wanted:
            assert time.monotonic() < deadline, f"flow run still {flow_run.state_type} after {timeout:g}s"
            await anyio.sleep(0.5)
    return flow_run


async def _die_crash_resume(journal: str, root: Path, shared: dict[str, str]) -> dict[str, Any]:
    """One deployment on a pool of its own: its worker A's machine dies inside `save`, the heartbeat automation
    crashes the run, machine C resumes it by id and worker B finishes it. Returns what the test checks."""
    import anyio
    from prefect import get_client
    from prefect.deployments import run_deployment

    from prefect_pydantic_ai import list_runs
    from prefect_pydantic_ai.infra.cluster import process_pool

    sys.path.insert(0, str(SCRIPTS))
    try:
        from worker_flow import analyst_flow  # type: ignore[import-not-found]
    finally:
        sys.path.remove(str(SCRIPTS))
    pool, calls = f"mh-pool-{uuid.uuid4().hex[:6]}", root / "calls.jsonl"
    shared = {**shared, "MH_CALLS": str(calls)}
    async with get_client() as client:
        await client.create_work_pool(process_pool(pool))
    deployment_id = await (
        await analyst_flow.from_source(source=str(SCRIPTS), entrypoint="worker_flow.py:analyst_flow")
    ).deploy(name=f"multihost-{pool}", work_pool_name=pool, print_next_steps=False, ignore_warnings=True)
    # Worker A hangs inside `save` (the plan would kill it after a minute); the test kills the machine first.
    hang = FaultPlan(state_file=root / "plan.jsonl").kill("tool:save", on_call=1, delay=120)
    worker_a = _worker("host-a", root, pool, {**shared, **hang.to_env()})
    flow_run = await run_deployment(deployment_id, timeout=0)
    await anyio.to_thread.run_sync(_wait_for_call, calls, "tool:save", worker_a)
    killed_at = time.monotonic()
    _kill_machine(worker_a)

    crashed = await _state_of(flow_run.id, "CRASHED", timeout=150)
    detected_after = time.monotonic() - killed_at
    listed = [r.state for r in await list_runs(agent="worker_flow", limit=10) if r.run_id == str(flow_run.id)]

    worker_b = _worker("host-b", root, pool, shared)
    resume = machine(
        "host-c",
        root,
        ["-m", "prefect_pydantic_ai", "resume", str(flow_run.id)],
        {**shared, "COLUMNS": "400"},
    )
    stdout, stderr = await anyio.to_thread.run_sync(lambda: resume.communicate(timeout=120))
    assert resume.returncode == 0, stdout + stderr
    assert f"Scheduled it again on its deployment; a worker of pool {pool} resumes it." in stdout
    resumed_at = time.monotonic()
    await _state_of(flow_run.id, "COMPLETED", timeout=150)
    finished_after = time.monotonic() - resumed_at
    _kill_machine(worker_b)
    print(
        f"{journal}: crash detected {detected_after:.1f}s after the kill; resumed run finished in {finished_after:.1f}s"
    )
    return {"run": str(flow_run.id), "message": crashed.state.message, "listed": listed, "calls": calls}


@pytest.mark.anyio
async def test_runs_whose_worker_machines_died_are_crashed_by_heartbeat_and_finished_by_other_workers(
    tmp_path: Path, redis_url: str, s3_journal: dict[str, str]
) -> None:
    """Both journals at once, so one heartbeat wait serves both: a deployment journalling into a shared
    directory and one journalling into S3, each on its own pool and machines."""
    import anyio
    from prefect import get_client
    from prefect.settings import PREFECT_DEFAULT_RESULT_STORAGE_BLOCK, temporary_settings

    from prefect_pydantic_ai import show_run
    from prefect_pydantic_ai.infra.automations import CRASH_AUTOMATION, install_crash_automation

    journals = {"shared directory": {}, "s3": s3_journal}
    found: dict[str, dict[str, Any]] = {}
    await install_crash_automation(within=35)  # before the runs: it must see their first heartbeat
    try:

        async def one(journal: str, storage: dict[str, str]) -> None:
            root = tmp_path / journal.replace(" ", "-")
            shared = {**_redis_locks(redis_url), **storage, "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": "30"}
            found[journal] = await _die_crash_resume(journal, root, shared)

        async with anyio.create_task_group() as group:
            for journal, storage in journals.items():
                group.start_soon(one, journal, storage)
    finally:
        async with get_client() as client:
            for automation in await client.read_automations_by_name(CRASH_AUTOMATION):
                await client.delete_automation(automation.id)

    for journal, result in found.items():
        assert result["message"] == "No heartbeat for 35s: the machine running it stopped.", journal
        assert result["listed"] == [
            "crashed"
        ]  # on this machine, which never ran it: Prefect's state, not a pid
        block = journals[journal].get("PREFECT_DEFAULT_RESULT_STORAGE_BLOCK")
        with temporary_settings(updates={PREFECT_DEFAULT_RESULT_STORAGE_BLOCK: block}):
            detail = await show_run(result["run"])  # read where the workers wrote the run's records
        assert (detail.state, detail.run_count, detail.output) == ("completed", 2, FULL_OUTPUT.strip('"'))
        assert _executions(result["calls"]) == {
            "model#1": 1,
            "tool:fetch": 1,
            "model#2": 1,
            "tool:save": 2,
            "model#3": 1,
        }, journal
        pids = {e.pid for e in CallLog(result["calls"]).entries() if e.name == "model"}
        assert len(pids) == 2, journal  # model 1 and 2 ran in worker A's flow process, model 3 in worker B's


FIVE_STEP = SCRIPTS / "five_step.py"
FIVE_STEP_CALLS = ["model", "tool:calculate_statistics", "model", "tool:detect_anomalies", "model"]


class _DroppingPort:
    """A port where Redis should be that accepts connections and drops them at once (Redis restarting or failing
    over, as a client sees it), counting the connections."""

    def __init__(self, port: int) -> None:
        import socket
        import threading

        self.connections = 0
        self._socket = socket.create_server(("127.0.0.1", port))
        self._socket.settimeout(0.1)
        self._open = True
        self._thread = threading.Thread(target=self._serve, daemon=True)
        self._thread.start()

    def _serve(self) -> None:
        while self._open:
            try:
                connection, _ = self._socket.accept()
            except TimeoutError:
                continue
            self.connections += 1
            connection.close()

    def close(self) -> None:
        self._open = False
        self._thread.join(timeout=5)
        self._socket.close()


def _five_step_with_locks_at(port: int, key: str, root: Path, lease: float) -> subprocess.Popen[str]:
    env = {
        "FIVE_STEP_LOG": str(root / "calls.log"),
        "PREFECT_PYDANTIC_AI_LOCKS": f"redis://127.0.0.1:{port}/0",
        "PREFECT_PYDANTIC_AI_LOCK_LEASE_SECONDS": f"{lease:g}",
        "PREFECT_LOCAL_STORAGE_PATH": str(root / "storage"),
    }
    return machine("host-a", root, [str(FIVE_STEP), key], env)


def _five_step_calls(root: Path) -> list[str]:
    log = root / "calls.log"
    return [line.split(" ", 1)[1] for line in log.read_text().splitlines()] if log.exists() else []


def test_a_step_waits_out_a_redis_outage_shorter_than_a_lease_and_each_step_runs_once(tmp_path: Path) -> None:
    """Redis drops every connection for 5 s, well within the 10 s lease: the first step waits for it (and then
    for the restarted Redis's first lease), then the run completes, each call made once. (Without our retrying
    clients the step failed at the first drop.)"""
    port, key = free_port(), f"outage-{uuid.uuid4().hex[:8]}"
    dropping = _DroppingPort(port)
    try:
        run = _five_step_with_locks_at(port, key, tmp_path, lease=10)
        _wait_until(lambda: dropping.connections > 0, "a first connection to the Redis port", timeout=120)
        time.sleep(5)
    finally:
        dropping.close()
    assert _five_step_calls(tmp_path) == []  # nothing ran while the step could not take its lock
    with redis_server(port, tmp_path):
        _finish(run)
    assert _five_step_calls(tmp_path) == FIVE_STEP_CALLS


def test_redis_down_for_a_whole_lease_fails_the_step_in_one_clear_line_and_the_rerun_continues(
    tmp_path: Path,
) -> None:
    port, key = free_port(), f"redis-down-{uuid.uuid4().hex[:8]}"
    failed = _five_step_with_locks_at(port, key, tmp_path, lease=2)
    _, stderr = failed.communicate(timeout=180)
    assert failed.returncode == 1
    *_, line = [
        line for line in stderr.splitlines() if line.startswith("prefect_pydantic_ai.store.redis_locks.")
    ]
    assert re.fullmatch(
        r"prefect_pydantic_ai\.store\.redis_locks\.StepLockUnavailableError: Step locks: Redis at "
        rf"redis://127\.0\.0\.1:{port}/0 did not answer for \d+s \(Error 111 connecting to 127\.0\.0\.1:{port}\. "
        r"Connect call failed .*\)\. The step did not start; start Redis \(or fix PREFECT_PYDANTIC_AI_LOCKS\) and "
        r"resume the run: it continues here\.",
        line,
    ), line
    assert _five_step_calls(tmp_path) == []

    with redis_server(port, tmp_path):
        _finish(_five_step_with_locks_at(port, key, tmp_path, lease=2))
    assert _five_step_calls(tmp_path) == FIVE_STEP_CALLS
