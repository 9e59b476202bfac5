"""The Prefect server this process talks to: the configured one, else one persistent local server per PREFECT_HOME.

With no `PREFECT_API_URL` (environment or active Prefect profile), Prefect would boot a temporary server in every
process and throw it away, so each script and CLI command would pay ~15 s, a killed script would orphan it and the
UI would vanish with the run. Instead, `ensure_api()` starts Prefect's server once (`local_app`), detached (its own
session, its log in PREFECT_HOME), records its address in PREFECT_HOME, and every later process reuses it. An
exclusive lock on a file in PREFECT_HOME around "read the address, check health, start" makes concurrent first
processes agree on one server. `PREFECT_PYDANTIC_AI_LOCAL_SERVER=false` keeps Prefect's temporary-server behaviour.

The module imports no Prefect at the top, so a test session or the CLI can start a server before importing it.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import IO, Any

from prefect_pydantic_ai.prefect_settings import prefect_settings
from prefect_pydantic_ai.store.file_locks import process_alive

ADDRESS_FILE = "prefect-pydantic-ai-server.json"
LOCK_FILE = "prefect-pydantic-ai-server.lock"
LOG_FILE = "prefect-pydantic-ai-server.log"
PORT_FILE = "prefect-pydantic-ai-server.port"  # the port it listened on last time; kept by `server stop`
OPT_OUT = "PREFECT_PYDANTIC_AI_LOCAL_SERVER"
BOOT_TIMEOUT = 120.0  # a first boot migrates a new database; on 2 slow cores that can take a while
HEALTH_TIMEOUT = 1.0  # a live local server answers in milliseconds; a dead port fails at once


class LocalServerError(RuntimeError):
    """The local Prefect server could not be started or reached; the message names its log."""


# -- finding the API -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class ServerAddress:
    """Where the persistent local server of one PREFECT_HOME listens, as recorded in its address file."""

    url: str  # the API, http://127.0.0.1:<port>/api
    pid: int
    home: str
    log: str
    started: float  # time.time() when it was started

    @property
    def ui_url(self) -> str:
        return self.url.removesuffix("/api")


_resolved: tuple[str | None, bool] | None = None  # this process's answer (url, is it ours?), once found
_pending: Future[ServerAddress] | None = None  # the search for the local server, while it runs
_spawned: list[subprocess.Popen[bytes]] = []  # servers this process started (kept so Python does not warn)


def ensure_api() -> str | None:
    """The Prefect API URL this process uses, starting the persistent local server if nothing is configured.

    Returns the configured `PREFECT_API_URL` (nothing is started), the local server's URL (Prefect in this
    process is pointed at it, and child processes inherit it), or None when the local server is opted out
    (Prefect then starts its temporary server as usual). After the first call it returns a cached answer.
    """
    return start_api()()


def start_api() -> Callable[[], str | None]:
    """`ensure_api()` in two halves: finding or booting the server runs in a thread from now on, so the caller
    can import meanwhile; the returned function waits for it and returns what `ensure_api()` returns."""
    global _resolved
    if _resolved is not None:
        known = _resolved[0]
        return lambda: known
    configured = configured_api()
    if configured is not None or not local_server_enabled():
        _resolved = (configured, False)
        return lambda: configured
    global _pending
    if _pending is None:  # one search per process, however many callers wait for it
        pool = ThreadPoolExecutor(1, thread_name_prefix="prefect-pydantic-ai-server")
        _pending = pool.submit(find_or_start, prefect_home(), announce=True)
        pool.shutdown(wait=False)  # the thread ends when the server is found
    found = _pending

    def wait() -> str | None:
        url = found.result().url
        use_api(url)
        return url

    return wait


def use_api(url: str) -> None:
    """Point Prefect in this process (and every process it starts) at `url`, even if Prefect is imported already.

    Prefect reads its settings into a process-wide settings context when it is imported; setting the variable
    alone would reach child processes but not this one, so the global context is rebuilt from the environment.
    """
    global _resolved
    os.environ["PREFECT_API_URL"] = url
    context = sys.modules.get("prefect.context")
    if context is not None:
        context.refresh_global_settings_context()
    _resolved = (url, True)


def local_api() -> str | None:
    """The persistent local server's API URL if `ensure_api()` chose it for this process, else None."""
    return _resolved[0] if _resolved is not None and _resolved[1] else None


