"""Start images end to end: an s3:// image is read and sent inline; a presigned URL's signature never becomes a
stored parameter, and what Prefect stores of it is refused before any request. (The secrets scan,
tests/flows/test_secrets_scan.py, reads every flow run's stored parameters after real CLI runs.)"""

from __future__ import annotations

import hashlib
import json
import uuid
from pathlib import Path
from typing import Any

import boto3
import pytest

from flows.batch import produce_batch
from flows.video import produce_video
from kling_tasks.jobs import ExtensionSpec, GenerationSpec, PlanError, VideoJob, plan_job
from tests.kling_emulator.conftest import jpeg

pytestmark = [pytest.mark.anyio, pytest.mark.usefixtures("prefect_server", "kling_env")]

SIGNATURE = "5ca1ab1e" * 8
SIGNED = ("https://pictures.s3.amazonaws.com/kite.jpg?X-Amz-Algorithm=AWS4-HMAC-SHA256&X-Amz-Credential=AKIAX"
          f"&X-Amz-Date=20261202T000000Z&X-Amz-Expires=3600&X-Amz-SignedHeaders=host&X-Amz-Signature={SIGNATURE}")


def job_with(image: str, dest: str, extensions: int = 0) -> VideoJob:
    return VideoJob(generate=GenerationSpec(prompt="a kite takes off", image=image),
                    extensions=[ExtensionSpec(prompt=f"it climbs, part {i}") for i in range(1, extensions + 1)],
                    dest=dest, job_id=f"img-{uuid.uuid4().hex[:12]}")


async def test_an_s3_image_is_read_and_sent_inline_and_a_new_picture_is_a_new_task(
        s3_endpoint: str, emulator: Any, tmp_path: Path) -> None:
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="pictures")
    picture = jpeg((200, 40, 40))
    s3.put_object(Bucket="pictures", Key="in/kite.jpg", Body=picture)
    job = job_with("s3://pictures/in/kite.jpg", str(tmp_path / "out"), extensions=1)

    uri = await produce_video(job)

    tasks = list(emulator.stats()["tasks"].values())
    assert [task["kind"] for task in tasks] == ["image2video", "video-extend"]
    assert tasks[0]["image_sha256"] == hashlib.sha256(picture).hexdigest(), "the object's bytes were sent"
    manifest = json.loads((Path(uri).parent / "manifest.json").read_text())
    assert manifest["spec"]["generate"]["image"] == "s3://pictures/in/kite.jpg"
    # Another picture at the same key is other content: its plan has other ids, so the old task is never
    # adopted for it (the ids come from the bytes, not the key).
    s3.put_object(Bucket="pictures", Key="in/kite.jpg", Body=jpeg((40, 40, 200)))
    repainted = job_with("s3://pictures/in/kite.jpg", str(tmp_path / "other"))
    assert plan_job(repainted).steps[0].external_task_id.split("-s0-")[1] != \
        plan_job(job).steps[0].external_task_id.split("-s0-")[1]


async def test_a_stored_withheld_url_is_refused_before_any_request(emulator: Any, tmp_path: Path) -> None:
    from prefect.exceptions import ParameterTypeError

    job = job_with(SIGNED, str(tmp_path / "out"))
    stored = json.loads(job.model_dump_json())  # what Prefect keeps: a UI retry or another worker gets this
    assert SIGNATURE not in json.dumps(stored)
    with pytest.raises(ParameterTypeError, match="withheld from Prefect"):
        await produce_video(job=stored)
    assert emulator.stats()["requests"] == {}


async def test_a_batch_does_not_hand_a_signed_url_to_other_workers(emulator: Any, tmp_path: Path) -> None:
    job = job_with(SIGNED, str(tmp_path / "out"))
    with pytest.raises(PlanError, match="cannot be handed to another worker"):
        await produce_batch(jobs=[job], dest=str(tmp_path / "out"), via_deployment=True)
    assert emulator.stats()["requests"] == {}
