"""Provider limits: a step holds a slot of a named Prefect global concurrency limit while it executes.

The limit lives on the Prefect server, so every run and every worker that talks to that server shares it: fifty
runs started at once send at most `limit` requests to the provider, the rest wait for a slot. A slot is taken
around one attempt's work only: a step replayed from the journal, the wait before a retry and a run waiting for
approval hold none. Slots are leased: a process that dies holding one stops renewing its lease, and Prefect's
repossessor frees the slot once the lease expires (`lease_seconds`, at least 60; it checks every 15 s).

A rate limit (`requests_per_second`) is a second limit, `<name>:rate`, whose slots decay at that rate
(Prefect's `rate_limit()`): each attempt takes one before it starts, so starts are spaced across all workers.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from uuid import UUID

import anyio
import httpx
from prefect import get_client
from prefect.client.orchestration import PrefectClient
from prefect.client.schemas.actions import GlobalConcurrencyLimitCreate
from prefect.client.schemas.objects import ConcurrencyLeaseHolder
from prefect.concurrency.asyncio import ConcurrencySlotAcquisitionError, rate_limit
from prefect.context import TaskRunContext
from prefect.exceptions import ObjectAlreadyExists, ObjectNotFound
from prefect.settings import PREFECT_API_URL
from pydantic import BaseModel, ConfigDict, Field

from prefect_pydantic_ai.durable.errors import DurabilityConfigError

_BANNED = str.maketrans({c: "-" for c in "/%&><"})  # characters Prefect refuses in a limit's name


class ConcurrencyLimit(BaseModel):
    """Each executing attempt of a step holds one slot of the Prefect global concurrency limit `name`.

    - `name`: the limit's name; `{name}` in it is replaced by the step's model (or tool) name, so
      `"llm-{name}"` gives each model its own limit, and a fixed name (`"openai"`) shares one per provider.
    - `create_slots`: a missing limit is created with this many slots (and its rate limit with
      `requests_per_second`). Left unset, a missing limit fails the run with the `prefect gcl create` command.
    - `requests_per_second`: also space the attempts' starts through the rate limit `<name>:rate`.
    - `lease_seconds`: how long a slot outlives a process that died holding it (Prefect renews the lease of a
      live holder; at least 60, Prefect's minimum).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    name: str = Field(min_length=1)
    create_slots: int | None = Field(default=None, ge=1)
    requests_per_second: float | None = Field(default=None, gt=0)
    lease_seconds: float = Field(default=60, ge=60, le=86_400)

    def limit_name(self, step_name: str) -> str:
        """The limit that a step called `step_name` takes its slot from."""
        return self.name.replace("{name}", step_name).translate(_BANNED)

    @asynccontextmanager
    async def slot(self, step_name: str) -> AsyncIterator[None]:
        """Hold one slot of the step's limit (after taking a rate-limit slot, if any) for the block."""
        name = self.limit_name(step_name)
        if self.requests_per_second is not None:
            rate = f"{name}:rate"
            await self._ensure(rate, max(1, math.ceil(self.requests_per_second)), self.requests_per_second)
            try:
                await rate_limit(rate, strict=True)
            except ConcurrencySlotAcquisitionError:
                _known.discard((_api(), rate))
                raise
        await self._ensure(name, self.create_slots or 1, 0.0)
        context = TaskRunContext.get()
        holder = None if context is None else ConcurrencyLeaseHolder(type="task_run", id=context.task_run.id)
        async with get_client() as client:
            lease = await self._lease(client, name, holder)
            renewing = asyncio.ensure_future(self._renew(client, lease))
            try:
                yield
            finally:
                renewing.cancel()
                with anyio.CancelScope(shield=True):  # a cancelled step still gives its slot back
                    await client.release_concurrency_slots_with_lease(lease)

    async def _lease(self, client: PrefectClient, name: str, holder: ConcurrencyLeaseHolder | None) -> UUID:
        """Take a slot of `name` under a lease, asking again (after the server's Retry-After, at most
        `_POLL_SECONDS`) while the limit is full. The waiters of one process queue here and only the first asks the server: each refusal
        raises the Retry-After the server gives everyone, so many waiters asking at once would slow them all."""
        async with _queue(name):
            return await self._first_in_line(client, name, holder)

    async def _first_in_line(
        self, client: PrefectClient, name: str, holder: ConcurrencyLeaseHolder | None
    ) -> UUID:
        while True:
            try:
                response = await client.increment_concurrency_slots_with_lease(
                    [name], 1, "concurrency", self.lease_seconds, holder
                )
            except httpx.HTTPStatusError as exc:
                if exc.response.status_code != 423:  # 423 Locked: every slot is taken
                    raise
                # the server's Retry-After grows with every refusal (up to 30 s) and would leave freed slots
                # idle: the one waiter per process that asks does so again within half a second
                await asyncio.sleep(min(float(exc.response.headers.get("Retry-After") or 1), _POLL_SECONDS))
                continue
            granted = response.json()
            if not granted["limits"]:  # deleted since it was checked: checked again next time
                _known.discard((_api(), name))
                raise MissingLimitError(_missing(name, self.create_slots or 1, 0.0))
            return UUID(granted["lease_id"])

    async def _renew(self, client: PrefectClient, lease: UUID) -> None:
        """Keep a live holder's lease from expiring: a process that dies stops renewing, and Prefect frees the slot
        `lease_seconds` later. A failed renewal is logged, never raised: the request in flight goes on."""
        while True:
            await asyncio.sleep(self.lease_seconds * 0.5)
            try:
                await client.renew_concurrency_lease(lease, self.lease_seconds)
            except Exception as exc:
                logger.warning("Could not renew the lease of a concurrency slot (%s); it may expire.", exc)

    async def _ensure(self, name: str, slots: int, decay: float) -> None:
        """Make sure the limit `name` exists (once per process): create it when allowed, else fail in one line."""
        if (_api(), name) in _known:
            return
        async with get_client() as client:
            try:
                await client.read_global_concurrency_limit_by_name(name)
            except ObjectNotFound:
                if self.create_slots is None:
                    raise MissingLimitError(_missing(name, slots, decay)) from None
                with contextlib.suppress(ObjectAlreadyExists):  # another process may create it first
                    await client.create_global_concurrency_limit(
                        GlobalConcurrencyLimitCreate(name=name, limit=slots, slot_decay_per_second=decay)
                    )
        _known.add((_api(), name))


class MissingLimitError(DurabilityConfigError):
    """A step's Prefect global concurrency limit does not exist and may not be created: the message gives the
    `prefect gcl create` command. Not retried: creating the limit is the fix."""


logger = logging.getLogger("prefect_pydantic_ai")
_POLL_SECONDS = 0.5
_known: set[tuple[str, str]] = set()  # (Prefect API, limit name) checked to exist by this process


_queues: dict[tuple[int, str], asyncio.Lock] = {}


def _queue(name: str) -> asyncio.Lock:
    """The queue of this event loop's waiters for a slot of `name` (an `asyncio.Lock` serves them in order)."""
    key = (id(asyncio.get_running_loop()), name)
    if key not in _queues:
        while len(_queues) >= 1024:  # loops of finished `run_sync` calls
            del _queues[next(iter(_queues))]
        _queues[key] = asyncio.Lock()
    return _queues[key]


def _api() -> str:
    return str(PREFECT_API_URL.value())


def _missing(name: str, slots: int, decay: float) -> str:
    if decay:
        command = f"prefect gcl create {name} --limit {slots} --slot-decay-per-second {decay:g}"
    else:
        command = f"prefect gcl create {name} --limit <max requests in flight>"
    return (
        f"Prefect global concurrency limit {name!r} does not exist: create it with `{command}`, "
        "or pass ConcurrencyLimit(create_slots=N) to create it on first use."
    )
