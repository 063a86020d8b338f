"""Prefect events for Kling state changes, so users can build automations (e.g. notify on failure).

Every event names the Kling task as its resource (`kling.task.{task_id}`) and the job as a related resource
(`kling.job.{job_id}`, role `job`); Prefect adds the flow run and task run it was emitted from as related
resources. Payloads carry ids, seconds, credits and URIs, never credentials. See docs/observability.md.
"""

from __future__ import annotations

import logging
from typing import Any

from prefect.events import emit_event

from kling_tasks.api import TaskSnapshot
from kling_tasks.jobs import PlannedStep
from kling_tasks.storage import StoredObject

logger = logging.getLogger(__name__)


def _resource(step: PlannedStep, task_id: str) -> dict[str, str]:
    return {
        "prefect.resource.id": f"kling.task.{task_id}",
        "prefect.resource.name": step.name,
        "kling.external_task_id": step.external_task_id,
        "kling.step": str(step.index),
        "kling.kind": step.kind,
    }


def _related(job_id: str) -> list[dict[str, str]]:
    return [{"prefect.resource.id": f"kling.job.{job_id}", "prefect.resource.role": "job",
             "prefect.resource.name": job_id}]


def _emit(name: str, job_id: str, step: PlannedStep, task_id: str, payload: dict[str, Any]) -> None:
    try:
        emit_event(event=name, resource=_resource(step, task_id), related=_related(job_id),
                   payload={"job_id": job_id, "task_id": task_id, "external_task_id": step.external_task_id,
                            **payload})
    except Exception as exc:  # events are best effort: never fail (and so retry or re-pay) a step for one
        logger.warning("could not emit %s for Kling task %s: %s: %s", name, task_id, type(exc).__name__, exc)


def task_submitted(job_id: str, step: PlannedStep, snap: TaskSnapshot, *, adopted: bool) -> None:
    _emit("kling.task.submitted", job_id, step, snap.task_id,
          {"adopted": adopted, "request_id": snap.request_id, "status": snap.task_status})


def task_succeeded(job_id: str, step: PlannedStep, snap: TaskSnapshot, summary: dict[str, Any]) -> None:
    _emit("kling.task.succeeded", job_id, step, snap.task_id,
          {key: summary[key] for key in ("video_id", "duration", "credits", "queued_seconds",
                                         "processing_seconds")})


def task_failed(job_id: str, step: PlannedStep, snap: TaskSnapshot) -> None:
    _emit("kling.task.failed", job_id, step, snap.task_id, {"task_status_msg": snap.task_status_msg})


def video_stored(job_id: str, step: PlannedStep, task_id: str, stored: StoredObject) -> None:
    _emit("kling.video.stored", job_id, step, task_id,
          {"uri": stored.uri, "size": stored.size, "sha256": stored.sha256})
