"""Keeps the job's manifest.json at the destination up to date: rewritten after every step."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from kling_tasks.jobs import Plan, PlannedStep, VideoJob
from kling_tasks.manifest import Manifest, StepRecord, final_key, save_manifest, step_key
from kling_tasks.storage import Sink, StoredObject


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class JobRecorder:
    def __init__(self, sink: Sink, job: VideoJob, plan: Plan, provider: str, previous: Manifest | None):
        self.sink = sink
        self.plan = plan
        kept = {record.external_task_id: record for record in (previous.steps if previous else [])}
        steps = [
            kept.get(step.external_task_id)
            or StepRecord(index=step.index, name=step.name, kind=step.kind,
                          external_task_id=step.external_task_id, task_id=None, video_id=None,
                          status="pending", status_msg=None, duration=None, credits=None,
                          queued_seconds=None, processing_seconds=None, uri=None, size=None,
                          sha256=None, request_id=None, updated_at=None)
            for step in plan.steps
        ]
        now = _now()
        self.manifest = Manifest(
            job_id=plan.job_id, provider=provider, spec=job.public_spec(),
            estimated_credits=plan.estimated_credits, steps=steps, status="running", final_uri=None,
            created_at=previous.created_at if previous else now, updated_at=now,
        )
        self.save()

    def save(self) -> None:
        self.manifest.updated_at = _now()
        save_manifest(self.sink, self.manifest)

    def _update(self, step: PlannedStep, **fields: Any) -> None:
        record = self.manifest.steps[step.index]
        for name, value in fields.items():
            setattr(record, name, value)
        record.updated_at = _now()
        self.save()

    def submitted(self, step: PlannedStep, submission: dict[str, Any]) -> None:
        record = self.manifest.steps[step.index]
        status = record.status if record.status in ("succeed", "stored") else "submitted"
        self._update(step, task_id=submission["task_id"], request_id=submission["request_id"], status=status)

    def finished(self, step: PlannedStep, summary: dict[str, Any]) -> None:
        record = self.manifest.steps[step.index]
        self._update(
            step, status="stored" if record.status == "stored" else "succeed", status_msg=None,
            video_id=summary["video_id"], duration=summary["duration"], credits=summary["credits"],
            queued_seconds=summary["queued_seconds"], processing_seconds=summary["processing_seconds"],
        )

    def failed(self, step: PlannedStep, message: str) -> None:
        self.manifest.status = "failed"
        self._update(step, status="failed", status_msg=message)

    def stored(self, step: PlannedStep, stored: dict[str, Any]) -> None:
        self._update(step, status="stored", uri=stored["uri"], size=stored["size"], sha256=stored["sha256"])

    def finish(self) -> StoredObject:
        """Publish the last step's video as final.mp4 (a server-side copy, not a second download)."""
        last = self.plan.steps[-1]
        final = self.sink.head(final_key(self.plan.job_id))
        if final is None or final.sha256 != self.manifest.steps[-1].sha256:
            final = self.sink.copy(step_key(self.plan.job_id, last.index), final_key(self.plan.job_id))
        self.manifest.final_uri = final.uri
        self.manifest.status = "succeeded"
        self.save()
        return final
