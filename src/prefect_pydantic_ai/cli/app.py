"""`prefect-pydantic-ai`: list agent runs, show their steps, resume crashed or failed runs, report costs, demo."""

from __future__ import annotations

import asyncio
import json
import shlex
import sys
from collections.abc import Callable, Coroutine
from functools import wraps
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, TypeVar

import httpx
import typer

from prefect_pydantic_ai.cli.display import (
    STATE_STYLE,
    console,
    errors,
    listing,
    print_detail,
    print_step,
    seconds,
    when,
)
from prefect_pydantic_ai.compat.typer import NoArgsIsHelpError, UsageError

if TYPE_CHECKING:
    from prefect_pydantic_ai.infra.cluster import Cluster

_API_HELP = (
    "Commands talk to the Prefect API in PREFECT_API_URL when it is set, else to the persistent local Prefect "
    "server of PREFECT_HOME (started on first use; see `server status`)."
)
app = typer.Typer(
    help=f"Durable Pydantic AI agents on Prefect: see, resume and account for agent runs. {_API_HELP}",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
)

_T = TypeVar("_T")


def _user_errors(fn: Callable[..., _T]) -> Callable[..., _T]:
    """Turn errors the user can fix into one readable line and exit code 2 (no traceback)."""

    @wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> _T:
        from prefect_pydantic_ai.errors import PrefectUnreachableError, RunError
        from prefect_pydantic_ai.store.prefect_rest import ApiError

        try:
            return fn(*args, **kwargs)
        except (RunError, ValueError) as exc:  # a bad CSV (DatasetError) is a ValueError too
            errors.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None
        except (
            httpx.TransportError,
            ApiError,
            PrefectUnreachableError,
        ) as exc:  # not the user's input: exit 1, one line naming the server
            line = _unreachable(exc) if isinstance(exc, httpx.TransportError) else str(exc)
            errors.print(f"[red]error:[/red] {line}", highlight=False, soft_wrap=True)
            raise typer.Exit(1) from None
        except Exception as exc:
            if not _is_user_error(exc):
                raise
            errors.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper


def _is_user_error(exc: Exception) -> bool:
    """pydantic-ai's `UserError` (a misconfigured agent), checked without importing pydantic-ai for every command:
    an error of its class can only have been raised once it was imported."""
    module = sys.modules.get("pydantic_ai.exceptions")
    return module is not None and isinstance(exc, module.UserError)


def _unreachable(exc: httpx.TransportError) -> str:
    """One line for a Prefect API that did not answer: its URL, what failed, and what to do."""
    from prefect_pydantic_ai.infra.server import cli_name
    from prefect_pydantic_ai.prefect_settings import prefect_settings

    url = prefect_settings().api_url or "the configured Prefect API"
    try:
        if not str(exc.request.url).startswith(url):  # not the API itself: name what did not answer
            url = str(exc.request.url.copy_with(query=None))
    except RuntimeError:  # an error raised outside a request names no URL
        pass
    return (
        f"Cannot reach the Prefect API at {url} ({type(exc).__name__}: {exc or 'no answer'}). Start it "
        f"(`{cli_name()} server start` for the local one) or fix PREFECT_API_URL, then run the command again."
    )


def _run(coro: Coroutine[Any, Any, _T]) -> _T:
    """Run a command's Prefect work, first pointing Prefect at its configured API or the local server."""
    from prefect_pydantic_ai.infra.server import ensure_api

    _server_call(ensure_api)
    return asyncio.run(coro)


_STATES = ("completed", "failed", "crashed", "running", "paused", "cancelled", "pending")


