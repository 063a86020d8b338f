"""The Prefect tasks of one step: submit (idempotent POST), wait (poll), store (stream to the sink).

Caching (DESIGN §2.4): explicit, versioned keys made of ids only, persisted as JSON, never Prefect's default
policy (it contains the run id) and never prompt text. POST and poll are separate tasks, so a retry of the
wait never re-runs a POST, and the submit body is the exactly-once protocol of the client.
"""

from __future__ import annotations

import asyncio
import hashlib
from typing import Any

from prefect import task
from prefect.context import TaskRunContext
from prefect.logging import get_run_logger
from prefect.tasks import exponential_backoff

from kling_tasks import events
from kling_tasks.api import (
    Image2VideoRequest,
    KlingClient,
    TaskKind,
    TaskSnapshot,
    Text2VideoRequest,
    VideoExtendRequest,
)
from kling_tasks.jobs import GenerationSpec, PlannedStep
from kling_tasks.manifest import step_key
from kling_tasks.progress import Notice, publish
from kling_tasks.settings import KlingSettings
from kling_tasks.storage import open_sink

CACHE_VERSION = "v1"  # bump deliberately: a new version re-runs (and may re-pay) every step


def submit_cache_key(_: TaskRunContext, parameters: dict[str, Any]) -> str:
    return f"kling/{CACHE_VERSION}/submit/{parameters['step'].external_task_id}"


def wait_cache_key(_: TaskRunContext, parameters: dict[str, Any]) -> str:
    return f"kling/{CACHE_VERSION}/wait/{parameters['task_id']}"


def store_cache_key(_: TaskRunContext, parameters: dict[str, Any]) -> str:
    return f"kling/{CACHE_VERSION}/store/{parameters['task_id']}/{destination_digest(parameters['dest'])}"


def destination_digest(dest: str) -> str:
    return hashlib.sha256(dest.rstrip("/").encode()).hexdigest()[:16]


