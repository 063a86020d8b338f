"""Prefect artifacts of a job: an observer of the job's ledger (kling_tasks.recorder), updated as it changes.

Keys (Prefect's lowercase-dash form, so they list on the Artifacts page and version per job):
  {job_id}-progress  progress bar, created once per run and updated in place as steps move
  {job_id}-steps     table: one row per step (status, ids, seconds, credits, uri), updated in place
  {job_id}-video     link to final.mp4: a presigned URL for S3, the file for a local folder
  {job_id}-summary   markdown: contact sheet, total length, credits, wall time, manifest location

Everything here is best effort: a Prefect API hiccup logs a warning and never fails (or re-pays) a step.
The progress bar and the table are written at most once per MIN_INTERVAL_SECONDS (5 s) per job, stretched so
that all the jobs open in the process write at most 5 pictures a second (500 jobs: each every 100 s; the ledger's
messenger holds the newest change back, kling_tasks.messenger; a change that only shows Kling's status word waits
up to QUIET_INTERVAL_SECONDS for one that moves the bar), always at the job's end, on its failure and when its
ledger closes, and never when their content did not change: each write is an HTTP call and an event.
A rerun publishes the whole ledger when it starts, so Cached steps show the same picture as the first run; a
new job's first picture is its first change's (an all-pending ledger is not written).
One sync client per process (shared_client) is used on purpose: the recorder is synchronous, and Prefect's
artifact helpers would hand back un-awaited coroutines when called from the async flow.
"""

from __future__ import annotations

import base64
import contextvars
import functools
import json
import logging
import re
import threading
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from uuid import UUID

from prefect import get_client
from prefect.client.orchestration import SyncPrefectClient
from prefect.client.schemas.actions import ArtifactCreate, ArtifactUpdate
from prefect.context import FlowRunContext
from prefect.logging import get_run_logger
from prefect.settings import PREFECT_API_URL

from kling_tasks.manifest import Manifest, manifest_key
from kling_tasks.storage import Sink, StoredObject

logger = logging.getLogger(__name__)

INLINE_IMAGE_MAX_BYTES = 256 * 1024  # a local sheet up to this size is embedded as a data: URI
# The progress bar and the table: at most one write per job this often. A step's ~5 ledger changes come seconds
# apart on a busy worker, so one second merged almost none of them (bench/overhead.py); five merge the create's
# and the end's, and a picture five seconds old is fresh for a Kling task of minutes.
MIN_INTERVAL_SECONDS = 5.0
# A status word alone (Kling's `processing`) moves no progress: it waits this long for the next change that does
# (a success, a store), which shows it too. Kling's tasks last minutes, so a long one still shows it on its own;
# a write pair per step fewer (bench/overhead.py: 5 artifact writes per step before).
QUIET_INTERVAL_SECONDS = 60.0
_STAGE_WEIGHT = {"pending": 0, "submitting": 0, "submitted": 1, "processing": 1, "succeed": 2, "failed": 2, "stored": 3}
_KEY_JUNK = re.compile(r"[^a-z0-9-]+")


@dataclass(frozen=True)
class ArtifactKeys:
    progress: str
    steps: str
    video: str
    summary: str

    @classmethod
    def for_job(cls, job_id: str) -> ArtifactKeys:
        base = _KEY_JUNK.sub("-", job_id.lower()).strip("-") or "job"  # job ids are [a-z0-9-] already
        return cls(f"{base}-progress", f"{base}-steps", f"{base}-video", f"{base}-summary")


def progress_percent(manifest: Manifest) -> float:
    """Share of step stages done (submitted, succeeded, stored): moves after every recorder call."""
    if manifest.status == "succeeded":
        return 100.0
    if not manifest.steps:
        return 0.0
    done = sum(_STAGE_WEIGHT.get(step.status, 0) for step in manifest.steps)
    return round(100.0 * done / (3 * len(manifest.steps)), 1)


def progress_description(manifest: Manifest) -> str:
    stored = sum(step.status == "stored" for step in manifest.steps)
    return f"{manifest.job_id}: {stored} of {len(manifest.steps)} step(s) stored, job {manifest.status}"


