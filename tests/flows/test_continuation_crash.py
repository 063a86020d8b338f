"""A last-frame job (kling-v2-6, 1 + 2 continuations, S3) killed with SIGKILL during a continuation's frame
extraction, then during a continuation's wait, then during a stitch, then run to the end: no step is created
twice, and the final video is byte for byte the one an uninterrupted run makes.

The harness is the crash tests' (tests/flows/test_crash_resume.py): the CLI in its own process group against
the session's Prefect server, the emulator accepting duplicate external ids (a second POST would show as a
second task), and served files padded so that moving a clip takes long enough to be killed in.
"""

from __future__ import annotations

import hashlib
import json
import sys
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import pytest

from kling_tasks.jobs import ExtensionSpec, GenerationSpec, VideoJob, plan_job

from .test_crash_resume import BUCKET, Child, crash_env, new_job_id, open_uploads, read, wait_until

__all__ = ["crash_env"]  # the fixture, used by name

DEST = f"s3://{BUCKET}/continuation"
CLI = str(Path(sys.executable).with_name("kling-pipeline"))
PROMPTS = ["a paper boat on a pond", "it drifts under a bridge", "it reaches the far shore"]
MODEL = ["--model", "kling-v2-6", "--mode", "std", "--duration", "5"]
PAD = 16 * 2**20


def run_cli(job_id: str, env: dict[str, str], log: Path) -> Child:
    args = [CLI, "run", "--prompt", PROMPTS[0], *MODEL, "--dest", DEST, "--job-id", job_id]
    for prompt in PROMPTS[1:]:
        args += ["--extend", prompt]
    return Child(args, env, log)


def external_ids(job_id: str) -> list[str]:
    job = VideoJob(generate=GenerationSpec(prompt=PROMPTS[0], model_name="kling-v2-6"),
                   extensions=[ExtensionSpec(prompt=p) for p in PROMPTS[1:]], dest=DEST, job_id=job_id)
    return [step.external_task_id for step in plan_job(job).steps]


def steps_of(job_id: str) -> list[dict[str, Any]]:
    raw = read(DEST, f"{job_id}/manifest.json")
    return json.loads(raw)["steps"] if raw is not None else []


def sha256(data: bytes | None) -> str:
    assert data is not None
    return hashlib.sha256(data).hexdigest()


def finished(job_id: str, env: dict[str, str], log: Path) -> str:
    code, out = run_cli(job_id, env, log).finish()
    assert code == 0, log.read_text()[-4000:]
    return out.strip().splitlines()[-1]


def reference_final(env: dict[str, str], tmp_path: Path) -> str:
    """The final video's sha256 from an uninterrupted run of the same spec (the emulator renders
    deterministically; the job id names the folder and the tasks, not the pictures)."""
    job_id = new_job_id("lf-reference")
    finished(job_id, env, tmp_path / "reference.log")
    return sha256(read(DEST, f"{job_id}/final.mp4"))


# Kill points, read from the ledger and the emulator while the run goes on; each with its check that the kill
# landed there (the ledger is written before each stage starts, so what it shows at the kill is where it was).
def _extracting(emulator: Any, ids: list[str], job_id: str) -> bool:
    steps = steps_of(job_id)
    return bool(steps) and steps[0]["clip_sha256"] is not None and ids[1] not in emulator.stats()["create_attempts"]


def _extracting_landed(emulator: Any, ids: list[str], job_id: str) -> None:
    assert ids[1] not in emulator.stats()["create_attempts"], "nothing of the continuation was sent"
    assert read(DEST, f"{job_id}/frame-01.jpg") is None, "killed before its start frame was written"


def _waiting(emulator: Any, ids: list[str], job_id: str) -> bool:
    return any(task["external_task_id"] == ids[1] and task["status"] in ("submitted", "processing")
               for task in emulator.stats()["tasks"].values())


def _waiting_landed(emulator: Any, ids: list[str], job_id: str) -> None:
    assert steps_of(job_id)[1]["video_id"] is None, "killed before the continuation's wait ended"


def _stitch_ready(job_id: str) -> int | None:
    """The continuation whose stitch can run (its clip and the step before it stored) and has not ended."""
    steps = steps_of(job_id)
    return next((step["index"] for step in steps[1:] if step["clip_sha256"] is not None
                 and step["status"] != "stored" and steps[step["index"] - 1]["status"] == "stored"), None)


def _stitching(emulator: Any, ids: list[str], job_id: str) -> bool:
    return _stitch_ready(job_id) is not None


def _stitching_landed(emulator: Any, ids: list[str], job_id: str) -> None:
    index = _stitch_ready(job_id)
    assert index is not None and read(DEST, f"{job_id}/step-{index:02d}.mp4") is None, \
        "killed before the stitched video was stored"


KILLS: list[tuple[str, Callable[[Any, list[str], str], bool], Callable[[Any, list[str], str], None]]] = [
    ("frame extraction", _extracting, _extracting_landed),
    ("wait", _waiting, _waiting_landed),
    ("stitching", _stitching, _stitching_landed),
]


@pytest.mark.emulator(time_scale=0.02, pad_bytes=PAD)
def test_killed_continuation_resumes_to_the_same_bytes(emulator: Any, crash_env: dict[str, str],
                                                       tmp_path: Path) -> None:
    """One job, killed three times (each rerun resumes the last one and is killed at the next stage), then
    run to the end."""
    job_id = new_job_id("lf-killed")
    ids = external_ids(job_id)
    for number, (stage, kill_when, landed) in enumerate(KILLS):
        run = run_cli(job_id, crash_env, tmp_path / f"run-{number}.log")
        wait_until(partial(kill_when, emulator, ids, job_id), run, timeout=180, what=f"the {stage} kill point")
        run.kill_group()
        landed(emulator, ids, job_id)

    assert finished(job_id, crash_env, tmp_path / "last.log") == f"{DEST}/{job_id}/final.mp4"
    stats = emulator.stats()
    assert {ext: stats["create_attempts"].get(ext) for ext in ids} == {ext: 1 for ext in ids}, "one POST a step"
    assert {ext: stats["tasks_created"].get(ext) for ext in ids} == {ext: 1 for ext in ids}, "one task a step"
    steps = steps_of(job_id)
    for step in steps:
        index = step["index"]
        assert step["status"] == "stored"
        assert sha256(read(DEST, f"{job_id}/step-{index:02d}.mp4")) == step["sha256"]
        assert sha256(read(DEST, f"{job_id}/clip-{index:02d}.mp4")) == step["clip_sha256"]
    assert open_uploads(BUCKET) == [], "no multipart upload left open"
    final = sha256(read(DEST, f"{job_id}/final.mp4"))
    assert final == steps[-1]["sha256"]
    assert final == reference_final(crash_env, tmp_path), "the same bytes as an uninterrupted run"
