"""Every code of reference §11 maps to its class and retryability, through the mapper and through the client."""

from __future__ import annotations

import httpx
import pytest

from kling_tasks.api import (
    AccountError,
    AuthError,
    BackPressureError,
    ContentPolicyError,
    InvalidRequestError,
    IPNotAllowedError,
    KlingError,
    KlingProtocolError,
    NotFoundError,
    ServerError,
    TaskFailedError,
    TaskSnapshot,
    TransportError,
    WaitTimeoutError,
)
from kling_tasks.api.errors import error_for_code, error_for_status

# (http status, code, class, retryable) — the §11 table.
TABLE = [
    (401, 1000, AuthError, False),
    (401, 1001, AuthError, False),
    (401, 1002, AuthError, False),
    (401, 1003, AuthError, False),  # the client's single re-mint is separate from `retryable`
    (401, 1004, AuthError, False),
    (429, 1100, AccountError, False),
    (429, 1101, AccountError, False),
    (429, 1102, AccountError, False),  # 429 but fatal: pack used up
    (403, 1103, AccountError, False),
    (400, 1200, InvalidRequestError, False),
    (400, 1201, InvalidRequestError, False),
    (404, 1202, InvalidRequestError, False),
    (404, 1203, NotFoundError, False),
    (400, 1300, ContentPolicyError, False),
    (400, 1301, ContentPolicyError, False),
    (429, 1302, BackPressureError, True),
    (429, 1303, BackPressureError, True),  # 429 and retryable: too many tasks
    (429, 1304, IPNotAllowedError, False),
    (500, 5000, ServerError, True),
    (503, 5001, ServerError, True),
    (504, 5002, ServerError, True),
]


@pytest.mark.parametrize(("status", "code", "cls", "retryable"), TABLE)
def test_code_table(status: int, code: int, cls: type[KlingError], retryable: bool) -> None:
    got = error_for_code(code, status)
    assert got is cls
    assert got.retryable is retryable


def test_code_decides_not_status() -> None:
    assert error_for_code(1102, 429) is AccountError
    assert error_for_code(1303, 429) is BackPressureError
    # A Kling code wins even under an odd status.
    assert error_for_code(1303, 500) is BackPressureError


@pytest.mark.parametrize(
    ("status", "cls"),
    [(401, AuthError), (403, AccountError), (404, NotFoundError), (429, BackPressureError),
     (400, InvalidRequestError), (502, ServerError), (599, ServerError), (200, KlingProtocolError)],
)  # fmt: skip
def test_status_fallback(status: int, cls: type[KlingError]) -> None:
    assert error_for_status(status) is cls


def test_unknown_codes_go_by_range_then_status() -> None:
    assert error_for_code(1005, 401) is AuthError
    assert error_for_code(5003, 502) is ServerError
    assert error_for_code(9999, 502) is ServerError
    assert error_for_code(9999, 400) is InvalidRequestError


def test_other_classes_retryable_flags() -> None:
    assert TransportError.retryable is True
    for cls in (TaskFailedError, WaitTimeoutError, KlingProtocolError):
        assert cls.retryable is False


@pytest.mark.anyio
@pytest.mark.parametrize(("status", "code", "cls", "retryable"), TABLE)
async def test_client_raises_table_class(
    status: int, code: int, cls: type[KlingError], retryable: bool, make_client, fake
) -> None:
    fake.fail("GET", response=fake.envelope(None, code, status, f"error {code}"), times=10)
    async with make_client(fake) as client:
        with pytest.raises(KlingError) as info:
            await client.get("text2video", "123")
    err = info.value
    assert type(err) is cls and err.retryable is retryable
    assert err.code == code and err.http_status == status and err.request_id
    text = str(err)
    assert f"code={code}" in text and f"http_status={status}" in text and "request_id=req-" in text
    gets = len(fake.gets())
    if code in (1003, 1004):
        assert gets == 2  # one re-mint, one resend
    else:
        assert gets == (4 if retryable else 1)  # GETs retry retryable errors only


@pytest.mark.anyio
async def test_non_kling_body_falls_back_on_status(make_client, fake) -> None:
    fake.fail("GET", response=httpx.Response(502, text="<html>Bad gateway</html>"), times=10)
    async with make_client(fake) as client:
        with pytest.raises(ServerError) as info:
            await client.get("text2video", "123")
    assert info.value.http_status == 502 and info.value.code is None
    assert len(fake.gets()) == 4


def test_str_and_repr_carry_ids() -> None:
    err = BackPressureError("parallel task over resource pack limit", request_id="r1", http_status=429,
                            code=1303, task_id="t1", external_task_id="job-s0-abc")  # fmt: skip
    for text in (str(err), repr(err)):
        for part in ("1303", "429", "r1", "t1", "job-s0-abc", "parallel task"):
            assert part in text
    assert repr(err).startswith("BackPressureError(")


def test_task_failed_and_timeout_carry_snapshot() -> None:
    snap = TaskSnapshot.model_validate(
        {"task_id": "9", "task_status": "failed", "task_status_msg": "content moderation",
         "task_info": {"external_task_id": "e-1"}}
    )  # fmt: skip
    err = TaskFailedError(snap)
    assert err.task_status_msg == "content moderation" and err.snapshot is snap
    assert "content moderation" in str(err) and "task_id=9" in str(err) and "external_task_id=e-1" in str(err)
    timeout = WaitTimeoutError("late", snapshot=snap)
    assert timeout.snapshot is snap and "task_id=9" in str(timeout)


def test_an_error_names_the_step_it_stopped_once_told() -> None:
    err = AccountError("resource pack used up or expired", code=1102, http_status=429)
    assert str(err).startswith("resource pack"), "the client layer knows no steps"
    err.step = "extend-1-of-2"
    assert str(err) == "extend-1-of-2: resource pack used up or expired (code=1102, http_status=429)"
    assert "extend-1-of-2" in repr(err)
    import pickle

    assert str(pickle.loads(pickle.dumps(err))) == str(err), "Prefect may persist the exception"
