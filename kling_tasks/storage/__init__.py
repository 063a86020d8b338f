"""Storage: S3 (boto3) and local sinks — streamed, verified, never half-written.

sink = open_sink("s3://bucket/videos")        # or a folder: open_sink("./out")
sink.check_reachable()                        # before anything is paid
obj = sink.store_from_url(url, "job1/step-00.mp4", metadata={"job_id": "job1"})
"""

from __future__ import annotations

from .base import (
    PRESIGN_MAX_SECONDS,
    DestinationError,
    DownloadError,
    Sink,
    StorageError,
    StoredObject,
    UnsafeURLError,
)
from .download import check_download_url
from .local import LocalSink
from .s3 import S3Sink
from .s3_upload import PART_SIZE

__all__ = [
    "PART_SIZE",
    "PRESIGN_MAX_SECONDS",
    "DestinationError",
    "DownloadError",
    "LocalSink",
    "S3Sink",
    "Sink",
    "StorageError",
    "StoredObject",
    "UnsafeURLError",
    "check_download_url",
    "open_sink",
]


def open_sink(dest: str) -> Sink:
    """`s3://bucket[/prefix]` -> S3Sink; anything else -> LocalSink on that folder (created on demand)."""
    if dest.startswith("s3://"):
        bucket, _, prefix = dest.removeprefix("s3://").partition("/")
        if not bucket:
            raise DestinationError(f"invalid S3 destination {dest!r}: expected s3://bucket[/prefix]")
        return S3Sink(bucket, prefix)
    if "://" in dest:
        raise DestinationError(f"unsupported destination {dest!r}: use s3://bucket/prefix or a folder path")
    return LocalSink(dest)
