"""Artifact contents (keys, progress, table rows, summary) and the best-effort contract, without a server."""

from __future__ import annotations

import logging
import re
import threading
import uuid
from pathlib import Path

import pytest

from kling_tasks.manifest import Manifest, StepRecord
from kling_tasks.observability import artifacts
from kling_tasks.observability.artifacts import (
    ArtifactKeys,
    ArtifactPublisher,
    progress_percent,
    step_rows,
    summary_markdown,
)
from kling_tasks.storage import LocalSink, StoredObject


def manifest(statuses: list[str], status: str = "running") -> Manifest:
    steps = [
        StepRecord(index=i, name="generate" if i == 0 else f"extend-{i}-of-{len(statuses) - 1}",
                   kind="text2video" if i == 0 else "video-extend", external_task_id=f"job-1-s{i}-abc",
                   task_id=f"t{i}", request_id=f"r{i}", status=s, duration=5.0 + 4.5 * i, credits=1.0,
                   queued_seconds=0.123, processing_seconds=2.345, uri=f"/out/job-1/step-{i:02d}.mp4")
        for i, s in enumerate(statuses)
    ]
    return Manifest(job_id="job-1", provider="kling", steps=steps, status=status, estimated_credits=3.0)


def test_keys_are_lowercase_dash() -> None:
    keys = ArtifactKeys.for_job("job-1")
    assert (keys.progress, keys.steps, keys.video, keys.summary) == (
        "job-1-progress", "job-1-steps", "job-1-video", "job-1-summary")
    assert all(re.fullmatch(r"[a-z0-9-]+", k) for k in vars(ArtifactKeys.for_job("Odd_Job.ID")).values())


def test_progress_moves_with_every_stage() -> None:
    assert progress_percent(manifest(["pending"] * 3)) == 0.0
    assert progress_percent(manifest(["submitted", "pending", "pending"])) == pytest.approx(11.1)
    assert progress_percent(manifest(["stored", "succeed", "pending"])) == pytest.approx(55.6)
    assert progress_percent(manifest(["stored"] * 3)) == 100.0
    assert progress_percent(manifest(["stored"] * 3, status="succeeded")) == 100.0


def test_rows_carry_status_ids_seconds_credits_uri() -> None:
    rows = step_rows(manifest(["stored", "submitted"]))
    assert rows[0] == {"step": 0, "name": "generate", "status": "stored", "task_id": "t0",
                       "external_task_id": "job-1-s0-abc", "request_id": "r0", "video_id": None,
                       "length_s": 5.0, "queued_s": 0.12, "processing_s": 2.35, "credits": 1.0,
                       "uri": "/out/job-1/step-00.mp4"}
    assert rows[1]["name"] == "extend-1-of-1" and rows[1]["status"] == "submitted"


def test_summary_has_picture_length_credits_wall_time_and_manifest() -> None:
    done = manifest(["stored"] * 3, status="succeeded")
    done.final_uri = "/out/job-1/final.mp4"
    text = summary_markdown(done, wall_seconds=12.34, manifest_uri="/out/job-1/manifest.json",
                            video_link="file:///out/job-1/final.mp4", sheet_src="data:image/jpeg;base64,AAAA",
                            sheet_uri="/out/job-1/contact-sheet.jpg")
    assert text.startswith("# job-1: succeeded")
    assert "![contact sheet: one frame per segment](data:image/jpeg;base64,AAAA)" in text
    assert "| total length | 14.0 s (1 generation + 2 extension(s) by video-extend) |" in text
    assert "| credits | 3 charged (estimated 3) |" in text
    assert "| wall time | 12.3 s (this run) |" in text
    assert "`/out/job-1/manifest.json`" in text and "(file:///out/job-1/final.mp4)" in text


def test_failed_summary_names_the_step_and_escapes_the_message() -> None:
    failed = manifest(["stored", "failed"], status="failed")
    failed.steps[1].status_msg = "bad | prompt\nsecond line"
    text = summary_markdown(failed, wall_seconds=1, manifest_uri="m", video_link=None, sheet_src=None,
                            sheet_uri=None)
    assert "**Step `extend-1-of-1` failed** (task `t1`): bad \\| prompt second line." in text
    assert "![" not in text and "final video" not in text


class BrokenClient:
    def __enter__(self) -> BrokenClient:
        raise ConnectionError("prefect api down")

    def __exit__(self, *exc: object) -> None:
        return None


