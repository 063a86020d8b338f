"""submit(): the exactly-once protocol of DESIGN §2.3. Every test counts POSTs and tasks at the fake server."""

from __future__ import annotations

import logging

import httpx
import pytest

from kling_tasks.api import (
    AmbiguousSubmitError,
    BackPressureError,
    InvalidRequestError,
    KlingClient,
    ServerError,
    Text2VideoRequest,
    TransportError,
)

pytestmark = pytest.mark.anyio
T2V = Text2VideoRequest(prompt="a lighthouse at dusk")
EXT = "job1-s0-0a1b2c3d"


@pytest.fixture(autouse=True)
def reset_lookup_warning() -> None:
    KlingClient._lookup_warned.clear()


async def test_fresh_submit_looks_up_then_posts(make_client, fake) -> None:
    async with make_client(fake) as client:
        result = await client.submit(T2V, EXT)
    assert result.adopted is False and result.snapshot.external_task_id == EXT
    assert len(fake.posts()) == 1 and len(fake.tasks) == 1
    assert fake.requests[0].method == "GET"  # lookup first


async def test_existing_task_is_adopted_without_post(make_client, fake) -> None:
    task_id = fake.add_task("text2video", EXT, status="processing")
    async with make_client(fake) as client:
        result = await client.submit(T2V, EXT)
    assert result.adopted is True and result.snapshot.task_id == task_id
    assert fake.posts() == []


@pytest.mark.parametrize("exc", [httpx.ReadTimeout, httpx.RemoteProtocolError, httpx.WriteError])
async def test_ambiguous_transport_failure_adopts_instead_of_reposting(make_client, fake, exc) -> None:
    fake.fail("POST", exc=exc, after=True)  # the server created the task, the answer was lost
    async with make_client(fake) as client:
        result = await client.submit(T2V, EXT)
    assert result.adopted is True and result.snapshot.external_task_id == EXT
    assert len(fake.posts()) == 1 and len(fake.tasks) == 1


@pytest.mark.parametrize(
    "response_args", [(None, 5000, 500, "internal error"), (None, 5002, 504, "timeout"), ({"task_status": "x"},)]
)
async def test_ambiguous_5xx_or_malformed_success_adopts(make_client, fake, response_args) -> None:
    fake.fail("POST", response=fake.envelope(*response_args), after=True)
    async with make_client(fake) as client:
        result = await client.submit(T2V, EXT)
    assert result.adopted is True and len(fake.posts()) == 1 and len(fake.tasks) == 1


async def test_ambiguous_failure_without_task_reposts(make_client, fake) -> None:
    fake.fail("POST", response=fake.envelope(None, 5000, 500, "internal error"))  # failed before creating
    async with make_client(fake) as client:
        result = await client.submit(T2V, EXT)
    assert result.adopted is False and len(fake.posts()) == 2 and len(fake.tasks) == 1
    methods = [r.method for r in fake.requests]
    assert methods.index("POST") < len(methods) - 1 and methods[-1] == "POST"
    assert "GET" in methods[methods.index("POST") + 1 : -1]  # looked up between the two POSTs


async def test_reposts_are_bounded(make_client, fake) -> None:
    fake.fail("POST", response=fake.envelope(None, 5001, 503, "maintenance"), times=10)
    async with make_client(fake) as client:
        with pytest.raises(ServerError):
            await client.submit(T2V, EXT)
    assert len(fake.posts()) == 3 and fake.tasks == {}


async def test_connect_error_is_resent(make_client, fake) -> None:
    fake.fail("POST", exc=httpx.ConnectError)
    async with make_client(fake) as client:
        result = await client.submit(T2V, EXT)
    assert result.adopted is False and len(fake.posts()) == 2 and len(fake.tasks) == 1


async def test_duplicate_1201_adopts_existing(make_client, fake) -> None:
    # The pre-POST lookup misses (e.g. not yet visible), the POST answers "duplicate": adopt.
    task_id = fake.add_task("text2video", EXT)
    fake.fail("GET", response=fake.envelope([]), times=2)  # both lookup forms of the first lookup miss
    async with make_client(fake) as client:
        result = await client.submit(T2V, EXT)
    assert result.adopted is True and result.snapshot.task_id == task_id
    assert len(fake.posts()) == 1 and len(fake.tasks) == 1


async def test_other_1201_is_raised(make_client, fake) -> None:
    fake.fail("POST", response=fake.envelope(None, 1201, 400, "prompt contains bad value"))
    async with make_client(fake) as client:
        with pytest.raises(InvalidRequestError) as info:
            await client.submit(T2V, EXT)
    assert info.value.code == 1201 and len(fake.posts()) == 1


@pytest.mark.parametrize("code", [1302, 1303])
async def test_back_pressure_is_raised_not_resent(make_client, fake, code: int) -> None:
    fake.fail("POST", response=fake.envelope(None, code, 429, "parallel task over resource pack limit"))
    async with make_client(fake) as client:
        with pytest.raises(BackPressureError) as info:
            await client.submit(T2V, EXT)
    assert info.value.retryable and info.value.external_task_id == EXT and len(fake.posts()) == 1


async def test_lookup_off_ambiguous_failure_is_not_resent(make_client, fake, caplog) -> None:
    fake.fail("POST", exc=httpx.ReadTimeout, after=True)
    caplog.set_level(logging.WARNING, logger="kling_tasks.api")
    async with make_client(fake, external_id_lookup="off") as client:
        with pytest.raises(AmbiguousSubmitError) as info:
            await client.submit(T2V, EXT)
        assert EXT in str(info.value) and info.value.external_task_id == EXT
        assert len(fake.posts()) == 1 and fake.gets() == []
        # A second submit logs no second "cannot look up" warning.
        await client.submit(T2V, "job1-s1-ffff")
    warnings = [r for r in caplog.records if "cannot look tasks up" in r.getMessage()]
    assert len(warnings) == 1


async def test_lookup_off_connect_error_may_be_resent(make_client, fake) -> None:
    fake.fail("POST", exc=httpx.ConnectError)
    async with make_client(fake, external_id_lookup="off") as client:
        result = await client.submit(T2V, EXT)
    assert result.adopted is False and len(fake.posts()) == 2 and len(fake.tasks) == 1


async def test_connect_errors_bounded(make_client, fake) -> None:
    fake.fail("POST", exc=httpx.ConnectError, times=10)
    async with make_client(fake) as client:
        with pytest.raises(TransportError):
            await client.submit(T2V, EXT)
    assert len(fake.posts()) == 3


async def test_invalid_external_id_refused_before_any_request(make_client, fake) -> None:
    async with make_client(fake) as client:
        with pytest.raises(InvalidRequestError):
            await client.submit(T2V, "has spaces/and slashes")
        with pytest.raises(InvalidRequestError):
            await client.submit(T2V, "x" * 65)
    assert fake.requests == []


async def test_submit_logs_ids(make_client, fake, caplog) -> None:
    caplog.set_level(logging.INFO, logger="kling_tasks.api")
    async with make_client(fake) as client:
        result = await client.submit(T2V, EXT)
        await client.submit(T2V, EXT)  # adopts
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert EXT in text and result.snapshot.task_id in text and "adopted" in text
    assert str(result.snapshot.request_id) in text
