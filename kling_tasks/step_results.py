"""The small typed values that cross task boundaries (persisted as JSON Prefect results, read by the ledger)."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict

from kling_tasks.api import TaskKind


class Submission(BaseModel):
    """The Kling task a step's create made or adopted."""

    model_config = ConfigDict(frozen=True)

    task_id: str
    external_task_id: str
    adopted: bool  # True: the task already existed at Kling (no POST was needed)
    request_id: str | None = None
    status: str = "submitted"


class Rendered(BaseModel):
    """A succeeded Kling task: what the next extension and the store need."""

    model_config = ConfigDict(frozen=True)

    kind: TaskKind
    task_id: str
    external_task_id: str | None
    video_id: str
    url: str
    duration: float
    credits: float | None
    request_id: str | None
    queued_seconds: float
    processing_seconds: float


class StartImage(BaseModel):
    """Where a last-frame continuation's start image is stored: the submit reads it there (never as a task
    parameter: base64 of a frame has no place in the Prefect database) and checks its sha256."""

    model_config = ConfigDict(frozen=True)

    dest: str
    key: str
    sha256: str
