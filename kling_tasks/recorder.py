"""The job's ledger (DESIGN §4): manifest.json at the destination, every step transition written once.

The intent before each create POST (`submitting`), the task id after it, Kling's status while it renders,
the video after the wait, the stored object after the store. Each transition that changes the ledger is
written, then fanned out to the observers (Prefect artifacts, Prefect events, the CLI's live view); a
transition a rerun replays from the cache changes nothing, so it is neither rewritten nor announced again.

Tasks find the ledger of their job with `active(job_id)`: the flow opens it around the steps.
"""

from __future__ import annotations

import logging
import threading
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Protocol

from prefect.logging import get_run_logger

from kling_tasks.jobs import Plan, PlannedStep, VideoJob
from kling_tasks.manifest import (
    Manifest,
    StepRecord,
    final_key,
    manifest_key,
    replaced_manifest_key,
    save_manifest,
    step_key,
)
from kling_tasks.messenger import Messenger
from kling_tasks.observability.contact_sheet import contact_sheet_key, store_contact_sheet
from kling_tasks.step_results import Rendered, Submission
from kling_tasks.storage import Sink, StoredObject

logger = logging.getLogger(__name__)


def _now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass(frozen=True)
class Transition:
    """One change of one step: `stage` is submitting | refused | submitted | status | succeeded | failed |
    stored."""

    stage: str
    record: StepRecord
    detail: dict[str, Any] = field(default_factory=dict)


class LedgerObserver(Protocol):
    """Told about the ledger: the whole of it at the start, each transition, and how the job ended."""

    def started(self, manifest: Manifest) -> None: ...

    def changed(self, manifest: Manifest, transition: Transition) -> None: ...

    def failed(self, manifest: Manifest) -> None: ...

    def finished(self, manifest: Manifest, final: StoredObject, sheet: StoredObject | None) -> None: ...


def _log() -> logging.Logger | logging.LoggerAdapter[logging.Logger]:
    """The run's logger (lines show in the Prefect UI), or this module's outside a run."""
    try:
        return get_run_logger()
    except Exception:
        return logger


def _warn(what: str, exc: Exception) -> None:
    _log().warning("%s failed (the step is not affected): %s: %s", what, type(exc).__name__, exc)


_ACTIVE: dict[str, JobRecorder] = {}


def active(job_id: str) -> JobRecorder | None:
    """The ledger the flow opened for `job_id` in this process, if any (tasks run in the flow's process)."""
    return _ACTIVE.get(job_id)


def default_observers(sink: Sink, plan: Plan, run_tags: tuple[str, ...]) -> list[LedgerObserver]:
    """Artifacts of the current flow run (if there is one), Prefect events, the in-process progress feed."""
    from kling_tasks.events import EventEmitter
    from kling_tasks.observability.artifacts import publisher_for_current_run
    from kling_tasks.progress import ProgressFeed

    observers: list[LedgerObserver] = [EventEmitter(plan.job_id), ProgressFeed(plan.job_id)]
    publisher = publisher_for_current_run(sink, plan.job_id, run_tags)
    if publisher is not None:
        observers.insert(0, publisher)
    return observers


