"""`kling-pipeline`: run, estimate, status, batch, serve, setup and demo (DESIGN §5).

Progress goes to stderr; `run` prints the final video's URI as the last line on stdout. Errors are one
line and a non-zero exit: 2 for a plan refused before anything was sent, 1 for a failure during the run.
"""

from __future__ import annotations

import asyncio
import os
import re
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any, NoReturn

import typer
from pydantic import ValidationError
from rich.console import Console
from rich.table import Table

from kling_tasks.api.catalog import MAX_EXTENDED_SECONDS
from kling_tasks.jobs import (
    ExtensionSpec,
    GenerationSpec,
    Plan,
    PlanError,
    VideoJob,
    check_budget,
    check_folder_id,
    plan_job,
)
from kling_tasks.kling_requests import check_requests
from kling_tasks.manifest import load_manifest
from kling_tasks.settings import KlingSettings, SettingsError, load_settings
from kling_tasks.storage import DestinationError, open_sink

if TYPE_CHECKING:
    from prefect.client.schemas.objects import State

app = typer.Typer(help="Long AI videos from the Kling API as resumable Prefect flows.", no_args_is_help=True,
                  pretty_exceptions_enable=False)
err = Console(stderr=True)

Prompt = Annotated[str, typer.Option("--prompt", help="What the first clip shows.")]
NegativePrompt = Annotated[str | None, typer.Option("--negative-prompt")]
Image = Annotated[str | None, typer.Option(
    "--image", help="image2video from a local .jpg/.png, s3://bucket/key or URL.")]
Extend = Annotated[list[str] | None, typer.Option("--extend", help="One extension prompt; repeatable.")]
Model = Annotated[str, typer.Option("--model")]
Mode = Annotated[str, typer.Option("--mode", help="std or pro")]
Duration = Annotated[str, typer.Option("--duration", help="5 or 10 seconds")]
Aspect = Annotated[str, typer.Option("--aspect-ratio", help="16:9, 9:16 or 1:1")]
Cfg = Annotated[float | None, typer.Option("--cfg-scale", help="0..1")]
Dest = Annotated[str, typer.Option("--dest", help="s3://bucket/prefix or a local folder")]
JobId = Annotated[str | None, typer.Option("--job-id")]
MaxCredits = Annotated[float | None, typer.Option("--max-credits")]
Continuation = Annotated[str, typer.Option(
    "--continuation", help="How --extend continues the video: auto (video-extend where the model has it, else "
                           "last-frame), extend (Kling's video-extend: kling-v1, v1-5, v1-6) or last-frame "
                           "(image2video from each clip's last frame, any model).")]
Sound = Annotated[str | None, typer.Option("--sound", help="on or off: native audio (kling-v2-6 pro, kling-v3).")]
MaxSeconds = Annotated[float, typer.Option("--max-seconds", help="Longest a last-frame chain may grow.")]
Take = Annotated[int, typer.Option("--take", help="2, 3, ...: pay for a deliberate new take of the same spec.")]
Replace = Annotated[bool, typer.Option("--replace", help="The job folder holds another job: set its manifest "
                                                         "aside (manifest.replaced-*.json) and start over there.")]
Adopt = Annotated[list[str] | None, typer.Option(
    "--adopt", metavar="EXTERNAL_ID=TASK_ID",
    help="A create whose outcome was unknown did make this task (you found it in the provider's console).")]
AssumeNotCreated = Annotated[list[str] | None, typer.Option(
    "--assume-not-created", metavar="EXTERNAL_ID",
    help="A create whose outcome was unknown made nothing (checked in the console): pay for it again.")]
NoFastPath = Annotated[bool, typer.Option(
    "--no-fast-path", help="Run the flow even when the job's manifest and stored videos prove it finished.")]


