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
    NotFoundError,
    RetryPolicy,
    ServerError,
    Text2VideoRequest,
    TransportError,
)
from kling_tasks.api.lookup import TaskFinder
from kling_tasks.api.submit import submit

from .conftest import make_settings

pytestmark = pytest.mark.anyio
T2V = Text2VideoRequest(prompt="a lighthouse at dusk")
EXT = "job1-s0-0a1b2c3d"
CONTROL = "ctl-s0-ffff0000"  # another job's task: a positive control for the lookup forms


async def test_fresh_submit_looks_up_then_posts(make_client, fake) -> None:
    async with make_client(fake) as client:
        result = await client.submit(T2V, EXT)
    assert result.adopted is False and result.via == "created" and result.snapshot.external_task_id == EXT
    assert len(fake.posts()) == 1 and len(fake.tasks) == 1
    # Both lookup forms, then the list scan (one short page), then the POST.
    assert [(r.method, r.url.path) for r in fake.requests] == [
        ("GET", "/v1/videos/text2video"),
        ("GET", f"/v1/videos/text2video/{EXT}"),
        ("GET", "/v1/videos/text2video"),
        ("POST", "/v1/videos/text2video"),
    ]
    assert fake.requests[0].url.params["external_task_id"] == EXT
    assert fake.requests[2].url.params["pageNum"] == "1" and fake.requests[2].url.params["pageSize"] == "100"


async def test_existing_task_is_adopted_without_post(make_client, fake) -> None:
    task_id = fake.add_task("text2video", EXT, status="processing")
    async with make_client(fake) as client:
        result = await client.submit(T2V, EXT)
    assert result.adopted is True and result.via == "lookup" and result.snapshot.task_id == task_id
    assert fake.posts() == [] and len(fake.gets()) == 1


