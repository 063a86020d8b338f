"""The account's concurrency slots (DESIGN §3): a Kling task holds one from just before its create until it
is terminal, so an account never runs more than `KLING_MAX_CONCURRENCY` tasks at once. produce_video keeps
its slot across its chain (a video's steps run one after another), so a started video never waits behind
new ones: videos finish early and a crash loses less.

Two layers, one bound:
- a Prefect global concurrency limit named after the account fingerprint (`kling-account-{account}`): a
  server object, so it holds across processes, workers and machines, and the UI's Concurrency page shows it;
- in front of it, a per-process priority queue of the same size: Prefect's client polls for a free slot
  (~1 s between a slot freeing and the next holder starting), while a slot freed in this process goes to the
  next waiting job at once, resumed videos first.

A slot's lease is renewed while held (kling_tasks.slot_leases: one renewal loop for every lease of the
process); if the process dies, Prefect frees it when the lease expires (within five minutes, about the
length of the Kling task it held, which keeps rendering).
Kling may still refuse a create with 1303 (another client on the account, an expired lease): the submit step
treats that as back-pressure and waits.
"""

from __future__ import annotations

import asyncio
import heapq
import itertools
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from prefect import get_client
from prefect.settings import PREFECT_API_URL

from kling_tasks.slot_leases import server_slot


def limit_name(account: str) -> str:
    return f"kling-account-{account}"


_ENSURED: set[tuple[str, str, int]] = set()  # (Prefect API, account, size) made sure of in this process


async def ensure_account_limit(account: str, size: int) -> None:
    """Create the account's global concurrency limit, or resize it to `size` (idempotent).

    Once per process per API, account and size: a batch's jobs all ask, and each upsert is a read and a write
    on the Prefect server. (A limit deleted while the process runs makes the next slot fail loudly: strict.)"""
    key = (PREFECT_API_URL.value() or "", account, size)
    if key in _ENSURED:
        return
    async with get_client() as client:
        try:
            await client.upsert_global_concurrency_limit_by_name(limit_name(account), size)
        except Exception as exc:  # another process created it between our read and our create
            if "already exists" not in str(exc).lower() and "409" not in str(exc):
                raise
            await client.upsert_global_concurrency_limit_by_name(limit_name(account), size)
    _ENSURED.add(key)


class HandOff:
    """At most `size` holders in this process; a released place goes to the best waiter at once.

    Waiters are served by (priority, arrival): priority 0 for steps of videos already started, 1 for the
    first step of a new video.
    """

    def __init__(self, size: int) -> None:
        self.size = size
        self.holders = 0
        self._waiting: list[tuple[int, int, asyncio.Future[None]]] = []
        self._order = itertools.count()

    async def acquire(self, priority: int) -> None:
        if self.holders < self.size and not self._waiting:
            self.holders += 1
            return
        future: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        heapq.heappush(self._waiting, (priority, next(self._order), future))
        try:
            await future
        except asyncio.CancelledError:
            if future.done() and not future.cancelled():
                self.release()  # handed over just as we were cancelled: pass it on
            else:
                self._waiting = [w for w in self._waiting if w[2] is not future]
                heapq.heapify(self._waiting)
            raise

    def release(self) -> None:
        while self._waiting:
            _, _, future = heapq.heappop(self._waiting)
            if not future.done():
                future.set_result(None)  # the place passes straight to the waiter: holders unchanged
                return
        self.holders -= 1


_HAND_OFFS: dict[tuple[str, asyncio.AbstractEventLoop], HandOff] = {}


def _hand_off(account: str, size: int) -> HandOff:
    key = (account, asyncio.get_running_loop())
    if key not in _HAND_OFFS:
        _HAND_OFFS[key] = HandOff(size)
    return _HAND_OFFS[key]


@asynccontextmanager
async def account_slot(account: str, size: int, *, started: bool) -> AsyncIterator[None]:
    """Hold one of the account's slots: first this process's place, then the server-wide slot."""
    hand_off = _hand_off(account, size)
    await hand_off.acquire(0 if started else 1)
    try:
        async with server_slot(limit_name(account)):
            yield
    finally:
        hand_off.release()
