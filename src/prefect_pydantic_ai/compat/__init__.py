"""The one door to the private parts of the libraries we build on: every private module or attribute of prefect,
pydantic-ai, prefect-redis or typer that the package uses is reached here, and nowhere else.

Each was kept because no public API does the same job; each has a test in `tests/test_compat_private.py` that
names the installed version of its library when the behaviour we rely on changes. One module per library, so a
command that needs typer alone never imports Prefect.
"""
