"""A folder as a sink. Every write goes to a hidden temp file in the same folder, then `os.replace`."""

from __future__ import annotations

import contextlib
import hashlib
import os
import tempfile
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import BinaryIO

import httpx

from .base import (
    CHUNK_SIZE,
    PRESIGN_MAX_SECONDS,
    DestinationError,
    StoredObject,
    check_key,
    sha256_of,
)
from .download import fetch_to


class LocalSink:
    """Files under `root/{key}`. Metadata is not written next to the files: the manifest records it."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).expanduser().absolute()

    @property
    def dest(self) -> str:
        return str(self.root)

    def __repr__(self) -> str:
        return f"LocalSink({str(self.root)!r})"

    def _path(self, key: str) -> Path:
        return self.root / check_key(key)

    def _obj(self, key: str, size: int, sha256: str) -> StoredObject:  # task_id None: no metadata kept
        return StoredObject(uri=str(self._path(key)), size=size, sha256=sha256, key=key)

    def check_reachable(self) -> None:
        try:
            self.root.mkdir(parents=True, exist_ok=True)
            with tempfile.TemporaryFile(dir=self.root, prefix=".kling-write-check-") as probe:
                probe.write(b"ok")
        except OSError as exc:
            reason = exc.strerror or type(exc).__name__
            raise DestinationError(f"local folder {self.root} is not writable: {reason}") from exc

    def head(self, key: str) -> StoredObject | None:
        # Hash the file rather than trust a sidecar: a file under its final name is complete (os.replace),
        # hashing a video costs well under a second, and there is no second file to drift out of sync.
        path = self._path(key)
        try:
            with path.open("rb") as fh:
                size, sha = sha256_of(fh)
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return None
        return self._obj(key, size, sha)

    @contextlib.contextmanager
    def _atomic(self, key: str) -> Iterator[BinaryIO]:
        """Yield a temp file next to the target; on success fsync + rename over it, else delete it."""
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
        except OSError as exc:
            raise DestinationError(f"cannot write under {path.parent}: {exc.strerror or exc}") from exc
        try:
            with os.fdopen(fd, "wb") as fh:
                yield fh
                fh.flush()
                os.fsync(fh.fileno())
            os.chmod(tmp_name, 0o644)  # mkstemp makes 0600 files; videos are meant to be shared
            os.replace(tmp_name, path)
        except BaseException as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp_name)
            if isinstance(exc, OSError):  # disk full, permissions: a sink problem, told as one
                raise DestinationError(f"cannot write {path}: {exc.strerror or exc}") from exc
            raise

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
        """Reuse the file at `key` only if its sha256 is `reuse_sha256`; otherwise download and replace it.

        A folder keeps no metadata, so the caller proves a file by the sha256 its ledger recorded for
        this task; `expected_size`, when given, must match as well.
        """
        if reuse_sha256 is not None:
            existing = self.head(key)
            if existing is not None and existing.sha256 == reuse_sha256 and expected_size in (None, existing.size):
                return existing
        with self._atomic(key) as fh:
            got = fetch_to(url, fh.write, expected_size=expected_size, allow_private=allow_private, http=http)
        return self._obj(key, got.size, got.sha256)

    def write_bytes(self, key: str, data: bytes, content_type: str) -> StoredObject:
        with self._atomic(key) as fh:
            fh.write(data)
        return self._obj(key, len(data), hashlib.sha256(data).hexdigest())

    def read_bytes(self, key: str) -> bytes | None:
        try:
            return self._path(key).read_bytes()
        except (FileNotFoundError, IsADirectoryError, NotADirectoryError):
            return None

    def copy(self, src_key: str, dst_key: str) -> StoredObject:
        src = self._path(src_key)
        if not src.is_file():
            raise DestinationError(f"cannot copy: {src} does not exist")
        digest, size = hashlib.sha256(), 0
        with self._atomic(dst_key) as out, src.open("rb") as fh:
            while chunk := fh.read(CHUNK_SIZE):
                digest.update(chunk)
                size += len(chunk)
                out.write(chunk)
        return self._obj(dst_key, size, digest.hexdigest())

    def link(self, key: str, expires_seconds: int = PRESIGN_MAX_SECONDS) -> str:
        return str(self._path(key))
