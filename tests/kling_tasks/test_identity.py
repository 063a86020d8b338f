"""The account fingerprint and the cache keys: whose money, which step, never a secret."""

from __future__ import annotations

import hashlib
import json
import re
from pathlib import Path

from kling_tasks.identity import account_fingerprint, digest, external_task_id, store_key, submit_key
from kling_tasks.jobs import ExtensionSpec, GenerationSpec, VideoJob, plan_job
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
    assert re.fullmatch(r"[0-9a-f]{12}", account_fingerprint(KlingSettings())), "no key yet: still an account name"


def test_cometapi_accounts_are_their_keys() -> None:
    one = account_fingerprint(settings(provider="cometapi", cometapi_key="key-one"))
    assert one != account_fingerprint(settings(provider="cometapi", cometapi_key="key-two"))


def test_ids_fit_kling_and_keys_are_versioned() -> None:
    ext = external_task_id("x" * 40, 35, digest({"a": 1}))
    assert len(ext) <= 64 and re.fullmatch(r"[a-z0-9-]+", ext)
    assert submit_key("acc", ext) == f"kling/v2/acc/submit/{ext}"


# ---- the content chain (DESIGN §2.1): every input that changes what is paid for changes the id -----------------


def sha(text: str | bytes) -> str:
    return hashlib.sha256(text if isinstance(text, bytes) else text.encode()).hexdigest()


def canonical(value: object) -> str:
    return sha(json.dumps(value, sort_keys=True, separators=(",", ":")))


def test_ids_follow_the_documented_chain_exactly(tmp_path: Path) -> None:
    """The formula written out independently: an id that drifts from it makes every in-flight job pay again."""
    image = tmp_path / "kite.png"
    image.write_bytes(b"\x89PNG not really")
    job = VideoJob(generate=GenerationSpec(prompt="a red kite", image=str(image)),
                   extensions=[ExtensionSpec(prompt="it climbs", cfg_scale=0.3)], job_id="kite", take=2)
    chain_0 = canonical({"step": {"prompt": "a red kite", "image": "sha256:" + sha(image.read_bytes()), "take": 2}})
    chain_1 = canonical({"parent": chain_0, "step": {"prompt": "it climbs", "cfg_scale": 0.3}, "attempt": 3})
    steps = plan_job(job, {1: 3}).steps
    assert [s.external_task_id for s in steps] == [f"kite-s0-{chain_0[:16]}", f"kite-s1-{chain_1[:16]}"]


def test_ids_are_stable_across_releases() -> None:
    """Recorded from the released code: a change here re-pays every job in flight after an upgrade."""
    kite = VideoJob(generate=GenerationSpec(prompt="a red kite", image="https://cdn.test/kite.png?sig=1"),
                    extensions=[ExtensionSpec(prompt="it climbs")], job_id="kite")
    assert [s.external_task_id for s in plan_job(kite, {1: 1}).steps] == [
        "kite-s0-bff8f08c16da7cce", "kite-s1-62ee5a4aab72579e"]
    second_take = VideoJob(generate=GenerationSpec(prompt="a red kite"), take=2)
    assert [s.external_task_id for s in plan_job(second_take).steps] == ["kp-s0-bea44a2b008ff99a"]
    assert second_take.effective_job_id() == "job-1d1864405794"


def test_every_take_and_every_attempt_is_its_own_task() -> None:
    takes = {plan_job(VideoJob(generate=GenerationSpec(prompt="p"), take=t)).steps[0].external_task_id
             for t in (1, 2, 3)}
    assert len(takes) == 3, "take 2 and take 3 must not share (and re-adopt) one task"
    job = VideoJob(generate=GenerationSpec(prompt="p"), extensions=[ExtensionSpec(prompt="e")])
    attempts = [plan_job(job, {0: n}).steps for n in (0, 1, 2)]
    assert len({steps[0].external_task_id for steps in attempts}) == 3, "--resubmit-failed twice: a third task"
    assert len({steps[1].external_task_id for steps in attempts}) == 3, "later steps follow their parent"
    assert attempts[0][1].content_digest == attempts[2][1].content_digest, "attempts are not content"


def test_the_store_key_ignores_a_trailing_slash_only() -> None:
    key = store_key("acc", "t1", "s3://b/p", "job/step-00.mp4")
    assert store_key("acc", "t1", "s3://b/p/", "job/step-00.mp4") == key
    assert store_key("acc", "t1", "/abs/out/", "job/step-00.mp4") == store_key("acc", "t1", "/abs/out",
                                                                               "job/step-00.mp4")
    assert store_key("acc", "t1", "s3://b/BOX", "k") != store_key("acc", "t1", "s3://b/BO", "k")
    expected = sha("s3://b/p/job/step-00.mp4")[:16]
    assert key == f"kling/v2/acc/store/t1/{expected}"
    assert store_key("acc", "t1", "/abs/out", "job/step-00.mp4") != store_key("acc", "t1", "abs/out",
                                                                              "job/step-00.mp4")
