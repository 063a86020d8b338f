"""Finding a task by external id (forms, then list scan) and proving a form before believing "not found"."""

from __future__ import annotations

import logging

import httpx
import pytest

from kling_tasks.api import AmbiguousSubmitError, InvalidRequestError, KlingClient, Text2VideoRequest
from kling_tasks.api.lookup import KNOWN_PER_KIND, LIST_PAGE_SIZE, LIST_PAGES, TaskFinder

from .conftest import FAST_RETRY, make_settings

pytestmark = pytest.mark.anyio
T2V = Text2VideoRequest(prompt="a harbour at night")
EXT = "job2-s0-00aa11bb"
CONTROL = "ctl-s0-ffff0000"


def lost_before_creating(fake) -> None:
    fake.fail("POST", exc=httpx.ReadTimeout)  # may have been sent, but the server made nothing


async def test_query_form_that_ignores_the_filter_is_not_proven(make_client, fake) -> None:
    # The server lists every task for ?external_task_id=: the control is "found", but beside other tasks.
    fake.query_lookup = False
    fake.path_lookup = False
    fake.add_task("text2video", CONTROL)
    fake.add_task("text2video", "another-s0-1")
    lost_before_creating(fake)
    async with make_client(fake) as client:
        with pytest.raises(AmbiguousSubmitError) as info:
            await client.submit(T2V, EXT)
    assert len(fake.posts()) == 1 and "not proven" in str(info.value)
    assert len(fake.gets_with(external_task_id=CONTROL)) == 1  # the control was tried, and failed
    assert TaskFinder._proofs == set()


async def test_path_form_proven_when_query_is_broken(make_client, fake) -> None:
    fake.query_lookup = False
    fake.add_task("text2video", CONTROL)
    fake.add_task("text2video", "another-s0-1")
    lost_before_creating(fake)
    async with make_client(fake) as client:
        result = await client.submit(T2V, EXT)
    assert result.via == "created" and len(fake.posts()) == 2
    assert TaskFinder._proofs == {("kling", "https://kling.test", "path")}
    assert any(r.url.path == f"/v1/videos/text2video/{CONTROL}" for r in fake.gets())


async def test_query_form_refused_is_not_evidence(make_client, fake) -> None:
    # In `auto`, a form the server refuses (1200) is "cannot tell", not "not found".
    fake.path_lookup = False
    fake.add_task("text2video", CONTROL)
    refuse = lambda r: "external_task_id" in r.url.params  # noqa: E731
    fake.fail("GET", response=fake.envelope(None, 1200, 400, "unknown parameter"), times=100, match=refuse)
    lost_before_creating(fake)
    async with make_client(fake) as client:
        with pytest.raises(AmbiguousSubmitError) as info:
            await client.submit(T2V, EXT)
    assert "query lookup: unsupported" in str(info.value) and len(fake.posts()) == 1


async def test_proof_is_cached_per_account(make_client, fake, clock) -> None:
    control = fake.add_task("text2video", CONTROL)
    async with make_client(fake) as client:
        client.remember("text2video", CONTROL, control)
        lost_before_creating(fake)
        await client.submit(T2V, EXT)
    async with make_client(fake) as other:  # another client, same provider + base URL
        lost_before_creating(fake)
        await other.submit(T2V, "job2-s0-22cc33dd")
    assert len(fake.gets_with(external_task_id=CONTROL)) == 1  # proven once, in-process
    assert TaskFinder._proofs == {("kling", "https://kling.test", "query")}
    # Another base URL is another account: nothing carries over.
    settings = make_settings().model_copy(update={"api_base_url": "https://elsewhere.test"})
    elsewhere = KlingClient(settings, transport=fake.transport, sleep=clock.sleep, retry=FAST_RETRY)
    assert not elsewhere._finder.is_proven("query") and elsewhere._finder.known("text2video") == []
    assert other._finder.is_proven("query"), "one wire form for every kind"
    await elsewhere.aclose()