def cli_name() -> str:
    """How the user runs our CLI, for hints: `prefect-pydantic-ai`, or `python3 dev.py cli` from a clone."""
    return os.environ.get("PREFECT_PYDANTIC_AI_CLI") or "prefect-pydantic-ai"


def configured_api() -> str | None:
    """`PREFECT_API_URL` as the user configured it (environment, active profile, prefect.toml), or None."""
    return prefect_settings().api_url


def local_server_enabled() -> bool:
    """False when `PREFECT_PYDANTIC_AI_LOCAL_SERVER` opts out of the persistent local server."""
    from prefect_pydantic_ai.settings import Settings  # pydantic-settings: only when a server is looked for

    return Settings().local_server


def prefect_home() -> Path:
    """PREFECT_HOME as Prefect resolves it (default ~/.prefect)."""
    return prefect_settings().home


def run_url(flow_run_id: object) -> str | None:
    """The Prefect UI page of a flow run, or None when this process's API has no UI (a temporary server)."""
    ui = prefect_settings().ui_url
    return f"{ui.rstrip('/')}/runs/flow-run/{flow_run_id}" if ui else None


# -- the persistent server -------------------------------------------------------------------------------------


def running_server(home: Path) -> ServerAddress | None:
    """The recorded server of `home` if its process is alive and answers a health check, else None."""
    address = _read_address(home)
    if address is None or not _is_server_process(address.pid) or not _healthy(address.url):
        return None
    return address


def find_or_start(home: Path, *, announce: bool = False, restarted: bool = False) -> ServerAddress:
    """The running server of `home`, else a new one: started detached, recorded, and waited for until healthy.

    The lock makes this one decision across processes: whoever holds it either sees a healthy server or starts
    one, and everyone else waits for that answer. A recorded server whose process is gone is stale and replaced;
    one whose process is alive but not answering yet (its starter was killed while it booted) is waited for.
    """
    address = running_server(home)  # the common case, without taking the lock
    if address is not None:
        return address
    with _locked(home):
        address = _read_address(home)
        if address is not None and _is_server_process(address.pid):
            if _wait_healthy(address, None):
                return address
            _terminate(address.pid)  # alive but never healthy: replace it
        address = _spawn(home)
        progress = _Progress("Starting a local Prefect server") if announce or restarted else None
        if not _wait_healthy(address, progress):
            # Said apart: a server stopped while it still booted leaves its log empty (it logs warnings only).
            hung = _is_server_process(address.pid)
            _terminate(address.pid)
            _address_path(home).unlink(missing_ok=True)
            why = (
                f"did not answer within {BOOT_TIMEOUT:g} s and was stopped"
                if hung
                else "exited while starting"
            )
            raise LocalServerError(f"The local Prefect server {why}; see its log {address.log}.")
    if progress is not None:
        progress.done(
            f"prefect-pydantic-ai: the local Prefect server of {home} had died; started it again at {address.url}"
            if restarted
            else f"prefect-pydantic-ai: started a local Prefect server for {home}, UI at {address.ui_url} "
            f"(it keeps running for later runs; stop it with `{cli_name()} server stop`)."
        )
    return address


WATCH_INTERVAL_S = 1.0


