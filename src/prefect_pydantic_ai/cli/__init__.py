"""The `prefect-pydantic-ai` command (`app`) and the terminal rendering it shares with the demo (`display`)."""
