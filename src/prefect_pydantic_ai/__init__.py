"""Durable execution for Pydantic AI agents on Prefect 3."""
