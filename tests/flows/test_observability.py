"""Observability end to end: a job runs on the emulator + moto's S3 + a real `prefect server`, then everything
the UI would show is read back through Prefect's client: the flow run, task-run names, logs, artifacts,
events. One job (and its Cached rerun) is shared by every test here; a secret scan covers all of it.

Logs, task runs and events reach the server asynchronously, so reads poll with a deadline.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, TypeVar
from uuid import UUID

import boto3
import httpx
import pytest
from prefect import get_client
from prefect.client.schemas.filters import (
    ArtifactFilter,
    ArtifactFilterFlowRunId,
    FlowRunFilter,
    LogFilter,
    LogFilterFlowRunId,
)
from prefect.client.schemas.objects import Artifact, Log, TaskRun
from prefect.client.schemas.sorting import LogSort, TaskRunSort
from prefect.events.filters import EventAnyResourceFilter, EventFilter, EventNameFilter
from prefect.events.schemas.events import ReceivedEvent

from flows.video import produce_video
from kling_tasks.jobs import ExtensionSpec, GenerationSpec, VideoJob
from kling_tasks.observability.automations import create_failure_webhook

# This module's own credentials, distinctive so the scan cannot match by accident.
KLING_AK = "obs-test-ak-7f3c9e1d2b4a"
KLING_SK = "obs-test-sk-5e8d1c7b9a3f6e2d0a4c8b1e"  # >= 32 bytes: HS256 key
AWS_SECRET = "obs-test-aws-secret-4b7e1a9c3d"
# The session shares one Prefect server and cache: job ids of this session only.
JOB_ID = f"obs-e2e-kite-{uuid.uuid4().hex[:8]}"
FAILED_JOB_ID = f"obs-e2e-refused-{uuid.uuid4().hex[:8]}"
EXTENSIONS = 2

T = TypeVar("T")


def poll(read: Callable[[], T], ok: Callable[[T], bool], timeout: float = 20.0, what: str = "it") -> T:
    """Re-read until `ok` (task runs, logs and events arrive after the flow returns)."""
    deadline = time.monotonic() + timeout
    while True:
        value = read()
        if ok(value) or time.monotonic() > deadline:
            assert ok(value), f"timed out waiting for {what}"
            return value
        time.sleep(0.3)


@dataclass
class Run:
    flow_run_id: UUID
    job_id: str
    uri: str
    manifest: dict[str, Any]
    manifest_raw: bytes


@dataclass
class Observed:
    first: Run
    rerun: Run
    failed: Run  # a job whose extension Kling fails, with the failure automation on the server
    webhook_calls: list[dict[str, Any]]
    s3_endpoint: str


@pytest.fixture(scope="module")
def observed(prefect_server: Any, tmp_path_factory: pytest.TempPathFactory,
             json_receiver: Callable[[], Any]) -> Iterator[Observed]:
    """Emulator + moto S3 (module-scoped twins of the function fixtures), one job, then its Cached rerun."""
    from moto.server import ThreadedMotoServer

    from kling_emulator import EmulatorConfig, start_emulator

    s3_server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    s3_server.start()
    host, port = s3_server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    with start_emulator(EmulatorConfig(access_key=KLING_AK, secret_key=KLING_SK, time_scale=0.004)) as emulator, \
            pytest.MonkeyPatch.context() as env:
        for name, value in {
            "KLING_PROVIDER": "kling", "KLING_API_BASE_URL": emulator.base_url,
            "KLING_ACCESS_KEY": KLING_AK, "KLING_SECRET_KEY": KLING_SK, "KLING_ALLOW_PRIVATE_URLS": "1",
            "KLING_POLL_MIN_SECONDS": "0.05", "KLING_POLL_MAX_SECONDS": "0.3",
            "AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "obs-test-aws-key-id",
            "AWS_SECRET_ACCESS_KEY": AWS_SECRET, "AWS_DEFAULT_REGION": "us-east-1",
        }.items():
            env.setenv(name, value)
        boto3.client("s3").create_bucket(Bucket="videos")
        extensions = [ExtensionSpec(prompt=f"the kite climbs, part {i}") for i in range(1, EXTENSIONS + 1)]
        job = VideoJob(generate=GenerationSpec(prompt="a red kite over green hills"), extensions=extensions,
                       dest="s3://videos/runs", job_id=JOB_ID)
        runs = [_run(job) for _ in range(2)]

        # The documented automation, live: Kling fails the extension, the server calls our webhook.
        hook = json_receiver()
        automation_id = create_failure_webhook(hook.url("/kling-failed"), name="obs-e2e-failed")
        emulator.set_faults({"rules": [{"match": "create:video-extend", "kind": "task_fail",
                                        "params": {"message": "refused by content policy"}}]})
        failing = job.model_copy(update={"job_id": FAILED_JOB_ID, "extensions": extensions[:1]})
        failed = _run(failing, expect_failure=True)
        try:
            yield Observed(first=runs[0], rerun=runs[1], failed=failed, webhook_calls=hook.received,
                           s3_endpoint=endpoint)
        finally:
            with get_client(sync_client=True) as client:
                client.delete_automation(automation_id)
            s3_server.stop()


def _run(job: VideoJob, expect_failure: bool = False) -> Run:
    started = time.monotonic()
    state = asyncio.run(produce_video(job, return_state=True))
    assert state.is_failed() == expect_failure, state
    uri = "" if expect_failure else state.result()
    assert isinstance(uri, str)
    print(f"\nflow run {state.state_details.flow_run_id} took {time.monotonic() - started:.1f} s")
    job_id = job.effective_job_id()
    raw = boto3.client("s3").get_object(Bucket="videos", Key=f"runs/{job_id}/manifest.json")["Body"].read()
    flow_run_id = state.state_details.flow_run_id
    assert flow_run_id is not None
    return Run(flow_run_id=flow_run_id, job_id=job_id, uri=uri, manifest=json.loads(raw), manifest_raw=raw)


# ---- reading back ----------------------------------------------------------------------------------------


def task_runs(run: Run, expected: int) -> list[TaskRun]:
    with get_client(sync_client=True) as client:
        return poll(lambda: client.read_task_runs(flow_run_filter=FlowRunFilter(id={"any_": [run.flow_run_id]}),
                                                    sort=TaskRunSort.EXPECTED_START_TIME_ASC, limit=200),
                    lambda trs: len(trs) >= expected and all(t.state and t.state.is_final() for t in trs),
                    what="task runs")


def all_logs(run: Run) -> list[Log]:
    """Every log line of the run, all pages."""
    logs: list[Log] = []
    with get_client(sync_client=True) as client:
        while True:
            page = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.flow_run_id])),
                                    limit=200, offset=len(logs), sort=LogSort.TIMESTAMP_ASC)
            logs += page
            if len(page) < 200:
                return logs


def run_logs(run: Run, marker: str) -> list[Log]:
    """All logs, once the run's last line (the flow's own "Finished in state") has arrived."""
    return poll(lambda: all_logs(run), lambda logs: any(marker in log.message for log in logs), what="logs")


def artifacts(run: Run) -> list[Artifact]:
    with get_client(sync_client=True) as client:
        return client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[run.flow_run_id])))


def kling_events(run: Run, expected: int) -> list[ReceivedEvent]:
    """kling.* events related to the run's flow run; the events endpoint caps `limit` at 50, so page."""

    def read() -> list[ReceivedEvent]:
        with get_client(sync_client=True) as client:
            page = client.read_events(filter=EventFilter(
                any_resource=EventAnyResourceFilter(id=[f"prefect.flow-run.{run.flow_run_id}"]),
                event=EventNameFilter(prefix=["kling."])), limit=50)
            events = list(page.events)
            while page.next_page:
                page = client.read_events_page(page.next_page)
                events += page.events
            return events

    return poll(read, lambda events: len(events) >= expected, what=f"{expected} kling events")


