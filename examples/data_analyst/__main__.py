"""Run the analyst agent once with the offline (scripted) model and print its DataAnalysis as JSON."""

from __future__ import annotations

import argparse
import sys

from prefect_pydantic_ai.demo.analyst import (
    DEFAULT_PROMPT,
    DatasetError,
    build_analyst_agent,
    load_csv,
    sales_dataset,
)


def main(argv: list[str] | None = None) -> int:
    """Analyse the built-in sales dataset, or the CSV file given with ``--csv``."""
    parser = argparse.ArgumentParser(prog="python -m examples.data_analyst", description=__doc__)
    parser.add_argument(
        "--csv", metavar="PATH", help="CSV file to analyse instead of the built-in sales data"
    )
    args = parser.parse_args(argv)
    try:
        dataset = sales_dataset() if args.csv is None else load_csv(args.csv)
    except DatasetError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    result = build_analyst_agent().run_sync(DEFAULT_PROMPT, deps=dataset)
    print(result.output.model_dump_json(indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
