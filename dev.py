#!/usr/bin/env python3
"""One entry point for a fresh clone: `python3 dev.py demo` runs the demo, `python3 dev.py test` the tests.

It needs only Python >= 3.11. On first use it creates `.venv/` beside this file and installs the project into it,
editable: `demo` and `cli` need only the project itself, `test`, `check` and `bench` also its `dev` extra. Later
runs reuse it and reinstall only when `pyproject.toml` changes or a command needs the extra. Installs go through
`uv` (seconds instead of a minute or more), reading the package indexes from this machine's pip configuration;
when uv cannot be used, pip does the install. Any other arguments are passed on: `python3 dev.py demo --kill`,
`python3 dev.py test -k resume`, `python3 dev.py cli runs --json`, `python3 dev.py bench`.
`python3 dev.py test-lowest -m 'not slow'` runs the tests on the lowest versions pyproject.toml allows of
pydantic-ai-slim, prefect and typer, in `.venv-lowest/` (installed the same way; `test` gets the highest).
`python3 dev.py cluster up|status|env|down` is `prefect-pydantic-ai cluster ...`: PostgreSQL, Redis, a Prefect
server and two workers on this machine, its state in `.cluster/` of the clone (docs/scale-out.md).
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import subprocess
import sys
import time
import venv
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Env:
    """A virtual environment the project is installed into, editable; `pins` are installed with it."""

    path: Path
    pins: tuple[str, ...] = ()

    @property
    def bin(self) -> Path:
        return self.path / ("Scripts" if os.name == "nt" else "bin")

    @property
    def python(self) -> Path:
        return self.bin / ("python.exe" if os.name == "nt" else "python")

    @property
    def stamp(self) -> Path:
        return self.path / ".installed-from"

    @property
    def log(self) -> Path:
        return self.path / "install.log"


VENV = Env(ROOT / ".venv")
BIN = VENV.bin
PYTHON = VENV.python
# The cluster needs prefect-redis (in the extra).
NEEDS_DEV = {"test", "test-lowest", "check", "bench", "cluster"}
# The dependencies `test-lowest` installs at the lowest version their range in pyproject.toml allows: the two the
# package builds on, and typer (the CLI catches the usage errors of the click it vendors).
LOWEST_OF = ("pydantic-ai-slim", "prefect", "typer", "ag-ui-protocol")
# Bumped when the way we install changes, so an existing .venv is reinstalled. 2: bytecode is compiled at install
# (with PYTHONDONTWRITEBYTECODE=1, as on many CI machines, every process otherwise compiled ~1,150 modules: ~3 s).
INSTALL_FORMAT = b"install-format-2"
# The suite's parallel workers: most of a test's time is spent waiting on servers and subprocesses, not on the
# 2 cores of a small machine. Each worker has its own Prefect server and PREFECT_HOME (tests/conftest.py).
TEST_WORKERS = "2"

# pip settings uv has an equivalent for; any other setting in the pip configuration makes us install with pip.
_PIP_TO_UV = {
    "index-url": "--index-url",
    "extra-index-url": "--extra-index-url",
    "find-links": "--find-links",
}
_PIP_HARMLESS = {
    "cert",
    "constraint",
    "default-timeout",
    "timeout",
    "disable-pip-version-check",
    "no-cache-dir",
}
_PIP_HARMLESS |= {"progress-bar", "quiet", "verbose", "retries", "trusted-host", "no-input", "no-index"}


def _lowest_env() -> Env:
    """`.venv-lowest/`, with each of `LOWEST_OF` pinned to the lower bound (`>=X`) of its range in pyproject.toml."""
    import re
    import tomllib

    dependencies = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    pins = []
    for name in LOWEST_OF:
        spec = next(d for d in dependencies if re.match(rf"{re.escape(name)}\s*[\[<>=~!;]", d))
        lower = re.search(r">=\s*([\w.]+)", spec)
        if lower is None:
            sys.exit(f"dev.py: pyproject.toml gives {name} no lower bound (>=): {spec!r}")
        pins.append(f"{name}=={lower[1]}")
    return Env(ROOT / ".venv-lowest", tuple(pins))


def _ensure_env(env: Env, dev: bool) -> None:
    if sys.version_info < (3, 11):  # noqa: UP036 (dev.py runs on whatever python3 the user has)
        sys.exit(f"prefect-pydantic-ai needs Python >= 3.11 (this is {sys.version.split()[0]}).")
    pinned = "".join(f"\n{pin}" for pin in env.pins).encode()
    wanted = hashlib.sha256((ROOT / "pyproject.toml").read_bytes() + INSTALL_FORMAT + pinned).hexdigest()
    installed = _read_stamp(env)
    if env.python.exists() and installed.get("pyproject") == wanted and (installed.get("dev") or not dev):
        return
    dev = dev or installed.get("dev") is True  # a reinstall keeps the extra once it was there
    started = time.monotonic()
    if not env.python.exists() or not env.stamp.exists():  # absent, or left half-made by an interruption
        _with_progress(
            f"creating {env.path.relative_to(ROOT)}/",
            lambda: venv.EnvBuilder(with_pip=True, clear=True).create(env.path),
        )
    target = f"{ROOT}[dev]" if dev else str(ROOT)
    what = "the project and its test dependencies" if dev else "the project (what the demo needs)"
    if env.pins:
        what += f" ({', '.join(env.pins)})"
    if not _install_with_uv(env, target, what):
        command = [str(env.python), "-m", "pip", "install", "-q", "-e", target, *env.pins]
        _run_step(env, f"installing {what} with pip", command)
    env.stamp.write_text(json.dumps({"pyproject": wanted, "dev": dev}))
    _say(f"ready in {time.monotonic() - started:.0f}s")


def _install_with_uv(env: Env, target: str, what: str) -> bool:
    """Install `target` (and `env.pins`) with uv, given the same indexes pip would use; False when uv cannot."""
    options = _uv_options(env)
    if options is None:
        return False
    uv = env.bin / ("uv.exe" if os.name == "nt" else "uv")
    try:
        if not uv.exists():
            _run_step(env, "installing uv", [str(env.python), "-m", "pip", "install", "-q", "uv"])
        environ = dict(os.environ)
        if isinstance(cert := options.get("cert"), str):
            environ.setdefault("SSL_CERT_FILE", cert)
        command = [str(uv), "pip", "install", "--compile-bytecode", "--python", str(env.python), "-e", target]
        command += [*env.pins, *options["args"]]
        _run_step(env, f"installing {what} with uv", command, environ=environ)
    except subprocess.CalledProcessError:
        _say("uv could not install it; trying pip")
        return False
    return True


def _uv_options(env: Env) -> dict[str, list[str] | str] | None:
    """uv's options for the indexes, find-links and constraints of `pip config list` (None: settings uv lacks).

    Like pip, uv is told to pick the best version across all indexes (`--index-strategy unsafe-best-match`).
    """
    try:
        listing = subprocess.run(
            [str(env.python), "-m", "pip", "config", "list"], capture_output=True, text=True, check=True
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    args = ["--index-strategy", "unsafe-best-match"]
    options: dict[str, list[str] | str] = {"args": args}
    seen: set[tuple[str, str]] = set()
    for line in listing.splitlines():
        name, _, raw = line.partition("=")
        section, _, key = name.rpartition(".")
        if section not in {"global", "install", ":env:"} or not raw:
            continue
        value = raw.strip().strip("'\"")
        if key in _PIP_TO_UV:
            for item in value.split():
                if (key, item) not in seen:  # the environment and the files may repeat a value
                    seen.add((key, item))
                    args += [_PIP_TO_UV[key], item]
        elif key == "constraint":
            args += ["--constraint", value]
        elif key == "no-index" and value.lower() in {"1", "true", "yes", "on"}:
            args.append("--no-index")
        elif key == "trusted-host":
            args += [f"--allow-insecure-host={host}" for host in value.split()]
        elif key == "cert":
            options["cert"] = value
        elif key not in _PIP_HARMLESS:
            return None
    for variable, key in (("PIP_INDEX_URL", "index-url"), ("PIP_EXTRA_INDEX_URL", "extra-index-url")):
        for item in os.environ.get(
            variable, ""
        ).split():  # `pip config list` shows these only when set in files
            if (key, item) not in seen:
                seen.add((key, item))
                args += [_PIP_TO_UV[key], item]
    return options


def _run_step(env: Env, what: str, command: list[str], environ: dict[str, str] | None = None) -> None:
    """Run an install step, its output to the env's install.log, showing elapsed seconds; its log tail on failure."""
    with env.log.open("a") as log:
        log.write(f"\n$ {shlex.join(command)}\n")
        log.flush()
        process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=environ)
        _with_progress(what, process.wait)
    if process.returncode != 0:
        tail = env.log.read_text().splitlines()[-15:]
        _say(f"{what} failed (exit {process.returncode}); the end of {env.log}:\n  " + "\n  ".join(tail))
        raise subprocess.CalledProcessError(process.returncode, command)


