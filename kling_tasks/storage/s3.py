"""An S3 prefix as a sink (AWS, MinIO, R2, moto: whatever boto3's standard chain points at)."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import re
import threading
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, TypeVar

import boto3
import httpx
from botocore.config import Config
from botocore.exceptions import (
    BotoCoreError,
    ClientError,
    HTTPClientError,
    NoCredentialsError,
    PartialCredentialsError,
)
from botocore.exceptions import (
    ConnectionError as BotoConnectionError,
)

from .base import (
    PRESIGN_MAX_SECONDS,
    DestinationError,
    StoredObject,
    check_key,
    clean_metadata,
    content_type_for,
)
from .download import fetch_to
from .s3_upload import CONCURRENCY, MIN_PART_SIZE, PART_SIZE, ManagedUpload, Upload, refusal_code, tags_refused

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

_MISSING = {"404", "NoSuchKey", "NotFound"}
_DENIED = {"403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "AllAccessDisabled"}
_SHA256 = re.compile(r"[0-9a-f]{64}")


T = TypeVar("T")
log = logging.getLogger(__name__)
# Destinations (endpoint, bucket) seen refusing object tags in this process. Sinks are opened per step: the
# refusal is remembered here, so the fallback is decided (and logged) once, not at every store.
_TAGS_REFUSED: set[tuple[str, str]] = set()
_TAGS_LOCK = threading.Lock()


class S3Sink:
    """Objects under `s3://bucket/prefix/{key}`.

    The caller's ids (task_id, job_id, step) go into user metadata from the start. The sha256 goes into the
    metadata too when the body is one PutObject; a multipart object gets it as the object tag `sha256` once
    complete (its metadata is fixed when it is created), or, on a store that refuses tags, into its metadata
    by an in-place copy. `head()` reads it from either place.
    """

    def __init__(
        self, bucket: str, prefix: str = "", *, client: S3Client | None = None, part_size: int = PART_SIZE,
        concurrency: int = CONCURRENCY,
    ) -> None:
        if part_size < MIN_PART_SIZE:
            raise ValueError(f"part_size must be at least {MIN_PART_SIZE} bytes (S3 minimum)")
        if concurrency < 1:
            raise ValueError("concurrency must be at least 1")
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self.part_size = part_size
        self.concurrency = concurrency  # parts uploaded at once
        self._client = client

    @property
    def client(self) -> S3Client:
        # Built lazily through the standard chain: env keys, profiles, roles, AWS_ENDPOINT_URL[_S3].
        # A fresh Session, not boto3.client(): the default session caches credentials process-wide,
        # so a changed environment (rotated keys, another endpoint) would be silently ignored.
        if self._client is None:
            # SigV4 explicitly: presigned links then work in every region and on every S3-compatible store.
            self._client = boto3.session.Session().client("s3", config=Config(signature_version="s3v4"))
        return self._client

    @property
    def dest(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}" if self.prefix else f"s3://{self.bucket}"

    def __repr__(self) -> str:  # never the client: its repr is harmless today, but keep credentials out
        return f"S3Sink({self.dest!r})"

    def _full(self, key: str) -> str:
        check_key(key)
        return f"{self.prefix}/{key}" if self.prefix else key

    def _obj(self, key: str, size: int, sha256: str, task_id: str | None = None) -> StoredObject:
        uri = f"s3://{self.bucket}/{self._full(key)}"
        return StoredObject(uri=uri, size=size, sha256=sha256, key=key, task_id=task_id)

    def error(self, exc: Exception, action: str, full_key: str | None = None) -> DestinationError:
        """One line, no secrets: only error codes and the endpoint, never botocore's full text.

        With `full_key`, the line names the object (so the step: `.../step-02.mp4`) as well as the bucket.
        """
        where = f"s3://{self.bucket}/{full_key}" if full_key else f"s3://{self.bucket}"
        if isinstance(exc, NoCredentialsError | PartialCredentialsError):
            return DestinationError(
                f"no usable AWS credentials to {action} {where} "
                "(set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, AWS_PROFILE or an instance role)"
            )
        if isinstance(exc, BotoConnectionError):
            endpoint = self.client.meta.endpoint_url
            return DestinationError(f"cannot reach S3 endpoint {endpoint} to {action} {where}", retryable=True)
        if isinstance(exc, HTTPClientError):  # read timeout, connection cut mid-request: boto3 gave up retrying
            endpoint = self.client.meta.endpoint_url
            return DestinationError(
                f"S3 endpoint {endpoint} stopped answering while trying to {action} {where} ({type(exc).__name__})",
                retryable=True,
            )
        if isinstance(exc, ClientError):
            code = str(exc.response.get("Error", {}).get("Code", "?"))
            status = int(exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode", 0))
            if code in ("NoSuchBucket",) or (action == "reach" and status == 404):
                return DestinationError(f"bucket {self.bucket} does not exist (cannot {action} {where})")
            if code in _DENIED or status == 403:
                return DestinationError(f"access denied to {action} {where} ({code})")
            # NoSuchUpload: a later store of the same key aborted this upload as a leftover; a retry
            # then finds that store's object (reused if it is this task's) or uploads again.
            retryable = status >= 500 or code == "NoSuchUpload"
            return DestinationError(f"S3 refused to {action} {where}: {code}", retryable=retryable)
        return DestinationError(f"S3 error while trying to {action} {where}: {type(exc).__name__}")

    def check_reachable(self) -> None:
        probe = self._full(".kling-write-check")
        try:
            self.client.head_bucket(Bucket=self.bucket)
        except (BotoCoreError, ClientError) as exc:
            raise self.error(exc, "reach") from None  # `from None`: keep botocore's text out of tracebacks
        try:  # a bucket we can see but not write to would only fail after the first paid step
            self.client.put_object(Bucket=self.bucket, Key=probe, Body=b"")
        except (BotoCoreError, ClientError) as exc:
            raise self.error(exc, "write to") from None
        self._probe_tagging(probe)
        with contextlib.suppress(BotoCoreError, ClientError):
            self.client.delete_object(Bucket=self.bucket, Key=probe)

    def _probe_tagging(self, probe: str) -> None:
        """Best effort: does this destination take (and give back) object tags? Decided before the first store."""
        if self.tagging_refused:
            return
        try:
            self.client.put_object_tagging(Bucket=self.bucket, Key=probe, Tagging={
                "TagSet": [{"Key": "sha256", "Value": hashlib.sha256(b"").hexdigest()}]})
            self.client.get_object_tagging(Bucket=self.bucket, Key=probe)
        except ClientError as exc:
            if tags_refused(exc):
                self.refuse_tagging(refusal_code(exc))
        except BotoCoreError:
            pass  # the store itself decides then

    def _read(self, fetch: Callable[[], T]) -> T | None:
        """Run a read; None when the object is missing, DestinationError for any other failure."""
        try:
            return fetch()
        except ClientError as exc:
            if str(exc.response.get("Error", {}).get("Code")) in _MISSING:
                return None
            raise self.error(exc, "read") from None
        except BotoCoreError as exc:
            raise self.error(exc, "read") from None

    @property
    def _destination(self) -> tuple[str, str]:
        return str(self.client.meta.endpoint_url), self.bucket

    @property
    def tagging_refused(self) -> bool:
        """True once this destination refused to set or read an object tag: multipart objects then get their
        sha256 into the metadata by an in-place copy."""
        return self._destination in _TAGS_REFUSED

    def refuse_tagging(self, code: str) -> None:
        with _TAGS_LOCK:
            if self._destination in _TAGS_REFUSED:
                return
            _TAGS_REFUSED.add(self._destination)
        log.warning("s3://%s refuses object tags (%s): multipart objects get their sha256 by an in-place copy "
                    "instead (a second write of each large video); any stored with a tag cannot be proven and are "
                    "stored again", self.bucket, code)

    def head(self, key: str) -> StoredObject | None:
        """What is stored at `key`, or None when nothing is, or nothing proven: an object without a sha256
        (in its metadata, or as its `sha256` tag) is not counted as stored."""
        full = self._full(key)
        resp = self._read(lambda: self.client.head_object(Bucket=self.bucket, Key=full))
        if resp is None:
            return None
        meta = resp.get("Metadata", {})
        sha = meta.get("sha256") or self._tagged_sha256(full, resp.get("VersionId"))
        if not sha or not _SHA256.fullmatch(sha):
            return None  # not ours, or a crash between completing a multipart upload and tagging it
        return self._obj(key, int(resp["ContentLength"]), sha, meta.get("task_id") or None)

    def _tagged_sha256(self, full_key: str, version_id: str | None) -> str | None:
        """The `sha256` tag of a multipart object (read only when its metadata has none)."""
        try:  # in a versioned bucket, the tags of this very version (the key may have been replaced since)
            answer = (self.client.get_object_tagging(Bucket=self.bucket, Key=full_key, VersionId=version_id)
                      if version_id else self.client.get_object_tagging(Bucket=self.bucket, Key=full_key))
            tags = answer["TagSet"]
        except ClientError as exc:
            error = exc.response.get("Error", {})
            if str(error.get("Code")) in _MISSING:  # replaced or deleted between the two requests
                return None
            if tags_refused(exc):  # unproven: stored again, not trusted; later stores copy instead of tagging
                self.refuse_tagging(refusal_code(exc))
                return None
            raise self.error(exc, "read") from None
        except BotoCoreError as exc:
            raise self.error(exc, "read") from None
        return next((tag["Value"] for tag in tags if tag.get("Key") == "sha256"), None)

    def store_from_url(
        self,
        url: str,
        key: str,
        *,
        metadata: Mapping[str, str],
        expected_size: int | None = None,
        allow_private: bool = False,
        http: httpx.Client | None = None,
        reuse_sha256: str | None = None,
    ) -> StoredObject:
        """Reuse the object at `key` only if it carries `metadata["task_id"]`; otherwise download and replace.

        `reuse_sha256` and `expected_size`, when given, must match as well. Open multipart uploads of this
        key (left by a store that was killed: it could not abort them itself) are aborted before the new
        upload starts and again once it is complete.
        """
        full = self._full(key)
        meta = clean_metadata(metadata)
        task_id = meta.get("task_id") or None
        if task_id is not None:
            existing = self.head(key)
            if (
                existing is not None
                and existing.task_id == task_id
                and reuse_sha256 in (None, existing.sha256)
                and expected_size in (None, existing.size)
            ):
                return existing
        self._abort_stale_uploads(full)
        upload = self.new_upload(full, content_type_for(key), meta)
        try:
            got = fetch_to(url, upload.write, expected_size=expected_size, allow_private=allow_private, http=http)
            upload.finish(got.sha256)
        except BaseException:
            upload.abort()
            raise
        self._abort_stale_uploads(full)
        return self._obj(key, got.size, got.sha256, task_id)

    def new_upload(self, full_key: str, content_type: str, metadata: dict[str, str]) -> Upload:
        return ManagedUpload(self, full_key, content_type, metadata, self.concurrency)

    def _abort_stale_uploads(self, full_key: str) -> None:
        """Abort every open multipart upload of exactly `full_key` (the prefix also matches longer keys).

        Best effort: an open upload is invisible to readers and only costs storage, so a listing refused
        by a narrow IAM policy must not fail the store; a bucket lifecycle rule can clean up instead.
        """
        s3 = self.client
        try:
            for page in s3.get_paginator("list_multipart_uploads").paginate(Bucket=self.bucket, Prefix=full_key):
                for stale in page.get("Uploads", []):
                    if stale.get("Key") == full_key and "UploadId" in stale:
                        s3.abort_multipart_upload(Bucket=self.bucket, Key=full_key, UploadId=stale["UploadId"])
        except (BotoCoreError, ClientError) as exc:
            reason = self.error(exc, "clean up")
            log.warning("open uploads of s3://%s/%s not cleaned up: %s", self.bucket, full_key, reason)

    def store_file(self, path: Path, key: str, *, metadata: Mapping[str, str]) -> StoredObject:
        """Upload a local file (made here: a stitched video) to `key`; visible only once whole."""
        full = self._full(key)
        meta = clean_metadata(metadata)
        self._abort_stale_uploads(full)
        upload = self.new_upload(full, content_type_for(key), meta)
        digest, size = hashlib.sha256(), 0
        try:
            with path.open("rb") as fh:
                while chunk := fh.read(self.part_size):
                    digest.update(chunk)
                    size += len(chunk)
                    upload.write(chunk)
            upload.finish(digest.hexdigest())
        except BaseException:
            upload.abort()
            raise
        return self._obj(key, size, digest.hexdigest(), meta.get("task_id") or None)

    def fetch_file(self, key: str, path: Path) -> bool:
        """Download `key` into the local file `path` (streamed); False if there is no such object."""
        full = self._full(key)

        def download() -> bool:
            self.client.download_file(self.bucket, full, str(path))
            return True

        return self._read(download) is not None

    def write_bytes(self, key: str, data: bytes, content_type: str) -> StoredObject:
        sha = hashlib.sha256(data).hexdigest()
        full = self._full(key)
        try:  # a single PutObject is atomic: readers see the old object or the new one
            self.client.put_object(
                Bucket=self.bucket,
                Key=full,
                Body=data,
                ContentType=content_type,
                Metadata={"sha256": sha},
            )
        except (BotoCoreError, ClientError) as exc:
            raise self.error(exc, "write to", full) from None
        return self._obj(key, len(data), sha)

    def read_bytes(self, key: str) -> bytes | None:
        return self._read(lambda: self.client.get_object(Bucket=self.bucket, Key=self._full(key))["Body"].read())

    def copy(self, src_key: str, dst_key: str) -> StoredObject:
        """Server-side copy keeping metadata (sha256, task_id); no-op if dst already has the same bytes and task."""
        src = self.head(src_key)
        if src is None:
            raise DestinationError(f"cannot copy: s3://{self.bucket}/{self._full(src_key)} does not exist")
        dst = self.head(dst_key)
        if dst is not None and (dst.sha256, dst.task_id) == (src.sha256, src.task_id):
            return dst
        try:  # CopyObject handles up to 5 GiB, far above a 3-minute video
            # A fresh full-object CRC32: a multipart source's composite checksum would otherwise be carried over
            # as if it were the whole object's (moto does), and boto3's GET validation would refuse the copy.
            self.client.copy_object(
                Bucket=self.bucket,
                Key=self._full(dst_key),
                MetadataDirective="COPY",
                CopySource={"Bucket": self.bucket, "Key": self._full(src_key)},
                ChecksumAlgorithm="CRC32",
            )
        except (BotoCoreError, ClientError) as exc:
            raise self.error(exc, "copy within") from None
        return self._obj(dst_key, src.size, src.sha256, src.task_id)

    def link(self, key: str, expires_seconds: int = PRESIGN_MAX_SECONDS) -> str:
        try:
            return self.client.generate_presigned_url(
                "get_object",
                Params={"Bucket": self.bucket, "Key": self._full(key)},
                ExpiresIn=min(expires_seconds, PRESIGN_MAX_SECONDS),
            )
        except BotoCoreError as exc:
            raise self.error(exc, "sign a link to") from None