# ---- names and tags --------------------------------------------------------------------------------------


def expected_task_names() -> list[str]:
    steps = ["generate"] + [f"extend-{i}-of-{EXTENSIONS}" for i in range(1, EXTENSIONS + 1)]
    return [n for i, s in enumerate(steps) for n in (s, f"wait-{s}", f"store-step-{i:02d}")]


def test_flow_run_named_after_the_job_and_tagged(observed: Observed) -> None:
    with get_client(sync_client=True) as client:
        flow_run = client.read_flow_run(observed.first.flow_run_id)
    assert flow_run.name == JOB_ID and flow_run.state_name == "Completed"
    assert {"provider:kling", "model:kling-v1", f"job:{JOB_ID}"} <= set(flow_run.tags)


def test_task_runs_named_after_what_they_do(observed: Observed) -> None:
    names = expected_task_names()
    first = task_runs(observed.first, len(names))
    assert sorted(t.name for t in first) == sorted(names)
    assert all({"provider:kling", "model:kling-v1"} <= set(t.tags) for t in first)
    assert not any(tag.startswith("job:") for t in first for tag in t.tags), "job: is the flow run's tag only"
    rerun = task_runs(observed.rerun, len(names))
    assert sorted(t.name for t in rerun) == sorted(names)
    assert {t.state_name for t in rerun} == {"Cached"}, "the rerun paid nothing"


