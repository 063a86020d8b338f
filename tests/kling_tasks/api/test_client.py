"""Client operations over httpx.MockTransport: paths, auth, retries, lookups, both providers."""

from __future__ import annotations

import itertools
import json
import time
from typing import Any

import httpx
import pytest

from kling_tasks.api import (
    AccountError,
    AuthError,
    BackPressureError,
    ConfigError,
    InvalidRequestError,
    JwtAuth,
    KlingClient,
    KlingProtocolError,
    LookupUnsupportedError,
    NotFoundError,
    ServerError,
    Text2VideoRequest,
    TransportError,
    VideoExtendRequest,
)
from kling_tasks.settings import KlingSettings

pytestmark = pytest.mark.anyio
T2V = Text2VideoRequest(prompt="a red fox in snow")


def body(request: httpx.Request) -> dict[str, Any]:
    return json.loads(request.content)  # type: ignore[no-any-return]


async def test_create_posts_once_with_external_id(make_client, fake) -> None:
    async with make_client(fake) as client:
        snap = await client.create(T2V, "job-s0-abc")
    [post] = fake.posts()
    assert post.url.path == "/v1/videos/text2video" and post.url.host == "kling.test"
    assert body(post)["external_task_id"] == "job-s0-abc" and body(post)["duration"] == "5"
    assert post.headers["content-type"] == "application/json"
    assert snap.task_status == "submitted" and snap.external_task_id == "job-s0-abc" and snap.request_id


async def test_create_is_not_retried(make_client, fake) -> None:
    fake.fail("POST", response=fake.envelope(None, 5000, 500, "internal error"))
    async with make_client(fake) as client:
        with pytest.raises(ServerError):
            await client.create(T2V, None)
    assert len(fake.posts()) == 1


async def test_success_without_task_id_is_protocol_error(make_client, fake) -> None:
    fake.fail("POST", response=fake.envelope({"task_status": "submitted"}))
    async with make_client(fake) as client:
        with pytest.raises(KlingProtocolError, match="task_id"):
            await client.create(T2V, None)


async def test_get_retries_5000_and_transport_then_succeeds(make_client, fake, clock) -> None:
    task_id = fake.add_task("text2video", status="processing")
    fake.fail("GET", response=fake.envelope(None, 5000, 500, "internal error"))
    fake.fail("GET", exc=httpx.ReadTimeout)
    fake.fail("GET", exc=httpx.ConnectError)
    async with make_client(fake) as client:
        snap = await client.get("text2video", task_id)
    assert snap.task_status == "processing" and len(fake.gets()) == 4
    assert len(clock.sleeps) == 3 and clock.sleeps == sorted(clock.sleeps)  # growing backoff


async def test_get_gives_up_after_attempts(make_client, fake) -> None:
    fake.fail("GET", exc=httpx.ConnectError, times=10)
    async with make_client(fake) as client:
        with pytest.raises(TransportError) as info:
            await client.get("text2video", "1")
    assert info.value.may_have_been_sent is False and len(fake.gets()) == 4


async def test_no_retry_on_1201(make_client, fake) -> None:
    fake.fail("GET", response=fake.envelope(None, 1201, 400, "invalid value"), times=5)
    async with make_client(fake) as client:
        with pytest.raises(InvalidRequestError):
            await client.get("text2video", "1")
    assert len(fake.gets()) == 1


def test_production_backoff_starts_at_one_second() -> None:
    from kling_tasks.api import RetryPolicy

    policy = RetryPolicy()
    assert all(1.0 <= policy.delay(0) <= 1.25 for _ in range(50))
    assert policy.delay(10) <= policy.max_delay * 1.25


