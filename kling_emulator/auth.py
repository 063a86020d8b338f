"""Request authentication: Kling's HS256 JWT (reference §2) or CometAPI's static bearer key (§14)."""

from __future__ import annotations

import hmac

import jwt

from kling_emulator.errors import ApiError


def check_kling_jwt(header: str | None, access_key: str, secret_key: str) -> None:
    if not header:
        raise ApiError(401, 1001, "Authorization is empty")
    scheme, _, token = header.partition(" ")
    if scheme != "Bearer" or not token:
        raise ApiError(401, 1002, "Authorization is not valid")
    try:
        claims = jwt.decode(token, secret_key, algorithms=["HS256"], options={"require": ["iss", "exp", "nbf"]})
    except jwt.ImmatureSignatureError:
        raise ApiError(401, 1003, "Authorization is not yet valid") from None
    except jwt.ExpiredSignatureError:
        raise ApiError(401, 1004, "Authorization has expired") from None
    except jwt.InvalidTokenError:
        raise ApiError(401, 1002, "Authorization is not valid") from None
    if not hmac.compare_digest(str(claims.get("iss", "")), access_key):
        raise ApiError(401, 1002, "Authorization is not valid")


def check_bearer(header: str | None, api_key: str) -> None:
    if not header:
        raise ApiError(401, 1001, "Authorization is empty")
    scheme, _, token = header.partition(" ")
    if scheme != "Bearer" or not hmac.compare_digest(token, api_key):
        raise ApiError(401, 1002, "Authorization is not valid")
