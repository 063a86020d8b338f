"""The Prefect tasks of last-frame continuation, and how the flow records them in the job's ledger.

- `store-clip-NN`: the clip Kling made, as clip-NN.mp4 (the store task of kling_tasks.steps).
- `last-frame-for-step-NN`: the previous clip's last frame as frame-NN.jpg, the image step NN starts from.
- `stitch-step-NN`: clip-00 .. clip-NN joined into step-NN.mp4, the whole video so far.

The frame and the stitch are local work: they read stored clips and never send a Kling request. Their cache
keys are the sha256s of the clips they read and where they write (identity.derived_key), so a rerun skips
them, and a crash during one is redone from the stored clips with the same bytes.
"""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path
from typing import Any

from prefect import task
from prefect.context import TaskRunContext
from prefect.logging import get_run_logger
from prefect.tasks import exponential_backoff
from pydantic import BaseModel, ConfigDict

from kling_tasks import identity, recorder
from kling_tasks.continuation.frames import FrameError, start_frame
from kling_tasks.continuation.stitch import stitch_clips
from kling_tasks.jobs import PlannedStep
from kling_tasks.manifest import frame_key, step_key
from kling_tasks.step_results import StartImage
from kling_tasks.steps import PERSISTED, retry_if_storage_transient, store_proven
from kling_tasks.storage import Sink, StorageError, StoredObject, open_sink
from kling_tasks.storage.base import sha256_of
from kling_tasks.transfers import run_transfer

_STORAGE_RETRIES: dict[str, Any] = {"retries": 3, "retry_delay_seconds": exponential_backoff(backoff_factor=2),
                                    "retry_condition_fn": retry_if_storage_transient}


class Stitched(BaseModel):
    model_config = ConfigDict(frozen=True)

    stored: StoredObject
    method: str | None  # copy | reencode; None: found already stitched by an earlier run
    seconds: float | None  # the whole video so far (None: not measured here)


def _derived_key(work: str, parameters: dict[str, Any], key: str, clips: list[StoredObject]) -> str:
    resolved = open_sink(parameters["dest"]).dest
    return identity.derived_key(work, parameters["account"], [clip.sha256 for clip in clips], resolved, key)


def frame_cache_key(_: TaskRunContext, parameters: dict[str, Any]) -> str:
    key = frame_key(parameters["job_id"], parameters["step"].index)
    return _derived_key("frame", parameters, key, [parameters["clip"]])


def stitch_cache_key(_: TaskRunContext, parameters: dict[str, Any]) -> str:
    key = step_key(parameters["job_id"], parameters["step"].index)
    return _derived_key("stitch", parameters, key, parameters["clips"])


def fetch_clip(sink: Sink, clip: StoredObject, folder: Path) -> Path:
    """Download a stored clip to a local file (streamed) and check it is the one the ledger recorded."""
    path = folder / Path(clip.key).name
    if not sink.fetch_file(clip.key, path):
        raise StorageError(f"{clip.uri} is gone; rerun to store it again", retryable=False)
    with path.open("rb") as fh:
        _, sha256 = sha256_of(fh)
    if sha256 != clip.sha256:
        raise StorageError(f"{clip.uri} changed since it was stored; rerun to store it again", retryable=False)
    return path


@task(name="last-frame", task_run_name="last-frame-for-{step.label}", cache_key_fn=frame_cache_key,
      **PERSISTED, **_STORAGE_RETRIES)
async def start_frame_step(job_id: str, step: PlannedStep, clip: StoredObject, dest: str,
                           account: str) -> StoredObject:
    """The previous clip's last frame, as the JPEG this continuation will send, stored as frame-NN.jpg."""
    logger = get_run_logger()
    sink = open_sink(dest)
    with tempfile.TemporaryDirectory(prefix="kling-frame-") as folder:
        local = await run_transfer(fetch_clip, sink, clip, Path(folder))
        try:
            frame = await asyncio.to_thread(start_frame, local)
        except FrameError as exc:
            raise FrameError(f"{step.name}: {exc}") from None
    stored = await asyncio.to_thread(sink.write_bytes, frame_key(job_id, step.index), frame.jpeg, "image/jpeg")
    scaled = f", scaled up from {frame.source_size[0]}x{frame.source_size[1]}" if frame.scaled else ""
    logger.info("%s starts from the last frame of %s: %s (%dx%d JPEG%s, %d bytes, sha256 %s)", step.name,
                clip.key, stored.uri, frame.width, frame.height, scaled, stored.size, stored.sha256)
    return stored


