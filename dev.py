#!/usr/bin/env python3
"""One entry point for a fresh clone: `python3 dev.py demo` runs the demo, `python3 dev.py test` the tests.

It needs only Python >= 3.11. On first use it creates `.venv/` beside this file and installs the project into it
(editable, with its test dependencies); later runs reuse it and reinstall only when `pyproject.toml` changes.
Any other arguments are passed on: `python3 dev.py demo --kill`, `python3 dev.py test -k resume`,
`python3 dev.py cli runs --json`, `python3 dev.py bench`.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import sys
import venv
from pathlib import Path

ROOT = Path(__file__).resolve().parent
VENV = ROOT / ".venv"
BIN = VENV / ("Scripts" if os.name == "nt" else "bin")
PYTHON = BIN / ("python.exe" if os.name == "nt" else "python")
STAMP = VENV / ".installed-from"


def _ensure_env() -> None:
    if sys.version_info < (3, 11):
        sys.exit(f"prefect-pydantic-ai needs Python >= 3.11 (this is {sys.version.split()[0]}).")
    wanted = hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()
    if PYTHON.exists() and STAMP.exists() and STAMP.read_text() == wanted:
        return
    if not PYTHON.exists():
        print(f"dev.py: creating {VENV} ...", file=sys.stderr)
        venv.EnvBuilder(with_pip=True).create(VENV)
    print("dev.py: installing prefect-pydantic-ai and its test dependencies ...", file=sys.stderr)
    pip = [str(PYTHON), "-m", "pip", "install", "--disable-pip-version-check", "-q"]
    subprocess.run([*pip, "-e", f"{ROOT}[dev]"], check=True)
    STAMP.write_text(wanted)


def main(argv: list[str]) -> int:
    if not argv or argv[0] in {"-h", "--help", "help"}:
        print(__doc__)
        return 0
    command, rest = argv[0], argv[1:]
    commands = {
        "demo": [str(BIN / "prefect-pydantic-ai"), "demo", *rest],
        "cli": [str(BIN / "prefect-pydantic-ai"), *rest],
        "test": [str(PYTHON), "-m", "pytest", *rest],
        "bench": [str(PYTHON), str(ROOT / "benchmarks" / "run.py"), *rest],
        "check": [str(BIN / "ruff"), "check", "src", "tests", "benchmarks", "examples"],
    }
    if command not in commands:
        print(f"dev.py: unknown command {command!r}; use one of: {', '.join(commands)}", file=sys.stderr)
        return 2
    _ensure_env()
    return subprocess.call(commands[command], cwd=ROOT)


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
