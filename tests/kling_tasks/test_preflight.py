"""Preflight: a job folder is continued only by the same account and a plan its ledger is a prefix of."""

from __future__ import annotations

from pathlib import Path

import pytest

from kling_tasks.jobs import ExtensionSpec, GenerationSpec, PlanError, VideoJob
from kling_tasks.manifest import Manifest, StepRecord, load_manifest
from kling_tasks.preflight import attempts_from, prepare
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


def step_record(index: int, status: str, attempt: int = 0) -> StepRecord:
    return StepRecord(index=index, name=f"step-{index}", kind="text2video" if index == 0 else "video-extend",
                      external_task_id=f"kite-s{index}-{'0' * 16}", attempt=attempt, status=status)  # type: ignore[arg-type]


def test_attempts_are_read_back_from_the_ledger_and_bumped_only_for_failed_steps_when_asked() -> None:
    ledger = Manifest(job_id="kite", provider="kling", steps=[
        step_record(0, "failed"), step_record(1, "stored", attempt=2), step_record(2, "succeed"),
        step_record(3, "failed", attempt=1), step_record(4, "submitting")])
    assert attempts_from(None, resubmit_failed=True) == {}
    assert attempts_from(ledger, resubmit_failed=False) == {1: 2, 3: 1}, "a failed task is never resubmitted silently"
    assert attempts_from(ledger, resubmit_failed=True) == {0: 1, 1: 2, 3: 2}


def test_a_failed_step_keeps_its_task_unless_resubmit_failed_and_then_keeps_the_new_attempt(tmp_path: Path) -> None:
    spec = job(tmp_path, "a red kite", "it climbs")
    first = prepare(spec, SETTINGS)
    ledger = JobRecorder(first.sink, spec, first.plan, "kling", first.previous, account=first.account)
    ledger.failed(first.plan.steps[0], "risk control")
    ids = [s.external_task_id for s in first.plan.steps]

    again = prepare(spec, SETTINGS)
    assert [s.external_task_id for s in again.plan.steps] == ids, "no new attempt without --resubmit-failed"
    resubmitted = prepare(spec, SETTINGS, resubmit_failed=True)
    assert [s.attempt for s in resubmitted.plan.steps] == [1, 0]
    new_ids = [s.external_task_id for s in resubmitted.plan.steps]
    assert new_ids[0] != ids[0] and new_ids[1] != ids[1], "the new attempt and every later step are new tasks"

    JobRecorder(resubmitted.sink, spec, resubmitted.plan, "kling", resubmitted.previous, account=resubmitted.account)
    resumed = prepare(spec, SETTINGS)
    assert [s.external_task_id for s in resumed.plan.steps] == new_ids, "a rerun continues attempt 1, not 0"


def test_the_budget_is_checked_before_anything_is_sent(tmp_path: Path) -> None:
    estimate = prepare(job(tmp_path, "a red kite", "it climbs"), SETTINGS).plan.estimated_credits
    assert prepare(job(tmp_path, "a red kite", "it climbs", max_credits=estimate), SETTINGS).plan
    with pytest.raises(PlanError, match="over max_credits"):
        prepare(job(tmp_path, "a red kite", "it climbs", max_credits=estimate - 0.5), SETTINGS)


def test_an_unusable_destination_or_an_unreadable_ledger_is_one_line_naming_it(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(PlanError, match=r"destination '.*a-file' is not usable") as refused:
        prepare(job(blocker), SETTINGS)
    assert "\n" not in str(refused.value)
    (tmp_path / "out" / "kite").mkdir(parents=True)
    (tmp_path / "out" / "kite" / "manifest.json").write_text("{not json")
    with pytest.raises(PlanError, match=r"the manifest of job kite under .* cannot be read"):
        prepare(job(tmp_path / "out"), SETTINGS)
    assert (tmp_path / "out" / "kite" / "manifest.json").read_text() == "{not json", "never overwritten"
