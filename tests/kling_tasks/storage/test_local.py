"""The local folder sink's edges: sizes past one read chunk, and the cleanup of dead writers' temp files."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import random
import time
from pathlib import Path
from typing import Any

import pytest

from kling_tasks.storage import LocalSink
from kling_tasks.storage import local as local_module
from kling_tasks.storage.base import CHUNK_SIZE

KEY = "job1/step-00.mp4"


def test_a_copy_larger_than_one_read_chunk_reports_its_whole_size_and_hash(tmp_path: Path) -> None:
    sink = LocalSink(tmp_path)
    data = random.Random(3).randbytes(2 * CHUNK_SIZE + 12345)
    sink.write_bytes("job1/step-02.mp4", data, "video/mp4")
    final = sink.copy("job1/step-02.mp4", "job1/final.mp4")
    assert (final.size, final.sha256) == (len(data), hashlib.sha256(data).hexdigest())
    assert sink.head("job1/final.mp4") == final


def leftovers(folder: Path, **names: str) -> dict[str, Path]:
    """Temp files of KEY as a writer leaves them: `.{name}.{random}.part`, old enough to be stale."""
    folder.mkdir(parents=True, exist_ok=True)
    past = time.time() - 60
    paths = {}
    for label, name in names.items():
        path = folder / name
        path.write_bytes(b"partial")
        os.utime(path, (past, past))
        paths[label] = path
    return paths


def test_the_cleanup_goes_through_every_leftover_whatever_the_listing_order(tmp_path: Path,
                                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "job1"
    temps = leftovers(folder, young=".step-00.mp4.y0ung000.part", vanished=".step-00.mp4.g0ne0000.part",
                      stale=".step-00.mp4.d3ad0000.part")
    future = time.time() + 60
    os.utime(temps["young"], (future, future))  # started after our write: never ours to delete
    order = [temps[label].name for label in ("young", "vanished", "stale")]
    real_scandir = os.scandir

    def listed_in_order(path: Any) -> Any:
        with real_scandir(path) as entries:
            listing = sorted(entries, key=lambda e: order.index(e.name) if e.name in order else -1)
        temps["vanished"].unlink(missing_ok=True)  # another writer's cleanup took it after our listing
        return contextlib.nullcontext(listing)

    monkeypatch.setattr(local_module.os, "scandir", listed_in_order)
    LocalSink(tmp_path).write_bytes(KEY, b"whole", "video/mp4")
    monkeypatch.undo()
    assert {p.name for p in folder.iterdir()} == {"step-00.mp4", temps["young"].name}
    assert (folder / "step-00.mp4").read_bytes() == b"whole"


def test_a_folder_without_locks_falls_back_to_age_alone(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    folder = tmp_path / "job1"
    temps = leftovers(folder, stale=".step-00.mp4.d3ad0000.part")

    def no_locks(fd: int, operation: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(local_module.fcntl, "flock", no_locks)
    LocalSink(tmp_path).write_bytes(KEY, b"whole", "video/mp4")
    monkeypatch.undo()
    assert not temps["stale"].exists()
    assert {p.name for p in folder.iterdir()} == {"step-00.mp4"}
