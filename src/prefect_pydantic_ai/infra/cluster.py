"""A production-shaped Prefect cluster on this machine: PostgreSQL, Redis, a Prefect server, a work pool, workers.

`up` starts, each in a session of its own and logging to the cluster directory: a private PostgreSQL (`initdb`
in a temporary directory, as the `postgres` user when we are root, since PostgreSQL refuses to run as root), a
private `redis-server`, a Prefect server on that database with Redis as its messaging, cache, causal-ordering,
lease and Docket backend (Prefect's documented self-hosted setup), a process work pool, the crash automation
(`automations`), and workers that each act as their own machine: their own PREFECT_HOME, their own hostname
(a UTS namespace, as `unshare --uts` makes, when we may), sharing only the server, the Redis step locks and one
journal directory. Everything it starts carries the cluster directory in its environment (`CLUSTER_MARKER`),
so `down` finds every process that belongs to it, including a worker's flow runs, by reading /proc, and stops
them all. `restart` brings one part back (stopped if it runs, started again on its port with its data and
settings) and records its new pid. The directory holds the state file, the logs, the journal and Redis's
files; PostgreSQL's data lives in a temporary directory (the `postgres` user must be able to reach it) that
`down` removes.

The module imports no Prefect at the top, so `status` and `down` stay fast.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from prefect_pydantic_ai.infra import warm_start
from prefect_pydantic_ai.infra.server import free_port, listening_once_released, server_command

if TYPE_CHECKING:
    from prefect.client.schemas.actions import WorkPoolCreate

STATE_FILE = "cluster.json"
CLUSTER_MARKER = "PREFECT_PYDANTIC_AI_CLUSTER"
"""Environment variable set to the cluster directory in every process the cluster starts (and their children)."""
DEFAULT_DIRECTORY = ".cluster"
DEFAULT_POOL = "agents"
WORKER_GRACE = 5.0  # seconds `down` lets a worker shut down before it is killed (a healthy one takes ~1.5)
BOOT_TIMEOUT = 180.0  # a first boot of the Prefect server migrates a new PostgreSQL database
_CLONE_NEWUTS = 0x04000000
# Redis databases: Prefect's messaging (and cache, ordering, leases), Docket's background services, step locks.
_MESSAGING_DB, _DOCKET_DB, _LOCKS_DB = 0, 1, 2


class ClusterError(RuntimeError):
    """The cluster cannot be started, found or stopped as asked; the message says what to do."""


@dataclass(frozen=True)
class Component:
    """One process the cluster started: what it is, its pid (and start time, against pid reuse), where it
    listens or which hostname it has, and its log."""

    name: str
    pid: int
    started: int  # the process's start time in clock ticks after boot (/proc/<pid>/stat field 22)
    address: str
    log: str
    hostname: str | None = None

    def alive(self) -> bool:
        return _start_time(self.pid) == self.started


@dataclass(frozen=True)
class ClusterConfig:
    """How `up` builds the cluster. Workers send a heartbeat every `heartbeat_seconds` (Prefect's minimum is 30);
    the automation crashes a run silent for `crash_within` seconds; each worker runs at most `worker_limit` flow
    runs at once (None: no limit) and polls the pool every `poll_seconds`."""

    workers: int = 2
    pool: str = DEFAULT_POOL
    heartbeat_seconds: int = 30
    crash_within: float = 90.0
    worker_limit: int | None = 10
    poll_seconds: float = 1.0


@dataclass(frozen=True)
class Cluster:
    """A running cluster, as recorded in `<directory>/cluster.json`."""

    directory: str
    api_url: str
    database_url: str
    redis_url: str
    locks_url: str
    journal: str
    pool: str
    postgres_data: str
    own_hostnames: bool
    components: list[Component] = field(default_factory=list)
    config: ClusterConfig = field(default_factory=ClusterConfig)  # what `restart` starts a worker with

    @property
    def ui_url(self) -> str:
        return self.api_url.removesuffix("/api")

    @property
    def workers(self) -> list[Component]:
        return [c for c in self.components if c.name.startswith("worker ")]

    def client_env(self) -> dict[str, str]:
        """What a machine needs to use this cluster as one of its own: the API, the journal, the step locks."""
        return {
            "PREFECT_API_URL": self.api_url,
            "PREFECT_LOCAL_STORAGE_PATH": self.journal,
            "PREFECT_PYDANTIC_AI_LOCKS": self.locks_url,
        }

    def to_json(self) -> dict[str, Any]:
        """The documented `cluster status --json` document (docs/cli.md)."""
        return {
            "directory": self.directory,
            "api_url": self.api_url,
            "ui_url": self.ui_url,
            "database_url": self.database_url,
            "redis_url": self.redis_url,
            "work_pool": self.pool,
            "journal": self.journal,
            "own_hostnames": self.own_hostnames,
            "env": self.client_env(),
            "components": [
                {
                    "name": c.name,
                    "pid": c.pid,
                    "alive": c.alive(),
                    "address": c.address,
                    "hostname": c.hostname,
                    "log": c.log,
                }
                for c in self.components
            ],
        }


# -- up ---------------------------------------------------------------------------------------------------------


def cluster_up(
    directory: Path, config: ClusterConfig | None = None, progress: Callable[[str], None] | None = None
) -> Cluster:
    """Start a cluster in `directory` and return it once every component answers; on any failure, stop what was
    started and raise `ClusterError` naming the log to read."""
    config = config or ClusterConfig()
    say = progress or (lambda _: None)
    directory = directory.resolve()
    existing = read_cluster(directory)
    if existing is not None and any(c.alive() for c in existing.components):
        raise ClusterError(
            f"A cluster is already up in {directory} (UI at {existing.ui_url}); stop it first with `cluster down`."
        )
    if existing is not None:
        cluster_down(directory)  # a stale record whose processes are all gone
    postgres_bin, redis_server = _binaries()
    _require_prefect_redis()
    logs = directory / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    journal = directory / "journal"
    journal.mkdir(exist_ok=True)
    pg_root = Path(tempfile.mkdtemp(prefix="ppa-cluster-pg-"))
    components: list[Component] = []
    cluster = Cluster(
        directory=str(directory),
        api_url="",
        database_url="",
        redis_url="",
        locks_url="",
        journal=str(journal),
        pool=config.pool,
        postgres_data=str(pg_root),
        own_hostnames=False,
        components=components,
        config=config,
    )
    _write_state(cluster)  # from now on `down` can clean up whatever was started
    try:
        say("starting PostgreSQL")
        pg_port = free_port()
        _init_postgres(postgres_bin, pg_root, logs)
        components.append(_run_postgres(postgres_bin, pg_root, pg_port, logs, directory))
        database_url = f"postgresql+asyncpg://postgres@127.0.0.1:{pg_port}/prefect"
        cluster = _replace(cluster, database_url=database_url)
        _write_state(cluster)
        say("starting Redis")
        redis_port = free_port()
        components.append(_run_redis(redis_server, redis_port, logs, directory))
        redis_url = f"redis://127.0.0.1:{redis_port}/{_MESSAGING_DB}"
        cluster = _replace(
            cluster, redis_url=redis_url, locks_url=f"redis://127.0.0.1:{redis_port}/{_LOCKS_DB}"
        )
        _write_state(cluster)
        from prefect_pydantic_ai.store.redis_locks import trust_new_redis  # prefect-redis: checked above

        trust_new_redis(cluster.locks_url)  # started empty: its first locks wait out a lease from its start
        say("starting the Prefect server (a first boot migrates the database)")
        api_port = free_port()
        api_url = f"http://127.0.0.1:{api_port}/api"
        cluster = _replace(cluster, api_url=api_url)
        components.append(_run_prefect_server(cluster, logs))
        _write_state(cluster)
        _wait_for_server(cluster, components[-1])
        say(f"creating work pool {config.pool} and the crash automation")
        _prepare_server(api_url, config)
        own = _may_own_hostname()
        cluster = _replace(cluster, own_hostnames=own)
        for index in range(config.workers):
            name = f"host-{chr(ord('a') + index)}"
            say(f"starting worker {name}")
            components.append(_run_worker(name, cluster, logs))
            _write_state(cluster)
        if config.workers:
            _wait_for_workers(cluster, config.workers)
    except BaseException as exc:
        _write_state(cluster)
        cluster_down(directory, keep_logs=True)
        if isinstance(exc, ClusterError | KeyboardInterrupt):
            raise
        raise ClusterError(
            f"The cluster did not start ({type(exc).__name__}: {exc}); see the logs in {logs}."
        ) from exc
    _write_state(cluster)
    return cluster


def _replace(cluster: Cluster, **changes: Any) -> Cluster:
    values = {**asdict(cluster), **changes}
    values["components"] = cluster.components  # the same list: components started later are recorded too
    values["config"] = cluster.config
    return Cluster(**values)


def _binaries() -> tuple[Path, str]:
    """PostgreSQL's bin directory (`initdb` on PATH, else Debian's newest /usr/lib/postgresql/*/bin) and redis-server."""
    initdb = shutil.which("initdb")
    if initdb is None:
        found = sorted(glob.glob("/usr/lib/postgresql/*/bin/initdb"), key=_version_key)
        initdb = found[-1] if found else None
    if initdb is None:
        raise ClusterError(
            "PostgreSQL is not installed: install it (Debian: apt-get install postgresql) and retry."
        )
    redis_server = shutil.which("redis-server")
    if redis_server is None:
        raise ClusterError(
            "redis-server is not installed: install it (Debian: apt-get install redis-server)."
        )
    return Path(initdb).resolve().parent, redis_server  # the real directory: PATH may hold only symlinks


def _version_key(path: str) -> tuple[int, ...]:
    parts = Path(path).parts
    version = parts[-3] if len(parts) >= 3 else "0"
    return tuple(int(p) for p in version.split(".") if p.isdigit())


def _require_prefect_redis() -> None:
    try:
        import prefect_redis  # noqa: F401
    except ImportError:
        raise ClusterError(
            "The cluster needs prefect-redis: pip install 'prefect-pydantic-ai[redis]'."
        ) from None


def _base_env(directory: Path) -> dict[str, str]:
    return {
        **os.environ,
        CLUSTER_MARKER: str(directory),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }


def _spawn(
    name: str,
    command: list[str],
    logs: Path,
    env: Mapping[str, str],
    *,
    address: str,
    cwd: Path | None = None,
    hostname: str | None = None,
    preexec: Callable[[], None] | None = None,
    fds: tuple[int, ...] = (),
) -> Component:
    """Start `command` in a session of its own (our Ctrl-C does not reach it), its output to its log; `fds` are
    file descriptors it inherits."""
    log = logs / f"{name.replace(' ', '-')}.log"
    with log.open("ab") as out:
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=out,
            stderr=subprocess.STDOUT,
            env=dict(env),
            cwd=cwd,
            start_new_session=True,
            preexec_fn=preexec,
            pass_fds=fds,
        )
    _children.append(process)
    started = _start_time(process.pid)
    return Component(
        name=name, pid=process.pid, started=started or 0, address=address, log=str(log), hostname=hostname
    )


