"""Durable execution for Pydantic AI agents on Prefect 3.

Add `PrefectDurability` to an agent, or wrap it in `PrefectAgent`: each run becomes a Prefect flow run (or
part of yours), each model request and tool call a Prefect task with its own `TaskConfig`, and a run that
failed or was killed resumes from its journal instead of paying for the same calls twice.

The names below are imported on first use, so `prefect-pydantic-ai --help` does not pay for importing Prefect.
"""

from __future__ import annotations

import atexit
import gc
import importlib
from typing import TYPE_CHECKING, Any

# At exit, once the exit handlers registered after this one have run (Prefect's flushes of logs and events among
# them), the process's objects are put out of the collector's reach. The collection at interpreter shutdown walks
# every object Prefect and Pydantic AI created to free memory the OS takes back anyway: measured on 2 cores, 1.4-2 s
# of a 5-step script's 8-10 s, and 2 s of a forked process's exit. Only that walk is skipped: exit handlers run,
# standard streams are flushed and objects outside reference cycles are freed; an object kept alive only by a
# cycle is not finalized at exit.
atexit.register(gc.freeze)

if TYPE_CHECKING:
    from .durable.agent import PrefectAgent as PrefectAgent
    from .durable.budget import Budget as Budget
    from .durable.capability import PrefectDurability as PrefectDurability
    from .durable.capability import idempotency_key as idempotency_key
    from .durable.errors import DurabilityConfigError as DurabilityConfigError
    from .durable.errors import NotJournalableError as NotJournalableError
    from .durable.limits import ConcurrencyLimit as ConcurrencyLimit
    from .durable.limits import MissingLimitError as MissingLimitError
    from .durable.model_step import StepReplayedEvent as StepReplayedEvent
    from .durable.model_step import StreamRetryEvent as StreamRetryEvent
    from .durable.report import ledger_of as ledger_of
    from .durable.steps import step_idempotency_key as step_idempotency_key
    from .durable.task_config import TaskConfig as TaskConfig
    from .durable.wait import ApprovalTimeout as ApprovalTimeout
    from .durable.wait import AwaitingApproval as AwaitingApproval
    from .errors import BudgetExceededError as BudgetExceededError
    from .errors import PrefectUnreachableError as PrefectUnreachableError
    from .errors import RunError as RunError
    from .errors import StorageReadError as StorageReadError
    from .errors import StorageWriteError as StorageWriteError
    from .errors import UnverifiedEffectError as UnverifiedEffectError
    from .ledger import Ledger as Ledger
    from .ops.approve import approve_run as approve_run
    from .ops.export import export_run as export_run
    from .ops.fork import Forked as Forked
    from .ops.fork import fork_run as fork_run
    from .ops.resume import Rescheduled as Rescheduled
    from .ops.resume import resume_run as resume_run
    from .ops.runs import list_runs as list_runs
    from .ops.show import show_run as show_run

_EXPORTS = {
    "PrefectAgent": "durable.agent",
    "approve_run": "ops.approve",
    "ApprovalTimeout": "durable.wait",
    "AwaitingApproval": "durable.wait",
    "PrefectDurability": "durable.capability",
    "idempotency_key": "durable.capability",
    "Budget": "durable.budget",
    "BudgetExceededError": "errors",
    "TaskConfig": "durable.task_config",
    "DurabilityConfigError": "durable.errors",
    "NotJournalableError": "durable.errors",
    "ConcurrencyLimit": "durable.limits",
    "MissingLimitError": "durable.limits",
    "UnverifiedEffectError": "errors",
    "Ledger": "ledger",
    "ledger_of": "durable.report",
    "PrefectUnreachableError": "errors",
    "RunError": "errors",
    "StorageReadError": "errors",
    "StorageWriteError": "errors",
    "list_runs": "ops.runs",
    "export_run": "ops.export",
    "Forked": "ops.fork",
    "fork_run": "ops.fork",
    "Rescheduled": "ops.resume",
    "resume_run": "ops.resume",
    "show_run": "ops.show",
    "StepReplayedEvent": "durable.model_step",
    "StreamRetryEvent": "durable.model_step",
    "step_idempotency_key": "durable.steps",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    api_ready = None
    if name in ("PrefectAgent", "PrefectDurability"):
        # Before the user's own `@flow` starts: with no API configured, Prefect would boot a temporary server
        # for it (which times out on a slow machine and is gone afterwards). Find or start the persistent one,
        # while Prefect and pydantic-ai are imported.
        api_ready = importlib.import_module(".infra.server", __name__).start_api()
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    if api_ready is not None:
        api_ready()
    globals()[name] = value
    return value