async def test_queueing_task_is_adopted(make_client, fake, caplog) -> None:
    # A status word outside Kling's four is "in progress": the task is found and adopted, never ignored.
    task_id = fake.add_task("text2video", EXT, status="Queueing")
    caplog.set_level(logging.WARNING, logger="kling_tasks.api")
    async with make_client(fake) as client:
        result = await client.submit(T2V, EXT)
        listed = await client.list("text2video")
    assert result.adopted is True and result.snapshot.task_id == task_id
    assert result.snapshot.task_status == "queueing" and not result.snapshot.is_known_status
    assert fake.posts() == [] and [s.task_status for s in listed] == ["queueing"]
    assert any("unknown status 'queueing'" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("exc", [httpx.ReadTimeout, httpx.RemoteProtocolError, httpx.WriteError])
async def test_ambiguous_transport_failure_adopts_instead_of_reposting(make_client, fake, exc) -> None:
    fake.fail("POST", exc=exc, after=True)  # the server created the task, the answer was lost
    async with make_client(fake) as client:
        result = await client.submit(T2V, EXT)
    assert result.adopted is True and result.via == "lookup" and result.snapshot.external_task_id == EXT
    assert len(fake.posts()) == 1 and len(fake.tasks) == 1


@pytest.mark.parametrize(
    "response_args", [(None, 5000, 500, "internal error"), (None, 5002, 504, "timeout"), ({"task_status": "x"},)]
)
async def test_ambiguous_5xx_or_malformed_success_adopts(make_client, fake, response_args) -> None:
    fake.fail("POST", response=fake.envelope(*response_args), after=True)
    async with make_client(fake) as client:
        result = await client.submit(T2V, EXT)
    assert result.adopted is True and len(fake.posts()) == 1 and len(fake.tasks) == 1


async def test_ambiguous_failure_unproven_lookup_is_not_resent(make_client, fake) -> None:
    # Nothing was created, but no lookup form has ever found a known task here: "not found" proves nothing.
    fake.fail("POST", response=fake.envelope(None, 5000, 500, "internal error"))
    async with make_client(fake) as client:
        with pytest.raises(AmbiguousSubmitError) as info:
            await client.submit(T2V, EXT)
    err = info.value
    assert len(fake.posts()) == 1 and fake.tasks == {}
    assert err.external_task_id == EXT and not err.retryable
    text = str(err)
    assert f"external_task_id {EXT}" in text and "internal error" in text and "not proven" in text
    assert f"`--adopt {EXT}=TASK_ID`" in text and f"`--assume-not-created {EXT}` (this pays for it)" in text
    assert "check the provider's console" in text.lower()


async def test_ambiguous_failure_with_proven_lookup_reposts(make_client, fake) -> None:
    control = fake.add_task("text2video", CONTROL, status="succeed")  # listed on page 1: the control
    fake.fail("POST", response=fake.envelope(None, 5000, 500, "internal error"))  # failed before creating
    async with make_client(fake) as client:
        result = await client.submit(T2V, EXT)
    assert result.adopted is False and result.via == "created" and len(fake.posts()) == 2
    assert len(fake.tasks) == 2 and result.snapshot.task_id != control
    methods = [r.method for r in fake.requests]
    between = fake.requests[methods.index("POST") + 1 : len(methods) - 1]
    assert len(fake.gets_with(external_task_id=CONTROL)) == 1  # the positive control, run once
    assert any(r.url.params.get("external_task_id") == EXT for r in between)  # looked up between the POSTs


async def test_reposts_are_bounded(make_client, fake) -> None:
    fake.add_task("text2video", CONTROL)
    fake.fail("POST", response=fake.envelope(None, 5001, 503, "maintenance"), times=10)
    async with make_client(fake) as client:
        with pytest.raises(ServerError):  # proven: nothing was created, but the POST budget is spent
            await client.submit(T2V, EXT)
    assert len(fake.posts()) == 3 and len(fake.tasks) == 1
    assert len(fake.gets_with(external_task_id=CONTROL)) == 1  # the proof is cached


async def test_connect_error_is_resent(make_client, fake) -> None:
    fake.fail("POST", exc=httpx.ConnectError)
    async with make_client(fake) as client:
        result = await client.submit(T2V, EXT)
    assert result.adopted is False and len(fake.posts()) == 2 and len(fake.tasks) == 1


async def test_duplicate_1201_adopts_existing(make_client, fake) -> None:
    # The pre-POST lookup misses (e.g. not yet visible), the POST answers "duplicate": adopt.
    task_id = fake.add_task("text2video", EXT)
    fake.fail("GET", response=fake.envelope([]), times=3)  # both lookup forms and the list page miss
    async with make_client(fake) as client:
        result = await client.submit(T2V, EXT)
    assert result.adopted is True and result.via == "1201" and result.snapshot.task_id == task_id
    assert len(fake.posts()) == 1 and len(fake.tasks) == 1


async def test_duplicate_1201_found_by_list_when_forms_are_broken(make_client, fake) -> None:
    fake.query_lookup = fake.path_lookup = False
    task_id = fake.add_task("text2video", EXT)
    fake.fail("GET", response=fake.envelope([]), times=3)
    async with make_client(fake) as client:
        result = await client.submit(T2V, EXT)
    assert result.via == "1201" and result.snapshot.task_id == task_id and len(fake.posts()) == 1


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
    assert info.value.code == code and len(fake.gets()) == 3  # no lookup after a definite refusal


async def test_lookup_off_ambiguous_failure_is_not_resent(make_client, fake, caplog) -> None:
    fake.fail("POST", exc=httpx.ReadTimeout)  # lost before the server made anything
    caplog.set_level(logging.WARNING, logger="kling_tasks.api")
    async with make_client(fake, external_id_lookup="off") as client:
        with pytest.raises(AmbiguousSubmitError) as info:
            await client.submit(T2V, EXT)
        assert EXT in str(info.value) and info.value.external_task_id == EXT
        assert "lookup by external_task_id is off" in str(info.value)
        assert len(fake.posts()) == 1
        assert all("external_task_id" not in r.url.params for r in fake.gets())  # list scans only
        assert len(fake.gets()) == 2  # one list page before the POST, one after
        # A second submit logs no second "cannot look up" warning.
        await client.submit(T2V, "job1-s1-ffff")
    warnings = [r for r in caplog.records if "cannot look tasks up" in r.getMessage()]
    assert len(warnings) == 1


async def test_lookup_off_list_scan_adopts(make_client, fake) -> None:
    fake.fail("POST", exc=httpx.ReadTimeout, after=True)  # created, answer lost
    async with make_client(fake, external_id_lookup="off") as client:
        result = await client.submit(T2V, EXT)
    assert result.adopted is True and result.via == "list" and len(fake.posts()) == 1 and len(fake.tasks) == 1


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


# ---- before_post, may_exist, assume_not_created, adopt_task_id ----------------------------------------------


async def test_before_post_runs_before_every_post(make_client, fake) -> None:
    seen: list[int] = []

    async def before_post() -> None:
        seen.append(len(fake.posts()))

    fake.fail("POST", exc=httpx.ConnectError)
    async with make_client(fake) as client:
        await client.submit(T2V, EXT, before_post=before_post)
        await client.submit(T2V, EXT, before_post=before_post)  # adopts: no POST, no hook
    assert seen == [0, 1] and len(fake.posts()) == 2


async def test_before_post_failure_sends_nothing(make_client, fake) -> None:
    async def before_post() -> None:
        raise OSError("ledger disk full")

    async with make_client(fake) as client:
        with pytest.raises(OSError):
            await client.submit(T2V, EXT, before_post=before_post)
    assert fake.posts() == []


async def test_may_exist_adopts_existing(make_client, fake) -> None:
    task_id = fake.add_task("text2video", EXT)
    async with make_client(fake) as client:
        result = await client.submit(T2V, EXT, may_exist=True)
    assert result.adopted and result.snapshot.task_id == task_id and fake.posts() == []


async def test_may_exist_not_found_unproven_stops_without_post(make_client, fake) -> None:
    called: list[bool] = []

    async def before_post() -> None:
        called.append(True)

    async with make_client(fake) as client:
        with pytest.raises(AmbiguousSubmitError) as info:
            await client.submit(T2V, EXT, may_exist=True, before_post=before_post)
    assert fake.posts() == [] and called == []
    assert info.value.external_task_id == EXT and "earlier run" in str(info.value)


async def test_may_exist_not_found_with_remembered_control_posts(make_client, fake) -> None:
    control = fake.add_task("text2video", CONTROL, status="succeed")
    async with make_client(fake) as client:
        client.remember("text2video", CONTROL, control)  # e.g. from the ledger of an earlier step
        result = await client.submit(T2V, EXT, may_exist=True)
    assert result.via == "created" and len(fake.posts()) == 1
    assert len(fake.gets_with(external_task_id=CONTROL)) == 1


async def test_assume_not_created_posts_once_without_proof(make_client, fake) -> None:
    async with make_client(fake) as client:
        result = await client.submit(T2V, EXT, may_exist=True, assume_not_created=True)
    assert result.via == "created" and len(fake.posts()) == 1 and len(fake.gets()) == 3  # no control run


async def test_assume_not_created_still_adopts_a_task_that_exists(make_client, fake) -> None:
    task_id = fake.add_task("text2video", EXT)
    async with make_client(fake) as client:
        result = await client.submit(T2V, EXT, assume_not_created=True)
    assert result.adopted and result.snapshot.task_id == task_id and fake.posts() == []


async def test_assume_not_created_licenses_one_post_only(make_client, fake) -> None:
    fake.fail("POST", response=fake.envelope(None, 5000, 500, "internal error"))  # ambiguous again
    async with make_client(fake) as client:
        with pytest.raises(AmbiguousSubmitError):
            await client.submit(T2V, EXT, assume_not_created=True)
    assert len(fake.posts()) == 1


async def test_adopt_task_id_gets_it_and_never_posts(make_client, fake) -> None:
    task_id = fake.add_task("text2video", EXT, status="processing")
    async with make_client(fake) as client:
        result = await client.submit(T2V, EXT, adopt_task_id=task_id)
    assert result.adopted and result.via == "adopt_task_id" and result.snapshot.task_id == task_id
    assert fake.posts() == [] and [r.url.path for r in fake.gets()] == [f"/v1/videos/text2video/{task_id}"]
    assert (("kling", "https://kling.test", "text2video"), EXT, task_id) in [
        (key, e, t) for key, known in TaskFinder._known.items() for e, t in known.items()
    ]  # remembered: a positive control from now on


async def test_adopt_task_id_without_echo_is_adopted(make_client, fake) -> None:
    task_id = fake.add_task("text2video")  # task_info {}
    async with make_client(fake) as client:
        result = await client.submit(T2V, EXT, adopt_task_id=task_id)
    assert result.snapshot.external_task_id == EXT and fake.posts() == []


async def test_adopt_task_id_of_another_external_id_is_refused(make_client, fake) -> None:
    task_id = fake.add_task("text2video", "other-s0-1234")
    async with make_client(fake) as client:
        with pytest.raises(InvalidRequestError) as info:
            await client.submit(T2V, EXT, adopt_task_id=task_id)
    assert EXT in str(info.value) and "other-s0-1234" in str(info.value) and task_id in str(info.value)
    assert fake.posts() == []


async def test_adopt_unknown_task_id_is_not_found(make_client, fake) -> None:
    async with make_client(fake) as client:
        with pytest.raises(NotFoundError, match="cannot adopt task 123"):
            await client.submit(T2V, EXT, adopt_task_id="123")
    assert fake.posts() == []


async def test_adopt_and_assume_together_are_refused(make_client, fake) -> None:
    async with make_client(fake) as client:
        with pytest.raises(InvalidRequestError, match="contradict"):
            await client.submit(T2V, EXT, adopt_task_id="1", assume_not_created=True)
    assert fake.requests == []


async def test_positional_call_stays_compatible(make_client, fake) -> None:
    async with make_client(fake) as client:
        result = await KlingClient.submit(client, T2V, EXT)
    assert result.snapshot.external_task_id == EXT


# ---- found by mutation testing (docs/mutation.md) -------------------------------------------------------------


async def test_submit_called_directly_posts_a_fresh_id_and_wants_evidence_only_when_told(make_client, fake) -> None:
    """The module's own defaults (not only the client wrapper's): no doubt unless may_exist, no licence to post."""
    async with make_client(fake) as client:
        with pytest.raises(AmbiguousSubmitError):
            await submit(client, T2V, EXT, may_exist=True)  # nothing known yet: "not found" proves nothing
        assert fake.posts() == []
        fresh = await submit(client, T2V, EXT)
    assert fresh.via == "created" and len(fake.posts()) == 1


async def test_ambiguous_transport_failures_end_with_the_transport_error_once_the_budget_is_spent(
        make_client, fake) -> None:
    fake.add_task("text2video", CONTROL)  # proves the lookup: each "not found" after a timeout is evidence
    fake.fail("POST", exc=httpx.ReadTimeout, times=10)  # every create times out before the server makes it
    async with make_client(fake) as client:
        with pytest.raises(TransportError) as info:
            await client.submit(T2V, EXT)
    assert info.value.may_have_been_sent and info.value.external_task_id == EXT
    assert len(fake.posts()) == 3 and len(fake.tasks) == 1


def client_with_real_backoff(fake, clock) -> KlingClient:
    return KlingClient(make_settings(), transport=fake.transport, sleep=clock.sleep, clock=clock,
                       retry=RetryPolicy(base_delay=1.0, max_delay=20.0, jitter=0.0, max_posts=3))


async def test_resending_an_unsent_create_backs_off_from_one_second(fake, clock) -> None:
    fake.fail("POST", exc=httpx.ConnectError, times=2)
    async with client_with_real_backoff(fake, clock) as client:
        result = await client.submit(T2V, EXT)
    assert result.via == "created" and len(fake.posts()) == 3
    assert clock.sleeps == [1.0, 2.0]


async def test_the_lookup_after_an_ambiguous_create_waits_from_one_second(fake, clock) -> None:
    fake.add_task("text2video", CONTROL)
    fake.fail("POST", response=fake.envelope(None, 5000, 500, "internal error"), times=2)  # nothing created
    async with client_with_real_backoff(fake, clock) as client:
        result = await client.submit(T2V, EXT)
    assert result.via == "created" and len(fake.posts()) == 3
    settle = 2 * client.settings.read_timeout  # a "not found" counts once the server has had that much more
    assert clock.sleeps == [1.0, settle, 2.0, settle]


@pytest.mark.parametrize("how", ["1201", "ambiguous"])
async def test_a_task_adopted_after_a_post_becomes_a_known_task_of_its_kind(make_client, fake, how: str) -> None:
    task_id = fake.add_task("text2video", EXT)
    if how == "1201":
        fake.fail("GET", response=fake.envelope([]), times=3)  # the pre-POST search misses; the POST says 1201
    else:
        del fake.tasks[task_id]
        fake.fail("POST", exc=httpx.ReadTimeout, after=True)  # created, the answer lost
    async with make_client(fake) as client:
        result = await client.submit(T2V, EXT)
        assert result.adopted and result.via == ("1201" if how == "1201" else "lookup")
        assert (EXT, result.snapshot.task_id) in client._finder.known("text2video"), "a positive control from now on"


async def test_refusals_to_adopt_name_the_task_and_the_step(make_client, fake) -> None:
    other = fake.add_task("text2video", "other-s0-1234")
    async with make_client(fake) as client:
        with pytest.raises(NotFoundError) as missing:
            await client.submit(T2V, EXT, adopt_task_id="123")
        with pytest.raises(InvalidRequestError) as foreign:
            await client.submit(T2V, EXT, adopt_task_id=other)
        with pytest.raises(InvalidRequestError) as contradiction:
            await client.submit(T2V, EXT, adopt_task_id="1", assume_not_created=True)
    err = missing.value
    assert (err.task_id, err.external_task_id, err.code, err.http_status) == ("123", EXT, 1203, 404)
    assert err.request_id is not None and err.request_id in str(err)
    assert (foreign.value.task_id, foreign.value.external_task_id) == (other, EXT)
    assert contradiction.value.external_task_id == EXT
    assert fake.posts() == []
