"""Errors of an agent or a run that cannot be made durable as configured: pydantic-ai `UserError`s, so code that
catches pydantic-ai's configuration errors catches ours too. Each message says what is wrong and what to do."""

from __future__ import annotations

from pydantic_ai.exceptions import UserError


class DurabilityConfigError(UserError):
    """The agent or a run cannot be made durable as configured (unnamed agent, no model, duplicate names...)."""


class NotJournalableError(DurabilityConfigError):
    """A run input (deps, metadata) or a tool result cannot be written to the journal as JSON."""
