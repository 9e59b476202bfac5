"""Durable execution for Pydantic AI agents on Prefect 3.

Wrap an agent in `PrefectAgent`: each run becomes a Prefect flow run, each model request and tool call a
Prefect task with its own `TaskConfig`, and a run that failed or was killed resumes from its journal instead of
paying for the same calls twice.
"""

from .agent import PrefectAgent
from .config import TaskConfig
from .errors import DurabilityConfigError, NotJournalableError
from .ledger import Ledger
from .report import ledger_of
from .runs import RunError, list_runs, resume_run, show_run

__all__ = [
    "DurabilityConfigError",
    "Ledger",
    "NotJournalableError",
    "PrefectAgent",
    "RunError",
    "TaskConfig",
    "ledger_of",
    "list_runs",
    "resume_run",
    "show_run",
]
