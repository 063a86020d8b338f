"""The learned-length store: history per key, trimmed to a Prefect variable, one read for many waits, coalesced
background writes, best effort on errors; and the real Prefect variable shared across books (processes)."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import pytest

from kling_tasks.task_lengths import (
    MAX_SAMPLES,
    MAX_VALUE_CHARS,
    LengthHistory,
    MemoryStore,
    PrefectVariableStore,
    TaskLengthBook,
    length_key,
)

pytestmark = pytest.mark.anyio

KEY = length_key("text2video", "kling-v1", "std", "5")


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


def test_history_keeps_the_newest_samples_per_key_and_drops_garbage() -> None:
    history = LengthHistory.from_json({KEY: [[30, 290], [31.5, 288]], "bad": "x", "mixed": [[1, 2], ["a", 3],
                                                                                         [1, -2], [True, 4]]})
    assert history.series == {KEY: [(30.0, 290.0), (31.5, 288.0)], "mixed": [(1.0, 2.0)]}
    for i in range(MAX_SAMPLES + 5):
        history.add(KEY, 30.0, 300.0 + i)
    assert len(history.series[KEY]) == MAX_SAMPLES and history.series[KEY][-1] == (30.0, 300.0 + MAX_SAMPLES + 4)
    expected = history.expected(KEY)
    assert expected is not None and expected.processing[-1] == 300.0 + MAX_SAMPLES + 4
    assert history.expected("video-extend/kling-v1/std/extend") is None
    assert LengthHistory.from_json("not json").series == {} and LengthHistory.from_json(None).series == {}
    assert LengthHistory.from_json(json.dumps({KEY: [[1, 2]]})).series == {KEY: [(1.0, 2.0)]}


def test_history_fits_one_prefect_variable() -> None:
    history = LengthHistory()
    for k in range(60):
        for _ in range(MAX_SAMPLES):
            history.add(f"video-extend/kling-v1-6/pro/model-{k:02d}", 123.456, 987.654)
    value = history.to_json()
    assert len(json.dumps(value)) <= MAX_VALUE_CHARS and len(value) > 10


async def test_many_waits_starting_at_once_read_the_store_once() -> None:
    store = MemoryStore({KEY: [[30, 290]]})
    book = TaskLengthBook(store)
    results = await asyncio.gather(*(book.expected(KEY) for _ in range(50)))
    assert store.loads == 1 and all(r is not None and r.processing == (290.0,) for r in results)


async def test_the_store_is_read_again_after_the_refresh_period() -> None:
    now = [0.0]
    store = MemoryStore({KEY: [[30, 290]]})
    book = TaskLengthBook(store, refresh_seconds=60, clock=lambda: now[0])
    await book.expected(KEY)
    store.value = {KEY: [[30, 290], [40, 400]]}  # another worker learned something
    now[0] = 30.0
    assert (await book.expected(KEY)).processing == (290.0,)  # type: ignore[union-attr]
    now[0] = 61.0
    assert (await book.expected(KEY)).processing == (290.0, 400.0)  # type: ignore[union-attr]
    assert store.loads == 2


async def test_records_are_learned_at_once_and_written_together() -> None:
    store = MemoryStore()
    book = TaskLengthBook(store, flush_delay=0.05)
    assert await book.expected(KEY) is None
    book.record(KEY, 30.0, 290.0)
    assert (await book.expected(KEY)).processing == (290.0,)  # type: ignore[union-attr]
    await asyncio.sleep(0.02)  # the first write goes out at once
    assert store.saves == 1 and store.value == {KEY: [[30.0, 290.0]]}
    for i in range(5):
        book.record(KEY, 30.0, 300.0 + i)
    await asyncio.sleep(0.2)
    assert store.saves == 2  # five endings within the delay: one more write
    assert [p for _, p in store.value[KEY]] == [290.0, 300.0, 301.0, 302.0, 303.0, 304.0]


async def test_a_write_merges_with_what_other_workers_wrote() -> None:
    store = MemoryStore({KEY: [[30, 290]]})
    book = TaskLengthBook(store, flush_delay=0)
    await book.expected(KEY)
    store.value = {KEY: [[30, 290], [35, 310]], "image2video/kling-v1/std/5": [[10, 150]]}
    book.record(KEY, 32.0, 300.0)
    assert await book.flush()
    assert store.value[KEY] == [[30, 290], [35, 310], [32, 300]] and "image2video/kling-v1/std/5" in store.value


class BrokenStore:
    def __init__(self) -> None:
        self.calls = 0

    async def load(self) -> Any:
        self.calls += 1
        raise ConnectionError("503 Service Unavailable")

    async def save(self, value: Any) -> None:
        raise ConnectionError("503 Service Unavailable")


async def test_a_store_that_fails_means_no_history_never_an_error(caplog: pytest.LogCaptureFixture) -> None:
    book = TaskLengthBook(BrokenStore(), flush_delay=0)
    assert await book.expected(KEY) is None
    book.record(KEY, 30.0, 290.0)
    assert not await book.flush()
    assert (await book.expected(KEY)).processing == (290.0,)  # type: ignore[union-attr]  # kept, pending
    assert any("could not save" in r.getMessage() for r in caplog.records)


async def test_samples_without_processing_time_are_not_learned() -> None:
    store = MemoryStore()
    book = TaskLengthBook(store, flush_delay=0)
    book.record(KEY, 30.0, 0.0)
    assert await book.expected(KEY) is None and store.saves == 0


async def test_the_prefect_variable_is_shared_by_every_book(prefect_server: Any) -> None:
    account = uuid.uuid4().hex[:12]
    first = TaskLengthBook(PrefectVariableStore(account), flush_delay=0)
    assert await first.expected(KEY) is None
    first.record(KEY, 30.0, 290.0)
    assert await first.flush()
    second = TaskLengthBook(PrefectVariableStore(account))  # another worker process: its own book
    learned = await second.expected(KEY)
    assert learned is not None and learned.queued == (30.0,) and learned.processing == (290.0,)
    from prefect.variables import Variable

    assert await Variable.aget(f"kling_task_lengths_{account}") == {KEY: [[30.0, 290.0]]}
    second.record(KEY, 31.0, 295.0)
    assert await second.flush(), "an existing variable is updated in place"
    assert await Variable.aget(f"kling_task_lengths_{account}") == {KEY: [[30.0, 290.0], [31.0, 295.0]]}
