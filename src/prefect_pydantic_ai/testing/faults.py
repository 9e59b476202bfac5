"""Injected faults for scripted models and tools: raise, sleep or SIGKILL on the Nth call of a named step.

Counts can be kept in a state file shared by several processes, so a test can kill a run on "the 1st call
overall" and have the resumed run in a fresh process go through. `CallLog` counts calls across processes too.
"""

from __future__ import annotations

import fcntl
import inspect
import json
import os
import signal
import sys
import threading
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, Self, TypeAlias

import anyio

if (
    TYPE_CHECKING
):  # annotations only: this module needs just the stdlib and anyio, so a subprocess can load it fast
    from pydantic_ai.messages import ModelMessage, ModelResponse
    from pydantic_ai.models.function import AgentInfo, FunctionDef

ENV_VAR = "PPAI_FAULT_PLAN"
"""Environment variable through which `FaultPlan.to_env` / `FaultPlan.from_env` hand a plan to a subprocess."""

TRANSPORTABLE_EXCEPTIONS: dict[str, type[Exception]] = {
    exc_type.__name__: exc_type
    for exc_type in (TimeoutError, ConnectionError, ConnectionResetError, OSError, RuntimeError, ValueError)
}
"""The exception types a plan can carry through JSON (rebuilt as `type(message)`)."""

AsyncFunctionDef: TypeAlias = "Callable[[list[ModelMessage], AgentInfo], Awaitable[ModelResponse]]"
"""What `wrap_function_model` returns: an async `FunctionModel` function."""


@dataclass(frozen=True)
class CallLogEntry:
    """One recorded call: the step `name`, its JSON-able `args` and the `pid` of the process that made it."""

    name: str
    args: Any
    pid: int


class CallLog:
    """An append-only, fsync'ed log of calls (one JSON line each) that several processes can share.

    Appends and reads take an exclusive/shared `flock`, so concurrent processes get distinct call numbers.
    """

    def __init__(self, path: Path | str) -> None:
        self.path = Path(path)

    def record(self, name: str, args: Any = None) -> int:
        """Durably append a call of `name` (`args` as JSON, `repr` for the rest); return its 1-based number."""
        line = json.dumps({"name": name, "args": args, "pid": os.getpid()}, default=repr) + "\n"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("a+", encoding="utf-8") as f:
            fcntl.flock(f, fcntl.LOCK_EX)  # released when the file is closed
            f.seek(0)
            number = 1 + sum(1 for entry in _parse_entries(f) if entry.name == name)
            f.write(line)
            f.flush()
            os.fsync(f.fileno())
        return number

    def entries(self) -> list[CallLogEntry]:
        """Every recorded call, oldest first (empty if the file does not exist yet)."""
        try:
            f = self.path.open(encoding="utf-8")
        except FileNotFoundError:
            return []
        with f:
            fcntl.flock(f, fcntl.LOCK_SH)
            return list(_parse_entries(f))

    def counts(self) -> Counter[str]:
        """How many calls of each name were recorded."""
        return Counter(entry.name for entry in self.entries())


def _parse_entries(f: IO[str]) -> Iterable[CallLogEntry]:
    for line in f:
        if line.strip():
            data = json.loads(line)
            yield CallLogEntry(name=data["name"], args=data.get("args"), pid=data["pid"])


@dataclass(frozen=True)
class Fault:
    """What happens on call number `on_call` (1-based) of step `name`: sleep `delay`, then SIGKILL or raise `exc`."""

    name: str
    on_call: int
    exc: BaseException | None = None
    delay: float = 0.0
    kill: bool = False


