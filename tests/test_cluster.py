"""`prefect-pydantic-ai cluster`: PostgreSQL, Redis, a Prefect server, a process work pool and two workers that act
as their own machines, on this host. Runs of an 11-step agent deployed to its pool complete on both workers with
every step executed once; a worker killed with runs in flight loses none of them. One wave of runs serves
both. Ten more runs in flight ride out PostgreSQL, the Prefect server and Redis brought back by `cluster restart`.

The module's one cluster is started and stopped through the CLI, as a user does; every process it started is
gone afterwards (read from /proc). Steps are counted from the call log the flow writes (tests/scripts/cluster_flow.py).
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest

from prefect_pydantic_ai.infra.cluster import (
    Cluster,
    marked_processes,
    processes_with_env,
    read_cluster,
    using_api,
)
from prefect_pydantic_ai.testing import CallLog, CallLogEntry

from .test_multihost import _process_tree

pytestmark = [pytest.mark.slow, pytest.mark.anyio, pytest.mark.xdist_group("heavy")]  # conftest: HEAVY

SCRIPTS = Path(__file__).parent / "scripts"
RUNS = 50
HELD = 6  # of them wait in their third tool call until the test kills a worker
CRASH_WITHIN = (
    45  # 1.5 heartbeat intervals: a live run's heartbeat may come 15 s late before it is crashed by mistake
)
STEPS = Counter({("model", n): 1 for n in range(1, 7)} | {("tool", n): 1 for n in range(1, 6)})
"""What one uninterrupted run executes: 6 model requests and 5 tool calls, each once."""


def cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "prefect_pydantic_ai", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "COLUMNS": "200", **(env or {})},
    )


def _binaries_missing() -> str | None:
    postgres = shutil.which("initdb") or glob.glob("/usr/lib/postgresql/*/bin/initdb")
    missing = [
        name
        for name, found in (("postgresql", postgres), ("redis-server", shutil.which("redis-server")))
        if not found
    ]
    return (
        f"{' and '.join(missing)} not installed (Debian: apt-get install {' '.join(missing)})"
        if missing
        else None
    )


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    """`cluster up` in a temporary directory; `cluster down` afterwards, and nothing of it left running."""
    if (missing := _binaries_missing()) is not None:
        if os.geteuid() == 0:  # CI runs as root and installs them (.ci/run): missing there is a failure
            pytest.fail(missing)
        pytest.skip(missing)
    directory = tmp_path_factory.mktemp("cluster") / "state"
    up = cli("cluster", "up", "--dir", str(directory), "--within", str(CRASH_WITHIN), "--json")
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        started = read_cluster(directory)
        assert started is not None and json.loads(up.stdout)["api_url"] == started.api_url
        yield started
    finally:
        down = cli("cluster", "down", "--dir", str(directory))
        assert down.returncode == 0, down.stdout + down.stderr
        assert marked_processes(directory.resolve()) == []
        assert not directory.exists()


@pytest.fixture(scope="module")
def calls(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("calls") / "calls.jsonl"


@pytest.fixture(scope="module")
def deployment(cluster: Cluster, calls: Path) -> UUID:
    """The 11-step agent flow, deployed to the cluster's pool. Its flow runs log the calls they make, and the
    Prefect client's retries (503 "database is locked" and the like) at debug level, into the workers' logs."""
    sys.path.insert(0, str(SCRIPTS))
    try:
        from cluster_flow import cluster_flow  # type: ignore[import-not-found]
    finally:
        sys.path.remove(str(SCRIPTS))

    async def deploy() -> UUID:
        flow = await cluster_flow.from_source(source=str(SCRIPTS), entrypoint="cluster_flow.py:cluster_flow")
        env = {"CLUSTER_CALLS": str(calls), "CLUSTER_CLIENT_DEBUG": "1"}
        return await flow.deploy(  # type: ignore[no-any-return]
            name="cluster",
            work_pool_name=cluster.pool,
            job_variables={"env": env},
            print_next_steps=False,
            ignore_warnings=True,
        )

    with using_api(cluster.api_url):
        return asyncio.run(deploy())


class _ClientRetries(logging.Handler):
    """Every retry Prefect's client announces in this process (it logs each at debug level before backing off)."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.seen: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        if "Another attempt will be made" in record.getMessage():
            self.seen.append(record.getMessage())


@contextlib.contextmanager
def client_retries() -> Iterator[list[str]]:
    logger, handler = logging.getLogger("prefect.client"), _ClientRetries()
    level = logger.level
    logger.setLevel(logging.DEBUG)
    logger.addHandler(handler)
    try:
        yield handler.seen
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)