def _with_progress(what: str, work: Callable[[], object]) -> None:
    """Call `work` in a thread and redraw "what ... Ns" on a terminal (a start line otherwise)."""
    import threading

    done = threading.Event()
    failure: list[BaseException] = []

    def target() -> None:
        try:
            work()
        except BaseException as exc:
            failure.append(exc)
        finally:
            done.set()

    started = time.monotonic()
    threading.Thread(target=target, daemon=True).start()
    live = sys.stderr.isatty()
    if not live:
        _say(f"{what} ...")
    while not done.wait(0.5 if live else 5):
        if live:
            sys.stderr.write(f"\rdev.py: {what} ... {time.monotonic() - started:.0f}s")
            sys.stderr.flush()
    if live:
        sys.stderr.write(f"\rdev.py: {what} ... {time.monotonic() - started:.0f}s\n")
    if failure:
        raise failure[0]


def _test_workers(args: list[str]) -> list[str]:
    """pytest-xdist's options for the suite unless the arguments choose (`-n 0` runs in one process)."""
    if "no:xdist" in args or any(arg == "-n" or arg.startswith(("-n", "--numprocesses")) for arg in args):
        return []
    return ["-n", TEST_WORKERS, "--dist", "loadgroup"]


def _read_stamp(env: Env) -> dict[str, object]:
    try:
        stamp = json.loads(env.stamp.read_text())
        return stamp if isinstance(stamp, dict) else {}
    except (OSError, ValueError):
        return {}


