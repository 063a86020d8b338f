"""Authentication: Kling's HS256 JWT (reference §2, codes §11) and CometAPI's static bearer (§14)."""

from __future__ import annotations

from typing import Any

import jwt
import pytest

BODY = {"prompt": "a lighthouse at dusk"}


def call(api: Any, header: str | None) -> tuple[int, int]:
    headers = {} if header is None else {"Authorization": header}
    response = api.http.post(f"{api.prefix}/v1/videos/text2video", json=BODY, headers=headers)
    body = response.json()
    assert "data" not in body and set(body) == {"code", "message", "request_id"}
    return response.status_code, body["code"]


def test_valid_token_is_accepted(kling: Any, tools: Any) -> None:
    response = kling.http.post("/v1/videos/text2video", json=BODY,
                               headers={"Authorization": f"Bearer {tools.make_token()}"})
    assert response.status_code == 200 and response.json()["code"] == 0


@pytest.mark.parametrize(
    ("case", "expected"),
    [
        ("no header", 1001),
        ("empty header", 1001),
        ("not bearer", 1002),
        ("garbage", 1002),
        ("bad signature", 1002),
        ("wrong iss", 1002),
        ("no exp", 1002),
        ("alg none", 1002),
        ("nbf in the future", 1003),
        ("expired", 1004),
    ],
)
def test_jwt_failures(kling: Any, tools: Any, case: str, expected: int) -> None:
    good = tools.make_token()
    header = {
        "no header": None,
        "empty header": "",
        "not bearer": f"Token {good}",
        "garbage": "Bearer not.a.jwt",
        "bad signature": f"Bearer {tools.make_token(sk='another-secret-key-of-32-bytes-or-more!!')}",
        "wrong iss": f"Bearer {tools.make_token(ak='someone-else')}",
        "no exp": f"Bearer {tools.make_token(exp=None)}",
        "alg none": "Bearer " + jwt.encode({"iss": tools.AK, "exp": 2**40, "nbf": 0}, None, algorithm="none"),
        "nbf in the future": f"Bearer {tools.make_token(nbf=300)}",
        "expired": f"Bearer {tools.make_token(exp=-60, nbf=-120)}",
    }[case]
    assert call(kling, header) == (401, expected)
    assert kling.stats()["tasks"] == {}, "a refused request creates nothing"


def test_queries_are_authenticated_too(kling: Any) -> None:
    task_id = kling.create()["task_id"]
    for path in (f"/v1/videos/text2video/{task_id}", "/v1/videos/text2video"):
        response = kling.http.get(path)
        assert (response.status_code, response.json()["code"]) == (401, 1001)


@pytest.mark.parametrize(
    ("header", "expected"),
    [(None, (401, 1001)), ("Bearer wrong-key", (401, 1002)), ("Basic x", (401, 1002))],
)
def test_cometapi_static_bearer(comet: Any, header: str | None, expected: tuple[int, int]) -> None:
    assert call(comet, header) == expected


def test_cometapi_accepts_its_key_and_rejects_a_jwt(comet: Any, tools: Any) -> None:
    assert comet.create()["task_status"] == "submitted"
    assert call(comet, f"Bearer {tools.make_token()}") == (401, 1002)
