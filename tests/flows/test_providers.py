"""produce_video end to end where providers differ: a create whose answer is lost, and the CometAPI proxy.

The emulator accepts duplicate external ids in both tests (a proxy pooling many upstream accounts cannot refuse
them), so a client that resent a create would show a second task instead of being saved by a 1201.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from flows.video import produce_video
from kling_tasks.api import KlingClient
from kling_tasks.jobs import ExtensionSpec, GenerationSpec, VideoJob, plan_job
from kling_tasks.settings import load_settings

pytestmark = [pytest.mark.anyio, pytest.mark.usefixtures("prefect_server")]


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"  # the session shares one Prefect cache: never reuse a job id


def make_job(dest: Path, prefix: str, extensions: int) -> VideoJob:
    return VideoJob(generate=GenerationSpec(prompt="a sailboat at first light"),
                    extensions=[ExtensionSpec(prompt=f"the wind rises, part {i}") for i in range(1, extensions + 1)],
                    dest=str(dest), job_id=new_id(prefix))


def served_sha256(emulator: Any, task_id: str) -> str:
    video_id = emulator.stats()["tasks"][task_id]["video_id"]
    return hashlib.sha256(httpx.get(f"{emulator.base_url}/_files/{video_id}.mp4").content).hexdigest()


def assert_one_task_per_step_and_whole(emulator: Any, job: VideoJob, uri: str) -> dict[str, Any]:
    """One POST and one task per planned step, nothing else; every stored step is its own task's file."""
    planned = [step.external_task_id for step in plan_job(job).steps]
    stats = emulator.stats()
    assert stats["create_attempts"] == {ext: 1 for ext in planned}, "one create POST per step"
    assert stats["tasks_created"] == {ext: 1 for ext in planned}, "one task per step, none outside the plan"
    task_of = {task["external_task_id"]: task_id for task_id, task in stats["tasks"].items()}
    job_dir = Path(uri).parent
    manifest = json.loads((job_dir / "manifest.json").read_text())
    assert manifest["status"] == "succeeded" and manifest["final_uri"] == uri
    for step in manifest["steps"]:
        assert step["task_id"] == task_of[step["external_task_id"]]
        data = (job_dir / f"step-{step['index']:02d}.mp4").read_bytes()
        assert hashlib.sha256(data).hexdigest() == step["sha256"] == served_sha256(emulator, step["task_id"])
    assert hashlib.sha256(Path(uri).read_bytes()).hexdigest() == manifest["steps"][-1]["sha256"]
    return dict(manifest)


async def test_a_create_whose_answer_was_lost_is_adopted_with_one_post(kling_env: dict[str, str], emulator: Any,
                                                                       tmp_path: Path) -> None:
    """The generation's and the extension's creates are committed, then the connection dies without an answer;
    the default (working) lookups find each task, and nothing is POSTed again."""
    emulator.set_behaviour(unique_external_ids=False)
    emulator.set_faults({"rules": [
        {"match": "create:text2video", "kind": "drop_after_commit", "times": 1},
        {"match": "create:video-extend", "kind": "drop_after_commit", "times": 1},
    ]})
    job = make_job(tmp_path / "out", "dropped", extensions=1)
    uri = await produce_video(job)
    assert emulator.stats()["faults_fired"] == {"drop_after_commit": 2}, "both answers were really lost"
    assert_one_task_per_step_and_whole(emulator, job, uri)


@pytest.mark.emulator(provider="cometapi")
async def test_cometapi_provider_generates_and_extends_each_from_the_previous_video(
        kling_env: dict[str, str], emulator: Any, tmp_path: Path, decode_seconds: Any) -> None:
    assert kling_env["KLING_PROVIDER"] == "cometapi" and "KLING_ACCESS_KEY" not in kling_env
    emulator.set_behaviour(unique_external_ids=False)
    job = make_job(tmp_path / "out", "comet", extensions=2)
    uri = await produce_video(job)

    manifest = assert_one_task_per_step_and_whole(emulator, job, uri)
    assert manifest["provider"] == "cometapi"
    assert abs(decode_seconds(uri) - manifest["steps"][-1]["duration"]) < 0.1
    requests = emulator.stats()["requests"]
    assert requests and all(name.split(" ", 1)[1].startswith("/kling/") for name in requests), requests
    assert requests.get("POST /kling/v1/videos/video-extend") == 2
    # Each extension continued the video of the step before it (read back from the provider).
    async with KlingClient(load_settings()) as client:
        for previous, step in zip(manifest["steps"], manifest["steps"][1:], strict=False):
            snapshot = await client.get("video-extend", step["task_id"])
            assert snapshot.parent_video is not None, f"{step['name']} names its parent video"
            assert snapshot.parent_video.id == previous["video_id"], f"{step['name']} extends step {previous['index']}"
            assert snapshot.video is not None and snapshot.video.id == step["video_id"]
