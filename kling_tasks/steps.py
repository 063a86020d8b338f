"""The Prefect tasks of one step: submit (idempotent create), wait (poll), store (stream to the sink).

Caching (DESIGN §2.5): explicit, versioned keys made of Kling ids and the account (kling_tasks.identity),
persisted as JSON, never Prefect's default policy (it contains the run id), never prompt text. POST and poll
are separate tasks, so nothing but the exactly-once submit ever sends a create.

Retries (DESIGN §3): one layer per failure kind. The client retries GETs and never-sent POSTs; back-pressure
(1302/1303: nothing was created) waits here, against a deadline in minutes; only the store is retried by
Prefect (a cut download, an S3 5xx); everything else fails the step with Kling's code.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import inspect
import json
import random
import time
from collections.abc import Awaitable, Callable
from typing import Any, ParamSpec, TypeVar

from prefect import task
from prefect.context import TaskRunContext
from prefect.logging import get_run_logger
from prefect.tasks import exponential_backoff
from pydantic import SecretStr

from kling_tasks import identity, image_sources, recorder, task_lengths
from kling_tasks.api import BackPressureError, KlingClient, KlingError, TaskKind, TaskSnapshot
from kling_tasks.jobs import GenerationSpec, PlannedStep
from kling_tasks.kling_requests import build_request
from kling_tasks.manifest import clip_key, step_key
from kling_tasks.settings import KlingSettings, load_settings
from kling_tasks.step_results import Rendered, StartImage, Submission
from kling_tasks.storage import DownloadError, Sink, StorageError, StoredObject, open_sink
from kling_tasks.transfers import run_transfer

BACKPRESSURE_MAX_DELAY = 30.0
EXPIRED_LINK = {401, 403, 410}  # what a signed result URL answers once it has lapsed


def submit_cache_key(_: TaskRunContext, parameters: dict[str, Any]) -> str:
    return identity.submit_key(parameters["account"], parameters["step"].external_task_id)


def wait_cache_key(_: TaskRunContext, parameters: dict[str, Any]) -> str:
    return identity.wait_key(parameters["account"], parameters["task_id"])


def store_cache_key(_: TaskRunContext, parameters: dict[str, Any]) -> str:
    resolved = open_sink(parameters["dest"]).dest  # an absolute folder, or s3://bucket/prefix
    key = object_key(parameters["job_id"], parameters["step"].index, parameters.get("clip", False))
    return identity.store_key(parameters["account"], parameters["task_id"], resolved, key)


def object_key(job_id: str, index: int, clip: bool) -> str:
    """Where a step's Kling video goes: step-NN.mp4, or clip-NN.mp4 in a last-frame job (which stitches)."""
    return clip_key(job_id, index) if clip else step_key(job_id, index)


async def retry_if_storage_transient(task: Any, task_run: Any, state: Any) -> bool:
    """Retry a store only for failures that may pass: a cut download, a 5xx, S3 unreachable.

    Kling errors inside the store (the fresh-URL GET) were already retried by the client: not again here.
    Async on purpose: in an async task `state.result()` returns a coroutine and would hide the exception.
    """
    try:
        await state.aresult()
    except StorageError as exc:
        return exc.retryable
    except Exception:
        return False
    return False


P = ParamSpec("P")
R = TypeVar("R")


def names_its_step(fn: Callable[P, Awaitable[R]]) -> Callable[P, Awaitable[R]]:
    """A Kling error leaving this step's task names the step (`extend-1-of-2: ... (code=1102, ...)`), so the run's
    one-line stop says where it stopped and not only which external id. Prefect sees the wrapped signature."""
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    async def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
        try:
            return await fn(*args, **kwargs)
        except KlingError as exc:
            step = signature.bind(*args, **kwargs).arguments.get("step")
            if exc.step is None and isinstance(step, PlannedStep):
                exc.step = step.name
            raise

    return wrapper


PERSISTED: dict[str, Any] = {"persist_result": True, "result_serializer": "json", "refresh_cache": False}