def test_publisher_is_best_effort(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                  caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(artifacts, "get_client", lambda **_: BrokenClient())
    monkeypatch.setattr(artifacts, "_CLIENTS", {})  # no client shared from an earlier test
    publisher = ArtifactPublisher(LocalSink(tmp_path), "job-1", uuid.uuid4(), ("job:job-1",))
    final = StoredObject(uri=str(tmp_path / "job-1/final.mp4"), size=1, sha256="0" * 64, key="job-1/final.mp4")
    with caplog.at_level(logging.WARNING):
        publisher.started(manifest(["pending"]))
        publisher.changed(manifest(["submitted"]))
        publisher.failed(manifest(["failed"], status="failed"))
        publisher.finished(manifest(["stored"], status="succeeded"), final, None)
    assert "could not publish the progress artifact for job job-1: ConnectionError" in caplog.text
    assert "could not publish the summary" in caplog.text


def test_local_links(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    sink = LocalSink(tmp_path)
    sheet = sink.write_bytes("job-1/contact-sheet.jpg", b"\xff\xd8\xff-jpeg", "image/jpeg")
    publisher = ArtifactPublisher(sink, "job-1", uuid.uuid4())
    assert publisher.link_to(sheet) == (tmp_path / "job-1/contact-sheet.jpg").as_uri()
    assert publisher._sheet_src(sheet) == "data:image/jpeg;base64,/9j/LWpwZWc="
    monkeypatch.setattr(artifacts, "INLINE_IMAGE_MAX_BYTES", 4)
    assert publisher._sheet_src(sheet) is None, "too big to inline: the summary lists its path instead"


def test_no_publisher_outside_a_flow_run(tmp_path: Path) -> None:
    assert artifacts.publisher_for_current_run(LocalSink(tmp_path), "job-1") is None


class RecordingClient:
    """A sync Prefect client that records the calls it gets (artifact ids are fresh uuids)."""

    def __init__(self) -> None:
        self.calls: list[str] = []

    def __enter__(self) -> RecordingClient:
        return self

    def __exit__(self, *exc: object) -> None:
        return None

    def create_artifact(self, artifact: object) -> object:
        self.calls.append(f"create {artifact.key}")  # type: ignore[attr-defined]
        return type("Created", (), {"id": uuid.uuid4()})()

    def update_artifact(self, artifact_id: uuid.UUID, update: object) -> None:
        self.calls.append("update")

    def read_flow_run(self, flow_run_id: uuid.UUID) -> object:
        self.calls.append("read flow run")
        return type("Run", (), {"tags": []})()

    def update_flow_run(self, flow_run_id: uuid.UUID, tags: list[str]) -> None:
        self.calls.append(f"tag {','.join(tags)}")


def test_unchanged_pictures_and_known_tags_are_not_written_again(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    client = RecordingClient()
    monkeypatch.setattr(artifacts, "get_client", lambda **_: client)
    monkeypatch.setattr(artifacts, "_CLIENTS", {})
    tagged = ArtifactPublisher(LocalSink(tmp_path), "job-1", uuid.uuid4(), ("job:job-1",),
                               flow_run_tags=["job:job-1", "other"])
    tagged.started(manifest(["pending"]))
    assert client.calls == [], "the run already carries its tags (no read, no write); all pending: no picture yet"
    tagged.changed(manifest(["submitted"]))
    tagged.changed(manifest(["submitted"]))  # a status word the ledger does not keep: the same picture
    tagged.changed(manifest(["succeed"]))
    assert sorted(client.calls) == ["create job-1-progress", "create job-1-steps", "update", "update"], \
        "the first change creates the pictures; an unchanged picture is not written"
    client.calls.clear()
    rerun = ArtifactPublisher(LocalSink(tmp_path), "job-3", uuid.uuid4(), ("job:job-3",), flow_run_tags=["job:job-3"])
    rerun.started(manifest(["stored", "pending"]))
    assert sorted(client.calls) == ["create job-3-progress", "create job-3-steps"], \
        "a rerun shows its Cached steps at once"
    client.calls.clear()
    untagged = ArtifactPublisher(LocalSink(tmp_path), "job-2", uuid.uuid4(), ("job:job-2",), flow_run_tags=["x"])
    untagged.started(manifest(["pending"]))
    assert client.calls[0] == "tag job:job-2,x", "tags the run lacks are added, from the tags it was created with"


class MeetingClient(RecordingClient):
    """Each write waits until `parties` writes are in flight together (a barrier): writes sent one after another
    never meet, and each fails after the barrier's timeout."""

    def __init__(self, parties: int) -> None:
        super().__init__()
        self.barrier = threading.Barrier(parties, timeout=10)

    def create_artifact(self, artifact: object) -> object:
        self.barrier.wait()
        return super().create_artifact(artifact)

    def update_artifact(self, artifact_id: uuid.UUID, update: object) -> None:
        self.barrier.wait()
        super().update_artifact(artifact_id, update)


def test_a_jobs_last_writes_go_together(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                        caplog: pytest.LogCaptureFixture) -> None:
    """The end's progress bar, table, video link and summary are sent at once: the job's run waits for them."""
    publisher = ArtifactPublisher(LocalSink(tmp_path), "job-1", uuid.uuid4(), flow_run_tags=[])
    monkeypatch.setattr(artifacts, "_CLIENTS", {})
    monkeypatch.setattr(artifacts, "get_client", lambda **_: MeetingClient(2))
    publisher.changed(manifest(["submitted"]))  # the bar and the table: created together
    client = MeetingClient(4)
    monkeypatch.setattr(artifacts, "_CLIENTS", {})
    monkeypatch.setattr(artifacts, "get_client", lambda **_: client)
    final = StoredObject(uri=str(tmp_path / "job-1/final.mp4"), size=1, sha256="0" * 64, key="job-1/final.mp4")
    with caplog.at_level(logging.WARNING):
        publisher.finished(manifest(["stored"], status="succeeded"), final, None)
    assert "could not publish" not in caplog.text
    assert sorted(client.calls) == ["create job-1-summary", "create job-1-video", "update", "update"]
