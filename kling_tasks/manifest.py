"""The per-job manifest: `{dest}/{job_id}/manifest.json`, rewritten after every step (DESIGN §4)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, computed_field, field_validator

from .storage import Sink

SCHEMA_VERSION = 2  # 2: account fingerprint, per-step attempt and content digest, `submitting` intents
_SECRET_WORDS = ("key", "secret", "token", "password")

StepKind = Literal["text2video", "image2video", "video-extend"]
# `submitting`: the write-ahead intent, recorded before a create POST whose answer has not been seen yet.
StepStatus = Literal["pending", "submitting", "submitted", "processing", "succeed", "failed", "stored"]
JobStatus = Literal["pending", "running", "succeeded", "failed"]


def utc_now() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def manifest_key(job_id: str) -> str:
    return f"{job_id}/manifest.json"


def step_key(job_id: str, index: int) -> str:
    return f"{job_id}/step-{index:02d}.mp4"


def clip_key(job_id: str, index: int) -> str:
    """A last-frame job's clip as Kling made it (step-NN.mp4 is the whole video so far, stitched)."""
    return f"{job_id}/clip-{index:02d}.mp4"


def frame_key(job_id: str, index: int) -> str:
    """The start image a last-frame continuation sent: the previous clip's last frame."""
    return f"{job_id}/frame-{index:02d}.jpg"


def final_key(job_id: str) -> str:
    return f"{job_id}/final.mp4"


def replaced_manifest_key(job_id: str, stamp: datetime) -> str:
    """Where `--replace` keeps the manifest it replaces: `manifest.replaced-20261201T194200Z.json`."""
    return f"{job_id}/manifest.replaced-{stamp.strftime('%Y%m%dT%H%M%SZ')}.json"


def strip_secrets(value: Any) -> Any:
    """Drop, at any depth, every dict entry whose name looks secret. Over-strips on purpose
    (`keyframes` goes too): the caller already sanitizes, this is only the second line of defence."""
    if isinstance(value, dict):
        return {
            k: strip_secrets(v) for k, v in value.items() if not any(word in str(k).lower() for word in _SECRET_WORDS)
        }
    if isinstance(value, list | tuple):
        return [strip_secrets(v) for v in value]
    return value


class StepRecord(BaseModel):
    model_config = ConfigDict(validate_assignment=True)

    index: int = Field(ge=0)  # 0 = the generation, 1..N the extensions
    name: str
    kind: StepKind
    external_task_id: str
    attempt: int = Field(default=0, ge=0)  # bumped by --resubmit-failed; part of the external id's chain
    content_digest: str | None = None  # the step's own spec (kling_tasks.identity): "same job?" on a rerun
    task_id: str | None = None
    video_id: str | None = None
    status: StepStatus = "pending"
    status_msg: str | None = None
    duration: float | None = None
    credits: float | None = None
    queued_seconds: float | None = None
    processing_seconds: float | None = None
    uri: str | None = None
    size: int | None = None
    sha256: str | None = None
    request_id: str | None = None
    # Last-frame continuation (the job's continuation is `last-frame`): the clip Kling made, the image this
    # step started from (None for step 0), and how step-NN.mp4 was joined from the clips (copy | reencode).
    clip_uri: str | None = None
    clip_size: int | None = None
    clip_sha256: str | None = None
    start_frame_sha256: str | None = None
    stitched_by: str | None = None
    total_seconds: float | None = None  # length of the stitched step-NN.mp4 (`duration` is the clip's)
    updated_at: str | None = None


class Manifest(BaseModel):
    # extra keys (from a newer writer) are ignored on load; computed fields are not re-read.
    model_config = ConfigDict(validate_assignment=True)

    schema_version: int = SCHEMA_VERSION
    job_id: str
    provider: str
    account: str | None = None  # kling_tasks.identity.account_fingerprint: whose money these steps are
    spec: dict[str, Any] = Field(default_factory=dict)
    continuation: str | None = None  # how extensions were made: extend (video-extend) | last-frame
    estimated_credits: float | None = None
    steps: list[StepRecord] = Field(default_factory=list)
    status: JobStatus = "pending"
    final_uri: str | None = None
    created_at: str = Field(default_factory=utc_now)
    updated_at: str = Field(default_factory=utc_now)

    @field_validator("spec")
    @classmethod
    def _strip_spec(cls, value: dict[str, Any]) -> dict[str, Any]:
        stripped: dict[str, Any] = strip_secrets(value)
        return stripped

    @computed_field  # type: ignore[prop-decorator]
    @property
    def credits_charged(self) -> float:
        return float(sum(s.credits or 0.0 for s in self.steps))

    def step(self, index: int) -> StepRecord | None:
        return next((s for s in self.steps if s.index == index), None)

    def update_step(self, index: int, **fields: Any) -> StepRecord:
        """Set fields on step `index` (validated), creating the record if it is new; stamps times."""
        now = utc_now()
        current = self.step(index)
        data = {**(current.model_dump() if current else {}), **fields, "index": index, "updated_at": now}
        record = StepRecord.model_validate(data)
        self.steps = sorted([s for s in self.steps if s.index != index] + [record], key=lambda s: s.index)
        self.updated_at = now
        return record


def load_manifest(sink: Sink, job_id: str) -> Manifest | None:
    raw = sink.read_bytes(manifest_key(job_id))
    return None if raw is None else Manifest.model_validate_json(raw)


def save_manifest(sink: Sink, manifest: Manifest) -> None:
    """Atomic rewrite (the sink writes a temp file / a single PutObject), pretty JSON."""
    manifest.updated_at = utc_now()
    body = manifest.model_dump_json(indent=2).encode() + b"\n"
    sink.write_bytes(manifest_key(manifest.job_id), body, "application/json")