def _ledger(job_id: str) -> recorder.JobRecorder | None:
    return recorder.active(job_id)


_CLIENTS: dict[tuple[object, str, asyncio.AbstractEventLoop], KlingClient] = {}


def kling_client(settings: KlingSettings) -> KlingClient:
    """One Kling client (one HTTP connection pool) per process, settings and event loop, never closed by a step.

    A client per call cost a new TLS context (~10 ms of CPU) and a new connection every time: the biggest CPU
    cost per step in bench/overhead.py. Keyed on everything in the settings (secrets hashed), so another
    account or provider gets its own client; a closed loop's clients are dropped.
    """
    values = {k: v.get_secret_value() if isinstance(v, SecretStr) else v for k, v in settings.model_dump().items()}
    fingerprint = hashlib.sha256(json.dumps(values, sort_keys=True, default=str).encode()).hexdigest()
    key = (KlingClient, fingerprint, asyncio.get_running_loop())
    client = _CLIENTS.get(key)
    if client is None:
        for old in [k for k in _CLIENTS if k[2].is_closed()]:
            del _CLIENTS[old]
        client = _CLIENTS[key] = KlingClient(settings)
    return client


@task(name="submit", task_run_name="{step.name}", cache_key_fn=submit_cache_key, **PERSISTED)
@names_its_step
async def submit_step(
    job_id: str, step: PlannedStep, generation: GenerationSpec, parent: Rendered | None, account: str, *,
    may_exist: bool = False, adopt_task_id: str | None = None, assume_not_created: bool = False,
    start_image: StartImage | None = None,
) -> Submission:
    """Create the Kling task for this step, or adopt the one that already carries its external id.

    A last-frame continuation sends `start_image` (read from the sink, checked against its sha256)."""
    logger = get_run_logger()
    settings = load_settings()
    if start_image is not None:
        picture: bytes | None = await asyncio.to_thread(read_start_image, start_image)
    elif step.index == 0 and generation.image and not image_sources.is_url(generation.image):
        picture = await asyncio.to_thread(read_planned_image, step, generation.image)
    else:
        picture = None
    request = build_request(step, generation, parent, picture)
    ledger = _ledger(job_id)

    async def before_post() -> None:  # the write-ahead intent: a crash after the POST leaves it for the rerun
        if ledger is not None:
            await asyncio.to_thread(ledger.submitting, step)

    deadline = time.monotonic() + settings.backpressure_timeout_seconds
    refusals = 0
    client = kling_client(settings)
    if parent is not None and parent.external_task_id:
        client.remember(parent.kind, parent.external_task_id, parent.task_id)  # a known task: a lookup control
    while True:
        try:
            result = await client.submit(request, step.external_task_id, may_exist=may_exist,
                                         before_post=before_post, adopt_task_id=adopt_task_id,
                                         assume_not_created=assume_not_created)
            break
        except BackPressureError as exc:
            if ledger is not None:  # a definite refusal created nothing: withdraw the intent
                await asyncio.to_thread(ledger.refused, step)
            delay = min(BACKPRESSURE_MAX_DELAY, 2.0**refusals) * random.uniform(1.0, 1.25)
            if time.monotonic() + delay > deadline:
                raise
            refusals += 1
            logger.warning("Kling refused the create of %s for now (%s); nothing was created, trying again "
                           "in %.0f s", step.external_task_id, exc, delay)
            await asyncio.sleep(delay)
    snap = result.snapshot
    logger.info(
        "%s Kling %s task %s (external_task_id=%s, request_id=%s, status=%s)",
        "adopted existing" if result.adopted else "created", step.kind, snap.task_id, step.external_task_id,
        snap.request_id, snap.task_status,
    )
    return Submission(task_id=snap.task_id, external_task_id=step.external_task_id, adopted=result.adopted,
                      request_id=snap.request_id, status=snap.task_status)