async def test_control_must_be_found_by_task_id(make_client, fake) -> None:
    # A remembered task the server no longer knows proves nothing.
    fake.add_task("text2video", "listed-s0-1")
    lost_before_creating(fake)
    async with make_client(fake) as client:
        client.remember("text2video", CONTROL, "999999")
        with pytest.raises(AmbiguousSubmitError):
            await client.submit(T2V, EXT)
    assert TaskFinder._proofs == set()


async def test_an_extension_lookup_is_proven_by_the_task_it_continues(make_client, fake) -> None:
    """No video-extend task exists yet: the text2video parent (a known task of another kind) proves the form,
    so a lost first extension is resent once instead of stopping as ambiguous."""
    from kling_tasks.api import VideoExtendRequest

    parent = fake.add_task("text2video", CONTROL, status="succeed")
    async with make_client(fake) as client:
        client.remember("text2video", CONTROL, parent)
        lost_before_creating(fake)
        result = await client.submit(VideoExtendRequest(video_id="v-1"), "job2-s1-00aa11bb")
    assert result.via == "created" and len(fake.posts()) == 2
    assert fake.gets_with(external_task_id=CONTROL), "the parent was the positive control"


async def test_own_creates_become_controls(make_client, fake) -> None:
    async with make_client(fake) as client:
        first = await client.submit(T2V, "job2-s0-first")
        lost_before_creating(fake)
        result = await client.submit(T2V, EXT)
    assert result.via == "created" and len(fake.tasks) == 2
    assert len(fake.gets_with(external_task_id="job2-s0-first")) == 2  # pre-POST lookup, then the control
    assert client._finder.known("text2video")[-1] == ("job2-s0-first", first.snapshot.task_id)


def external_ids_asked(requests: list[httpx.Request]) -> list[str | None]:
    """Each GET's external id: the query form's parameter, the path form's last segment, None for a list page."""
    return [r.url.params.get("external_task_id") or (r.url.path.rsplit("/", 1)[-1] if "-s" in r.url.path else None)
            for r in requests]


async def test_a_first_create_proves_the_query_form_once_then_asks_it_alone(make_client, fake) -> None:
    """Before a first create: the process's first task is looked up by the query form, the path form and the list;
    the second puts the query form to one control (the first task) and believes its "not found"; from then on a
    create costs one lookup GET. A task that exists is still found."""
    async with make_client(fake) as client:
        await client.submit(T2V, "job2-s0-first")
        assert external_ids_asked(fake.gets()) == ["job2-s0-first", "job2-s0-first", None]
        gets = len(fake.gets())
        await client.submit(T2V, "job2-s0-second")
        assert external_ids_asked(fake.gets()[gets:]) == ["job2-s0-second", "job2-s0-first"]
        assert client._finder.is_proven("query")
        gets = len(fake.gets())
        fresh = await client.submit(T2V, "job2-s0-third")
        assert fresh.via == "created" and external_ids_asked(fake.gets()[gets:]) == ["job2-s0-third"]
        existing = fake.add_task("text2video", "job2-s0-made-elsewhere")
        found = await client.submit(T2V, "job2-s0-made-elsewhere")
    assert found.via == "lookup" and found.snapshot.task_id == existing
    assert len(fake.posts()) == 3


async def test_a_query_form_that_fails_its_control_is_put_to_it_once(make_client, fake) -> None:
    """A server that ignores the query filter fails the control: later creates do not try again (no GET, no
    warning per create) and keep the path form and the list scan."""
    fake.query_lookup = False
    fake.add_task("text2video", "another-s0-1")  # listed beside the control by a server that ignores the filter
    async with make_client(fake) as client:
        await client.submit(T2V, "job2-s0-first")
        for ext in ("job2-s0-second", "job2-s0-third"):
            await client.submit(T2V, ext)
        assert not client._finder.is_proven("query")
        assert len(fake.gets_with(external_task_id="job2-s0-first")) == 2  # its own lookup, then the control once
    assert len(fake.posts()) == 3


