"""A batch's manifest: `{dest}/batch-{batch_id}.json` next to its jobs' folders, one line per job.

Written when the batch starts (every job pending) and when it ends; each job's own manifest stays the record
of its steps. Pure data and storage: no Prefect.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

from kling_tasks import identity
from kling_tasks.jobs import VideoJob
from kling_tasks.manifest import utc_now
from kling_tasks.storage import Sink

JobOutcome = Literal["pending", "succeeded", "failed"]


class BatchEntry(BaseModel):
    job_id: str
    dest: str
    status: JobOutcome = "pending"
    final_uri: str | None = None
    error: str | None = None  # one line: the step and Kling's reason, or what stopped the job
    estimated_credits: float = 0.0
    credits: float | None = None  # charged, from the job's ledger
    seconds: float | None = None  # wall time of the job in this run
    manifest_uri: str | None = None
    contact_sheet_key: str | None = None  # relative to the job's dest


class BatchManifest(BaseModel):
    batch_id: str
    account: str
    status: Literal["running", "succeeded", "failed"] = "running"
    estimated_credits: float = 0.0
    jobs: list[BatchEntry] = Field(default_factory=list)
    created_at: str = Field(default_factory=utc_now)
    updated_at: str = Field(default_factory=utc_now)

    @property
    def failed(self) -> list[BatchEntry]:
        return [entry for entry in self.jobs if entry.status == "failed"]


def derived_batch_id(jobs: list[VideoJob]) -> str:
    """The same set of jobs is the same batch: a rerun resumes it (and rewrites its manifest)."""
    return "batch-" + identity.digest(sorted(job.effective_job_id() for job in jobs))[:12]


def batch_key(batch_id: str) -> str:
    return f"{batch_id}.json"


def save_batch(sink: Sink, manifest: BatchManifest) -> None:
    manifest.updated_at = utc_now()
    sink.write_bytes(batch_key(manifest.batch_id), manifest.model_dump_json(indent=2).encode() + b"\n",
                     "application/json")


def load_batch(sink: Sink, batch_id: str) -> BatchManifest | None:
    raw = sink.read_bytes(batch_key(batch_id))
    return None if raw is None else BatchManifest.model_validate_json(raw)
