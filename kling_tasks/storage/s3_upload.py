"""Streaming a download into one S3 object with boto3's managed transfer (parallel parts, abort on failure).

The download pushes chunks (`write`); boto3's transfer manager pulls a file-like object from its own
threads. `_Pipe` joins the two with a bounded buffer, so memory stays a few parts whatever the video's
size. A body smaller than one part is a single PutObject carrying its sha256 in its metadata. A larger one is
a multipart upload that S3 publishes only once complete, its metadata (task_id, job_id, step) fixed when it
is created; the sha256, known only at the end, then goes on as the object tag `sha256` (PutObjectTagging, one
small request). A store that refuses tagging (some S3-compatible ones) gets the sha256 into the metadata by an
in-place copy instead (a second write of the whole object), remembered per sink. Until one of the two is done
the object is not proven: `S3Sink.head` ignores an object without a sha256, so it is stored again.
"""

from __future__ import annotations

import contextlib
import threading
from collections import deque
from collections.abc import Callable
from typing import IO, TYPE_CHECKING, Any, Protocol, cast

from boto3.s3.transfer import TransferConfig, create_transfer_manager
from botocore.exceptions import BotoCoreError, ClientError
from s3transfer.subscribers import BaseSubscriber

from .base import CHUNK_SIZE, DestinationError

if TYPE_CHECKING:
    from s3transfer.futures import TransferFuture
    from s3transfer.manager import TransferManager

    from .s3 import S3Sink

MIN_PART_SIZE = 5 * 1024 * 1024  # S3's floor for every part but the last
# 5 MiB x 4 in flight holds ~5 parts (+~50 MiB RSS, flat in the video's size). boto3's own 8 MiB x 10 threads
# was no faster relative to upload_file in one paired sample into moto (128 MiB: 0.54 vs 0.58), for ~2.5x the
# memory. Figures: docs/benchmarks.md, "Transfer into S3".
PART_SIZE = MIN_PART_SIZE
CONCURRENCY = 4


class Upload(Protocol):
    """What `S3Sink.store_from_url` drives: chunks in order, then finish with the body's sha256, or abort."""

    def write(self, chunk: bytes) -> None: ...

    def finish(self, sha256: str) -> None: ...

    def abort(self) -> None: ...


class UploadStoppedError(Exception):
    """The upload ended (failed) while the download was still writing: stop downloading."""


class _Pipe:
    """A blocking byte pipe: `write` waits while `limit` bytes are buffered, `read(n)` waits for n or EOF."""

    def __init__(self, limit: int, upload_failed: Callable[[], bool] = lambda: False) -> None:
        self._limit = limit
        self._upload_failed = upload_failed
        self._chunks: deque[bytes] = deque()
        self.buffered = 0
        self._cond = threading.Condition()
        self._eof = False
        self._error: BaseException | None = None
        self._reader_gone = False

    def write(self, data: bytes) -> None:
        with self._cond:
            while self.buffered >= self._limit and not self._reader_gone:
                self._cond.wait()
            if self._reader_gone:
                raise UploadStoppedError("the upload stopped before the download ended")
            self._chunks.append(data)
            self.buffered += len(data)
            self._cond.notify_all()

    def close(self) -> None:
        """End of the body: readers get what is left, then b""."""
        with self._cond:
            self._eof = True
            self._cond.notify_all()

    def fail(self, error: BaseException) -> None:
        """The download broke: the reader (the transfer) raises, so boto3 aborts the multipart upload."""
        with self._cond:
            self._error = error
            self._cond.notify_all()

    def reader_gone(self) -> None:
        with self._cond:
            self._reader_gone = True
            self._cond.notify_all()

    def drain(self) -> bytes:
        """Everything buffered (before any reader started): the body of a single PutObject."""
        with self._cond:
            data = b"".join(self._chunks)
            self._chunks.clear()
            self.buffered = 0
            return data

    # --- the file-like side, read by boto3's transfer threads ------------------------------------------------

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:  # boto3 then reads parts in order, holding at most a few in memory
        return False

    def read(self, amount: int = -1) -> bytes:
        out: list[bytes] = []
        got = 0
        with self._cond:
            while amount < 0 or got < amount:
                if self._error is not None:
                    raise UploadStoppedError("the download failed") from self._error
                if self._upload_failed():
                    # boto3 keeps reading parts after one has failed for good (it would download the whole
                    # video for nothing): stop here, and wake the download so that it stops too.
                    self._reader_gone = True
                    self._cond.notify_all()
                    raise UploadStoppedError("a part failed")
                if self._chunks:
                    chunk = self._chunks.popleft()
                    if amount >= 0 and got + len(chunk) > amount:
                        keep = amount - got
                        self._chunks.appendleft(chunk[keep:])
                        chunk = chunk[:keep]
                    out.append(chunk)
                    got += len(chunk)
                    self.buffered -= len(chunk)
                    self._cond.notify_all()
                elif self._eof:
                    break
                else:
                    self._cond.wait()
        return b"".join(out)