@pytest.mark.parametrize("lookup", ["auto", "query", "path", "off"])
async def test_list_scan_finds_task_on_a_later_page(make_client, fake, lookup: str) -> None:
    fake.query_lookup = fake.path_lookup = False  # both forms broken: only the list can find it
    for i in range(LIST_PAGE_SIZE + 20):
        fake.add_task("text2video", f"filler-s0-{i}")
    task_id = fake.add_task("text2video", EXT)
    async with make_client(fake, external_id_lookup=lookup) as client:
        result = await client.submit(T2V, EXT)
    assert result.adopted and result.via == "list" and result.snapshot.task_id == task_id
    pages = [r.url.params["pageNum"] for r in fake.gets() if "pageNum" in r.url.params]
    assert pages == ["1", "2"] and fake.posts() == []


async def test_list_scan_reads_at_most_its_pages(make_client, fake) -> None:
    for i in range(LIST_PAGE_SIZE * LIST_PAGES + 5):
        fake.add_task("text2video", f"filler-s0-{i}")
    fake.add_task("text2video", EXT)  # beyond the scanned pages
    async with make_client(fake, external_id_lookup="off") as client:
        with pytest.raises(InvalidRequestError) as info:
            await client.submit(T2V, EXT)
    # Not found in the first pages: before any POST that is fine; the server's 1201 is then raised as is.
    pages = [r.url.params["pageNum"] for r in fake.gets()]
    assert pages == [str(n) for n in range(1, LIST_PAGES + 1)] * 2 and info.value.code == 1201
    assert len(fake.posts()) == 1


async def test_several_tasks_with_our_id_adopt_the_oldest(make_client, fake, caplog) -> None:
    fake.unique_ext = False  # a provider that does not enforce uniqueness
    older = fake.add_task("text2video", EXT, created_at=1774805000000)
    newer = fake.add_task("text2video", EXT, created_at=1774805999999)
    fake.tasks = dict(reversed(fake.tasks.items()))  # the server lists the newest first
    caplog.set_level(logging.WARNING, logger="kling_tasks.api")
    async with make_client(fake) as client:
        by_query = await client.submit(T2V, EXT)
    async with make_client(fake, external_id_lookup="off") as client:
        by_list = await client.submit(T2V, EXT)
    assert by_query.snapshot.task_id == older and by_query.via == "lookup"
    assert by_list.snapshot.task_id == older and by_list.via == "list"
    warning = next(r.getMessage() for r in caplog.records if "tasks carry external_task_id" in r.getMessage())
    assert older in warning and newer in warning and fake.posts() == []


async def test_get_by_external_id_never_scans_the_list(make_client, fake) -> None:
    fake.query_lookup = fake.path_lookup = False
    fake.add_task("text2video", EXT)
    async with make_client(fake) as client:
        assert await client.get_by_external_id("text2video", "absent-s0-1") is None
    assert all("pageNum" not in r.url.params for r in fake.gets())


async def test_path_answer_without_echo_is_adopted_unless_known_as_another(make_client, fake) -> None:
    # A provider that does not echo task_info: the path form's lone task is ours...
    task_id = fake.add_task("text2video")
    fake.fail("GET", response=fake.envelope([]))  # the query form finds nothing
    fake.fail("GET", response=lambda r: fake.envelope(fake.public(task_id)))  # the path form answers it
    async with make_client(fake) as client:
        result = await client.submit(T2V, EXT)
        assert result.adopted and result.snapshot.task_id == task_id and result.snapshot.external_task_id == EXT
        # ...unless this process knows that task under another external id: then the form is not trusted.
        other = "job2-s0-99999999"
        fake.fail("GET", response=fake.envelope([]))
        fake.fail("GET", response=lambda r: fake.envelope(fake.public(task_id)))
        fake.fail("GET", response=fake.envelope([]))  # and the list page misses: POST
        second = await client.submit(T2V, other)
    assert second.via == "created" and second.snapshot.task_id != task_id and len(fake.posts()) == 1


# ---- found by mutation testing (docs/mutation.md) -------------------------------------------------------------


