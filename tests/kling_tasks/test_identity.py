"""The account fingerprint and the cache keys: whose money, which step, never a secret."""

from __future__ import annotations

import re

from kling_tasks.identity import account_fingerprint, digest, external_task_id, submit_key
from kling_tasks.settings import KlingSettings

SECRET = "sk-0123456789-very-secret"


def settings(**values: str) -> KlingSettings:
    return KlingSettings(**{"access_key": "ak-1", "secret_key": SECRET, **values})


def test_the_fingerprint_names_provider_host_and_key_without_revealing_them() -> None:
    base = account_fingerprint(settings())
    assert re.fullmatch(r"[0-9a-f]{12}", base)
    assert account_fingerprint(settings()) == base, "stable"
    assert account_fingerprint(settings(access_key="ak-2")) != base
    assert account_fingerprint(settings(api_base_url="http://127.0.0.1:9")) != base
    assert account_fingerprint(settings(provider="cometapi", cometapi_key="ak-1")) != base
    assert account_fingerprint(settings(secret_key="another-secret")) == base, "the secret is not the account"
    assert "ak-1" not in base and SECRET not in base


def test_cometapi_accounts_are_their_keys() -> None:
    one = account_fingerprint(settings(provider="cometapi", cometapi_key="key-one"))
    assert one != account_fingerprint(settings(provider="cometapi", cometapi_key="key-two"))


def test_ids_fit_kling_and_keys_are_versioned() -> None:
    ext = external_task_id("x" * 40, 35, digest({"a": 1}))
    assert len(ext) <= 64 and re.fullmatch(r"[a-z0-9-]+", ext)
    assert submit_key("acc", ext) == f"kling/v2/acc/submit/{ext}"