class _WhenDone(BaseSubscriber):
    def __init__(self, pipe: _Pipe) -> None:
        self._pipe = pipe

    def on_done(self, future: Any, **kwargs: Any) -> None:
        self._pipe.reader_gone()  # a failed transfer stops reading: a blocked download must not wait forever


def transfer_config(part_size: int, concurrency: int) -> TransferConfig:
    config = TransferConfig(multipart_threshold=part_size, multipart_chunksize=part_size,
                            max_concurrency=concurrency, use_threads=True, preferred_transfer_client="classic")
    # Parts read but not yet uploaded are held in memory: the ones in flight and one more being read.
    config.max_in_memory_upload_chunks = concurrency + 1
    return config


class ManagedUpload:
    """One object: `write` chunks as they arrive, then `finish(sha256)`, or `abort()` on any failure."""

    def __init__(self, sink: S3Sink, full_key: str, content_type: str, metadata: dict[str, str],
                 concurrency: int = CONCURRENCY) -> None:
        self.sink, self.key, self.content_type, self.metadata = sink, full_key, content_type, metadata
        self.concurrency = concurrency
        self._pipe = _Pipe(limit=sink.part_size + CHUNK_SIZE, upload_failed=self._failed)
        self._manager: TransferManager | None = None
        self._future: TransferFuture | None = None

    def _call(self, action: str, fn: Any, **kwargs: Any) -> Any:
        try:
            return fn(Bucket=self.sink.bucket, Key=self.key, **kwargs)
        except (BotoCoreError, ClientError) as exc:
            raise self.sink.error(exc, action, self.key) from None

    def write(self, chunk: bytes) -> None:
        if self._future is None and self._pipe.buffered + len(chunk) >= self.sink.part_size:
            self._start()
        try:
            self._pipe.write(chunk)
        except UploadStoppedError:
            self._raise_transfer_error()
            raise

    def _failed(self) -> bool:
        # TransferFuture has no public "failed yet?" before it is done; its coordinator knows. Without it (a
        # future s3transfer), the upload still fails correctly, only after reading the rest of the stream.
        coordinator = getattr(self._future, "_coordinator", None)
        return getattr(coordinator, "exception", None) is not None

    def _start(self) -> None:
        """More than one part is coming: hand the stream to boto3's transfer manager."""
        self._manager = create_transfer_manager(self.sink.client, transfer_config(self.sink.part_size,
                                                                                   self.concurrency))
        extra = {"ContentType": self.content_type, "Metadata": self.metadata}
        stream = cast("IO[bytes]", self._pipe)  # duck-typed: s3transfer needs only read/readable/seekable
        self._future = self._manager.upload(stream, self.sink.bucket, self.key, extra_args=extra,
                                            subscribers=[_WhenDone(self._pipe)])

    def _raise_transfer_error(self) -> None:
        assert self._future is not None
        try:
            self._future.result()
        except (BotoCoreError, ClientError) as exc:
            raise self.sink.error(exc, "upload to", self.key) from None
        except UploadStoppedError:
            raise
        except Exception as exc:  # e.g. KeyError 'ETag': a cut answer that parsed as a bare 200; a retry is safe
            where = f"s3://{self.sink.bucket}/{self.key}"
            raise DestinationError(f"S3 upload to {where} failed: {type(exc).__name__}", retryable=True) from None
        finally:
            self._shutdown()

    def _shutdown(self) -> None:
        if self._manager is not None:
            self._manager.shutdown()
            self._manager = None

    def finish(self, sha256: str) -> None:
        metadata = {**self.metadata, "sha256": sha256}
        if self._future is None:  # below one part: one atomic PutObject, its sha256 already known
            self._call("upload to", self.sink.client.put_object, Body=self._pipe.drain(),
                       ContentType=self.content_type, Metadata=metadata)
            return
        self._pipe.close()
        self._raise_transfer_error()
        self._future = None
        prove(self.sink, self.key, self.content_type, metadata)

    def abort(self) -> None:
        """boto3 aborts the multipart upload of a failed transfer before its future resolves."""
        if self._future is None:
            return
        self._pipe.fail(UploadStoppedError("the store was abandoned"))
        self._future.cancel()
        with contextlib.suppress(Exception):
            self._future.result()
        self._future = None
        self._shutdown()


