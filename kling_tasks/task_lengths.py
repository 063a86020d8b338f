"""How long this account's Kling tasks took, per kind/model/mode/duration: the history of the learned poll schedule.

Kling's task lengths are predictable per kind, model, mode and duration (DESIGN §3), so the wait polls by what
the same kind of task took before (kling_tasks.api.polling, ``ExpectedLength``). The history is kept where every
worker can read it: a Prefect variable per account, ``kling_task_lengths_{account}``, holding
``{"text2video/kling-v1/std/5": [[queued_s, processing_s], ...], ...}`` (the newest MAX_SAMPLES per key, on
Kling's clock). Edit or delete it freely: a value that does not parse is ignored (the wait polls adaptively).

One book per account and event loop. It reads the variable at most every REFRESH_SECONDS (one read however many
waits start at once) and writes samples back in the background, coalesced: a task's end never waits for the
Prefect API. Two workers writing at the same moment may lose one sample each: a statistic, not a ledger.
Everything here is best effort: a Prefect API error means "no history", never a failed step.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from kling_tasks.api import ExpectedLength

if TYPE_CHECKING:
    from prefect.client.orchestration import PrefectClient

__all__ = ["LengthHistory", "MemoryStore", "PrefectVariableStore", "TaskLengthBook", "book_for", "length_key"]

logger = logging.getLogger(__name__)

MAX_SAMPLES = 12  # per key: recent enough to follow Kling getting slower, enough to bound the spread
MAX_VALUE_CHARS = 4800  # Prefect refuses variable values over 5000 characters of JSON
REFRESH_SECONDS = 60.0
FLUSH_DELAY_SECONDS = 5.0  # samples ending within this much of a write go out together (2 calls a write)


def length_key(kind: str, model: str, mode: str, duration: str | int | float) -> str:
    """What makes two Kling tasks take about as long: kind, model, mode and the requested duration."""
    return f"{kind}/{model}/{mode}/{duration}"


def _sample(value: Any) -> tuple[float, float] | None:
    if (isinstance(value, list) and len(value) == 2 and all(isinstance(v, int | float) and not isinstance(v, bool)
                                                            for v in value)):
        queued, processing = float(value[0]), float(value[1])
        if queued >= 0 and processing > 0:
            return queued, processing
    return None


@dataclass
class LengthHistory:
    """key -> (queued, processing) seconds per task, oldest first."""

    series: dict[str, list[tuple[float, float]]] = field(default_factory=dict)

    @classmethod
    def from_json(cls, value: Any) -> LengthHistory:
        """Whatever the variable holds; entries that are not [queued, processing] numbers are dropped."""
        history = cls()
        if isinstance(value, str):
            try:
                value = json.loads(value)
            except ValueError:
                return history
        if not isinstance(value, dict):
            return history
        for key, samples in value.items():
            if isinstance(key, str) and isinstance(samples, list):
                good = [s for s in map(_sample, samples) if s is not None][-MAX_SAMPLES:]
                if good:
                    history.series[key] = good
        return history

    def to_json(self) -> dict[str, list[list[float]]]:
        """The newest samples, trimmed (oldest samples of the longest series first) to fit one variable."""
        series = {key: list(samples) for key, samples in self.series.items()}
        while len(json.dumps(self._encode(series))) > MAX_VALUE_CHARS:
            longest = max(series, key=lambda k: len(series[k]))
            series[longest] = series[longest][1:]
            if not series[longest]:
                del series[longest]
        return self._encode(series)

    @staticmethod
    def _encode(series: dict[str, list[tuple[float, float]]]) -> dict[str, list[list[float]]]:
        return {key: [[round(q, 2), round(p, 2)] for q, p in samples] for key, samples in series.items()}

    def add(self, key: str, queued: float, processing: float) -> None:
        samples = self.series.setdefault(key, [])
        samples.append((max(0.0, queued), processing))
        del samples[:-MAX_SAMPLES]

    def expected(self, key: str) -> ExpectedLength | None:
        samples = self.series.get(key)
        if not samples:
            return None
        return ExpectedLength(queued=tuple(q for q, _ in samples), processing=tuple(p for _, p in samples))


class LengthStore(Protocol):
    """Where the history lives between processes: load() the JSON value (None when there is none), save() it."""

    async def load(self) -> Any: ...

    async def save(self, value: dict[str, list[list[float]]]) -> None: ...


class PrefectVariableStore:
    """The account's Prefect variable: every worker on the same Prefect server shares it.

    A read is one GET and a write one PATCH (a POST the first time): Prefect's `Variable.aset` would read, write
    and read back, three calls per write."""

    def __init__(self, account: str) -> None:
        self.name = f"kling_task_lengths_{account}"

    async def load(self) -> Any:
        async with _client() as client:
            variable = await client.read_variable_by_name(self.name)
        return None if variable is None else variable.value

    async def save(self, value: dict[str, list[list[float]]]) -> None:
        import httpx
        from prefect.client.schemas.actions import VariableCreate, VariableUpdate
        from prefect.exceptions import ObjectAlreadyExists

        async with _client() as client:
            try:
                await client.update_variable(VariableUpdate(name=self.name, value=value))
                return
            except httpx.HTTPStatusError as exc:
                if exc.response.status_code != 404:
                    raise
            try:
                await client.create_variable(VariableCreate(name=self.name, value=value))
            except ObjectAlreadyExists:  # another worker created it just now
                await client.update_variable(VariableUpdate(name=self.name, value=value))


@asynccontextmanager
async def _client() -> AsyncIterator[PrefectClient]:
    """The run's Prefect client when there is one (no new connection), else a client for this call."""
    from prefect.client.utilities import get_or_create_client

    client, from_context = get_or_create_client()
    if from_context:
        yield client
    else:
        async with client:
            yield client


