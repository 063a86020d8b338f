"""Crash tests: the CLI is killed with SIGKILL at a chosen stage, then run again.

The child runs in its own process group (setsid) against the session's real Prefect server, the Kling
emulator and moto's S3 server. After the rerun, the emulator's stats must show every step created exactly
once, the final video must be byte-identical to what Kling served, and no partial object may exist.
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
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest
from botocore.exceptions import ClientError

from kling_tasks.api import KlingClient
from kling_tasks.jobs import ExtensionSpec, GenerationSpec, VideoJob, plan_job
from kling_tasks.settings import KlingSettings

BUCKET = "crash-videos"
PROMPT = "a lantern floating down a river"
EXTENSIONS = ("the lantern passes a bridge", "the lantern drifts into the sea")
CLI = str(Path(sys.executable).with_name("kling-pipeline"))


@pytest.fixture
def crash_env(prefect_server: Any, kling_env: dict[str, str], s3_endpoint: str, tmp_path: Path) -> dict[str, str]:
    boto3.client("s3").create_bucket(Bucket=BUCKET)
    home = tmp_path / "prefect-home"  # one machine's Prefect home, shared by the killed run and the rerun
    home.mkdir()
    return {
        **os.environ,
        **kling_env,
        "PREFECT_API_URL": prefect_server.api_url,
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "COLUMNS": "200",
    }


class Child:
    def __init__(self, args: list[str], env: dict[str, str], log: Path):
        self.log_path = log
        self._log = log.open("ab")
        self.process = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=self._log,
                                        start_new_session=True)

    def kill_group(self) -> None:
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)
        self._log.close()

    def finish(self, timeout: float = 180) -> tuple[int, str]:
        out, _ = self.process.communicate(timeout=timeout)
        self._log.close()
        return self.process.returncode, out.decode()


def run_cli(job_id: str, env: dict[str, str], log: Path) -> Child:
    args = [CLI, "run", "--prompt", PROMPT, "--dest", f"s3://{BUCKET}/crash", "--job-id", job_id]
    for text in EXTENSIONS:
        args += ["--extend", text]
    return Child(args, env, log)


def wait_until(condition: Callable[[], bool], child: Child, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        if child.process.poll() is not None:
            raise AssertionError(f"the run ended before the kill point: {child.log_path.read_text()[-3000:]}")
        time.sleep(0.02)
    raise AssertionError("the kill point was never reached")


def object_exists(key: str) -> bool:
    try:
        boto3.client("s3").head_object(Bucket=BUCKET, Key=key)
        return True
    except ClientError:
        return False


def served_sha256(task_id: str) -> str:
    async def fetch() -> str:
        async with KlingClient(KlingSettings()) as client:
            snap = await client.get("video-extend", task_id)
        assert snap.video is not None
        return hashlib.sha256(httpx.get(snap.video.url).content).hexdigest()

    return asyncio.run(fetch())


def plan_for(job_id: str) -> list[str]:
    job = VideoJob(generate=GenerationSpec(prompt=PROMPT), extensions=[ExtensionSpec(prompt=t) for t in EXTENSIONS],
                   dest=f"s3://{BUCKET}/crash", job_id=job_id)
    return [step.external_task_id for step in plan_job(job).steps]


def kill_points(emulator: Any, ids: list[str], job_id: str) -> dict[str, Callable[[], bool]]:
    def created(ext: str) -> bool:
        return emulator.stats()["create_attempts"].get(ext, 0) >= 1

    def running(ext: str) -> bool:
        tasks = emulator.stats()["tasks"].values()
        return any(t["external_task_id"] == ext and t["status"] in ("submitted", "processing") for t in tasks)

    return {
        "submit": lambda: created(ids[1]),
        "wait": lambda: running(ids[1]),
        "store": lambda: sum(emulator.stats()["downloads"].values()) >= 1,
        "between-steps": lambda: object_exists(f"crash/{job_id}/step-01.mp4"),
    }


# Faults that widen the window the kill must land in; all of them are gone before the rerun.
WINDOW_FAULTS: dict[str, list[dict[str, Any]]] = {
    "submit": [{"match": "create:video-extend", "kind": "slow", "times": 1, "params": {"seconds": 3}}],
    "wait": [],
    "store": [{"match": "download", "kind": "slow", "times": 1, "params": {"seconds": 3}}],
    "between-steps": [],
}


@pytest.fixture
def emulator_faults(emulator: Any) -> Iterator[Callable[[list[dict[str, Any]]], None]]:
    yield lambda rules: emulator.set_faults({"rules": rules})
    emulator.set_faults({"rules": []})


@pytest.mark.parametrize("stage", list(WINDOW_FAULTS))
def test_killed_run_resumes_without_paying_twice(
    stage: str, emulator: Any, crash_env: dict[str, str], emulator_faults: Any, tmp_path: Path
) -> None:
    job_id = f"crash-{stage}"
    ids = plan_for(job_id)
    emulator_faults(WINDOW_FAULTS[stage])

    first = run_cli(job_id, crash_env, tmp_path / "first.log")
    wait_until(kill_points(emulator, ids, job_id)[stage], first)
    first.kill_group()
    emulator_faults([])

    code, out = run_cli(job_id, crash_env, tmp_path / "second.log").finish()
    assert code == 0, (tmp_path / "second.log").read_text()[-4000:]
    final_uri = f"s3://{BUCKET}/crash/{job_id}/final.mp4"
    assert out.strip().splitlines()[-1] == final_uri

    stats = emulator.stats()
    assert {ext: stats["tasks_created"].get(ext) for ext in ids} == {ext: 1 for ext in ids}, "each step paid once"

    s3 = boto3.client("s3")
    assert "Uploads" not in s3.list_multipart_uploads(Bucket=BUCKET), "no multipart upload left open"
    manifest = json.loads(s3.get_object(Bucket=BUCKET, Key=f"crash/{job_id}/manifest.json")["Body"].read())
    assert manifest["status"] == "succeeded"
    final = s3.get_object(Bucket=BUCKET, Key=f"crash/{job_id}/final.mp4")["Body"].read()
    assert hashlib.sha256(final).hexdigest() == served_sha256(manifest["steps"][-1]["task_id"])
    for step in manifest["steps"]:
        head = s3.head_object(Bucket=BUCKET, Key=f"crash/{job_id}/step-{step['index']:02d}.mp4")
        assert (head["ContentLength"], head["Metadata"]["sha256"]) == (step["size"], step["sha256"])
