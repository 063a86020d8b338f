"""Keeps the job's manifest.json at the destination up to date: rewritten after every step.

It is also the one hook every step passes through (Cached ones too), so it drives the observability:
the Prefect artifacts of the run and the contact sheet. Those are best effort: a failure logs a warning.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime
from typing import Any, Protocol

from prefect.logging import get_run_logger

from kling_tasks.jobs import Plan, PlannedStep, VideoJob
from kling_tasks.manifest import Manifest, StepRecord, final_key, save_manifest, step_key
from kling_tasks.observability.artifacts import publisher_for_current_run
from kling_tasks.observability.contact_sheet import contact_sheet_key, store_contact_sheet
from kling_tasks.storage import Sink, StoredObject

logger = logging.getLogger(__name__)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


class JobObserver(Protocol):
    """Told about every manifest change (kling_tasks.observability.artifacts.ArtifactPublisher in a run)."""

    def started(self, manifest: Manifest) -> None: ...

    def changed(self, manifest: Manifest) -> None: ...

    def failed(self, manifest: Manifest) -> None: ...

    def finished(self, manifest: Manifest, final: StoredObject, sheet: StoredObject | None) -> None: ...


_IN_CURRENT_RUN: Any = object()  # default observer: the current flow run's artifacts, if there is a run


def _log() -> logging.Logger | logging.LoggerAdapter[logging.Logger]:
    """The run's logger (lines show in the Prefect UI), or this module's outside a run."""
    try:
        return get_run_logger()
    except Exception:
        return logger


def _warn(what: str, exc: Exception) -> None:
    _log().warning("%s failed (the step is not affected): %s: %s", what, type(exc).__name__, exc)


class JobRecorder:
    def __init__(self, sink: Sink, job: VideoJob, plan: Plan, provider: str, previous: Manifest | None,
                 observer: JobObserver | None = _IN_CURRENT_RUN):
        self.sink = sink
        self.plan = plan
        if observer is _IN_CURRENT_RUN:
            run_tags = (f"provider:{provider}", f"model:{plan.model_name}", f"job:{plan.job_id}")
            observer = publisher_for_current_run(sink, plan.job_id, run_tags)
        self.observer: JobObserver | None = observer
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
        self._notify("started")

    def _notify(self, hook: str, *args: Any) -> None:
        if self.observer is None:
            return
        try:
            getattr(self.observer, hook)(self.manifest, *args)
        except Exception as exc:  # observability must never fail (and so re-pay) a step
            _warn(f"publishing the job's {hook} state", exc)

    def save(self) -> None:
        self.manifest.updated_at = _now()
        save_manifest(self.sink, self.manifest)

    def _update(self, step: PlannedStep, **fields: Any) -> None:
        record = self.manifest.steps[step.index]
        for name, value in fields.items():
            setattr(record, name, value)
        record.updated_at = _now()
        self.save()
        if fields.get("status") != "failed":  # failed() publishes its own, fuller picture
            self._notify("changed")

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
        self._notify("failed")

    def stored(self, step: PlannedStep, stored: dict[str, Any]) -> None:
        self._update(step, status="stored", uri=stored["uri"], size=stored["size"], sha256=stored["sha256"])

    def finish(self) -> StoredObject:
        """Publish the last step's video as final.mp4 (a server-side copy, not a second download)."""
        last = self.plan.steps[-1]
        final = self.sink.head(final_key(self.plan.job_id))
        unchanged = final is not None and final.sha256 == self.manifest.steps[-1].sha256
        if final is None or not unchanged:
            final = self.sink.copy(step_key(self.plan.job_id, last.index), final_key(self.plan.job_id))
        self.manifest.final_uri = final.uri
        self.manifest.status = "succeeded"
        self.save()
        self._notify("finished", final, self._contact_sheet(final, reuse=unchanged))
        return final

    def _contact_sheet(self, final: StoredObject, *, reuse: bool) -> StoredObject | None:
        """One frame per segment, next to the videos; a failure only costs the picture."""
        if reuse:  # a rerun of a finished job: the sheet already shows this very final.mp4
            existing = self.sink.head(contact_sheet_key(self.plan.job_id))
            if existing is not None:
                return existing
        durations = [record.duration or 0.0 for record in self.manifest.steps]
        try:
            sheet = store_contact_sheet(self.sink, self.plan.job_id, final.key, durations, final.size)
        except Exception as exc:
            _warn("making the contact sheet", exc)
            return None
        if sheet is not None:
            _log().info("contact sheet stored at %s (%d bytes)", sheet.uri, sheet.size)
        return sheet
