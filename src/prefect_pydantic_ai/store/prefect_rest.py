"""Prefect's REST API over plain HTTP: the flow runs, task runs, states and run inputs that listing, showing and
settling runs need, without importing Prefect's client.

Importing Prefect costs about a second, most of what `runs` or `show` would take; these reads are a handful of
documented endpoints (`/flow_runs/filter`, `/task_runs/filter`, `/flow_runs/{id}/set_state`, ...). The models keep
only the fields we read and ignore the rest, so a newer server's additions do not break them. Requests carry the
API key or auth string Prefect would send, and are retried like Prefect's client retries them (429, 502, 503,
504 and connection errors, honouring Retry-After).
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
from collections.abc import AsyncIterator, Iterable
from datetime import datetime, timedelta
from enum import StrEnum
from typing import Any, Protocol
from uuid import UUID

import httpx
from pydantic import BaseModel, ConfigDict, Field

from prefect_pydantic_ai.prefect_settings import prefect_settings

TAG = "prefect-pydantic-ai"
RECALL_TAG = "prefect-pydantic-ai:recall"
FORK_TAG = "forked-from:"
"""A fork's flow run is tagged `forked-from:<original flow run id>` (the link the Prefect UI shows)."""
"""Tags a flow run that re-called a completed logical run: it returned the stored output and executed nothing."""

PAGE = 200  # the most a filter endpoint returns at once
_RETRIED = {429, 502, 503, 504}
_TRANSIENT = (httpx.ConnectError, httpx.TimeoutException, httpx.NetworkError, httpx.ProtocolError)
"""Retried as Prefect's client retries them: a connection reset, a timeout, a server that restarts."""
_DELAYS = (0.2, 0.5, 1.0, 2.0, 4.0)  # between attempts; Retry-After (capped at 10 s) takes precedence


class StateType(StrEnum):
    """A run's state type, as the API spells it (equal to Prefect's own `StateType` values)."""

    SCHEDULED = "SCHEDULED"
    PENDING = "PENDING"
    RUNNING = "RUNNING"
    COMPLETED = "COMPLETED"
    FAILED = "FAILED"
    CANCELLED = "CANCELLED"
    CRASHED = "CRASHED"
    PAUSED = "PAUSED"
    CANCELLING = "CANCELLING"


UNFINISHED = (StateType.RUNNING, StateType.PENDING, StateType.SCHEDULED)
"""The states of a task run that has not ended (or whose end Prefect has not recorded)."""


class _Model(BaseModel):
    model_config = ConfigDict(extra="ignore")


class StateDetails(_Model):
    pause_key: str | None = None
    run_input_keyset: dict[str, str] | None = None


class ApiState(_Model):
    type: StateType
    name: str | None = None
    message: str | None = None
    timestamp: datetime | None = None
    state_details: StateDetails = Field(default_factory=StateDetails)

    def is_paused(self) -> bool:
        return self.type == StateType.PAUSED


class ApiFlowRun(_Model):
    """A flow run as the API returns it (the fields we read)."""

    id: UUID
    name: str
    tags: list[str] = Field(default_factory=list)
    state: ApiState | None = None
    run_count: int = 0
    start_time: datetime | None = None
    end_time: datetime | None = None
    total_run_time: timedelta | None = None
    deployment_id: UUID | None = None
    work_pool_name: str | None = None
    parameters: dict[str, Any] = Field(default_factory=dict)


class ApiTaskRun(_Model):
    """A task run as the API returns it (the fields we read)."""

    id: UUID
    name: str
    flow_run_id: UUID | None = None
    flow_run_run_count: int = 0
    state: ApiState | None = None
    run_count: int = 0
    start_time: datetime | None = None
    end_time: datetime | None = None
    expected_start_time: datetime | None = None
    total_run_time: timedelta | None = None
    task_inputs: dict[str, list[dict[str, Any]]] = Field(default_factory=dict)

    @property
    def state_type(self) -> StateType | None:
        return self.state.type if self.state else None

    @property
    def state_name(self) -> str | None:
        return self.state.name if self.state else None

    def parents(self) -> list[UUID]:
        """The task runs this one ran inside (Prefect records them as its `__parents__` inputs)."""
        return [
            UUID(p["id"])
            for p in self.task_inputs.get("__parents__", [])
            if p.get("input_type") == "task_run"
        ]


class _Tagged(Protocol):
    @property
    def tags(self) -> list[str]: ...


def tag_values(flow_run: _Tagged, prefix: str) -> list[str]:
    """The values of a flow run's `<prefix><value>` tags (`agent:`, `key:`); ours or Prefect's `FlowRun`."""
    return [tag.removeprefix(prefix) for tag in flow_run.tags if tag.startswith(prefix)]


class ApiError(RuntimeError):
    """The Prefect API answered with an error that is not "not found"; the message names the API and the request."""


