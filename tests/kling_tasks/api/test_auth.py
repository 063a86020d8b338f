"""JWT minting (claims, caching, re-mint) and the static CometAPI bearer."""

from __future__ import annotations

import jwt
import pytest

from kling_tasks.api import BearerAuth, ConfigError, JwtAuth, auth_from_settings
from kling_tasks.settings import KlingSettings

AK = "AK-auth-test"
SK = "SK-auth-test-0123456789abcdef0123456789"


class Clock:
    def __init__(self, now: float = 1_800_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def test_jwt_claims_and_header() -> None:
    clock = Clock()
    auth = JwtAuth(AK, SK, clock=clock)
    header = auth.authorization()
    assert header.startswith("Bearer ") and header.count(" ") == 1
    token = header.removeprefix("Bearer ")
    assert jwt.get_unverified_header(token) == {"alg": "HS256", "typ": "JWT"}
    claims = jwt.decode(token, SK, algorithms=["HS256"], options={"verify_exp": False, "verify_nbf": False})
    assert claims == {"iss": AK, "exp": int(clock.now) + 1800, "nbf": int(clock.now) - 5}
    with pytest.raises(jwt.InvalidSignatureError):
        jwt.decode(token, "another-secret-another-secret-xxxx", algorithms=["HS256"],
                   options={"verify_exp": False, "verify_nbf": False})  # fmt: skip


def test_token_valid_now_with_real_clock() -> None:
    token = JwtAuth(AK, SK).token()
    assert jwt.decode(token, SK, algorithms=["HS256"], issuer=AK)["iss"] == AK


def test_token_reused_while_fresh_and_reminted_near_expiry() -> None:
    clock = Clock()
    auth = JwtAuth(AK, SK, clock=clock)
    first = auth.token()
    clock.now += 1800 - 61  # 61 s of life left: still fresh
    assert auth.token() == first
    clock.now += 2  # 59 s left: re-mint
    second = auth.token()
    assert second != first
    assert (
        jwt.decode(second, SK, algorithms=["HS256"], options={"verify_exp": False, "verify_nbf": False})["exp"]
        == int(clock.now) + 1800
    )


def test_force_refresh_mints_a_new_token() -> None:
    clock = Clock()
    auth = JwtAuth(AK, SK, clock=clock)
    first = auth.token()
    clock.now += 3
    assert auth.force_refresh() is True
    assert auth.token() != first


def test_reprs_hide_secrets() -> None:
    auth = JwtAuth(AK, SK)
    token = auth.token()
    bearer = BearerAuth("sk-comet-secret")
    for text in (repr(auth), str(auth), repr(bearer), str(bearer)):
        for secret in (AK, SK, token, "sk-comet-secret"):
            assert secret not in text


def test_bearer_is_static() -> None:
    bearer = BearerAuth("sk-comet-secret")
    assert bearer.authorization() == "Bearer sk-comet-secret"
    assert bearer.force_refresh() is False
    assert bearer.authorization() == "Bearer sk-comet-secret"


def test_auth_from_settings_refuses_missing_credentials() -> None:
    with pytest.raises(ConfigError, match="KLING_SECRET_KEY"):
        auth_from_settings(KlingSettings(provider="kling", access_key=AK))
    with pytest.raises(ConfigError, match="COMETAPI_KEY"):
        auth_from_settings(KlingSettings(provider="cometapi", access_key=AK, secret_key=SK))
    assert isinstance(auth_from_settings(KlingSettings(provider="cometapi", cometapi_key="k")), BearerAuth)
    assert isinstance(auth_from_settings(KlingSettings(access_key=AK, secret_key=SK)), JwtAuth)
