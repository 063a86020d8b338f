"""S3 that refuses, stalls or cuts a part upload, a complete, a put, a tag: the store retries or aborts, never
half-visible and never half-proven.

Every test stores through `S3FaultProxy` (a real HTTP server) in front of moto's real S3 server, with a
client whose read timeout is short so a stall is seen as one. Afterwards the bucket is read directly
from moto: the object is either whole (bytes, task_id in its metadata, sha256 in its metadata or, for a
multipart object, as its `sha256` tag) or absent, and no multipart upload is left open.

The default suite runs one case of each fault kind (15 tests, ~30-45 s); the whole matrix, every kind on
every operation (31 tests, ~100 s on a busy 2-core machine):

    KLING_S3_FAULTS_FULL=1 .venv/bin/pytest -q -n 0 tests/kling_tasks/storage/test_s3_faults.py
"""

from __future__ import annotations

import hashlib
import logging
import os
import random
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import boto3
import pytest
from botocore.config import Config
from botocore.exceptions import ClientError

from kling_tasks.storage import PART_SIZE, DestinationError, S3Sink

from .s3_fault_proxy import Fault, S3FaultProxy

KEY = "job1/step-01.mp4"
FULL = f"videos/{KEY}"
META = {"job_id": "job1", "task_id": "t-fault", "step": "1"}
BIG = random.Random(11).randbytes(PART_SIZE + 1024 * 1024)  # two parts: 5 + 1 MiB
SMALL = random.Random(12).randbytes(64 * 1024)  # one PutObject
READ_TIMEOUT = 2.0  # the proxy stalls for STALL seconds: past this, and boto3 gives up on the attempt
STALL = 6.0
MULTIPART_OPS = ("UploadPart", "CompleteMultipartUpload", "PutObjectTagging")


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


@pytest.fixture
def proxy(moto_endpoint: str, aws_env: str) -> Iterator[S3FaultProxy]:
    server = S3FaultProxy(moto_endpoint, stall_seconds=STALL)
    yield server
    server.close()


@pytest.fixture
def sink_via(proxy: S3FaultProxy, bucket: str) -> Callable[..., S3Sink]:
    def make(attempts: int = 3) -> S3Sink:
        client = boto3.session.Session().client("s3", endpoint_url=proxy.url, config=Config(
            signature_version="s3v4", connect_timeout=2, read_timeout=READ_TIMEOUT,
            retries={"mode": "standard", "max_attempts": attempts}))
        return S3Sink(bucket, "videos", client=client)

    return make


def open_uploads(s3: Any, bucket: str) -> list[Any]:
    return list(s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []))


def assert_whole(s3: Any, bucket: str, data: bytes, sha256_in: str | None = None) -> None:
    """Whole and proven: the sha256 in the metadata (one PutObject, or the copy of a store that refuses tags)
    or as the `sha256` tag (a multipart object), never both, never neither."""
    sha256_in = sha256_in or ("metadata" if len(data) < PART_SIZE else "tag")
    head = s3.head_object(Bucket=bucket, Key=FULL)
    tags = {t["Key"]: t["Value"] for t in s3.get_object_tagging(Bucket=bucket, Key=FULL)["TagSet"]}
    if sha256_in == "metadata":
        assert (head["Metadata"], tags) == ({**META, "sha256": sha(data)}, {})
    else:
        assert (head["Metadata"], tags) == (META, {"sha256": sha(data)})
    assert sha(s3.get_object(Bucket=bucket, Key=FULL)["Body"].read()) == sha(data)
    assert open_uploads(s3, bucket) == []


def assert_absent(s3: Any, bucket: str) -> None:
    with pytest.raises(ClientError) as err:
        s3.head_object(Bucket=bucket, Key=FULL)
    assert err.value.response["ResponseMetadata"]["HTTPStatusCode"] == 404
    assert open_uploads(s3, bucket) == []


# The default suite runs one case of each fault kind; KLING_S3_FAULTS_FULL=1 runs every kind on every operation
# (the matrix docs/reliability.md reports). cut_response: the operation happened at S3 and its answer was lost;
# a complete retried after it succeeded is answered 200 again (moto, like S3), so even that one ends whole.
FULL_MATRIX = pytest.mark.skipif(not os.environ.get("KLING_S3_FAULTS_FULL"), reason="set KLING_S3_FAULTS_FULL=1")
DEFAULT_ONCE = {("UploadPart", "refuse-503"), ("UploadPart", "cut"), ("UploadPart", "stall"),
                ("CompleteMultipartUpload", "cut_response"), ("CompleteMultipartUpload", "stall"), ("PutObject", "cut"),
                ("PutObjectTagging", "cut_response")}
ALL_ONCE = [*((op, kind) for op in (*MULTIPART_OPS, "PutObject") for kind in ("refuse-503", "stall", "cut")),
            ("UploadPart", "refuse-500"), ("UploadPart", "cut_response"), ("CompleteMultipartUpload", "cut_response"),
            ("PutObject", "cut_response"), ("PutObjectTagging", "cut_response")]
ONCE = [pytest.param(op, kind, marks=() if (op, kind) in DEFAULT_ONCE else FULL_MATRIX) for op, kind in ALL_ONCE]


