"""A finished job proven from its ledger and its stored final.mp4, without Prefect (a rerun's fast path).

A rerun of a finished job needs no flow run when its video is *proven* delivered (DESIGN §2.4, §4):

- the manifest at the destination says `succeeded`, was written for this account and provider, holds this
  very spec, and its steps are exactly this plan's (same external task ids, step by step, same content), each
  `stored` with its task id and sha256;
- `final.mp4` there is the last step's video: its sha256 is the one the manifest records for the last step,
  and on S3 its metadata carries the last step's task id (a folder keeps no metadata: there the ledger's
  sha256 against the file's bytes is the proof), and it is where the manifest says the final video is;
- every step's video (and a last-frame job's clips) is still there with the sha256 the manifest records: a
  deleted or replaced one is put back by the flow, as a rerun always did.

Anything less (no manifest, another spec or account, a failed or running job, an object that is missing or
not this task's) is not proven, and the caller runs the flow, which decides as it always does. The checks
before the flow (settings, the plan, every request, the destination, the budget) are the flow's own
(`prepare`): what the flow would refuse is not served either. Nothing here talks to Kling or imports Prefect.
"""

from __future__ import annotations

from dataclasses import dataclass

from kling_tasks.jobs import Plan, VideoJob
from kling_tasks.manifest import Manifest, clip_key, final_key, step_key, strip_secrets
from kling_tasks.preflight import prepare
from kling_tasks.settings import KlingSettings
from kling_tasks.storage import LocalSink, Sink, StoredObject


@dataclass(frozen=True)
class Verdict:
    """The proven final video, or why the job's video is not proven (the flow then runs)."""

    final: StoredObject | None
    reason: str | None = None


def ledger_mismatch(manifest: Manifest | None, job: VideoJob, plan: Plan, provider: str, account: str) -> str | None:
    """Why the ledger does not record this plan as finished, or None when it does."""
    if manifest is None:
        return "no manifest"
    if manifest.status != "succeeded":
        return f"the job is {manifest.status}"
    if manifest.account != account or manifest.provider != provider:
        return "the manifest was written for another account"
    if len(manifest.steps) != len(plan.steps):
        return f"the manifest holds {len(manifest.steps)} steps and this plan {len(plan.steps)}"
    for record, step in zip(manifest.steps, plan.steps, strict=True):
        if (record.external_task_id, record.content_digest) != (step.external_task_id, step.content_digest):
            return f"its {record.name} is another task than this plan's"
        if record.status != "stored" or not record.task_id or not record.sha256:
            return f"its {record.name} is {record.status}"
    if manifest.spec != strip_secrets(job.public_spec()):  # as the manifest stores it (--max-credits, dest, ...)
        return "the manifest holds another spec"
    return None


def final_mismatch(sink: Sink, manifest: Manifest, final: StoredObject | None) -> str | None:
    """Why the stored final.mp4 is not the last step's video as the ledger records it, or None when it is."""
    last = manifest.steps[-1]
    if final is None:
        return "final.mp4 is missing (or carries no sha256)"
    if final.sha256 != last.sha256 or (last.size is not None and final.size != last.size):
        return "final.mp4 is not the video the manifest records"
    # S3 keeps the task id with the object; only a folder, which keeps no metadata, is proven by sha256 alone.
    if final.task_id != last.task_id and not (final.task_id is None and isinstance(sink, LocalSink)):
        return "final.mp4 does not carry the last step's task id"
    if final.uri != manifest.final_uri:
        return "final.mp4 is not where the manifest says the final video is"
    return None


def stored_steps_mismatch(sink: Sink, manifest: Manifest) -> str | None:
    """Why a step's video or clip is not stored as the ledger records it, or None when every one is."""
    for record in manifest.steps:
        expected = [(step_key(manifest.job_id, record.index), record.sha256)]
        if record.clip_sha256 is not None:
            expected.append((clip_key(manifest.job_id, record.index), record.clip_sha256))
        for key, sha256 in expected:
            stored = sink.head(key)
            if stored is None or stored.sha256 != sha256:
                return f"{key} is missing or not the video the manifest records"
    return None


def proven_final(job: VideoJob, settings: KlingSettings) -> Verdict:
    """The job's final video if the ledger and the stored object prove it finished (see the module doc).

    Raises what `prepare` raises (PlanError: a plan the flow would refuse as well) and StorageError.
    """
    prepared = prepare(job, settings)
    manifest = prepared.previous
    why = ledger_mismatch(manifest, job, prepared.plan, settings.provider, prepared.account)
    if why is not None or manifest is None:
        return Verdict(None, why)
    final = prepared.sink.head(final_key(prepared.plan.job_id))
    why = final_mismatch(prepared.sink, manifest, final) or stored_steps_mismatch(prepared.sink, manifest)
    return Verdict(None, why) if why is not None else Verdict(final)
