"""Crash tests: the CLI is killed with SIGKILL at a chosen stage, then run again.

The child runs in its own process group (setsid) against the session's real Prefect server, the Kling
emulator and moto's S3 server (or a local folder). The emulator accepts duplicate external ids here (like a
proxy pooling many accounts), so a rerun that POSTs a step again really creates a second task instead of
being saved by a 1201 refusal. After the rerun, the emulator's stats must show one POST and one task per
planned step and no task outside the plan, every stored object must be its own task's video byte for byte
(the file the emulator serves), the manifest must describe what is stored, and nothing half-written (an open
multipart upload, a `.part` temp) may be left.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import pytest

from kling_tasks.storage.s3 import PART_SIZE
from tests.flows.matrix_support import (
    Served,
    manifest_of,
    new_job_id,
    open_uploads,
    planned_ids,
    read,
    s3_key,
    s3_sha256,
    sha256,
    temps,
    uri_of,
)

BUCKET = "crash-videos"
S3_DEST = f"s3://{BUCKET}/crash"
PROMPT = "a lantern floating down a river"
EXTENSIONS = ("the lantern passes a bridge", "the lantern drifts into the sea")
CLI = str(Path(sys.executable).with_name("kling-pipeline"))
MiB = 2**20
PAD = 12 * MiB  # every served video is > 2 S3 parts (mid-transfer tests only: it makes every download bigger)

Condition = Callable[[], bool]


@pytest.fixture
def crash_env(prefect_server: Any, kling_env: dict[str, str], emulator: Any, s3_endpoint: str,
              tmp_path: Path) -> dict[str, str]:
    boto3.client("s3").create_bucket(Bucket=BUCKET)
    # A second POST of a step must show as a second task, not hide behind a 1201 refusal.
    assert emulator.set_behaviour(unique_external_ids=False)["unique_external_ids"] is False
    home = tmp_path / "prefect-home"  # one machine's Prefect home, shared by the killed run and the rerun
    home.mkdir()
    return {
        **os.environ,
        **kling_env,
        "PREFECT_API_URL": prefect_server.api_url,
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "COLUMNS": "200",
    }


class Child:
    def __init__(self, args: list[str], env: dict[str, str], log: Path):
        self.log_path = log
        self._log = log.open("ab")
        self.process = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=self._log,
                                        start_new_session=True)

    def kill_group(self) -> None:
        os.killpg(self.process.pid, signal.SIGKILL)
        self.process.wait(timeout=10)
        self._log.close()

    def finish(self, timeout: float = 180) -> tuple[int, str]:
        out, _ = self.process.communicate(timeout=timeout)
        self._log.close()
        return self.process.returncode, out.decode()


def run_cli(job_id: str, env: dict[str, str], log: Path, dest: str = S3_DEST,
            extensions: tuple[str, ...] = EXTENSIONS) -> Child:
    args = [CLI, "run", "--prompt", PROMPT, "--dest", dest, "--job-id", job_id]
    for text in extensions:
        args += ["--extend", text]
    return Child(args, env, log)


def wait_until(condition: Condition, child: Child | None = None, timeout: float = 90, what: str = "") -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        if child is not None and child.process.poll() is not None:
            raise AssertionError(f"the run ended before the kill point: {child.log_path.read_text()[-3000:]}")
        time.sleep(0.02)
    raise AssertionError(f"never reached: {what or 'the kill point'}")


def plan_for(job_id: str, dest: str = S3_DEST, extensions: tuple[str, ...] = EXTENSIONS) -> list[str]:
    return planned_ids(dest, job_id, PROMPT, extensions)


# ---- what the run left behind (read with tests/flows/matrix_support.py's readers) ----------------------------


def assert_resumed_whole(emulator: Any, dest: str, job_id: str, ids: list[str]) -> None:
    """Each planned step paid once, every stored object whole and its own task's, the ledger true to both."""
    stats = emulator.stats()
    assert stats["create_attempts"] == {ext: 1 for ext in ids}, "one create POST per planned step"
    assert stats["tasks_created"] == {ext: 1 for ext in ids}, "one task per planned step, none outside the plan"
    task_of = {task["external_task_id"]: task_id for task_id, task in stats["tasks"].items()}
    assert len(task_of) == len(stats["tasks"]) == len(ids)

    manifest = manifest_of(dest, job_id)
    assert manifest is not None
    assert manifest["status"] == "succeeded" and manifest["job_id"] == job_id
    assert manifest["final_uri"] == uri_of(dest, f"{job_id}/final.mp4")
    assert [step["external_task_id"] for step in manifest["steps"]] == ids
    s3, served = boto3.client("s3"), Served(emulator)
    for step in manifest["steps"]:
        key = f"{job_id}/step-{step['index']:02d}.mp4"
        data = read(dest, key)
        assert data is not None, f"{key} is stored"
        assert step["status"] == "stored" and step["uri"] == uri_of(dest, key)
        assert step["task_id"] == task_of[step["external_task_id"]], "the ledger names the step's only task"
        assert (len(data), sha256(data)) == (step["size"], step["sha256"]), f"{key} is what the ledger says"
        assert sha256(data) == served.sha256_of_task(step["task_id"]), f"{key} is its task's video, whole"
        if dest.startswith("s3://"):
            head = s3.head_object(Bucket=BUCKET, Key=s3_key(dest, key))
            assert head["ContentLength"] == step["size"]
            assert (head["Metadata"]["task_id"], s3_sha256(head, BUCKET, s3_key(dest, key))) == (
                step["task_id"], step["sha256"])
    final = read(dest, f"{job_id}/final.mp4")
    assert final is not None
    assert sha256(final) == served.sha256_of_task(task_of[ids[-1]]) == manifest["steps"][-1]["sha256"]

    if dest.startswith("s3://"):
        assert open_uploads(BUCKET) == [], "no multipart upload left open"
    else:
        assert temps(Path(dest) / job_id) == [], "no temporary file left in the job folder"