def _retries_in_worker_logs(cluster: Cluster) -> list[str]:
    """The client retries the flow runs announced (their output goes to their worker's log), each with the
    exception that caused it when there was one (the last line of the traceback logged after it)."""
    retries = []
    for worker in cluster.workers:
        lines = Path(worker.log).read_text(errors="replace").splitlines()
        for at, line in enumerate(lines):
            if "Another attempt will be made" in line:
                cause = next(
                    (
                        later
                        for later in lines[at + 1 : at + 200]
                        if re.match(r"[\w.]+(Error|Timeout)\b", later)
                    ),
                    "",
                )
                retries.append(f"{line} {cause}".strip())
    return retries


async def _submit(
    deployment: UUID, labels: list[str], env: dict[str, str] | None = None, **parameters: Any
) -> dict[str, UUID]:
    """All runs at once, as concurrent `run_deployment` calls that return when each flow run is created (`env`:
    added to the deployment's environment for these runs)."""
    from prefect.deployments import run_deployment

    variables = {"env": env} if env else None
    created = await asyncio.gather(
        *(
            run_deployment(
                deployment, parameters={"label": label, **parameters}, timeout=0, job_variables=variables
            )
            for label in labels
        )
    )
    return {label: run.id for label, run in zip(labels, created, strict=True)}


async def _states(ids: list[UUID]) -> dict[UUID, Any]:
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async with get_client() as client:
        found = await client.read_flow_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids)))
    return {run.id: run for run in found}


async def _wait_for(ids: list[UUID], wanted: set[str], timeout: float) -> dict[UUID, Any]:
    """The flow runs once every one is in one of the `wanted` state types (polled)."""
    deadline = time.monotonic() + timeout
    while True:
        runs = await _states(ids)
        if len(runs) == len(ids) and all(r.state_type.value in wanted for r in runs.values()):
            return runs
        if time.monotonic() > deadline:
            raise AssertionError(
                f"not all {wanted} after {timeout:g}s: {Counter(r.state_type.value for r in runs.values())}"
            )
        await asyncio.sleep(2)


def _executions(calls: Path, prefix: str) -> dict[str, list[CallLogEntry]]:
    """Each run's calls (label → entries, in the order they started) among the runs labelled `prefix`..."""
    runs: dict[str, list[CallLogEntry]] = {}
    for entry in CallLog(calls).entries():
        if entry.args["run"].startswith(prefix):
            runs.setdefault(entry.args["run"], []).append(entry)
    return runs


def _steps(entries: list[CallLogEntry]) -> Counter[tuple[str, int]]:
    return Counter((e.name, e.args["step"]) for e in entries)


