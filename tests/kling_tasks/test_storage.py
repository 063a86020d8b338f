from __future__ import annotations

import hashlib
import os
import random
import socket
import time
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest

from kling_tasks.storage import (
    DestinationError,
    DownloadError,
    LocalSink,
    S3Sink,
    Sink,
    StoredObject,
    UnsafeURLError,
    check_download_url,
    open_sink,
)

META = {"job_id": "job1", "task_id": "t-123", "step": "0"}
KEY = "job1/step-00.mp4"


def body_of(size: int, seed: int = 7) -> bytes:
    return random.Random(seed).randbytes(size)


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def leftovers(sink: Sink, s3: Any | None = None) -> list[str]:
    """Everything a failed store could have left behind: files (temp ones too), objects, open uploads."""
    if isinstance(sink, LocalSink):
        return [str(p) for p in sink.root.rglob("*") if p.is_file()] if sink.root.exists() else []
    assert isinstance(sink, S3Sink) and s3 is not None
    objects = s3.list_objects_v2(Bucket=sink.bucket).get("Contents", [])
    uploads = s3.list_multipart_uploads(Bucket=sink.bucket).get("Uploads", [])
    return [o["Key"] for o in objects] + [f"upload:{u['Key']}" for u in uploads]


def s3_client_if(sink: Sink, request: pytest.FixtureRequest) -> Any | None:
    return request.getfixturevalue("s3") if isinstance(sink, S3Sink) else None


# --- store, head, idempotency -------------------------------------------------------------------


def test_store_then_head_and_a_proven_second_store_is_a_no_op(sink: Sink, source: Any) -> None:
    data = body_of(300_000)
    url = source.add("/v.mp4", data)
    stored = sink.store_from_url(url, KEY, metadata=META, allow_private=True)
    assert (stored.size, stored.sha256, stored.key) == (len(data), sha(data), KEY)
    assert stored.uri.endswith("/videos/job1/step-00.mp4" if isinstance(sink, S3Sink) else "/out/job1/step-00.mp4")
    assert stored.task_id == ("t-123" if isinstance(sink, S3Sink) else None)
    assert sink.head(KEY) == stored
    # The proof of "this task's object": S3 reads the task_id back; a folder needs the ledger's sha256.
    proof = {} if isinstance(sink, S3Sink) else {"reuse_sha256": stored.sha256}
    again = sink.store_from_url(url, KEY, metadata=META, allow_private=True, **proof)
    assert again == stored
    assert source.hits["/v.mp4"] == 1  # the second call downloaded nothing
    assert sink.read_bytes(KEY) == data


def test_head_of_missing_key_is_none(sink: Sink) -> None:
    assert sink.head("nope/step-00.mp4") is None
    assert sink.read_bytes("nope/manifest.json") is None


def test_empty_body_is_stored(sink: Sink, source: Any) -> None:
    stored = sink.store_from_url(source.add("/e", b""), KEY, metadata=META, allow_private=True)
    assert (stored.size, stored.sha256) == (0, sha(b""))
    assert sink.read_bytes(KEY) == b"" and sink.head(KEY) == stored


def test_multipart_upload_of_12_mib_in_three_parts(bucket: str, s3: Any, source: Any) -> None:
    data = body_of(12 * 1024 * 1024)
    url = source.add("/big.mp4", data)
    client = boto3.client("s3")
    calls: list[str] = []
    client.meta.events.register("before-call.s3.*", lambda model, **_: calls.append(model.name))
    sink = S3Sink(bucket, "videos", client=client)
    started = time.perf_counter()
    stored = sink.store_from_url(url, KEY, metadata=META, expected_size=len(data), allow_private=True)
    elapsed = time.perf_counter() - started
    print(f"12 MiB multipart store: {elapsed:.2f} s")
    assert calls.count("UploadPart") == 3 and "PutObject" not in calls  # 5 + 5 + 2 MiB
    assert stored.sha256 == sha(data) and stored.size == len(data)
    head = s3.head_object(Bucket=bucket, Key="videos/" + KEY)
    assert head["ContentLength"] == len(data)
    assert head["ContentType"] == "video/mp4"
    # task_id & co. in the metadata from the start; the sha256, known only at the end, as the object's tag
    assert head["Metadata"] == META and "CopyObject" not in calls
    tags = s3.get_object_tagging(Bucket=bucket, Key="videos/" + KEY)["TagSet"]
    assert tags == [{"Key": "sha256", "Value": sha(data)}] and sink.head(KEY) == stored
    assert sha(s3.get_object(Bucket=bucket, Key="videos/" + KEY)["Body"].read()) == sha(data)
    assert s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []


def test_small_body_is_one_put_object(bucket: str, s3: Any, source: Any) -> None:
    client = boto3.client("s3")
    calls: list[str] = []
    client.meta.events.register("before-call.s3.*", lambda model, **_: calls.append(model.name))
    S3Sink(bucket, client=client).store_from_url(source.add("/s", b"x" * 1000), KEY, metadata=META, allow_private=True)
    assert "PutObject" in calls and "CreateMultipartUpload" not in calls
    assert s3.head_object(Bucket=bucket, Key=KEY)["Metadata"]["sha256"] == sha(b"x" * 1000)


def test_foreign_s3_object_without_sha256_is_not_trusted(bucket: str, s3: Any, source: Any) -> None:
    s3.put_object(Bucket=bucket, Key=KEY, Body=b"half")  # e.g. written by hand, no sha256 metadata
    sink = S3Sink(bucket)
    assert sink.head(KEY) is None
    stored = sink.store_from_url(source.add("/v", b"whole"), KEY, metadata=META, allow_private=True)
    assert stored.sha256 == sha(b"whole") and sink.read_bytes(KEY) == b"whole"


# --- failures leave nothing behind ---------------------------------------------------------------


def test_cut_off_download_is_retryable_and_leaves_nothing(
    sink: Sink, source: Any, request: pytest.FixtureRequest
) -> None:
    # 12 MiB announced, 6 MiB sent: on S3 one 5 MiB part is already uploaded when the transfer breaks.
    url = source.add("/cut.mp4", body_of(12 * 1024 * 1024), mode="cut")
    with pytest.raises(DownloadError) as err:
        sink.store_from_url(url, KEY, metadata=META, allow_private=True)
    assert err.value.retryable is True
    assert sink.head(KEY) is None
    assert leftovers(sink, s3_client_if(sink, request)) == []


@pytest.mark.parametrize(("status", "retryable"), [(404, False), (410, False), (403, False), (503, True)])
def test_http_status_errors(
    sink: Sink, source: Any, request: pytest.FixtureRequest, status: int, retryable: bool
) -> None:
    url = source.add("/x", b"error page", status=status)
    with pytest.raises(DownloadError) as err:
        sink.store_from_url(url, KEY, metadata=META, allow_private=True)
    assert (err.value.retryable, err.value.status) == (retryable, status)
    assert f"HTTP {status}" in str(err.value)
    assert leftovers(sink, s3_client_if(sink, request)) == []


def test_length_mismatch_with_expected_size(sink: Sink, source: Any, request: pytest.FixtureRequest) -> None:
    url = source.add("/v", b"a" * 1000)
    with pytest.raises(DownloadError, match="expected 999") as err:
        sink.store_from_url(url, KEY, metadata=META, expected_size=999, allow_private=True)
    assert err.value.retryable is False  # the server insists on another size: retrying will not help
    # Without a Content-Length a short body looks cut off: worth another try.
    url = source.add("/short", b"a" * 1000, mode="nolength")
    with pytest.raises(DownloadError, match="got 1000 bytes, expected 2000") as err:
        sink.store_from_url(url, KEY, metadata=META, expected_size=2000, allow_private=True)
    assert err.value.retryable is True
    assert leftovers(sink, s3_client_if(sink, request)) == []


def test_no_content_length_is_accepted(sink: Sink, source: Any) -> None:
    stored = sink.store_from_url(source.add("/n", b"b" * 5000, mode="nolength"), KEY, metadata=META, allow_private=True)
    assert (stored.size, stored.sha256) == (5000, sha(b"b" * 5000)) and sink.read_bytes(KEY) == b"b" * 5000


def test_connection_refused_is_retryable(sink: Sink) -> None:
    with socket.socket() as s:  # a port that nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(DownloadError) as err:
        sink.store_from_url(f"http://127.0.0.1:{port}/v", KEY, metadata=META, allow_private=True)
    assert err.value.retryable is True