@contextlib.contextmanager
def local_server_kept_up() -> Iterator[None]:
    """While the block runs (a bare agent run on the persistent local server), a server that died (killed, the OOM
    killer) is started again on its port, so the run's Prefect client reconnects and the run completes (its
    requests wait in the port's backlog while the new server boots, see `_listen_on_port`). A start that fails
    is said in one line and tried again while the run goes on. A server stopped on purpose (`server stop`
    removes its address) is left stopped. Outside the embedded default (a configured API) this does nothing."""
    if local_api() is None:
        yield
        return
    home = prefect_home()
    done = threading.Event()

    def watch() -> None:
        # The last start failed (and removed the address): try again, it was not a `server stop`.
        failed = False
        while not done.wait(WATCH_INTERVAL_S):
            address = _read_address(home)
            if (address is None and not failed) or (address is not None and _is_server_process(address.pid)):
                continue
            try:
                find_or_start(home, restarted=True)
                failed = False
            except (LocalServerError, OSError) as exc:
                failed = True
                print(f"prefect-pydantic-ai: {exc} Trying again.", file=sys.stderr, flush=True)

    watcher = threading.Thread(target=watch, name="prefect-pydantic-ai-server-watch", daemon=True)
    watcher.start()
    try:
        yield
    finally:
        done.set()
        watcher.join()


def stop_server(home: Path) -> ServerAddress | None:
    """Stop the recorded server of `home` and remove its address file; the address it had, or None if none ran."""
    with _locked(home):
        address = _read_address(home)
        _address_path(home).unlink(missing_ok=True)
        if address is None or not _is_server_process(address.pid):
            return None
        _terminate(address.pid)
        return address


def home_port(home: Path) -> int:
    """The port the first local server of `home` tries: one per PREFECT_HOME (4300-4999, from its path), clear
    of Prefect's own 4200."""
    digest = hashlib.sha256(str(home.resolve()).encode()).digest()
    return 4300 + int.from_bytes(digest[:4], "big") % 700


def _listen_on_port(home: Path) -> socket.socket:
    """A socket listening on the port the last server of `home` had, else `home_port`, else any free one, for the
    server to take over; the port is remembered, so the URL in a shell (`server env`), a bookmark of the UI or a
    printed hint stays valid across restarts.

    Listening here, before the server boots, is what makes a restart invisible to the clients of the server that
    died: from now on their connections wait in the socket's backlog, and the new server answers them once it is
    up, instead of each being refused at once and its retries running out while the server boots (10-15 CPU-s;
    on a loaded 2-core box that took longer than the ~62 s Prefect's client retries a refused connection)."""
    try:
        last = int((home / PORT_FILE).read_text())
    except (OSError, ValueError):
        sock = listening_socket(home_port(home))
    else:
        sock = listening_once_released(last) or (
            listening_socket(home_port(home)) if home_port(home) != last else None
        )
    sock = sock or listening_socket(0)
    if sock is None:
        raise LocalServerError("No TCP port on 127.0.0.1 is free for the local Prefect server.")
    (home / PORT_FILE).write_text(str(sock.getsockname()[1]))
    return sock


PORT_RELEASE_S = 5.0


def listening_once_released(port: int) -> socket.socket | None:
    """A socket listening on `port`, which the last server had, once the port is free; None if it is still taken
    after `PORT_RELEASE_S`. A killed server's listening socket outlives the process by 40 ms and more
    (the kernel closes it after the process is reaped): taken for another program's, the server moved to a new
    port, and the run whose server it was kept asking the old one until its retries ran out."""
    deadline = time.monotonic() + PORT_RELEASE_S
    while (sock := listening_socket(port)) is None and time.monotonic() < deadline:
        time.sleep(0.02)
    return sock


LISTEN_BACKLOG = 2048  # uvicorn's own default: every request of a busy run waits, none is refused


def listening_socket(port: int) -> socket.socket | None:
    """A socket listening on 127.0.0.1:`port` (0: a free port), or None when something else listens there.
    Connections of a stopped server lingering in TIME_WAIT do not count: SO_REUSEADDR, as uvicorn sets it."""
    sock = socket.socket()
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
        sock.listen(LISTEN_BACKLOG)
    except OSError:
        sock.close()
        return None
    return sock


