"""Errors of runs, raised for things the user has to fix or decide: each message says what is wrong and what to do.

They import nothing, so the CLI's read-only commands can raise and catch them without importing pydantic-ai
(the errors of a misconfigured agent, pydantic-ai `UserError`s, are in `durable.errors`)."""

from __future__ import annotations


class UnverifiedEffectError(RuntimeError):
    """A non-idempotent tool call started in an earlier attempt and never recorded completion: whether its effect
    happened is unknown, so the run stops for a human to check instead of repeating it."""


class StorageReadError(RuntimeError):
    """A read from the result storage failed in another way than "nothing is stored there" (credentials, network,
    permissions): what is stored is unknown, so nothing that depends on it goes ahead. The message names the
    storage, the path and the cause."""


class StorageWriteError(RuntimeError):
    """A step completed but its journal entry could not be written to the result storage, even on a second try:
    the step's result is not kept, so the run stops here instead of going on with a step a resume would not
    find. The message names the step, the storage and the cause."""


class RunError(Exception):
    """A run cannot be found, resolved or resumed; the message says what to do. The CLI exits with code 2."""


class PrefectUnreachableError(RuntimeError):
    """The Prefect API did not answer through the client's retries, so a run stopped: the message names the API,
    says that the completed steps are kept in the journal, and gives the command that continues the run. The CLI
    exits with code 1 (not the user's input)."""


class BudgetExceededError(RuntimeError):
    """A run stopped before a model request that its budget (dollars or tokens over every attempt) cannot cover:
    the message says what it spent and how to resume it with a higher budget. Nothing is repeated on resume."""