def is_path_form(fake, request: httpx.Request) -> bool:
    """GET /{kind}/{key} where key is not a task id: the path form of the external-id lookup."""
    head, _, key = request.url.path.rpartition("/")
    return request.method == "GET" and head.count("/") == 3 and key not in fake.tasks


def refuse(fake, what: str, code: int = 1200, status: int = 400) -> None:
    match = {"query": lambda r: "external_task_id" in r.url.params, "list": lambda r: "pageNum" in r.url.params}[what]
    fake.fail("GET", response=fake.envelope(None, code, status, "refused"), times=100, match=match)


async def test_path_only_lookup_is_proven_by_a_control_even_without_an_echo(make_client, fake) -> None:
    # A provider whose path form resolves the external id but answers without task_info.
    def no_echo(request: httpx.Request) -> httpx.Response:
        key = request.url.path.rpartition("/")[2]
        for task_id, task in fake.tasks.items():
            if task["task_info"].get("external_task_id") == key:
                return fake.envelope({**fake.public(task_id), "task_info": {}})
        return fake.envelope(None, 1203, 404, "task not found")

    control = fake.add_task("text2video", CONTROL)
    fake.fail("GET", response=no_echo, times=100, match=lambda r: is_path_form(fake, r))
    lost_before_creating(fake)
    async with make_client(fake, external_id_lookup="path") as client:
        client.remember("text2video", CONTROL, control)
        result = await client.submit(T2V, EXT)
    assert result.via == "created" and len(fake.posts()) == 2
    assert TaskFinder._proofs == {("kling", "https://kling.test", "path")}
    assert all("external_task_id" not in r.url.params for r in fake.gets()), "path mode never asks the query form"


async def test_a_path_form_that_answers_with_another_task_is_never_evidence(make_client, fake) -> None:
    # The path form returns the same (known) task for any id: it finds the control, so it looks proven.
    fake.unique_ext = False  # a second create would be a second paid task
    control = fake.add_task("text2video", CONTROL)
    refuse(fake, "query")
    refuse(fake, "list")
    fake.fail("GET", response=lambda r: fake.envelope(fake.public(control)), times=100,
              match=lambda r: is_path_form(fake, r))  # fmt: skip
    fake.fail("POST", exc=httpx.ReadTimeout, after=True)  # created, the answer lost
    async with make_client(fake) as client:
        client.remember("text2video", CONTROL, control)
        with pytest.raises(AmbiguousSubmitError) as info:
            await client.submit(T2V, EXT)
    assert len(fake.posts()) == 1 and len(fake.tasks) == 2
    assert f"answered with task(s) {control}" in str(info.value) and "list page 1" in str(info.value)


async def test_a_control_that_cannot_be_asked_proves_nothing(make_client, fake) -> None:
    control = fake.add_task("text2video", CONTROL)
    asks_control = lambda r: r.url.params.get("external_task_id") == CONTROL or r.url.path.endswith(CONTROL)  # noqa: E731
    fake.fail("GET", response=fake.envelope(None, 1101, 403, "account abnormal"), times=100, match=asks_control)
    lost_before_creating(fake)
    async with make_client(fake) as client:
        client.remember("text2video", CONTROL, control)
        with pytest.raises(AmbiguousSubmitError):
            await client.submit(T2V, EXT)
    assert len(fake.posts()) == 1 and TaskFinder._proofs == set()


async def test_a_control_found_under_another_task_id_proves_nothing(make_client, fake) -> None:
    # The ledger knows CONTROL as task 999999; the server has CONTROL, but as another task.
    fake.add_task("text2video", CONTROL)
    lost_before_creating(fake)
    async with make_client(fake) as client:
        client.remember("text2video", CONTROL, "999999")
        with pytest.raises(AmbiguousSubmitError):
            await client.submit(T2V, EXT)
    assert len(fake.posts()) == 1 and TaskFinder._proofs == set()


