"""An object already at the key is reused only when it is proven to be this task's.

S3 proves an object by its `task_id` metadata; a local folder keeps no metadata, so the caller proves a
file by the sha256 its ledger recorded (`reuse_sha256`). Anything else is downloaded again and replaced.
"""

from __future__ import annotations

import hashlib
from pathlib import Path
from typing import Any

import boto3
import pytest

from kling_tasks.storage import LocalSink, S3Sink

KEY = "job1/step-00.mp4"
META = {"job_id": "job1", "task_id": "t-new", "step": "0", "external_task_id": "kp-s0-0123456789abcdef"}


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def put_tagged(s3: Any, bucket: str, key: str, data: bytes, **metadata: str) -> None:
    """An object as a finished store leaves it: the caller's metadata plus sha256."""
    s3.put_object(Bucket=bucket, Key=key, Body=data, ContentType="video/mp4",
                  Metadata={"job_id": "job1", "step": "0", **metadata, "sha256": sha(data)})


# --- S3: proven by task_id -----------------------------------------------------------------------


def test_s3_head_reports_the_task_id_it_was_stored_for(bucket: str, s3: Any, source: Any) -> None:
    sink = S3Sink(bucket)
    stored = sink.store_from_url(source.add("/v", b"video"), KEY, metadata=META, allow_private=True)
    assert stored.task_id == "t-new" and sink.head(KEY) == stored
    assert s3.head_object(Bucket=bucket, Key=KEY)["Metadata"]["task_id"] == "t-new"
    final = sink.copy(KEY, "job1/final.mp4")  # server-side copy keeps the metadata, task_id included
    assert final.task_id == "t-new" and sink.head("job1/final.mp4") == final
    assert sink.write_bytes("job1/manifest.json", b"{}", "application/json").task_id is None
    manifest = sink.head("job1/manifest.json")
    assert manifest is not None and manifest.task_id is None


def test_s3_object_of_another_task_is_replaced(bucket: str, s3: Any, source: Any) -> None:
    put_tagged(s3, bucket, KEY, b"the old task's video", task_id="t-old")
    sink = S3Sink(bucket)
    url = source.add("/new.mp4", b"this task's video")
    stored = sink.store_from_url(url, KEY, metadata=META, allow_private=True)
    assert source.hits["/new.mp4"] == 1
    assert (stored.sha256, stored.task_id) == (sha(b"this task's video"), "t-new")
    assert s3.get_object(Bucket=bucket, Key=KEY)["Body"].read() == b"this task's video"
    assert sink.head(KEY) == stored


def test_s3_object_of_this_task_is_reused_with_zero_downloads(bucket: str, s3: Any, source: Any) -> None:
    put_tagged(s3, bucket, KEY, b"stored by an earlier run", task_id="t-new")
    sink = S3Sink(bucket)
    before = sink.head(KEY)
    url = source.add("/again.mp4", b"would be downloaded again")
    assert sink.store_from_url(url, KEY, metadata=META, allow_private=True) == before
    assert source.hits["/again.mp4"] == 0
    assert s3.get_object(Bucket=bucket, Key=KEY)["Body"].read() == b"stored by an earlier run"


@pytest.mark.parametrize(
    ("existing_meta", "call"),
    [
        pytest.param({}, {}, id="existing-without-task-id"),
        pytest.param({"task_id": "t-new"}, {"metadata": {"job_id": "job1"}}, id="caller-without-task-id"),
        pytest.param({"task_id": "t-new"}, {"reuse_sha256": "0" * 64}, id="other-sha256"),
        pytest.param({"task_id": "t-new"}, {"expected_size": 99}, id="other-size"),
    ],
)
def test_s3_object_not_proven_is_replaced(
    bucket: str, s3: Any, source: Any, existing_meta: dict[str, str], call: dict[str, Any]
) -> None:
    put_tagged(s3, bucket, KEY, b"unproven", **existing_meta)
    body = b"x" * call.get("expected_size", 40)
    kwargs: dict[str, Any] = {"metadata": META, **call}
    stored = S3Sink(bucket).store_from_url(source.add("/v", body), KEY, allow_private=True, **kwargs)
    assert source.hits["/v"] == 1 and stored.sha256 == sha(body)
    assert s3.get_object(Bucket=bucket, Key=KEY)["Body"].read() == body


# --- local folder: proven by the ledger's sha256 -------------------------------------------------


