"""Errors raised for things the user has to fix: each message says what is wrong and what to do."""

from __future__ import annotations

from pydantic_ai.exceptions import UserError


class DurabilityConfigError(UserError):
    """The agent or a run cannot be made durable as configured (unnamed agent, no model, duplicate names...)."""


class NotJournalableError(DurabilityConfigError):
    """A run input (deps, metadata) or a tool result cannot be written to the journal as JSON."""


class UnverifiedEffectError(RuntimeError):
    """A non-idempotent tool call started in an earlier attempt and never recorded completion: whether its effect
    happened is unknown, so the run stops for a human to check instead of repeating it."""


class RunError(Exception):
    """A run cannot be found, resolved or resumed; the message says what to do. The CLI exits with code 2."""