def test_redirects_are_followed(sink: Sink, source: Any) -> None:
    source.add("/real", b"payload")
    url = source.add("/r", mode="redirect", location="/real")
    assert sink.store_from_url(url, KEY, metadata=META, allow_private=True).sha256 == sha(b"payload")


# --- URL safety ----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "url",
    [
        "http://127.0.0.1/v",
        "http://localhost/v",
        "http://169.254.169.254/latest/meta-data/",
        "http://10.1.2.3/v",
        "http://[::1]/v",
        "http://[::ffff:192.168.0.1]/v",
        "http://100.100.100.200/v",
        "http://0.0.0.0/v",
    ],
)
def test_private_hosts_are_refused(url: str) -> None:
    with pytest.raises(UnsafeURLError, match="refusing download from host") as err:
        check_download_url(url, allow_private=False)
    assert httpx.URL(url).host in str(err.value)
    check_download_url(url, allow_private=True)  # the emulator/test switch


@pytest.mark.parametrize("url", ["file:///etc/passwd", "ftp://example.com/v.mp4", "gopher://x/", "/local/path"])
def test_non_http_schemes_are_refused_even_when_private_allowed(url: str) -> None:
    with pytest.raises(UnsafeURLError, match="not http"):
        check_download_url(url, allow_private=True)


def fake_dns(monkeypatch: pytest.MonkeyPatch, table: dict[str, list[str]]) -> None:
    def getaddrinfo(host: str, port: Any, *args: Any, **kwargs: Any) -> list[Any]:
        return [(socket.AF_INET, socket.SOCK_STREAM, 6, "", (ip, port)) for ip in table[host]]

    monkeypatch.setattr(socket, "getaddrinfo", getaddrinfo)


def test_host_names_are_resolved_and_any_private_address_refuses(monkeypatch: pytest.MonkeyPatch) -> None:
    fake_dns(monkeypatch, {"cdn.example": ["93.184.215.14"], "mixed.example": ["93.184.215.14", "10.0.0.5"]})
    check_download_url("https://cdn.example/v.mp4", allow_private=False)
    with pytest.raises(UnsafeURLError, match=r"mixed\.example.*10\.0\.0\.5"):
        check_download_url("https://mixed.example/v.mp4", allow_private=False)


def test_store_refuses_private_url_before_any_request(sink: Sink, source: Any) -> None:
    url = source.add("/v", b"data")
    with pytest.raises(UnsafeURLError, match=r"127\.0\.0\.1") as err:
        sink.store_from_url(url, KEY, metadata=META)
    assert err.value.retryable is False and source.hits["/v"] == 0


