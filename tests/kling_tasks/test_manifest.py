from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from kling_tasks.manifest import (
    Manifest,
    StepRecord,
    final_key,
    load_manifest,
    manifest_key,
    save_manifest,
    step_key,
    strip_secrets,
)
from kling_tasks.storage import DestinationError, LocalSink, Sink


def make_manifest(job_id: str = "job1") -> Manifest:
    return Manifest(
        job_id=job_id,
        provider="kling",
        spec={"prompt": "a red fox", "model_name": "kling-v1-6", "extend": ["more", "again"]},
        estimated_credits=3.0,
        steps=[
            StepRecord(index=0, name="generate", kind="text2video", external_task_id=f"{job_id}-s0-abc"),
            StepRecord(index=1, name="extend-1-of-1", kind="video-extend", external_task_id=f"{job_id}-s1-def"),
        ],
    )


def test_layout_keys() -> None:
    assert manifest_key("job1") == "job1/manifest.json"
    assert step_key("job1", 0) == "job1/step-00.mp4"
    assert step_key("job1", 12) == "job1/step-12.mp4"
    assert final_key("job1") == "job1/final.mp4"


def test_round_trip(sink: Sink) -> None:
    assert load_manifest(sink, "job1") is None
    manifest = make_manifest()
    manifest.update_step(0, task_id="T0", status="stored", credits=1.0, duration=5.1, uri="u", size=9, sha256="ab")
    manifest.update_step(1, status="succeed", credits=0.5)
    save_manifest(sink, manifest)
    loaded = load_manifest(sink, "job1")
    assert loaded == manifest
    assert loaded is not None and loaded.credits_charged == 1.5
    raw = sink.read_bytes("job1/manifest.json")
    assert raw is not None and raw.startswith(b'{\n  "schema_version": 2,')  # pretty JSON, versioned
    assert json.loads(raw)["credits_charged"] == 1.5  # the computed total is written for readers too


def test_secret_like_keys_are_stripped_at_any_depth() -> None:
    spec: dict[str, Any] = {
        "prompt": "p",
        "access_key": "AK",
        "KLING_SECRET_KEY": "SK",
        "apiToken": "T",
        "Password": "pw",
        "camera": {"type": "simple", "session_token": "x", "config": {"zoom": 1}},
        "images": [{"url": "http://x/i.png", "signing_secret": "s"}],
    }
    manifest = Manifest(job_id="j", provider="kling", spec=spec)
    assert manifest.spec == {
        "prompt": "p",
        "camera": {"type": "simple", "config": {"zoom": 1}},
        "images": [{"url": "http://x/i.png"}],
    }
    manifest.spec = {"secret": "late"}  # assignment is validated too
    assert manifest.spec == {}
    assert "SK" not in manifest.model_dump_json() and strip_secrets(["a", {"token": 1}]) == ["a", {}]


def test_update_step_validates_creates_and_stamps() -> None:
    manifest = make_manifest()
    before = manifest.updated_at
    record = manifest.update_step(1, status="processing", queued_seconds=3.5)
    assert record is manifest.step(1) and record.status == "processing" and record.updated_at is not None
    assert record.name == "extend-1-of-1"  # untouched fields kept
    assert manifest.updated_at >= before
    with pytest.raises(ValidationError):
        manifest.update_step(1, status="done")
    assert manifest.step(1) == record  # a refused update changes nothing
    added = manifest.update_step(2, name="extend-2-of-2", kind="video-extend", external_task_id="job1-s2-x")
    assert [s.index for s in manifest.steps] == [0, 1, 2] and added.status == "pending"
    with pytest.raises(ValidationError):
        manifest.update_step(5, status="submitted")  # a new step needs name, kind and external id


def test_credits_charged_ignores_unknown_credits() -> None:
    manifest = make_manifest()
    assert manifest.credits_charged == 0.0
    manifest.update_step(0, credits=2.0)
    assert manifest.credits_charged == 2.0


def test_rewrite_is_atomic_on_local_disk(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sink = LocalSink(tmp_path)
    manifest = make_manifest()
    save_manifest(sink, manifest)
    good = (tmp_path / "job1" / "manifest.json").read_bytes()
    manifest.update_step(0, status="failed", status_msg="moderation")

    def crash(src: Any, dst: Any) -> None:
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)
    with pytest.raises(DestinationError, match="disk full"):
        save_manifest(sink, manifest)
    monkeypatch.undo()
    assert (tmp_path / "job1" / "manifest.json").read_bytes() == good  # old version intact
    assert sorted(p.name for p in (tmp_path / "job1").iterdir()) == ["manifest.json"]  # no temp file left
    save_manifest(sink, manifest)
    loaded = load_manifest(sink, "job1")
    assert loaded is not None and loaded.steps[0].status_msg == "moderation"


def test_newer_fields_are_ignored_on_load(tmp_path: Path) -> None:
    sink = LocalSink(tmp_path)
    data = json.loads(make_manifest().model_dump_json())
    data["future_field"] = 1
    data["steps"][0]["future_step_field"] = "x"
    sink.write_bytes("job1/manifest.json", json.dumps(data).encode(), "application/json")
    loaded = load_manifest(sink, "job1")
    assert loaded is not None and loaded.job_id == "job1" and len(loaded.steps) == 2
