"""Authorization headers: a short-lived JWT for Kling (reference §2), a static bearer key for CometAPI (§14).

Neither object's repr shows a key or a token; ``secrets()`` lists them so the client can scrub server text.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Protocol

import jwt

from kling_tasks.api.errors import ConfigError
from kling_tasks.settings import KlingSettings

__all__ = ["Auth", "BearerAuth", "JwtAuth", "auth_from_settings"]


class Auth(Protocol):
    """What the client needs from an authenticator."""

    def authorization(self) -> str:
        """The full ``Authorization`` header value (``Bearer …``)."""
        ...

    def force_refresh(self) -> bool:
        """Drop any cached credential; True when a fresh one will differ (a re-send can help)."""
        ...

    def secrets(self) -> list[str]:
        """Every secret string this object holds (for redaction); never logged."""
        ...


class JwtAuth:
    """Kling's HS256 JWT (iss=AK, exp=now+lifetime, nbf=now-5), cached and re-minted before it runs out.

    A token is reused while more than ``refresh_margin`` seconds of life remain, so a long run never relies on
    one token, and a request never leaves with a token about to expire in flight.
    """

    def __init__(
        self,
        access_key: str,
        secret_key: str,
        *,
        lifetime: int = 1800,
        refresh_margin: int = 60,
        clock: Callable[[], float] = time.time,
    ) -> None:
        if not access_key or not secret_key:
            raise ConfigError("Kling access key and secret key are required to mint a JWT")
        self._access_key = access_key
        self._secret_key = secret_key
        self._lifetime = lifetime
        self._refresh_margin = refresh_margin
        self._clock = clock
        self._token: str | None = None
        self._expires_at = 0.0

    def __repr__(self) -> str:
        return "JwtAuth(access_key=***, secret_key=***)"

    def _mint(self) -> str:
        now = int(self._clock())
        payload = {"iss": self._access_key, "exp": now + self._lifetime, "nbf": now - 5}
        token = jwt.encode(payload, self._secret_key, algorithm="HS256", headers={"alg": "HS256", "typ": "JWT"})
        self._token, self._expires_at = token, float(now + self._lifetime)
        return token

    def token(self) -> str:
        if self._token is None or self._expires_at - self._clock() < self._refresh_margin:
            return self._mint()
        return self._token

    def authorization(self) -> str:
        return f"Bearer {self.token()}"

    def force_refresh(self) -> bool:
        self._token = None
        return True

    def secrets(self) -> list[str]:
        return [s for s in (self._access_key, self._secret_key, self._token) if s]


class BearerAuth:
    """CometAPI's static ``Authorization: Bearer <key>``; nothing to refresh."""

    def __init__(self, key: str) -> None:
        if not key:
            raise ConfigError("COMETAPI_KEY is required for provider cometapi")
        self._key = key

    def __repr__(self) -> str:
        return "BearerAuth(key=***)"

    def authorization(self) -> str:
        return f"Bearer {self._key}"

    def force_refresh(self) -> bool:
        return False

    def secrets(self) -> list[str]:
        return [self._key]


def auth_from_settings(settings: KlingSettings, *, clock: Callable[[], float] = time.time) -> Auth:
    """The authenticator for ``settings.provider``; ConfigError (naming the env vars) if credentials lack."""
    missing = settings.missing_credentials()
    if missing:
        raise ConfigError(f"missing credentials for provider {settings.provider}: set {', '.join(missing)}")
    if settings.provider == "cometapi":
        assert settings.cometapi_key is not None
        return BearerAuth(settings.cometapi_key.get_secret_value())
    assert settings.access_key is not None and settings.secret_key is not None
    return JwtAuth(settings.access_key.get_secret_value(), settings.secret_key.get_secret_value(), clock=clock)
