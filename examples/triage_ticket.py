"""Pattern 3: a conditional workflow routed by an agent's typed output.

A triage agent reads a `SupportTicket`, looks the customer up, and returns a validated `TicketTriage`. The flow
then runs exactly one of three Prefect tasks, and Prefect records which one ran:

- ``escalate_to_oncall`` for a critical ticket,
- ``route_to_billing_team`` for any other billing ticket,
- ``assign_to_support_queue`` for everything else.

Each routing task files the ticket and its triage as ``<queue dir>/<team>/<ticket id>.json``. Run it with::

    python -m examples.triage_ticket [--text TEXT [--id ID] [--customer ID]] [--queue-dir DIR] [--model MODEL]

Without ``--text`` it triages three sample tickets, one for each branch. Without ``--model`` the triage agent
is a scripted offline policy (not an LLM) that classifies the ticket's words and the customer's plan.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
import tempfile
from pathlib import Path
from typing import Literal

from prefect import flow, task
from pydantic import BaseModel, Field, TypeAdapter
from pydantic_ai import Agent, RunContext
from pydantic_ai.messages import (
    BaseToolReturnPart,
    ModelMessage,
    ModelRequest,
    ModelResponse,
    ToolCallPart,
    UserPromptPart,
)
from pydantic_ai.models import Model
from pydantic_ai.models.function import AgentInfo, FunctionModel
from pydantic_core import to_jsonable_python

from examples import fault_injection
from prefect_pydantic_ai import PrefectAgent, TaskConfig

__all__ = [
    "DEFAULT_QUEUE_DIR",
    "SAMPLE_TICKETS",
    "CustomerRecord",
    "Routing",
    "SupportTicket",
    "TicketTriage",
    "assign_to_support_queue",
    "build_triage_agent",
    "escalate_to_oncall",
    "lookup_customer",
    "main",
    "offline_triage_model",
    "route_to_billing_team",
    "triage_agent",
    "triage_policy",
    "triage_prompt",
    "triage_ticket",
]

DEFAULT_QUEUE_DIR = Path(tempfile.gettempdir()) / "prefect-pydantic-ai" / "queues"
"""Where routed tickets are filed unless the flow is given another directory."""

Severity = Literal["critical", "high", "medium", "low"]
Category = Literal["billing", "technical", "account", "general"]
Plan = Literal["enterprise", "team", "free", "unknown"]
Team = Literal["oncall", "billing", "support"]


class SupportTicket(BaseModel):
    """A ticket as the help desk receives it."""

    id: str
    text: str
    customer_id: str


class TicketTriage(BaseModel):
    """The triage agent's verdict, which decides the route."""

    severity: Severity = Field(description="critical: service down or data at risk; low: a question.")
    category: Category
    priority: int = Field(ge=1, le=5, description="1 is the most urgent.")


class CustomerRecord(BaseModel):
    """What the help desk knows about a customer."""

    customer_id: str
    plan: Plan
    name: str


class Routing(BaseModel):
    """Where a ticket went."""

    team: Team
    ticket_id: str
    triage: TicketTriage
    path: str = Field(description="The file the ticket was filed as.")


_CUSTOMERS = {
    "cus_acme": CustomerRecord(customer_id="cus_acme", plan="enterprise", name="Acme Corp"),
    "cus_globex": CustomerRecord(customer_id="cus_globex", plan="team", name="Globex"),
    "cus_jane": CustomerRecord(customer_id="cus_jane", plan="free", name="Jane Doe"),
}

SAMPLE_TICKETS = [
    SupportTicket(
        id="T-1001",
        customer_id="cus_acme",
        text="Production is down for all users since 09:00; the API returns 500 errors on every request.",
    ),
    SupportTicket(
        id="T-1002",
        customer_id="cus_globex",
        text="We were charged twice for the March invoice. Please refund the duplicate payment.",
    ),
    SupportTicket(
        id="T-1003",
        customer_id="cus_jane",
        text="Just a question: how do I export my reports to CSV?",
    ),
]
"""One ticket for each branch: on-call, billing, support queue."""


