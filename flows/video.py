"""produce_video: generate -> extend x N -> store every step, resumable without paying twice.

The flow is thin: it orders the steps and records them. Paying, polling and storing live in
kling_tasks.steps, whose cache keys are Kling ids, so a rerun skips finished steps as Cached and
re-attaches to tasks still in flight.
"""

from __future__ import annotations

from datetime import UTC, date, datetime
from typing import Any

from prefect import flow, get_run_logger, tags
from prefect.runtime import flow_run

from kling_tasks.api import TaskFailedError
from kling_tasks.jobs import VideoJob
from kling_tasks.preflight import prepare
from kling_tasks.progress import Notice, publish
from kling_tasks.recorder import JobRecorder
from kling_tasks.settings import KlingSettings
from kling_tasks.steps import store_step, submit_step, wait_step


class KlingStepFailed(RuntimeError):
    """A Kling task ended `failed`. It is not resubmitted unless the user asks (--resubmit-failed)."""


def run_date() -> date:
    """The day this run was scheduled for: stable across retries of the run, unlike today's date."""
    scheduled = flow_run.scheduled_start_time
    return scheduled.date() if scheduled else datetime.now(UTC).date()


def job_run_name() -> str:
    job = flow_run.parameters.get("job")
    if isinstance(job, dict):
        job = VideoJob.model_validate(job)
    return job.for_date(run_date()).effective_job_id() if isinstance(job, VideoJob) else "produce-video"


@flow(name="produce-video", flow_run_name=job_run_name)
async def produce_video(job: VideoJob, resubmit_failed: bool = False) -> str:
    """Produce one long video and return the URI of final.mp4."""
    logger = get_run_logger()
    job = job.for_date(run_date())
    settings = KlingSettings()
    prepared = prepare(job, settings, resubmit_failed=resubmit_failed)
    plan = prepared.plan
    logger.info(
        "job %s: %d step(s) with %s %s, estimated %g credits, storing under %s",
        plan.job_id, len(plan.steps), plan.model_name, plan.mode, plan.estimated_credits, job.dest,
    )
    recorder = JobRecorder(prepared.sink, job, plan, settings.provider, prepared.previous)
    parent: dict[str, Any] | None = None
    with tags(f"provider:{settings.provider}", f"model:{plan.model_name}", f"job:{plan.job_id}"):
        for step in plan.steps:
            publish(Notice(plan.job_id, step.index, step.name, "planned", {"total": len(plan.steps)}))
            submission = await submit_step(plan.job_id, step, job.generate, parent)
            recorder.submitted(step, submission)
            try:
                summary = await wait_step(plan.job_id, step, step.kind, submission["task_id"])
            except TaskFailedError as exc:
                message = exc.snapshot.task_status_msg or "no reason given"
                recorder.failed(step, message)
                raise KlingStepFailed(
                    f"Kling task {submission['task_id']} ({step.name}) failed: {message}. "
                    "Nothing was resubmitted; rerun with --resubmit-failed to pay for a new attempt."
                ) from exc
            recorder.finished(step, summary)
            stored = await store_step(plan.job_id, step, step.kind, submission["task_id"], job.dest)
            recorder.stored(step, stored)
            parent = summary
    final = recorder.finish()
    logger.info("final video: %s (%d bytes, sha256 %s)", final.uri, final.size, final.sha256)
    publish(Notice(plan.job_id, len(plan.steps) - 1, "final", "done", {"uri": final.uri}))
    return final.uri
