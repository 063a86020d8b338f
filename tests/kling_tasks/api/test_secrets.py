"""No AK, SK, JWT or bearer key in any error's str/repr/pickle, nor in any log record of failing runs."""

from __future__ import annotations

import logging
import pickle

import httpx
import pytest

from kling_tasks.api import (
    AmbiguousSubmitError,
    ConfigError,
    KlingClient,
    KlingError,
    PollPolicy,
    TaskSnapshot,
    Text2VideoRequest,
    TransportError,
    VideoExtendRequest,
    WaitTimeoutError,
)
from kling_tasks.settings import KlingSettings

pytestmark = pytest.mark.anyio
T2V = Text2VideoRequest(prompt="secret-free prompt")


def assert_clean(texts: list[str], secrets: list[str]) -> None:
    assert secrets and all(len(s) > 8 for s in secrets)
    for text in texts:
        for secret in secrets:
            assert secret not in text, f"secret leaked into: {text[:200]}"


def echo_auth(request: httpx.Request) -> httpx.Response:
    # A hostile/buggy server that echoes the Authorization header back in its error message.
    return httpx.Response(
        401, json={"code": 1002, "message": f"bad {request.headers['authorization']}", "request_id": "r"}
    )


async def run_failures(client: KlingClient, fake) -> list[BaseException]:
    errors: list[BaseException] = []
    scenarios = [
        lambda: fake.fail("POST", exc=httpx.ReadTimeout, after=True),
        lambda: fake.fail("POST", response=httpx.Response(502, text="<html>gateway</html>"), times=5),
        lambda: fake.fail("GET", exc=httpx.ConnectError, times=20),
        lambda: fake.fail("GET", response=fake.envelope(None, 1303, 429, "parallel task over limit"), times=20),
        lambda: fake.fail("GET", response=echo_auth, times=20),
    ]
    for i, arm in enumerate(scenarios):
        fake.faults.clear()
        arm()
        try:
            await client.submit(T2V, f"job-secret-s{i}")
        except KlingError as exc:
            errors.append(exc)
        try:
            await client.get("text2video", "123")
        except KlingError as exc:
            errors.append(exc)
    fake.faults.clear()
    task_id = fake.add_task("text2video", task_status_msg="blocked")
    fake.progress[task_id] = ["failed"]
    try:
        await client.wait("text2video", task_id)
    except KlingError as exc:
        errors.append(exc)
    return errors


@pytest.mark.parametrize("provider", ["kling", "cometapi"])
async def test_no_secret_in_errors_or_logs(make_client, fake, comet_fake, creds, caplog, provider) -> None:
    server = fake if provider == "kling" else comet_fake
    caplog.set_level(logging.DEBUG)  # everything, httpx and httpcore included
    async with make_client(server) as client:
        errors = await run_failures(client, server)
        if provider == "kling":
            client.settings = client.settings.model_copy(update={"external_id_lookup": "off"})
            server.fail("POST", exc=httpx.ReadTimeout)  # lost before anything was made: the list can't find it
            with pytest.raises(AmbiguousSubmitError) as info:
                await client.submit(T2V, "job-secret-off")
            errors.append(info.value)
        else:
            with pytest.raises(KlingError) as info2:
                await client.create(VideoExtendRequest(video_id="v"), "job-secret-ext")
            errors.append(info2.value)
    assert len(errors) >= 8
    secrets = [creds["comet"]] if provider == "cometapi" else [creds["ak"], creds["sk"], *set(server.tokens)]
    texts = [t for e in errors for t in (str(e), repr(e), pickle.dumps(e).decode("latin-1"))]
    texts += [r.getMessage() for r in caplog.records] + [caplog.text]
    assert_clean(texts, secrets)
    assert any("***" in str(e) for e in errors)  # the echoed header was redacted


def test_errors_pickle_round_trip() -> None:
    snap = TaskSnapshot.model_validate({"task_id": "1", "task_status": "processing"})
    for err in (
        TransportError("x", may_have_been_sent=True, external_task_id="e"),
        WaitTimeoutError("late", snapshot=snap),
        ConfigError("c"),
    ):
        back = pickle.loads(pickle.dumps(err))
        assert type(back) is type(err) and str(back) == str(err)


def test_config_error_names_env_vars_not_values(creds) -> None:
    with pytest.raises(ConfigError) as info:
        KlingClient(KlingSettings(provider="kling", access_key=creds["ak"]))
    assert "KLING_SECRET_KEY" in str(info.value) and creds["ak"] not in str(info.value)
    client_settings = KlingSettings(provider="kling", access_key=creds["ak"], secret_key=creds["sk"])
    client = KlingClient(client_settings)
    assert_clean([repr(client), repr(client._auth), repr(client_settings)], [creds["ak"], creds["sk"]])


async def test_wait_timeout_without_snapshot_is_clean(make_client, fake, creds) -> None:
    fake.fail("GET", exc=httpx.ConnectError, times=1000)
    async with make_client(fake, poll=PollPolicy(processing_timeout=30, queue_timeout=30)) as client:
        with pytest.raises(WaitTimeoutError) as info:
            await client.wait("text2video", "42")
    assert info.value.snapshot is None and info.value.task_id == "42"
    assert_clean([str(info.value), repr(info.value)], [creds["ak"], creds["sk"], *fake.tokens])
