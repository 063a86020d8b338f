"""The Prefect UI in a real browser: headless Chromium renders the pages of a real `prefect server` after a
job ran, and the test reads the rendered DOM (`--dump-dom`) and saves screenshots.

Where the names are text: the flow-run page's timeline is a canvas, and the classic UI's tabs cannot be
deep-linked (it resets `?tab=` to Logs on load), so task-run names are read from the v2 UI's Task Runs tab
(`/v2/runs/flow-run/{id}?tab=TaskRuns`), which lists every task run by name. The local-folder job here also
checks that the summary's inline (data: URI) contact sheet reaches the page as an image.
"""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from uuid import UUID

import pytest
from prefect import get_client
from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, FlowRunFilter
from prefect.client.schemas.sorting import TaskRunSort

from flows.video import produce_video
from kling_tasks.jobs import ExtensionSpec, GenerationSpec, VideoJob
from tests.conftest import PrefectServer

CHROMIUM = shutil.which("chromium")
pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's `chromium` on PATH (apt-get install chromium); "
                                                ".ci/run installs it"),
]

KLING_AK = "browser-test-ak-2c6e0a8f"
KLING_SK = "browser-test-sk-9d1f4b7e3a5c2e8f0b6d"  # >= 32 bytes: HS256 key
JOB_ID = f"browser-kite-{uuid.uuid4().hex[:8]}"  # the session shares one Prefect server and cache
TASK_NAMES = ["generate", "wait-generate", "store-step-00", "extend-1-of-1", "wait-extend-1-of-1", "store-step-01"]
ARTIFACT_KEYS = [f"{JOB_ID}-{kind}" for kind in ("progress", "steps", "video", "summary")]
CHROMIUM_FLAGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
    "--window-size=1400,900",
]


@dataclass
class UiRun:
    ui_url: str
    flow_run_id: UUID
    summary_id: UUID
    shots: Path


@pytest.fixture(scope="module")
def ui_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrefectServer]:
    """A Prefect server of this module's own: the Artifacts page lists every key of its server in a virtual
    scroller, so on the session's shared server (hundreds of keys from other tests) this job's keys may lie
    outside the rendered window."""
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker
    from prefect.settings import PREFECT_API_URL, temporary_settings

    server = PrefectServer.start(lambda: tmp_path_factory.mktemp("prefect-ui-server"))
    try:
        # The process's events worker keeps the client of the server it first sent to (an earlier test module
        # in this worker process): stopped here, the next event starts one for this server, and after it.
        EventsWorker.drain_all(timeout=10)
        with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
            yield server
            APILogWorker.drain_all(timeout=10)
            EventsWorker.drain_all(timeout=10)
    finally:
        server.stop()


@pytest.fixture(scope="module")
def ui_run(prefect_server: PrefectServer, ui_server: PrefectServer,
           tmp_path_factory: pytest.TempPathFactory) -> Iterator[UiRun]:
    from kling_emulator import EmulatorConfig, start_emulator

    out = tmp_path_factory.mktemp("browser-videos")
    with start_emulator(EmulatorConfig(access_key=KLING_AK, secret_key=KLING_SK, time_scale=0.004)) as emulator, \
            pytest.MonkeyPatch.context() as env:
        for name, value in {
            "KLING_PROVIDER": "kling", "KLING_API_BASE_URL": emulator.base_url, "KLING_ACCESS_KEY": KLING_AK,
            "KLING_SECRET_KEY": KLING_SK, "KLING_ALLOW_PRIVATE_URLS": "1",
            "KLING_POLL_MIN_SECONDS": "0.05", "KLING_POLL_MAX_SECONDS": "0.3",
        }.items():
            env.setenv(name, value)
        job = VideoJob(generate=GenerationSpec(prompt="a paper kite at dusk"),
                       extensions=[ExtensionSpec(prompt="it climbs")], dest=str(out), job_id=JOB_ID)
        state = asyncio.run(produce_video(job, return_state=True))
    assert state.is_completed()
    flow_run_id = state.state_details.flow_run_id
    assert flow_run_id is not None
    with get_client(sync_client=True) as client:  # task runs arrive after the flow returns
        deadline = time.monotonic() + 20
        while len(client.read_task_runs(flow_run_filter=FlowRunFilter(id={"any_": [flow_run_id]}),
                                         sort=TaskRunSort.EXPECTED_START_TIME_ASC, limit=200)) < 6:
            assert time.monotonic() < deadline, "task runs never arrived"
            time.sleep(0.3)
        arts = client.read_artifacts(
            artifact_filter=ArtifactFilter(flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])))
    summary = next(a for a in arts if a.key == f"{JOB_ID}-summary")
    yield UiRun(ui_server.ui_url, flow_run_id, summary.id, tmp_path_factory.mktemp("screenshots"))