@app.command("runs")
@_user_errors
def runs_command(
    state: Annotated[
        str | None,
        typer.Option(
            help="Only runs in this state: completed, failed, crashed, ... (any case).", show_default=False
        ),
    ] = None,
    agent: Annotated[str | None, typer.Option(help="Only runs of this agent.")] = None,
    limit: Annotated[int, typer.Option(min=1, help="At most this many runs.")] = 20,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON (documented in docs/cli.md).")] = False,
) -> None:
    """List agent runs, newest first. A run whose process died is marked crashed."""
    from prefect_pydantic_ai.cli.display import dumps
    from prefect_pydantic_ai.ops.runs import list_runs

    if state is not None:
        if state.lower() not in _STATES:
            raise ValueError(f"Unknown state {state!r}; use one of: {', '.join(_STATES)}.")
        state = state.lower()
    found = _run(list_runs(state=state, agent=agent, limit=limit))
    if as_json:
        print(dumps(found))
        return
    if not found:
        console.print(_no_runs(state, agent))
        return
    # Fits 80 columns: ids, states and headers are never cut (no rules: they cost 9 columns); keys and
    # agent names wrap; times drop the year and the seconds.
    table = listing("Agent runs")
    for column in ("Run id", "Key", "Agent", "State", "Steps", "Replayed", "Started", "Took"):
        table.add_column(
            column,
            justify="right" if column in ("Steps", "Replayed", "Took") else "left",
            no_wrap=column in ("Run id", "State", "Started"),
            min_width={"Run id": 12, "State": 9, "Key": 5}.get(column, len(column)),
            overflow="fold",
        )
    for run in found:
        style = STATE_STYLE.get(run.state, "")
        table.add_row(
            run.run_id[:12],
            run.idempotency_key or "-",
            ", ".join(run.agents),
            (f"[{style}]{run.state}[/{style}]" if style else run.state)
            + (f"\nawaiting approval: {', '.join(run.awaiting)}" if run.awaiting else "")
            + ("\n(re-call)" if run.recall else ""),  # it returned the key's stored output
            "-" if run.recall else str(run.steps_completed),  # it neither ran nor replayed a step
            "-" if run.recall else str(run.steps_replayed),
            when(run.started)[5:-3],
            seconds(run.duration_s),
        )
    console.print(table)
    _ui_footer(found[0].run_id if len(found) == 1 else None)


def _no_runs(state: str | None, agent: str | None) -> str:
    """What an empty `runs` listing says: which filter found nothing."""
    if agent is not None and state is not None:
        return f"No {state} runs of agent {agent!r}."
    if agent is not None:
        return f"No runs of agent {agent!r}."
    if state is not None:
        return f"No {state} runs."
    return "No agent runs yet."


@app.command("show")
@_user_errors
def show_command(
    run: Annotated[str, typer.Argument(help="Flow run id, a unique prefix of it, or an idempotency key.")],
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON (documented in docs/cli.md).")] = False,
) -> None:
    """Show a run's steps: ✓ executed, ⚡ replayed, ↻ retried, ✗ failed, ⊘ not reached."""
    from prefect_pydantic_ai.cli.display import show_json
    from prefect_pydantic_ai.ops.show import show_run

    detail = _run(show_run(run))
    if as_json:
        print(json.dumps(show_json(detail), indent=2, default=str))
        return
    print_detail(detail)
    _ui_footer(detail.run_id)


def _ui_footer(run_id: str | None) -> None:
    """Where to see it in the Prefect UI: the run's page, or the UI's list of runs."""
    from prefect_pydantic_ai.infra.server import run_url
    from prefect_pydantic_ai.prefect_settings import prefect_settings

    ui = prefect_settings().ui_url
    if ui:
        console.print(f"[dim]Prefect UI: {run_url(run_id) if run_id else ui.rstrip('/') + '/runs'}[/dim]")


@app.command("resume")
@_user_errors
def resume_command(
    run: Annotated[str | None, typer.Argument(help="Flow run id, unique prefix, or idempotency key.")] = None,
    all_crashed: Annotated[bool, typer.Option("--all-crashed", help="Resume every crashed run.")] = False,
    agent: Annotated[str | None, typer.Option(help="With --all-crashed: only runs of this agent.")] = None,
    entrypoint: Annotated[
        str | None, typer.Option(help="module:attribute of the agent or flow, when the recorded one is gone.")
    ] = None,
    unverified: Annotated[
        str | None,
        typer.Option(
            help="For calls of non-idempotent tools whose effect is unverified: 'rerun' calls them again, "
            "'tell_model' tells the model the effect may or may not have happened."
        ),
    ] = None,
    budget: Annotated[
        float | None,
        typer.Option(help="Raise the run's budget to this many dollars (over all its attempts)."),
    ] = None,
    budget_tokens: Annotated[
        int | None, typer.Option(help="Raise the run's budget to this many tokens (over all its attempts).")
    ] = None,
) -> None:
    """Run a crashed or failed run again in place: completed steps replay, the rest executes."""
    if (run is None) == (not all_crashed):
        raise ValueError("Give a RUN to resume, or --all-crashed (not both).")
    if unverified not in (None, "rerun", "tell_model"):
        raise ValueError(f"Unknown --unverified {unverified!r}; use rerun or tell_model.")
    targets = [run] if run is not None else _crashed_to_resume(agent)
    if not targets:
        console.print("No crashed runs to resume.")
        return
    raised = _budget(budget, budget_tokens)
    failures = 0
    for target in targets:
        failures += _resume_one(target, entrypoint, unverified, raised)
    if failures:
        raise typer.Exit(1)