def read_start_image(image: StartImage) -> bytes:
    data = open_sink(image.dest).read_bytes(image.key)
    if data is None or hashlib.sha256(data).hexdigest() != image.sha256:
        raise StorageError(f"the start image {image.key} is gone or changed since it was extracted",
                           retryable=False)
    return data


def read_planned_image(step: PlannedStep, image: str) -> bytes:
    """The generation's file or S3 image, only if it is still the picture the step's id was made from (else
    the task would carry another picture than its id says: a rerun with the old picture would adopt it)."""
    data = image_sources.read_image(image)
    if image_sources.bytes_digest(data) != step.image_digest:
        raise StorageError(f"the image {image} changed since the job was planned; run the job again (a new "
                           "picture is a new task)", retryable=False)
    return data


def step_length_key(step: PlannedStep, generation: GenerationSpec) -> str:
    """The learned-length key of a step's Kling task (kling_tasks.task_lengths): an extension adds a fixed
    ~4.5 s whatever the generation's duration, so its key names no duration."""
    duration = "extend" if step.kind == "video-extend" else generation.duration
    return task_lengths.length_key(step.kind, generation.model_name, generation.mode, duration)


@task(name="wait", task_run_name="wait-{step.name}", cache_key_fn=wait_cache_key, **PERSISTED)
@names_its_step
async def wait_step(job_id: str, step: PlannedStep, kind: TaskKind, task_id: str, account: str,
                    length_key: str | None = None) -> Rendered:
    """Poll until the task ends; the final snapshot (ids, url, duration, credits) is the cached result.

    `length_key`: poll by what this account's earlier tasks of that key took (kling_tasks.task_lengths), and
    add this one's lengths to them; None polls adaptively and learns nothing.
    """
    logger = get_run_logger()
    ledger = _ledger(job_id)
    book = task_lengths.book_for(account) if length_key is not None else None
    expected = await book.expected(length_key) if book is not None and length_key is not None else None
    processing_since: list[int] = []

    async def on_update(snap: TaskSnapshot) -> None:
        if snap.task_status == "processing" and not processing_since:
            processing_since.append(snap.updated_at)
        logger.info(
            "Kling task %s status: %s (external_task_id=%s, request_id=%s)",
            snap.task_id, snap.task_status, snap.external_task_id, snap.request_id,
        )
        if ledger is not None and not snap.is_terminal:
            await asyncio.to_thread(ledger.status, step, snap.task_status)

    final = await kling_client(load_settings()).wait(kind, task_id, on_update=on_update, expected=expected)
    rendered = summarize(kind, final, processing_since[0] if processing_since else None)
    if book is not None and length_key is not None and processing_since:  # both phases seen: a clean sample
        book.record(length_key, rendered.queued_seconds, rendered.processing_seconds)
    logger.info(
        "Kling task %s succeeded: video %s, %.3f s, %s credits, queued %.1f s, processing %.1f s",
        task_id, rendered.video_id, rendered.duration, rendered.credits, rendered.queued_seconds,
        rendered.processing_seconds,
    )
    return rendered


def summarize(kind: TaskKind, final: TaskSnapshot, processing_since_ms: int | None) -> Rendered:
    video = final.video
    assert video is not None, "a succeeded Kling task always carries a video"
    started = processing_since_ms or final.created_at
    return Rendered(
        kind=kind, task_id=final.task_id, external_task_id=final.external_task_id, video_id=video.id,
        url=video.url, duration=video.duration, credits=final.credits, request_id=final.request_id,
        queued_seconds=max(0.0, (started - final.created_at) / 1000),
        processing_seconds=max(0.0, (final.updated_at - started) / 1000),
    )


def is_this_tasks(obj: StoredObject | None, task_id: str, proven_sha256: str | None) -> bool:
    """DESIGN §2.4: an object at a step's key is this step's only if it carries this task's id (S3 metadata)
    or the ledger recorded this task with the object's sha256 (a local folder keeps no metadata)."""
    if obj is None:
        return False
    if obj.task_id is not None:
        return obj.task_id == task_id
    return proven_sha256 is not None and obj.sha256 == proven_sha256