def _spawn(home: Path) -> ServerAddress:
    sock = _listen_on_port(home)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}/api"
    log_path = home / LOG_FILE
    env = {
        **os.environ,
        "PREFECT_HOME": str(home),
        "PREFECT_API_URL": url,
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    with sock, log_path.open("ab") as log:  # the server has the socket now: this process lets go of its copy
        process = subprocess.Popen(
            server_command(sock.getsockname()[1], fd=sock.fileno()),
            pass_fds=(sock.fileno(),),
            stdin=subprocess.DEVNULL,
            stdout=log,
            stderr=subprocess.STDOUT,
            env=env,
            cwd=home,
            start_new_session=True,  # not in our process group: our Ctrl-C or SIGKILL does not reach it
        )
    _spawned.append(process)
    address = ServerAddress(url=url, pid=process.pid, home=str(home), log=str(log_path), started=time.time())
    _write_address(home, address)
    return address


def _wait_healthy(address: ServerAddress, progress: _Progress | None) -> bool:
    deadline = time.monotonic() + BOOT_TIMEOUT
    while time.monotonic() < deadline:
        if _healthy(address.url):
            return True
        if not _is_server_process(address.pid):
            return False
        if progress is not None:
            progress.tick()
        time.sleep(0.25)
    return False


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=HEALTH_TIMEOUT) as response:
            return bool(response.status == 200)
    except (OSError, ValueError):
        return False


def _is_server_process(pid: int) -> bool:
    """Whether `pid` is alive and (where /proc tells) a Prefect server, not a process that reused the pid."""
    if not process_alive(pid):
        return False
    with contextlib.suppress(OSError):
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rpartition(")")[2].split()[0] == "Z":  # a zombie of ours, not yet reaped
                return False
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
        ours = SERVER_MODULE.encode() in cmdline[1:3]
        return ours or (
            b"prefect" in cmdline[1:3] and b"server" in cmdline
        )  # or one an earlier version started
    return True