def _wait_until(ready: Any, what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        assert time.monotonic() < deadline, f"{what} not within {timeout:g}s"
        time.sleep(0.5)


def test_status_reports_every_part_alive_with_its_address(cluster: Cluster) -> None:
    out = cli("cluster", "status", "--dir", cluster.directory, "--json")
    assert out.returncode == 0, out.stderr
    status = json.loads(out.stdout)
    parts = {c["name"]: c for c in status["components"]}
    assert set(parts) == {"postgresql", "redis", "prefect server", "worker host-a", "worker host-b"}
    assert all(c["alive"] for c in parts.values())
    assert status["database_url"].startswith("postgresql+asyncpg://postgres@127.0.0.1:")
    assert status["env"]["PREFECT_PYDANTIC_AI_LOCKS"].startswith("redis://127.0.0.1:")
    assert status["env"]["PREFECT_LOCAL_STORAGE_PATH"] == cluster.journal
    if status["own_hostnames"]:
        assert (parts["worker host-a"]["hostname"], parts["worker host-b"]["hostname"]) == (
            "host-a",
            "host-b",
        )
    assert "PREFECT_API_URL" in cli("cluster", "env", "--dir", cluster.directory).stdout
    again = cli("cluster", "up", "--dir", cluster.directory)
    assert again.returncode == 2 and again.stderr.startswith("error: A cluster is already up in "), (
        again.stderr
    )


@pytest.mark.timeout(1200)
async def test_fifty_runs_at_once_complete_each_step_once_and_a_killed_workers_runs_are_finished_by_the_other(
    cluster: Cluster, deployment: UUID, calls: Path, tmp_path: Path
) -> None:
    """One wave of fifty runs serves both claims (each flow run is a process that costs this machine ~4 s of CPU
    to start): six of them wait inside their third tool call on their first attempt while the other 44 complete,
    then the worker holding most of the six dies with them in flight."""
    labels, release = [f"run-{i:02d}" for i in range(RUNS)], tmp_path / "release"
    holding, free = labels[:HELD], labels[HELD:]
    with using_api(cluster.api_url):
        with client_retries() as retries:
            parts = await asyncio.gather(
                _submit(deployment, free), _submit(deployment, holding, hold_until=str(release))
            )
        ids = parts[0] | parts[1]

        def third_tool_calls() -> dict[str, str]:
            """Held run → the worker that made its third tool call, for the held runs that reached it."""
            return {
                label: e.args["worker"]
                for label, entries in _executions(calls, "run-").items()
                if label in holding
                for e in entries
                if (e.name, e.args["step"]) == ("tool", 3)
            }

        completed = await _wait_for([ids[label] for label in free], {"COMPLETED", "FAILED", "CRASHED"}, 840)
        _wait_until(lambda: len(third_tool_calls()) == HELD, "every held run in its third tool call", 300)

        # All fifty flow runs were created at the first request, and none of their own API calls (task runs,
        # states, events) was answered 503 and retried.
        assert retries == []
        unfinished = {
            r.name: r.state.message for r in completed.values() if r.state_type.value != "COMPLETED"
        }
        assert Counter(r.state_type.value for r in completed.values()) == {"COMPLETED": len(free)}, unfinished
        assert _retries_in_worker_logs(cluster) == []
        executed = _executions(calls, "run-")
        assert {label: _steps(executed[label]) for label in free} == {label: STEPS for label in free}
        workers = Counter(e.args["worker"] for entries in executed.values() for e in entries)
        assert set(workers) == {"host-a", "host-b"}, workers  # both served runs
        if cluster.own_hostnames:  # each machine ran its runs under its own hostname
            assert all(e.args["host"] == e.args["worker"] for entries in executed.values() for e in entries)

        # The machine holding most of the waiting runs dies: the worker and its flow runs at once.
        holders = third_tool_calls()
        victim_name, _ = Counter(holders.values()).most_common(1)[0]
        [victim] = [w for w in cluster.workers if w.name == f"worker {victim_name}"]
        [survivor] = [w.name.removeprefix("worker ") for w in cluster.workers if w is not victim]
        held = sorted(label for label, worker in holders.items() if worker == victim_name)
        for pid in _process_tree(victim.pid):
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        release.touch()  # the survivor's own waiting runs go on

        crashed = await _wait_for([ids[label] for label in held], {"CRASHED"}, timeout=CRASH_WITHIN + 150)
        assert {r.state.message for r in crashed.values()} == {
            f"No heartbeat for {CRASH_WITHIN}s: the machine running it stopped."
        }
        resume = cli("resume", "--all-crashed", env=cluster.client_env())
        assert resume.returncode == 0, resume.stdout + resume.stderr
        assert resume.stdout.count("Scheduled it again on its deployment") == len(held), resume.stdout
        runs = await _wait_for([ids[label] for label in holding], {"COMPLETED", "FAILED", "CRASHED"}, 420)

    assert Counter(r.state_type.value for r in runs.values()) == {"COMPLETED": HELD}
    assert {label: runs[ids[label]].run_count for label in held} == {label: 2 for label in held}
    executed = _executions(calls, "run-")
    interrupted = STEPS + Counter(
        {("tool", 3): 1}
    )  # the call the machine died in ran again; nothing else did
    assert {label: _steps(executed[label]) for label in holding} == {
        label: interrupted if label in held else STEPS for label in holding
    }
    for label in held:  # from the interrupted call on, the run went on on the other machine
        first_third = next(
            i for i, e in enumerate(executed[label]) if (e.name, e.args["step"]) == ("tool", 3)
        )
        assert {e.args["worker"] for e in executed[label][first_third + 1 :]} == {survivor}
    print(f"steps executed per worker before the kill: {dict(workers)}")
    print(f"killed {victim_name} holding {len(held)} of {HELD} waiting runs; all completed after resume")


FAULT_RUNS = 10
PACE = 3.0  # seconds each tool call of the fault test's runs takes, so the last ones started work through the faults
FAULT_LEASE = 10  # the step locks' lease for those runs: after Redis restarts empty, steps wait out one lease


async def _task_run_states(ids: list[UUID]) -> dict[UUID, Counter[str]]:
    """Flow run → how many of its task runs Prefect has recorded, by state type."""
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId

    async with get_client() as client:
        found = await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=ids)))
    states: dict[UUID, Counter[str]] = {i: Counter() for i in ids}
    for task_run in found:
        if task_run.flow_run_id is not None:
            states[task_run.flow_run_id][task_run.state_type.value if task_run.state_type else "NONE"] += 1
    return states


