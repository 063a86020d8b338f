"""produce_batch: many jobs at the account's concurrency bound, each a produce_video subflow run.

The account's slots (kling_tasks.slots), not a thread count, bound the work: every job starts at once and
its steps wait for slots, steps of started videos first. One failed job does not stop the others; the batch
ends Failed if any did, with a summary artifact and `{dest}/{batch_id}.json` next to the jobs' folders.
"""

from __future__ import annotations

import asyncio
import tempfile
import time
from collections.abc import Awaitable
from datetime import date, timedelta
from pathlib import Path
from typing import cast
from uuid import UUID

from prefect import flow, get_client, get_run_logger, tags
from prefect.client.schemas.objects import FlowRun
from prefect.deployments import arun_deployment
from prefect.flow_runs import pause_flow_run, wait_for_flow_run
from prefect.input import RunInput
from prefect.runtime import flow_run

from flows.video import job_run_tags, produce_video, run_date
from kling_tasks.batch_ledger import BatchEntry, BatchManifest, derived_batch_id, save_batch
from kling_tasks.identity import account_fingerprint, digest
from kling_tasks.image_sources import is_signed
from kling_tasks.jobs import PlanError, VideoJob, check_folder_id, plan_job
from kling_tasks.jobs_file import JobsFileError, check_batch_budget, load_jobs
from kling_tasks.manifest import load_manifest, manifest_key
from kling_tasks.observability.batch_summary import publish_batch_summary
from kling_tasks.observability.contact_sheet import contact_sheet_key
from kling_tasks.prefect_api import jobs_in_this_process
from kling_tasks.preflight import prepare
from kling_tasks.recovery import DEFAULT_SETTLE
from kling_tasks.settings import KlingSettings, load_settings
from kling_tasks.slots import ensure_account_limit
from kling_tasks.storage import DestinationError, open_sink

DEFAULT_DEST = "./kling-output"
VIDEO_DEPLOYMENT = "produce-video/produce-video"
# wait_for_flow_run gives up after 3 h by default; a 36-step chain behind a busy account can take longer.
WORKER_RUN_TIMEOUT = 48 * 3600
# How long a Crashed first run is watched for the automation's reschedule (it acts after DEFAULT_SETTLE).
RESCHEDULE_GRACE = DEFAULT_SETTLE + timedelta(seconds=90)


class BatchFailed(RuntimeError):
    """Some jobs of the batch failed; the others completed. Their reasons are in the batch manifest."""


class SpendApproval(RunInput):
    """Shown as a form in the Prefect UI when a batch waits for approval before spending."""

    approve: bool = False


def batch_run_name() -> str:
    given = flow_run.parameters.get("batch_id")
    return str(given) if given else "produce-batch"


def read_jobs_file(uri: str, dest: str | None) -> list[VideoJob]:
    """A jobs file from a local path (relative to the run's working directory) or `s3://bucket/key`.

    An S3 object is downloaded to a temporary file with the same name, so its suffix picks the parser; errors
    name the URI, not the temporary copy.
    """
    if not uri.startswith("s3://"):
        return load_jobs(uri, dest=dest)
    folder, _, name = uri.removeprefix("s3://").rpartition("/")
    if not folder or not name:
        raise JobsFileError(f"{uri}: expected s3://bucket/key for a jobs file")
    try:
        data = open_sink(f"s3://{folder}").read_bytes(name)
    except (DestinationError, ValueError) as exc:
        raise JobsFileError(f"{uri}: cannot read the jobs file: {exc}") from None
    if data is None:
        raise JobsFileError(f"{uri}: cannot read the jobs file: no such object")
    with tempfile.TemporaryDirectory(prefix="kling-jobs-") as folder_copy:
        local = Path(folder_copy) / name
        local.write_bytes(data)
        try:
            return load_jobs(local, dest=dest)
        except JobsFileError as exc:
            raise JobsFileError(str(exc).replace(str(local), uri)) from None


def resolve_jobs(jobs: list[VideoJob] | None, jobs_file: str | None, dest: str | None, day: date) -> list[VideoJob]:
    if (jobs is None) == (jobs_file is None):
        raise PlanError("give the batch either jobs or a jobs_file, not both or neither")
    loaded = read_jobs_file(jobs_file, dest) if jobs_file is not None else [
        job if dest is None or "dest" in job.model_fields_set else job.model_copy(update={"dest": dest})
        for job in jobs or []]
    resolved = [job.for_date(day) for job in loaded]
    seen: dict[str, int] = {}
    for number, job in enumerate(resolved, start=1):
        job_id = job.effective_job_id()
        if job_id in seen:
            raise PlanError(f"job {seen[job_id]} and job {number} both have job_id {job_id}")
        seen[job_id] = number
    return resolved