def _crashed_to_resume(agent: str | None) -> list[str]:
    """The crashed runs `--all-crashed` resumes: not those whose key a later flow run completed (each is named)."""
    from prefect_pydantic_ai.ops.runs import completed_keys, list_runs

    crashed = _run(list_runs(state="crashed", agent=agent, limit=1000))
    done = _run(completed_keys({r.idempotency_key for r in crashed if r.idempotency_key}))
    targets = []
    for summary in crashed:
        if summary.idempotency_key in done:
            console.print(
                f"Skipped run {summary.run_id}: run {done[summary.idempotency_key]} completed its key "
                f"{summary.idempotency_key!r}; nothing to resume.",
                highlight=False,
            )
        else:
            targets.append(summary.run_id)
    return targets


def _budget(usd: float | None, tokens: int | None) -> Any:
    """`--budget` / `--budget-tokens` as a `Budget`, or None."""
    if usd is None and tokens is None:
        return None
    from decimal import Decimal

    from prefect_pydantic_ai.durable.budget import Budget

    if (usd is not None and usd <= 0) or (tokens is not None and tokens <= 0):
        raise ValueError("--budget and --budget-tokens must be greater than 0.")
    return Budget(usd=None if usd is None else Decimal(str(usd)), tokens=tokens)


def _resume_one(ref: str, entrypoint: str | None, unverified: str | None = None, budget: Any = None) -> int:
    from prefect_pydantic_ai.durable.steps import observe_steps
    from prefect_pydantic_ai.durable.wait import AwaitingApproval, WaitSuspended
    from prefect_pydantic_ai.errors import PrefectUnreachableError, RunError
    from prefect_pydantic_ai.ops.resume import Rescheduled, resume_run
    from prefect_pydantic_ai.ops.show import show_run

    before = _run(show_run(ref))
    if before.state == "completed":
        console.print(f"Run {before.run_id} already completed; its stored output (nothing executed):")
        console.print_json(json.dumps(before.output, default=str))
        return 0
    console.print(
        f"Resuming run [bold]{before.run_id}[/bold] ({before.name}), attempt {before.run_count + 1} ..."
    )
    stop = observe_steps(print_step)
    failed = 0
    try:
        resumed = _run(
            resume_run(ref, entrypoint=entrypoint, unverified=unverified, budget=budget)  # type: ignore[arg-type]
        )
        if isinstance(resumed, Rescheduled):
            console.print(
                f"Scheduled it again on its deployment; a worker of pool {resumed.work_pool or '?'} resumes it."
            )
            return 0
    except WaitSuspended as waiting:  # a wait nobody decided yet: waiting is an outcome, not a failure
        awaiting = AwaitingApproval(waiting.flow_run_id, waiting.calls)
        console.print(str(awaiting), highlight=False, markup=False, soft_wrap=True)
    except (RunError, PrefectUnreachableError):
        raise
    except Exception as exc:
        errors.print(f"[red]The resumed run failed:[/red] {type(exc).__name__}: {exc}", highlight=False)
        failed = 1
    finally:
        stop()
    print_detail(_run(show_run(before.run_id)))
    return failed