@pytest.mark.timeout(600)
async def test_ten_runs_in_flight_ride_out_postgresql_restarted_the_server_killed_and_redis_restarted(
    cluster: Cluster, deployment: UUID, calls: Path, tmp_path: Path
) -> None:
    """Ten runs, each tool call taking 3 s and the last one waiting for the test, while `cluster restart` brings
    back PostgreSQL (fast shutdown), then the Prefect server (SIGKILLed, started again 5 s later), then Redis
    (empty: the server's messaging and the step locks lose everything): every run completes, with each model
    request and tool call executed once; a run the crash automation crashed because its heartbeats were lost in
    the outage and still Crashed when its process ended is completed by `resume --all-crashed`, executing nothing
    again. Runs last in the module: it leaves client retries in the workers' logs."""
    labels, release = [f"fault-{i}" for i in range(FAULT_RUNS)], tmp_path / "release"
    began = time.monotonic()
    timeline: list[str] = []

    def mark(what: str) -> None:
        progress = _executions(calls, "fault-")
        steps = sum(len(entries) for entries in progress.values())
        timeline.append(
            f"{time.monotonic() - began:5.1f}s {what}: {steps} of {11 * FAULT_RUNS} steps executed"
        )

    def restart(*part: str) -> str:
        out = cli("cluster", "restart", *part, "--dir", cluster.directory)
        assert out.returncode == 0, out.stdout + out.stderr
        return out.stdout.strip()

    parts = "restart postgresql, redis, server or worker NAME (workers: host-a, host-b)."
    for wrong, line in {
        ("nginx", "--dir", cluster.directory): (
            f"No part 'nginx' in the cluster in {cluster.directory}: {parts}"
        ),
        ("worker", "host-z", "--dir", cluster.directory): (
            f"No part 'worker host-z' in the cluster in {cluster.directory}: {parts}"
        ),
        ("redis", "--dir", str(tmp_path)): f"No cluster in {tmp_path}; start one with `cluster up`.",
    }.items():
        out = cli("cluster", "restart", *wrong)
        assert (out.returncode, out.stderr) == (2, f"error: {line}\n"), out
    recorded = read_cluster(Path(cluster.directory))
    assert recorded is not None
    for worker in recorded.workers:  # the fifty-run test killed one machine: `restart` brings it back
        if not worker.alive():
            said = restart("worker", worker.name.removeprefix("worker "))
            assert re.match(rf"Started {worker.name} \(pid \d+\)", said), said

    env = {"PREFECT_PYDANTIC_AI_LOCK_LEASE_SECONDS": str(FAULT_LEASE)}
    with using_api(cluster.api_url):
        ids = await _submit(deployment, labels, env, hold_until=str(release), hold_at=5, pace=PACE)
        _wait_until(
            lambda: (
                all(("tool", 1) in _steps(e) for e in _executions(calls, "fault-").values())
                and len(_executions(calls, "fault-")) == FAULT_RUNS
            ),
            "every run in its first tool call",
            300,
        )
        mark("every run working")

        said = restart("postgresql")
        assert re.fullmatch(r"Restarted postgresql \(pid \d+\) at 127\.0\.0\.1:\d+\.", said), said
        mark("PostgreSQL restarted")

        [server] = [c for c in cluster.components if c.name == "prefect server"]
        os.kill(server.pid, signal.SIGKILL)
        _wait_until(lambda: not server.alive(), "the server gone", 10)
        mark("server SIGKILLed")
        probe = _HealthProbe(cluster.api_url)  # asks from the outage on, as a run's client does
        await asyncio.sleep(5)  # the outage itself
        said = restart("server")
        assert (
            said == f"Started prefect server (pid {_pid(cluster, 'prefect server')}) at {cluster.ui_url}."
        ), said
        mark("server answering again")
        # the new server listened before it booted: the request that got through waited for the boot and was
        # answered (before, it was refused until the server was up, then answered at once)
        assert probe.answer(timeout=60).startswith(b"HTTP/1.1 200"), probe.__dict__
        assert probe.waited > 1.0, probe.__dict__
        mark(f"a request sent during the boot answered after waiting {probe.waited:.1f}s in the backlog")

        said = restart("redis")
        assert re.fullmatch(r"Restarted redis \(pid \d+\) at 127\.0\.0\.1:\d+\.", said), said
        mark("Redis restarted empty")

        assert all(
            ("model", 6) not in _steps(e) for e in _executions(calls, "fault-").values()
        )  # all in flight
        release.touch()
        runs = await _wait_for(list(ids.values()), {"COMPLETED", "FAILED", "CRASHED"}, 300)
        mark("every run final")
        # A server outage longer than the crash automation's window minus a heartbeat interval loses the
        # heartbeats that would have kept a live run from being crashed (Prefect's client drops the events it
        # could not send): such a run executes its steps to the end, and `resume` completes it if it stays Crashed.
        crashed = sorted(label for label in labels if runs[ids[label]].state_type.value == "CRASHED")
        resumed: list[str] = []
        if crashed:
            assert {runs[ids[label]].state.message for label in crashed} == {
                f"No heartbeat for {CRASH_WITHIN}s: the machine running it stopped."
            }
            # A live process crashed by mistake goes on to its end, and Prefect may take its Completed from the
            # Crashed state: once every such process is gone (its worker gave it PREFECT__FLOW_RUN_ID), only the
            # runs still Crashed need `resume`.
            _wait_until(
                lambda: (
                    not any(processes_with_env(f"PREFECT__FLOW_RUN_ID={ids[label]}") for label in crashed)
                ),
                "the crashed runs' processes gone",
                180,
            )
            runs |= await _states([ids[label] for label in crashed])
            resumed = [label for label in crashed if runs[ids[label]].state_type.value == "CRASHED"]
            mark(
                f"{len(crashed)} crashed by the automation, {len(crashed) - len(resumed)} completed by their process"
            )
        if resumed:
            resume = cli("resume", "--all-crashed", env=cluster.client_env())
            assert resume.returncode == 0, resume.stdout + resume.stderr
            assert resume.stdout.count("Scheduled it again on its deployment") == len(resumed), resume.stdout
            runs |= await _wait_for(
                [ids[label] for label in resumed], {"COMPLETED", "FAILED", "CRASHED"}, 300
            )
            mark(f"{len(resumed)} resumed")
        tasks = await _task_run_states(list(ids.values()))

    status = cli("cluster", "status", "--dir", cluster.directory, "--json")
    assert status.returncode == 0, status.stdout + status.stderr  # every part alive, its new pid recorded
    retries = Counter(
        found[-1] if (found := re.findall(r"([\w.]+(?:Error|Timeout)):", line)) else "no exception"
        for line in _retries_in_worker_logs(cluster)
    )
    fewest = min(labels, key=lambda label: tasks[ids[label]].total())
    shown = cli("show", str(ids[fewest]), "--json", env=cluster.client_env())
    assert shown.returncode == 0, shown.stderr
    print("\n".join(timeline))
    print(f"task runs in Prefect: {dict(sum(tasks.values(), Counter()))} of {11 * FAULT_RUNS} steps")
    print(
        f"`show {fewest}` lists {len(json.loads(shown.stdout)['steps'])} steps (Prefect recorded it {tasks[ids[fewest]].total()})"
    )
    print(f"client retries in the runs: {sum(retries.values())}, by cause: {dict(retries)}")
    assert Counter(r.state_type.value for r in runs.values()) == {"COMPLETED": FAULT_RUNS}
    assert {label: runs[ids[label]].run_count for label in labels} == {
        label: 2 if label in resumed else 1 for label in labels
    }
    executed = _executions(calls, "fault-")
    assert {label: _steps(executed[label]) for label in labels} == {label: STEPS for label in labels}