# ---- logs ------------------------------------------------------------------------------------------------


def test_logs_carry_ids_seconds_credits_and_where_it_went(observed: Observed) -> None:
    logs = [log.message for log in run_logs(observed.first, "summary artifact")]
    for step in observed.first.manifest["steps"]:
        # Every Kling answer has its own request_id: the submit line carries the create's (kept in the
        # manifest), each state-change line the request_id of the poll that saw it.
        mine = [m for m in logs if step["task_id"] in m and step["external_task_id"] in m]
        assert any(f"request_id={step['request_id']}" in m and "status=submitted" in m for m in mine), \
            f"submit of {step['name']} logged with task_id, external_task_id and request_id"
        assert any(re.search(r"\bsucceed\b", m) and re.search(r"request_id=[\w-]+", m) for m in mine), \
            f"{step['name']} reaching succeed logged with all ids"
        assert any(step["task_id"] in m and "credits" in m and "queued" in m and "processing" in m for m in logs)
        assert any(step["uri"] in m for m in logs), f"where {step['name']} was stored"
    assert any("contact sheet stored at s3://videos/runs/" in m for m in logs)
    assert any(f"final video: {observed.first.uri}" in m for m in logs)


# ---- artifacts -------------------------------------------------------------------------------------------


def latest_by_key(run: Run) -> dict[str, Artifact]:
    found: dict[str, Artifact] = {}
    for artifact in sorted(artifacts(run), key=lambda a: a.created or 0):
        if artifact.key:
            found[artifact.key] = artifact
    return found


@pytest.mark.parametrize("which", ["first", "rerun"])
def test_artifacts(observed: Observed, which: str) -> None:
    run: Run = getattr(observed, which)
    arts = latest_by_key(run)
    keys = {f"{JOB_ID}-{k}" for k in ("progress", "steps", "video", "summary")}
    assert set(arts) == keys
    assert all(re.fullmatch(r"[a-z0-9-]+", key) for key in arts)
    # One of each per run: the progress bar and the table are updated in place, not re-created per step.
    assert sorted(a.key or "" for a in artifacts(run)) == sorted(keys)

    assert arts[f"{JOB_ID}-progress"].type == "progress" and arts[f"{JOB_ID}-progress"].data == 100

    table = arts[f"{JOB_ID}-steps"]
    rows = json.loads(table.data) if isinstance(table.data, str) else table.data
    assert table.type == "table" and len(rows) == EXTENSIONS + 1
    for row, step in zip(rows, run.manifest["steps"], strict=True):
        assert row["status"] == "stored"
        for field in ("task_id", "external_task_id", "request_id", "video_id", "credits", "uri"):
            assert row[field] == step[field] and row[field] is not None
        assert row["queued_s"] is not None and row["processing_s"] is not None

    video = arts[f"{JOB_ID}-video"]
    link = re.fullmatch(r"\[(.+)\]\((.+)\)", str(video.data))
    assert link and link.group(1) == run.uri
    presigned = link.group(2)
    assert presigned.startswith(observed.s3_endpoint) and "Signature=" in presigned
    assert httpx.get(presigned).content[4:8] == b"ftyp", "the presigned link serves the MP4"

    summary = str(arts[f"{JOB_ID}-summary"].data)
    last = run.manifest["steps"][-1]
    made = f"1 generation + {EXTENSIONS} extension(s) by video-extend"
    assert f"| total length | {last['duration']:.1f} s ({made}) |" in summary
    assert f"| credits | {run.manifest['credits_charged']:g} charged" in summary
    assert "| wall time |" in summary
    assert f"`s3://videos/runs/{JOB_ID}/manifest.json`" in summary
    sheet_url = re.search(r"!\[contact sheet[^\]]*\]\(([^)]+)\)", summary)
    assert sheet_url, "the summary shows the contact sheet"
    sheet = httpx.get(sheet_url.group(1))
    assert sheet.status_code == 200 and sheet.content[:3] == b"\xff\xd8\xff", "a JPEG, next to the video"
    assert f"/runs/{JOB_ID}/contact-sheet.jpg" in sheet_url.group(1)


# ---- events ----------------------------------------------------------------------------------------------