@app.command("costs")
@_user_errors
def costs_command(
    since: Annotated[str, typer.Option(help="Runs since: 7d, 24h, 30m or an ISO date.")] = "7d",
    agent: Annotated[str | None, typer.Option(help="Only this agent.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Totals across runs by agent and model: spent, saved by replay, and the share of work replay avoided."""
    from prefect_pydantic_ai.durable.report import usage_json, usd
    from prefect_pydantic_ai.ledger import Ledger, parse_since
    from prefect_pydantic_ai.ops.costs import ledgers_since

    found = _run(ledgers_since(parse_since(since), agent))
    by_agent: dict[str, Ledger] = {}
    for name, ledger in found:
        by_agent[name] = by_agent[name].merge(ledger) if name in by_agent else ledger
    total = Ledger()
    for ledger in by_agent.values():
        total = total.merge(ledger)
    if as_json:
        document = {
            "since": parse_since(since).isoformat(),
            "runs": len(found),
            "total": usage_json(total),
            "by_agent": {name: usage_json(ledger) for name, ledger in sorted(by_agent.items())},
            "by_model": {
                name: {
                    "spent": usage.spent.model_dump(mode="json"),
                    "saved": usage.saved.model_dump(mode="json"),
                }
                for name, usage in sorted(total.by_model.items())
            },
        }
        print(json.dumps(document, indent=2))
        return
    # Fits 80 columns without cutting a name: no rules (they cost 8 columns), names wrap, numbers never do.
    table = listing(f"Costs since {since} ({len(found)} attempts)")
    table.add_column("Agent / model", overflow="fold", min_width=13)
    for column in ("Calls\nspent", "Calls\nsaved", "Tokens\nspent", "Tokens\nsaved", "Spent", "Saved"):
        table.add_column(column, justify="right", no_wrap=True)

    def row(label: str, spent: Any, saved: Any) -> None:
        table.add_row(
            label,
            str(spent.model_calls),
            str(saved.model_calls),
            f"{spent.total_tokens:,}",
            f"{saved.total_tokens:,}",
            usd(spent),
            usd(saved),
        )

    for name, ledger in sorted(by_agent.items()):
        row(f"[bold]{name}[/bold]", ledger.spent, ledger.saved)
        for model, usage in sorted(ledger.by_model.items()):
            row(f"  {model}", usage.spent, usage.saved)
    console.print(table)
    share = total.share_avoided()
    avoided = f"Replay avoided {share.model_calls:.0%} of model calls and {share.tokens:.0%} of tokens"
    unpriced = sorted(m for m, u in total.by_model.items() if usd(u.spent + u.saved) == "unknown")
    if usd(total.spent + total.saved) == "unknown":  # say why, instead of "saved unknown of unknown"
        console.print(
            f"{avoided}; their cost is unknown: genai-prices has no price for {', '.join(unpriced)}."
        )
    else:
        partly = f" (not counting {', '.join(unpriced)}: no price)" if unpriced else ""
        console.print(f"{avoided}; saved {usd(total.saved)} of {usd(total.spent + total.saved)}{partly}.")


@app.command("demo")
@_user_errors
def demo_command(
    fail_at: Annotated[
        str, typer.Option(help="The step that fails in the first attempt.")
    ] = "detect_anomalies",
    kill: Annotated[
        bool, typer.Option("--kill", help="SIGKILL the first attempt at that step instead.")
    ] = False,
    model: Annotated[
        str | None,
        typer.Option(
            help="Any pydantic-ai model (e.g. openai:gpt-4o); default: the scripted offline analyst."
        ),
    ] = None,
    csv: Annotated[
        Path | None,
        typer.Option(
            help="Analyse this CSV instead of the built-in sales data.", exists=True, dir_okay=False
        ),
    ] = None,
    no_failure: Annotated[
        bool, typer.Option("--no-failure", help="Run once, without injecting a failure.")
    ] = False,
) -> None:
    """The seed's AI Data Analyst walkthrough for real: attempt 1 fails at a step, the retry replays the rest."""
    import time

    if kill and no_failure:
        raise ValueError("--kill needs a failure to inject; drop --no-failure.")
    from prefect_pydantic_ai.demo.walkthrough import check_options

    check_options(fail_at, csv)  # before the server boots: a bad option is answered at once
    from prefect_pydantic_ai.infra.server import LocalServer, start_api

    started = time.monotonic()
    api = _server_call(start_api)  # finds or boots the local server while the demo's imports run
    from prefect_pydantic_ai.demo.walkthrough import run_demo

    server = None if _server_call(api) is not None else LocalServer()  # opted out: a temporary server
    try:
        code = run_demo(
            fail_at=fail_at,
            kill=kill,
            model=model,
            csv=csv,
            inject_failure=not no_failure,
            server=server,
            started=started,
        )
    finally:
        if server is not None and server.process.poll() is None:
            server.stop()
    sys.exit(code)


@app.command("approve")
@_user_errors
def approve_command(
    run: Annotated[str, typer.Argument(help="Flow run id, unique prefix, or idempotency key.")],
    deny: Annotated[
        list[str] | None,
        typer.Option(help="Deny this call id (repeatable); --deny alone denies every pending call."),
    ] = None,
    deny_all: Annotated[bool, typer.Option("--deny-all", hidden=True)] = False,
    message: Annotated[str | None, typer.Option(help="What a denied call tells the model.")] = None,
    budget: Annotated[
        float | None, typer.Option(help="A run waiting at its budget: raise it to this many dollars.")
    ] = None,
    budget_tokens: Annotated[
        int | None, typer.Option(help="A run waiting at its budget: raise it to this many tokens.")
    ] = None,
    entrypoint: Annotated[
        str | None, typer.Option(help="module:attribute of the agent or flow, when the recorded one is gone.")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON (documented in docs/cli.md).")] = False,
) -> None:
    """Approve (or --deny) the calls a waiting run awaits; a script's run then continues here."""
    from prefect_pydantic_ai.ops.approve import approve_run

    denied = [] if deny_all else deny
    raised = _budget(budget, budget_tokens)
    decision = _run(approve_run(run, deny=denied, message=message, entrypoint=entrypoint, budget=raised))
    if as_json:
        document = decision.to_json()
        document["output"] = decision.output
        print(json.dumps(document, indent=2, default=str))
        return
    for call in decision.calls:
        verdict = "[red]denied[/red]" if call.call_id in decision.denied else "[green]approved[/green]"
        console.print(
            f"{verdict}  {call.describe()}  [dim]{call.call_id}[/dim]", highlight=False, soft_wrap=True
        )
    if decision.stopped:
        console.print(decision.stopped, highlight=False, soft_wrap=True, markup=False)
    elif decision.awaiting:
        console.print(
            f"Run {decision.run_id} is awaiting approval again: "
            + ", ".join(c.describe() for c in decision.awaiting),
            highlight=False,
            soft_wrap=True,
        )
    elif decision.continued:
        console.print(f"Run {decision.run_id} completed: {decision.output}", highlight=False, soft_wrap=True)
    else:
        console.print(f"Run {decision.run_id} continues where it waits (its process or Prefect).")


def _bare_deny(argv: list[str]) -> list[str]:
    """`approve RUN --deny` with no call id denies every call: spelled as the hidden `--deny-all`."""
    out = []
    for i, arg in enumerate(argv):
        following = argv[i + 1] if i + 1 < len(argv) else None
        if arg == "--deny" and (following is None or following.startswith("-")):
            out.append("--deny-all")
        else:
            out.append(arg)
    return out


# -- the Prefect server commands talk to -----------------------------------------------------------------------


def _print_version(value: bool) -> None:
    if value:
        from importlib.metadata import version

        print(f"prefect-pydantic-ai {version('prefect-pydantic-ai')}")
        raise typer.Exit()


@app.callback()
def _options(
    show_version: Annotated[
        bool,
        typer.Option("--version", callback=_print_version, is_eager=True, help="Print the version and exit."),
    ] = False,
) -> None:
    """Durable Pydantic AI agents on Prefect: see, resume and account for agent runs."""


def _server_call(fn: Callable[[], _T]) -> _T:
    """Call `fn`; a local server that cannot start is a one-line error with exit code 2."""
    from prefect_pydantic_ai.infra.server import LocalServerError

    try:
        return fn()
    except LocalServerError as exc:
        errors.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None


server_app = typer.Typer(
    help="The persistent local Prefect server used when no PREFECT_API_URL is configured.",
    no_args_is_help=True,
    rich_markup_mode=None,
)
app.add_typer(server_app, name="server")


def _home_and_configured() -> tuple[Path, str | None]:
    from prefect_pydantic_ai.infra.server import configured_api, prefect_home

    return prefect_home(), configured_api()


def _print_status(document: dict[str, Any], as_json: bool) -> None:
    if as_json:
        print(json.dumps(document, indent=2))
    elif document["running"]:
        console.print(
            f"running  url {document['url']}  UI {document['ui_url']}  pid {document['pid']}  "
            f"PREFECT_HOME {document['prefect_home']}",
            highlight=False,
            soft_wrap=True,
        )
    else:
        console.print(
            f"not running  PREFECT_HOME {document['prefect_home']}", highlight=False, soft_wrap=True
        )
    if not as_json and document["configured_api_url"]:
        console.print(f"(commands use the configured PREFECT_API_URL {document['configured_api_url']})")


@server_app.command("status")
def server_status_command(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON (documented in docs/cli.md).")] = False,
) -> None:
    """Whether the local server of this PREFECT_HOME runs: its URL, UI, pid and PREFECT_HOME."""
    from prefect_pydantic_ai.infra.server import running_server, status_json

    home, configured = _home_and_configured()
    document = status_json(running_server(home), home)
    document["configured_api_url"] = configured
    _print_status(document, as_json)


@server_app.command("start")
def server_start_command(
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON (as `server status --json`).")] = False,
) -> None:
    """Start the local server of this PREFECT_HOME (or find it running) and wait until it answers."""
    from prefect_pydantic_ai.infra.server import find_or_start, status_json

    home, configured = _home_and_configured()
    if configured is not None:
        errors.print(
            f"[red]error:[/red] PREFECT_API_URL is configured ({configured}); unset it to use the local server.",
            highlight=False,
            soft_wrap=True,
        )
        raise typer.Exit(2)
    address = _server_call(lambda: find_or_start(home, announce=True))
    document = status_json(address, home)
    document["configured_api_url"] = None
    _print_status(document, as_json)


@server_app.command("env")
def server_env_command() -> None:
    """Print `export PREFECT_API_URL=...` for the API commands use (starting the local server if needed), so
    Prefect's own CLI reaches the same server: eval "$(prefect-pydantic-ai server env)"."""
    from prefect_pydantic_ai.infra.server import find_or_start

    home, configured = _home_and_configured()
    url = configured or _server_call(lambda: find_or_start(home, announce=True)).url
    print(f"export PREFECT_API_URL={shlex.quote(url)}")


@server_app.command("stop")
def server_stop_command() -> None:
    """Stop the local server of this PREFECT_HOME and forget its address."""
    from prefect_pydantic_ai.infra.server import prefect_home, stop_server

    home = prefect_home()
    stopped = stop_server(home)
    if stopped is None:
        console.print(f"No local server running for {home}.", highlight=False)
    else:
        console.print(
            f"Stopped the local Prefect server (pid {stopped.pid}) at {stopped.url}.", highlight=False
        )


def main() -> None:
    """The `prefect-pydantic-ai` command; a usage error is one line on stderr and exit code 2."""
    if "approve" in sys.argv[1:2]:
        sys.argv[1:] = _bare_deny(sys.argv[1:])
    try:
        code = app(standalone_mode=False)
    except NoArgsIsHelpError as exc:
        print(exc.ctx.get_help() if exc.ctx else exc.format_message())
        sys.exit(0)
    except UsageError as exc:
        errors.print(
            f"error: {exc.format_message()} (see --help)", highlight=False, soft_wrap=True, markup=False
        )
        sys.exit(2)
    except typer.Abort:  # end of input while a command read it
        sys.exit(130)
    if code == 130:  # Ctrl-C: typer turns the KeyboardInterrupt into exit code 130, silently
        from prefect_pydantic_ai.infra.server import cli_name

        errors.print(
            ("\n" if errors.is_terminal else "")  # below a live progress line, not after its ^C
            + f"Interrupted. An agent run it was in ends cancelled; `{cli_name()} resume RUN` continues it.",
            highlight=False,
            soft_wrap=True,
            markup=False,
        )
    sys.exit(code if isinstance(code, int) else 0)


@app.command("install-automations")
@_user_errors
def install_automations_command(
    within: Annotated[
        float | None,
        typer.Option(
            min=10,
            help="Seconds without a heartbeat after which a run is crashed "
            "(default: 3 x PREFECT_FLOWS_HEARTBEAT_FREQUENCY).",
        ),
    ] = None,
) -> None:
    """Install the Prefect automation that marks a run Crashed when its heartbeats stop (docs/scale-out.md)."""
    from prefect_pydantic_ai.infra.automations import (
        CRASH_AUTOMATION,
        default_within,
        install_crash_automation,
    )

    automation_id, created = _run(install_crash_automation(within))
    seconds_ = default_within() if within is None else within
    console.print(
        f"{'Created' if created else 'Updated'} automation [bold]{CRASH_AUTOMATION}[/bold] ({automation_id}): "
        f"a flow run with no heartbeat for {seconds_:g}s is marked Crashed."
    )


# -- a production-shaped cluster on this machine (docs/scale-out.md) -------------------------------------------

cluster_app = typer.Typer(
    help="A Prefect cluster on this machine: PostgreSQL, Redis, a Prefect server, a process work pool and "
    "workers that each act as their own machine (docs/scale-out.md).",
    no_args_is_help=True,
    rich_markup_mode=None,
)
app.add_typer(cluster_app, name="cluster")

_DirOption = Annotated[
    Path, typer.Option("--dir", help="The cluster's directory: state, logs, journal.", show_default=True)
]


def _cluster_errors(fn: Callable[[], _T]) -> _T:
    """Call `fn`; a cluster that cannot be started, found or stopped is a one-line error with exit code 2."""
    from prefect_pydantic_ai.infra.cluster import ClusterError

    try:
        return fn()
    except ClusterError as exc:
        errors.print(f"[red]error:[/red] {exc}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None


@cluster_app.command("up")
def cluster_up_command(
    directory: _DirOption = Path(".cluster"),
    workers: Annotated[int, typer.Option(min=0, max=26, help="How many workers (machines).")] = 2,
    limit: Annotated[int, typer.Option(min=1, help="Flow runs each worker runs at once.")] = 10,
    within: Annotated[
        float, typer.Option(min=35, help="Seconds without a heartbeat before a run is crashed.")
    ] = 90.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON (as `cluster status --json`).")] = False,
) -> None:
    """Start the cluster and wait until every part answers; prints the UI address."""
    from prefect_pydantic_ai.infra.cluster import ClusterConfig, cluster_up
    from prefect_pydantic_ai.infra.server import cli_name

    config = ClusterConfig(workers=workers, worker_limit=limit, crash_within=within)
    say = (lambda line: None) if as_json else (lambda line: errors.print(f"[dim]{line} ...[/dim]"))
    cluster = _cluster_errors(lambda: cluster_up(directory, config, progress=say))
    if as_json:
        print(json.dumps(cluster.to_json(), indent=2))
        return
    _print_cluster(cluster)
    console.print(
        f'Use it from a shell: eval "$({cli_name()} cluster env --dir {directory})"; '
        f"stop everything with `{cli_name()} cluster down --dir {directory}`.",
        highlight=False,
        soft_wrap=True,
    )


def _print_cluster(cluster: Cluster) -> None:
    console.print(f"Prefect UI: [bold]{cluster.ui_url}[/bold]  (API {cluster.api_url})", highlight=False)
    table = listing()
    for column in ("Component", "State", "Pid", "Address"):
        table.add_column(column, no_wrap=column != "Address", overflow="fold")
    for component in cluster.components:
        alive = component.alive()
        where = component.address + (f", hostname {component.hostname}" if component.hostname else "")
        state = "[green]alive[/green]" if alive else "[red]dead[/red]"
        table.add_row(component.name, state, str(component.pid), where)
    console.print(table)
    hostnames = (
        "each worker has its own hostname and PREFECT_HOME"
        if cluster.own_hostnames
        else "workers have their own PREFECT_HOME but share this hostname (own hostnames need root)"
    )
    console.print(
        f"Work pool {cluster.pool}; {hostnames}; journal {cluster.journal}; step locks {cluster.locks_url}.",
        highlight=False,
        soft_wrap=True,
    )


@cluster_app.command("status")
def cluster_status_command(
    directory: _DirOption = Path(".cluster"),
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON (documented in docs/cli.md).")] = False,
) -> None:
    """Each part of the cluster, alive or dead, with its address; exit 1 if one is dead."""
    from prefect_pydantic_ai.infra.cluster import cluster_status

    cluster = _cluster_errors(lambda: cluster_status(directory))
    if as_json:
        print(json.dumps(cluster.to_json(), indent=2))
    else:
        _print_cluster(cluster)
    if not all(c.alive() for c in cluster.components):
        raise typer.Exit(1)


@cluster_app.command("env")
def cluster_env_command(directory: _DirOption = Path(".cluster")) -> None:
    """Print the `export` lines that make this shell's runs use the cluster."""
    import shlex

    from prefect_pydantic_ai.infra.cluster import cluster_status

    cluster = _cluster_errors(lambda: cluster_status(directory))
    for name, value in cluster.client_env().items():
        print(f"export {name}={shlex.quote(value)}")


@cluster_app.command("restart")
def cluster_restart_command(
    part: Annotated[str, typer.Argument(help="postgresql, redis, server or worker.")],
    name: Annotated[str | None, typer.Argument(help="The worker's name (host-a, ...).")] = None,
    directory: _DirOption = Path(".cluster"),
) -> None:
    """Stop one part of the cluster if it runs and start it again on its port, with its data and settings."""
    from prefect_pydantic_ai.infra.cluster import cluster_restart

    component, stopped = _cluster_errors(lambda: cluster_restart(directory, part, name))
    console.print(
        f"{'Restarted' if stopped else 'Started'} {component.name} (pid {component.pid}) at {component.address}.",
        highlight=False,
        soft_wrap=True,
    )


@cluster_app.command("down")
def cluster_down_command(directory: _DirOption = Path(".cluster")) -> None:
    """Stop every process the cluster started and remove its directory."""
    from prefect_pydantic_ai.infra.cluster import cluster_down

    stopped = _cluster_errors(lambda: cluster_down(directory))
    names = ", ".join(c.name for c in stopped) or "nothing was running"
    console.print(f"Stopped {names}; removed {directory.resolve()}.", highlight=False, soft_wrap=True)


@app.command("web")
@_user_errors
def web_command(
    agent: Annotated[
        str,
        typer.Argument(
            help="module:attribute or path/to/file.py:attribute of a PrefectAgent (approvals='pause')."
        ),
    ],
    host: Annotated[str, typer.Option(help="Interface to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
    events_dir: Annotated[
        Path | None,
        typer.Option(help="Where conversations and their event logs live (default: beside the journal)."),
    ] = None,
) -> None:
    """Chat with a durable agent in the browser: each turn is a durable run whose stream survives a closed tab
    and a restarted server."""
    import uvicorn

    from prefect_pydantic_ai.store.records import load_entrypoint
    from prefect_pydantic_ai.web.app import durable_chat_app

    chat = durable_chat_app(load_entrypoint(agent), events_dir=events_dir)
    console.print(
        f"Chat with {agent} at http://{host}:{port}/ (Ctrl-C stops)", highlight=False, soft_wrap=True
    )
    uvicorn.run(chat, host=host, port=port, log_level="warning")


# -- the journal as a tool: export, fork (issue #30) -----------------------------------------------------------


@app.command("export")
@_user_errors
def export_command(
    run: Annotated[str, typer.Argument(help="Flow run id, unique prefix, or idempotency key.")],
    output: Annotated[
        Path | None, typer.Option("--output", "-o", help="Write the cassette here (default: stdout).")
    ] = None,
) -> None:
    """Write a run's steps, of every agent run in it, as a cassette that prefect_pydantic_ai.testing replays."""
    from prefect_pydantic_ai.ops.export import cassette_json, export_run

    document = _run(export_run(run, output))
    if output is None:
        sys.stdout.write(cassette_json(document))
        return
    steps = sum(len(r["steps"]) for r in document["runs"])
    agents = f" of {len(document['runs'])} agent runs" if len(document["runs"]) > 1 else ""
    console.print(f"Wrote {steps} steps{agents} of run {document['run_id']} to {output}.", highlight=False)


def _json_or_text(value: str) -> Any:
    """A `--tool-result`: JSON when it parses, else the text itself."""
    try:
        return json.loads(value)
    except ValueError:
        return value


@app.command("fork")
@_user_errors
def fork_command(
    run: Annotated[str, typer.Argument(help="Flow run id, unique prefix, or idempotency key.")],
    at: Annotated[int, typer.Option("--at", help="The first step (its # in `show`) that runs live.")],
    prompt: Annotated[str | None, typer.Option(help="Run with this prompt instead of the original.")] = None,
    model: Annotated[
        str | None, typer.Option(help="Run the live steps on this model (e.g. openai:gpt-4o).")
    ] = None,
    tool_result: Annotated[
        str | None,
        typer.Option(
            "--tool-result", help="The tool step --at returns this (JSON, else text) instead of running."
        ),
    ] = None,
    entrypoint: Annotated[
        str | None, typer.Option(help="module:attribute of the agent or flow, when the recorded one is gone.")
    ] = None,
) -> None:
    """Start a new run that replays RUN's steps before --at from its journal (paying for none), then runs live."""
    from prefect_pydantic_ai.durable.fork import NO_RESULT
    from prefect_pydantic_ai.durable.steps import observe_steps
    from prefect_pydantic_ai.errors import PrefectUnreachableError, RunError
    from prefect_pydantic_ai.ops.fork import fork_run
    from prefect_pydantic_ai.ops.show import show_run

    stop = observe_steps(print_step)
    try:
        forked = _run(
            fork_run(
                run,
                at=at,
                prompt=prompt,
                model=model,
                tool_result=NO_RESULT if tool_result is None else _json_or_text(tool_result),
                entrypoint=entrypoint,
            )
        )
    except (RunError, PrefectUnreachableError, ValueError):
        raise
    except Exception as exc:
        if _is_user_error(exc):
            raise
        errors.print(f"[red]The fork failed:[/red] {type(exc).__name__}: {exc}", highlight=False)
        raise typer.Exit(1) from None
    finally:
        stop()
    console.print(
        f"Forked run [bold]{forked.run_id}[/bold] from {forked.forked_from} at step #{forked.at}: "
        f"{forked.replayed} step(s) replayed from its journal."
    )
    print_detail(_run(show_run(forked.run_id)))
    _ui_footer(forked.run_id)


@app.command("gc")
@_user_errors
def gc_command(
    older_than: Annotated[
        str, typer.Option("--older-than", help="Runs that ended before this: 30d, 24h, 30m or an ISO date.")
    ],
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="Say what would be removed; remove nothing.")
    ] = False,
    include_unfinished: Annotated[
        bool,
        typer.Option("--include-unfinished", help="Remove failed, crashed, cancelled and paused runs too."),
    ] = False,
    agent: Annotated[str | None, typer.Option(help="Only runs of this agent.")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False,
) -> None:
    """Remove the journal entries, markers, records and progress logs of finished runs older than --older-than."""
    from prefect_pydantic_ai.ledger import parse_since
    from prefect_pydantic_ai.ops.gc import collect_garbage

    report = _run(
        collect_garbage(
            parse_since(older_than), dry_run=dry_run, include_unfinished=include_unfinished, agent=agent
        )
    )
    if as_json:
        document = {
            "before": report.before.isoformat(),
            "dry_run": report.dry_run,
            "runs": report.runs,
            "files": report.files,
            "bytes": report.bytes,
            "kept": report.kept,
        }
        print(json.dumps(document, indent=2))
        return
    verb = "Would remove" if dry_run else "Removed"
    console.print(
        f"{verb} {report.files} files ({report.bytes:,} bytes) of {len(report.runs)} runs that ended before "
        f"{report.before:%Y-%m-%d %H:%M} UTC.",
        highlight=False,
    )
    if report.kept:
        console.print(f"Kept {len(report.kept)} older runs:", highlight=False)
        for run_id, why in report.kept.items():
            console.print(f"  {run_id}: {why}", highlight=False, soft_wrap=True)