def _say(message: str) -> None:
    print(f"dev.py: {message}", file=sys.stderr, flush=True)


def main(argv: list[str]) -> int:
    if not argv or argv[0] in {"-h", "--help", "help"}:
        print(__doc__)
        return 0
    command, rest = argv[0], argv[1:]
    target = _lowest_env() if command == "test-lowest" else VENV
    commands = {
        "demo": [str(BIN / "prefect-pydantic-ai"), "demo", *rest],
        "cli": [str(BIN / "prefect-pydantic-ai"), *rest],
        "cluster": [str(BIN / "prefect-pydantic-ai"), "cluster", *rest],
        "test": [str(PYTHON), "-m", "pytest", *_test_workers(rest), *rest],
        "test-lowest": [str(target.python), "-m", "pytest", *_test_workers(rest), *rest],
        "bench": [str(PYTHON), str(ROOT / "benchmarks" / "run.py"), *rest],
        "check": [str(BIN / "ruff"), "check", "src", "tests", "benchmarks", "examples"],
    }
    if command not in commands:
        print(f"dev.py: unknown command {command!r}; use one of: {', '.join(commands)}", file=sys.stderr)
        return 2
    try:
        _ensure_env(target, dev=command in NEEDS_DEV)
    except subprocess.CalledProcessError:
        return 1
    _compile_sources(target)
    env = dict(os.environ)
    if command in {"demo", "cli", "cluster"}:  # their hints then name a command that works from the clone
        env["PREFECT_PYDANTIC_AI_CLI"] = "python3 dev.py cli"
    return _call(commands[command], env)


def _compile_sources(env: Env) -> None:
    """Bring the bytecode of the clone's own package up to date. Its install is editable, so `--compile-bytecode`
    skips it, and with PYTHONDONTWRITEBYTECODE=1 every process (each CLI command, script and test subprocess)
    would compile its ~60 modules again: ~0.25 s each time. Only files changed since run again."""
    if os.environ.get("PYTHONDONTWRITEBYTECODE"):
        compileall = [str(env.python), "-m", "compileall", "-q", str(ROOT / "src")]
        subprocess.run(compileall, cwd=ROOT, stdout=subprocess.DEVNULL, check=False)


def _call(command: list[str], env: dict[str, str]) -> int:
    """Run `command` and return its exit code. Ctrl-C reaches the command too (one process group): it ends
    itself, with its own one-line message, and dev.py waits for it instead of printing a traceback of its own."""
    process = subprocess.Popen(command, cwd=ROOT, env=env)
    while True:
        try:
            code = process.wait()
        except KeyboardInterrupt:
            continue
        return 128 - code if code < 0 else code  # killed by a signal: the shell's convention (130 for SIGINT)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
