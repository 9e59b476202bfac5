"""Pattern 4: the analyze-and-report flow as a long-running service.

``.serve()`` registers a deployment of `examples.analyze_and_report.analyze_and_report` with the Prefect API
and polls for its runs until stopped (Ctrl+C): scheduled runs (``--cron``), runs created over the REST API
(``POST /api/deployments/{id}/create_flow_run``), from Python (`prefect.deployments.run_deployment`) or from
the UI. A run that failed can be set back to Scheduled through the API; this service picks it up again and
the agent's completed steps replay from the journal. Start it from the repository root with::

    python -m examples.serve_analyst [--name NAME] [--cron "0 9 * * *"] [--csv PATH] [--outbox DIR] [--model MODEL]

The flag values become the deployment's default parameters; a run can override any of them.
"""

from __future__ import annotations

import argparse
from typing import Any

from prefect.types.entrypoint import EntrypointType

from examples.analyze_and_report import DEFAULT_OUTBOX, DEFAULT_RECIPIENT, analyze_and_report

__all__ = ["DEFAULT_DEPLOYMENT", "main"]

DEFAULT_DEPLOYMENT = "data-analysis-service"


def main(argv: list[str] | None = None) -> None:
    """Serve the flow until interrupted."""
    parser = argparse.ArgumentParser(prog="python -m examples.serve_analyst", description=__doc__)
    parser.add_argument("--name", default=DEFAULT_DEPLOYMENT, help="deployment name")
    parser.add_argument("--cron", help="also run on this cron schedule, e.g. '0 9 * * *'")
    parser.add_argument("--csv", metavar="PATH", help="CSV file to analyse (default: built-in sales data)")
    parser.add_argument(
        "--outbox", metavar="DIR", default=str(DEFAULT_OUTBOX), help="where to write the .eml"
    )
    parser.add_argument("--to", default=DEFAULT_RECIPIENT, help="recipient of the notifications")
    parser.add_argument("--model", help="pydantic-ai model string, e.g. openai:gpt-4o (default: offline)")
    args = parser.parse_args(argv)
    parameters: dict[str, Any] = {"csv_path": args.csv, "outbox": args.outbox, "recipient": args.to}
    if args.model is not None:
        parameters["model"] = args.model
    analyze_and_report.serve(
        name=args.name,
        parameters=parameters,
        cron=args.cron,
        description="Analyse a dataset with the durable analyst agent, then report and notify.",
        # Runs import the flow as examples.analyze_and_report, so start the service from the repository root.
        entrypoint_type=EntrypointType.MODULE_PATH,
    )


if __name__ == "__main__":
    main()
