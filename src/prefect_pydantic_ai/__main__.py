"""`python -m prefect_pydantic_ai` is the `prefect-pydantic-ai` command."""

from prefect_pydantic_ai.cli.app import main

main()
