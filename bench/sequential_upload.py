"""The project's first S3 uploader, kept as the baseline that boto3's managed transfer replaced.

Sequential multipart: one part buffered at a time, sent, then the next (no overlap of download and
upload); a body smaller than one part is one PutObject. Same contract as `ManagedUpload` (metadata at
create, the sha256 as the object's tag once complete, abort on failure), so bench/transfer.py compares like
with like.
"""

from __future__ import annotations

import contextlib
from typing import Any

from botocore.exceptions import BotoCoreError, ClientError

from kling_tasks.storage import S3Sink
from kling_tasks.storage.s3_upload import Upload, prove


class SequentialUpload:
    def __init__(self, sink: S3Sink, full_key: str, content_type: str, metadata: dict[str, str]) -> None:
        self.sink, self.key, self.content_type, self.metadata = sink, full_key, content_type, metadata
        self.buf = bytearray()
        self.upload_id: str | None = None
        self.parts: list[Any] = []

    def _call(self, action: str, fn: Any, **kwargs: Any) -> Any:
        try:
            return fn(Bucket=self.sink.bucket, Key=self.key, **kwargs)
        except (BotoCoreError, ClientError) as exc:
            raise self.sink.error(exc, action, self.key) from None

    def write(self, chunk: bytes) -> None:
        self.buf += chunk
        size = self.sink.part_size
        while len(self.buf) >= size:
            self._send(bytes(self.buf[:size]))
            del self.buf[:size]

    def _send(self, data: bytes) -> None:
        s3 = self.sink.client
        if self.upload_id is None:
            created = self._call("upload to", s3.create_multipart_upload, ContentType=self.content_type,
                                 Metadata=self.metadata)
            self.upload_id = str(created["UploadId"])
        number = len(self.parts) + 1
        part = self._call("upload to", s3.upload_part, UploadId=self.upload_id, PartNumber=number, Body=data)
        self.parts.append({"ETag": part["ETag"], "PartNumber": number})

    def finish(self, sha256: str) -> None:
        metadata = {**self.metadata, "sha256": sha256}
        if self.upload_id is None:
            self._call("upload to", self.sink.client.put_object, Body=bytes(self.buf),
                       ContentType=self.content_type, Metadata=metadata)
            return
        if self.buf:
            self._send(bytes(self.buf))
        upload_id, self.upload_id = self.upload_id, None
        self._call("upload to", self.sink.client.complete_multipart_upload, UploadId=upload_id,
                   MultipartUpload={"Parts": self.parts})
        prove(self.sink, self.key, self.content_type, metadata)

    def abort(self) -> None:
        if self.upload_id is not None:
            with contextlib.suppress(BotoCoreError, ClientError):
                self.sink.client.abort_multipart_upload(Bucket=self.sink.bucket, Key=self.key,
                                                        UploadId=self.upload_id)
            self.upload_id = None


class SequentialS3Sink(S3Sink):
    """S3Sink with the sequential uploader: everything else (reuse, cleanup, errors) is the sink's own."""

    def new_upload(self, full_key: str, content_type: str, metadata: dict[str, str]) -> Upload:
        return SequentialUpload(self, full_key, content_type, metadata)