def fail(message: str, code: int = 1) -> NoReturn:
    err.print(f"[red]error:[/red] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(code)


_PLAIN_NAME = re.compile(r"[A-Za-z0-9_-]+")


def describe(exc: ValidationError) -> str:
    """A pydantic error as one readable line: 'generate.prompt: String should have at most 2500 characters'."""
    parts = []
    for error in exc.errors():
        # An unknown field's name is the user's text: quoted when odd, so a newline in it cannot split the line.
        where = ".".join(str(p) if _PLAIN_NAME.fullmatch(str(p)) else repr(p) for p in error["loc"])
        message = error["msg"].removeprefix("Value error, ")
        parts.append(f"{where}: {message}" if where else message)
    return "; ".join(parts)


def build_job(prompt: str, negative_prompt: str | None, image: str | None, extend: list[str] | None,
              model: str, mode: str, duration: str, aspect_ratio: str, cfg_scale: float | None, dest: str,
              job_id: str | None, max_credits: float | None, take: int = 1, continuation: str = "auto",
              max_seconds: float = MAX_EXTENDED_SECONDS, sound: str | None = None) -> VideoJob:
    try:
        job = VideoJob(
            generate=GenerationSpec(prompt=prompt, negative_prompt=negative_prompt, image=image,
                                    model_name=model, mode=mode, duration=duration,
                                    aspect_ratio=aspect_ratio, cfg_scale=cfg_scale, sound=sound),
            extensions=[ExtensionSpec(prompt=text) for text in extend or []],
            dest=dest, job_id=job_id, max_credits=max_credits, take=take, continuation=continuation,
            max_seconds=max_seconds,
        )
        return job.for_date(datetime.now(UTC).date())
    except ValidationError as exc:
        fail(describe(exc), 2)
    except PlanError as exc:
        fail(str(exc), 2)


def settings_or_exit() -> KlingSettings:
    try:
        return load_settings()
    except SettingsError as exc:
        fail(str(exc), 2)


_TASK_ID = re.compile(r"[A-Za-z0-9_-]{1,64}")  # Kling's 18 digits, older base64-like ids, proxies' ids


def parse_adopt(pairs: list[str] | None) -> dict[str, str]:
    adopt: dict[str, str] = {}
    for pair in pairs or []:
        ext, sep, task_id = pair.partition("=")
        if not sep or not ext.strip() or not task_id.strip():
            fail(f"--adopt {pair!r}: expected EXTERNAL_ID=TASK_ID", 2)
        if not _TASK_ID.fullmatch(task_id.strip()):  # it becomes part of a request path at the provider
            fail(f"--adopt {pair!r}: a task id is letters, digits, '-' and '_' (at most 64)", 2)
        adopt[ext.strip()] = task_id.strip()
    return adopt


def check_settlements(plan: Plan, adopt: dict[str, str], assume_not_created: list[str]) -> None:
    """--adopt and --assume-not-created name steps of this plan: a typo must not leave the step unsettled."""
    known = {step.external_task_id for step in plan.steps}
    for option, ids in (("--adopt", list(adopt)), ("--assume-not-created", assume_not_created)):
        unknown = [ext for ext in ids if ext not in known]
        if unknown:
            raise PlanError(f"{option} {', '.join(map(repr, unknown))}: not an external_task_id of this plan "
                            f"(its steps are {', '.join(sorted(known))})")


def execute(job: VideoJob, resubmit_failed: bool, replace: bool = False, adopt: dict[str, str] | None = None,
            assume_not_created: list[str] | None = None) -> str:
    """Validate everything that can be checked locally, then run the flow with a live view."""
    from flows.live import LiveProgress
    from flows.video import KlingStepFailed, produce_video
    from kling_tasks.api import KlingError
    from kling_tasks.preflight import prepare
    from kling_tasks.storage import StorageError

    try:
        plan = prepare(job, settings_or_exit(), resubmit_failed=resubmit_failed, replace=replace).plan
        check_settlements(plan, adopt or {}, assume_not_created or [])
    except PlanError as exc:
        fail(str(exc), 2)
    try:
        with LiveProgress(plan, err):
            return asyncio.run(produce_video(job=job, resubmit_failed=resubmit_failed, replace=replace,
                                             adopt=adopt, assume_not_created=assume_not_created))
    except (KlingStepFailed, KlingError, StorageError, PlanError, SettingsError) as exc:
        fail(str(exc))


@app.command()
def run(prompt: Prompt, negative_prompt: NegativePrompt = None, image: Image = None, extend: Extend = None,
        model: Model = "kling-v1", mode: Mode = "std", duration: Duration = "5", aspect_ratio: Aspect = "16:9",
        cfg_scale: Cfg = None, dest: Dest = "./kling-output", job_id: JobId = None,
        max_credits: MaxCredits = None, take: Take = 1, continuation: Continuation = "auto",
        max_seconds: MaxSeconds = MAX_EXTENDED_SECONDS, sound: Sound = None, replace: Replace = False,
        resubmit_failed: Annotated[bool, typer.Option("--resubmit-failed",
                                                      help="Pay for a new attempt of a failed step.")] = False,
        adopt: Adopt = None, assume_not_created: AssumeNotCreated = None, no_fast_path: NoFastPath = False,
        ) -> None:
    """Generate, extend and store a video; prints the final video's URI last."""
    job = build_job(prompt, negative_prompt, image, extend, model, mode, duration, aspect_ratio, cfg_scale,
                    dest, job_id, max_credits, take, continuation, max_seconds, sound)
    settlements = parse_adopt(adopt)
    # Only a plain rerun may be served from the ledger: every one of these flags asks the flow to change something.
    if not (no_fast_path or replace or resubmit_failed or settlements or assume_not_created):
        uri = served_from_ledger(job)
        if uri is not None:
            print(uri)
            return
    uri = execute(job, resubmit_failed, replace, settlements, assume_not_created)
    print(uri)


def served_from_ledger(job: VideoJob) -> str | None:
    """A finished job's final URI when its manifest and stored videos prove it (kling_tasks.finished): no
    Prefect import, no flow run, no Kling request. None sends the caller down the normal path."""
    from kling_tasks.finished import proven_final

    try:
        verdict = proven_final(job, load_settings())
    except Exception:  # an optimisation only: whatever stops it, the flow decides (and reports)
        return None
    if verdict.final is None:
        return None
    err.print(f"job {job.effective_job_id()} is finished: served from its proven manifest (final.mp4 is its last "
              "task's video), no flow run; pass --no-fast-path to run the flow anyway", highlight=False,
              soft_wrap=True)
    return verdict.final.uri


@app.command()
def estimate(prompt: Prompt, negative_prompt: NegativePrompt = None, image: Image = None,
             extend: Extend = None, model: Model = "kling-v1", mode: Mode = "std", duration: Duration = "5",
             aspect_ratio: Aspect = "16:9", cfg_scale: Cfg = None, dest: Dest = "./kling-output",
             job_id: JobId = None, max_credits: MaxCredits = None, take: Take = 1,
             continuation: Continuation = "auto", max_seconds: MaxSeconds = MAX_EXTENDED_SECONDS,
             sound: Sound = None) -> None:
    """Validate and price the plan; submits nothing."""
    job = build_job(prompt, negative_prompt, image, extend, model, mode, duration, aspect_ratio, cfg_scale,
                    dest, job_id, max_credits, take, continuation, max_seconds, sound)
    plan = plan_job(job)
    try:
        check_requests(job, plan, settings_or_exit().provider)
    except PlanError as exc:
        fail(str(exc), 2)
    how = f", extensions by {plan.continuation}" if len(plan.steps) > 1 else ""
    table = Table(title=f"job {plan.job_id}: {plan.model_name} {plan.mode}{how}")
    for column in ("step", "name", "external_task_id", "credits"):
        table.add_column(column, no_wrap=True)
    for step in plan.steps:
        table.add_row(str(step.index), step.name, step.external_task_id, f"{step.estimated_credits:g}")
    err.print(table)
    try:
        check_budget(job, plan)
    except PlanError as exc:
        fail(str(exc), 2)
    print(f"{plan.estimated_credits:g}")


@app.command()
def status(job_id: Annotated[str, typer.Argument()], dest: Dest = "./kling-output") -> None:
    """Show a job's manifest: every step's status, ids, credits and where it is stored."""
    try:
        manifest = load_manifest(open_sink(dest), check_folder_id(job_id, "job id"))
    except (DestinationError, PlanError) as exc:
        fail(str(exc), 2)
    except ValidationError as exc:  # a manifest.json that is not one
        fail(f"the manifest of job {job_id} under {dest} cannot be read: {describe(exc)}", 2)
    if manifest is None:
        fail(f"no manifest for job {job_id!r} under {dest}")
    how = f", extensions by {manifest.continuation}" if manifest.continuation else ""
    table = Table(title=f"job {job_id}: {manifest.status}{how}")
    for column in ("step", "name", "status", "task_id", "duration", "credits"):
        table.add_column(column, no_wrap=True)  # ids are copied by people: never cut them
    table.add_column("uri", overflow="fold")
    for step in manifest.steps:
        table.add_row(str(step.index), step.name, step.status, step.task_id or "",
                      f"{step.duration:.2f}" if step.duration else "", f"{step.credits:g}" if step.credits else "",
                      step.uri or step.status_msg or "")
    Console().print(table)
    if manifest.final_uri:
        print(manifest.final_uri)


@app.command()
def demo(dest: Dest = "./demo-output",
         time_scale: Annotated[float, typer.Option(help="Emulator speed: 1.0 = Kling's real latencies.")] = 0.02,
         port: Annotated[int, typer.Option(help="The emulator's port: part of its account's identity.")] = 18765,
         ) -> None:
    """Produce a 1 + 2 video on the bundled Kling emulator, into a local folder, on Prefect's embedded server."""
    from kling_emulator import EmulatorConfig, start_emulator

    # One emulated account across demo runs: the same address (the account fingerprint includes the base URL)
    # and its tasks kept next to the videos, so a second run finds every step it already paid for.
    state = Path(dest) / ".kling-emulator"
    try:
        emulator = start_emulator(EmulatorConfig(time_scale=time_scale, port=port, state_dir=state))
    except RuntimeError:
        fail(f"the demo's Kling emulator cannot listen on 127.0.0.1:{port}; pass --port with a free port", 2)
    os.environ.update({
        "KLING_PROVIDER": "kling", "KLING_API_BASE_URL": emulator.base_url,
        "KLING_ACCESS_KEY": "emulator-ak", "KLING_SECRET_KEY": "emulator-secret-key-0123456789abcdef",
        "KLING_ALLOW_PRIVATE_URLS": "1", "KLING_POLL_MIN_SECONDS": "0.5", "KLING_POLL_MAX_SECONDS": "2",
    })
    err.print(f"Kling emulator running at {emulator.base_url} (time scale {time_scale})")
    try:
        job = VideoJob(
            generate=GenerationSpec(prompt="A paper boat drifts across a pond at dawn"),
            extensions=[ExtensionSpec(prompt="The boat reaches a lily pad and a frog hops aboard"),
                        ExtensionSpec(prompt="The frog and the boat sail into the sunrise")],
            dest=dest,
        )
        uri = execute(job, resubmit_failed=False)
    finally:
        emulator.stop()
    job_id = job.effective_job_id()
    err.print(f"\nFinal video: {uri}\nManifest:    {Path(dest).resolve() / job_id / 'manifest.json'}\n"
              "See the run in the Prefect UI: .venv/bin/prefect server start, then open "
              "http://127.0.0.1:4200/runs (runs of the embedded server are kept in PREFECT_HOME).")
    print(uri)


@app.command()
def batch(jobs_file: Annotated[Path, typer.Argument(help="YAML/JSON (jobs: + defaults:), JSONL or CSV.")],
          dest: Annotated[str | None, typer.Option("--dest", help="For jobs without their own dest; holds "
                                                   "the batch manifest (default ./kling-output)")] = None,
          max_credits: Annotated[float | None, typer.Option("--max-credits", help="Budget of the whole batch.")]
          = None,
          approve_above: Annotated[float | None, typer.Option(
              "--approve-above", help="Pause for approval in the Prefect UI when the estimate is above this.")]
          = None,
          yes: Annotated[bool, typer.Option("--yes", help="Approve the spending up front.")] = False,
          batch_id: Annotated[str | None, typer.Option("--batch-id", help="Default: a digest of the job ids.")]
          = None,
          resubmit_failed: Annotated[bool, typer.Option("--resubmit-failed")] = False) -> None:
    """Produce every job of a jobs file at the account's concurrency bound; one line per job on stdout."""
    from flows.batch import DEFAULT_DEST, check_batch, produce_batch, resolve_jobs
    from flows.live import BatchProgress
    from kling_tasks.batch_ledger import derived_batch_id, load_batch

    settings = settings_or_exit()
    try:
        if batch_id is not None:  # its manifest is `{dest}/{batch_id}.json`: never a path into a job's folder
            check_folder_id(batch_id, "--batch-id")
        jobs = resolve_jobs(None, str(jobs_file), dest, datetime.now(UTC).date())
        estimate = check_batch(jobs, settings, max_credits, resubmit_failed)
    except PlanError as exc:
        fail(str(exc), 2)
    batch_id = batch_id or derived_batch_id(jobs)
    err.print(f"batch {batch_id}: {len(jobs)} job(s), estimated {estimate:g} credits, "
              f"{settings.max_concurrency} account slot(s)", highlight=False)
    gate = None if yes else approve_above
    if gate is not None and estimate > gate:
        err.print("waiting for approval: resume the flow run in the Prefect UI (or rerun with --yes)")
    async def run_batch() -> State[Any]:
        return await produce_batch(jobs_file=str(jobs_file.resolve()), dest=dest, max_credits=max_credits,
                                   approve_above=gate, batch_id=batch_id, resubmit_failed=resubmit_failed,
                                   return_state=True)

    started = datetime.now(UTC).isoformat(timespec="seconds")
    with BatchProgress([plan_job(job) for job in jobs], err):
        state = asyncio.run(run_batch())
    manifest = load_batch(open_sink(dest or DEFAULT_DEST), batch_id)
    if manifest is None or manifest.status == "running" or manifest.updated_at < started:
        fail(state.message or "the batch stopped before it started any job")
    for entry in manifest.jobs:
        print(f"{entry.job_id}\t{entry.final_uri or entry.error}")
    if manifest.failed:
        fail(f"{len(manifest.failed)} of {len(manifest.jobs)} job(s) failed")


@app.command()
def serve(limit: Annotated[int | None, typer.Option(
              "--limit", help="At most this many flow runs at once in this process (default: no bound).")] = None,
          ) -> None:
    """Serve produce-video and produce-batch from this process, without a work pool (until Ctrl-C)."""
    from prefect import aserve

    from flows.batch import produce_batch
    from flows.video import produce_video

    settings_or_exit()  # the runs read the same environment: refuse a bad one before serving

    async def serve_both() -> None:
        # The names of deployments/prefect.yaml, so `run_deployment("produce-video/produce-video")` and a batch
        # with via_deployment=True find the served flow. No flow retries: a crashed run resumes by running again.
        video = await produce_video.ato_deployment(name="produce-video", tags=["kling"],
                                                   description="One long video: fill in the job form.")
        batch = await produce_batch.ato_deployment(
            name="produce-batch", tags=["kling", "batch"], parameters={"via_deployment": True},
            description="Many jobs: inline, or a jobs file (a path or an s3:// URI).")
        await aserve(video, batch, limit=limit)

    asyncio.run(serve_both())


@app.command()
def setup(pool: Annotated[str, typer.Option("--pool", help="The process work pool to create.")] = "kling",
          silent_after: Annotated[float | None, typer.Option(
              "--silent-after", help="Seconds without a heartbeat before a run is marked Crashed "
                                     "(default: 3 x PREFECT_FLOWS_HEARTBEAT_FREQUENCY).")] = None,
          reschedule_after: Annotated[float, typer.Option(
              "--reschedule-after", help="Seconds a crashed produce-video run stays Crashed before it is "
                                         "rescheduled (once).")] = 30) -> None:
    """Create or update the work pool, the account's global concurrency limit and the crash automations."""
    from datetime import timedelta

    import httpx

    from kling_tasks.setup import SetupError, set_up

    settings = settings_or_exit()
    for option, seconds in (("--silent-after", silent_after), ("--reschedule-after", reschedule_after)):
        if seconds is not None and seconds < 10:
            fail(f"{option} must be at least 10 seconds (Prefect's minimum for a proactive trigger)", 2)
    try:
        report = asyncio.run(set_up(
            settings, pool=pool, silent_after=timedelta(seconds=silent_after) if silent_after is not None else None,
            settle=timedelta(seconds=reschedule_after)))
    except SetupError as exc:
        fail(str(exc), 2)
    except (httpx.HTTPError, OSError, RuntimeError) as exc:
        fail(f"cannot set up the Prefect server: {' '.join(str(exc).split())[:300]}")
    for line in report.lines():
        print(line)
