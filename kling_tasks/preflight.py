"""Everything checked before the first paid request: plan, credentials, destination, budget, attempts."""

from __future__ import annotations

import re
from dataclasses import dataclass

from kling_tasks.jobs import Plan, PlanError, VideoJob, check_budget, plan_job
from kling_tasks.manifest import Manifest, load_manifest
from kling_tasks.settings import KlingSettings
from kling_tasks.storage import DestinationError, Sink, open_sink

_ATTEMPT = re.compile(r"-s\d+-r(\d+)-[0-9a-f]+$")


@dataclass(frozen=True)
class Prepared:
    plan: Plan
    sink: Sink
    previous: Manifest | None


def attempts_from(previous: Manifest | None, resubmit_failed: bool) -> dict[int, int]:
    """Resubmission numbers per step, read back from the ids the last run used.

    A failed Kling task is never resubmitted silently: only `resubmit_failed` bumps its attempt, which gives
    the step (and every later step) a new external_task_id.
    """
    attempts: dict[int, int] = {}
    for record in previous.steps if previous else []:
        match = _ATTEMPT.search(record.external_task_id)
        attempt = int(match.group(1)) if match else 0
        if resubmit_failed and record.status == "failed":
            attempt += 1
        if attempt:
            attempts[record.index] = attempt
    return attempts


def prepare(job: VideoJob, settings: KlingSettings, *, resubmit_failed: bool = False) -> Prepared:
    missing = settings.missing_credentials()
    if missing:
        raise PlanError(f"no Kling credentials for provider {settings.provider!r}: set {', '.join(missing)}")
    try:
        sink = open_sink(job.dest)
        sink.check_reachable()
    except DestinationError as exc:
        raise PlanError(f"destination {job.dest!r} is not usable: {exc}") from exc
    previous = load_manifest(sink, job.effective_job_id())
    plan = plan_job(job, attempts_from(previous, resubmit_failed))
    check_budget(job, plan)
    return Prepared(plan=plan, sink=sink, previous=previous)
