"""kill -9 in the middle of a store: nothing half-written is ever visible, and the next store cleans up.

A child process streams a 12 MiB body (more than one 5 MiB S3 part) from a source that pauses after
6 MiB; once the bytes have reached the sink (a temp file, or an uploaded part of an open multipart
upload) its whole process group is SIGKILLed, so no `finally`, `except` or atexit can run.
The cleanup that the next store does must spare other keys and writers still alive.
"""

from __future__ import annotations

import fcntl
import hashlib
import os
import random
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import ClientError

from kling_tasks.storage import PART_SIZE, DestinationError, LocalSink, S3Sink, Sink

REPO = Path(__file__).resolve().parents[3]
KEY = "job1/step-00.mp4"
META = {"job_id": "job1", "task_id": "t-123", "step": "0"}
SIZE, PAUSE = 12 * 1024 * 1024, 6 * 1024 * 1024
CHILD = """
import sys
from kling_tasks.storage import open_sink
dest, url, key = sys.argv[1:]
open_sink(dest).store_from_url(url, key, metadata={"job_id": "job1", "task_id": "t-killed"}, allow_private=True)
sys.exit("the store finished: it should have been killed first")
"""


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def wait_for(what: str, ready: Callable[[], bool], child: subprocess.Popen[bytes], log: Path) -> None:
    deadline = time.monotonic() + 60
    while not ready():
        if child.poll() is not None:
            pytest.fail(f"the storing child exited ({child.returncode}) before {what}: {log.read_text()[-2000:]}")
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


@pytest.fixture
def child_store(tmp_path: Path) -> Iterator[Callable[[Sink, str], tuple[subprocess.Popen[bytes], Path]]]:
    started: list[subprocess.Popen[bytes]] = []

    def start(sink: Sink, url: str) -> tuple[subprocess.Popen[bytes], Path]:
        log = tmp_path / "child.log"
        with log.open("wb") as out:
            child = subprocess.Popen(
                [sys.executable, "-c", CHILD, sink.dest, url, KEY],
                cwd=REPO, stdout=out, stderr=subprocess.STDOUT, start_new_session=True,
            )
        started.append(child)
        return child, log

    yield start
    for child in started:  # a test that failed before its kill must not leave the child behind
        if child.poll() is None:
            os.killpg(child.pid, signal.SIGKILL)
            child.wait()


def local_files(root: Path) -> dict[str, int]:
    return {str(p.relative_to(root)): p.stat().st_size for p in root.rglob("*") if p.is_file()}


def s3_uploads(s3: Any, bucket: str, key: str) -> list[dict[str, Any]]:
    uploads = s3.list_multipart_uploads(Bucket=bucket).get("Uploads", [])
    return [u for u in uploads if u["Key"] == key]


def s3_parts(s3: Any, bucket: str, key: str) -> int:
    return sum(len(s3.list_parts(Bucket=bucket, Key=key, UploadId=u["UploadId"]).get("Parts", []))
               for u in s3_uploads(s3, bucket, key))


def test_local_store_killed_mid_write_leaves_no_file_and_the_next_store_is_whole(
    tmp_path: Path, source: Any, child_store: Any
) -> None:
    sink = LocalSink(tmp_path / "out")
    final = sink.root / KEY
    data = random.Random(5).randbytes(SIZE)
    child, log = child_store(sink, source.add("/paused.mp4", data, pause_after=PAUSE))

    # On disk, wherever the child writes: a sink that wrote straight to the final path is caught below.
    wait_for("6 MiB on disk", lambda: source.sent["/paused.mp4"] > PART_SIZE
             and sink.root.exists() and sum(local_files(sink.root).values()) >= PAUSE, child, log)
    os.killpg(child.pid, signal.SIGKILL)
    assert child.wait() == -signal.SIGKILL

    assert not final.exists(), "a killed store left a partial file under the final name"
    assert sink.head(KEY) is None
    leftover = local_files(sink.root)
    assert len(leftover) == 1 and next(iter(leftover)).startswith("job1/.step-00.mp4."), leftover

    stored = sink.store_from_url(source.add("/whole.mp4", data), KEY, metadata=META, allow_private=True)
    assert (stored.size, stored.sha256) == (SIZE, sha(data))
    assert sha(final.read_bytes()) == sha(data)
    assert local_files(sink.root) == {KEY: SIZE}, "the killed store's temp file is still there"


def test_s3_store_killed_mid_upload_leaves_no_object_and_the_next_store_is_whole(
    bucket: str, s3: Any, source: Any, child_store: Any
) -> None:
    sink = S3Sink(bucket, "videos")
    full = f"videos/{KEY}"
    data = random.Random(6).randbytes(SIZE)
    child, log = child_store(sink, source.add("/paused.mp4", data, pause_after=PAUSE))

    wait_for("one part uploaded", lambda: source.sent["/paused.mp4"] > PART_SIZE
             and s3_parts(s3, bucket, full) >= 1, child, log)
    os.killpg(child.pid, signal.SIGKILL)
    assert child.wait() == -signal.SIGKILL

    with pytest.raises(ClientError) as err:
        s3.head_object(Bucket=bucket, Key=full)
    assert err.value.response["ResponseMetadata"]["HTTPStatusCode"] == 404
    assert sink.head(KEY) is None
    assert len(s3_uploads(s3, bucket, full)) == 1  # the killed store could not abort its own upload

    stored = sink.store_from_url(source.add("/whole.mp4", data), KEY, metadata=META, allow_private=True)
    assert (stored.size, stored.sha256, stored.task_id) == (SIZE, sha(data), "t-123")
    assert sha(s3.get_object(Bucket=bucket, Key=full)["Body"].read()) == sha(data)
    assert s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []


# --- the cleanup itself: only this key's leftovers, only dead writers' ---------------------------


def test_s3_store_aborts_open_uploads_of_exactly_its_key(bucket: str, s3: Any, source: Any) -> None:
    mine = s3.create_multipart_upload(Bucket=bucket, Key=KEY)["UploadId"]  # as a killed store leaves it
    longer = s3.create_multipart_upload(Bucket=bucket, Key=KEY + ".bak")["UploadId"]  # same prefix, other key
    S3Sink(bucket).store_from_url(source.add("/v", b"small"), KEY, metadata=META, allow_private=True)
    left = {(u["Key"], u["UploadId"]) for u in s3.list_multipart_uploads(Bucket=bucket).get("Uploads", [])}
    assert left == {(KEY + ".bak", longer)}
    assert mine not in {upload_id for _, upload_id in left}


def test_local_write_removes_only_dead_writers_temps_of_its_own_key(tmp_path: Path) -> None:
    folder = tmp_path / "job1"
    folder.mkdir()
    past = time.time() - 60
    names = {
        "dead": ".step-00.mp4.k1ll3d_x.part",  # this key, old, unlocked: left by a killed writer
        "live": ".step-00.mp4.stall3d0.part",  # this key, old, but locked: a stalled writer in flight
        "newer": ".step-00.mp4.n3w3r0000.part",  # this key, started after our write
        "longer key": ".step-00.mp4.bak.abcdefgh.part",  # the temp of key job1/step-00.mp4.bak
        "other key": ".step-01.mp4.abcdefgh.part",
        "not a temp": ".step-00.mp4.notes.txt",
    }
    for label, name in names.items():
        (folder / name).write_bytes(b"partial")
        if label != "newer":
            os.utime(folder / name, (past, past))
    future = time.time() + 60
    os.utime(folder / names["newer"], (future, future))
    with (folder / names["live"]).open("rb") as live:
        fcntl.flock(live.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        LocalSink(tmp_path).write_bytes(KEY, b"whole", "video/mp4")
    left = {p.name for p in folder.iterdir()}
    assert left == {"step-00.mp4"} | (set(names.values()) - {names["dead"]})
    assert (folder / "step-00.mp4").read_bytes() == b"whole"


def test_s3_store_whose_upload_a_later_store_aborted_fails_retryably(bucket: str, s3: Any, source: Any) -> None:
    # Two workers storing the same step: the later one takes the earlier one's open upload for a leftover.
    data = random.Random(7).randbytes(SIZE)
    url = source.add("/paused.mp4", data, pause_after=PAUSE)
    sink = S3Sink(bucket, "videos")
    errors: list[BaseException] = []

    def first() -> None:
        try:
            sink.store_from_url(url, KEY, metadata=META, allow_private=True)
        except BaseException as exc:
            errors.append(exc)

    worker = threading.Thread(target=first)
    worker.start()
    deadline = time.monotonic() + 60
    while s3_parts(s3, bucket, f"videos/{KEY}") < 1:
        assert time.monotonic() < deadline and worker.is_alive(), "the first store never uploaded a part"
        time.sleep(0.05)
    second = S3Sink(bucket, "videos").store_from_url(source.add("/whole.mp4", data), KEY, metadata=META,
                                                     allow_private=True)
    source.resume.set()
    worker.join(60)
    # S3 answers NoSuchUpload (404), moto a 500: retryable either way.
    assert len(errors) == 1 and isinstance(errors[0], DestinationError), errors
    assert errors[0].retryable is True
    no_such_upload = ClientError({"Error": {"Code": "NoSuchUpload"}, "ResponseMetadata": {"HTTPStatusCode": 404}},
                                 "UploadPart")
    assert sink.error(no_such_upload, "upload to").retryable is True
    assert sink.head(KEY) == second and second.sha256 == sha(data)
    assert s3.list_multipart_uploads(Bucket=bucket).get("Uploads", []) == []
    # Its retry finds the object of this very task and downloads nothing.
    assert sink.store_from_url(url, KEY, metadata=META, allow_private=True) == second
    assert source.hits["/paused.mp4"] == 1


def test_local_store_spares_the_temp_of_a_live_writer_of_the_same_key(tmp_path: Path, source: Any) -> None:
    # A stalled writer's temp is older than a later write of the same key: only its lock tells it is alive.
    sink = LocalSink(tmp_path / "out")
    data = random.Random(8).randbytes(SIZE)
    url = source.add("/paused.mp4", data, pause_after=PAUSE)
    results: list[Any] = []

    def first() -> None:
        try:
            results.append(sink.store_from_url(url, KEY, metadata=META, allow_private=True))
        except BaseException as exc:
            results.append(exc)

    worker = threading.Thread(target=first)
    worker.start()
    deadline = time.monotonic() + 60
    while not (sink.root.exists() and sum(local_files(sink.root).values()) >= PAUSE):
        assert time.monotonic() < deadline and worker.is_alive(), "the first store never wrote 6 MiB"
        time.sleep(0.05)
    time.sleep(0.1)  # past the filesystem's timestamp granularity: the stalled temp is now the older one
    sink.write_bytes(KEY, b"a later write of the same key", "video/mp4")
    source.resume.set()
    worker.join(60)
    assert len(results) == 1 and not isinstance(results[0], BaseException), results
    assert results[0].sha256 == sha(data) and sha((sink.root / KEY).read_bytes()) == sha(data)
    assert local_files(sink.root) == {KEY: SIZE}