async def test_remint_on_1004_then_accepted(fake, clock) -> None:
    fake.expire_first_token = True
    ticks = itertools.count()
    settings = KlingSettings(provider="kling", api_base_url="https://kling.test", access_key="AKtestACCESSkey0001",
                             secret_key="SKtestSECRETkey0002-padded-to-32-bytes")  # fmt: skip
    auth = JwtAuth("AKtestACCESSkey0001", "SKtestSECRETkey0002-padded-to-32-bytes",
                   clock=lambda: time.time() + next(ticks))  # fmt: skip
    async with KlingClient(settings, transport=fake.transport, sleep=clock.sleep, auth=auth) as client:
        snap = await client.create(T2V, "job-s0-remint")
    assert len(fake.posts()) == 2 and len(set(fake.tokens)) == 2
    assert fake.tokens[1] not in fake.rejected_tokens and snap.task_id
    assert len(fake.tasks) == 1


async def test_auth_refusal_other_than_1003_1004_is_not_resent(make_client, fake) -> None:
    fake.fail("GET", response=fake.envelope(None, 1002, 401, "Authorization invalid"), times=5)
    async with make_client(fake) as client:
        with pytest.raises(AuthError):
            await client.get("text2video", "1")
    assert len(fake.gets()) == 1


async def test_missing_credentials_refused_before_any_request(fake) -> None:
    with pytest.raises(ConfigError, match="KLING_ACCESS_KEY"):
        KlingClient(KlingSettings(provider="kling", secret_key="s"), transport=fake.transport)
    assert fake.requests == []


async def test_cometapi_prefix_bearer_and_extend_body(make_client, comet_fake) -> None:
    async with make_client(comet_fake) as client:
        await client.create(VideoExtendRequest(video_id="v-123", parent_task_id="t-9", prompt="on"), "job-s1-x")
        [post] = comet_fake.posts()
        assert post.url.path == "/kling/v1/videos/video-extend" and post.url.host == "comet.test"
        assert post.headers["authorization"] == "Bearer sk-cometTESTbearer0003"
        assert body(post)["task_id"] == "t-9" and body(post)["video_id"] == "v-123"
        with pytest.raises(InvalidRequestError, match="parent_task_id"):
            await client.create(VideoExtendRequest(video_id="v-123"), "job-s1-y")
        assert len(comet_fake.posts()) == 1  # refused before sending
        task_id = next(iter(comet_fake.tasks))
        await client.get("video-extend", task_id)
        assert comet_fake.gets()[-1].url.path == f"/kling/v1/videos/video-extend/{task_id}"


async def test_kling_extend_body_has_no_task_id(make_client, fake) -> None:
    async with make_client(fake) as client:
        await client.create(VideoExtendRequest(video_id="v-123", parent_task_id="t-9"), None)
    [post] = fake.posts()
    assert post.url.path == "/v1/videos/video-extend"
    assert body(post) == {"video_id": "v-123"}
    assert post.headers["authorization"].startswith("Bearer ey")


async def test_list_parses_and_sends_paging(make_client, fake) -> None:
    for i in range(12):
        fake.add_task("text2video", f"e-{i}", status="queueing" if i == 11 else "submitted")
    async with make_client(fake) as client:
        snaps = await client.list("text2video", page_num=2, page_size=10)
    assert [s.external_task_id for s in snaps] == ["e-10", "e-11"]  # an unknown status word is not dropped
    assert snaps[1].task_status == "queueing"
    params = fake.gets()[0].url.params
    assert params["pageNum"] == "2" and params["pageSize"] == "10"


@pytest.mark.parametrize("mode", ["auto", "query"])
async def test_lookup_query_form(make_client, fake, mode: str) -> None:
    fake.add_task("text2video", "other-id")
    task_id = fake.add_task("text2video", "job-s0-q")
    async with make_client(fake, external_id_lookup=mode) as client:
        snap = await client.get_by_external_id("text2video", "job-s0-q")
        assert snap is not None and snap.task_id == task_id
        assert await client.get_by_external_id("text2video", "nope") is None
    first = fake.gets()[0]
    assert first.url.path == "/v1/videos/text2video" and first.url.params["external_task_id"] == "job-s0-q"
    # The miss: `query` asks the query form only; `auto` then tries the path form too. Never the list.
    tried = [(r.url.path, r.url.params.get("external_task_id")) for r in fake.gets()[1:]]
    expected = [("/v1/videos/text2video", "nope")]
    if mode == "auto":
        expected.append(("/v1/videos/text2video/nope", None))
    assert tried == expected


