"""Shared pieces of the storage layer: the stored-object record, the error tree, the Sink protocol."""

from __future__ import annotations

import hashlib
import mimetypes
from collections.abc import Mapping
from pathlib import Path
from typing import BinaryIO, Protocol, runtime_checkable
from urllib.parse import quote

import httpx
from pydantic import BaseModel, ConfigDict

CHUNK_SIZE = 1024 * 1024  # read/hash granularity: bounded memory whatever the object size
PRESIGN_MAX_SECONDS = 7 * 24 * 3600  # SigV4 presigned URLs cannot live longer than 7 days


class StoredObject(BaseModel):
    """A complete object in a sink. `key` is relative to the sink's destination.

    `task_id` is the Kling task the object was stored for, as recorded with it (S3 user metadata
    `task_id`); None when the sink keeps no metadata (a local folder: the caller's ledger proves its
    files by sha256) or the object was written without one (manifests, contact sheets).
    """

    model_config = ConfigDict(frozen=True)

    uri: str
    size: int
    sha256: str
    key: str
    task_id: str | None = None


class StorageError(Exception):
    """Root of the storage errors. `retryable` tells the caller whether trying again may help."""

    retryable: bool = False

    def __init__(self, message: str, *, retryable: bool | None = None) -> None:
        super().__init__(message)
        if retryable is not None:
            self.retryable = retryable


class DestinationError(StorageError):
    """The sink cannot be used: missing bucket, no credentials, folder not writable, S3 refused a write."""


class DownloadError(StorageError):
    """Fetching the source failed. Transient (cut off, connection, 5xx) -> retryable; 403/404/410 -> not."""

    def __init__(self, message: str, *, retryable: bool, status: int | None = None) -> None:
        super().__init__(message, retryable=retryable)
        self.status = status


class UnsafeURLError(DownloadError):
    """The URL's scheme or host is refused (private/loopback/link-local/metadata address)."""

    def __init__(self, message: str) -> None:
        super().__init__(message, retryable=False)


@runtime_checkable
class Sink(Protocol):
    """Where a job's videos and manifest go: an S3 prefix or a local folder."""

    @property
    def dest(self) -> str:
        """The destination as given (`s3://bucket/prefix` or an absolute folder); no secrets."""
        ...

    def check_reachable(self) -> None: ...

    def head(self, key: str) -> StoredObject | None: ...

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
        """Download `url` to `key`, replacing whatever is there unless it is proven to be this very object.

        An existing object is reused (nothing downloaded) only when it is proven: on S3 it carries
        `metadata["task_id"]` (and, if given, has `reuse_sha256` and `expected_size`); in a local folder
        its sha256 is `reuse_sha256` (and its size `expected_size`, if given). Leftovers of an earlier
        store of this key that was killed (open multipart uploads, `.part` temp files) are cleaned up.
        """
        ...

    def store_file(self, path: Path, key: str, *, metadata: Mapping[str, str]) -> StoredObject:
        """Put a local file (made by the pipeline itself: a stitched video) at `key`, visible only whole."""
        ...

    def fetch_file(self, key: str, path: Path) -> bool:
        """Copy the object at `key` into the local file `path`, streamed; False if it does not exist."""
        ...

    def write_bytes(self, key: str, data: bytes, content_type: str) -> StoredObject: ...

    def read_bytes(self, key: str) -> bytes | None: ...

    def copy(self, src_key: str, dst_key: str) -> StoredObject: ...

    def link(self, key: str, expires_seconds: int = PRESIGN_MAX_SECONDS) -> str: ...


def check_key(key: str) -> str:
    """Refuse keys that could escape the destination (job ids come from users)."""
    parts = key.split("/")
    if not key or key.startswith("/") or "\\" in key or any(p in ("", ".", "..") for p in parts):
        raise ValueError(f"invalid storage key {key!r}: need a relative path like 'job1/step-01.mp4'")
    return key


def content_type_for(key: str) -> str:
    return mimetypes.guess_type(key)[0] or "application/octet-stream"


def clean_metadata(metadata: Mapping[str, str]) -> dict[str, str]:
    """S3 user metadata is ASCII-only and case-insensitive: lower-case keys, percent-encode odd values."""
    out: dict[str, str] = {}
    for name, value in metadata.items():
        text = str(value)
        out[name.lower()] = text if text.isascii() and text.isprintable() else quote(text, safe="")
    return out


def sha256_of(fileobj: BinaryIO) -> tuple[int, str]:
    digest, size = hashlib.sha256(), 0
    while chunk := fileobj.read(CHUNK_SIZE):
        digest.update(chunk)
        size += len(chunk)
    return size, digest.hexdigest()
