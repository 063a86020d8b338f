"""S3 sink details the shared sink tests do not pin: link lifetimes, retryable unreachability, copies over."""

from __future__ import annotations

import os
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import boto3
import pytest
from botocore.config import Config

from kling_tasks.storage import DestinationError, S3Sink
from kling_tasks.storage.base import PRESIGN_MAX_SECONDS


@pytest.mark.parametrize(("asked", "lives"), [(600, 600), (PRESIGN_MAX_SECONDS, PRESIGN_MAX_SECONDS),
                                              (30 * 24 * 3600, PRESIGN_MAX_SECONDS)])
def test_a_link_lives_as_long_as_asked_within_sigv4s_week(bucket: str, asked: int, lives: int) -> None:
    link = S3Sink(bucket, "videos").link("job1/final.mp4", expires_seconds=asked)
    assert parse_qs(urlsplit(link).query)["X-Amz-Expires"] == [str(lives)]


def test_an_unreachable_endpoint_is_a_retryable_destination_error(isolated_aws: None) -> None:
    """A store that cannot reach S3 may pass: Prefect's store retries must see it as retryable."""
    client = boto3.session.Session(aws_access_key_id="testing", aws_secret_access_key="testing").client(
        "s3", endpoint_url="http://127.0.0.1:9", region_name="us-east-1",
        config=Config(retries={"max_attempts": 1}, connect_timeout=1))
    with pytest.raises(DestinationError, match="cannot reach S3 endpoint") as info:
        S3Sink("bucket", "videos", client=client).write_bytes("job1/manifest.json", b"{}", "application/json")
    assert info.value.retryable is True


def test_a_copy_over_another_video_replaces_it(bucket: str) -> None:
    """final.mp4 of an earlier, shorter plan must become the new last step's video."""
    sink = S3Sink(bucket, "videos")
    sink.write_bytes("job1/final.mp4", b"the old final video", "video/mp4")
    step = sink.write_bytes("job1/step-02.mp4", b"the new last step", "video/mp4")
    final = sink.copy("job1/step-02.mp4", "job1/final.mp4")
    assert final.sha256 == step.sha256
    assert sink.read_bytes("job1/final.mp4") == b"the new last step"


def test_a_copy_of_a_multipart_video_reads_back_through_boto3s_checksum_check(bucket: str, tmp_path: Path) -> None:
    """A multipart object's checksum is a composite of its parts'; a copy given that value as the whole
    object's (moto carries it over) made every checked GET of final.mp4 or a one-clip stitch fail."""
    video = tmp_path / "step.mp4"
    video.write_bytes(os.urandom(12 * 1024 * 1024))  # over one 5 MiB part: a multipart upload
    sink = S3Sink(bucket, "videos")
    sink.store_file(video, "job1/step-01.mp4", metadata={"task_id": "task-1"})
    sink.copy("job1/step-01.mp4", "job1/final.mp4")
    body = boto3.client("s3").get_object(Bucket=bucket, Key="videos/job1/final.mp4", ChecksumMode="ENABLED")["Body"]
    assert body.read() == video.read_bytes()