@pytest.fixture
def emulator_faults(emulator: Any) -> Iterator[Callable[[list[dict[str, Any]]], None]]:
    yield lambda rules: emulator.set_faults({"rules": rules})
    emulator.set_faults({"rules": []})


# ---- kill -9 at a stage of the job ----------------------------------------------------------------------------


@dataclass(frozen=True)
class Stage:
    """Where to kill, with the faults that widen that window (gone before the rerun) and the emulator's
    weak-provider switches (kept for the rerun)."""

    kill_when: Callable[[Any, list[str], str], bool]
    faults: list[dict[str, Any]] = field(default_factory=list)
    behaviour: dict[str, Any] = field(default_factory=dict)
    # Checked right after the kill: the kill landed where this stage says.
    landed: Callable[[Any, list[str], str], None] | None = None
    # Waited for before the rerun: what the killed run set in motion at Kling has happened.
    settled: Callable[[Any, list[str], str], bool] | None = None


def _posted(emulator: Any, ids: list[str], job_id: str) -> bool:
    return bool(emulator.stats()["create_attempts"].get(ids[1], 0) >= 1)


def _task_exists(emulator: Any, ids: list[str], job_id: str) -> bool:
    return bool(emulator.stats()["tasks_created"].get(ids[1], 0) >= 1)


def _running(emulator: Any, ids: list[str], job_id: str) -> bool:
    tasks = emulator.stats()["tasks"].values()
    return any(t["external_task_id"] == ids[1] and t["status"] in ("submitted", "processing") for t in tasks)


def _storing_beside_the_next_create(emulator: Any, ids: list[str], job_id: str) -> bool:
    """Step 0's download is held at the server, and step 1's create (which runs beside that store) is in."""
    stats = emulator.stats()
    return sum(stats["downloads"].values()) >= 1 and stats["tasks_created"].get(ids[1], 0) >= 1


def _between_steps(emulator: Any, ids: list[str], job_id: str) -> bool:
    return read(S3_DEST, f"{job_id}/step-01.mp4") is not None


def _post_in_flight(emulator: Any, ids: list[str], job_id: str) -> None:
    assert ids[1] not in emulator.stats()["tasks_created"], "killed while the create was still at the server"


def _intent_without_answer(emulator: Any, ids: list[str], job_id: str) -> None:
    stats = emulator.stats()
    assert stats["faults_fired"].get("drop_after_commit") == 1 and stats["tasks_created"].get(ids[1]) == 1
    manifest = manifest_of(S3_DEST, job_id)
    assert manifest is not None
    step = manifest["steps"][1]
    assert (step["status"], step["task_id"]) == ("submitting", None), \
        "killed after the committed create and before the run learnt its task id"


