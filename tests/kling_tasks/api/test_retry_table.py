"""DESIGN §3's table, one row per failure kind: who retries, counted in requests at the MockTransport.

GETs: transport errors, 5xx and 5000-5002 are retried by the client (RetryPolicy.attempts tries, backoff);
1003/1004 re-mint the JWT once; every other code is tried once. POSTs (through submit): a create that never
left the machine is resent (bounded by max_posts); an ambiguous one only after a proven lookup said "not
found"; 1302/1303 are raised unchanged; 1201 is looked up and adopted; the rest are tried once.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import httpx
import pytest

from kling_tasks.api import (
    AccountError,
    AmbiguousSubmitError,
    AuthError,
    BackPressureError,
    ContentPolicyError,
    InvalidRequestError,
    IPNotAllowedError,
    KlingError,
    NotFoundError,
    ServerError,
    Text2VideoRequest,
    TransportError,
)

from .conftest import FAST_RETRY, FakeKling

pytestmark = pytest.mark.anyio
T2V = Text2VideoRequest(prompt="a table of failures")
EXT = "tbl-s0-0123abcd"
ATTEMPTS = FAST_RETRY.attempts
MAX_POSTS = FAST_RETRY.max_posts
PRE = 3  # GETs of a submit's first search on an empty account: query form, path form, list page 1

Arm = Callable[[FakeKling], None]


def code(c: int, status: int, *, times: int = 1, after: bool = False, method: str = "GET") -> Arm:
    def arm(fake: FakeKling) -> None:
        fake.fail(method, response=fake.envelope(None, c, status, f"injected {c}"), times=times, after=after)

    return arm


def exc(e: type[Exception], *, times: int = 1, after: bool = False, method: str = "GET") -> Arm:
    def arm(fake: FakeKling) -> None:
        fake.fail(method, exc=e, times=times, after=after)

    return arm


def html(status: int, *, times: int = 1) -> Arm:
    def arm(fake: FakeKling) -> None:
        fake.fail("GET", response=httpx.Response(status, text="<html>bad gateway</html>"), times=times)

    return arm


# ---- GET -----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class GetRow:
    name: str
    arm: Arm
    gets: int
    error: type[KlingError] | None = None
    sleeps: int | None = None  # backoff sleeps (None: gets - 1)


FATAL_CODES = [
    (1000, 401, AuthError),
    (1001, 401, AuthError),
    (1002, 401, AuthError),
    (1100, 429, AccountError),
    (1101, 429, AccountError),
    (1102, 429, AccountError),
    (1103, 403, AccountError),
    (1200, 400, InvalidRequestError),
    (1201, 400, InvalidRequestError),
    (1202, 404, InvalidRequestError),
    (1203, 404, NotFoundError),
    (1300, 400, ContentPolicyError),
    (1301, 400, ContentPolicyError),
    (1304, 429, IPNotAllowedError),
]

GET_ROWS = [
    GetRow("5000 once", code(5000, 500), 2),
    GetRow("5001 once", code(5001, 503), 2),
    GetRow("5002 once", code(5002, 504), 2),
    GetRow("bare 502 once", html(502), 2),
    GetRow("5000 always", code(5000, 500, times=99), ATTEMPTS, ServerError),
    GetRow("read timeout once", exc(httpx.ReadTimeout), 2),
    GetRow("connect error always", exc(httpx.ConnectError, times=99), ATTEMPTS, TransportError),
    GetRow("1303 once", code(1303, 429), 2),
    GetRow("1003 once: re-mint", code(1003, 401), 2, sleeps=0),
    GetRow("1004 once: re-mint", code(1004, 401), 2, sleeps=0),
    GetRow("1004 always: re-mint once", code(1004, 401, times=99), 2, AuthError, sleeps=0),
    *[GetRow(f"{c} never retried", code(c, s, times=99), 1, cls, sleeps=0) for c, s, cls in FATAL_CODES],
]


@pytest.mark.parametrize("row", GET_ROWS, ids=lambda r: r.name)
async def test_get_retry_table(make_client, fake, clock, row: GetRow) -> None:
    task_id = fake.add_task("text2video", status="processing")
    row.arm(fake)
    async with make_client(fake) as client:
        if row.error is None:
            snap = await client.get("text2video", task_id)
            assert snap.task_id == task_id
        else:
            with pytest.raises(row.error):
                await client.get("text2video", task_id)
    assert len(fake.gets()) == row.gets
    assert len(clock.sleeps) == (row.gets - 1 if row.sleeps is None else row.sleeps)


# ---- POST (submit) -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class PostRow:
    name: str
    arm: Arm
    posts: int
    gets: int
    outcome: str | type[KlingError]  # SubmitResult.via, or the error raised
    control: bool = False  # another job's task on list page 1: the lookup forms can be proven
    tasks: int | None = None  # tasks at the server afterwards (None: 1 if created/adopted, else 0)


def post(arm: Callable[..., Arm], *args: object, **kw: object) -> Arm:
    return arm(*args, method="POST", **kw)  # type: ignore[arg-type]


POST_ROWS = [
    PostRow("no failure", lambda f: None, 1, PRE, "created"),
    PostRow("connect error once: resent", post(exc, httpx.ConnectError), 2, PRE, "created"),
    PostRow("connect timeout once: resent", post(exc, httpx.ConnectTimeout), 2, PRE, "created"),
    PostRow("connect error always: bounded", post(exc, httpx.ConnectError, times=99), MAX_POSTS, PRE, TransportError),
    PostRow("drop after send, task made: adopted", post(exc, httpx.ReadTimeout, after=True), 1, PRE + 1, "lookup"),
    # Lost, nothing made, and no known task to prove a form with: stop (query, path, list; no control found).
    PostRow("drop after send, unproven: stop", post(exc, httpx.ReadTimeout), 1, PRE + 3, AmbiguousSubmitError),
    # Same, but a listed task proves the query form (query, path, list, control), and a second search after the
    # server has had the read timeout again (query, path, list) still finds nothing: resent once.
    PostRow("drop after send, proven: resent", post(exc, httpx.ReadTimeout), 2, PRE + 4 + 3, "created",
            control=True),
    PostRow("5000, unproven: stop", post(code, 5000, 500), 1, PRE + 3, AmbiguousSubmitError),
    PostRow("5000 after creating: adopted", post(code, 5000, 500, after=True), 1, PRE + 1, "lookup"),
    # Proven each round: query, path, list (+ control once), and again after the settle wait in every round that
    # may resend; the last round (the budget spent) asks the proven query form alone (its "no" is the answer).
    PostRow(
        "5000 always, proven: bounded",
        post(code, 5000, 500, times=99),
        MAX_POSTS,
        PRE + (4 + 3) + (3 + 3) + 1,
        ServerError,
        control=True,
    ),
    PostRow("1302: raised, not resent", post(code, 1302, 429), 1, PRE, BackPressureError),
    PostRow("1303: raised, not resent", post(code, 1303, 429), 1, PRE, BackPressureError),
    PostRow("1003 once: re-mint", post(code, 1003, 401), 2, PRE, "created"),
    PostRow("1004 once: re-mint", post(code, 1004, 401), 2, PRE, "created"),
    PostRow("1004 always: re-mint once", post(code, 1004, 401, times=99), 2, PRE, AuthError),
    # 1201 after creating: the pre-POST search missed it, the duplicate answer is looked up and adopted.
    PostRow("1201 duplicate: adopted", post(code, 1201, 400, after=True), 1, PRE + 1, "1201"),
    PostRow("1201 invalid value: raised", post(code, 1201, 400), 1, PRE + PRE, InvalidRequestError),
    *[PostRow(f"{c}: tried once", post(code, c, s, times=99), 1, PRE, cls) for c, s, cls in FATAL_CODES if c != 1201],
]


@pytest.mark.parametrize("row", POST_ROWS, ids=lambda r: r.name)
async def test_post_retry_table(make_client, fake, row: PostRow) -> None:
    if row.control:
        fake.add_task("text2video", "ctl-s0-aaaa", status="succeed")
    before = len(fake.tasks)
    row.arm(fake)
    async with make_client(fake) as client:
        if isinstance(row.outcome, str):
            result = await client.submit(T2V, EXT)
            assert result.via == row.outcome and result.adopted == (row.outcome != "created")
        else:
            with pytest.raises(row.outcome) as info:
                await client.submit(T2V, EXT)
            assert info.value.external_task_id == EXT
    assert (len(fake.posts()), len(fake.gets())) == (row.posts, row.gets)
    made = len(fake.tasks) - before
    assert made == (row.tasks if row.tasks is not None else int(isinstance(row.outcome, str)))


async def test_1201_after_creating_is_not_duplicated(make_client, fake) -> None:
    # The fake's own duplicate check: a second POST for the same id answers 1201 and nothing is made twice.
    async with make_client(fake) as client:
        await client.create(T2V, EXT)
        result = await client.submit(T2V, EXT)
    assert result.adopted and len(fake.tasks) == 1 and len(fake.posts()) == 1
