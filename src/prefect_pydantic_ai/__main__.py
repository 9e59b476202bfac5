"""`python -m prefect_pydantic_ai` is the `prefect-pydantic-ai` command."""

from .cli import main

main()