# What a store that does not do object tags answers (some S3-compatible stores), or a policy that allows
# writing objects but not tagging them: the sha256 then goes into the metadata by a copy.
TAGGING_REFUSED = {"NotImplemented", "MethodNotAllowed", "AccessDenied"}


def refusal_code(exc: ClientError) -> str:
    return str(exc.response.get("Error", {}).get("Code") or exc.response.get("ResponseMetadata", {}).get(
        "HTTPStatusCode", "?"))


def tags_refused(exc: ClientError) -> bool:
    status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
    return refusal_code(exc) in TAGGING_REFUSED or status in (405, 501)


def prove(sink: S3Sink, full_key: str, content_type: str, metadata: dict[str, str]) -> None:
    """Give a completed multipart object its sha256: the tag, or (tags refused) the metadata by a copy.

    Any other failure deletes the object (unproven, `head()` would ignore it anyway) and raises.
    """
    if not sink.tagging_refused:
        try:
            sink.client.put_object_tagging(Bucket=sink.bucket, Key=full_key, Tagging={
                "TagSet": [{"Key": "sha256", "Value": metadata["sha256"]}]})
            return
        except ClientError as exc:
            if not tags_refused(exc):
                _discard(sink, full_key)
                raise sink.error(exc, "tag", full_key) from None
            sink.refuse_tagging(refusal_code(exc))
        except BotoCoreError as exc:  # every attempt's answer lost, say: whether the tag is there is unknown
            _discard(sink, full_key)
            raise sink.error(exc, "tag", full_key) from None
    copy_with_sha256(sink, full_key, content_type, metadata)


def _discard(sink: S3Sink, full_key: str) -> None:
    with contextlib.suppress(BotoCoreError, ClientError):  # left behind, it would only be ignored by head()
        sink.client.delete_object(Bucket=sink.bucket, Key=full_key)


def copy_with_sha256(sink: S3Sink, full_key: str, content_type: str, metadata: dict[str, str]) -> None:
    """The fallback: copy the completed object onto itself with the sha256 in its metadata; delete it on failure."""
    try:
        # A fresh full-object CRC32: the parts' composite checksum would otherwise be carried over as if it
        # were the whole object's (moto does), and boto3's GET validation would refuse the object.
        sink.client.copy_object(Bucket=sink.bucket, Key=full_key, CopySource={"Bucket": sink.bucket, "Key": full_key},
                                Metadata=metadata, MetadataDirective="REPLACE", ContentType=content_type,
                                ChecksumAlgorithm="CRC32")
    except (BotoCoreError, ClientError) as exc:
        _discard(sink, full_key)
        raise sink.error(exc, "tag", full_key) from None
