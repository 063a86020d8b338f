"""produce_video: generate -> extend x N -> store every step, resumable without paying twice.

The flow is thin: it orders the steps and records them. Paying, polling and storing live in
kling_tasks.steps, whose cache keys are Kling ids, so a rerun skips finished steps as Cached and
re-attaches to tasks still in flight.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from contextlib import AsyncExitStack
from datetime import UTC, date, datetime
from typing import Any

from prefect import flow, get_run_logger
from prefect.context import TagsContext
from prefect.runtime import flow_run

from kling_tasks.api import TaskFailedError
from kling_tasks.continuation_steps import clip_into_ledger, start_image_into_ledger, stitch_into_ledger
from kling_tasks.jobs import PlannedStep, VideoJob
from kling_tasks.preflight import prepare
from kling_tasks.recorder import JobRecorder, default_observers
from kling_tasks.settings import load_settings
from kling_tasks.slots import account_slot, ensure_account_limit
from kling_tasks.step_results import Rendered, StartImage
from kling_tasks.steps import step_length_key, store_into_ledger, submit_step, wait_step
from kling_tasks.storage import StoredObject
from kling_tasks.transfers import run_transfer


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


def job_run_tags(provider: str, model_name: str, job_id: str) -> tuple[str, ...]:
    """The tags of a job's flow run (its task runs get all but `job:`: task_run_tags). A caller that knows them
    (produce_batch) creates the run with them, which saves the artifact publisher a flow-run update per job."""
    return (f"provider:{provider}", f"model:{model_name}", f"job:{job_id}")


def task_run_tags(run_tags: tuple[str, ...]) -> TagsContext:
    """The job's task runs carry the run's tags but `job:`: Prefect checks a tagged task run's tags for
    concurrency limits through one service per distinct tag set, each with its own API client kept for the
    process's life, so a per-job tag made a batch of N jobs keep N clients. The flow run (named after the
    job) carries `job:`, and its task runs are listed under it."""
    inherited = {tag for tag in TagsContext.get().current_tags if not tag.startswith("job:")}
    return TagsContext(current_tags=inherited | {tag for tag in run_tags if not tag.startswith("job:")})


@flow(name="produce-video", flow_run_name=job_run_name)
async def produce_video(job: VideoJob, resubmit_failed: bool = False, replace: bool = False,
                        adopt: dict[str, str] | None = None, assume_not_created: list[str] | None = None) -> str:
    """Produce one long video and return the URI of final.mp4.

    `replace`: the job folder may hold another job; set its manifest aside and start over there.
    `adopt` (external_task_id -> task_id) and `assume_not_created` (external_task_ids) settle a create whose
    outcome could not be proven (AmbiguousSubmitError), after checking the provider's console.
    """
    logger = get_run_logger()
    job = job.for_date(run_date())
    settings = load_settings()
    # Blocking work (S3, manifests, the Prefect API's artifacts) runs in threads: in a batch, many jobs share
    # this event loop, and a blocked loop delays every other job's polls and creates.
    prepared = await asyncio.to_thread(prepare, job, settings, resubmit_failed=resubmit_failed, replace=replace)
    plan, account = prepared.plan, prepared.account
    adopt, assumed = adopt or {}, set(assume_not_created or [])
    logger.info(
        "job %s: %d step(s) with %s %s, estimated %g credits, storing under %s (account %s)",
        plan.job_id, len(plan.steps), plan.model_name, plan.mode, plan.estimated_credits, job.dest, account,
    )
    run_tags = job_run_tags(settings.provider, plan.model_name, plan.job_id)
    ledger = await asyncio.to_thread(
        JobRecorder, prepared.sink, job, plan, settings.provider, prepared.previous, account=account,
        replaced=prepared.replaced, observers=default_observers(prepared.sink, plan, run_tags))
    await ensure_account_limit(account, settings.max_concurrency)
    parent: Rendered | None = None
    stores: list[asyncio.Task[None]] = []
    clips: list[asyncio.Task[StoredObject]] = []  # a last-frame job's clips, as Kling made them
    with ledger, task_run_tags(run_tags):
        try:
            async with AsyncExitStack() as slot:
                holding = False
                for step in plan.steps:
                    raise_failed_store([*stores, *clips])  # a destination that broke stops the job before it pays more
                    # One account slot for the job's chain, from just before its first create to the end of its
                    # last Kling task: its next extension never queues behind a video that has not started.
                    if not holding and not ledger.rendered_before(step):
                        await slot.enter_async_context(
                            account_slot(account, settings.max_concurrency, started=step.index > 0))
                        holding = True
                    start_image: StartImage | None = None
                    if step.from_last_frame:  # the previous clip must be stored: its last frame is the start
                        start_image = await start_image_into_ledger(ledger, step, await clips[step.index - 1],
                                                                    job.dest, account)
                    ext = step.external_task_id
                    submission = await submit_step(plan.job_id, step, job.generate, parent, account,
                                                   may_exist=ledger.may_exist(step), adopt_task_id=adopt.get(ext),
                                                   assume_not_created=ext in assumed, start_image=start_image)
                    await asyncio.to_thread(ledger.submitted, step, submission)
                    try:
                        rendered = await wait_step(plan.job_id, step, step.kind, submission.task_id, account,
                                                   length_key=step_length_key(step, job.generate))
                    except TaskFailedError as exc:
                        message = exc.snapshot.task_status_msg or "no reason given"
                        await asyncio.to_thread(ledger.failed, step, message)
                        raise KlingStepFailed(
                            f"Kling task {submission.task_id} ({step.name}) failed: {message}. "
                            "Nothing was resubmitted; rerun with --resubmit-failed to pay for a new attempt."
                        ) from exc
                    await asyncio.to_thread(ledger.succeeded, step, rendered)
                    # The store runs beside the next step's Kling time: the next extension needs only the video
                    # id (a continuation awaits the clip's store above, then stitching runs beside it).
                    if plan.stitched:
                        clips.append(asyncio.create_task(
                            clip_into_ledger(ledger, step, submission.task_id, job.dest, account)))
                        stores.append(asyncio.create_task(stitch_after(
                            stores[-1] if stores else None, list(clips), ledger, step, submission.task_id,
                            job.dest, account)))
                    else:
                        stores.append(asyncio.create_task(
                            store_into_ledger(ledger, step, submission.task_id, job.dest, account)))
                    parent = rendered
        finally:  # what was paid for is stored before we stop
            await asyncio.gather(*clips, *stores, return_exceptions=True)
        raise_failed_store([*stores, *clips])
        # A transfer (final.mp4's copy, the contact sheet's read of it), then the job's last artifacts, awaited
        # without holding a thread of the loop's pool (kling_tasks.transfers).
        final = await run_transfer(ledger.finish, flush=False)
        await ledger.flushed()
    logger.info("final video: %s (%d bytes, sha256 %s)", final.uri, final.size, final.sha256)
    return final.uri


async def stitch_after(previous: asyncio.Task[None] | None, clips: list[asyncio.Task[StoredObject]],
                       ledger: JobRecorder, step: PlannedStep, task_id: str, dest: str, account: str) -> None:
    """step-NN.mp4 from clips 0..NN once they are stored, after step NN-1's stitch (steps are stored in order)."""
    if previous is not None:
        await previous
    stored = list(await asyncio.gather(*clips))
    await stitch_into_ledger(ledger, step, task_id, stored, dest, account)


def raise_failed_store(stores: Sequence[asyncio.Task[Any]]) -> None:
    for store in stores:
        if store.done() and not store.cancelled() and store.exception() is not None:
            raise store.exception()  # type: ignore[misc]