def chromium(url: str, *mode: str, profile: Path, budget_ms: int = 15000) -> str:
    """One headless Chromium run with a fresh profile; returns stdout (the DOM with --dump-dom)."""
    assert CHROMIUM is not None
    done = subprocess.run([CHROMIUM, *CHROMIUM_FLAGS, f"--virtual-time-budget={budget_ms}",
                           f"--user-data-dir={profile}", *mode, url],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, f"chromium failed on {url}: {done.stderr[-2000:]}"
    return done.stdout


def render(run: UiRun, path: str, shot_name: str, tmp_path: Path, expect: list[str]) -> str:
    """The rendered DOM of a UI page, and a screenshot of it saved (and printed) under the pytest tmp dir.

    The single-page app fetches from the API after load; now and then the virtual-time budget ends before
    that data is drawn, so the dump is retried (fresh profile each time) until the expected text is there.
    """
    url = f"{run.ui_url}{path}"
    for attempt in range(5):  # a busy machine (three test workers on two cores) can need a longer budget
        dom = chromium(url, "--dump-dom", profile=tmp_path / f"profile-dom-{attempt}",
                       budget_ms=15000 * (1 + attempt))
        if all(text in dom for text in expect):
            break
    shot = run.shots / f"{shot_name}.png"
    chromium(url, f"--screenshot={shot}", profile=tmp_path / "profile-shot")
    assert shot.stat().st_size > 10_000, f"screenshot of {url} is (nearly) empty"
    print(f"\nscreenshot of {url}: {shot}")
    assert "Can't connect to Server API" not in dom, "the UI could not reach the API"
    return dom


def test_flow_run_page_shows_the_job(ui_run: UiRun, tmp_path: Path) -> None:
    tags = ["provider:kling", "model:kling-v1", f"job:{JOB_ID}"]
    dom = render(ui_run, f"/runs/flow-run/{ui_run.flow_run_id}", "flow-run", tmp_path, expect=tags)
    assert f">{JOB_ID}<" in dom, "the flow run is named after the job"
    for tag in tags:
        assert tag in dom, f"flow-run tag {tag} shown"


def test_task_runs_tab_lists_every_task_by_name(ui_run: UiRun, tmp_path: Path) -> None:
    dom = render(ui_run, f"/v2/runs/flow-run/{ui_run.flow_run_id}?tab=TaskRuns", "flow-run-task-runs", tmp_path,
                 expect=[f">{name}<" for name in TASK_NAMES])
    for name in TASK_NAMES:
        assert f">{name}<" in dom, f"task run {name} listed as text"


def test_artifacts_page_lists_the_job_artifacts(ui_run: UiRun, tmp_path: Path) -> None:
    dom = render(ui_run, "/artifacts", "artifacts", tmp_path, expect=[f">{key}<" for key in ARTIFACT_KEYS])
    for key in ARTIFACT_KEYS:
        assert f">{key}<" in dom, f"artifact {key} listed"


def test_summary_page_shows_the_contact_sheet(ui_run: UiRun, tmp_path: Path) -> None:
    dom = render(ui_run, f"/artifacts/artifact/{ui_run.summary_id}", "summary", tmp_path,
                 expect=["total length", '<img src="data:image/jpeg;base64,'])
    assert f"{JOB_ID}: succeeded" in dom and "total length" in dom and "wall time" in dom
    assert '<img src="data:image/jpeg;base64,' in dom, "the inline contact sheet is rendered as an image"