async def test_lookup_path_form(make_client, fake) -> None:
    task_id = fake.add_task("image2video", "job-s0-p")
    async with make_client(fake, external_id_lookup="path") as client:
        snap = await client.get_by_external_id("image2video", "job-s0-p")
        assert snap is not None and snap.task_id == task_id
        assert await client.get_by_external_id("image2video", "absent") is None
    assert [r.url.path for r in fake.gets()] == ["/v1/videos/image2video/job-s0-p", "/v1/videos/image2video/absent"]
    assert all("external_task_id" not in r.url.params for r in fake.gets())


async def test_auto_filters_ignored_query_then_tries_path(make_client, fake) -> None:
    fake.query_lookup = False  # server ignores ?external_task_id= and lists everything
    fake.add_task("text2video", "someone-else")
    task_id = fake.add_task("text2video", "job-s0-a")
    async with make_client(fake) as client:
        snap = await client.get_by_external_id("text2video", "job-s0-a")
        assert snap is not None and snap.task_id == task_id
        assert await client.get_by_external_id("text2video", "absent") is None
    # Found by filtering the unfiltered list; the absent id is then tried in the path form too.
    assert [r.url.path for r in fake.gets()] == ["/v1/videos/text2video"] * 2 + ["/v1/videos/text2video/absent"]


async def test_lookup_tolerates_object_data(make_client, fake) -> None:
    task_id = fake.add_task("text2video", "job-s0-o")
    fake.fail("GET", response=fake.envelope(fake.public(task_id)))
    async with make_client(fake, external_id_lookup="query") as client:
        snap = await client.get_by_external_id("text2video", "job-s0-o")
    assert snap is not None and snap.task_id == task_id


async def test_lookup_off_raises(make_client, fake) -> None:
    async with make_client(fake, external_id_lookup="off") as client:
        with pytest.raises(LookupUnsupportedError):
            await client.get_by_external_id("text2video", "x")
    assert fake.requests == []


async def test_timeouts_come_from_settings(make_client, fake) -> None:
    async with make_client(fake, connect_timeout=3, read_timeout=7) as client:
        timeout = client._http.timeout
    assert timeout.connect == 3 and timeout.read == 7


async def test_auto_uses_path_when_query_form_is_refused(make_client, fake) -> None:
    task_id = fake.add_task("text2video", "job-s0-r")
    fake.fail("GET", response=fake.envelope(None, 1200, 400, "unknown parameter"))
    async with make_client(fake) as client:
        snap = await client.get_by_external_id("text2video", "job-s0-r")
    assert snap is not None and snap.task_id == task_id
    assert fake.gets()[1].url.path == "/v1/videos/text2video/job-s0-r"


# ---- found by mutation testing (docs/mutation.md): the body code decides, then the status ----------------------


@pytest.mark.parametrize(("code", "error"), [(1303, BackPressureError), (1102, AccountError),
                                             (1201, InvalidRequestError), (5000, ServerError)])
async def test_an_error_code_in_an_http_200_envelope_is_that_error(make_client, fake, code: int, error: type) -> None:
    fake.fail("POST", response=fake.envelope(None, code, 200, "refused, politely"))
    async with make_client(fake) as client:
        with pytest.raises(error) as info:
            await client.create(T2V, "job-s0-1")
    assert type(info.value) is error and info.value.code == code and fake.tasks == {}


