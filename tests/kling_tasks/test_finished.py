"""A finished job is proven only by its whole ledger and its stored videos; every gap is named."""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import pytest

from kling_tasks.finished import final_mismatch, proven_final
from kling_tasks.identity import account_fingerprint
from kling_tasks.jobs import ExtensionSpec, GenerationSpec, PlanError, VideoJob, plan_job
from kling_tasks.manifest import Manifest, StepRecord, load_manifest, save_manifest
from kling_tasks.settings import KlingSettings
from kling_tasks.storage import LocalSink, S3Sink, StoredObject

SETTINGS = KlingSettings(access_key="ak-1", secret_key="sk-0123456789abcdef0123456789abcdef")
VIDEOS = [b"step zero's video", b"step zero and one"]


def kite(dest: Path, *extensions: str, image: str | None = None) -> VideoJob:
    return VideoJob(generate=GenerationSpec(prompt="a red kite", image=image, model_name="kling-v1-6"),
                    dest=str(dest), job_id="kite",
                    extensions=[ExtensionSpec(prompt=e) for e in extensions or ("it climbs",)])


def finished(tmp_path: Path, image: str | None = None) -> tuple[VideoJob, LocalSink]:
    """A 1 + 1 job in a folder as a finished run leaves it: every step stored, final.mp4 = the last step's video."""
    job, sink = kite(tmp_path, image=image), LocalSink(tmp_path)
    plan = plan_job(job)
    steps = [StepRecord(index=s.index, name=s.name, kind=s.kind, external_task_id=s.external_task_id,
                        content_digest=s.content_digest, task_id=f"task-{s.index}", status="stored",
                        size=len(video), sha256=hashlib.sha256(video).hexdigest())
             for s, video in zip(plan.steps, VIDEOS, strict=True)]
    for index, video in enumerate(VIDEOS):
        sink.write_bytes(f"kite/step-{index:02d}.mp4", video, "video/mp4")
    final = sink.write_bytes("kite/final.mp4", VIDEOS[-1], "video/mp4")
    save_manifest(sink, Manifest(job_id="kite", provider="kling", account=account_fingerprint(SETTINGS),
                                 spec=job.public_spec(), steps=steps, status="succeeded", final_uri=final.uri))
    return job, sink


def test_a_deleted_or_replaced_step_video_is_not_proven(tmp_path: Path) -> None:
    job, sink = finished(tmp_path)
    (tmp_path / "kite" / "step-00.mp4").unlink()  # the flow puts it back; the fast path must not skip that
    assert proven_final(job, SETTINGS).reason == "kite/step-00.mp4 is missing or not the video the manifest records"
    sink.write_bytes("kite/step-00.mp4", b"another video", "video/mp4")
    assert proven_final(job, SETTINGS).reason == "kite/step-00.mp4 is missing or not the video the manifest records"


def edit(sink: LocalSink, **fields: Any) -> None:
    manifest = load_manifest(sink, "kite")
    assert manifest is not None
    save_manifest(sink, manifest.model_copy(update=fields))


def test_a_finished_job_is_proven(tmp_path: Path) -> None:
    job, _ = finished(tmp_path)
    verdict = proven_final(job, SETTINGS)
    assert verdict.reason is None and verdict.final is not None
    assert verdict.final.uri == str(tmp_path / "kite" / "final.mp4")


@pytest.mark.parametrize(("status", "why"), [("failed", "the job is failed"), ("running", "the job is running")])
def test_a_job_that_did_not_succeed_is_not_proven(tmp_path: Path, status: str, why: str) -> None:
    job, sink = finished(tmp_path)
    edit(sink, status=status)
    assert proven_final(job, SETTINGS).reason == why


def test_another_spec_or_provider_is_not_proven(tmp_path: Path) -> None:
    job, sink = finished(tmp_path)
    edit(sink, spec={**job.public_spec(), "max_credits": 50.0})  # the steps are the same, the spec is not
    assert proven_final(job, SETTINGS).reason == "the manifest holds another spec"
    edit(sink, spec=job.public_spec(), provider="cometapi")
    assert proven_final(job, SETTINGS).reason == "the manifest was written for another account"


def test_a_step_that_is_not_stored_or_is_another_task_is_not_proven(tmp_path: Path) -> None:
    job, sink = finished(tmp_path)
    manifest = load_manifest(sink, "kite")
    assert manifest is not None
    manifest.update_step(1, status="succeed")
    save_manifest(sink, manifest)
    assert proven_final(job, SETTINGS).reason == "its extend-1-of-1 is succeed"
    manifest.update_step(1, status="stored", external_task_id="kite-s1-0000000000000000")
    save_manifest(sink, manifest)
    assert proven_final(job, SETTINGS).reason == "its extend-1-of-1 is another task than this plan's"


def test_a_longer_plan_than_the_ledger_is_not_proven(tmp_path: Path) -> None:
    job, _ = finished(tmp_path)
    longer = kite(tmp_path, "it climbs", "clouds part")  # appended: the flow pays for the new step only
    assert proven_final(longer, SETTINGS).reason == "the manifest holds 2 steps and this plan 3"
    assert proven_final(job, SETTINGS).final is not None


def test_a_missing_or_other_final_in_a_folder_is_not_proven(tmp_path: Path) -> None:
    job, sink = finished(tmp_path)
    sink.write_bytes("kite/final.mp4", VIDEOS[0], "video/mp4")
    assert proven_final(job, SETTINGS).reason == "final.mp4 is not the video the manifest records"
    (tmp_path / "kite" / "final.mp4").unlink()
    assert proven_final(job, SETTINGS).reason == "final.mp4 is missing (or carries no sha256)"


def test_no_manifest_is_not_proven(tmp_path: Path) -> None:
    assert proven_final(kite(tmp_path), SETTINGS).reason == "no manifest"


def test_on_s3_the_final_must_carry_the_last_steps_task_id(tmp_path: Path) -> None:
    _, sink = finished(tmp_path)
    manifest = load_manifest(sink, "kite")
    assert manifest is not None and manifest.steps[-1].sha256 is not None
    s3, sha = S3Sink("videos"), manifest.steps[-1].sha256
    uri = "s3://videos/kite/final.mp4"
    manifest.final_uri = uri

    def obj(task_id: str | None, sha256: str = sha) -> StoredObject:
        return StoredObject(uri=uri, size=len(VIDEOS[-1]), sha256=sha256, key="kite/final.mp4", task_id=task_id)

    assert final_mismatch(s3, manifest, obj("task-1")) is None
    assert final_mismatch(s3, manifest, obj("task-0")) == "final.mp4 does not carry the last step's task id"
    assert final_mismatch(s3, manifest, obj(None)) == "final.mp4 does not carry the last step's task id"
    assert final_mismatch(s3, manifest, obj("task-1", "0" * 64)) == "final.mp4 is not the video the manifest records"
    manifest.final_uri = "s3://videos/elsewhere/final.mp4"
    assert final_mismatch(s3, manifest, obj("task-1")) == "final.mp4 is not where the manifest says the final video is"


def test_an_image_job_is_proven_until_its_image_changes(tmp_path: Path) -> None:
    photo = tmp_path / "kite.png"
    photo.write_bytes(b"the image's bytes")
    job, _ = finished(tmp_path, image=str(photo))
    assert proven_final(job, SETTINGS).final is not None
    photo.write_bytes(b"another image, same name")  # the same command now asks for another video
    with pytest.raises(PlanError, match="belongs to another job"):  # what the flow refuses (the CLI's exit 2)
        proven_final(kite(tmp_path, image=str(photo)), SETTINGS)
