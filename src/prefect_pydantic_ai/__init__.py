"""Durable execution for Pydantic AI agents on Prefect 3.

Wrap an agent in `PrefectAgent`: each run becomes a Prefect flow run, each model request and tool call a
Prefect task with its own `TaskConfig`, and a run that failed or was killed resumes from its journal instead of
paying for the same calls twice.

The names below are imported on first use, so `prefect-pydantic-ai --help` does not pay for importing Prefect.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from .agent import PrefectAgent as PrefectAgent
    from .config import TaskConfig as TaskConfig
    from .errors import DurabilityConfigError as DurabilityConfigError
    from .errors import NotJournalableError as NotJournalableError
    from .errors import UnverifiedEffectError as UnverifiedEffectError
    from .ledger import Ledger as Ledger
    from .report import ledger_of as ledger_of
    from .runs import RunError as RunError
    from .runs import list_runs as list_runs
    from .runs import resume_run as resume_run
    from .runs import show_run as show_run
    from .steps import step_idempotency_key as step_idempotency_key

_EXPORTS = {
    "PrefectAgent": "agent",
    "TaskConfig": "config",
    "DurabilityConfigError": "errors",
    "NotJournalableError": "errors",
    "UnverifiedEffectError": "errors",
    "Ledger": "ledger",
    "ledger_of": "report",
    "RunError": "runs",
    "list_runs": "runs",
    "resume_run": "runs",
    "show_run": "runs",
    "step_idempotency_key": "steps",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    if name == "PrefectAgent":  # a user's own @flow around the agent then runs on the persistent local server
        importlib.import_module(".server", __name__).adopt_running_server()
    globals()[name] = value
    return value