STAGES: dict[str, Stage] = {
    # The create POST is at the server (held 3 s) when the run dies; the rerun starts once it has committed.
    "submit": Stage(_posted, [{"match": "create:video-extend", "kind": "slow", "times": 1, "params": {"seconds": 3}}],
                    landed=_post_in_flight, settled=_task_exists),
    "wait": Stage(_running),
    # Killed while step 0's download is held at the server. The store runs beside the next step, so the kill
    # waits for step 1's create to be in: a kill between step 1's write-ahead intent and its POST would leave
    # an intent that no lookup can settle on an account without a proven lookup form (the rerun then stops as
    # ambiguous, by design), which is not what this stage is about.
    "store": Stage(_storing_beside_the_next_create,
                   [{"match": "download", "kind": "slow", "times": 1, "params": {"seconds": 10}}]),
    "between-steps": Stage(_between_steps),
    # The create is committed and its answer dropped; the client waits ~1 s before looking it up: the kill
    # lands in that second (widened: its path-form lookup after the drop, the second GET by path, is held
    # 5 s). The lookup forms find nothing (query answers [], path 404): only the task list can tell the rerun
    # that the task exists, and duplicates are accepted, so a resend would pay twice.
    "answer-dropped": Stage(_task_exists, [
        {"match": "create:video-extend", "kind": "drop_after_commit", "times": 1},
        {"match": "get:video-extend", "kind": "slow", "sequence": [False, True], "params": {"seconds": 5}},
    ], behaviour={"lookup_query": "empty", "lookup_path": "off"}, landed=_intent_without_answer),
}


@pytest.mark.parametrize("stage", list(STAGES))
def test_killed_run_resumes_without_paying_twice(
    stage: str, emulator: Any, crash_env: dict[str, str], emulator_faults: Any, tmp_path: Path
) -> None:
    how = STAGES[stage]
    job_id = new_job_id(f"crash-{stage}")
    ids = plan_for(job_id)
    if how.behaviour:
        behaviour = emulator.set_behaviour(**how.behaviour)
        assert {k: behaviour[k] for k in how.behaviour} == how.behaviour
    emulator_faults(how.faults)

    first = run_cli(job_id, crash_env, tmp_path / "first.log")
    wait_until(lambda: how.kill_when(emulator, ids, job_id), first, what=f"the {stage} kill point")
    first.kill_group()
    if how.landed is not None:
        how.landed(emulator, ids, job_id)
    emulator_faults([])
    if how.settled is not None:
        wait_until(lambda: how.settled(emulator, ids, job_id), timeout=30, what="the killed run's create committed")

    code, out = run_cli(job_id, crash_env, tmp_path / "second.log").finish()
    assert code == 0, (tmp_path / "second.log").read_text()[-4000:]
    assert out.strip().splitlines()[-1] == uri_of(S3_DEST, f"{job_id}/final.mp4")
    assert_resumed_whole(emulator, S3_DEST, job_id, ids)


# ---- kill -9 in the middle of a transfer ----------------------------------------------------------------------


