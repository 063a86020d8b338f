"""`kling-pipeline batch` end to end: the emulator as a 3-slot account, moto's S3 server, a real Prefect server.

Every assertion comes from the emulator's counts, the stored bytes, the batch manifest and the CLI's output.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest
import yaml

BUCKET = "batch-videos"
CLI = str(Path(sys.executable).with_name("kling-pipeline"))
SLOTS = 3


@pytest.fixture
def batch_env(prefect_server: Any, kling_env: dict[str, str], s3_endpoint: str, tmp_path: Path) -> dict[str, str]:
    boto3.client("s3").create_bucket(Bucket=BUCKET)
    home = tmp_path / "prefect-home"
    home.mkdir()
    return {**os.environ, **kling_env, "PREFECT_API_URL": prefect_server.api_url, "PREFECT_HOME": str(home),
            "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "KLING_MAX_CONCURRENCY": str(SLOTS), "COLUMNS": "200"}


def jobs_file(tmp_path: Path, count: int, tag: str) -> tuple[Path, list[str]]:
    job_ids = [f"{tag}-{i}" for i in range(1, count + 1)]
    spec = {"defaults": {"extend": ["the camera pulls back", "night falls"]},
            "jobs": [{"prompt": f"a lighthouse number {i}", "job_id": job_id} for i, job_id in enumerate(job_ids)]}
    path = tmp_path / "jobs.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path, job_ids


def start(args: list[str], env: dict[str, str], log: Path) -> subprocess.Popen[bytes]:
    with log.open("ab") as sink:
        return subprocess.Popen([CLI, *args], env=env, stdout=subprocess.PIPE, stderr=sink, start_new_session=True)


def finish(process: subprocess.Popen[bytes], timeout: float = 300) -> tuple[int, list[str]]:
    out, _ = process.communicate(timeout=timeout)
    return process.returncode, out.decode().strip().splitlines()


def wait_for(condition: Callable[[], bool], process: subprocess.Popen[bytes], log: Path, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        if process.poll() is not None:
            raise AssertionError(f"the batch ended first: {log.read_text()[-3000:]}")
        time.sleep(0.05)
    raise AssertionError(f"never reached: {log.read_text()[-3000:]}")


def served_sha256(emulator: Any, task_id: str) -> str:
    video_id = emulator.stats()["tasks"][task_id]["video_id"]
    return hashlib.sha256(httpx.get(f"{emulator.base_url}/_files/{video_id}.mp4").content).hexdigest()


def s3_json(key: str) -> dict[str, Any]:
    return json.loads(boto3.client("s3").get_object(Bucket=BUCKET, Key=key)["Body"].read())  # type: ignore[no-any-return]


def check_whole(emulator: Any, job_ids: list[str], tmp_path: Path, decode_seconds: Any) -> None:
    s3 = boto3.client("s3")
    for job_id in job_ids:
        manifest = s3_json(f"b/{job_id}/manifest.json")
        assert manifest["status"] == "succeeded", job_id
        local = tmp_path / f"{job_id}.mp4"
        s3.download_file(BUCKET, f"b/{job_id}/final.mp4", str(local))
        last = manifest["steps"][-1]
        assert hashlib.sha256(local.read_bytes()).hexdigest() == served_sha256(emulator, last["task_id"])
        assert abs(decode_seconds(local) - last["duration"]) < 0.1
    assert "Uploads" not in s3.list_multipart_uploads(Bucket=BUCKET)


# Kling tasks of ~5 s (time scale 0.015): long against the pipeline's own work between two steps of a video, so
# the three slots are seen busy at once.
@pytest.mark.emulator(concurrency=SLOTS, time_scale=0.015)
def test_a_batch_runs_at_the_accounts_bound_and_pays_once(batch_env: dict[str, str], emulator: Any,
                                                          tmp_path: Path, decode_seconds: Any) -> None:
    path, job_ids = jobs_file(tmp_path, 8, f"lh-{uuid.uuid4().hex[:6]}")
    code, lines = finish(start(["batch", str(path), "--dest", f"s3://{BUCKET}/b"], batch_env, tmp_path / "log"))
    assert code == 0, (tmp_path / "log").read_text()[-4000:]
    assert lines == [f"{job_id}\ts3://{BUCKET}/b/{job_id}/final.mp4" for job_id in job_ids]

    stats = emulator.stats()
    assert len(stats["tasks_created"]) == 8 * 3 and set(stats["tasks_created"].values()) == {1}
    assert set(stats["create_attempts"].values()) == {1}, "no create was refused (1303) or sent twice"
    assert stats["concurrency_high_water"] == SLOTS, "the slots were used, and never more than the account has"
    check_whole(emulator, job_ids, tmp_path, decode_seconds)
    batch = next(json.loads(o["Body"].read()) for o in [boto3.client("s3").get_object(
        Bucket=BUCKET, Key=k["Key"]) for k in boto3.client("s3").list_objects_v2(Bucket=BUCKET, Prefix="b/batch-")[
        "Contents"]])
    assert batch["status"] == "succeeded" and [e["job_id"] for e in batch["jobs"]] == job_ids
    assert all(e["credits"] == 3.0 and e["seconds"] > 0 for e in batch["jobs"])


@pytest.mark.emulator(concurrency=8)
def test_a_killed_batch_resumes_without_paying_twice(batch_env: dict[str, str], emulator: Any, tmp_path: Path,
                                                     decode_seconds: Any) -> None:
    # Eight slots for four jobs: the dead process's leases (freed by Prefect within five minutes) leave room
    # for the rerun, which then adopts every task the killed run had paid for.
    batch_env = {**batch_env, "KLING_MAX_CONCURRENCY": "8"}
    emulator.set_behaviour(unique_external_ids=False)  # a second POST would be a second task
    path, job_ids = jobs_file(tmp_path, 4, f"kill-{uuid.uuid4().hex[:6]}")
    args = ["batch", str(path), "--dest", f"s3://{BUCKET}/b"]
    first = start(args, batch_env, tmp_path / "first.log")
    wait_for(lambda: len(emulator.stats()["tasks_created"]) >= 5, first, tmp_path / "first.log")
    os.killpg(first.pid, signal.SIGKILL)
    first.wait(timeout=10)

    code, lines = finish(start(args, batch_env, tmp_path / "second.log"), timeout=400)
    assert code == 0, (tmp_path / "second.log").read_text()[-4000:]
    assert len(lines) == 4
    stats = emulator.stats()
    assert len(stats["tasks_created"]) == 12 and set(stats["tasks_created"].values()) == {1}
    assert set(stats["create_attempts"].values()) == {1}, "nothing was sent twice"
    assert stats["concurrency_high_water"] <= 8
    check_whole(emulator, job_ids, tmp_path, decode_seconds)


@pytest.mark.emulator(concurrency=SLOTS)
def test_one_failed_job_does_not_stop_the_others(batch_env: dict[str, str], emulator: Any, tmp_path: Path,
                                                 decode_seconds: Any) -> None:
    path, job_ids = jobs_file(tmp_path, 4, f"fail-{uuid.uuid4().hex[:6]}")
    emulator.set_faults({"rules": [{"match": "create:video-extend", "kind": "task_fail", "times": 1,
                                    "params": {"message": "risk control: unsafe content detected"}}]})
    code, lines = finish(start(["batch", str(path), "--dest", f"s3://{BUCKET}/b"], batch_env, tmp_path / "log"))
    assert code == 1
    failed = [line for line in lines if not line.endswith("/final.mp4")]
    assert len(failed) == 1 and "risk control: unsafe content detected" in failed[0]
    bad = failed[0].split("\t")[0]
    check_whole(emulator, [job_id for job_id in job_ids if job_id != bad], tmp_path, decode_seconds)
    assert "1 of 4 job(s) failed" in (tmp_path / "log").read_text()


@pytest.mark.emulator(concurrency=SLOTS)
def test_nothing_is_sent_before_the_spending_is_approved(batch_env: dict[str, str], emulator: Any,
                                                        tmp_path: Path, prefect_server: Any) -> None:
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

    path, _ = jobs_file(tmp_path, 2, f"gate-{uuid.uuid4().hex[:6]}")
    batch_id = f"gate-{uuid.uuid4().hex[:8]}"
    process = start(["batch", str(path), "--dest", f"s3://{BUCKET}/b", "--approve-above", "1", "--batch-id",
                     batch_id], batch_env, tmp_path / "log")

    async def paused_run() -> Any:
        async with get_client() as client:
            runs = await client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=[batch_id])))
        return next((run for run in runs if run.state is not None and run.state.is_paused()), None)

    wait_for(lambda: asyncio.run(paused_run()) is not None, process, tmp_path / "log")
    assert emulator.stats()["requests"] == {}, "nothing is sent while the batch waits for approval"

    from prefect.flow_runs import resume_flow_run

    run = asyncio.run(paused_run())
    resume_flow_run(run.id, run_input={"approve": True})
    code, lines = finish(process)
    assert code == 0, (tmp_path / "log").read_text()[-4000:]
    assert len(lines) == 2 and len(emulator.stats()["tasks_created"]) == 6
