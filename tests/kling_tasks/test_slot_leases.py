"""Slot leases against a real Prefect server: the bound holds, one renewer serves every lease, slots come back."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import Awaitable, Callable
from typing import Any

import httpx
import pytest
from prefect import get_client
from prefect.client.orchestration import PrefectClient

from kling_tasks import slot_leases

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


async def make_limit(size: int) -> str:
    name = f"test-slots-{uuid.uuid4().hex[:8]}"
    async with get_client() as client:
        await client.upsert_global_concurrency_limit_by_name(name, size)
    return name


async def active_slots(name: str) -> int:
    async with get_client() as client:
        return (await client.read_global_concurrency_limit_by_name(name)).active_slots


async def test_a_full_limit_makes_the_next_holder_wait_until_a_slot_is_released(prefect_server: Any) -> None:
    name = await make_limit(1)
    order: list[str] = []

    async def hold(label: str, seconds: float) -> None:
        async with slot_leases.server_slot(name):
            order.append(f"{label} in")
            assert await active_slots(name) == 1
            await asyncio.sleep(seconds)
            order.append(f"{label} out")

    first = asyncio.create_task(hold("a", 1.5))
    await asyncio.sleep(0.5)
    await asyncio.gather(first, hold("b", 0.1))
    assert order == ["a in", "a out", "b in", "b out"], "the second holder waited for the first's release"
    assert await active_slots(name) == 0


async def test_a_failing_block_releases_its_slot(prefect_server: Any) -> None:
    name = await make_limit(2)
    with pytest.raises(RuntimeError, match="the step broke"):
        async with slot_leases.server_slot(name):
            assert await active_slots(name) == 1
            raise RuntimeError("the step broke")
    assert await active_slots(name) == 0
    assert not slot_leases.keeper().leases, "a released lease is no longer renewed"


async def test_a_missing_limit_is_refused(prefect_server: Any) -> None:
    with pytest.raises(slot_leases.SlotLimitMissing, match="no concurrency limit named"):
        async with slot_leases.server_slot(f"no-such-limit-{uuid.uuid4().hex[:8]}"):
            pytest.fail("entered a slot of a limit that does not exist")


async def test_one_renewer_renews_every_held_lease(prefect_server: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(slot_leases, "RENEW_EVERY", 0.3)
    renewed: list[uuid.UUID] = []
    real_renew = PrefectClient.renew_concurrency_lease

    async def counting_renew(self: PrefectClient, lease_id: uuid.UUID, lease_duration: float) -> Any:
        renewed.append(lease_id)
        return await real_renew(self, lease_id=lease_id, lease_duration=lease_duration)  # the server answers

    monkeypatch.setattr(PrefectClient, "renew_concurrency_lease", counting_renew)
    renewer_clients = []
    real_get_client = slot_leases.get_client

    def counting_get_client() -> Any:
        if asyncio.current_task() is slot_leases.keeper()._renewer:
            renewer_clients.append(1)
        return real_get_client()

    monkeypatch.setattr(slot_leases, "get_client", counting_get_client)
    name = await make_limit(3)
    inside: list[int] = []
    all_in = asyncio.Event()

    async def hold() -> None:
        async with slot_leases.server_slot(name):
            inside.append(1)
            if len(inside) == 3:
                all_in.set()
            await asyncio.wait_for(all_in.wait(), timeout=30)  # the three leases are held at the same time
            await asyncio.sleep(1.2)

    await asyncio.gather(hold(), hold(), hold())
    leases = set(renewed)
    assert len(leases) == 3 and len(renewed) >= 6, f"every lease renewed more than once: {renewed}"
    assert len(renewer_clients) == 1, "one API client for all the renewals"
    renewer = slot_leases.keeper()._renewer
    assert renewer is not None
    await asyncio.wait_for(renewer, timeout=2)  # with no lease left, the renewer ends
    assert await active_slots(name) == 0


async def test_a_renewal_that_fails_does_not_stop_the_holder(prefect_server: Any,
                                                              monkeypatch: pytest.MonkeyPatch,
                                                              caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(slot_leases, "RENEW_EVERY", 0.2)

    async def broken_renew(self: PrefectClient, lease_id: uuid.UUID, lease_duration: float) -> Any:
        raise ConnectionError("the API hiccupped")

    monkeypatch.setattr(PrefectClient, "renew_concurrency_lease", broken_renew)
    monkeypatch.setattr(slot_leases, "retry_delay", lambda attempt: 0.01)
    name = await make_limit(1)
    async with slot_leases.server_slot(name):
        await asyncio.sleep(0.6)
    assert "could not renew the account slot's lease" in caplog.text
    assert await active_slots(name) == 0, "released all the same"


def refused_renewals(monkeypatch: pytest.MonkeyPatch,
                     before_sending: Callable[[], Awaitable[None]] | None = None) -> list[int]:
    """The HTTP status of every renewal the server refused (filled as they come); `before_sending` is awaited
    before each renewal goes out."""
    answers: list[int] = []
    real_renew = PrefectClient.renew_concurrency_lease

    async def recorded_renew(self: PrefectClient, lease_id: uuid.UUID, lease_duration: float) -> Any:
        if before_sending is not None:
            await before_sending()
        try:
            return await real_renew(self, lease_id=lease_id, lease_duration=lease_duration)
        except httpx.HTTPStatusError as exc:
            answers.append(exc.response.status_code)
            raise

    monkeypatch.setattr(PrefectClient, "renew_concurrency_lease", recorded_renew)
    return answers


async def test_a_lease_the_server_no_longer_has_is_dropped_not_retried(prefect_server: Any,
                                                                       monkeypatch: pytest.MonkeyPatch,
                                                                       caplog: pytest.LogCaptureFixture) -> None:
    """A lease that expired before its turn (a loaded server) answers 410: renewing it again cannot help."""
    monkeypatch.setattr(slot_leases, "RENEW_EVERY", 0.2)
    answers = refused_renewals(monkeypatch)
    name = await make_limit(1)
    async with slot_leases.server_slot(name):
        [lease_id] = slot_leases.keeper().leases
        async with get_client() as client:  # the server forgets the lease, as when it expired
            await client.release_concurrency_slots_with_lease(lease_id=lease_id)
        await asyncio.sleep(1.0)
        assert lease_id not in slot_leases.keeper().leases, "no longer renewed"
    assert answers == [410], f"one renewal, answered 410 Gone, not retried: {answers}"
    assert "expired before its renewal" in caplog.text
    assert await active_slots(name) == 0


async def test_a_renewal_that_crosses_its_release_is_not_a_lost_lease(prefect_server: Any,
                                                                      monkeypatch: pytest.MonkeyPatch,
                                                                      caplog: pytest.LogCaptureFixture) -> None:
    """A job that ends while its lease's renewal is on the way releases the lease; the renewal then answers 410.
    That is the release, not an expiry: no warning (the overhead benchmark counts the warnings as lost slots)."""
    monkeypatch.setattr(slot_leases, "RENEW_EVERY", 0.2)
    renewal_sent, released = asyncio.Event(), asyncio.Event()

    async def after_the_release() -> None:
        renewal_sent.set()
        await released.wait()  # the request reaches the server after the job's release

    answers = refused_renewals(monkeypatch, before_sending=after_the_release)
    name = await make_limit(1)
    async with slot_leases.server_slot(name):
        [lease_id] = slot_leases.keeper().leases
        await asyncio.wait_for(renewal_sent.wait(), 10)
    released.set()
    for _ in range(50):
        if answers:
            break
        await asyncio.sleep(0.1)
    assert answers == [410], f"the renewal reached the server after the release: {answers}"
    assert lease_id not in slot_leases.keeper().leases
    assert "expired before its renewal" not in caplog.text
    assert await active_slots(name) == 0
