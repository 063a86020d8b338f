"""JobRecorder: the manifest after every step, and the observer hooks that drive the Prefect artifacts."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest

from kling_tasks.jobs import ExtensionSpec, GenerationSpec, VideoJob, plan_job
from kling_tasks.manifest import Manifest, step_key
from kling_tasks.observability.contact_sheet import contact_sheet_key
from kling_tasks.recorder import JobRecorder
from kling_tasks.storage import LocalSink, StoredObject


class FakeObserver:
    def __init__(self, fail: bool = False) -> None:
        self.calls: list[tuple[str, str, Any]] = []
        self.fail = fail

    def _record(self, hook: str, manifest: Manifest, extra: Any = None) -> None:
        self.calls.append((hook, manifest.status, extra))
        if self.fail:
            raise RuntimeError("prefect api down")

    def started(self, manifest: Manifest) -> None:
        self._record("started", manifest, [s.status for s in manifest.steps])

    def changed(self, manifest: Manifest) -> None:
        self._record("changed", manifest, [s.status for s in manifest.steps])

    def failed(self, manifest: Manifest) -> None:
        self._record("failed", manifest)

    def finished(self, manifest: Manifest, final: StoredObject, sheet: StoredObject | None) -> None:
        self._record("finished", manifest, (final.key, sheet))


def make(tmp_path: Path, observer: Any, previous: Manifest | None = None) -> tuple[JobRecorder, LocalSink, Any]:
    job = VideoJob(generate=GenerationSpec(prompt="a kite"), extensions=[ExtensionSpec(prompt="higher")],
                   dest=str(tmp_path), job_id="kite")
    plan = plan_job(job)
    sink = LocalSink(tmp_path)
    return JobRecorder(sink, job, plan, "kling", previous, observer=observer), sink, plan


def run_steps(recorder: JobRecorder, sink: LocalSink, plan: Any) -> None:
    for step in plan.steps:
        recorder.submitted(step, {"task_id": f"t{step.index}", "request_id": f"r{step.index}"})
        recorder.finished(step, {"video_id": f"v{step.index}", "duration": 5.0 + 4.5 * step.index,
                                 "credits": 1.0, "queued_seconds": 0.5, "processing_seconds": 2.0})
        stored = sink.write_bytes(step_key("kite", step.index), b"not really a video", "video/mp4")
        recorder.stored(step, stored.model_dump())


def test_observer_sees_every_step_and_the_finish(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    observer = FakeObserver()
    recorder, sink, plan = make(tmp_path, observer)
    run_steps(recorder, sink, plan)
    with caplog.at_level(logging.WARNING):
        final = recorder.finish()

    hooks = [hook for hook, _, _ in observer.calls]
    assert hooks == ["started"] + ["changed"] * 6 + ["finished"]
    assert observer.calls[0][2] == ["pending", "pending"]
    assert observer.calls[-2][2] == ["stored", "stored"]
    assert observer.calls[-1][1] == "succeeded"
    # The "video" is not decodable: the contact sheet is skipped with a warning, the job still finishes.
    assert observer.calls[-1][2] == (final.key, None)
    assert "making the contact sheet failed" in caplog.text
    assert json.loads((tmp_path / "kite" / "manifest.json").read_text())["status"] == "succeeded"


def test_failure_is_published_once(tmp_path: Path) -> None:
    observer = FakeObserver()
    recorder, _, plan = make(tmp_path, observer)
    recorder.submitted(plan.steps[0], {"task_id": "t0", "request_id": "r0"})
    recorder.failed(plan.steps[0], "content policy")
    assert [hook for hook, _, _ in observer.calls] == ["started", "changed", "failed"]
    assert observer.calls[-1][1] == "failed"


def test_a_broken_observer_never_breaks_the_recording(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    observer = FakeObserver(fail=True)
    with caplog.at_level(logging.WARNING):
        recorder, sink, plan = make(tmp_path, observer)
        run_steps(recorder, sink, plan)
        recorder.finish()
    assert len(observer.calls) == 8, "every hook was still called"
    assert "prefect api down" in caplog.text
    manifest = json.loads((tmp_path / "kite" / "manifest.json").read_text())
    assert manifest["status"] == "succeeded" and [s["status"] for s in manifest["steps"]] == ["stored"] * 2


def test_outside_a_flow_run_there_is_no_observer(tmp_path: Path) -> None:
    job = VideoJob(generate=GenerationSpec(prompt="a kite"), dest=str(tmp_path), job_id="kite")
    recorder = JobRecorder(LocalSink(tmp_path), job, plan_job(job), "kling", None)
    assert recorder.observer is None


def test_a_rerun_keeps_finished_steps(tmp_path: Path) -> None:
    first, sink, plan = make(tmp_path, None)
    run_steps(first, sink, plan)
    first.finish()
    observer = FakeObserver()
    again, sink, plan = make(tmp_path, observer, previous=first.manifest)
    run_steps(again, sink, plan)  # the flow calls the recorder for Cached steps too
    assert observer.calls[0][2] == ["stored", "stored"]
    assert all(extra == ["stored", "stored"] for hook, _, extra in observer.calls if hook == "changed")


def test_a_rerun_of_a_finished_job_reuses_its_contact_sheet(tmp_path: Path) -> None:
    first, sink, plan = make(tmp_path, None)
    run_steps(first, sink, plan)
    first.finish()
    sheet = sink.write_bytes(contact_sheet_key("kite"), b"the sheet of this final.mp4", "image/jpeg")
    observer = FakeObserver()
    again, sink, plan = make(tmp_path, observer, previous=first.manifest)
    run_steps(again, sink, plan)
    again.finish()
    assert observer.calls[-1] == ("finished", "succeeded", ("kite/final.mp4", sheet))
    assert (tmp_path / "kite" / "contact-sheet.jpg").read_bytes() == b"the sheet of this final.mp4"