def step_rows(manifest: Manifest) -> list[dict[str, Any]]:
    return [
        {
            "step": step.index,
            "name": step.name,
            "status": step.status,
            "task_id": step.task_id,
            "external_task_id": step.external_task_id,
            "request_id": step.request_id,
            "video_id": step.video_id,
            "length_s": step.duration,
            "queued_s": _round(step.queued_seconds),
            "processing_s": _round(step.processing_seconds),
            "credits": step.credits,
            "uri": step.uri,
            **({"clip_uri": step.clip_uri, "stitched_by": step.stitched_by} if step.clip_uri else {}),
        }
        for step in manifest.steps
    ]


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 2)


def _cell(text: object) -> str:
    """Markdown-table-safe text: no pipes or line breaks from Kling's messages or paths."""
    return str(text).replace("|", "\\|").replace("\r", " ").replace("\n", " ")


def summary_markdown(manifest: Manifest, *, wall_seconds: float, manifest_uri: str, video_link: str | None,
                     sheet_src: str | None, sheet_uri: str | None) -> str:
    """The human summary: picture first, then the numbers people ask about."""
    steps = manifest.steps
    extensions = max(0, len(steps) - 1)
    last = steps[-1] if steps else None
    length = last.total_seconds or last.duration if last is not None else None
    lines = [f"# {manifest.job_id}: {manifest.status}", ""]
    failed = next((s for s in steps if s.status == "failed"), None)
    if failed is not None:
        lines += [f"**Step `{failed.name}` failed** (task `{failed.task_id}`): {_cell(failed.status_msg)}. "
                  "Nothing was resubmitted; rerun with `--resubmit-failed` to pay for a new attempt.", ""]
    if sheet_src:
        lines += [f"![contact sheet: one frame per segment]({sheet_src})", "",
                  "*One frame from the middle of each segment: generation first, then each extension.*", ""]
    lines += [
        "| | |",
        "|---|---|",
        f"| total length | {f'{length:.1f} s' if length is not None else 'n/a'} "
        f"({how_made(manifest, extensions)}) |",
        f"| credits | {manifest.credits_charged:g} charged (estimated {manifest.estimated_credits or 0:g}) |",
        f"| wall time | {wall_seconds:.1f} s (this run) |",
        f"| provider | {_cell(manifest.provider)} |",
        f"| manifest | `{_cell(manifest_uri)}` |",
    ]
    if manifest.final_uri:
        video = f"[{_cell(manifest.final_uri)}]({video_link})" if video_link else f"`{_cell(manifest.final_uri)}`"
        lines.append(f"| final video | {video} |")
    if sheet_uri:
        lines.append(f"| contact sheet | `{_cell(sheet_uri)}` |")
    return "\n".join(lines) + "\n"


def how_made(manifest: Manifest, extensions: int) -> str:
    """`1 generation + 3 extension(s)`, saying which continuation made them and how clips were joined."""
    if manifest.continuation != "last-frame":
        return f"1 generation + {extensions} extension(s)" + (" by video-extend" if extensions else "")
    joins = sorted({step.stitched_by for step in manifest.steps[1:] if step.stitched_by})
    joined = {"copy": "stream copy", "reencode": "re-encoding"}
    how = " and ".join(joined.get(join, join) for join in joins) or "not yet stitched"
    return (f"1 generation + {extensions} last-frame continuation(s): image2video from each clip's last frame, "
            f"clips joined by {how}")


_CLIENTS: dict[str, SyncPrefectClient] = {}
_CLIENTS_LOCK = threading.Lock()


def shared_client() -> SyncPrefectClient:
    """One sync Prefect client per process and API URL, shared by every job's observer thread (its httpx pool is
    thread-safe). A client per call, as before, paid a new TLS context and connection each time: the biggest
    CPU cost of a step after the Kling client's (bench/overhead.py). Never closed: it lives as long as the
    process."""
    url = PREFECT_API_URL.value() or ""
    with _CLIENTS_LOCK:
        client = _CLIENTS.get(url)
        if client is None:
            client = get_client(sync_client=True)
            client.__enter__()
            _CLIENTS[url] = client
        return client