class PrefectApi:
    """An HTTP client of the Prefect API this process is configured for (`prefect_api()` opens one)."""

    def __init__(self, client: httpx.AsyncClient) -> None:
        self._client = client
        self._connected = False  # a refused connection is retried only once the API has answered

    @property
    def url(self) -> str:
        return str(self._client.base_url).rstrip("/")

    async def _request(self, method: str, path: str, body: Any = None, *, missing_ok: bool = False) -> Any:
        """The decoded JSON answer; None for a 404 when `missing_ok`. Retries what Prefect's client retries."""
        for delay in (*_DELAYS, None):
            try:
                response = await self._client.request(method, path, json=body)
            except _TRANSIENT as exc:
                if delay is None or (isinstance(exc, httpx.ConnectError) and not self._connected):
                    raise  # a wrong URL or a server that is down fails at once
                await asyncio.sleep(delay)
                continue
            self._connected = True
            if response.status_code in _RETRIED and delay is not None:
                await asyncio.sleep(_retry_after(response, delay))
                continue
            if response.status_code == 404 and missing_ok:
                return None
            if response.is_error:
                raise ApiError(
                    f"The Prefect API at {self.url} answered {response.status_code} to {method} {path}: "
                    f"{_detail(response)}"
                )
            return response.json() if response.content else None
        raise AssertionError("unreachable")  # the last attempt returns or raises

    async def flow_runs(self, flow_runs: dict[str, Any], sort: str, limit: int) -> list[ApiFlowRun]:
        """Up to `limit` flow runs matching the `flow_runs` filter (the API's FlowRunFilter), read in pages."""
        found: list[ApiFlowRun] = []
        while len(found) < limit:
            body = {
                "flow_runs": flow_runs,
                "sort": sort,
                "limit": min(PAGE, limit - len(found)),
                "offset": len(found),
            }
            page = [
                ApiFlowRun.model_validate(r) for r in await self._request("POST", "/flow_runs/filter", body)
            ]
            found += page
            if len(page) < PAGE:
                break
        return found

    async def flow_run(self, flow_run_id: UUID) -> ApiFlowRun | None:
        data = await self._request("GET", f"/flow_runs/{flow_run_id}", missing_ok=True)
        return None if data is None else ApiFlowRun.model_validate(data)

    async def task_runs(
        self, flow_run_ids: Iterable[UUID], states: Iterable[StateType] | None = None
    ) -> dict[UUID, list[ApiTaskRun]]:
        """The task runs of these flow runs (only those in `states`, if given), grouped by flow run."""
        grouped: dict[UUID, list[ApiTaskRun]] = {i: [] for i in flow_run_ids}
        if not grouped:
            return grouped
        body: dict[str, Any] = {
            "flow_runs": {"id": {"any_": [str(i) for i in grouped]}},
            "sort": "ID_DESC",  # a total order: pages by offset neither skip nor repeat a task run
            "limit": PAGE,
        }
        if states is not None:
            body["task_runs"] = {"state": {"type": {"any_": [str(s) for s in states]}}}
        offset = 0
        while True:
            body["offset"] = offset
            page = [
                ApiTaskRun.model_validate(r) for r in await self._request("POST", "/task_runs/filter", body)
            ]
            for task_run in page:
                if task_run.flow_run_id in grouped:
                    grouped[task_run.flow_run_id].append(task_run)
            if len(page) < PAGE:
                return grouped
            offset += PAGE

    async def set_state(
        self, kind: str, run_id: UUID, state: StateType, name: str, message: str | None = None
    ) -> None:
        """Force a flow run's (`kind="flow_runs"`) or task run's (`"task_runs"`) state, as `prefect ... set-state`."""
        body = {"state": {"type": str(state), "name": name, "message": message}, "force": True}
        await self._request("POST", f"/{kind}/{run_id}/set_state", body)

    async def flow_run_input(self, flow_run_id: UUID, key: str) -> Any:
        """The value stored under `key` for a flow run (Prefect's run input), or None when there is none."""
        return await self._request("GET", f"/flow_runs/{flow_run_id}/input/{key}", missing_ok=True)

    async def default_storage_block_id(self) -> UUID | None:
        """The result storage block the server names as default, if any; None also when it cannot say (as Prefect
        itself then falls back to the local directory)."""
        try:
            data = await self._request("GET", "/admin/storage")
        except (ApiError, httpx.HTTPError):
            return None
        found = (data or {}).get("default_result_storage_block_id")
        return UUID(found) if found else None


@contextlib.asynccontextmanager
async def prefect_api() -> AsyncIterator[PrefectApi]:
    """A client of the configured Prefect API (PREFECT_API_URL, its key or auth string). With none configured,
    Prefect's own client starts its temporary server as usual, and requests go there."""
    settings = prefect_settings()
    headers = {}
    if settings.api_key:
        headers["Authorization"] = f"Bearer {settings.api_key}"
    elif settings.api_auth_string:
        headers["Authorization"] = "Basic " + base64.b64encode(settings.api_auth_string.encode()).decode()
    async with contextlib.AsyncExitStack() as stack:
        url = settings.api_url
        if url is None:
            from prefect import get_client

            url = str((await stack.enter_async_context(get_client())).api_url)
        client = await stack.enter_async_context(
            httpx.AsyncClient(
                base_url=url.rstrip("/") + "/",
                headers=headers,
                timeout=30.0,
                verify=url.startswith("https:"),  # plain HTTP needs no certificates (loading them: 70 ms)
            )
        )
        yield PrefectApi(client)


def _retry_after(response: httpx.Response, default: float) -> float:
    try:
        return min(10.0, max(0.0, float(response.headers.get("Retry-After", default))))
    except ValueError:
        return default


def _detail(response: httpx.Response) -> str:
    try:
        detail = response.json().get("detail", response.text)
    except (ValueError, AttributeError):
        detail = response.text
    return str(detail)[:300] or response.reason_phrase
