"""The one place that reads the environment (pydantic-settings).

Every field has one environment name (its validation alias, e.g. ``KLING_PROVIDER``). Code may also pass
the plain field name (``KlingSettings(provider="cometapi")``): ``__init__`` maps field names to aliases. We
don't use ``populate_by_name``: pydantic-settings would then also read an unrelated ``PROVIDER`` variable.
"""

from __future__ import annotations

import os
from typing import Any, Literal

from pydantic import Field, SecretStr, ValidationError, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

Provider = Literal["kling", "cometapi"]
ExternalIdLookup = Literal["auto", "query", "path", "off"]

DEFAULT_BASE_URLS: dict[str, str] = {
    "kling": "https://api-singapore.klingai.com",
    "cometapi": "https://api.cometapi.com",
}


class KlingSettings(BaseSettings):
    """Client configuration. Secrets are ``SecretStr``: repr/str show ``**********``."""

    model_config = SettingsConfigDict(extra="ignore", case_sensitive=False)

    provider: Provider = Field("kling", validation_alias="KLING_PROVIDER")
    api_base_url: str | None = Field(None, validation_alias="KLING_API_BASE_URL")
    access_key: SecretStr | None = Field(None, validation_alias="KLING_ACCESS_KEY")
    secret_key: SecretStr | None = Field(None, validation_alias="KLING_SECRET_KEY")
    cometapi_key: SecretStr | None = Field(None, validation_alias="COMETAPI_KEY")
    max_concurrency: int = Field(5, ge=1, validation_alias="KLING_MAX_CONCURRENCY")
    allow_private_urls: bool = Field(False, validation_alias="KLING_ALLOW_PRIVATE_URLS")
    # auto = try `?external_task_id=` on the list path, then the path form (wire form UNCONFIRMED, ref §3.6).
    external_id_lookup: ExternalIdLookup = Field("auto", validation_alias="KLING_EXTERNAL_ID_LOOKUP")
    poll_min_seconds: float = Field(5.0, gt=0, validation_alias="KLING_POLL_MIN_SECONDS")
    poll_max_seconds: float = Field(15.0, gt=0, validation_alias="KLING_POLL_MAX_SECONDS")
    # Deadline for time spent *processing*; time queued in `submitted` counts against queue_timeout_seconds.
    wait_timeout_seconds: float = Field(1800.0, gt=0, validation_alias="KLING_WAIT_TIMEOUT_SECONDS")
    queue_timeout_seconds: float = Field(3600.0, gt=0, validation_alias="KLING_QUEUE_TIMEOUT_SECONDS")
    # How long a create refused with 1302/1303 (back-pressure: nothing was created) keeps waiting for room.
    backpressure_timeout_seconds: float = Field(900.0, gt=0, validation_alias="KLING_BACKPRESSURE_TIMEOUT_SECONDS")
    connect_timeout: float = Field(10.0, gt=0, validation_alias="KLING_CONNECT_TIMEOUT")
    read_timeout: float = Field(60.0, gt=0, validation_alias="KLING_READ_TIMEOUT")

    def __init__(self, **values: Any) -> None:
        fields = type(self).model_fields
        mapped: dict[str, Any] = {}
        for key, value in values.items():
            alias = fields[key].validation_alias if key in fields else None
            mapped[alias if isinstance(alias, str) else key] = value
        super().__init__(**mapped)

    @model_validator(mode="after")
    def _check(self) -> KlingSettings:
        if self.poll_min_seconds > self.poll_max_seconds:
            raise ValueError("KLING_POLL_MIN_SECONDS must not exceed KLING_POLL_MAX_SECONDS")
        if self.api_base_url is not None and not self.api_base_url.startswith(("http://", "https://")):
            raise ValueError("KLING_API_BASE_URL must start with http:// or https://")
        return self

    @property
    def base_url(self) -> str:
        """The API host: ``api_base_url`` if set, else the provider's public default."""
        return (self.api_base_url or DEFAULT_BASE_URLS[self.provider]).rstrip("/")

    def missing_credentials(self) -> list[str]:
        """Names of the environment variables the chosen provider needs but lacks (empty when fine)."""

        def missing(secret: SecretStr | None) -> bool:
            return secret is None or not secret.get_secret_value().strip()

        if self.provider == "cometapi":
            return ["COMETAPI_KEY"] if missing(self.cometapi_key) else []
        names: list[str] = []
        if missing(self.access_key):
            names.append("KLING_ACCESS_KEY")
        if missing(self.secret_key):
            names.append("KLING_SECRET_KEY")
        return names


class SettingsError(ValueError):
    """A bad environment value: one line naming the variable and what it accepts."""


_ENV_PREFIXES = ("kling_", "cometapi_")  # every field's variable starts with one (names are case-insensitive)
_LOADED: dict[tuple[tuple[str, str], ...], KlingSettings] = {}


def load_settings(**overrides: Any) -> KlingSettings:
    """KlingSettings from the environment, or SettingsError (never a pydantic traceback).

    Without overrides, one validation per distinct set of KLING_*/COMETAPI_* variables: every submit, wait and
    store asks, and pydantic-settings' read of the environment cost ~5 ms of CPU each time. A copy is returned,
    so a caller that changes its settings changes only its own."""
    if not overrides:
        env = tuple(sorted((k.lower(), v) for k, v in os.environ.items() if k.lower().startswith(_ENV_PREFIXES)))
        cached = _LOADED.get(env)
        if cached is None:
            if len(_LOADED) >= 8:  # a few environments (tests switch them), not an unbounded cache
                _LOADED.clear()
            cached = _LOADED[env] = _validated()
        return cached.model_copy()
    return _validated(**overrides)


def _validated(**overrides: Any) -> KlingSettings:
    try:
        return KlingSettings(**overrides)
    except ValidationError as exc:
        problems = []
        for error in exc.errors():
            name = ".".join(str(part) for part in error["loc"]) or "settings"
            message = str(error["msg"]).removeprefix("Value error, ")
            given = error.get("input")
            shown = f"={given!r}" if error["loc"] and isinstance(given, str) and "KEY" not in name else ""
            problems.append(f"{name}{shown}: {message}")
        raise SettingsError("bad configuration: " + "; ".join(problems)) from None
