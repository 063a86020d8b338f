"""Everything checked before the first paid request: settings, plan, every request, destination, the job
folder's ledger, budget, attempts. A refusal is one PlanError line (exit 2 in the CLI); nothing was sent."""

from __future__ import annotations

from dataclasses import dataclass

from kling_tasks.identity import account_fingerprint
from kling_tasks.jobs import Plan, PlanError, VideoJob, check_budget, plan_job
from kling_tasks.kling_requests import check_requests
from kling_tasks.manifest import Manifest, load_manifest
from kling_tasks.settings import KlingSettings
from kling_tasks.storage import DestinationError, Sink, open_sink


@dataclass(frozen=True)
class Prepared:
    plan: Plan
    sink: Sink
    account: str
    previous: Manifest | None  # this job's ledger from earlier runs, to resume from
    replaced: Manifest | None  # another job's ledger that --replace will set aside


def attempts_from(previous: Manifest | None, resubmit_failed: bool) -> dict[int, int]:
    """Resubmission numbers per step, read back from the ledger.

    A failed Kling task is never resubmitted silently: only `resubmit_failed` bumps its attempt, which gives
    the step (and every later step) a new external_task_id.
    """
    attempts: dict[int, int] = {}
    for record in previous.steps if previous else []:
        attempt = record.attempt + (1 if resubmit_failed and record.status == "failed" else 0)
        if attempt:
            attempts[record.index] = attempt
    return attempts


def conflict(previous: Manifest, plan: Plan, account: str) -> str | None:
    """Why the folder's ledger belongs to another job, or None when this plan continues it.

    It continues it when it is the same account and the recorded steps are a prefix of this plan (same
    content step by step): a rerun, a resume, or appended extensions.
    """
    if previous.account != account:
        whose = f"account {previous.account}" if previous.account else "an older kling-pipeline (no account)"
        return f"its manifest was written for {whose}, not this one ({account})"
    if len(previous.steps) > len(plan.steps):
        return f"it holds {len(previous.steps)} steps and this plan only {len(plan.steps)}"
    for record, step in zip(previous.steps, plan.steps, strict=False):
        if record.content_digest != step.content_digest:
            return f"its {record.name} was made from another spec"
    return None


def prepare(job: VideoJob, settings: KlingSettings, *, resubmit_failed: bool = False,
            replace: bool = False) -> Prepared:
    missing = settings.missing_credentials()
    if missing:
        raise PlanError(f"no Kling credentials for provider {settings.provider!r}: set {', '.join(missing)}")
    first = plan_job(job)  # ids without attempts: enough to check every request before touching anything
    check_requests(job, first, settings.provider)
    try:
        sink = open_sink(job.dest)
        sink.check_reachable()
        previous = load_manifest(sink, first.job_id)
    except DestinationError as exc:
        raise PlanError(f"destination {job.dest!r} is not usable: {exc}") from exc
    except ValueError as exc:  # a manifest we cannot read is not ours to overwrite
        raise PlanError(f"the manifest of job {first.job_id} under {job.dest} cannot be read: {exc}") from None
    account = account_fingerprint(settings)
    replaced = None
    why = conflict(previous, first, account) if previous is not None else None
    if why is not None:
        if not replace:
            raise PlanError(
                f"job folder {sink.dest.rstrip('/')}/{first.job_id} belongs to another job: {why}. Use another "
                "--job-id, or pass --replace to start over there (the old manifest is kept as "
                "manifest.replaced-<time>.json)"
            )
        replaced, previous = previous, None
    plan = plan_job(job, attempts_from(previous, resubmit_failed))
    check_budget(job, plan)
    return Prepared(plan=plan, sink=sink, account=account, previous=previous, replaced=replaced)
