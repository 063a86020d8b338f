"""produce_video end to end: the Kling emulator, moto's S3 server and a real Prefect server."""

from __future__ import annotations

import hashlib
import itertools
import json
import uuid
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest

from flows.video import KlingStepFailed, produce_video
from kling_tasks.api import AccountError
from kling_tasks.jobs import ExtensionSpec, GenerationSpec, VideoJob, plan_job

pytestmark = [pytest.mark.anyio, pytest.mark.usefixtures("prefect_server", "kling_env")]


def make_job(dest: str, extensions: int = 3, **generate: Any) -> VideoJob:
    # Each test has its own emulator (its own Kling account) but the session shares one Prefect cache, so
    # each job gets its own id: a job's cached steps only mean something at the Kling account that made them.
    job_id = f"t-{uuid.uuid4().hex[:12]}"
    return VideoJob(
        generate=GenerationSpec(prompt="a red kite over green hills", **generate),
        extensions=[ExtensionSpec(prompt=f"the kite climbs, part {i}") for i in range(1, extensions + 1)],
        dest=dest, job_id=job_id,
    )


def creates(stats: dict[str, Any]) -> int:
    return sum(stats["create_attempts"].values())


async def test_one_plus_three_into_s3(s3_endpoint: str, emulator: Any, tmp_path: Path,
                                      decode_seconds: Any) -> None:
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="videos")
    job = make_job("s3://videos/runs")
    uri = await produce_video(job)

    job_id = job.effective_job_id()
    assert uri == f"s3://videos/runs/{job_id}/final.mp4"
    local = tmp_path / "final.mp4"
    s3.download_file("videos", f"runs/{job_id}/final.mp4", str(local))
    manifest = json.loads(s3.get_object(Bucket="videos", Key=f"runs/{job_id}/manifest.json")["Body"].read())

    assert manifest["status"] == "succeeded" and manifest["final_uri"] == uri
    assert [step["status"] for step in manifest["steps"]] == ["stored"] * 4
    last = manifest["steps"][-1]
    assert abs(decode_seconds(local) - last["duration"]) < 0.1
    assert hashlib.sha256(local.read_bytes()).hexdigest() == last["sha256"]
    for step in manifest["steps"]:
        assert step["task_id"] and step["video_id"] and step["credits"] is not None
        head = s3.head_object(Bucket="videos", Key=f"runs/{job_id}/step-{step['index']:02d}.mp4")
        assert head["ContentLength"] == step["size"]
        assert head["Metadata"]["task_id"] == step["task_id"]
    # Every step was created exactly once, and each extension continued the previous video.
    stats = emulator.stats()
    plan = plan_job(job)
    assert stats["tasks_created"] == {step.external_task_id: 1 for step in plan.steps}
    durations = [step["duration"] for step in manifest["steps"]]
    assert all(4 <= later - earlier <= 5.05 for earlier, later in itertools.pairwise(durations))


async def test_local_folder_and_rerun_pays_nothing(tmp_path: Path, emulator: Any, decode_seconds: Any) -> None:
    job = make_job(str(tmp_path / "out"), extensions=2)
    uri = await produce_video(job)
    final = Path(uri)
    assert final == tmp_path / "out" / job.effective_job_id() / "final.mp4"
    manifest = json.loads((final.parent / "manifest.json").read_text())
    assert abs(decode_seconds(final) - manifest["steps"][-1]["duration"]) < 0.1
    served = httpx.get(f"{emulator.base_url}/_emulator/stats").json()
    assert served["tasks_created"] == {s.external_task_id: 1 for s in plan_job(job).steps}
    leftovers = [*final.parent.glob(".*.part"), *final.parent.glob("*.part")]  # the sink's temps: .{name}.{random}.part
    assert not leftovers, f"no temporary files are left behind: {leftovers}"

    before = emulator.stats()
    assert await produce_video(job) == uri
    after = emulator.stats()
    assert creates(after) == creates(before), "a rerun after success submits nothing"
    assert after["polls"] == before["polls"] and after["downloads"] == before["downloads"]


async def test_failed_task_is_not_resubmitted_without_asking(tmp_path: Path, emulator: Any) -> None:
    emulator.set_faults({"rules": [{"match": "create:video-extend", "kind": "task_fail", "times": 1,
                                    "params": {"message": "content policy: unsafe content detected"}}]})
    job = make_job(str(tmp_path / "out"), extensions=1)
    with pytest.raises(KlingStepFailed, match="content policy"):
        await produce_video(job)
    manifest_path = tmp_path / "out" / job.effective_job_id() / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    assert manifest["status"] == "failed"
    assert manifest["steps"][1]["status"] == "failed"
    assert "content policy" in manifest["steps"][1]["status_msg"]

    attempts = creates(emulator.stats())
    with pytest.raises(KlingStepFailed):
        await produce_video(job)
    assert creates(emulator.stats()) == attempts, "a plain rerun must not pay for the failed step again"

    uri = await produce_video(job, resubmit_failed=True)
    assert Path(uri).is_file()
    created = emulator.stats()["tasks_created"]
    assert len(created) == 3 and all(count == 1 for count in created.values())


async def test_transient_failures_are_retried_and_fatal_ones_are_not(tmp_path: Path, emulator: Any) -> None:
    emulator.set_faults({"rules": [
        {"match": "create:text2video", "kind": "http_error", "times": 1, "params": {"status": 429, "code": 1303}},
        {"match": "download", "kind": "download_cut", "times": 1},
    ]})
    job = make_job(str(tmp_path / "out"), extensions=0)
    uri = await produce_video(job)
    assert Path(uri).is_file()
    stats = emulator.stats()
    (ext,) = stats["tasks_created"]
    assert stats["create_attempts"][ext] == 2, "the 1303 refusal was retried by the submit task"
    assert sum(stats["downloads"].values()) == 2, "the cut-off download was retried by the store task"

    emulator.set_faults({"rules": [{"match": "create:*", "kind": "pack_exhausted"}]})
    with pytest.raises(AccountError, match="1102"):
        await produce_video(make_job(str(tmp_path / "other"), extensions=0, duration="10"))
    assert sum(emulator.stats()["create_attempts"].values()) == 3, "an exhausted pack is never retried"


async def test_another_machine_with_an_empty_cache_adopts_instead_of_paying(tmp_path: Path, emulator: Any) -> None:
    from prefect.settings import PREFECT_RESULTS_LOCAL_STORAGE_PATH, temporary_settings

    job = make_job(str(tmp_path / "out"), extensions=1)
    uri = await produce_video(job)
    before = emulator.stats()
    # A second machine: nothing in its Prefect cache, the same destination and the same Kling account.
    with temporary_settings(updates={PREFECT_RESULTS_LOCAL_STORAGE_PATH: tmp_path / "other-machine-cache"}):
        assert await produce_video(job) == uri
    after = emulator.stats()
    assert after["tasks_created"] == before["tasks_created"], "found by external_task_id, not created again"
    assert after["create_attempts"] == before["create_attempts"], "not even a refused POST was sent"
    assert after["downloads"] == before["downloads"], "stored videos are recognised, not downloaded again"
