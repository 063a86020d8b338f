"""Preflight: a job folder is continued only by the same account and a plan its ledger is a prefix of."""

from __future__ import annotations

from pathlib import Path

import pytest

from kling_tasks.jobs import ExtensionSpec, GenerationSpec, PlanError, VideoJob
from kling_tasks.manifest import load_manifest
from kling_tasks.preflight import prepare
from kling_tasks.recorder import JobRecorder
from kling_tasks.settings import KlingSettings
from kling_tasks.storage import LocalSink

SETTINGS = KlingSettings(access_key="ak-1", secret_key="sk-0123456789abcdef0123456789abcdef")


def job(dest: Path, prompt: str = "a red kite", *extensions: str, **fields: object) -> VideoJob:
    return VideoJob(generate=GenerationSpec(prompt=prompt), extensions=[ExtensionSpec(prompt=e) for e in extensions],
                    dest=str(dest), job_id="kite", **fields)  # type: ignore[arg-type]


def record(spec: VideoJob, settings: KlingSettings = SETTINGS) -> None:
    prepared = prepare(spec, settings)
    JobRecorder(prepared.sink, spec, prepared.plan, settings.provider, prepared.previous, account=prepared.account)


@pytest.mark.parametrize("extensions", [(), ("it climbs",), ("it climbs", "clouds part")])
def test_the_same_job_and_appended_extensions_continue_the_folder(tmp_path: Path, extensions: tuple[str, ...]) -> None:
    record(job(tmp_path))
    prepared = prepare(job(tmp_path, "a red kite", *extensions), SETTINGS)
    assert prepared.previous is not None and prepared.replaced is None


@pytest.mark.parametrize(
    ("first", "second", "why"),
    [
        (("a red kite",), ("a blue whale",), "generate was made from another spec"),
        (("a red kite", "it climbs"), ("a red kite", "it dives"), "extend-1-of-1 was made from another spec"),
        (("a red kite", "it climbs"), ("a red kite",), "holds 2 steps and this plan only 1"),
    ],
)
def test_another_spec_under_a_used_job_id_is_refused(tmp_path: Path, first: tuple[str, ...],
                                                     second: tuple[str, ...], why: str) -> None:
    record(job(tmp_path, *first))
    with pytest.raises(PlanError, match=why) as refused:
        prepare(job(tmp_path, *second), SETTINGS)
    assert "--replace" in str(refused.value) and "\n" not in str(refused.value)
    prepared = prepare(job(tmp_path, *second), SETTINGS, replace=True)
    assert prepared.previous is None and prepared.replaced is not None


def test_another_take_is_another_spec(tmp_path: Path) -> None:
    record(job(tmp_path))
    with pytest.raises(PlanError, match="another spec"):
        prepare(job(tmp_path, take=2), SETTINGS)


def test_another_account_is_refused(tmp_path: Path) -> None:
    record(job(tmp_path))
    other = KlingSettings(access_key="ak-2", secret_key=SETTINGS.secret_key)
    with pytest.raises(PlanError, match="written for account"):
        prepare(job(tmp_path), other)


def test_replace_keeps_the_old_manifest_byte_for_byte(tmp_path: Path) -> None:
    record(job(tmp_path))
    old = (tmp_path / "kite" / "manifest.json").read_bytes()
    record_replacing = job(tmp_path, "a blue whale")
    prepared = prepare(record_replacing, SETTINGS, replace=True)
    JobRecorder(prepared.sink, record_replacing, prepared.plan, "kling", prepared.previous, account=prepared.account,
                replaced=prepared.replaced)
    (kept,) = (tmp_path / "kite").glob("manifest.replaced-*.json")
    assert kept.read_bytes() == old
    current = load_manifest(LocalSink(tmp_path), "kite")
    assert current is not None and current.spec["generate"]["prompt"] == "a blue whale"


def test_every_request_is_checked_before_anything_is_sent(tmp_path: Path) -> None:
    with pytest.raises(PlanError, match="no Kling credentials"):
        prepare(job(tmp_path), KlingSettings())
    assert not (tmp_path / "kite").exists()
