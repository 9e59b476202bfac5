"""The embedded default: with no Prefect API configured, every process shares one persistent local server.

Each test gets its own PREFECT_HOME and runs real processes with PREFECT_API_URL removed from their environment.
Processes are counted by what their environment or command line points at (that PREFECT_HOME), so a server
left behind is seen; every test stops the servers it started, and one still alive afterwards fails the test.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from prefect_pydantic_ai.infra.server import ADDRESS_FILE, KEEP_ALIVE_SECONDS

pytestmark = pytest.mark.slow

FIVE_STEP = Path(__file__).parent / "scripts" / "five_step.py"
TWO_AGENTS = Path(__file__).parent / "scripts" / "two_agents_flow.py"
SLOW_TOOL = Path(__file__).parent / "scripts" / "slow_tool.py"
ENSURE_API = "from prefect_pydantic_ai.infra.server import ensure_api; print('API', ensure_api())"
STARTED_LINE = "started a local Prefect server"
TIMEOUT = 180  # a hang fails the test instead of stalling the suite


@dataclass
class Home:
    """A private PREFECT_HOME and the environment of a process that has no Prefect API configured."""

    path: Path
    env: dict[str, str]

    def run(self, *args: str, extra: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [sys.executable, *args],
            env={**self.env, **(extra or {})},
            capture_output=True,
            text=True,
            timeout=TIMEOUT,
        )

    def cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        return self.run("-m", "prefect_pydantic_ai", *args)

    def five_step(self, key: str, **extra: str) -> subprocess.CompletedProcess[str]:
        return self.run(
            str(FIVE_STEP), key, extra={"FIVE_STEP_LOG": str(self.path.parent / "calls.log"), **extra}
        )

    def recorded(self) -> dict[str, object] | None:
        address = self.path / ADDRESS_FILE
        return json.loads(address.read_text()) if address.exists() else None

    def processes(self) -> list[int]:
        """Live processes whose environment or command line names this PREFECT_HOME."""
        needle = str(self.path).encode()
        found = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == os.getpid():
                continue
            try:
                environ = (entry / "environ").read_bytes().split(b"\0")
                cmdline = (entry / "cmdline").read_bytes()
                zombie = (entry / "stat").read_text().rpartition(")")[2].split()[0] == "Z"
            except (OSError, IndexError):
                continue
            if not zombie and (b"PREFECT_HOME=" + needle in environ or needle in cmdline):
                found.append(int(entry.name))
        return found


@pytest.fixture
def home(tmp_path: Path, migrated_database: Path) -> Iterator[Home]:
    """A fresh PREFECT_HOME (with a migrated, empty database); afterwards, no process may point at it."""
    env = {k: v for k, v in os.environ.items() if k not in _SESSION_API}
    env.update(
        {
            "PREFECT_HOME": str(tmp_path / "prefect-home"),
            "PREFECT_LOCAL_STORAGE_PATH": str(tmp_path / "storage"),
            "PYTHONPATH": os.pathsep.join(
                [str(Path(__file__).parents[1] / "src"), env.get("PYTHONPATH", "")]
            ),
        }
    )
    private = Home(tmp_path / "prefect-home", env)
    private.path.mkdir()
    shutil.copyfile(migrated_database, private.path / "prefect.db")
    yield private
    leaked = private.processes()
    for pid in leaked:
        os.kill(pid, signal.SIGKILL)
    assert leaked == [], f"processes left running for {private.path}: {leaked}"


_SESSION_API = {"PREFECT_API_URL", "PREFECT_UI_API_URL", "PREFECT_SERVER_UI_API_URL"}


def _output(result: subprocess.CompletedProcess[str]) -> dict[str, object]:
    assert result.returncode == 0, result.stderr[-3000:]
    line = next(line for line in result.stdout.splitlines() if line.startswith("OUTPUT "))
    return dict(json.loads(line.removeprefix("OUTPUT ")))


def _api(result: subprocess.CompletedProcess[str]) -> str:
    assert result.returncode == 0, result.stderr[-3000:]
    return next(line for line in result.stdout.splitlines() if line.startswith("API ")).removeprefix("API ")


def _stop(home: Home) -> None:
    stopped = home.cli("server", "stop")
    assert stopped.returncode == 0, stopped.stderr
    assert home.processes() == []
    assert home.recorded() is None


def test_killed_script_leaves_only_the_persistent_server_which_the_next_run_reuses(home: Home) -> None:
    killed = home.five_step("q4", FIVE_STEP_KILL_BEFORE="3")
    assert killed.returncode == -signal.SIGKILL
    assert killed.stderr.count(STARTED_LINE) == 1 and "server stop" in killed.stderr
    recorded = home.recorded()
    assert recorded is not None
    assert home.processes() == [recorded["pid"]]  # the server, and no temporary one orphaned by the kill

    resumed = home.five_step("q4")
    assert _output(resumed)["output"] == "mean=326.25 anomalies=[1000.0]"
    assert STARTED_LINE not in resumed.stderr  # later processes are silent
    assert home.recorded() == recorded
    assert home.processes() == [recorded["pid"]]

    status = json.loads(home.cli("server", "status", "--json").stdout)
    assert (status["running"], status["pid"], status["url"]) == (True, recorded["pid"], recorded["url"])
    _stop(home)


def test_a_users_own_flow_in_a_fresh_home_runs_on_the_persistent_server_from_its_first_process(
    home: Home,
) -> None:
    """The seed's pattern 2: two agents inside the user's own `@flow`, nothing configured, no server running yet.
    Importing `PrefectAgent` finds or starts the persistent server before the flow begins, so Prefect never
    boots its temporary server for the flow (which timed out on this machine) and the run stays visible."""
    script = home.path.parent / "pattern2.py"
    script.write_text(
        "import asyncio, json, sys\n"
        f"sys.path.insert(0, {str(TWO_AGENTS.parent)!r})\n"
        "from prefect import flow\n"
        "from two_agents_flow import research_agent, summary_agent\n\n"
        "@flow(retries=1)\n"
        "async def research_and_summarize(topic: str) -> dict[str, str]:\n"
        "    findings = await research_agent.run(f'Research {topic}')\n"
        "    summaries = await summary_agent.run('Summarize', deps=findings.output)\n"
        "    return dict(summaries.output.model_dump())\n\n"
        "print('OUTPUT ' + json.dumps({'output': asyncio.run(research_and_summarize('durability'))}))\n"
    )
    first = home.run(str(script), extra={"TWO_AGENTS_LOG": str(home.path.parent / "calls.log")})
    assert "NEVER PAY TWICE" in _output(first)["output"]["executive"]
    assert first.stderr.count(STARTED_LINE) == 1, first.stderr
    assert "temporary" not in first.stderr.lower() and "ephemeral" not in first.stderr.lower(), first.stderr
    recorded = home.recorded()
    assert recorded is not None
    assert home.processes() == [recorded["pid"]]  # the persistent server alone: no temporary one was booted
    listed = json.loads(home.cli("runs", "--agent", "summarizer", "--json").stdout)
    assert [run["state"] for run in listed] == ["completed"]  # on the server later commands talk to
    _stop(home)


def test_server_env_points_prefects_own_cli_at_the_local_server_whose_port_survives_a_restart(
    home: Home,
) -> None:
    from prefect_pydantic_ai.infra.server import home_port, listening_socket

    port = home_port(home.path)
    held = listening_socket(port)  # None: another home's server holds it (ports come from the home's path)
    free = held is not None
    if held is not None:
        held.close()
    assert home.five_step("before-env").returncode == 0
    exported = home.cli("server", "env")
    assert exported.returncode == 0, exported.stderr
    recorded = home.recorded()
    assert recorded is not None
    assert recorded["url"] == f"http://127.0.0.1:{port}/api" or not free
    assert exported.stdout == f"export PREFECT_API_URL={recorded['url']}\n"

    # Prefect's own CLI, given that line, lists the run on the same server instead of booting a temporary one.
    listed = home.run(
        "-m", "prefect", "flow-run", "ls", extra={"PREFECT_API_URL": recorded["url"], "COLUMNS": "300"}
    )
    assert listed.returncode == 0, listed.stderr
    assert "five_step" in listed.stdout and "COMPLETED" in listed.stdout, listed.stdout
    assert home.processes() == [recorded["pid"]]

    _stop(home)
    started = home.cli("server", "start", "--json")
    assert json.loads(started.stdout)["url"] == recorded["url"]  # the same address after a restart
    _stop(home)


def test_two_processes_starting_at_once_share_one_server(home: Home) -> None:
    starters = [
        subprocess.Popen(
            [sys.executable, "-c", ENSURE_API],
            env=home.env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(2)
    ]
    results = []
    for process in starters:
        out, err = process.communicate(timeout=TIMEOUT)
        results.append(subprocess.CompletedProcess(process.args, process.returncode, out, err))
    urls = {_api(result) for result in results}
    recorded = home.recorded()
    assert recorded is not None and urls == {recorded["url"]}
    assert sum(result.stderr.count(STARTED_LINE) for result in results) == 1
    assert home.processes() == [recorded["pid"]]
    _stop(home)


def test_a_run_after_server_stop_starts_it_again(home: Home) -> None:
    assert _output(home.five_step("first"))["usage"] == [3, 172, 29, 2]
    first = home.recorded()
    assert first is not None
    _stop(home)
    assert json.loads(home.cli("server", "status", "--json").stdout)["running"] is False

    again = home.five_step("second")
    _output(again)
    assert again.stderr.count(STARTED_LINE) == 1
    second = home.recorded()
    assert second is not None and second["pid"] != first["pid"]
    assert home.processes() == [second["pid"]]
    _stop(home)


def test_stale_address_of_a_killed_server_is_detected_and_the_server_restarted(home: Home) -> None:
    started = home.cli("server", "start", "--json")
    assert started.returncode == 0, started.stderr
    killed = json.loads(started.stdout)
    os.kill(killed["pid"], signal.SIGKILL)
    assert home.recorded() is not None  # the address file now points at a dead server

    status = json.loads(home.cli("server", "status", "--json").stdout)
    assert status["running"] is False

    listed = home.cli("runs", "--json")  # a CLI command needs the API: it replaces the dead server
    assert listed.returncode == 0, listed.stderr
    assert json.loads(listed.stdout) == []
    assert listed.stderr.count(STARTED_LINE) == 1
    restarted = home.recorded()
    assert restarted is not None and restarted["pid"] != killed["pid"]
    assert _api(home.run("-c", ENSURE_API)) == restarted["url"]
    assert home.processes() == [restarted["pid"]]
    _stop(home)


def test_a_request_sent_the_moment_a_server_is_started_waits_for_its_boot_instead_of_being_refused(
    home: Home,
) -> None:
    """The port listens before the server boots (the starter binds it and hands the socket over): a client that
    asks at once, as a run does while the server it lost is started again, is answered with no retry."""
    from prefect_pydantic_ai.infra.server import _spawn, stop_server

    address = _spawn(home.path)  # what `find_or_start` does with the lock held, without waiting for health
    try:
        sent = time.monotonic()
        with urllib.request.urlopen(f"{address.url}/health", timeout=TIMEOUT) as response:  # no ECONNREFUSED
            assert response.status == 200
        assert time.monotonic() - sent > 1.0  # it was sent during the boot, not after
    finally:
        stop_server(home.path)
    assert home.processes() == []


def test_a_restart_waits_for_the_killed_servers_port_instead_of_moving_to_another() -> None:
    """A killed server's listening socket outlives its process by tens of milliseconds: the new server waits
    for the port its clients know rather than taking a new one they never ask."""
    from concurrent.futures import ThreadPoolExecutor

    from prefect_pydantic_ai.infra.server import listening_once_released, listening_socket

    dying = listening_socket(0)
    assert dying is not None
    port = dying.getsockname()[1]
    with ThreadPoolExecutor(1) as pool:
        taken = pool.submit(listening_once_released, port)
        time.sleep(0.3)
        assert not taken.done()  # still waiting for the port
        dying.close()  # the kernel lets go of the dead server's socket
        sock = taken.result(timeout=5)
    assert sock is not None and sock.getsockname()[1] == port
    sock.close()


def test_a_server_that_cannot_start_is_one_line_naming_its_log(home: Home) -> None:
    (home.path / "prefect.db").write_text("not a database")  # its migrations fail at start-up
    started = home.cli("server", "start")
    log = home.path / "prefect-pydantic-ai-server.log"
    assert started.returncode == 2
    assert started.stderr == f"error: The local Prefect server exited while starting; see its log {log}.\n"
    assert "Application startup failed" in log.read_text()  # where the line sends the reader: the cause
    assert home.processes() == [] and home.recorded() is None


def test_a_failed_restart_is_said_in_one_line_and_tried_again_while_the_run_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    from prefect_pydantic_ai.infra import server

    address = {
        "url": "http://127.0.0.1:9/api",
        "pid": 2**22 + 1,
        "home": str(tmp_path),
        "log": "l",
        "started": 0,
    }
    (tmp_path / ADDRESS_FILE).write_text(json.dumps(address))  # a server that died
    starts: list[float] = []

    def find_or_start(home: Path, *, restarted: bool = False) -> None:
        assert home == tmp_path and restarted
        starts.append(time.monotonic())
        (tmp_path / ADDRESS_FILE).unlink(missing_ok=True)  # a failed start removes it; then a `server stop`
        if len(starts) == 1:
            raise server.LocalServerError(
                f"The local Prefect server did not start; see its log {tmp_path}/log."
            )

    monkeypatch.setattr(server, "_resolved", ("http://127.0.0.1:9/api", True))
    monkeypatch.setattr(server, "prefect_home", lambda: tmp_path)
    monkeypatch.setattr(server, "find_or_start", find_or_start)
    monkeypatch.setattr(server, "WATCH_INTERVAL_S", 0.05)
    with server.local_server_kept_up():
        deadline = time.monotonic() + 10
        while len(starts) < 2 and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(0.3)  # no third start: the address is gone and the last start did not fail
    assert len(starts) == 2
    assert capsys.readouterr().err == (
        f"prefect-pydantic-ai: The local Prefect server did not start; see its log {tmp_path}/log. Trying again.\n"
    )


def test_a_local_server_killed_during_a_run_is_started_again_and_the_run_completes_each_step_once(
    home: Home,
) -> None:
    started = home.cli("server", "start", "--json")
    assert started.returncode == 0, started.stderr
    killed = json.loads(started.stdout)
    calls, go = home.path.parent / "calls.log", home.path.parent / "go"
    # Prefect's default client retries: the server is started again on the port the run asks (once the dead
    # server's socket is gone), listening before its boot of 10-15 CPU-s, so the run's requests wait in the
    # backlog (each up to the client's 60 s request timeout) instead of being refused until the retries run out.
    script = subprocess.Popen(
        [sys.executable, str(SLOW_TOOL), "killed-server"],
        env={**home.env, "SLOW_TOOL_LOG": str(calls), "SLOW_TOOL_WAIT_FOR": str(go)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert script.stdout is not None and script.stdout.readline() == "WAITING\n"  # inside the tool
        os.kill(killed["pid"], signal.SIGKILL)  # as the OOM killer would
        go.touch()
        out, err = script.communicate(timeout=TIMEOUT)
    finally:
        script.kill()
        script.wait()
    assert script.returncode == 0, err[-3000:]
    assert out.splitlines()[-1] == "OUTPUT found it"
    assert calls.read_text().split() == ["model", "lookup", "model"]  # nothing ran twice
    assert err.count("had died; started it again at " + killed["url"]) == 1
    restarted = home.recorded()
    assert restarted is not None and restarted["pid"] != killed["pid"] and restarted["url"] == killed["url"]
    _stop(home)


def test_a_configured_api_url_is_used_and_nothing_is_started(home: Home, prefect_server: str) -> None:
    by_env = home.five_step("by-env", PREFECT_API_URL=prefect_server)
    assert _output(by_env)["usage"] == [3, 172, 29, 2]

    home.path.mkdir(parents=True, exist_ok=True)  # a Prefect profile naming the server also counts
    (home.path / "profiles.toml").write_text(
        f'active = "remote"\n\n[profiles.remote]\nPREFECT_API_URL = "{prefect_server}"\n'
    )
    assert _api(home.run("-c", ENSURE_API)) == prefect_server
    assert STARTED_LINE not in by_env.stderr
    assert home.recorded() is None
    assert home.processes() == []


def test_opting_out_keeps_prefects_temporary_server_behaviour(home: Home) -> None:
    assert home.cli("runs", "--help").returncode == 0  # help needs no server
    assert home.recorded() is None
    opted_out = home.run("-c", ENSURE_API, extra={"PREFECT_PYDANTIC_AI_LOCAL_SERVER": "false"})
    assert _api(opted_out) == "None"
    assert home.recorded() is None
    assert home.processes() == []


def test_an_idle_connection_outlives_uvicorns_default_keep_alive(prefect_server: str) -> None:
    """Every server we start keeps an idle connection longer than Prefect's client keeps one (25 s). Under uvicorn's
    default (5 s), a request sent just as the server closed the connection failed with `ReadError` or
    `RemoteProtocolError` and was retried after a back-off: seen once in the 50-run cluster test."""
    assert KEEP_ALIVE_SECONDS > 25
    host, port = prefect_server.removeprefix("http://").removesuffix("/api").split(":")
    with socket.create_connection((host, int(port)), timeout=30) as connection:
        assert _health(connection, host) == b"true"
        time.sleep(6)  # past uvicorn's default keep-alive, which would close the connection here
        assert _health(connection, host) == b"true"


def _health(connection: socket.socket, host: str) -> bytes:
    """GET /api/health on an open keep-alive connection; the response body (the connection stays open)."""
    connection.sendall(f"GET /api/health HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
    received = b""
    while b"\r\n\r\n" not in received:
        chunk = connection.recv(65536)
        assert chunk, f"the server closed the connection: {received!r}"
        received += chunk
    head, _, body = received.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200"), head
    length = next(
        int(line.split(b":")[1])
        for line in head.lower().split(b"\r\n")
        if line.startswith(b"content-length:")
    )
    while len(body) < length:
        body += connection.recv(65536)
    return body


def test_a_temporary_server_that_does_not_answer_in_time_is_stopped_not_left_behind() -> None:
    from prefect_pydantic_ai.infra.server import LocalServer, LocalServerError

    server = LocalServer()
    with pytest.raises(LocalServerError, match=r"did not start within 0\.5s; see "):
        server.wait_until_ready(timeout=0.5)  # booting takes seconds
    assert server.process.poll() is not None
    log = Path(server.log.name)
    assert log.exists()  # named in the error, so it stays
    server.stop()  # a server stopped as usual leaves no log behind in the temporary directory
    assert not log.exists()


def test_ctrl_c_in_a_terminal_is_one_line_and_exit_code_130_from_dev_py(home: Home) -> None:
    """Ctrl-C typed into a real terminal (a pty) while `python3 dev.py cli server start` waits for the server:
    dev.py and the command both get SIGINT; the command says so in one line, dev.py adds no traceback."""
    from tests.terminal import ctrl_c_when

    argv = [sys.executable, "dev.py", "cli", "server", "start"]
    code, text, interrupted = ctrl_c_when(
        argv, home.env, Path(__file__).parents[1], b"Starting a local Prefect"
    )
    assert interrupted, text
    assert code == 130, text
    assert "Traceback" not in text and "KeyboardInterrupt" not in text, text
    assert text.rstrip().splitlines()[-1] == (
        "Interrupted. An agent run it was in ends cancelled; `python3 dev.py cli resume RUN` continues it."
    ), text
    _stop(home)  # the server it had started keeps booting in its own session: stopped here