def lookup_customer(ctx: RunContext[SupportTicket]) -> CustomerRecord:
    """Look up the plan and name of the customer who opened the ticket."""
    customer_id = ctx.deps.customer_id
    return _CUSTOMERS.get(
        customer_id, CustomerRecord(customer_id=customer_id, plan="unknown", name="unknown")
    )


def triage_prompt(ticket: SupportTicket) -> str:
    """The request the triage agent gets: the ticket's ids, a blank line, then its text."""
    return f"Triage support ticket {ticket.id} from customer {ticket.customer_id}.\n\n{ticket.text}"


TRIAGE_INSTRUCTIONS = (
    "You triage support tickets. Call lookup_customer, then answer with a TicketTriage: severity critical when "
    "a service is down or data is at risk, high for errors blocking work, low for questions, else medium; the "
    "category the ticket is about; priority 1 (most urgent) to 5, one step more urgent for enterprise customers "
    "and one step less for free ones."
)


def build_triage_agent(model: Model | str | None = None) -> Agent[SupportTicket, TicketTriage]:
    """The triage agent; `model=None` uses the scripted offline triager."""
    return Agent(
        offline_triage_model() if model is None else model,
        name="ticket_triage",
        deps_type=SupportTicket,
        output_type=TicketTriage,
        instructions=TRIAGE_INSTRUCTIONS,
        tools=[lookup_customer],
        retries=2,
    )


# -- the scripted offline policy: it reads only the messages and tool definitions a model receives -----------


def offline_triage_model() -> FunctionModel:
    """A scripted stand-in for an LLM (`triage_policy`), needing no API key."""
    return FunctionModel(triage_policy, model_name="offline-triage (scripted)")


_SEVERITY_WORDS: list[tuple[Severity, tuple[str, ...]]] = [
    ("critical", ("outage", "is down", "down for", "data loss", "breach", "all users")),
    ("high", ("error", "errors", "fails", "failing", "broken", "crash", "cannot", "can't", "urgent")),
    ("low", ("question", "how do i", "how to", "feature request", "wondering")),
]
_CATEGORY_WORDS: list[tuple[Category, tuple[str, ...]]] = [
    ("billing", ("invoice", "billing", "charged", "refund", "payment", "subscription", "receipt")),
    ("technical", ("error", "errors", "api", "crash", "bug", "outage", "down", "timeout")),
    ("account", ("password", "login", "log in", "sign in", "2fa", "account")),
]
_BASE_PRIORITY: dict[Severity, int] = {"critical": 1, "high": 2, "medium": 3, "low": 4}
_PLAN_SHIFT: dict[Plan, int] = {"enterprise": -1, "team": 0, "free": 1, "unknown": 1}
_CUSTOMER = TypeAdapter(CustomerRecord)


def _mentions(text: str, phrases: tuple[str, ...]) -> bool:
    return any(re.search(rf"\b{re.escape(phrase)}\b", text) for phrase in phrases)


def triage_policy(messages: list[ModelMessage], info: AgentInfo) -> ModelResponse:
    """Look the customer up, then classify the ticket text by its words and set priority by severity and plan."""
    returns = [
        part
        for message in messages
        if isinstance(message, ModelRequest)
        for part in message.parts
        if isinstance(part, BaseToolReturnPart)
        and part.tool_name == "lookup_customer"
        and part.outcome == "success"
    ]
    if not returns:
        return ModelResponse(parts=[ToolCallPart("lookup_customer", {})])
    customer = _CUSTOMER.validate_python(to_jsonable_python(returns[-1].content))
    prompt = next(
        part.content
        for message in messages
        if isinstance(message, ModelRequest)
        for part in message.parts
        if isinstance(part, UserPromptPart) and isinstance(part.content, str)
    )
    text = prompt.partition("\n\n")[2].lower()
    severity: Severity = next((level for level, words in _SEVERITY_WORDS if _mentions(text, words)), "medium")
    category: Category = next((kind for kind, words in _CATEGORY_WORDS if _mentions(text, words)), "general")
    priority = min(max(_BASE_PRIORITY[severity] + _PLAN_SHIFT[customer.plan], 1), 5)
    answer = {"severity": severity, "category": category, "priority": priority}
    return ModelResponse(parts=[ToolCallPart(info.output_tools[0].name, answer)])


