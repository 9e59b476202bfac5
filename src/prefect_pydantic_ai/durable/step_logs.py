"""Prefect's log lines about our steps and runs, made to say what happens.

One line per failed attempt of a step: Prefect logs a step task's final failure with its traceback, and the flow run
that it fails logs and raises the same error again, so a single failing tool printed three tracebacks. A retry
that waits out a provider's Retry-After says so (Prefect announces only the configured delay). A run that stops
to wait for a person is not logged as an error."""

from __future__ import annotations

import logging

from prefect_pydantic_ai.durable.steps import RETRY_AFTER
from prefect_pydantic_ai.store.step_names import parse_task_run_name

_RETRY_LINE = "Task run failed with %s: %r - Retry %s/%s will start %s"


class StepFailureOnOneLine(logging.Filter):
    """Drops the traceback from Prefect's task-run log records of our step tasks; the error keeps its traceback
    where it is final: in the flow run's log and wherever the run's caller sees it raised."""

    def filter(self, record: logging.LogRecord) -> bool:
        name = getattr(record, "task_run_name", None)
        if record.exc_info and isinstance(name, str) and parse_task_run_name(name) is not None:
            record.exc_info = None
            record.exc_text = None
        return True


class RetryAfterInRetryLine(logging.Filter):
    """Prefect's "Retry 1/3 will start 0.5 second(s) from now" for an attempt whose provider asked for longer
    (`Retry-After`): the next attempt waits that long, and the line says so."""

    def filter(self, record: logging.LogRecord) -> bool:
        task_run_id = getattr(record, "task_run_id", None)
        if record.msg != _RETRY_LINE or not isinstance(record.args, tuple) or task_run_id is None:
            return True
        after = RETRY_AFTER.pop(str(task_run_id), 0.0)
        announced = str(record.args[-1])
        delay = float(announced.split()[0]) if announced[:1].isdigit() else 0.0
        if after > delay:
            record.args = (*record.args[:-1], f"{after:g} second(s) from now (the provider's Retry-After)")
        return True


class WaitingIsNotAnError(logging.Filter):
    """Prefect's flow engine logs every final state but Completed at ERROR, so a run that stops to wait for a
    person printed `ERROR | Finished in state Paused(...)` (and the UI listed an error log). Waiting is the
    expected outcome there: the line is kept, at INFO."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.levelno == logging.ERROR and str(record.msg).startswith(
            ("Finished in state Paused(", "Finished in state Suspended(")
        ):
            record.levelno, record.levelname = logging.INFO, "INFO"
        return True


def install() -> None:
    """Filter Prefect's task-run and flow-run loggers (once per process)."""
    for logger, kind in (
        ("prefect.task_runs", StepFailureOnOneLine),
        ("prefect.task_runs", RetryAfterInRetryLine),
        ("prefect.flow_runs", WaitingIsNotAnError),
    ):
        filters = logging.getLogger(logger).filters
        if not any(isinstance(f, kind) for f in filters):
            logging.getLogger(logger).addFilter(kind())