def check_batch(jobs: list[VideoJob], settings: KlingSettings, max_credits: float | None,
                resubmit_failed: bool) -> float:
    """Everything a run would refuse, for every job, before the first request; returns the estimate."""
    for number, job in enumerate(jobs, start=1):
        try:
            prepare(job, settings, resubmit_failed=resubmit_failed)
        except PlanError as exc:
            raise PlanError(f"job {number} ({job.effective_job_id()}): {exc}") from None
    check_batch_budget(jobs, max_credits)
    return sum(plan_job(job).estimated_credits for job in jobs)


def check_handover(jobs: list[VideoJob]) -> None:
    """A job run by another worker reads its parameters from Prefect, where a presigned URL's signature is
    withheld (kling_tasks.image_sources): refused here, before any request, rather than on that worker."""
    for number, job in enumerate(jobs, start=1):
        if job.generate.image is not None and is_signed(job.generate.image):
            raise PlanError(f"job {number} ({job.effective_job_id()}): a presigned image URL cannot be handed "
                            "to another worker without storing its signature in Prefect; give the image as "
                            "s3://bucket/key (read and sent inline) or run the batch without via_deployment")


async def approve_spending(estimate: float, approve_above: float | None) -> None:
    if approve_above is None or estimate <= approve_above:
        return
    logger = get_run_logger()
    logger.warning("the batch is estimated at %g credits, above %g: waiting for approval in the Prefect UI "
                   "(Resume this flow run and tick approve)", estimate, approve_above)
    # async_dispatch: in a coroutine this returns an awaitable (Prefect's typing says otherwise).
    waiting = pause_flow_run(wait_for_input=SpendApproval.with_initial_data(
        description=f"Approve spending about {estimate:g} credits on this batch?"), timeout=24 * 3600,
        poll_interval=2)
    answer = await cast(Awaitable[SpendApproval], waiting)
    if not answer.approve:
        raise PlanError(f"spending {estimate:g} credits was not approved; nothing was sent")


def one_line(text: str | None) -> str:
    return " ".join((text or "no reason given").split())[:500]


# The batch hands its subflows jobs it has already validated (resolve_jobs, check_batch): Prefect's validation of
# a call's parameters builds a pydantic model of the signature on every call, a few ms of CPU per job.
produce_video_here = produce_video.with_options(validate_parameters=False)


async def run_here(job: VideoJob, resubmit_failed: bool) -> str | None:
    """The job as a subflow run of this process: None when it succeeded, else why it failed."""
    plan = plan_job(job)
    with tags(*job_run_tags(load_settings().provider, plan.model_name, plan.job_id)):
        state = await produce_video_here(job=job, resubmit_failed=resubmit_failed, return_state=True)
    if state.is_completed():
        return None
    error = await state.aresult(raise_on_failure=False)
    return one_line(str(error) if isinstance(error, BaseException) else state.message)


async def wait_through_a_reschedule(run_id: UUID) -> FlowRun:
    """Wait for the job's run; a first run that Crashed (its machine was lost) may still be rescheduled by the
    automation `kling-pipeline setup` ships, so it is watched for a while before it counts as the outcome
    (Prefect's wait_for_flow_run returns on the first terminal state, and Crashed is one)."""
    finished = cast(FlowRun, await wait_for_flow_run(run_id, timeout=WORKER_RUN_TIMEOUT, poll_interval=5))
    if finished.state is None or not finished.state.is_crashed() or finished.run_count > 1:
        return finished
    deadline = time.monotonic() + RESCHEDULE_GRACE.total_seconds()
    async with get_client() as client:
        while time.monotonic() < deadline:
            await asyncio.sleep(2)
            run = await client.read_flow_run(run_id)
            if run.state is not None and not run.state.is_crashed():  # rescheduled: wait for the new attempt
                return cast(FlowRun, await wait_for_flow_run(run_id, timeout=WORKER_RUN_TIMEOUT, poll_interval=5))
    return finished


async def run_on_a_worker(job: VideoJob, resubmit_failed: bool, deployment: str, account: str) -> str | None:
    """The job as a run of the produce-video deployment, on whichever worker takes it.

    The idempotency key is the account, the job's identity and this batch run: a retry of the batch run gets
    the job's existing flow run back instead of starting it twice (a new batch run starts new job runs, which
    resume from the cache and the job's ledger).
    """
    identity_of_job = f"{job.effective_job_id()}:{digest(job.step_contents())[:16]}"
    started = await arun_deployment(
        deployment, parameters={"job": job.model_dump(mode="json"), "resubmit_failed": resubmit_failed},
        timeout=0, idempotency_key=f"kling:{account}:{identity_of_job}:{flow_run.id}", as_subflow=True)
    finished = await wait_through_a_reschedule(started.id)
    state = finished.state
    if state is not None and state.is_completed():
        return None
    return one_line(f"{state.name}: {state.message}" if state is not None else "the run has no state")


