"""JobRecorder: the ledger written once per transition, and the observers that see each change."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import pytest

from kling_tasks.jobs import ExtensionSpec, GenerationSpec, VideoJob, plan_job
from kling_tasks.manifest import Manifest, step_key
from kling_tasks.observability.contact_sheet import contact_sheet_key
from kling_tasks.recorder import JobRecorder, Transition, active
from kling_tasks.step_results import Rendered, Submission
from kling_tasks.storage import LocalSink, StoredObject


class FakeObserver:
    def __init__(self, fail: bool = False) -> None:
        self.calls: list[tuple[str, str, Any]] = []
        self.transitions: list[tuple[int, str]] = []
        self.fail = fail

    def _record(self, hook: str, manifest: Manifest, extra: Any = None) -> None:
        self.calls.append((hook, manifest.status, extra))
        if self.fail:
            raise RuntimeError("prefect api down")

    def started(self, manifest: Manifest) -> None:
        self._record("started", manifest, [s.status for s in manifest.steps])

    def changed(self, manifest: Manifest, transition: Transition) -> None:
        self._record("changed", manifest, [s.status for s in manifest.steps])
        self.transitions.append((transition.record.index, transition.stage))

    def failed(self, manifest: Manifest) -> None:
        self._record("failed", manifest)

    def finished(self, manifest: Manifest, final: StoredObject, sheet: StoredObject | None) -> None:
        self._record("finished", manifest, (final.key, sheet))


def make(tmp_path: Path, observer: Any, previous: Manifest | None = None) -> tuple[JobRecorder, LocalSink, Any]:
    job = VideoJob(generate=GenerationSpec(prompt="a kite"), extensions=[ExtensionSpec(prompt="higher")],
                   dest=str(tmp_path), job_id="kite")
    plan = plan_job(job)
    sink = LocalSink(tmp_path)
    observers = [] if observer is None else [observer]
    return JobRecorder(sink, job, plan, "kling", previous, account="acc", observers=observers), sink, plan


def submission(index: int) -> Submission:
    return Submission(task_id=f"t{index}", external_task_id=f"e{index}", adopted=False, request_id=f"r{index}")


def rendered(index: int) -> Rendered:
    return Rendered(kind="text2video", task_id=f"t{index}", external_task_id=f"e{index}", video_id=f"v{index}",
                    url="u", duration=5.0 + 4.5 * index, credits=1.0, request_id=None, queued_seconds=0.5,
                    processing_seconds=2.0)


def run_steps(recorder: JobRecorder, sink: LocalSink, plan: Any) -> None:
    for step in plan.steps:
        recorder.submitting(step)
        recorder.submitted(step, submission(step.index))
        recorder.status(step, "processing")
        recorder.succeeded(step, rendered(step.index))
        stored = sink.write_bytes(step_key("kite", step.index), b"not really a video", "video/mp4")
        recorder.stored(step, stored)


def test_observer_sees_every_step_and_the_finish(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    observer = FakeObserver()
    recorder, sink, plan = make(tmp_path, observer)
    run_steps(recorder, sink, plan)
    with caplog.at_level(logging.WARNING):
        final = recorder.finish()

    hooks = [hook for hook, _, _ in observer.calls]
    assert hooks == ["started"] + ["changed"] * 10 + ["finished"]
    stages = ["submitting", "submitted", "status", "succeeded", "stored"]
    assert observer.transitions == [(0, stage) for stage in stages] + [(1, stage) for stage in stages]
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
    recorder.submitted(plan.steps[0], submission(0))
    recorder.failed(plan.steps[0], "content policy")
    assert [hook for hook, _, _ in observer.calls] == ["started", "changed", "changed", "failed"]
    assert observer.transitions == [(0, "submitted"), (0, "failed")]
    assert observer.calls[-1][1] == "failed"
    again, _, _ = make(tmp_path, FakeObserver(), previous=recorder.manifest)
    again.failed(plan.steps[0], "content policy")
    assert again.observers[0].transitions == [], "a rerun that sees the same failure announces no new event"


def test_a_broken_observer_never_breaks_the_recording(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    observer = FakeObserver(fail=True)
    with caplog.at_level(logging.WARNING):
        recorder, sink, plan = make(tmp_path, observer)
        run_steps(recorder, sink, plan)
        recorder.finish()
    assert len(observer.calls) == 12, "every hook was still called"
    assert "prefect api down" in caplog.text
    manifest = json.loads((tmp_path / "kite" / "manifest.json").read_text())
    assert manifest["status"] == "succeeded" and [s["status"] for s in manifest["steps"]] == ["stored"] * 2


def test_outside_a_flow_run_there_is_no_artifact_publisher(tmp_path: Path) -> None:
    from kling_tasks.events import EventEmitter
    from kling_tasks.progress import ProgressFeed
    from kling_tasks.recorder import default_observers

    job = VideoJob(generate=GenerationSpec(prompt="a kite"), dest=str(tmp_path), job_id="kite")
    observers = default_observers(LocalSink(tmp_path), plan_job(job), ())
    assert [type(o) for o in observers] == [EventEmitter, ProgressFeed]


def test_a_slow_observer_never_holds_up_a_step_and_misses_nothing(tmp_path: Path) -> None:
    import threading

    release = threading.Event()

    class Stuck(FakeObserver):
        coalesce = False

        def changed(self, manifest: Manifest, transition: Transition) -> None:
            release.wait(20)  # a told-in-line observer would make each step wait for this
            super().changed(manifest, transition)

    observer = Stuck()
    recorder, sink, plan = make(tmp_path, observer)
    run_steps(recorder, sink, plan)
    assert observer.transitions == [], "every step was recorded while the observer was still stuck"
    assert [s.status for s in recorder.manifest.steps] == ["stored", "stored"]
    release.set()
    recorder.flush()
    assert len(observer.transitions) == 10, "every transition was told, in order"
    assert observer.transitions[0] == (0, "submitting") and observer.transitions[-1] == (1, "stored")


def test_tasks_find_the_ledger_of_their_job_while_it_is_open(tmp_path: Path) -> None:
    recorder, _, _ = make(tmp_path, None)
    assert active("kite") is None
    with recorder:
        assert active("kite") is recorder
    assert active("kite") is None


def test_the_intent_is_on_disk_before_the_post_and_tells_the_rerun(tmp_path: Path) -> None:
    first, _, plan = make(tmp_path, None)
    first.submitting(plan.steps[0])
    on_disk = Manifest.model_validate_json((tmp_path / "kite" / "manifest.json").read_text())
    assert on_disk.steps[0].status == "submitting" and on_disk.steps[0].task_id is None
    rerun, _, _ = make(tmp_path, None, previous=on_disk)
    assert rerun.may_exist(plan.steps[0]) and not rerun.may_exist(plan.steps[1])
    rerun.submitted(plan.steps[0], submission(0))
    assert not rerun.may_exist(plan.steps[0])


def test_only_the_ledger_of_this_task_proves_a_local_file(tmp_path: Path) -> None:
    recorder, sink, plan = make(tmp_path, None)
    run_steps(recorder, sink, plan)
    sha = recorder.manifest.steps[0].sha256
    assert recorder.proven_sha256(plan.steps[0], "t0") == sha
    assert recorder.proven_sha256(plan.steps[0], "another-task") is None


def test_a_rerun_keeps_finished_steps(tmp_path: Path) -> None:
    first, sink, plan = make(tmp_path, None)
    run_steps(first, sink, plan)
    first.finish()
    observer = FakeObserver()
    again, sink, plan = make(tmp_path, observer, previous=first.manifest)
    run_steps(again, sink, plan)  # the flow calls the recorder for Cached steps too
    again.flush()
    assert observer.calls[0][2] == ["stored", "stored"]
    assert observer.transitions == [], "a replayed transition is neither rewritten nor announced"


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


def test_a_run_that_stops_on_an_error_is_recorded_failed_and_its_steps_keep_their_status(tmp_path: Path) -> None:
    recorder, _, plan = make(tmp_path, None)
    with pytest.raises(RuntimeError, match="pack used up"), recorder:
        recorder.submitted(plan.steps[0], submission(0))
        raise RuntimeError("resource pack used up")
    manifest = json.loads((tmp_path / "kite" / "manifest.json").read_text())
    assert manifest["status"] == "failed"
    assert [step["status"] for step in manifest["steps"]] == ["submitted", "pending"], "a rerun resumes from these"
    assert active("kite") is None


def test_a_run_that_ends_normally_is_not_marked_failed(tmp_path: Path) -> None:
    recorder, _, _ = make(tmp_path, None)
    with recorder:
        pass
    assert json.loads((tmp_path / "kite" / "manifest.json").read_text())["status"] == "running"
