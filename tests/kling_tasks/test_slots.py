"""The account's global concurrency limit is made sure of once per process, API, account and size."""

from __future__ import annotations

import asyncio

import pytest

from kling_tasks import slots


class CountingClient:
    def __init__(self) -> None:
        self.upserts: list[tuple[str, int]] = []

    async def __aenter__(self) -> CountingClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    async def upsert_global_concurrency_limit_by_name(self, name: str, limit: int) -> None:
        self.upserts.append((name, limit))


def test_the_limit_is_upserted_once_per_account_and_size(monkeypatch: pytest.MonkeyPatch) -> None:
    client = CountingClient()
    monkeypatch.setattr(slots, "get_client", lambda: client)
    monkeypatch.setattr(slots, "_ENSURED", set())

    async def many_jobs() -> None:
        for _ in range(5):  # a batch's jobs each ask
            await slots.ensure_account_limit("acc1", 4)
        await slots.ensure_account_limit("acc2", 4)
        await slots.ensure_account_limit("acc1", 6)  # resized: asked again

    asyncio.run(many_jobs())
    assert client.upserts == [("kling-account-acc1", 4), ("kling-account-acc2", 4), ("kling-account-acc1", 6)]