async def retry_if_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Retry only failures that may pass (back-pressure, 5xx, network, cut-off downloads).

    Async on purpose: in an async task `state.result()` returns a coroutine and would hide the exception.
    """
    try:
        await state.aresult()
    except Exception as exc:
        return bool(getattr(exc, "retryable", False))
    return False


_PERSISTED: dict[str, Any] = {"persist_result": True, "result_serializer": "json", "refresh_cache": False}
_TRANSIENT_RETRIES: dict[str, Any] = {
    "retries": 5,
    "retry_delay_seconds": exponential_backoff(backoff_factor=2),
    "retry_jitter_factor": 0.5,
    "retry_condition_fn": retry_if_transient,
}


def build_request(
    step: PlannedStep, generation: GenerationSpec, parent: dict[str, Any] | None
) -> Text2VideoRequest | Image2VideoRequest | VideoExtendRequest:
    if step.kind == "video-extend":
        assert parent is not None, "an extension needs its parent's result"
        return VideoExtendRequest(
            video_id=parent["video_id"],
            parent_task_id=parent["task_id"],
            prompt=step.prompt,
            negative_prompt=step.negative_prompt,
            cfg_scale=step.cfg_scale,
        )
    common: dict[str, Any] = {
        "model_name": generation.model_name,
        "prompt": generation.prompt,
        "negative_prompt": generation.negative_prompt,
        "cfg_scale": generation.cfg_scale,
        "mode": generation.mode,
        "duration": generation.duration,
    }
    if step.kind == "image2video":
        assert generation.image is not None
        return Image2VideoRequest.from_source(generation.image, **common)
    return Text2VideoRequest(aspect_ratio=generation.aspect_ratio, **common)


@task(name="submit", task_run_name="{step.name}", cache_key_fn=submit_cache_key, **_PERSISTED,
      **_TRANSIENT_RETRIES)
async def submit_step(
    job_id: str, step: PlannedStep, generation: GenerationSpec, parent: dict[str, Any] | None
) -> dict[str, Any]:
    """Create the Kling task for this step, or adopt the one that already carries its external id."""
    logger = get_run_logger()
    request = build_request(step, generation, parent)
    async with KlingClient(KlingSettings()) as client:
        result = await client.submit(request, step.external_task_id)
    snap = result.snapshot
    how = "adopted existing" if result.adopted else "created"
    logger.info(
        "%s Kling %s task %s (external_task_id=%s, request_id=%s, status=%s)",
        how, step.kind, snap.task_id, step.external_task_id, snap.request_id, snap.task_status,
    )
    events.task_submitted(job_id, step, snap, adopted=result.adopted)
    publish(Notice(job_id, step.index, step.name, "submitted", {"task_id": snap.task_id,
                                                              "adopted": result.adopted}))
    return {"task_id": snap.task_id, "adopted": result.adopted, "request_id": snap.request_id,
            "external_task_id": step.external_task_id}


@task(name="wait", task_run_name="wait-{step.name}", cache_key_fn=wait_cache_key, **_PERSISTED,
      **_TRANSIENT_RETRIES)
async def wait_step(job_id: str, step: PlannedStep, kind: TaskKind, task_id: str) -> dict[str, Any]:
    """Poll until the task ends; the final snapshot (ids, url, duration, credits) is the cached result."""
    logger = get_run_logger()
    processing_since: list[int] = []

    async def on_update(snap: TaskSnapshot) -> None:
        if snap.task_status == "processing" and not processing_since:
            processing_since.append(snap.updated_at)
        logger.info(
            "Kling task %s status: %s (external_task_id=%s, request_id=%s)",
            snap.task_id, snap.task_status, snap.external_task_id, snap.request_id,
        )
        publish(Notice(job_id, step.index, step.name, snap.task_status, {"task_id": snap.task_id}))

    try:
        async with KlingClient(KlingSettings()) as client:
            final = await client.wait(kind, task_id, on_update=on_update)
    except Exception as exc:
        snapshot = getattr(exc, "snapshot", None)
        if snapshot is not None and snapshot.task_status == "failed":
            events.task_failed(job_id, step, snapshot)
        raise
    summary = summarize(final, processing_since[0] if processing_since else None)
    logger.info(
        "Kling task %s succeeded: video %s, %.3f s, %s credits, queued %.1f s, processing %.1f s",
        task_id, summary["video_id"], summary["duration"], summary["credits"],
        summary["queued_seconds"], summary["processing_seconds"],
    )
    events.task_succeeded(job_id, step, final, summary)
    return summary


def summarize(final: TaskSnapshot, processing_since_ms: int | None) -> dict[str, Any]:
    video = final.video
    assert video is not None, "a succeeded Kling task always carries a video"
    started = processing_since_ms or final.created_at
    return {
        "task_id": final.task_id,
        "external_task_id": final.external_task_id,
        "status": final.task_status,
        "video_id": video.id,
        "url": video.url,
        "duration": video.duration,
        "credits": final.credits,
        "request_id": final.request_id,
        "queued_seconds": max(0.0, (started - final.created_at) / 1000),
        "processing_seconds": max(0.0, (final.updated_at - started) / 1000),
    }


@task(name="store", task_run_name="store-{step.label}", cache_key_fn=store_cache_key, **_PERSISTED,
      **_TRANSIENT_RETRIES)
async def store_step(job_id: str, step: PlannedStep, kind: TaskKind, task_id: str, dest: str) -> dict[str, Any]:
    """Stream the step's video into the sink; idempotent (HEAD first), verified, never half-written."""
    logger = get_run_logger()
    settings = KlingSettings()
    sink = open_sink(dest)
    key = step_key(job_id, step.index)
    stored = await asyncio.to_thread(sink.head, key)
    if stored is None:
        # Ask Kling again rather than trusting a cached URL: result URLs can expire before the video does.
        async with KlingClient(settings) as client:
            snap = await client.get(kind, task_id)
        video = snap.video
        assert video is not None, f"Kling task {task_id} has no video to store"
        metadata = {"job_id": job_id, "task_id": task_id, "step": str(step.index),
                    "external_task_id": step.external_task_id}
        stored = await asyncio.to_thread(
            sink.store_from_url, video.url, key, metadata=metadata, allow_private=settings.allow_private_urls
        )
        logger.info("stored %s (%d bytes, sha256 %s)", stored.uri, stored.size, stored.sha256)
    else:
        logger.info("already stored at %s (sha256 %s)", stored.uri, stored.sha256)
    events.video_stored(job_id, step, task_id, stored)
    publish(Notice(job_id, step.index, step.name, "stored", {"uri": stored.uri}))
    return stored.model_dump(mode="json")
