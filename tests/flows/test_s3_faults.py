"""A bucket that turns read-only mid-job: one clear line, the paid task kept, and a rerun stores it for free.

produce_video runs on the emulator and a real Prefect server, storing into moto's S3 server through the
S3 fault proxy (tests/kling_tasks/storage/s3_fault_proxy.py). When the store of the last step starts, the
bucket starts denying every s3:PutObject-family write (403 AccessDenied, as a bucket policy would).
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import boto3
import pytest

from flows.video import produce_video
from kling_tasks.jobs import ExtensionSpec, GenerationSpec, VideoJob, plan_job
from kling_tasks.storage import DestinationError
from tests.kling_tasks.storage.s3_fault_proxy import Fault, S3FaultProxy

pytestmark = [pytest.mark.anyio, pytest.mark.usefixtures("prefect_server", "kling_env")]
BUCKET = "read-only-videos"


@pytest.fixture
def proxy(s3_endpoint: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[S3FaultProxy]:
    boto3.client("s3").create_bucket(Bucket=BUCKET)
    server = S3FaultProxy(s3_endpoint)
    monkeypatch.setenv("AWS_ENDPOINT_URL", server.url)  # the pipeline's boto3 chain now goes through the proxy
    yield server
    server.close()


def moto(s3_endpoint: str) -> Any:
    return boto3.client("s3", endpoint_url=s3_endpoint)  # the bucket as it really is, around the proxy


async def test_a_bucket_turning_read_only_stops_the_job_and_a_rerun_stores_the_paid_step(
    proxy: S3FaultProxy, s3_endpoint: str, emulator: Any
) -> None:
    job = VideoJob(generate=GenerationSpec(prompt="a glass bottle on a beach"),
                   extensions=[ExtensionSpec(prompt="a wave carries it away")],
                   dest=f"s3://{BUCKET}/ro", job_id=f"ro-{uuid.uuid4().hex[:8]}")
    job_id = job.effective_job_id()
    step1 = f"ro/{job_id}/step-01.mp4"
    proxy.plan([Fault("PutObject", "read_only", key_contains=step1)])

    with pytest.raises(DestinationError) as err:
        await produce_video(job)
    # One line (what `kling-pipeline run` prints), naming the step's object and the bucket.
    assert str(err.value) == f"access denied to upload to s3://{BUCKET}/{step1} (AccessDenied)"
    assert err.value.retryable is False
    assert proxy.count("PutObject", "read_only") == 1, "a denied write is not retried"

    s3 = moto(s3_endpoint)
    manifest = json.loads(s3.get_object(Bucket=BUCKET, Key=f"ro/{job_id}/manifest.json")["Body"].read())
    first, second = manifest["steps"]
    assert first["status"] == "stored"
    assert second["status"] == "succeed" and second["task_id"], "the paid task must stay in the ledger"
    assert "Contents" not in s3.list_objects_v2(Bucket=BUCKET, Prefix=step1), "nothing stored for step 1"
    assert "Uploads" not in s3.list_multipart_uploads(Bucket=BUCKET)
    created = emulator.stats()["tasks_created"]
    assert created == {step.external_task_id: 1 for step in plan_job(job).steps}

    proxy.read_only = False  # the bucket policy is fixed; the same command again
    uri = await produce_video(job)

    assert uri == f"s3://{BUCKET}/ro/{job_id}/final.mp4"
    stats = emulator.stats()
    assert stats["tasks_created"] == created, "the rerun paid again"
    assert sum(stats["create_attempts"].values()) == len(created), "the rerun sent a create"
    head = s3.head_object(Bucket=BUCKET, Key=step1)
    assert head["Metadata"]["task_id"] == second["task_id"]
    manifest = json.loads(s3.get_object(Bucket=BUCKET, Key=f"ro/{job_id}/manifest.json")["Body"].read())
    assert manifest["status"] == "succeeded"
    assert [s["status"] for s in manifest["steps"]] == ["stored", "stored"]
    assert manifest["steps"][1]["sha256"] == head["Metadata"]["sha256"]
