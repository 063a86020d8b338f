"""A scheduled (deployment-style) run: `job_id: "teaser-{date}"` is the run's scheduled day, not today's.

The flow runs as a worker runs it: a flow run created on the session's real Prefect server in a Scheduled state
(here a night that has passed, so nothing waits), read back from the server, then executed by Prefect's flow
engine (`prefect.flow_engine.run_flow(flow, flow_run=...)`, parameters taken from the flow run as JSON), which
is what `python -m prefect.flow_engine` does once it has loaded the run. A retry of that run, and a second
run for the same night, must pay nothing; the next night is a new video.
"""

from __future__ import annotations

import hashlib
import json
import uuid
from datetime import UTC, date, datetime, timedelta
from pathlib import Path
from typing import Any
from uuid import UUID

import httpx
import pytest
from prefect import get_client
from prefect.client.schemas.objects import FlowRun
from prefect.flow_engine import run_flow
from prefect.states import AwaitingRetry, Scheduled

from flows.video import produce_video
from kling_tasks.jobs import ExtensionSpec, GenerationSpec, VideoJob, plan_job

pytestmark = [pytest.mark.anyio, pytest.mark.usefixtures("prefect_server")]

NIGHT = datetime(2026, 11, 21, 3, 0, tzinfo=UTC)
# The job id is fixed ("teaser-{date}"), so this test's cached steps are kept apart from any other run in the
# session by its own Kling account: the account is part of every cache key.
ACCOUNT = f"schedule-ak-{uuid.uuid4().hex[:8]}"


def served_sha256(emulator: Any, task_id: str) -> str:
    video_id = emulator.stats()["tasks"][task_id]["video_id"]
    return hashlib.sha256(httpx.get(f"{emulator.base_url}/_files/{video_id}.mp4").content).hexdigest()


async def scheduled_run(job: VideoJob, when: datetime) -> UUID:
    async with get_client() as client:
        flow_run = await client.create_flow_run(produce_video, parameters={"job": job.model_dump(mode="json")},
                                                state=Scheduled(scheduled_time=when))
    return flow_run.id


async def execute(flow_run_id: UUID) -> tuple[Any, FlowRun]:
    """Load the run from the server and run it with the flow engine, as a worker would; the run afterwards."""
    async with get_client() as client:
        flow_run = await client.read_flow_run(flow_run_id)
    state = await run_flow(produce_video, flow_run=flow_run, return_type="state")
    async with get_client() as client:
        return state, await client.read_flow_run(flow_run_id)


def counts(emulator: Any) -> dict[str, Any]:
    stats = emulator.stats()
    return {name: stats[name] for name in ("create_attempts", "tasks_created", "downloads")}


@pytest.mark.emulator(access_key=ACCOUNT)
async def test_a_scheduled_run_resolves_date_to_its_night_and_a_retry_pays_nothing(
        kling_env: dict[str, str], emulator: Any, tmp_path: Path) -> None:
    emulator.set_behaviour(unique_external_ids=False)  # a second POST of a step would be a second task
    dest = tmp_path / "nightly"
    job = VideoJob(generate=GenerationSpec(prompt="a lighthouse at dusk, waves rolling in"),
                   extensions=[ExtensionSpec(prompt="the beam sweeps over the sea")],
                   dest=str(dest), job_id="teaser-{date}")
    night = job.for_date(date(2026, 11, 21))
    planned = [step.external_task_id for step in plan_job(night).steps]
    assert all(ext.startswith("teaser-20261121-s") for ext in planned)

    first = await scheduled_run(job, NIGHT)
    state, flow_run = await execute(first)
    assert state.is_completed(), state
    final = dest / "teaser-20261121" / "final.mp4"
    assert await state.aresult() == str(final)
    assert flow_run.name == "teaser-20261121" and "job:teaser-20261121" in flow_run.tags
    assert sorted(path.name for path in dest.iterdir()) == ["teaser-20261121"], "the folder is the night's"
    manifest = json.loads((final.parent / "manifest.json").read_text())
    assert manifest["job_id"] == "teaser-20261121" and manifest["status"] == "succeeded"
    assert [step["external_task_id"] for step in manifest["steps"]] == planned
    last = manifest["steps"][-1]
    assert hashlib.sha256(final.read_bytes()).hexdigest() == last["sha256"] == served_sha256(emulator,
                                                                                             last["task_id"])
    paid = counts(emulator)  # after served_sha256: its own GET of the file counts as a download
    assert paid["create_attempts"] == paid["tasks_created"] == {ext: 1 for ext in planned}

    # A retry of the same run, days later: the date is still the run's scheduled night.
    async with get_client() as client:
        await client.set_flow_run_state(first, AwaitingRetry(scheduled_time=datetime.now(UTC)), force=True)
    state, flow_run = await execute(first)
    assert state.is_completed(), state
    assert await state.aresult() == str(final) and flow_run.name == "teaser-20261121" and flow_run.run_count == 2
    assert counts(emulator) == paid, "the retried run paid nothing and downloaded nothing"

    # The schedule firing twice for that night (or a second worker): still that night's video, paid once.
    state, _ = await execute(await scheduled_run(job, NIGHT + timedelta(minutes=30)))
    assert state.is_completed() and await state.aresult() == str(final)
    assert counts(emulator) == paid, "a second run for the same night paid nothing"
    assert sorted(path.name for path in dest.iterdir()) == ["teaser-20261121"]

    # The next night is a new video, in its own folder, with its own tasks.
    state, flow_run = await execute(await scheduled_run(job, NIGHT + timedelta(days=1)))
    assert state.is_completed() and await state.aresult() == str(dest / "teaser-20261122" / "final.mp4")
    assert flow_run.name == "teaser-20261122"
    next_night = [step.external_task_id for step in plan_job(job.for_date(date(2026, 11, 22))).steps]
    assert emulator.stats()["tasks_created"] == {ext: 1 for ext in planned + next_night}