class FaultPlan:
    """Decides, per step name and call number, whether a call fails, sleeps first, or kills the process.

    Call `await plan.hit(name)` (or `plan.hit_sync(name)`) at the start of a tool or model function. Without a
    `state_file` calls are counted in memory; with one, each call is durably appended to it *before* the fault
    fires, so counts continue across processes and a fault fires at most once overall.
    """

    def __init__(self, faults: Iterable[Fault] = (), *, state_file: Path | str | None = None) -> None:
        self._faults: dict[tuple[str, int], Fault] = {}
        self._log = CallLog(state_file) if state_file is not None else None
        self._counts: Counter[str] = Counter()
        self._lock = threading.Lock()
        for fault in faults:
            self.add(fault)

    @property
    def state_file(self) -> Path | None:
        """Where call counts are persisted, if anywhere."""
        return self._log.path if self._log is not None else None

    @property
    def faults(self) -> tuple[Fault, ...]:
        """The planned faults, in the order they were added."""
        return tuple(self._faults.values())

    def add(self, fault: Fault) -> Self:
        """Plan `fault`; a step's call number can carry only one fault."""
        if fault.on_call < 1:
            raise ValueError(f"on_call is 1-based, got {fault.on_call}")
        if fault.delay < 0:
            raise ValueError(f"delay must not be negative, got {fault.delay}")
        key = (fault.name, fault.on_call)
        if key in self._faults:
            raise ValueError(
                f"call {fault.on_call} of {fault.name!r} already has a fault: {self._faults[key]}"
            )
        self._faults[key] = fault
        return self

    def fail(self, name: str, *, on_call: int, exc: BaseException | None = None, delay: float = 0.0) -> Self:
        """Make call `on_call` of `name` sleep `delay` seconds and/or raise `exc`."""
        if exc is None and not delay:
            raise ValueError("fail() needs an exception to raise, a delay, or both")
        return self.add(Fault(name, on_call, exc=exc, delay=delay))

    def kill(self, name: str, *, on_call: int, delay: float = 0.0) -> Self:
        """Make call `on_call` of `name` SIGKILL the current process (after `delay` seconds)."""
        return self.add(Fault(name, on_call, delay=delay, kill=True))

    def calls(self, name: str) -> int:
        """How many calls of `name` were counted (across processes when there is a state file)."""
        if self._log is not None:
            return self._log.counts()[name]
        with self._lock:
            return self._counts[name]

    async def hit(self, name: str) -> int:
        """Count a call of `name` and apply its fault, sleeping without blocking the event loop; return its number."""
        number, fault = self._count(name)
        if fault is not None:
            if fault.delay:
                await anyio.sleep(fault.delay)
            _fire(fault)
        return number

    def hit_sync(self, name: str) -> int:
        """Like `hit`, for synchronous code (sleeps with `time.sleep`)."""
        number, fault = self._count(name)
        if fault is not None:
            if fault.delay:
                time.sleep(fault.delay)
            _fire(fault)
        return number

    def _count(self, name: str) -> tuple[int, Fault | None]:
        if self._log is not None:
            number = self._log.record(name)
        else:
            with self._lock:
                self._counts[name] += 1
                number = self._counts[name]
        return number, self._faults.get((name, number))

    # -- handing a plan to a subprocess ----------------------------------------------------------------------

    def to_json(self) -> str:
        """The plan as JSON; exceptions must be of a `TRANSPORTABLE_EXCEPTIONS` type."""
        faults = [
            {
                "name": f.name,
                "on_call": f.on_call,
                "delay": f.delay,
                "kill": f.kill,
                "exc": None if f.exc is None else {"type": _transportable_name(f.exc), "message": str(f.exc)},
            }
            for f in self._faults.values()
        ]
        state_file = str(self.state_file.absolute()) if self.state_file is not None else None
        return json.dumps({"state_file": state_file, "faults": faults})

    @classmethod
    def from_json(cls, text: str) -> FaultPlan:
        """Rebuild a plan written by `to_json`."""
        data = json.loads(text)
        faults = [
            Fault(
                name=f["name"],
                on_call=f["on_call"],
                delay=f["delay"],
                kill=f["kill"],
                exc=None if f["exc"] is None else _rebuild_exception(f["exc"]["type"], f["exc"]["message"]),
            )
            for f in data["faults"]
        ]
        return cls(faults, state_file=data["state_file"])

    def to_env(self, var: str = ENV_VAR) -> dict[str, str]:
        """`{var: json}`, to merge into a subprocess's environment."""
        return {var: self.to_json()}

    @classmethod
    def from_env(cls, var: str = ENV_VAR, environ: Mapping[str, str] | None = None) -> FaultPlan:
        """The plan handed over in `var` (of `os.environ` by default), or an empty plan if it is unset."""
        text = (os.environ if environ is None else environ).get(var)
        return cls() if text is None else cls.from_json(text)


def _fire(fault: Fault) -> None:
    if fault.kill:
        sys.stdout.flush()
        sys.stderr.flush()
        os.kill(os.getpid(), signal.SIGKILL)
    if fault.exc is not None:
        raise fault.exc


def _transportable_name(exc: BaseException) -> str:
    name = type(exc).__name__
    if TRANSPORTABLE_EXCEPTIONS.get(name) is not type(exc):
        allowed = ", ".join(TRANSPORTABLE_EXCEPTIONS)
        raise ValueError(f"cannot pass {exc!r} through JSON; use one of: {allowed}")
    return name


def _rebuild_exception(type_name: str, message: str) -> Exception:
    try:
        return TRANSPORTABLE_EXCEPTIONS[type_name](message)
    except KeyError:
        raise ValueError(f"unknown exception type {type_name!r} in fault plan") from None


def wrap_function_model(fn: FunctionDef, plan: FaultPlan, name: str = "model") -> AsyncFunctionDef:
    """Wrap a `FunctionModel` function so every model request first goes through `plan.hit(name)`.

    A sync `fn` is called directly on the event loop (`FunctionModel` would use a worker thread), which is fine
    for the quick scripted functions tests use.
    """

    async def faulty(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
        await plan.hit(name)
        response = fn(messages, info)
        return await response if inspect.isawaitable(response) else response

    return faulty