@pytest.mark.parametrize(("operation", "kind"), ONCE)
def test_one_fault_is_retried_and_the_object_is_whole(
    proxy: S3FaultProxy, sink_via: Any, s3: Any, bucket: str, source: Any, operation: str, kind: str
) -> None:
    data = SMALL if operation == "PutObject" else BIG
    name, _, status = kind.partition("-")
    proxy.plan([Fault(operation, name, times=1, status=int(status or 503))])
    stored = sink_via().store_from_url(source.add("/v.mp4", data), KEY, metadata=META, allow_private=True)
    assert (stored.size, stored.sha256, stored.task_id) == (len(data), sha(data), "t-fault")
    assert_whole(s3, bucket, data)
    assert proxy.count(operation, name) == 1, proxy.log
    assert proxy.count(operation, "forwarded") >= 1, "the faulted request was not retried"
    assert source.hits["/v.mp4"] == 1, "the retry was boto3's, inside the store: the video was downloaded once"


@pytest.mark.parametrize(("operation", "kind"), [
    ("UploadPart", "refuse"), pytest.param("UploadPart", "stall", marks=FULL_MATRIX),
    pytest.param("CompleteMultipartUpload", "refuse", marks=FULL_MATRIX),
    pytest.param("PutObject", "cut", marks=FULL_MATRIX),
    ("PutObjectTagging", "refuse"),  # the tag that adds the sha256 to a completed multipart object
    ("PutObjectTagging", "cut_response"),  # tagged at S3 every time, every answer lost: unknown, so deleted
    pytest.param("PutObjectTagging", "stall", marks=FULL_MATRIX),
])
def test_a_fault_that_persists_aborts_and_leaves_nothing(
    proxy: S3FaultProxy, sink_via: Any, s3: Any, bucket: str, source: Any, operation: str, kind: str
) -> None:
    data = SMALL if operation == "PutObject" else BIG
    proxy.plan([Fault(operation, kind, times=None)])
    with pytest.raises(DestinationError) as err:  # two attempts per request: boto3's backoff is seconds
        sink_via(attempts=2).store_from_url(source.add("/v.mp4", data), KEY, metadata=META, allow_private=True)
    message = str(err.value)
    assert err.value.retryable is True, message  # Prefect's store retries get their turn
    assert "\n" not in message and f"s3://{bucket}/{FULL}" in message, message
    assert proxy.count(operation, kind) >= 2, "boto3 did not retry before giving up"
    assert_absent(s3, bucket)


def test_a_bucket_turning_read_only_mid_upload_is_a_clear_final_error(
    proxy: S3FaultProxy, sink_via: Any, s3: Any, bucket: str, source: Any
) -> None:
    # The multipart upload is created, then the bucket's policy starts denying s3:PutObject (every part).
    proxy.plan([Fault("UploadPart", "read_only")])
    with pytest.raises(DestinationError) as err:
        sink_via().store_from_url(source.add("/v.mp4", BIG), KEY, metadata=META, allow_private=True)
    assert str(err.value) == f"access denied to upload to s3://{bucket}/{FULL} (AccessDenied)"
    assert err.value.retryable is False  # retrying a denied write cannot help: the job stops
    assert proxy.count("CreateMultipartUpload", "forwarded") == 1
    assert proxy.count("AbortMultipartUpload", "forwarded") >= 1, "the open upload was not aborted"
    assert_absent(s3, bucket)


def test_the_object_is_invisible_until_complete_and_unproven_until_tagged(
    proxy: S3FaultProxy, sink_via: Any, s3: Any, bucket: str, source: Any
) -> None:
    proxy.plan([Fault("CompleteMultipartUpload", "stall"), Fault("PutObjectTagging", "stall")])
    sink = sink_via()
    results: list[Any] = []
    worker = threading.Thread(target=lambda: results.append(
        sink.store_from_url(source.add("/v.mp4", BIG), KEY, metadata=META, allow_private=True)))
    worker.start()
    try:
        wait_for(lambda: proxy.count("CompleteMultipartUpload", "stall") == 1, worker)
        (upload,) = open_uploads(s3, bucket)  # every part is up, the complete hangs: nothing to read yet
        assert len(s3.list_parts(Bucket=bucket, Key=FULL, UploadId=upload["UploadId"])["Parts"]) == 2
        with pytest.raises(ClientError):
            s3.head_object(Bucket=bucket, Key=FULL)
        wait_for(lambda: proxy.count("PutObjectTagging", "stall") == 1, worker)
        # Complete: whole under its key, its task_id in its metadata, but without its sha256 the sink does not
        # count it as stored (a crash now leaves it unproven: the next store of this task uploads it again).
        head = s3.head_object(Bucket=bucket, Key=FULL)
        assert (head["ContentLength"], head["Metadata"]) == (len(BIG), META)
        assert sink.head(KEY) is None
    finally:
        worker.join(60)
    assert results and results[0].sha256 == sha(BIG)
    assert_whole(s3, bucket, BIG)