async def run_one(job: VideoJob, entry: BatchEntry, resubmit_failed: bool, deployment: str | None,
                  account: str) -> None:
    started = time.monotonic()
    try:
        error = await (run_on_a_worker(job, resubmit_failed, deployment, account) if deployment
                       else run_here(job, resubmit_failed))
    except Exception as exc:  # the orchestration itself failed (a Prefect API error): this job only
        error = one_line(f"{type(exc).__name__}: {exc}")
    entry.seconds = round(time.monotonic() - started, 1)
    sink = open_sink(job.dest)
    manifest = await asyncio.to_thread(load_manifest, sink, entry.job_id)  # the job's ledger is the record
    entry.credits = manifest.credits_charged if manifest else None
    entry.manifest_uri = f"{sink.dest.rstrip('/')}/{manifest_key(entry.job_id)}"
    if error is None and manifest is not None and manifest.final_uri:
        entry.status, entry.final_uri = "succeeded", manifest.final_uri
        entry.contact_sheet_key = contact_sheet_key(entry.job_id)
    else:
        entry.status, entry.error = "failed", error or "the job ended without a final video"


@flow(name="produce-batch", flow_run_name=batch_run_name)
async def produce_batch(jobs: list[VideoJob] | None = None, jobs_file: str | None = None, dest: str | None = None,
                        max_credits: float | None = None, approve_above: float | None = None,
                        batch_id: str | None = None, resubmit_failed: bool = False, via_deployment: bool = False,
                        video_deployment: str = VIDEO_DEPLOYMENT) -> list[BatchEntry]:
    """Produce every job of the batch; returns one entry per job (status, final URI, credits, seconds).

    `jobs`: inline jobs, or `jobs_file`: a YAML/JSON/JSONL/CSV jobs file (DESIGN §5). `dest` applies to jobs
    without their own and holds the batch manifest. `max_credits` is the budget of the whole batch;
    `approve_above` pauses for approval in the UI before any request when the estimate is above it.
    `via_deployment`: each job is its own run of `video_deployment`, so workers on many machines share the
    batch (the account's global concurrency limit holds across all of them).
    """
    logger = get_run_logger()
    settings = load_settings()
    if batch_id is not None:  # it names a file next to the jobs' folders: never a path into one of them
        check_folder_id(batch_id, "batch_id")
    batch = resolve_jobs(jobs, jobs_file, dest, run_date())
    estimate = check_batch(batch, settings, max_credits, resubmit_failed)
    if via_deployment:
        check_handover(batch)
    account = account_fingerprint(settings)
    manifest = BatchManifest(
        batch_id=batch_id or derived_batch_id(batch), account=account, estimated_credits=estimate,
        jobs=[BatchEntry(job_id=job.effective_job_id(), dest=job.dest,
                         estimated_credits=plan_job(job).estimated_credits) for job in batch])
    logger.info("batch %s: %d job(s), estimated %g credits, account %s (%d slots)", manifest.batch_id, len(batch),
                estimate, account, settings.max_concurrency)
    await approve_spending(estimate, approve_above)
    sink = open_sink(dest or DEFAULT_DEST)
    await asyncio.to_thread(save_batch, sink, manifest)
    await ensure_account_limit(account, settings.max_concurrency)
    deployment = video_deployment if via_deployment else None
    # Jobs in flight at once: the slots bound the Kling work; twice as many keeps the next jobs prepared for the
    # moment a slot frees without opening hundreds of flow runs on the Prefect API at once.
    in_flight = asyncio.Semaphore(2 * settings.max_concurrency)

    async def gated(job: VideoJob, entry: BatchEntry) -> None:
        async with in_flight:
            await run_one(job, entry, resubmit_failed, deployment, account)

    async with jobs_in_this_process():  # hundreds of jobs' Prefect calls: one client, a short queue at its pool
        await asyncio.gather(*(gated(job, entry) for job, entry in zip(batch, manifest.jobs, strict=True)))
    manifest.status = "failed" if manifest.failed else "succeeded"
    await asyncio.to_thread(save_batch, sink, manifest)
    await asyncio.to_thread(publish_batch_summary, manifest)
    if manifest.failed:
        names = ", ".join(f"{entry.job_id} ({entry.error})" for entry in manifest.failed[:5])
        raise BatchFailed(f"{len(manifest.failed)} of {len(batch)} job(s) failed: {names}")
    return manifest.jobs
