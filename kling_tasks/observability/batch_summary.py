"""The batch's summary artifact (`{batch_id}-summary`): one row per job with its status, final video, credits,
seconds and a thumbnail from its contact sheet. Best effort, like every artifact: a failure logs a warning."""

from __future__ import annotations

import base64
import logging
import re
from pathlib import Path

from prefect import get_client
from prefect.client.schemas.actions import ArtifactCreate
from prefect.context import FlowRunContext

from kling_tasks.batch_ledger import BatchEntry, BatchManifest, batch_key
from kling_tasks.storage import open_sink

logger = logging.getLogger(__name__)

INLINE_THUMBNAILS = 24  # local sheets are inlined as data: URIs (a browser cannot load file paths): bounded
INLINE_MAX_BYTES = 96 * 1024
_KEY_JUNK = re.compile(r"[^a-z0-9-]+")


def _cell(text: object) -> str:
    return str(text).replace("|", "\\|").replace("\r", " ").replace("\n", " ")


def thumbnail(entry: BatchEntry, inline_budget: list[int]) -> str:
    """Markdown for the job's contact sheet: a presigned link (S3) or a small inlined picture (a folder)."""
    if entry.contact_sheet_key is None:
        return ""
    try:
        sink = open_sink(entry.dest)
        if sink.head(entry.contact_sheet_key) is None:
            return ""
        link = sink.link(entry.contact_sheet_key)
        if not link.startswith("/"):
            return f"![{entry.job_id}]({link})"
        data = Path(link).read_bytes()
        if inline_budget[0] <= 0 or len(data) > INLINE_MAX_BYTES:
            return f"`{_cell(link)}`"
        inline_budget[0] -= 1
        return f"![{entry.job_id}](data:image/jpeg;base64,{base64.b64encode(data).decode()})"
    except Exception as exc:  # a missing picture must not cost the summary
        logger.warning("no thumbnail for job %s: %s: %s", entry.job_id, type(exc).__name__, exc)
        return ""


def summary_markdown(manifest: BatchManifest) -> str:
    done = sum(entry.status == "succeeded" for entry in manifest.jobs)
    charged = sum(entry.credits or 0.0 for entry in manifest.jobs)
    lines = [f"# {manifest.batch_id}: {manifest.status}", "",
             f"{done} of {len(manifest.jobs)} job(s) succeeded; {charged:g} credits charged "
             f"(estimated {manifest.estimated_credits:g}); account `{manifest.account}`.", "",
             "| job | status | final video or error | credits | seconds | contact sheet |",
             "|---|---|---|---|---|---|"]
    budget = [INLINE_THUMBNAILS]
    for entry in manifest.jobs:
        outcome = f"`{_cell(entry.final_uri)}`" if entry.final_uri else _cell(entry.error or "")
        credits = "" if entry.credits is None else f"{entry.credits:g}"
        seconds = "" if entry.seconds is None else f"{entry.seconds:.0f}"
        lines.append(f"| {_cell(entry.job_id)} | {entry.status} | {outcome} | {credits} | {seconds} | "
                     f"{thumbnail(entry, budget)} |")
    return "\n".join(lines) + "\n"


def artifact_key(batch_id: str) -> str:
    return (_KEY_JUNK.sub("-", batch_id.lower()).strip("-") or "batch") + "-summary"


def publish_batch_summary(manifest: BatchManifest) -> None:
    """Attach the summary to the current flow run (nothing outside a run)."""
    context = FlowRunContext.get()
    if context is None or context.flow_run is None:
        return
    try:
        with get_client(sync_client=True) as client:
            client.create_artifact(ArtifactCreate(
                key=artifact_key(manifest.batch_id), type="markdown", data=summary_markdown(manifest),
                description=f"Batch {manifest.batch_id} ({manifest.status}); manifest {batch_key(manifest.batch_id)}",
                flow_run_id=context.flow_run.id))
    except Exception as exc:
        logger.warning("could not publish the summary of batch %s: %s: %s", manifest.batch_id,
                       type(exc).__name__, exc)