@pytest.mark.emulator(pad_bytes=PAD)
@pytest.mark.parametrize("sink", ["s3", "local"])
def test_killed_mid_transfer_leaves_nothing_half_written(
    sink: str, emulator: Any, crash_env: dict[str, str], emulator_faults: Any, tmp_path: Path
) -> None:
    """The last step's video (the second download; nothing else runs beside it) pauses after 6 MiB of its
    12+ MiB; the run is killed once more than one S3 part's worth has gone out and the sink holds a
    half-written object (an open multipart upload with a part in it, or a `.part` temp bigger than a part).
    The rerun stores whole videos and leaves neither behind."""
    dest = S3_DEST if sink == "s3" else str(tmp_path / "out")
    job_id = new_job_id(f"transfer-{sink}")
    extensions = EXTENSIONS[:1]
    ids = plan_for(job_id, dest, extensions)
    step_key = f"{job_id}/step-01.mp4"
    job_dir = Path(dest) / job_id
    emulator_faults([{"match": "download", "kind": "slow_stream", "sequence": [False, True],
                      "params": {"after_bytes": 6 * MiB, "seconds": 60}}])

    def last_video() -> str | None:
        return next((task["video_id"] for task in emulator.stats()["tasks"].values()
                     if task["external_task_id"] == ids[-1] and task["video_id"]), None)

    def half_written() -> bool:
        if sink == "s3":
            uploads = [u for u in open_uploads(BUCKET, s3_key(dest, step_key)) if u["Key"] == s3_key(dest, step_key)]
            return any(boto3.client("s3").list_parts(Bucket=BUCKET, Key=u["Key"], UploadId=u["UploadId"])
                       .get("Parts") for u in uploads)
        return any(path.stat().st_size > PART_SIZE for path in temps(job_dir) if "step-01" in path.name)

    def mid_transfer() -> bool:
        # The first step's store runs beside the next step, so on a busy machine it may still be uploading
        # when the last video is half sent: wait for both.
        video = last_video()
        return (video is not None and emulator.stats()["download_bytes"].get(video, 0) > PART_SIZE
                and half_written() and read(dest, f"{job_id}/step-00.mp4") is not None)

    first = run_cli(job_id, crash_env, tmp_path / "first.log", dest, extensions)
    wait_until(mid_transfer, first, what="more than one part of the last video sent and a half-written object")
    first.kill_group()
    stats = emulator.stats()
    video = last_video()
    assert video is not None and stats["faults_fired"].get("slow_stream") == 1 and stats["downloads"][video] == 1
    assert PART_SIZE < stats["download_bytes"][video] < PAD, "killed mid-transfer"
    assert read(dest, step_key) is None, "nothing is visible under the step's key"
    assert read(dest, f"{job_id}/step-00.mp4") is not None, "the first step was stored before"
    emulator_faults([])

    code, out = run_cli(job_id, crash_env, tmp_path / "second.log", dest, extensions).finish()
    assert code == 0, (tmp_path / "second.log").read_text()[-4000:]
    assert out.strip().splitlines()[-1] == uri_of(dest, f"{job_id}/final.mp4")
    assert_resumed_whole(emulator, dest, job_id, ids)
    final = read(dest, f"{job_id}/final.mp4")
    assert final is not None and len(final) > PAD, "the padded (multi-part) video, whole"


# ---- kill -9 between a write-ahead intent and its POST --------------------------------------------------------


def test_killed_between_a_refused_create_and_its_resend_resumes(
    emulator: Any, crash_env: dict[str, str], emulator_faults: Any, tmp_path: Path
) -> None:
    """Kling refuses the first extension's create with 1303 (back-pressure: nothing was created, DESIGN 2.3);
    the run waits to resend and is killed while it waits. Nothing exists at Kling for that step and the run
    knew it (the refusal withdrew the write-ahead intent): running the same command again must resume (one
    task for the step), not stop and ask the user to check the console."""
    job_id = new_job_id("crash-refused")
    ids = plan_for(job_id)
    emulator_faults([{"match": "create:video-extend", "kind": "http_error", "params": {"code": 1303}}])

    first = run_cli(job_id, crash_env, tmp_path / "first.log")
    wait_until(lambda: emulator.stats()["create_attempts"].get(ids[1], 0) >= 2, first,
               what="a refused create of step 1, resent and refused again")
    first.kill_group()
    stats = emulator.stats()
    assert ids[1] not in stats["tasks_created"], "every create of step 1 was refused: nothing exists"
    refused = stats["create_attempts"][ids[1]]
    manifest = manifest_of(S3_DEST, job_id)
    # The refusal withdrew the intent ("pending"), unless the kill landed between a resend's intent and its
    # answer ("submitting"): then the first step's task, a known one, proves the lookup that settles it.
    assert manifest is not None and manifest["steps"][1]["status"] in ("pending", "submitting")
    emulator_faults([])

    code, out = run_cli(job_id, crash_env, tmp_path / "second.log").finish()
    assert code == 0, (tmp_path / "second.log").read_text()[-3000:]
    assert out.strip().splitlines()[-1] == uri_of(S3_DEST, f"{job_id}/final.mp4")
    stats = emulator.stats()
    assert stats["tasks_created"] == {ext: 1 for ext in ids}, "one task per planned step, none outside the plan"
    assert stats["create_attempts"] == {ids[0]: 1, ids[1]: refused + 1, ids[2]: 1}, "one accepted POST per step"