def test_local_file_with_another_sha256_is_replaced(tmp_path: Path, source: Any) -> None:
    sink = LocalSink(tmp_path)
    old = sink.write_bytes(KEY, b"the old task's video", "video/mp4")
    assert old.task_id is None and sink.head(KEY) == old  # a folder records no task
    url = source.add("/new.mp4", b"this task's video")
    stored = sink.store_from_url(url, KEY, metadata=META, allow_private=True, reuse_sha256=sha(b"another video"))
    assert source.hits["/new.mp4"] == 1
    assert (tmp_path / KEY).read_bytes() == b"this task's video" and stored.sha256 == sha(b"this task's video")


def test_local_file_is_never_reused_without_reuse_sha256(tmp_path: Path, source: Any) -> None:
    sink = LocalSink(tmp_path)
    sink.write_bytes(KEY, b"same bytes", "video/mp4")
    sink.store_from_url(source.add("/v", b"same bytes"), KEY, metadata=META, allow_private=True)
    assert source.hits["/v"] == 1  # the task_id in metadata proves nothing about a file


def test_local_file_with_reuse_sha256_is_reused_with_zero_downloads(tmp_path: Path, source: Any) -> None:
    sink = LocalSink(tmp_path)
    old = sink.write_bytes(KEY, b"stored by an earlier run", "video/mp4")
    url = source.add("/again.mp4", b"would be downloaded again")
    assert sink.store_from_url(url, KEY, metadata=META, allow_private=True, reuse_sha256=old.sha256) == old
    assert source.hits["/again.mp4"] == 0
    # ...but not when the size the caller expects is another one.
    sink.store_from_url(url, KEY, metadata=META, allow_private=True, reuse_sha256=old.sha256, expected_size=25)
    assert source.hits["/again.mp4"] == 1 and (tmp_path / KEY).read_bytes() == b"would be downloaded again"


# --- S3: a multipart object carries its sha256 as a tag; without it (a crash before tagging), it is unproven ----


def multipart_like(s3: Any, bucket: str, data: bytes, tag: str | None, **extra: str) -> None:
    """A completed multipart object: the caller's metadata from its creation, the sha256 (if any) as a tag."""
    s3.put_object(Bucket=bucket, Key=KEY, Body=data, ContentType="video/mp4",
                  Metadata={"job_id": "job1", "step": "0", "task_id": "t-new", **extra})
    if tag is not None:
        s3.put_object_tagging(Bucket=bucket, Key=KEY, Tagging={"TagSet": [{"Key": "sha256", "Value": tag}]})


def test_s3_object_of_this_task_proven_by_its_sha256_tag_is_reused(bucket: str, s3: Any, source: Any) -> None:
    multipart_like(s3, bucket, b"stored in parts by an earlier run", tag=sha(b"stored in parts by an earlier run"))
    sink = S3Sink(bucket)
    before = sink.head(KEY)
    assert before is not None and (before.sha256, before.task_id) == (sha(b"stored in parts by an earlier run"),
                                                                     "t-new")
    url = source.add("/again.mp4", b"would be downloaded again")
    assert sink.store_from_url(url, KEY, metadata=META, allow_private=True, reuse_sha256=before.sha256) == before
    assert source.hits["/again.mp4"] == 0
    assert sink.copy(KEY, "job1/final.mp4") == sink.head("job1/final.mp4")  # the copy keeps the tag


@pytest.mark.parametrize("tag", [None, "not-a-sha256"], ids=["crash-before-tagging", "garbage-tag"])
def test_s3_object_of_this_task_without_a_sha256_is_stored_again(
    bucket: str, s3: Any, source: Any, tag: str | None
) -> None:
    multipart_like(s3, bucket, b"completed, never tagged", tag=tag)
    sink = S3Sink(bucket)
    assert sink.head(KEY) is None
    stored = sink.store_from_url(source.add("/v", b"this task's video"), KEY, metadata=META, allow_private=True)
    assert source.hits["/v"] == 1 and sink.head(KEY) == stored
    assert s3.get_object(Bucket=bucket, Key=KEY)["Body"].read() == b"this task's video"


def test_s3_head_reads_the_tag_of_the_version_it_saw(bucket: str, s3: Any) -> None:
    s3.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    multipart_like(s3, bucket, b"version one", tag=sha(b"version one"))
    calls: list[dict[str, Any]] = []
    client = boto3.client("s3")
    client.meta.events.register("provide-client-params.s3.GetObjectTagging", lambda params, **_: calls.append(params))
    got = S3Sink(bucket, client=client).head(KEY)
    assert got is not None and got.sha256 == sha(b"version one")
    assert calls and calls[0].get("VersionId"), calls