@task(name="stitch", task_run_name="stitch-{step.label}", cache_key_fn=stitch_cache_key, **PERSISTED,
      **_STORAGE_RETRIES)
async def stitch_step(job_id: str, step: PlannedStep, task_id: str, clips: list[StoredObject], dest: str,
                      account: str, proven_sha256: str | None = None) -> Stitched:
    """step-NN.mp4 = clip-00 .. clip-NN joined (each seam's doubled frame left out)."""
    logger = get_run_logger()
    sink = open_sink(dest)
    key = step_key(job_id, step.index)
    existing = await asyncio.to_thread(sink.head, key)
    if existing is not None and (existing.task_id == task_id if existing.task_id is not None
                                 else existing.sha256 == proven_sha256):
        logger.info("already stitched at %s (sha256 %s)", existing.uri, existing.sha256)
        return Stitched(stored=existing, method=None, seconds=None)
    if len(clips) == 1:  # the generation alone: the clip is the video so far
        stored = await run_transfer(sink.copy, clips[0].key, key)
        return Stitched(stored=stored, method="copy", seconds=None)
    metadata = {"job_id": job_id, "task_id": task_id, "step": str(step.index),
                "external_task_id": step.external_task_id}
    with tempfile.TemporaryDirectory(prefix="kling-stitch-") as folder:
        paths = [await run_transfer(fetch_clip, sink, clip, Path(folder)) for clip in clips]
        out = Path(folder) / "stitched.mp4"
        report = await run_transfer(stitch_clips, paths, out)
        stored = await run_transfer(sink.store_file, out, key, metadata=metadata)
    logger.info("stitched %d clips into %s by %s: %d frames (%d seam frames left out), %d bytes, sha256 %s",
                len(clips), stored.uri, report.method, report.frames, report.dropped, stored.size, stored.sha256)
    return Stitched(stored=stored, method=report.method, seconds=report.seconds)


# ---- the flow's side: each result recorded in the ledger --------------------------------------------------


async def clip_into_ledger(ledger: recorder.JobRecorder, step: PlannedStep, task_id: str, dest: str,
                           account: str) -> StoredObject:
    proven = ledger.proven_clip_sha256(step, task_id)
    stored = await store_proven(ledger.plan.job_id, step, step.kind, task_id, dest, account, proven, clip=True)
    await asyncio.to_thread(ledger.clip_stored, step, stored)
    return stored


async def start_image_into_ledger(ledger: recorder.JobRecorder, step: PlannedStep, clip: StoredObject, dest: str,
                                  account: str) -> StartImage:
    """The frame task, and a check that what a Cached one claims is still there (else it is made again)."""
    job_id = ledger.plan.job_id
    frame = await start_frame_step(job_id, step, clip, dest, account)
    current = await asyncio.to_thread(open_sink(dest).head, frame.key)
    if current is None or current.sha256 != frame.sha256:
        frame = await start_frame_step.with_options(refresh_cache=True)(job_id, step, clip, dest, account)
    await asyncio.to_thread(ledger.start_frame, step, frame)
    return StartImage(dest=dest, key=frame.key, sha256=frame.sha256)


async def stitch_into_ledger(ledger: recorder.JobRecorder, step: PlannedStep, task_id: str,
                             clips: list[StoredObject], dest: str, account: str) -> None:
    job_id = ledger.plan.job_id
    proven = ledger.proven_sha256(step, task_id)
    result = await stitch_step(job_id, step, task_id, clips, dest, account, proven)
    current = await asyncio.to_thread(open_sink(dest).head, result.stored.key)
    if current is None or current.sha256 != result.stored.sha256:
        get_run_logger().warning("the cached stitch of %s is gone or changed; stitching again", step.label)
        result = await stitch_step.with_options(refresh_cache=True)(job_id, step, task_id, clips, dest, account)
    record = ledger.record(step)
    seconds = result.seconds if result.seconds is not None else record.total_seconds or record.duration
    await asyncio.to_thread(ledger.stitched, step, result.stored, result.method or record.stitched_by, seconds)