_children: list[subprocess.Popen[bytes]] = []  # kept so Python does not warn about running children


def _as_postgres() -> tuple[int, int] | None:
    """The uid and gid to run PostgreSQL as: the `postgres` user when we are root (it refuses root), else None."""
    if os.geteuid() != 0:
        return None
    import pwd

    try:
        user = pwd.getpwnam("postgres")
    except KeyError:
        raise ClusterError(
            "PostgreSQL refuses to run as root and there is no `postgres` user: create one "
            "(useradd --system postgres) or run as another user."
        ) from None
    return user.pw_uid, user.pw_gid


def _drop_to(ids: tuple[int, int] | None) -> Callable[[], None] | None:
    if ids is None:
        return None
    uid, gid = ids

    def drop() -> None:
        os.setgroups([])
        os.setgid(gid)
        os.setuid(uid)

    return drop


def _init_postgres(bin_dir: Path, root: Path, logs: Path) -> None:
    """A new PostgreSQL data directory in `root` (owned by the `postgres` user when we are root)."""
    ids = _as_postgres()
    data, sockets = root / "data", root / "run"
    data.mkdir()
    sockets.mkdir()
    if ids is not None:
        root.chmod(0o755)
        for path in (data, sockets):
            os.chown(path, *ids)
    initdb_log = logs / "initdb.log"
    with initdb_log.open("wb") as out:
        done = subprocess.run(
            [
                str(bin_dir / "initdb"),
                "-D",
                str(data),
                "-U",
                "postgres",
                "-A",
                "trust",
                "-E",
                "UTF8",
                "--no-sync",
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
            preexec_fn=_drop_to(ids),
            cwd=root,
        )
    if done.returncode != 0:
        raise ClusterError(f"initdb failed (exit {done.returncode}); see {initdb_log}.")


def _run_postgres(bin_dir: Path, root: Path, port: int, logs: Path, directory: Path) -> Component:
    """PostgreSQL on the data directory in `root`, once it answers and has the `prefect` database."""
    ids = _as_postgres()
    data, sockets = root / "data", root / "run"
    component = _spawn(
        "postgresql",
        [
            str(bin_dir / "postgres"),
            "-D",
            str(data),
            "-p",
            str(port),
            "-k",
            str(sockets),
            "-c",
            "listen_addresses=127.0.0.1",
            "-c",
            "max_connections=200",
        ],
        logs,
        _base_env(directory),
        address=f"127.0.0.1:{port}",
        cwd=root,
        preexec=_drop_to(ids),
    )

    def created() -> bool:
        result = subprocess.run(
            [str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "prefect"],
            capture_output=True,
            text=True,
        )
        return result.returncode == 0 or "already exists" in result.stderr

    _wait(created, component, "PostgreSQL", 60)
    return component


def _run_redis(redis_server: str, port: int, logs: Path, directory: Path) -> Component:
    """redis-server on `port`, without persistence (a restart starts it empty), once it answers PING."""
    data = directory / "redis"
    data.mkdir(exist_ok=True)
    command = [redis_server, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(data), "--save", ""]
    component = _spawn(
        "redis", [*command, "--appendonly", "no"], logs, _base_env(directory), address=f"127.0.0.1:{port}"
    )
    _wait(lambda: _redis_pong(port), component, "redis-server", 30)
    return component


def _redis_pong(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def server_env(database_url: str, redis_port: int) -> dict[str, str]:
    """The Prefect server's settings: PostgreSQL, and Redis wherever Prefect's self-hosted guide puts it."""
    return {
        "PREFECT_API_DATABASE_CONNECTION_URL": database_url,
        "PREFECT_MESSAGING_BROKER": "prefect_redis.messaging",
        "PREFECT_MESSAGING_CACHE": "prefect_redis.messaging",
        "PREFECT_SERVER_EVENTS_CAUSAL_ORDERING": "prefect_redis.ordering",
        "PREFECT_SERVER_CONCURRENCY_LEASE_STORAGE": "prefect_redis.lease_storage",
        "PREFECT_REDIS_MESSAGING_HOST": "127.0.0.1",
        "PREFECT_REDIS_MESSAGING_PORT": str(redis_port),
        "PREFECT_REDIS_MESSAGING_DB": str(_MESSAGING_DB),
        "PREFECT_SERVER_DOCKET_URL": f"redis://127.0.0.1:{redis_port}/{_DOCKET_DB}",
    }


def _run_prefect_server(cluster: Cluster, logs: Path) -> Component:
    """The Prefect server at the cluster's API address, on its database and Redis (`_wait_for_server`: until it
    answers). It takes over a socket listening on that address before it boots, as the local server does
    (`infra.server`): across `cluster restart server`, the runs' requests wait in its backlog for the boot instead
    of being refused until their retries run out."""
    directory = Path(cluster.directory)
    home = directory / "server-home"
    home.mkdir(exist_ok=True)
    url = cluster.api_url
    env = {
        **_base_env(directory),
        **server_env(cluster.database_url, _port(cluster.redis_url)),
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": url,
        "PREFECT_SERVER_UI_API_URL": url,
    }
    sock = listening_once_released(_port(url))  # a server just killed may hold the port for 40 ms and more
    if sock is None:
        raise ClusterError(f"Port {_port(url)} of the cluster's Prefect server is taken by another program.")
    with sock:  # the server has the socket now: this process lets go of its copy
        return _spawn(
            "prefect server",
            server_command(_port(url), fd=sock.fileno()),
            logs,
            env,
            address=url.removesuffix("/api"),
            cwd=home,
            fds=(sock.fileno(),),
        )


def _wait_for_server(cluster: Cluster, server: Component) -> None:
    _wait(lambda: _healthy(cluster.api_url), server, "the Prefect server", BOOT_TIMEOUT)


def _port(url: str) -> int:
    port = urllib.parse.urlsplit(url).port
    if port is None:
        raise ClusterError(f"The cluster's state names {url} without a port; start a new cluster.")
    return port


@contextlib.contextmanager
def using_api(url: str) -> Iterator[None]:
    """Point Prefect in this process at `url` for the duration (settings context and environment)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    before = os.environ.get("PREFECT_API_URL")
    os.environ["PREFECT_API_URL"] = url
    try:
        with temporary_settings(updates={PREFECT_API_URL: url}):
            yield
    finally:
        if before is None:
            os.environ.pop("PREFECT_API_URL", None)
        else:
            os.environ["PREFECT_API_URL"] = before


def process_pool(name: str, *, warm: bool = False) -> WorkPoolCreate:
    """A process work pool whose flow runs start as one interpreter, or forked from a warm one with `warm`.

    Without a command, Prefect's process worker starts each flow run as a workspace supervisor that imports
    Prefect, prepares the run's code and then execs the engine, which imports Prefect again: two interpreter
    starts of ~3 CPU-seconds each. The engine prepares a deployment's code itself (its pull steps), so the pool
    names the engine as the command; with `warm`, the launcher of `warm_start`, which forks the engine from the
    worker's warm interpreter when the worker was started through it (and is the engine otherwise).
    """
    from prefect.client.schemas.actions import WorkPoolCreate
    from prefect.workers.process import ProcessWorker

    command = warm_start.launch_command() if warm else [sys.executable, "-m", "prefect.engine"]
    template = ProcessWorker.get_default_base_job_template()
    template["variables"]["properties"]["command"]["default"] = shlex.join(command)
    return WorkPoolCreate(name=name, type="process", base_job_template=template)


def _prepare_server(api_url: str, config: ClusterConfig) -> None:
    """The work pool and the crash automation, on the new server."""
    import asyncio

    from prefect import get_client
    from prefect.exceptions import ObjectAlreadyExists

    from prefect_pydantic_ai.infra.automations import install_crash_automation

    async def prepare() -> None:
        async with get_client() as client:
            with contextlib.suppress(ObjectAlreadyExists):
                await client.create_work_pool(process_pool(config.pool, warm=True))
        await install_crash_automation(within=config.crash_within)

    with using_api(api_url):
        asyncio.run(prepare())


def _may_own_hostname() -> bool:
    """Whether a child can get a hostname of its own here (a UTS namespace needs root on Linux)."""
    return sys.platform == "linux" and os.geteuid() == 0


def _own_hostname(name: str) -> Callable[[], None]:
    def enter() -> None:
        """In the child before exec: a UTS namespace of its own (what `unshare --uts` does), named `name`."""
        import ctypes

        if ctypes.CDLL(None, use_errno=True).unshare(_CLONE_NEWUTS) != 0:
            raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWUTS)")
        socket.sethostname(name)

    return enter


def _run_worker(name: str, cluster: Cluster, logs: Path) -> Component:
    """Worker `name` as a machine of its own (its PREFECT_HOME, and its hostname when the cluster has them)."""
    config, own = cluster.config, cluster.own_hostnames
    host = Path(cluster.directory) / "hosts" / name
    home = host / "prefect-home"
    home.mkdir(parents=True, exist_ok=True)
    env = {
        **_base_env(Path(cluster.directory)),
        **cluster.client_env(),
        "PREFECT_HOME": str(home),
        "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(config.heartbeat_seconds),
        "PREFECT_WORKER_QUERY_SECONDS": f"{config.poll_seconds:g}",
        "PREFECT_WORKER_HEARTBEAT_SECONDS": "5",
        "PREFECT_PYDANTIC_AI_CLUSTER_WORKER": name,
    }
    command = [sys.executable, "-m", "prefect", "worker", "start", "--pool", cluster.pool]
    command += ["--type", "process", "--name", name]
    if warm_start.available():  # its flow runs fork from an interpreter that imported Prefect once
        command = [sys.executable, "-m", "prefect_pydantic_ai.infra.warm_start", "--", *command]
    if config.worker_limit is not None:
        command += ["--limit", str(config.worker_limit)]
    return _spawn(
        f"worker {name}",
        command,
        logs,
        env,
        address=f"pool {cluster.pool}",
        cwd=host,
        hostname=name if own else None,
        preexec=_own_hostname(name) if own else None,
    )


def _wait_for_workers(cluster: Cluster, count: int) -> None:
    """Until every worker has registered with the work pool (its first poll)."""
    import asyncio

    from prefect import get_client

    async def online() -> int:
        async with get_client() as client:
            workers = await client.read_workers_for_work_pool(cluster.pool)
        return len({w.name for w in workers} & {c.name.removeprefix("worker ") for c in cluster.workers})

    with using_api(cluster.api_url):
        deadline = time.monotonic() + BOOT_TIMEOUT
        while asyncio.run(online()) < count:
            for worker in cluster.workers:
                if not worker.alive():
                    raise ClusterError(f"Worker {worker.name} exited; see {worker.log}.")
            if time.monotonic() > deadline:
                raise ClusterError(
                    f"The workers did not reach pool {cluster.pool}; see the logs in {cluster.directory}."
                )
            time.sleep(0.5)


def _wait(ready: Callable[[], bool], component: Component, what: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not ready():
        if not component.alive():
            raise ClusterError(f"{what} exited while starting; see {component.log}.")
        if time.monotonic() > deadline:
            raise ClusterError(f"{what} did not answer within {timeout:g}s; see {component.log}.")
        time.sleep(0.2)


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
            return bool(response.status == 200)
    except (OSError, ValueError):
        return False


# -- restart ----------------------------------------------------------------------------------------------------

PARTS = ("postgresql", "redis", "server", "worker")
"""What `cluster restart` brings back: `worker` with a worker's name."""


def cluster_restart(
    directory: Path, part: str, name: str | None = None, timeout: float = 20.0
) -> tuple[Component, bool]:
    """Stop one part of the cluster in `directory` if it runs (PostgreSQL with its fast shutdown, the rest with
    SIGTERM, then SIGKILL after `timeout`) and start it again on the same port with the same data and settings,
    as if its machine restarted: PostgreSQL keeps its data, Redis comes back empty (no persistence). Records the
    new pid and returns the new component and whether the old one was still running."""
    cluster = cluster_status(directory)
    old = _part(cluster, part, name)
    stopped = old.alive()
    if stopped:
        _signal_all([old.pid], signal.SIGINT if old.name == "postgresql" else signal.SIGTERM)
        _wait_gone([old.pid], timeout)
    home, logs = Path(cluster.directory), Path(cluster.directory) / "logs"
    postgres_bin, redis_server = _binaries()
    if old.name == "postgresql":
        new = _run_postgres(
            postgres_bin, Path(cluster.postgres_data), _port(cluster.database_url), logs, home
        )
    elif old.name == "redis":
        new = _run_redis(redis_server, _port(cluster.redis_url), logs, home)
    elif old.name == "prefect server":
        new = _run_prefect_server(cluster, logs)
    else:
        new = _run_worker(old.name.removeprefix("worker "), cluster, logs)
    cluster.components[cluster.components.index(old)] = new
    _write_state(cluster)
    if new.name == "prefect server":
        _wait_for_server(cluster, new)
    return new, stopped


def _part(cluster: Cluster, part: str, name: str | None) -> Component:
    """The component `part` (and `name`, for a worker) names, or a `ClusterError` listing what there is."""
    workers = ", ".join(w.name.removeprefix("worker ") for w in cluster.workers) or "none"
    wanted = {"server": "prefect server", "worker": f"worker {name}"}.get(part, part)
    found = [c for c in cluster.components if c.name == wanted]
    if part not in PARTS or (name is not None) != (part == "worker") or not found:
        raise ClusterError(
            f"No part {' '.join(filter(None, (part, name)))!r} in the cluster in {cluster.directory}: restart "
            f"postgresql, redis, server or worker NAME (workers: {workers})."
        )
    return found[0]


# -- status and down --------------------------------------------------------------------------------------------


def read_cluster(directory: Path) -> Cluster | None:
    """The cluster recorded in `directory`, or None if there is none."""
    try:
        data = json.loads((directory / STATE_FILE).read_text())
        data["components"] = [Component(**c) for c in data["components"]]
        data["config"] = ClusterConfig(**data.get("config", {}))
        return Cluster(**data)
    except (OSError, ValueError, TypeError, KeyError):
        return None


def cluster_status(directory: Path) -> Cluster:
    """The recorded cluster of `directory` (its components' `alive()` tell which still run)."""
    cluster = read_cluster(directory.resolve())
    if cluster is None:
        raise ClusterError(f"No cluster in {directory.resolve()}; start one with `cluster up`.")
    return cluster


def cluster_down(directory: Path, timeout: float = 20.0, *, keep_logs: bool = False) -> list[Component]:
    """Stop every process of the cluster in `directory`, remove PostgreSQL's data and the directory (all but its
    logs with `keep_logs`, as a failed `up` does); returns the components that were still running. Workers (and the flow runs they started) go first, PostgreSQL last
    (SIGINT: its fast shutdown); anything left carrying the cluster's marker is then SIGKILLed. A worker gets
    `WORKER_GRACE` seconds: one whose server was restarted under it hangs in its shutdown (Prefect 3.9; it then
    stops only at `timeout`, 20 s), and its flow runs are already signalled."""
    directory = directory.resolve()
    cluster = read_cluster(directory)
    if cluster is None and not directory.exists():
        raise ClusterError(f"No cluster in {directory}; nothing to stop.")
    running = [c for c in (cluster.components if cluster else []) if c.alive()]
    order = ["worker", "prefect server", "redis", "postgresql"]
    for kind in order:
        group = [c for c in running if c.name.startswith(kind)]
        if kind == "worker":  # the flow runs they started, in sessions of their own, go with them
            pids = [p for p in marked_processes(directory) if not _is_infrastructure(p, running)]
            _signal_all(pids, signal.SIGTERM)
        sig = signal.SIGINT if kind == "postgresql" else signal.SIGTERM
        _signal_all([c.pid for c in group], sig)
        _wait_gone([c.pid for c in group], min(timeout, WORKER_GRACE) if kind == "worker" else timeout)
    leftovers = marked_processes(directory)
    _signal_all(leftovers, signal.SIGKILL)
    _wait_gone(leftovers, 5.0)
    if cluster is not None and cluster.postgres_data.startswith(tempfile.gettempdir()):
        shutil.rmtree(cluster.postgres_data, ignore_errors=True)
    if keep_logs:
        for path in directory.iterdir():
            if path.is_dir() and path.name != "logs":
                shutil.rmtree(path, ignore_errors=True)
            elif path.is_file():
                path.unlink(missing_ok=True)
    else:
        shutil.rmtree(directory, ignore_errors=True)
    return running


def _is_infrastructure(pid: int, running: list[Component]) -> bool:
    """Whether `pid` is the server, Redis or PostgreSQL (or one of PostgreSQL's backends), stopped in order."""
    infrastructure = {c.pid for c in running if not c.name.startswith("worker")}
    return pid in infrastructure or _parent(pid) in infrastructure


def marked_processes(directory: Path) -> list[int]:
    """Every live process (zombies excluded) whose environment carries `directory` as the cluster's marker."""
    return processes_with_env(f"{CLUSTER_MARKER}={directory}")


def processes_with_env(variable: str) -> list[int]:
    """Every live process but this one (zombies excluded) whose environment holds `variable` (`NAME=value`)."""
    marker = variable.encode()
    found = []
    for entry in Path("/proc").glob("[0-9]*"):
        pid = int(entry.name)
        if pid == os.getpid():
            continue
        try:
            environ = (entry / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if marker in environ and _start_time(pid) is not None:
            found.append(pid)
    return found


def _signal_all(pids: list[int], sig: signal.Signals) -> None:
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, sig)


def _wait_gone(pids: list[int], timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while True:
        alive = [p for p in pids if _start_time(p) is not None]
        if not alive:
            return
        if time.monotonic() > deadline:
            _signal_all(alive, signal.SIGKILL)
            deadline = time.monotonic() + 5.0
        time.sleep(0.1)


def _start_time(pid: int) -> int | None:
    """The start time of live process `pid` (None when it is gone or a zombie, which is reaped if it is ours)."""
    with contextlib.suppress(ChildProcessError, OSError):
        os.waitpid(pid, os.WNOHANG)
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()
    except OSError:
        return None
    return None if fields[0] in ("Z", "X") else int(fields[19])


def _parent(pid: int) -> int | None:
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rpartition(")")[2].split()[1])
    except (OSError, IndexError, ValueError):
        return None


def _write_state(cluster: Cluster) -> None:
    """Write atomically (temporary file + rename) so `status` never reads half a file."""
    directory = Path(cluster.directory)
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile(
        "w", dir=directory, prefix=".cluster-", suffix=".json", delete=False
    ) as f:
        json.dump(asdict(cluster), f, indent=2)
    os.replace(f.name, directory / STATE_FILE)
