"""Leases on the account's server-wide slot, held by this process with one renewal loop per event loop.

Prefect's `concurrency()` context gives every holder its own renewal thread with its own API client (and a
CSRF fetch): a batch of 500 jobs in one process kept 500 threads and 500 clients. Here every lease of an
event loop is renewed by one task with one client, and the acquire and release use the caller's client (a
flow run's, inside a flow). The server-side semantics are Prefect's: a lease of LEASE_SECONDS, renewed at
half of it; a holder that dies stops renewing and the server frees its slot when the lease expires.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import random
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any, cast
from uuid import UUID

import httpx
from prefect import get_client
from prefect.client.schemas.responses import MinimalConcurrencyLimitResponse
from prefect.concurrency._events import emit_concurrency_acquisition_events, emit_concurrency_release_events
from prefect.context import AsyncClientContext

logger = logging.getLogger(__name__)

# Prefect's default lease (its minimum is 60 s), about one Kling task's length: a crashed holder's Kling task
# keeps rendering, and keeps its place in Kling's count, for minutes, so a slot that came back sooner would only
# let another create meet 1303. Renewed at half-life: 300 s renewed at 150 s is ~2 renewals per Kling task of
# 320 s where 120 s at 60 s was ~5, a third of a step's Prefect calls at 500 jobs (bench/overhead.py, steady
# load), and 500 leases acquired in one burst, which fall due together, have minutes of slack, not seconds.
LEASE_SECONDS = 300.0
RENEW_EVERY = LEASE_SECONDS / 2
RENEWALS_AT_ONCE = 16  # the renewer's client has Prefect's 16 connections
LOCKED = 423  # every slot is held (by other processes: this one asks only when it has a place)
GONE = 410  # the lease expired (or was revoked): renewing it again cannot help


class SlotLimitMissing(RuntimeError):
    """The account's global concurrency limit does not exist on the Prefect server (deleted while running)."""


def retry_delay(attempt: int) -> float:
    return 1 + attempt + random.random()


class LeaseKeeper:
    """The leases one event loop holds; a single task renews each one RENEW_EVERY seconds after its last renewal
    (a few at a time: hundreds of leases must not wait in one line and expire at its end)."""

    def __init__(self) -> None:
        self.leases: dict[UUID, float] = {}  # lease id -> when it was last acquired or renewed (monotonic)
        self._renewer: asyncio.Task[None] | None = None

    def hold(self, lease_id: UUID) -> None:
        self.leases[lease_id] = time.monotonic()
        if self._renewer is None or self._renewer.done():
            # The renewer outlives the flow run that starts it: it keeps the run's settings (the API URL may
            # be a temporary setting) but not the run's client, which get_client() would hand back, closed.
            context = contextvars.copy_context()
            context.run(AsyncClientContext.__var__.set, cast(AsyncClientContext, None))
            self._renewer = asyncio.get_running_loop().create_task(self._renew(), context=context)

    def drop(self, lease_id: UUID) -> None:
        self.leases.pop(lease_id, None)

    async def _renew(self) -> None:
        gate = asyncio.Semaphore(RENEWALS_AT_ONCE)
        renewing: dict[UUID, asyncio.Task[None]] = {}
        async with get_client() as client:  # one client while any lease is held (each new one fetches a CSRF token)
            while self.leases or renewing:
                await asyncio.sleep(min(5.0, RENEW_EVERY / 4))
                for lease in [lease for lease, task in renewing.items() if task.done()]:
                    del renewing[lease]
                # A lease that falls due starts its renewal at once (its turn at the gate), not after the slowest
                # renewal of an earlier round: under load, rounds that wait for each other let leases expire.
                now = time.monotonic()
                for lease, renewed in list(self.leases.items()):
                    if now - renewed >= RENEW_EVERY and lease not in renewing:
                        renewing[lease] = asyncio.create_task(self._renew_one(client, lease, gate))

    async def _renew_one(self, client: Any, lease_id: UUID, gate: asyncio.Semaphore) -> None:
        for attempt in range(3):  # a renewal that fails once (an API hiccup) must not cost the slot
            if lease_id not in self.leases:
                return
            try:
                async with gate:
                    await client.renew_concurrency_lease(lease_id=lease_id, lease_duration=LEASE_SECONDS)
                if lease_id in self.leases:
                    self.leases[lease_id] = time.monotonic()
                return
            except Exception as exc:
                gone = isinstance(exc, httpx.HTTPStatusError) and exc.response.status_code == GONE
                if gone and lease_id not in self.leases:
                    return  # released while its renewal was on the way: the server forgot it, as it should
                if gone:
                    logger.warning("the account slot's lease %s expired before its renewal; the slot may be given "
                                   "to another holder (Kling answers an extra task with 1303: back-pressure)",
                                   lease_id)
                    self.leases.pop(lease_id, None)
                    return
                if attempt == 2:
                    # The step keeps going: a 1303 from Kling is back-pressure, never a failed job.
                    logger.warning("could not renew the account slot's lease %s (%s: %s); the slot may be "
                                   "given to another holder", lease_id, type(exc).__name__, exc)
                    if lease_id in self.leases:
                        self.leases[lease_id] = time.monotonic()  # try again at the next turn
                    return
                await asyncio.sleep(retry_delay(attempt))


_KEEPERS: dict[asyncio.AbstractEventLoop, LeaseKeeper] = {}


def keeper() -> LeaseKeeper:
    loop = asyncio.get_running_loop()
    if loop not in _KEEPERS:
        for old in [other for other in _KEEPERS if other.is_closed()]:
            del _KEEPERS[old]
        _KEEPERS[loop] = LeaseKeeper()
    return _KEEPERS[loop]


async def _acquire(client: Any, name: str) -> tuple[UUID, list[MinimalConcurrencyLimitResponse]]:
    while True:
        try:
            response = await client.increment_concurrency_slots_with_lease(
                names=[name], slots=1, mode="concurrency", lease_duration=LEASE_SECONDS)
        except httpx.HTTPStatusError as exc:
            if exc.response.status_code != LOCKED:
                raise
            # The server says when to ask again; a little jitter keeps many waiters from asking at once.
            await asyncio.sleep(float(exc.response.headers.get("Retry-After", 1)) + random.random() / 2)
            continue
        body = response.json()
        limits = [MinimalConcurrencyLimitResponse.model_validate(limit) for limit in body.get("limits") or []]
        if not limits:
            raise SlotLimitMissing(f"the Prefect server has no concurrency limit named {name}")
        return UUID(body["lease_id"]), limits


@asynccontextmanager
async def server_slot(name: str) -> AsyncIterator[None]:
    """One slot of the global concurrency limit `name`, leased and renewed until the block ends."""
    async with get_client() as client:
        lease_id, limits = await _acquire(client, name)
    leases = keeper()
    leases.hold(lease_id)
    events = emit_concurrency_acquisition_events(limits, 1)  # the UI's Concurrency page shows these
    try:
        yield
    finally:
        leases.drop(lease_id)  # from here on, at worst the lease expires within LEASE_SECONDS
        try:
            async with get_client() as client:
                await client.release_concurrency_slots_with_lease(lease_id=lease_id)
        except Exception as exc:
            logger.warning("could not release the account slot's lease %s (%s); it expires within %g s",
                           lease_id, type(exc).__name__, LEASE_SECONDS)
        emit_concurrency_release_events(limits, 1, events)