def test_redirect_to_metadata_address_is_refused(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fake_dns(monkeypatch, {"cdn.example": ["93.184.215.14"]})
    seen: list[str] = []

    def handler(req: httpx.Request) -> httpx.Response:
        seen.append(str(req.url))
        return httpx.Response(302, headers={"Location": "http://169.254.169.254/latest/meta-data/"})

    with httpx.Client(transport=httpx.MockTransport(handler)) as http, pytest.raises(UnsafeURLError):
        LocalSink(tmp_path).store_from_url("https://cdn.example/v.mp4", KEY, metadata=META, http=http)
    assert seen == ["https://cdn.example/v.mp4"]


# --- reachability, secrets -----------------------------------------------------------------------


def test_check_reachable_ok_and_leaves_no_probe(sink: Sink, request: pytest.FixtureRequest) -> None:
    sink.check_reachable()
    # Not head(): it ignores objects without sha256 (the S3 probe has none) and never sees a temp file.
    assert leftovers(sink, s3_client_if(sink, request)) == []


def test_missing_bucket(aws_env: str) -> None:
    secret = os.environ["AWS_SECRET_ACCESS_KEY"]
    sink = open_sink("s3://no-such-bucket-here/videos")
    with pytest.raises(DestinationError, match="bucket no-such-bucket-here does not exist") as err:
        sink.check_reachable()
    assert secret not in str(err.value) and err.value.__cause__ is None
    assert secret not in repr(sink) and repr(sink) == "S3Sink('s3://no-such-bucket-here/videos')"


def test_no_credentials(no_aws_credentials: None) -> None:
    with pytest.raises(DestinationError, match="no usable AWS credentials"):
        open_sink("s3://some-bucket").check_reachable()


def test_unwritable_folder(tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(DestinationError, match=r"local folder .*a-file/out is not writable"):
        LocalSink(blocker / "out").check_reachable()


def test_job_folder_that_is_a_file_refuses_writes_for_root_too(tmp_path: Path, source: Any) -> None:
    # Permission bits do not stop root; a file where the job's folder should be stops everyone.
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "job1").write_text("a file, not a folder")
    sink = LocalSink(tmp_path / "out")
    with pytest.raises(DestinationError, match=r"cannot write under .*/out/job1"):
        sink.write_bytes("job1/manifest.json", b"{}", "application/json")
    with pytest.raises(DestinationError, match=r"cannot write under .*/out/job1"):
        sink.store_from_url(source.add("/v", b"video"), KEY, metadata=META, allow_private=True)
    assert source.hits["/v"] == 0  # refused before downloading anything
    assert (tmp_path / "out" / "job1").read_text() == "a file, not a folder"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["job1"]


@pytest.mark.skipif(not Path("/sys/kernel").is_dir(), reason="needs Linux sysfs")
def test_folder_that_refuses_new_files_is_not_writable_for_root_too() -> None:
    # sysfs creates no files on request, whoever asks (root included): a read-only folder for everyone.
    sink = LocalSink("/sys/kernel")
    with pytest.raises(DestinationError, match=r"local folder /sys/kernel is not writable"):
        sink.check_reachable()
    with pytest.raises(DestinationError, match=r"cannot write under /sys/kernel"):
        sink.write_bytes("job1/manifest.json", b"{}", "application/json")


# --- small objects, copy, link -------------------------------------------------------------------


def test_write_read_bytes(sink: Sink) -> None:
    obj = sink.write_bytes("job1/manifest.json", b'{"a": 1}', "application/json")
    assert obj == StoredObject(uri=obj.uri, size=8, sha256=sha(b'{"a": 1}'), key="job1/manifest.json")
    assert obj.uri.endswith("/job1/manifest.json") and obj.task_id is None
    assert sink.read_bytes("job1/manifest.json") == b'{"a": 1}'
    sink.write_bytes("job1/manifest.json", b"{}", "application/json")
    assert sink.read_bytes("job1/manifest.json") == b"{}"
    assert sink.head("job1/manifest.json") == obj.model_copy(update={"size": 2, "sha256": sha(b"{}")})


def test_copy_and_link(sink: Sink, source: Any) -> None:
    data = body_of(200_000)
    step = sink.store_from_url(source.add("/v", data), "job1/step-02.mp4", metadata=META, allow_private=True)
    final = sink.copy("job1/step-02.mp4", "job1/final.mp4")
    assert (final.key, final.size, final.sha256) == ("job1/final.mp4", step.size, step.sha256)
    assert sink.head("job1/final.mp4") == final
    assert sink.copy("job1/step-02.mp4", "job1/final.mp4") == final  # idempotent
    link = sink.link("job1/final.mp4", expires_seconds=3600)
    if isinstance(sink, S3Sink):
        assert "X-Amz-Expires=3600" in link  # SigV4, with the lifetime asked for
        assert httpx.get(link).content == data
    else:
        assert Path(link).is_absolute() and Path(link).read_bytes() == data
    assert source.hits["/v"] == 1


def test_copy_of_missing_source(sink: Sink) -> None:
    with pytest.raises(DestinationError, match="does not exist"):
        sink.copy("job1/step-09.mp4", "job1/final.mp4")


@pytest.mark.parametrize("key", ["../escape.mp4", "/abs.mp4", "a//b", "a/./b", "", "a\\b"])
def test_bad_keys_are_refused(sink: Sink, key: str) -> None:
    with pytest.raises(ValueError, match="invalid storage key"):
        sink.write_bytes(key, b"x", "text/plain")


def test_open_sink(tmp_path: Path) -> None:
    s3 = open_sink("s3://bucket/some/prefix/")
    assert isinstance(s3, S3Sink) and (s3.bucket, s3.prefix, s3.dest) == (
        "bucket",
        "some/prefix",
        "s3://bucket/some/prefix",
    )
    local = open_sink(str(tmp_path / "new" / "dir"))
    assert isinstance(local, LocalSink) and not (tmp_path / "new").exists()  # created on demand only
    local.check_reachable()
    assert (tmp_path / "new" / "dir").is_dir()
    with pytest.raises(DestinationError, match="unsupported destination 'gs://bucket/x'"):
        open_sink("gs://bucket/x")
