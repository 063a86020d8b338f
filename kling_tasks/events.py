"""Prefect events for Kling state changes, so users can build automations (e.g. notify on failure).

An observer of the job's ledger (kling_tasks.recorder): each new transition of a step becomes one event.
Every event names the Kling task as its resource (`kling.task.{task_id}`) and the job as a related resource
(`kling.job.{job_id}`, role `job`); Prefect adds the flow run and task run it was emitted from as related
resources. Payloads carry ids, seconds, credits and URIs, never credentials. See docs/observability.md.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Any

from prefect.events import emit_event

from kling_tasks.manifest import Manifest, StepRecord

if TYPE_CHECKING:
    from kling_tasks.recorder import Transition
    from kling_tasks.storage import StoredObject

logger = logging.getLogger(__name__)

# ledger stage -> (event name, the step record's fields that make its payload)
EVENTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "submitted": ("kling.task.submitted", ("request_id",)),
    "succeeded": ("kling.task.succeeded", ("video_id", "duration", "credits", "queued_seconds",
                                           "processing_seconds")),
    "failed": ("kling.task.failed", ()),
    "stored": ("kling.video.stored", ("uri", "size", "sha256", "stitched_by", "total_seconds")),
    "clip stored": ("kling.clip.stored", ("clip_uri", "clip_size", "clip_sha256")),
    "start frame": ("kling.frame.extracted", ("start_frame_sha256",)),
}


def emit_step_event(name: str, job_id: str, record: StepRecord, payload: dict[str, Any]) -> None:
    task_id = record.task_id or "unknown"
    resource = {
        "prefect.resource.id": f"kling.task.{task_id}",
        "prefect.resource.name": record.name,
        "kling.external_task_id": record.external_task_id,
        "kling.step": str(record.index),
        "kling.kind": record.kind,
    }
    related = [{"prefect.resource.id": f"kling.job.{job_id}", "prefect.resource.role": "job",
                "prefect.resource.name": job_id}]
    try:
        emit_event(event=name, resource=resource, related=related,
                   payload={"job_id": job_id, "task_id": task_id, "external_task_id": record.external_task_id,
                            **payload})
    except Exception as exc:  # events are best effort: never fail (and so retry or re-pay) a step for one
        logger.warning("could not emit %s for Kling task %s: %s: %s", name, task_id, type(exc).__name__, exc)


class EventEmitter:
    """Turns the ledger's transitions into Prefect events."""

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id

    def started(self, manifest: Manifest) -> None:
        return None

    def changed(self, manifest: Manifest, transition: Transition) -> None:
        if transition.stage not in EVENTS:
            return
        name, fields = EVENTS[transition.stage]
        record = transition.record
        payload: dict[str, Any] = {field: getattr(record, field) for field in fields}
        if transition.stage == "submitted":
            payload.update(adopted=transition.detail.get("adopted"), status=transition.detail.get("status"))
        if transition.stage == "failed":
            payload["task_status_msg"] = record.status_msg
        emit_step_event(name, self.job_id, record, payload)

    def failed(self, manifest: Manifest) -> None:
        return None

    def finished(self, manifest: Manifest, final: StoredObject, sheet: StoredObject | None) -> None:
        return None