class MemoryStore:
    """A store in this process only (tests, benchmarks)."""

    def __init__(self, value: Any = None) -> None:
        self.value = value
        self.loads = self.saves = 0

    async def load(self) -> Any:
        self.loads += 1
        return self.value

    async def save(self, value: dict[str, list[list[float]]]) -> None:
        self.saves += 1
        self.value = json.loads(json.dumps(value))


class TaskLengthBook:
    """The history as this process sees it: the store's, refreshed now and then, plus what ended here since."""

    def __init__(self, store: LengthStore, *, refresh_seconds: float = REFRESH_SECONDS,
                 flush_delay: float = FLUSH_DELAY_SECONDS, clock: Callable[[], float] = time.monotonic,
                 sleep: Callable[[float], Awaitable[None]] = asyncio.sleep) -> None:
        self.store = store
        self.refresh_seconds, self.flush_delay = refresh_seconds, flush_delay
        self._clock, self._sleep = clock, sleep
        self._remote = LengthHistory()
        self._pending: list[tuple[str, float, float]] = []  # ended here, not yet in the store
        self._loaded_at: float | None = None
        self._refreshing: asyncio.Future[None] | None = None
        self._flushing: asyncio.Task[None] | None = None
        self._last_flush = -float("inf")

    def _view(self) -> LengthHistory:
        view = LengthHistory({key: list(samples) for key, samples in self._remote.series.items()})
        for key, queued, processing in self._pending:
            view.add(key, queued, processing)
        return view

    async def expected(self, key: str) -> ExpectedLength | None:
        """Earlier lengths of `key` tasks, or None (no history, or the store could not be read)."""
        if self._loaded_at is None or self._clock() - self._loaded_at >= self.refresh_seconds:
            await self._refresh()
        return self._view().expected(key)

    async def _refresh(self) -> None:
        if self._refreshing is not None:  # many waits start at once: one read serves them all
            await asyncio.shield(self._refreshing)
            return
        self._refreshing = asyncio.get_running_loop().create_future()
        try:
            self._remote = LengthHistory.from_json(await self.store.load())
        except Exception as exc:
            logger.warning("could not read the task-length history (polling adaptively): %s: %s",
                           type(exc).__name__, exc)
        finally:
            self._loaded_at = self._clock()
            self._refreshing.set_result(None)
            self._refreshing = None

    def record(self, key: str, queued: float, processing: float) -> None:
        """A task of `key` ended: learn from it now, and write it to the store soon, in the background."""
        if processing <= 0:
            return
        self._pending.append((key, queued, processing))
        if self._flushing is None or self._flushing.done():
            self._flushing = asyncio.get_running_loop().create_task(self._flush_soon())

    async def _flush_soon(self) -> None:
        while self._pending:  # samples that ended during a write go out with the next one
            wait = self._last_flush + self.flush_delay - self._clock()
            if wait > 0:
                await self._sleep(wait)
            if not await self.flush():
                return  # kept pending: the next record tries again

    async def flush(self) -> bool:
        """Merge what ended here into the store's current value (read, add, write); False if that failed."""
        if not self._pending:
            return True
        pending, self._pending = self._pending, []
        self._last_flush = self._clock()
        try:
            merged = LengthHistory.from_json(await self.store.load())
            for key, queued, processing in pending:
                merged.add(key, queued, processing)
            await self.store.save(merged.to_json())
            self._remote, self._loaded_at = merged, self._clock()
            return True
        except Exception as exc:
            self._pending = (pending + self._pending)[-4 * MAX_SAMPLES:]  # kept (bounded) for the next write
            logger.warning("could not save the task-length history: %s: %s", type(exc).__name__, exc)
            return False


_BOOKS: dict[tuple[str, asyncio.AbstractEventLoop], TaskLengthBook] = {}


def book_for(account: str) -> TaskLengthBook:
    """The account's book in this process and event loop, on the account's Prefect variable."""
    key = (account, asyncio.get_running_loop())
    book = _BOOKS.get(key)
    if book is None:
        for old in [k for k in _BOOKS if k[1].is_closed()]:
            del _BOOKS[old]
        book = _BOOKS[key] = TaskLengthBook(PrefectVariableStore(account))
    return book
