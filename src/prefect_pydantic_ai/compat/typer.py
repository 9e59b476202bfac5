"""typer's private parts: the usage errors of the click it vendors (since typer 0.26), which `typer` does not
export; the CLI catches them to print a usage error as one line."""

from __future__ import annotations

from typer._click.exceptions import NoArgsIsHelpError as NoArgsIsHelpError
from typer._click.exceptions import UsageError as UsageError