def wait_for(condition: Callable[[], bool], worker: threading.Thread, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert worker.is_alive() and time.monotonic() < deadline, "the store ended before the fault point"
        time.sleep(0.02)


def test_a_failed_upload_stops_a_download_that_is_still_writing(
    proxy: S3FaultProxy, sink_via: Any, s3: Any, bucket: str, source: Any
) -> None:
    # Far more than the pipe and the parts in memory hold: once the parts are refused for good, the download
    # is blocked on a full pipe and must be woken and stopped, not left waiting for a reader that is gone.
    data = random.Random(13).randbytes(12 * PART_SIZE)
    proxy.plan([Fault("UploadPart", "refuse", times=None)])
    errors: list[BaseException] = []

    def store() -> None:
        try:
            sink_via(attempts=2).store_from_url(source.add("/v.mp4", data), KEY, metadata=META, allow_private=True)
        except BaseException as exc:
            errors.append(exc)

    worker = threading.Thread(target=store)
    worker.start()
    worker.join(120)
    assert not worker.is_alive(), "the store hung after its upload failed"
    assert len(errors) == 1 and isinstance(errors[0], DestinationError) and errors[0].retryable, errors
    assert "SlowDown" in str(errors[0]), "the part's own refusal is the error reported"
    assert source.sent["/v.mp4"] < len(data), "the whole video was downloaded for an upload that had failed"
    assert_absent(s3, bucket)


# --- a store that does not do object tags: the sha256 goes into the metadata by a copy, decided once per sink ---


@pytest.mark.parametrize("refusal", [Fault("PutObjectTagging", "refuse", times=None, status=501),  # NotImplemented
                                     pytest.param(Fault("PutObjectTagging", "deny", times=None),
                                                  marks=FULL_MATRIX),  # a policy: AccessDenied
                                     pytest.param(Fault("PutObjectTagging", "refuse", times=None, status=405),
                                                  marks=FULL_MATRIX)])  # MethodNotAllowed
def test_a_store_refusing_tags_gets_the_sha256_by_a_copy_decided_once_per_destination(
    proxy: S3FaultProxy, sink_via: Any, s3: Any, bucket: str, source: Any, refusal: Fault,
    caplog: pytest.LogCaptureFixture
) -> None:
    proxy.plan([refusal])
    sink = sink_via()
    with caplog.at_level(logging.WARNING, logger="kling_tasks.storage.s3"):
        first = sink.store_from_url(source.add("/v.mp4", BIG), KEY, metadata=META, allow_private=True)
        assert_whole(s3, bucket, BIG, sha256_in="metadata")
        assert sink.head(KEY) == first and first.sha256 == sha(BIG)
        again = {**META, "task_id": "t-fault-2"}  # another task's video at the key: stored again
        later = sink_via()  # the flows open a sink per step: the destination's refusal is remembered
        second = later.store_from_url(source.add("/w.mp4", BIG[::-1]), KEY, metadata=again, allow_private=True)
    assert (second.sha256, second.task_id) == (sha(BIG[::-1]), "t-fault-2") and later.head(KEY) == second
    assert proxy.count("PutObjectTagging") == 1, "the refusal was not remembered: every store asked again"
    assert proxy.count("CopyObject", "forwarded") == 2
    assert proxy.count("GetObjectTagging") == 0, "the metadata had the sha256: no tag to read"
    warnings = [r.getMessage() for r in caplog.records if "refuses object tags" in r.getMessage()]
    assert len(warnings) == 1 and f"s3://{bucket}" in warnings[0], caplog.records


def test_a_refused_tag_and_a_failed_copy_leave_nothing(
    proxy: S3FaultProxy, sink_via: Any, s3: Any, bucket: str, source: Any
) -> None:
    proxy.plan([Fault("PutObjectTagging", "refuse", times=None, status=501), Fault("CopyObject", "refuse", times=None)])
    with pytest.raises(DestinationError) as err:
        sink_via(attempts=1).store_from_url(source.add("/v.mp4", BIG), KEY, metadata=META, allow_private=True)
    assert err.value.retryable is True and f"s3://{bucket}/{FULL}" in str(err.value), str(err.value)
    assert proxy.count("CopyObject", "refuse") >= 1
    assert_absent(s3, bucket)


def test_a_destination_that_cannot_read_tags_back_is_found_before_the_first_store(
    proxy: S3FaultProxy, sink_via: Any, s3: Any, bucket: str, source: Any
) -> None:
    # A policy with s3:PutObjectTagging but not s3:GetObjectTagging: tagged objects could never be proven, and
    # the job's final copy (which reads the last step's sha256) would fail. The preflight probe finds it.
    proxy.plan([Fault("GetObjectTagging", "deny", times=None)])
    sink = sink_via()
    sink.check_reachable()
    assert sink.tagging_refused
    assert sink.store_from_url(source.add("/v.mp4", BIG), KEY, metadata=META, allow_private=True).sha256 == sha(BIG)
    assert proxy.count("PutObjectTagging") == 1, "only the probe's: the store copied at once"
    assert_whole(s3, bucket, BIG, sha256_in="metadata")
    assert sink.copy(KEY, "job1/final.mp4").sha256 == sha(BIG)
