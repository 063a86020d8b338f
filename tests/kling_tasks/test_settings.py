"""KlingSettings: env names, explicit construction, defaults, validation, missing credentials, no secret in repr."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from kling_tasks.settings import KlingSettings, SettingsError, load_settings

ENV = {
    "KLING_PROVIDER": "cometapi",
    "KLING_API_BASE_URL": "http://127.0.0.1:8000",
    "KLING_ACCESS_KEY": "AK-env-secret",
    "KLING_SECRET_KEY": "SK-env-secret",
    "COMETAPI_KEY": "comet-env-secret",
    "KLING_MAX_CONCURRENCY": "7",
    "KLING_ALLOW_PRIVATE_URLS": "1",
    "KLING_EXTERNAL_ID_LOOKUP": "path",
    "KLING_POLL_MIN_SECONDS": "2",
    "KLING_POLL_MAX_SECONDS": "9",
    "KLING_WAIT_TIMEOUT_SECONDS": "100",
    "KLING_QUEUE_TIMEOUT_SECONDS": "200",
    "KLING_CONNECT_TIMEOUT": "3",
    "KLING_READ_TIMEOUT": "4",
}


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in ENV:
        monkeypatch.delenv(name, raising=False)


def test_defaults() -> None:
    s = KlingSettings()
    assert s.provider == "kling" and s.base_url == "https://api-singapore.klingai.com"
    assert (s.max_concurrency, s.allow_private_urls, s.external_id_lookup) == (5, False, "auto")
    assert (s.poll_min_seconds, s.poll_max_seconds) == (5, 15)
    assert (s.wait_timeout_seconds, s.queue_timeout_seconds) == (1800, 3600)
    assert (s.connect_timeout, s.read_timeout) == (10, 60)
    assert s.missing_credentials() == ["KLING_ACCESS_KEY", "KLING_SECRET_KEY"]
    assert KlingSettings(provider="cometapi").base_url == "https://api.cometapi.com"


def test_reads_every_env_name(monkeypatch: pytest.MonkeyPatch) -> None:
    for name, value in ENV.items():
        monkeypatch.setenv(name, value)
    s = KlingSettings()
    assert s.provider == "cometapi" and s.base_url == "http://127.0.0.1:8000"
    assert s.access_key is not None and s.access_key.get_secret_value() == "AK-env-secret"
    assert s.secret_key is not None and s.secret_key.get_secret_value() == "SK-env-secret"
    assert s.cometapi_key is not None and s.cometapi_key.get_secret_value() == "comet-env-secret"
    assert (s.max_concurrency, s.allow_private_urls, s.external_id_lookup) == (7, True, "path")
    assert (s.poll_min_seconds, s.poll_max_seconds, s.wait_timeout_seconds, s.queue_timeout_seconds) == (2, 9, 100, 200)
    assert (s.connect_timeout, s.read_timeout) == (3, 4)
    assert s.missing_credentials() == []


def test_explicit_construction_by_field_or_env_name_beats_env(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KLING_PROVIDER", "cometapi")
    s = KlingSettings(provider="kling", api_base_url="http://x.test/", access_key="a", secret_key="b")
    assert s.provider == "kling" and s.base_url == "http://x.test" and s.missing_credentials() == []
    assert KlingSettings(KLING_PROVIDER="kling").provider == "kling"


def test_unrelated_env_names_are_not_read(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("PROVIDER", "cometapi")
    monkeypatch.setenv("ACCESS_KEY", "nope")
    s = KlingSettings()
    assert s.provider == "kling" and s.access_key is None


@pytest.mark.parametrize(
    "kwargs",
    [{"provider": "openai"}, {"external_id_lookup": "maybe"}, {"poll_min_seconds": 40},
     {"max_concurrency": 0}, {"api_base_url": "ftp://x"}, {"read_timeout": 0}],
)  # fmt: skip
def test_bad_settings_rejected(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        KlingSettings(**kwargs)


def test_missing_credentials_per_provider() -> None:
    assert KlingSettings(access_key="a").missing_credentials() == ["KLING_SECRET_KEY"]
    assert KlingSettings(access_key=" ", secret_key="b").missing_credentials() == ["KLING_ACCESS_KEY"]
    assert KlingSettings(provider="cometapi", access_key="a", secret_key="b").missing_credentials() == ["COMETAPI_KEY"]
    assert KlingSettings(provider="cometapi", cometapi_key="c").missing_credentials() == []


def test_repr_and_str_hide_secrets() -> None:
    s = KlingSettings(access_key="AK-plain-secret", secret_key="SK-plain-secret", cometapi_key="comet-plain-secret")
    for text in (repr(s), str(s), str(s.model_dump()), s.model_dump_json()):
        for secret in ("AK-plain-secret", "SK-plain-secret", "comet-plain-secret"):
            assert secret not in text


@pytest.mark.parametrize(
    ("name", "value", "says"),
    [
        ("KLING_PROVIDER", "Kling", "KLING_PROVIDER='Kling': Input should be 'kling' or 'cometapi'"),
        ("KLING_MAX_CONCURRENCY", "0", "KLING_MAX_CONCURRENCY='0': Input should be greater than or equal to 1"),
        ("KLING_POLL_MIN_SECONDS", "soon", "KLING_POLL_MIN_SECONDS='soon'"),
        ("KLING_EXTERNAL_ID_LOOKUP", "maybe", "'auto', 'query', 'path' or 'off'"),
    ],
)
def test_a_bad_value_is_one_line_naming_the_variable(monkeypatch: pytest.MonkeyPatch, name: str, value: str,
                                                     says: str) -> None:
    from kling_tasks.settings import SettingsError, load_settings

    monkeypatch.setenv(name, value)
    with pytest.raises(SettingsError) as refused:
        load_settings()
    assert says in str(refused.value) and "\n" not in str(refused.value)


def test_settings_follow_the_environment_and_each_caller_gets_its_own(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("KLING_MAX_CONCURRENCY", "7")
    first = load_settings()
    assert first.max_concurrency == 7
    first.max_concurrency = 99  # a caller's change stays its own
    assert load_settings().max_concurrency == 7
    monkeypatch.setenv("kling_max_concurrency", "8")  # names are case-insensitive, like pydantic-settings'
    monkeypatch.delenv("KLING_MAX_CONCURRENCY")
    assert load_settings().max_concurrency == 8, "a changed environment is read again"
    monkeypatch.setenv("KLING_POLL_MIN_SECONDS", "-1")
    with pytest.raises(SettingsError):
        load_settings()