async def test_a_lookup_get_is_retried_before_the_form_gives_up(make_client, fake) -> None:
    task_id = fake.add_task("text2video", EXT)
    fake.fail("GET", response=fake.envelope(None, 5000, 500, "internal error"),
              match=lambda r: "external_task_id" in r.url.params)  # fmt: skip
    async with make_client(fake, external_id_lookup="query") as client:
        result = await client.submit(T2V, EXT)
    assert result.via == "lookup" and result.snapshot.task_id == task_id and fake.posts() == []
    assert len(fake.gets_with(external_task_id=EXT)) == 2 and all("pageNum" not in r.url.params for r in fake.gets())


async def test_a_list_page_get_is_retried_before_the_scan_gives_up(make_client, fake) -> None:
    task_id = fake.add_task("text2video", EXT)
    fake.fail("GET", response=fake.envelope(None, 5001, 503, "maintenance"), match=lambda r: "pageNum" in r.url.params)
    async with make_client(fake, external_id_lookup="off") as client:
        result = await client.submit(T2V, EXT)
    assert result.via == "list" and result.snapshot.task_id == task_id and fake.posts() == []


async def test_a_form_still_failing_after_its_retries_hands_over_to_the_next_form(make_client, fake) -> None:
    task_id = fake.add_task("text2video", EXT)
    refuse(fake, "query", code=5000, status=500)  # transient, but through all of the client's retries
    async with make_client(fake) as client:
        result = await client.submit(T2V, EXT)
    assert result.via == "lookup" and result.snapshot.task_id == task_id and fake.posts() == []
    assert any(r.url.path == f"/v1/videos/text2video/{EXT}" for r in fake.gets()), "found by the path form"


async def test_an_unreadable_list_is_no_evidence_and_no_error_before_the_first_post(make_client, fake) -> None:
    refuse(fake, "list", code=5001, status=503)
    async with make_client(fake, external_id_lookup="off") as client:
        result = await client.submit(T2V, EXT)
    assert result.via == "created" and len(fake.posts()) == 1


async def test_a_malformed_task_in_a_list_page_does_not_hide_ours(make_client, fake) -> None:
    task_id = fake.add_task("text2video", EXT)
    odd = {"task_status": "submitted", "task_info": {"external_task_id": "other-s0-1"}}  # no task_id
    fake.fail("GET", response=lambda r: fake.envelope([odd, fake.public(task_id)]),
              match=lambda r: "pageNum" in r.url.params)  # fmt: skip
    async with make_client(fake, external_id_lookup="off") as client:
        result = await client.submit(T2V, EXT)
    assert result.via == "list" and result.snapshot.task_id == task_id and fake.posts() == []


async def test_known_tasks_are_bounded_and_keep_the_most_recent(make_client, fake) -> None:
    async with make_client(fake) as client:
        for i in range(KNOWN_PER_KIND + 6):
            client.remember("text2video", f"job-s0-{i}", str(i))
        client.remember("text2video", "", "77")  # nothing to look up by
        client.remember("text2video", "job-s0-x", "")  # nothing to find
        known = client._finder.known("text2video")
    assert len(known) == KNOWN_PER_KIND
    assert known[0] == (f"job-s0-{KNOWN_PER_KIND + 5}", str(KNOWN_PER_KIND + 5)), "most recent first"
    assert known[-1] == ("job-s0-6", "6"), "the oldest ones go first"


@pytest.mark.parametrize("control_kind", ["image2video", "video-extend"])
async def test_a_known_task_of_another_kind_proves_the_form(make_client, fake, control_kind: str) -> None:
    """A form is one wire shape for every kind: the task an extension continues proves its lookup, and back."""
    control = fake.add_task(control_kind, CONTROL)
    lost_before_creating(fake)
    async with make_client(fake) as client:
        client.remember(control_kind, CONTROL, control)  # type: ignore[arg-type]
        result = await client.submit(T2V, EXT)
    assert result.via == "created" and len(fake.posts()) == 2
    assert any(r.url.path == f"/v1/videos/{control_kind}" and r.url.params.get("external_task_id") == CONTROL
               for r in fake.gets()), "the control was asked under its own kind"
