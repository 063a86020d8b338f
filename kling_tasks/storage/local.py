"""A folder as a sink. Every write goes to a hidden temp file in the same folder, then `os.replace`.

A temp file is `.{name}.{random}.part`, locked (flock) by its writer until it has been renamed. A writer
killed with SIGKILL cannot delete its temp, but the kernel drops its lock: the next write of the same key
removes such temps (unlocked and older than its own), and never another key's or a live writer's.
"""

from __future__ import annotations

import contextlib
import hashlib
import os
import re
import shutil
import stat
import sys
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

if sys.platform != "win32":
    import fcntl


def _try_lock(fd: int) -> bool:
    """Take an exclusive lock on `fd` without waiting; False only if another open file holds one."""
    if sys.platform == "win32":  # no flock: stale temps are then told apart by age alone
        return True
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        return False
    except OSError:  # a filesystem without locks (some FUSE/SMB mounts): fall back to age alone
        return True
    return True


def _remove_stale_temps(path: Path, own: str, started_ns: int) -> None:
    """Delete temps of `path` left by dead writers: same name pattern, older than ours, not locked."""
    pattern = re.compile(rf"\.{re.escape(path.name)}\.[a-z0-9_]+\.part")  # mkstemp's alphabet has no dot
    with contextlib.suppress(OSError), os.scandir(path.parent) as entries:
        for entry in entries:
            if entry.name == own or not pattern.fullmatch(entry.name):
                continue
            with contextlib.suppress(OSError):  # gone meanwhile or not ours to delete: never fail a write
                seen = entry.stat(follow_symlinks=False)
                if not stat.S_ISREG(seen.st_mode) or seen.st_mtime_ns >= started_ns:
                    continue
                fd = os.open(entry.path, os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0))
                try:  # the same inode still under that name: not one swapped in since the listing
                    if _try_lock(fd) and os.fstat(fd).st_ino == os.stat(entry.path, follow_symlinks=False).st_ino:
                        os.unlink(entry.path)
                finally:
                    os.close(fd)


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
        """Yield a locked temp file next to the target; on success fsync + rename over it, else delete it.

        Temps of this key left by killed writers are removed first; the lock (held until after the
        rename) keeps this one from being taken for such a leftover by a concurrent writer.
        """
        path = self._path(key)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            fd, tmp_name = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
        except OSError as exc:
            raise DestinationError(f"cannot write under {path.parent}: {exc.strerror or exc}") from exc
        fh = os.fdopen(fd, "wb")
        try:
            _try_lock(fd)
            _remove_stale_temps(path, os.path.basename(tmp_name), os.fstat(fd).st_mtime_ns)
            yield fh
            fh.flush()
            os.fsync(fd)
            os.chmod(tmp_name, 0o644)  # mkstemp makes 0600 files; videos are meant to be shared
            os.replace(tmp_name, path)  # still open and locked: no moment where it looks abandoned
        except BaseException as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp_name)
            if isinstance(exc, OSError):  # disk full, permissions: a sink problem, told as one
                raise DestinationError(f"cannot write {path}: {exc.strerror or exc}") from exc
            raise
        finally:
            with contextlib.suppress(OSError):  # flushed and fsynced above; closing only drops the lock
                fh.close()

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

    def store_file(self, path: Path, key: str, *, metadata: Mapping[str, str]) -> StoredObject:
        """Copy a local file (made here: a stitched video) to `key` atomically; a folder keeps no metadata."""
        return self._copy_from(path, key)

    def fetch_file(self, key: str, path: Path) -> bool:
        src = self._path(key)
        if not src.is_file():
            return False
        shutil.copyfile(src, path)
        return True

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
        return self._copy_from(src, dst_key)

    def _copy_from(self, src: Path, dst_key: str) -> StoredObject:
        digest, size = hashlib.sha256(), 0
        with self._atomic(dst_key) as out, src.open("rb") as fh:
            while chunk := fh.read(CHUNK_SIZE):
                digest.update(chunk)
                size += len(chunk)
                out.write(chunk)
        return self._obj(dst_key, size, digest.hexdigest())

    def link(self, key: str, expires_seconds: int = PRESIGN_MAX_SECONDS) -> str:
        return str(self._path(key))
