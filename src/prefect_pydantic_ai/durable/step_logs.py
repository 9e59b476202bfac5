"""One log line per failed attempt of a step: Prefect logs a step task's final failure with its traceback, and the
flow run that it fails logs and raises the same error again, so a single failing tool printed three tracebacks."""

from __future__ import annotations

import logging

from prefect_pydantic_ai.durable.steps import parse_task_run_name


class StepFailureOnOneLine(logging.Filter):
    """Drops the traceback from Prefect's task-run log records of our step tasks; the error keeps its traceback
    where it is final: in the flow run's log and wherever the run's caller sees it raised."""

    def filter(self, record: logging.LogRecord) -> bool:
        name = getattr(record, "task_run_name", None)
        if record.exc_info and isinstance(name, str) and parse_task_run_name(name) is not None:
            record.exc_info = None
            record.exc_text = None
        return True


def install() -> None:
    """Filter Prefect's task-run logger (once per process)."""
    task_runs = logging.getLogger("prefect.task_runs")
    if not any(isinstance(f, StepFailureOnOneLine) for f in task_runs.filters):
        task_runs.addFilter(StepFailureOnOneLine())