# A job's end writes four artifacts; one after another they cost four round trips to a busy server before its
# run may end (the ledger's flush waits for them). Shared by every job of the process, so that 500 jobs ending
# together send at most this many writes at once.
_WRITERS = ThreadPoolExecutor(max_workers=8, thread_name_prefix="artifact-writes")


def _together(writes: list[Callable[[], None]]) -> None:
    """Run independent artifact writes at once (each in this thread's context: the run's logger) and wait."""
    futures = [_WRITERS.submit(contextvars.copy_context().run, write) for write in writes]
    for future in futures:
        future.result()


def _run_logger() -> logging.Logger | logging.LoggerAdapter[logging.Logger]:
    try:
        return get_run_logger()
    except Exception:  # outside a run (unit tests, scripts)
        return logger


class ArtifactPublisher:
    """Publishes one job's artifacts into the current flow run. Create it inside the flow run."""

    coalesce = True  # it shows the whole ledger: of several changes waiting, the newest is enough
    min_interval = MIN_INTERVAL_SECONDS
    quiet_interval = QUIET_INTERVAL_SECONDS

    def __init__(self, sink: Sink, job_id: str, flow_run_id: UUID, run_tags: tuple[str, ...] = (),
                 clock: Callable[[], float] = time.monotonic, flow_run_tags: list[str] | None = None) -> None:
        self.sink = sink
        self.job_id = job_id
        self.flow_run_id = flow_run_id
        self.keys = ArtifactKeys.for_job(job_id)
        self.run_tags = run_tags
        self.clock = clock
        self.started_at = clock()
        self.flow_run_tags = flow_run_tags  # the run's tags as it was created; None: read them from the API
        self.progress_id: UUID | None = None
        self.table_id: UUID | None = None
        self._published: dict[UUID, tuple[Any, str]] = {}  # artifact id -> what it shows now

    @contextmanager
    def _best_effort(self, what: str) -> Iterator[None]:
        try:
            yield
        except Exception as exc:  # never let observability fail a paid step
            _run_logger().warning("could not publish %s for job %s: %s: %s", what, self.job_id,
                                  type(exc).__name__, exc)

    def _create(self, key: str, kind: str, data: Any, description: str) -> UUID:
        created = shared_client().create_artifact(ArtifactCreate(
            key=key, type=kind, data=data, description=description, flow_run_id=self.flow_run_id))
        self._published[created.id] = (data, description)
        return created.id

    def _update(self, artifact_id: UUID, data: Any, description: str) -> None:
        if self._published.get(artifact_id) == (data, description):
            return  # unchanged (a status word the ledger does not keep, a rerun's Cached step): no write
        shared_client().update_artifact(artifact_id, ArtifactUpdate(data=data, description=description))
        self._published[artifact_id] = (data, description)

    def _publish_table(self, manifest: Manifest) -> None:
        # Same encoding as prefect.artifacts.create_table_artifact: a JSON string of the rows.
        data = json.dumps(step_rows(manifest))
        description = f"Steps of {manifest.job_id} ({manifest.status})"
        if self.table_id is None:
            self.table_id = self._create(self.keys.steps, "table", data, description)
        else:
            self._update(self.table_id, data, description)

    def _publish_progress(self, manifest: Manifest) -> None:
        percent, description = progress_percent(manifest), progress_description(manifest)
        if self.progress_id is None:
            self.progress_id = self._create(self.keys.progress, "progress", percent, description)
        else:
            self._update(self.progress_id, percent, description)

    def started(self, manifest: Manifest) -> None:
        if self.run_tags:
            with self._best_effort("flow-run tags"):
                client = shared_client()
                current = (self.flow_run_tags if self.flow_run_tags is not None
                           else client.read_flow_run(self.flow_run_id).tags or [])
                if not set(self.run_tags) <= set(current):
                    client.update_flow_run(self.flow_run_id, tags=sorted({*current, *self.run_tags}))
        if any(step.status != "pending" for step in manifest.steps):
            self.changed(manifest)  # a rerun: its Cached steps show at once
        # A new job's all-pending picture says nothing its flow run's page does not: the first change (held
        # back by the messenger like every other) creates the bar and the table, a write pair fewer per job.

    def _attempt(self, what: str, write: Callable[..., object], *args: Any) -> None:
        with self._best_effort(what):
            write(*args)

    def _pictures(self, manifest: Manifest) -> list[Callable[[], None]]:
        """The progress bar's and the table's writes: independent of each other, each best effort."""
        return [functools.partial(self._attempt, "the progress artifact", self._publish_progress, manifest),
                functools.partial(self._attempt, "the steps table", self._publish_table, manifest)]

    @staticmethod
    def is_quiet(manifest: Manifest, transition: object = None) -> bool:
        """A change that only shows Kling's status word (the messenger holds it for QUIET_INTERVAL_SECONDS)."""
        return getattr(transition, "stage", None) == "status"

    def changed(self, manifest: Manifest, transition: object = None) -> None:
        """Any ledger change: the progress bar and the table show the whole ledger, so the transition
        itself is not needed."""
        _together(self._pictures(manifest))

    def failed(self, manifest: Manifest) -> None:
        _together([*self._pictures(manifest),
                   functools.partial(self._publish_summary, manifest, video_link=None, sheet=None)])

    def finished(self, manifest: Manifest, final: StoredObject, sheet: StoredObject | None) -> None:
        video_link = None
        with self._best_effort("the video link"):
            video_link = self.link_to(final)
        writes = self._pictures(manifest)
        if video_link is not None:
            writes.append(functools.partial(
                self._attempt, "the video link", self._create, self.keys.video, "markdown",
                f"[{final.uri}]({video_link})",
                f"Final video of {manifest.job_id} ({final.size} bytes, sha256 {final.sha256[:12]})"))
        writes.append(functools.partial(self._publish_summary, manifest, video_link=video_link, sheet=sheet))
        _together(writes)

    def link_to(self, stored: StoredObject) -> str:
        """A presigned URL for S3; a file:// URL of the path for a local folder (the path stays readable)."""
        link = self.sink.link(stored.key)
        return Path(link).as_uri() if link.startswith("/") else link

    def _sheet_src(self, sheet: StoredObject) -> str | None:
        link = self.sink.link(sheet.key)
        if not link.startswith("/"):
            return link  # presigned: the browser fetches it
        # A browser page cannot load file paths: inline a small sheet instead.
        data = Path(link).read_bytes() if sheet.size <= INLINE_IMAGE_MAX_BYTES else None
        return None if data is None else "data:image/jpeg;base64," + base64.b64encode(data).decode()

    def _publish_summary(self, manifest: Manifest, *, video_link: str | None, sheet: StoredObject | None) -> None:
        with self._best_effort("the summary"):
            sheet_src = None
            if sheet is not None:
                with self._best_effort("the contact sheet link"):
                    sheet_src = self._sheet_src(sheet)
            manifest_uri = self._uri_of(manifest_key(manifest.job_id))
            markdown = summary_markdown(
                manifest, wall_seconds=self.clock() - self.started_at, manifest_uri=manifest_uri,
                video_link=video_link, sheet_src=sheet_src, sheet_uri=sheet.uri if sheet else None)
            self._create(self.keys.summary, "markdown", markdown, f"Summary of {manifest.job_id} ({manifest.status})")
            _run_logger().info("job %s %s: summary artifact %s, manifest %s", manifest.job_id, manifest.status,
                               self.keys.summary, manifest_uri)

    def _uri_of(self, key: str) -> str:
        dest = self.sink.dest.rstrip("/")
        return f"{dest}/{key}"


def publisher_for_current_run(sink: Sink, job_id: str, run_tags: tuple[str, ...] = ()) -> ArtifactPublisher | None:
    """A publisher bound to the flow run we are in, or None outside a flow run (nothing to attach to)."""
    context = FlowRunContext.get()
    if context is None or context.flow_run is None:
        return None
    return ArtifactPublisher(sink, job_id, context.flow_run.id, run_tags,
                             flow_run_tags=list(context.flow_run.tags or []))