triage_agent = PrefectAgent(
    build_triage_agent(),
    model_task_config=TaskConfig(retries=3, retry_delay_seconds=[1.0, 2.0, 4.0], timeout_seconds=60.0),
    tool_task_config=TaskConfig(retries=2, retry_delay_seconds=[0.5, 1.0]),
)


# -- the branches --------------------------------------------------------------------------------------------


def _file(team: Team, ticket: SupportTicket, triage: TicketTriage, queue_dir: str) -> Routing:
    """File the ticket in the team's queue directory, atomically, under its id (refiling replaces it)."""
    path = Path(queue_dir) / team / f"{ticket.id}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    record = {"ticket": ticket.model_dump(), "triage": triage.model_dump(), "team": team}
    partial = path.with_name(path.name + ".partial")
    partial.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
    os.replace(partial, path)
    return Routing(team=team, ticket_id=ticket.id, triage=triage, path=str(path))


@task
def escalate_to_oncall(ticket: SupportTicket, triage: TicketTriage, queue_dir: str) -> Routing:
    """Escalate a critical ticket: file it in the on-call queue."""
    return _file("oncall", ticket, triage, queue_dir)


@task
def route_to_billing_team(ticket: SupportTicket, triage: TicketTriage, queue_dir: str) -> Routing:
    """File a billing ticket in the billing team's queue."""
    return _file("billing", ticket, triage, queue_dir)


@task
def assign_to_support_queue(ticket: SupportTicket, triage: TicketTriage, queue_dir: str) -> Routing:
    """File the ticket in the general support queue."""
    return _file("support", ticket, triage, queue_dir)


@flow(name="triage-support-ticket")
async def triage_ticket(
    ticket: SupportTicket, queue_dir: str | None = None, model: str | None = None
) -> Routing:
    """Triage `ticket` with the agent, then run the one routing task its triage calls for."""
    result = await triage_agent.run(
        triage_prompt(ticket), deps=ticket, model=model, capabilities=fault_injection(triage_agent.name)
    )
    triage: TicketTriage = result.output
    queues = queue_dir or str(DEFAULT_QUEUE_DIR)
    if triage.severity == "critical":
        return escalate_to_oncall(ticket, triage, queues)
    if triage.category == "billing":
        return route_to_billing_team(ticket, triage, queues)
    return assign_to_support_queue(ticket, triage, queues)


def main(argv: list[str] | None = None) -> int:
    """Triage one ticket given on the command line, or the three samples, and print each route."""
    parser = argparse.ArgumentParser(prog="python -m examples.triage_ticket", description=__doc__)
    parser.add_argument("--text", help="the ticket text (default: triage the three sample tickets)")
    parser.add_argument("--id", default="T-0001", help="ticket id for --text")
    parser.add_argument("--customer", default="cus_jane", help="customer id for --text")
    parser.add_argument("--queue-dir", default=str(DEFAULT_QUEUE_DIR), help="where routed tickets are filed")
    parser.add_argument("--model", help="pydantic-ai model string, e.g. openai:gpt-4o (default: offline)")
    args = parser.parse_args(argv)
    tickets = (
        SAMPLE_TICKETS
        if args.text is None
        else [SupportTicket(id=args.id, text=args.text, customer_id=args.customer)]
    )
    asyncio.run(_triage_all(tickets, args.queue_dir, args.model))
    return 0


async def _triage_all(tickets: list[SupportTicket], queue_dir: str, model: str | None) -> None:
    for ticket in tickets:
        routing = await triage_ticket(ticket, queue_dir=queue_dir, model=model)
        t = routing.triage
        print(
            f"{ticket.id} -> {routing.team} ({t.severity}, {t.category}, priority {t.priority}): {routing.path}"
        )


if __name__ == "__main__":
    sys.exit(main())