def test_events_name_the_kling_task_and_relate_the_job_and_flow_run(observed: Observed) -> None:
    steps = observed.first.manifest["steps"]
    events = kling_events(observed.first, 3 * len(steps))
    by_name: dict[str, list[ReceivedEvent]] = {}
    for event in events:
        by_name.setdefault(event.event, []).append(event)
    assert {name: len(evs) for name, evs in by_name.items()} == {
        "kling.task.submitted": len(steps), "kling.task.succeeded": len(steps), "kling.video.stored": len(steps)}
    for event in events:
        assert event.resource.id.startswith("kling.task.")
        related = {r.id: r.role for r in event.related}
        assert related[f"kling.job.{JOB_ID}"] == "job"
        assert related[f"prefect.flow-run.{observed.first.flow_run_id}"] == "flow-run"
        # The ledger emits them, in the flow run, once per transition: the resource says which step.
        step = steps[int(event.resource["kling.step"])]
        assert event.resource.id == f"kling.task.{step['task_id']}"
        assert event.resource["kling.external_task_id"] == step["external_task_id"] == event.payload["external_task_id"]
        assert event.payload["job_id"] == JOB_ID
    stored = {e.payload["uri"] for e in by_name["kling.video.stored"]}
    assert stored == {s["uri"] for s in steps}
    credits = sorted(e.payload["credits"] for e in by_name["kling.task.succeeded"])
    assert credits == sorted(s["credits"] for s in steps)


# ---- a failed Kling task ---------------------------------------------------------------------------------


def test_failed_task_is_an_event_a_summary_and_a_webhook_call(observed: Observed) -> None:
    run = observed.failed
    failed_step = run.manifest["steps"][1]
    assert run.manifest["status"] == "failed" and failed_step["status"] == "failed"
    events = kling_events(run, 5)  # submitted, succeeded, stored (generate) + the extension's submitted, failed
    failed = [e for e in events if e.event == "kling.task.failed"]
    assert len(failed) == 1 and failed[0].resource.id == f"kling.task.{failed_step['task_id']}"
    assert failed[0].payload["task_status_msg"] == "refused by content policy"
    assert {r.id for r in failed[0].related} >= {f"kling.job.{FAILED_JOB_ID}", f"prefect.flow-run.{run.flow_run_id}"}

    arts = latest_by_key(run)
    assert set(arts) == {f"{FAILED_JOB_ID}-{k}" for k in ("progress", "steps", "summary")}, "no video link"
    assert 0 < float(arts[f"{FAILED_JOB_ID}-progress"].data) < 100
    summary = str(arts[f"{FAILED_JOB_ID}-summary"].data)
    assert summary.startswith(f"# {FAILED_JOB_ID}: failed")
    assert "**Step `extend-1-of-1` failed**" in summary and "refused by content policy" in summary
    rows = json.loads(str(arts[f"{FAILED_JOB_ID}-steps"].data))
    assert [r["status"] for r in rows] == ["stored", "failed"]

    calls = poll(lambda: [c for c in observed.webhook_calls if c["job_id"] == FAILED_JOB_ID], lambda c: len(c) >= 1,
                 timeout=30, what="the webhook call")
    assert calls == [{
        "event": "kling.task.failed", "job_id": FAILED_JOB_ID, "kling_task_id": failed_step["task_id"],
        "external_task_id": failed_step["external_task_id"], "step": "extend-1-of-1",
        "message": "refused by content policy", "flow_run_id": str(run.flow_run_id),
    }]


# ---- secrets ---------------------------------------------------------------------------------------------

_DATA_URI = re.compile(r"data:[a-z/+-]+;base64,[A-Za-z0-9+/=]+")


def test_no_secret_in_any_log_artifact_event_or_manifest(observed: Observed) -> None:
    texts: list[tuple[str, str]] = []
    for run in (observed.first, observed.rerun, observed.failed):
        texts += [(f"log {log.timestamp}", log.message) for log in run_logs(run, "summary artifact")]
        for artifact in artifacts(run):
            texts.append((f"artifact {artifact.key} data", json.dumps(artifact.data)))
            texts.append((f"artifact {artifact.key} description", artifact.description or ""))
        texts.append(("manifest", run.manifest_raw.decode()))
    texts += [(f"event {e.event}", e.model_dump_json()) for e in kling_events(observed.first, 9)]
    texts += [(f"event {e.event}", e.model_dump_json()) for e in kling_events(observed.failed, 5)]
    texts += [("webhook call", json.dumps(call)) for call in observed.webhook_calls]
    assert len(texts) > 50, "the scan saw the runs"
    assert leaks([("planted", f"Bearer eyJhbGciOiJIUzI1NiJ9.x.y {KLING_SK}")]), "the scan itself works"
    assert leaks(texts) == []


def leaks(texts: list[tuple[str, str]]) -> list[str]:
    found = []
    for where, text in texts:
        text = _DATA_URI.sub("<inline image>", text)  # base64 pixels may spell anything, "eyJ" included
        found += [f"{secret[:8]}... in {where}" for secret in (KLING_AK, KLING_SK, AWS_SECRET, "eyJ")
                  if secret in text]
    return found