class JobRecorder:
    def __init__(self, sink: Sink, job: VideoJob, plan: Plan, provider: str, previous: Manifest | None, *,
                 account: str | None = None, replaced: Manifest | None = None,
                 observers: list[LedgerObserver] | None = None):
        self.sink = sink
        self.plan = plan
        self.observers = observers if observers is not None else []
        # Transitions come from the flow and from worker threads (the write-ahead intent, concurrent stores):
        # one at a time, so each save carries a consistent ledger and saves land in order.
        self._lock = threading.RLock()
        self._messenger = Messenger(self.observers, _warn)  # observers are told off the paid steps' path
        if replaced is not None:
            self._set_aside(replaced)
        kept = {record.external_task_id: record for record in (previous.steps if previous else [])}
        steps = [
            kept.get(step.external_task_id)
            or StepRecord(index=step.index, name=step.name, kind=step.kind, external_task_id=step.external_task_id,
                          attempt=step.attempt, content_digest=step.content_digest)
            for step in plan.steps
        ]
        now = _now()
        self.manifest = Manifest(
            job_id=plan.job_id, provider=provider, account=account, spec=job.public_spec(),
            continuation=plan.continuation if len(plan.steps) > 1 else None,
            estimated_credits=plan.estimated_credits, steps=steps, status="running", final_uri=None,
            created_at=previous.created_at if previous else now, updated_at=now,
        )
        self.save()
        self._notify("started")

    # ---- the ledger as a context: tasks of this job find it with active(job_id) ---------------------------

    def __enter__(self) -> JobRecorder:
        _ACTIVE[self.plan.job_id] = self
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        if _ACTIVE.get(self.plan.job_id) is self:
            del _ACTIVE[self.plan.job_id]
        self._messenger.close()  # what is held is told; the observers' thread ends (a worker runs many jobs)
        if exc is not None and self.manifest.status == "running":
            # A run that stopped on an error (1102, an ambiguous create, a broken destination) says so; each step
            # keeps its own status, which is what a rerun resumes from.
            try:
                with self._lock:
                    self.manifest.status = "failed"
                self.save()
            except Exception as error:  # the destination itself may be what broke: keep the run's own error
                _log().warning("could not record the stop in the manifest: %s", error)

    def _set_aside(self, replaced: Manifest) -> None:
        """--replace: keep the other job's manifest next to the new one, byte for byte."""
        old = self.sink.read_bytes(manifest_key(self.plan.job_id))
        if old is not None:
            key = replaced_manifest_key(self.plan.job_id, datetime.now(UTC))
            self.sink.write_bytes(key, old, "application/json")
            _log().warning("job folder held another job (%s steps); its manifest is kept as %s",
                           len(replaced.steps), key)

    def _notify(self, hook: str, *args: Any) -> None:
        with self._lock:  # observers read a copy: another thread may be recording the next transition
            manifest = self.manifest.model_copy(deep=True)
        self._messenger.tell(hook, manifest, *args)

    def flush(self) -> None:
        """Wait until the observers have been told everything (a job's end: its artifacts are complete)."""
        self._messenger.flush()

    async def flushed(self) -> None:
        """flush() for the event loop, holding no thread while it waits."""
        await self._messenger.flushed()

    def save(self) -> None:
        with self._lock:
            self.manifest.updated_at = _now()
            save_manifest(self.sink, self.manifest)

    def record(self, step: PlannedStep) -> StepRecord:
        return self.manifest.steps[step.index]

    def _transition(self, step: PlannedStep, stage: str, detail: dict[str, Any] | None = None,
                    **fields: Any) -> None:
        """Apply `fields` to the step's record; only a real change is written and announced."""
        with self._lock:
            record = self.record(step)
            if all(getattr(record, name) == value for name, value in fields.items()):
                return
            for name, value in fields.items():
                setattr(record, name, value)
            record.updated_at = _now()
            self.save()
            snapshot = record.model_copy()
        self._notify("changed", Transition(stage, snapshot, detail or {}))

    # ---- what the tasks need to know from the ledger -------------------------------------------------------

    def may_exist(self, step: PlannedStep) -> bool:
        """An earlier run recorded the intent to create this step and never saw the answer."""
        record = self.record(step)
        return record.status == "submitting" and record.task_id is None

    def rendered_before(self, step: PlannedStep) -> bool:
        """Kling finished this step in an earlier run: resuming it needs no account slot."""
        record = self.record(step)
        return record.status in ("succeed", "stored") and record.video_id is not None

    def proven_sha256(self, step: PlannedStep, task_id: str) -> str | None:
        """The sha256 the ledger recorded for this very task's stored video (proof for a local file)."""
        record = self.record(step)
        return record.sha256 if record.task_id == task_id and record.status == "stored" else None

    def proven_clip_sha256(self, step: PlannedStep, task_id: str) -> str | None:
        """The sha256 the ledger recorded for this very task's clip (a last-frame job's clip-NN.mp4)."""
        record = self.record(step)
        return record.clip_sha256 if record.task_id == task_id else None

    # ---- transitions ---------------------------------------------------------------------------------------

    def submitting(self, step: PlannedStep) -> None:
        """Written before the create POST: a crash before its answer leaves this intent for the rerun."""
        if self.record(step).task_id is None:
            self._transition(step, "submitting", status="submitting")

    def refused(self, step: PlannedStep) -> None:
        """Kling answered the create with a definite refusal (1302/1303): nothing was created, so the intent
        is withdrawn and a rerun after a crash during the wait for room may simply create it."""
        record = self.record(step)
        if record.status == "submitting" and record.task_id is None:
            self._transition(step, "refused", status="pending")

    def submitted(self, step: PlannedStep, submission: Submission) -> None:
        record = self.record(step)
        later = record.status in ("processing", "succeed", "stored") and record.task_id == submission.task_id
        self._transition(step, "submitted", {"adopted": submission.adopted, "status": submission.status},
                         task_id=submission.task_id, request_id=record.request_id or submission.request_id,
                         status=record.status if later else "submitted")

    def status(self, step: PlannedStep, word: str) -> None:
        """Kling's status while the task renders; words we don't know are shown but not written as status."""
        record = self.record(step)
        if record.status in ("succeed", "stored"):
            return
        if word == "processing":
            self._transition(step, "status", {"status": word}, status="processing")
        else:
            self._notify("changed", Transition("status", record.model_copy(), {"status": word}))

    def succeeded(self, step: PlannedStep, rendered: Rendered) -> None:
        record = self.record(step)
        self._transition(
            step, "succeeded", status="stored" if record.status == "stored" else "succeed", status_msg=None,
            task_id=rendered.task_id, video_id=rendered.video_id, duration=rendered.duration,
            credits=rendered.credits, queued_seconds=rendered.queued_seconds,
            processing_seconds=rendered.processing_seconds,
        )

    def failed(self, step: PlannedStep, message: str) -> None:
        with self._lock:
            self.manifest.status = "failed"
            self.save()
        self._transition(step, "failed", status="failed", status_msg=message)
        self._notify("failed")
        self.flush()

    def stored(self, step: PlannedStep, stored: StoredObject) -> None:
        self._transition(step, "stored", status="stored", uri=stored.uri, size=stored.size, sha256=stored.sha256)

    def clip_stored(self, step: PlannedStep, stored: StoredObject) -> None:
        self._transition(step, "clip stored", {"uri": stored.uri}, clip_uri=stored.uri, clip_size=stored.size,
                         clip_sha256=stored.sha256)

    def start_frame(self, step: PlannedStep, frame: StoredObject) -> None:
        """The image this continuation starts from, before its create is sent."""
        self._transition(step, "start frame", {"uri": frame.uri}, start_frame_sha256=frame.sha256)

    def stitched(self, step: PlannedStep, stored: StoredObject, method: str | None, seconds: float | None) -> None:
        self._transition(step, "stored", {"stitched_by": method}, status="stored", uri=stored.uri,
                         size=stored.size, sha256=stored.sha256, stitched_by=method, total_seconds=seconds)

    def finish(self, *, flush: bool = True) -> StoredObject:
        """Publish the last step's video as final.mp4 (a server-side copy, not a second download), then tell the
        observers and (unless `flush` is off: the caller awaits flushed()) wait until they are told."""
        last = self.plan.steps[-1]
        final = self.sink.head(final_key(self.plan.job_id))
        unchanged = final is not None and final.sha256 == self.manifest.steps[-1].sha256
        if final is None or not unchanged:
            final = self.sink.copy(step_key(self.plan.job_id, last.index), final_key(self.plan.job_id))
        self.manifest.final_uri = final.uri
        self.manifest.status = "succeeded"
        self.save()
        self._notify("finished", final, self._contact_sheet(final, reuse=unchanged))
        if flush:
            self.flush()
        return final

    def _contact_sheet(self, final: StoredObject, *, reuse: bool) -> StoredObject | None:
        """One frame per segment, next to the videos; a failure only costs the picture."""
        if reuse:  # a rerun of a finished job: the sheet already shows this very final.mp4
            existing = self.sink.head(contact_sheet_key(self.plan.job_id))
            if existing is not None:
                return existing
        # The video's length after each step: Kling's (video-extend delivers the whole) or the stitched length.
        durations = [record.total_seconds or record.duration or 0.0 for record in self.manifest.steps]
        try:
            sheet = store_contact_sheet(self.sink, self.plan.job_id, final.key, durations, final.size)
        except Exception as exc:
            _warn("making the contact sheet", exc)
            return None
        if sheet is not None:
            _log().info("contact sheet stored at %s (%d bytes)", sheet.uri, sheet.size)
        return sheet