class _HealthProbe(threading.Thread):
    """Connects to the API's address until a connection is accepted (each refusal tried again after 50 ms), then
    asks `GET /api/health` on it: how long the answer took from the connection (`waited`), and the answer."""

    def __init__(self, api_url: str) -> None:
        super().__init__(daemon=True)
        host, port = api_url.removeprefix("http://").split("/")[0].split(":")
        self.address, self.refused, self.waited, self.response = (host, int(port)), 0, 0.0, b""
        self.start()

    def run(self) -> None:
        deadline = time.monotonic() + 180
        # a connection to the killed server's lingering socket is reset: ask again
        while not self.response and time.monotonic() < deadline:
            try:
                with socket.create_connection(self.address, timeout=120) as conn:
                    connected = time.monotonic()
                    conn.sendall(b"GET /api/health HTTP/1.1\r\nHost: cluster\r\nConnection: close\r\n\r\n")
                    self.response = conn.recv(64)
                    self.waited = time.monotonic() - connected
            except (ConnectionRefusedError, ConnectionResetError):
                self.refused += 1
                time.sleep(0.05)

    def answer(self, timeout: float) -> bytes:
        self.join(timeout)
        return self.response


def _pid(cluster: Cluster, name: str) -> int:
    """The pid `cluster.json` records for component `name` now."""
    state = read_cluster(Path(cluster.directory))
    assert state is not None
    return next(c.pid for c in state.components if c.name == name)
