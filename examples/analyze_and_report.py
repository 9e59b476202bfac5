"""Pattern 1: an agent's typed output feeds downstream Prefect tasks.

The analyst agent returns a validated `DataAnalysis`; the `generate_report` task renders it as Markdown and the
`send_notification` task delivers it as an e-mail message file (``<flow run id>.eml``) in an outbox directory,
where a mail relay or a person can pick it up. Run it with::

    python -m examples.analyze_and_report [--csv PATH] [--outbox DIR] [--to ADDRESS] [--model MODEL]

The flow's result (the `DataAnalysis`) is persisted as JSON, so callers of a deployment can read it back.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import tempfile
from email.message import EmailMessage
from email.utils import formatdate
from pathlib import Path

import pandas as pd
from prefect import flow, task
from prefect.runtime import flow_run

from examples import fault_injection
from prefect_pydantic_ai import PrefectAgent, TaskConfig
from prefect_pydantic_ai.demo.analyst import (
    DEFAULT_PROMPT,
    DataAnalysis,
    DatasetError,
    build_analyst_agent,
    load_csv,
    sales_dataset,
)

__all__ = [
    "DEFAULT_OUTBOX",
    "DEFAULT_RECIPIENT",
    "SENDER",
    "analyze_and_report",
    "durable_analyst",
    "generate_report",
    "main",
    "notification_path",
    "send_notification",
]

DEFAULT_OUTBOX = Path(tempfile.gettempdir()) / "prefect-pydantic-ai" / "outbox"
"""Where notifications go unless the flow is given another outbox."""

DEFAULT_RECIPIENT = "data-team@example.com"
SENDER = "analyst@prefect-pydantic-ai.local"


def durable_analyst(model: str | None = None) -> PrefectAgent[pd.DataFrame, DataAnalysis]:
    """The analyst agent with Prefect durability; `model=None` uses the offline scripted model.

    The flow builds it per run rather than at import: `.serve()` pickles the flow function with the globals it
    uses, and a Pydantic AI agent cannot be pickled.
    """
    return PrefectAgent(
        build_analyst_agent(model),
        model_task_config=TaskConfig(retries=3, retry_delay_seconds=[1.0, 2.0, 4.0], timeout_seconds=60.0),
        tool_task_config=TaskConfig(retries=2, retry_delay_seconds=[0.5, 1.0]),
    )


@task
def generate_report(analysis: DataAnalysis, source: str) -> str:
    """Render the analysis of `source` as a Markdown report."""
    lines = [f"# Data analysis: {source}", "", analysis.summary, "", "## Key findings", ""]
    lines += [f"- {finding}" for finding in analysis.key_findings]
    lines += ["", "## Anomalies", ""]
    if analysis.anomalies:
        lines += ["| Column | Row | Value | modified z-score |", "| --- | ---: | ---: | ---: |"]
        lines += [f"| {a.column} | {a.row} | {a.value:.2f} | {a.z_score:.2f} |" for a in analysis.anomalies]
    else:
        lines.append("None found.")
    lines += ["", "## Recommendations", ""]
    lines += [f"{number}. {step}" for number, step in enumerate(analysis.recommendations, start=1)]
    lines += ["", f"Columns analysed: {', '.join(analysis.columns_analyzed) or 'none'}."]
    return "\n".join(lines) + "\n"


def notification_path(outbox: str | os.PathLike[str], message_id: str) -> Path:
    """Where `send_notification` writes the message `message_id`."""
    return Path(outbox) / f"{message_id}.eml"


@task(persist_result=True)
def send_notification(report: str, *, subject: str, to: str, outbox: str, message_id: str) -> str:
    """Write `report` as an e-mail message to `outbox` and return the file's path.

    The result is persisted, so a retried flow run finds this task cached instead of notifying twice; the file
    is named after `message_id` and written atomically, so a reader never sees half a message.
    """
    message = EmailMessage()
    message["From"] = SENDER
    message["To"] = to
    message["Subject"] = subject
    message["Date"] = formatdate(localtime=True)
    message["Message-ID"] = f"<{message_id}@prefect-pydantic-ai.local>"
    message.set_content(report, subtype="markdown", cte="8bit")
    path = notification_path(outbox, message_id)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(path.name + ".partial")
    partial.write_bytes(bytes(message))
    os.replace(partial, path)
    return str(path)


@flow(name="analyze-and-report", persist_result=True, result_serializer="json")
async def analyze_and_report(
    csv_path: str | None = None,
    outbox: str | None = None,
    recipient: str = DEFAULT_RECIPIENT,
    model: str | None = None,
) -> DataAnalysis:
    """Analyse a CSV file (default: the built-in Q4 sales data), then report and notify `recipient`."""
    if csv_path is None:
        dataset, source, prompt = sales_dataset(), "Q4 sales", DEFAULT_PROMPT
    else:
        dataset, source = load_csv(csv_path), Path(csv_path).name
        prompt = f"Analyze the data in {source}"
    analyst = durable_analyst(model)
    result = await analyst.run(prompt, deps=dataset, capabilities=fault_injection(analyst.name))
    analysis: DataAnalysis = result.output
    report = generate_report(analysis, source)
    send_notification(
        report,
        subject=f"Data analysis: {source}",
        to=recipient,
        outbox=outbox or str(DEFAULT_OUTBOX),
        message_id=str(flow_run.id),
    )
    return analysis


def main(argv: list[str] | None = None) -> int:
    """Run the flow once and print where the notification went and what it says."""
    parser = argparse.ArgumentParser(prog="python -m examples.analyze_and_report", description=__doc__)
    parser.add_argument("--csv", metavar="PATH", help="CSV file to analyse (default: built-in sales data)")
    parser.add_argument(
        "--outbox", metavar="DIR", default=str(DEFAULT_OUTBOX), help="where to write the .eml"
    )
    parser.add_argument("--to", default=DEFAULT_RECIPIENT, help="recipient of the notification")
    parser.add_argument("--model", help="pydantic-ai model string, e.g. openai:gpt-4o (default: offline)")
    args = parser.parse_args(argv)
    if args.csv is not None:
        try:
            load_csv(args.csv)
        except DatasetError as error:
            print(f"error: {error}", file=sys.stderr)
            return 2
    return asyncio.run(_run_once(args))


async def _run_once(args: argparse.Namespace) -> int:
    state = await analyze_and_report(
        csv_path=args.csv, outbox=args.outbox, recipient=args.to, model=args.model, return_state=True
    )
    run_id = str(state.state_details.flow_run_id)
    if not state.is_completed():
        print(f"error: flow run {run_id} ended {state.name}: {state.message}", file=sys.stderr)
        return 1
    analysis: DataAnalysis = await state.aresult()
    print(analysis.summary)
    print(f"Notification: {notification_path(args.outbox, run_id)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