def _terminate(pid: int, timeout: float = 15.0) -> None:
    """SIGTERM the server (it shuts down its services cleanly), SIGKILL it if it is still there after `timeout`."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with contextlib.suppress(ChildProcessError):  # reap it if it is our own child
            os.waitpid(pid, os.WNOHANG)
        if not _is_server_process(pid):
            return
        time.sleep(0.1)
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


def _address_path(home: Path) -> Path:
    return home / ADDRESS_FILE


def _read_address(home: Path) -> ServerAddress | None:
    try:
        return ServerAddress(**json.loads(_address_path(home).read_text()))
    except (OSError, ValueError, TypeError):
        return None


def _write_address(home: Path, address: ServerAddress) -> None:
    """Write atomically (temporary file + rename) so a reader never sees half a file."""
    with tempfile.NamedTemporaryFile("w", dir=home, prefix=".server-", suffix=".json", delete=False) as f:
        json.dump(asdict(address), f)
    os.replace(f.name, _address_path(home))


@contextlib.contextmanager
def _locked(home: Path) -> Iterator[None]:
    """Hold the exclusive lock of `home`'s server (released by the kernel if this process dies)."""
    home.mkdir(parents=True, exist_ok=True)
    with (home / LOCK_FILE).open("a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            waiting = _Progress("Waiting for another process starting the local Prefect server")
            waiting.tick()
            fcntl.flock(lock, fcntl.LOCK_EX)
            waiting.clear()
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


class _Progress:
    """Elapsed seconds of a wait, redrawn in place on a terminal's stderr (nothing when stderr is not a terminal)."""

    def __init__(self, what: str, stream: IO[str] | None = None) -> None:
        self.what = what
        self.stream = stream or sys.stderr
        self.start = time.monotonic()
        self.live = self.stream.isatty()

    def tick(self) -> None:
        if self.live:
            self.stream.write(f"\r{self.what} ... {time.monotonic() - self.start:.0f}s")
            self.stream.flush()

    def clear(self) -> None:
        if self.live:
            self.stream.write("\r\033[K")
            self.stream.flush()

    def done(self, line: str) -> None:
        prefix = "\r\033[K" if self.live else ""
        self.stream.write(f"{prefix}{line}\n")
        self.stream.flush()


# -- a temporary server (tests, benchmarks, the demo against a given port) --------------------------------------


# Prefect's client keeps an idle connection up to 25 s (`keepalive_expiry` in `PrefectClient`), and uvicorn closes
# one after 5 s by default: a request sent on a connection the server is closing fails with a transport error that
# the client retries after a back-off. A server keeping connections longer than the client never races it.
KEEP_ALIVE_SECONDS = 30


SERVER_MODULE = "prefect_pydantic_ai.infra.local_app"


def server_command(port: int, fd: int | None = None) -> list[str]:
    """Prefect's server (as `prefect server start` runs it, with busy-database retries: `local_app`) on
    127.0.0.1:`port`, keeping idle connections longer than Prefect's client does; `fd`: on the listening socket
    it inherits as that file descriptor, instead of binding the port itself."""
    return [
        *(sys.executable, "-m", SERVER_MODULE),
        *("--host", "127.0.0.1", "--port", str(port), "--keep-alive-timeout", str(KEEP_ALIVE_SECONDS)),
        *(() if fd is None else ("--fd", str(fd))),
    ]


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LocalServer:
    """A temporary Prefect server on a free loopback port, a child of this process, started with nothing but the
    standard library so it boots while this process imports Prefect."""

    def __init__(self, port: int | None = None, env: Mapping[str, str] | None = None) -> None:
        """Start the server on `port` (a free one by default), with `env` (default: this process's environment)."""
        port = port or free_port()
        self.url = f"http://127.0.0.1:{port}/api"
        self.log = tempfile.NamedTemporaryFile(prefix="prefect-server-", suffix=".log", delete=False)  # noqa: SIM115
        self.process = subprocess.Popen(
            server_command(port),
            stdout=self.log,
            stderr=subprocess.STDOUT,
            env={
                **(os.environ if env is None else env),
                "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                "PREFECT_API_URL": self.url,
            },
        )

    def wait_until_ready(self, timeout: float = BOOT_TIMEOUT) -> None:
        """Return once the server answers; a server that did not within `timeout` is stopped, not left behind."""
        deadline = time.monotonic() + timeout
        while not _healthy(self.url):
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.stop(keep_log=True)
                raise LocalServerError(
                    f"The local Prefect server did not start within {timeout:g}s; see {self.log.name}."
                )
            time.sleep(0.2)

    def stop(self, *, keep_log: bool = False) -> None:
        """Stop the server; its log is removed unless `keep_log` (a failed start names it in its error)."""
        self.process.terminate()
        try:
            self.process.wait(timeout=5)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()
        self.log.close()
        if not keep_log:
            Path(self.log.name).unlink(missing_ok=True)


@contextlib.contextmanager
def prefect_api(server: LocalServer | None) -> Iterator[str]:
    """The configured Prefect API, or `server` once it is ready (its URL is then set for this process too)."""
    from prefect.settings import PREFECT_API_URL, temporary_settings

    if server is None:
        yield str(PREFECT_API_URL.value())
        return
    try:
        server.wait_until_ready()
        os.environ["PREFECT_API_URL"] = server.url
        with temporary_settings(updates={PREFECT_API_URL: server.url}):
            try:
                yield server.url
            finally:
                _flush_logs()
    finally:
        os.environ.pop("PREFECT_API_URL", None)
        server.stop()


def _flush_logs() -> None:
    """Send queued run logs to the API now, while the server is still there to receive them."""
    from prefect.logging.handlers import APILogHandler

    asyncio.run(APILogHandler.aflush())


def status_json(address: ServerAddress | None, home: Path) -> dict[str, Any]:
    """The documented `server status --json` document."""
    if address is None:
        return {
            "running": False,
            "url": None,
            "ui_url": None,
            "pid": None,
            "prefect_home": str(home),
            "log": None,
        }
    return {
        "running": True,
        "url": address.url,
        "ui_url": address.ui_url,
        "pid": address.pid,
        "prefect_home": str(home),
        "log": address.log,
    }
