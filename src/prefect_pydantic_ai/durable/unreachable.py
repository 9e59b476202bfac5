"""The Prefect API going away mid-run: the run rides out what Prefect's client retries, then stops in one line.

A run's steps need the journal (the result storage), not the API: their task-run states travel as events in the
background, and Prefect's events client keeps the ones the API did not confirm and sends them again when it
reconnects. What needs the API is the flow level: tagging the flow run, the ledger artifact, the flow run's
states. Prefect's client retries a refused connection and a 502/503/504 with a back-off (2 s, 4 s, 8 s, ...,
`PREFECT_CLIENT_MAX_RETRIES` times, 5 by default: about 62 s), so a shorter outage only delays the run.

When a call still fails after its retries, the run stops there. Inside its flow run, `ApiUnreachable`, Prefect's
`Abort` signal, ends the flow engine without it trying to report the failure (another round of retries, as long,
that would fail the same way); where the run was started, that becomes `PrefectUnreachableError`, one line naming
the API and the command that continues the run, and Prefect's events client stops retrying the events it could
not send (each would hold up the process's exit ~7 s). Prefect's record of the run is repaired once the server
is back: the flow run was left Running by a process that is gone, so whoever looks first (`runs`, `show`,
`resume`, a new attempt with the same key) settles it (`store.crashes`), its steps Completed where the run record
says so.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from uuid import UUID

import httpx
from prefect.exceptions import Abort
from prefect.settings import PREFECT_API_URL, PREFECT_CLIENT_MAX_RETRIES

from prefect_pydantic_ai.compat.prefect import send_each_event_once
from prefect_pydantic_ai.errors import PrefectUnreachableError
from prefect_pydantic_ai.infra.server import cli_name

_NO_ANSWER = (502, 503, 504)  # a gateway or the server saying it cannot serve: retried by Prefect's client


class ApiUnreachable(Abort):
    """Prefect's signal that the flow run ends here without a state report (no API to take one), carrying the
    error that the run's caller gets."""

    def __init__(self, error: PrefectUnreachableError) -> None:
        super().__init__(str(error))
        self.error = error


def is_unreachable(exc: BaseException) -> bool:
    """Whether `exc` is the Prefect API not answering a request of this process (not another server a tool or a
    model talks to): no connection, a timeout, a dropped connection, or a 502/503/504 after the retries."""
    if isinstance(exc, httpx.HTTPStatusError):
        if exc.response.status_code not in _NO_ANSWER:
            return False
    elif not isinstance(exc, httpx.TransportError):
        return False
    api = PREFECT_API_URL.value()
    try:
        return bool(api) and str(exc.request.url).startswith(api.rstrip("/"))
    except RuntimeError:  # raised outside a request: not one of the API's
        return False


def api_gone(exc: BaseException) -> bool:
    """Whether `exc` ends a run for want of the Prefect API: unreachable, or a run inside it that stopped so."""
    return isinstance(exc, ApiUnreachable) or is_unreachable(exc)


@contextmanager
def stopping_when_unreachable(flow_run_id: UUID, key: str | None) -> Iterator[None]:
    """Inside a flow run: the Prefect API not answering ends the flow run at once, with `ApiUnreachable`."""
    try:
        yield
    except Exception as exc:
        if not is_unreachable(exc):
            raise
        raise ApiUnreachable(stopped(exc, flow_run_id, key)) from None


@contextmanager
def unreachable_api_ends_run(flow_run_id: Callable[[], UUID | None], key: str | None) -> Iterator[None]:
    """Where a run of ours is started (a bare run, a resume): the run's end for want of the Prefect API is
    `PrefectUnreachableError`, whether its flow run stopped itself or Prefect's engine failed to report a state.
    `flow_run_id` tells the flow run once it exists."""
    try:
        yield
    except ApiUnreachable as stop:
        send_each_event_once()  # the run's unsent events would hold up the process's exit (see there)
        raise stop.error from None
    except Exception as exc:
        if not is_unreachable(exc):
            raise
        send_each_event_once()
        started = flow_run_id()
        raise (did_not_start(exc) if started is None else stopped(exc, started, key)) from None


def stopped(exc: BaseException, flow_run_id: UUID, key: str | None) -> PrefectUnreachableError:
    """The error of a run that stopped because the API did not answer: what failed, and how to continue."""
    if key is not None:
        ref, how = repr(key), f"run it again with idempotency_key={key!r} or `{cli_name()} resume {key}`"
    else:
        ref, how = str(flow_run_id), f"`{cli_name()} resume {flow_run_id}` continues it"
    return PrefectUnreachableError(
        f"The Prefect API at {_api()} did not answer ({_cause(exc)}) through Prefect's client retries "
        f"({retry_window()}), so run {ref} stopped; its completed steps are kept in the journal. Once the server "
        f"is back, {how}: nothing that completed runs again."
    )


def did_not_start(exc: BaseException) -> PrefectUnreachableError:
    """The error of a run whose flow run could not be created: nothing ran."""
    return PrefectUnreachableError(
        f"The Prefect API at {_api()} did not answer ({_cause(exc)}), so the run did not start and nothing "
        "executed. Start the server (or fix PREFECT_API_URL) and run it again."
    )


def retry_window() -> str:
    """How long Prefect's client keeps retrying a request that gets no answer, as its settings say (the jitter
    of ±20% aside): back-offs of 2, 4, 8, ... seconds, one per retry."""
    retries = PREFECT_CLIENT_MAX_RETRIES.value()
    return f"PREFECT_CLIENT_MAX_RETRIES={retries}, ~{2 ** (retries + 1) - 2}s"


def _api() -> str:
    return PREFECT_API_URL.value() or "(no PREFECT_API_URL)"


def _cause(exc: BaseException) -> str:
    if isinstance(exc, httpx.HTTPStatusError):
        return f"HTTP {exc.response.status_code} {exc.response.reason_phrase}"
    return f"{type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'no answer'}"