@task(name="store", task_run_name="store-{step.label}", cache_key_fn=store_cache_key, **PERSISTED,
      retries=4, retry_delay_seconds=exponential_backoff(backoff_factor=2), retry_jitter_factor=0.5,
      retry_condition_fn=retry_if_storage_transient)
@names_its_step
async def store_step(job_id: str, step: PlannedStep, kind: TaskKind, task_id: str, dest: str, account: str,
                     proven_sha256: str | None = None, clip: bool = False) -> StoredObject:
    """Stream the step's video into the sink, unless this very task's video is already there."""
    logger = get_run_logger()
    settings = load_settings()
    sink = open_sink(dest)
    key = object_key(job_id, step.index, clip)
    existing = await asyncio.to_thread(sink.head, key)
    if is_this_tasks(existing, task_id, proven_sha256):
        assert existing is not None
        logger.info("already stored at %s (sha256 %s)", existing.uri, existing.sha256)
        return existing
    if existing is not None:
        logger.warning("%s holds a video of another task; replacing it with task %s's", existing.uri, task_id)
    stored = await _download(settings, sink, kind, task_id, key, job_id, step)
    logger.info("stored %s (%d bytes, sha256 %s)", stored.uri, stored.size, stored.sha256)
    return stored


async def _download(settings: KlingSettings, sink: Sink, kind: TaskKind, task_id: str, key: str, job_id: str,
                    step: PlannedStep) -> StoredObject:
    metadata = {"job_id": job_id, "task_id": task_id, "step": str(step.index),
                "external_task_id": step.external_task_id}
    for fresh_urls in range(2):
        # Ask Kling again rather than trusting a cached URL: result URLs can expire before the video does.
        snap = await kling_client(settings).get(kind, task_id)
        if snap.video is None:
            raise RuntimeError(f"Kling task {task_id} has no video to store (status {snap.task_status})")
        try:
            return await run_transfer(sink.store_from_url, snap.video.url, key, metadata=metadata,
                                      allow_private=settings.allow_private_urls)
        except DownloadError as exc:
            # A signed URL refused as expired (403/410) may have lapsed since Kling handed it out: a fresh one,
            # once. The store task's retries would not help: they only retry what they call transient.
            if exc.status not in EXPIRED_LINK or fresh_urls:
                raise
            get_run_logger().warning("the result URL of task %s was refused (%s); asking Kling for a fresh one",
                                     task_id, exc)
    raise AssertionError("unreachable")


async def store_proven(job_id: str, step: PlannedStep, kind: TaskKind, task_id: str, dest: str, account: str,
                       proven_sha256: str | None, clip: bool = False) -> StoredObject:
    """The store task, and a check of what a Cached store claims: an object since deleted or overwritten by
    another task is stored again (the cache says what was stored, not what is there now)."""
    store = store_step.with_options(task_run_name=f"store-clip-{step.index:02d}") if clip else store_step
    stored = await store(job_id, step, kind, task_id, dest, account, proven_sha256, clip)
    current = await asyncio.to_thread(open_sink(dest).head, stored.key)
    if current is not None and current.sha256 == stored.sha256 and current.task_id in (None, task_id):
        return stored
    get_run_logger().warning("the cached store of %s is gone or changed at %s; storing it again",
                             step.label, stored.uri)
    return await store.with_options(refresh_cache=True)(job_id, step, kind, task_id, dest, account, None, clip)


async def store_into_ledger(ledger: recorder.JobRecorder, step: PlannedStep, task_id: str, dest: str,
                            account: str) -> None:
    """Store the step's video (proven, see store_proven) and record it in the job's ledger."""
    proven = ledger.proven_sha256(step, task_id)
    stored = await store_proven(ledger.plan.job_id, step, step.kind, task_id, dest, account, proven)
    await asyncio.to_thread(ledger.stored, step, stored)