@pytest.mark.parametrize(("code", "status", "error"), [
    (0, 503, ServerError),  # a success code with an error status: the status tells what happened
    (200, 404, NotFoundError),
    (9999, 503, ServerError),  # a code outside Kling's ranges goes by the status too
    (9999, 400, InvalidRequestError),
])
async def test_a_code_that_does_not_classify_falls_back_on_the_status(make_client, fake, code: int, status: int,
                                                                      error: type) -> None:
    fake.fail("POST", response=fake.envelope(None, code, status, "odd"))
    async with make_client(fake) as client:
        with pytest.raises(error) as info:
            await client.create(T2V, "job-s0-1")
    assert type(info.value) is error and info.value.http_status == status


@pytest.mark.parametrize(("body", "status", "error"), [
    ({"error": "not kling"}, 200, KlingProtocolError),  # a 2xx we cannot read: ambiguous for a create
    ({"code": "0", "data": {"task_id": "1"}}, 200, KlingProtocolError),  # a code that is not a number
    ({"detail": "bad gateway"}, 502, ServerError),
])
async def test_json_that_is_not_a_kling_envelope_goes_by_the_status(make_client, fake, body: dict[str, Any],
                                                                    status: int, error: type) -> None:
    fake.fail("POST", response=httpx.Response(status, json=body))
    async with make_client(fake) as client:
        with pytest.raises(error) as info:
            await client.create(T2V, "job-s0-1")
    assert type(info.value) is error and info.value.http_status == status


async def test_a_create_answer_without_an_echo_carries_the_external_id_sent(make_client, fake) -> None:
    fake.fail("POST", response=fake.envelope({"task_id": "861", "task_status": "submitted"}))
    async with make_client(fake) as client:
        snap = await client.create(T2V, "job-s0-1")
    assert (snap.task_id, snap.external_task_id) == ("861", "job-s0-1")


async def test_get_takes_its_own_task_out_of_a_list_answer_and_never_another(make_client, fake) -> None:
    mine, other = fake.add_task("text2video", "job-s0-1"), fake.add_task("text2video", "other-s0-2")
    both = lambda r: fake.envelope([fake.public(other), fake.public(mine)])  # noqa: E731
    fake.fail("GET", response=both)
    fake.fail("GET", response=lambda r: fake.envelope([fake.public(other)]))
    async with make_client(fake) as client:
        assert (await client.get("text2video", mine)).task_id == mine
        with pytest.raises(KlingProtocolError):
            await client.get("text2video", mine)


async def test_wait_polls_the_kind_it_was_given(make_client, fake) -> None:
    task_id = fake.add_task("video-extend", "job-s1-1")
    fake.progress[task_id] = ["processing", "succeed"]
    async with make_client(fake) as client:
        final = await client.wait("video-extend", task_id)
    assert final.task_status == "succeed"
    assert {r.url.path for r in fake.gets()} == {f"/v1/videos/video-extend/{task_id}"}


def test_the_polling_settings_reach_the_poll_policy() -> None:
    settings = KlingSettings(access_key="ak", secret_key="sk", poll_min_seconds=2, poll_max_seconds=7,
                             wait_timeout_seconds=100, queue_timeout_seconds=50)
    policy = KlingClient(settings)._poll
    assert (policy.min_interval, policy.max_interval, policy.processing_timeout, policy.queue_timeout) == (
        2, 7, 100, 50)


async def test_api_redirects_are_never_followed_and_every_call_says_json(make_client, fake) -> None:
    fake.fail("GET", response=httpx.Response(302, headers={"Location": "https://elsewhere.test/v1/videos/x"}))
    async with make_client(fake) as client:
        with pytest.raises(KlingProtocolError):
            await client.get("text2video", "861")
        await client.create(T2V, "job-s0-1")
    assert [r.url.host for r in fake.requests] == ["kling.test", "kling.test"], "a redirect could carry the token"
    for request in fake.requests:
        assert request.headers["content-type"] == "application/json"
        assert request.headers["accept"].lower() == "application/json"
