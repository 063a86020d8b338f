"""A finished job's rerun is served from its proven manifest: no Prefect import, no flow run, no Kling request.

The first run is `kling-pipeline run` in this process (the session's Prefect server). On S3 the fast rerun is a
child process, as a user types it, that writes the modules it imported when it exits: Prefect must not be among
them. Anything short of proven (another video under final.mp4, another account, another spec, a failed job)
falls through to the normal path, which does what it always did (the folder's test runs it; on S3 the
verdicts are checked against the real objects).
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import boto3
import pytest
from typer.testing import CliRunner

from flows.cli import app, build_job
from kling_tasks.finished import proven_final
from kling_tasks.settings import load_settings

FAST_LINE = "served from its proven manifest"
BUCKET = "fast-rerun"
# The child: run the CLI and, at exit, write every module it imported to the file named by its first argument.
CHILD = """
import atexit, sys
out = sys.argv.pop(1)
atexit.register(lambda: open(out, "w").write("\\n".join(sorted(sys.modules))))
from flows.cli import app, build_job
from kling_tasks.finished import proven_final
from kling_tasks.settings import load_settings
app(prog_name="kling-pipeline")
"""

# Kling's latencies at 1/1000: a step is ~0.3 s, the tests stay short.
pytestmark = [pytest.mark.usefixtures("kling_env"), pytest.mark.emulator(time_scale=0.001)]


def job_args(dest: str, job_id: str, *extra: str, extend: bool = True) -> list[str]:
    more = ["--extend", "it takes off"] if extend else []
    return ["run", "--prompt", "a heron in the reeds", *more, "--dest", dest, "--job-id", job_id, *extra]


def run_here(args: list[str]) -> Any:
    return CliRunner().invoke(app, args)


def run_child(args: list[str], server: Any, tmp_path: Path) -> tuple[subprocess.CompletedProcess[str], set[str]]:
    modules = tmp_path / f"modules-{uuid.uuid4().hex[:6]}.txt"
    env = {**os.environ, **server.env, "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}
    done = subprocess.run([sys.executable, "-c", CHILD, str(modules), *args], env=env, capture_output=True,
                          text=True, timeout=120, check=False, start_new_session=True)
    return done, set(modules.read_text().split())


def assert_served_fast(done: subprocess.CompletedProcess[str], modules: set[str], uri: str, emulator: Any,
                       requests_before: dict[str, int]) -> None:
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip().splitlines()[-1] == uri, "stdout's last line is the final URI, as a flow run's"
    assert FAST_LINE in done.stderr and "--no-fast-path" in done.stderr
    assert not {m for m in modules if m == "prefect" or m.startswith("prefect.")}, "the fast path imported Prefect"
    assert "flows.video" not in modules
    assert emulator.stats()["requests"] == requests_before, "the fast path sent a request to Kling"
    for secret in (os.environ["KLING_ACCESS_KEY"], os.environ["KLING_SECRET_KEY"]):
        assert secret not in done.stdout + done.stderr


def creates(emulator: Any) -> int:
    return sum(emulator.stats()["create_attempts"].values())


def test_a_finished_job_in_a_folder_is_served_from_its_manifest(
    prefect_server: Any, emulator: Any, tmp_path: Path
) -> None:
    dest, job_id = str(tmp_path / "out"), f"heron-{uuid.uuid4().hex[:8]}"
    first = run_here(job_args(dest, job_id))
    assert first.exit_code == 0, first.output
    uri = first.stdout.strip().splitlines()[-1]
    folder = tmp_path / "out" / job_id
    assert uri == str(folder / "final.mp4")
    paid, requests = creates(emulator), emulator.stats()["requests"]

    # Served in this process (the S3 test below runs it as a child process and checks what it imported).
    served = run_here(job_args(dest, job_id))
    assert served.exit_code == 0, served.output
    assert served.stdout.strip().splitlines()[-1] == uri and FAST_LINE in served.stderr
    assert emulator.stats()["requests"] == requests

    # Another video under final.mp4 (step 0's: a real MP4, other bytes): not proven, so the flow runs and puts
    # the last step's video back, paying nothing.
    (folder / "final.mp4").write_bytes((folder / "step-00.mp4").read_bytes())
    again = run_here(job_args(dest, job_id))
    assert again.exit_code == 0, again.output
    assert FAST_LINE not in again.stderr
    assert again.stdout.strip().splitlines()[-1] == uri
    assert (folder / "final.mp4").read_bytes() == (folder / "step-01.mp4").read_bytes()
    assert creates(emulator) == paid

    # --no-fast-path runs the flow although the job is proven finished.
    forced = run_here(job_args(dest, job_id, "--no-fast-path"))
    assert forced.exit_code == 0, forced.output
    assert FAST_LINE not in forced.stderr
    assert forced.stdout.strip().splitlines()[-1] == uri
    # A settlement flag is a request to the flow, never served from the ledger: here the flow's checks refuse it.
    for flag in (["--adopt", "nope=123"], ["--assume-not-created", "nope"]):
        settled = run_here(job_args(dest, job_id, *flag))
        assert settled.exit_code == 2, settled.output
        assert "not an external_task_id of this plan" in settled.stderr and FAST_LINE not in settled.stderr
    # What the flow's checks refuse is not served either: a budget below the plan's estimate.
    over = run_here(job_args(dest, job_id, "--max-credits", "0.5"))
    assert over.exit_code == 2 and "over max_credits 0.5" in over.stderr and FAST_LINE not in over.stderr

    # The ledger of another account, or another spec under this job id: the normal path refuses, as before.
    manifest_path = folder / "manifest.json"
    manifest = json.loads(manifest_path.read_text())
    manifest_path.write_text(json.dumps({**manifest, "account": "0123456789ab"}))
    other_account = run_here(job_args(dest, job_id))
    assert other_account.exit_code == 2, other_account.output
    assert "belongs to another job" in other_account.stderr and FAST_LINE not in other_account.stderr
    manifest_path.write_text(json.dumps(manifest))
    args = job_args(dest, job_id)
    other_spec = run_here([*args[:4], "it lands", *args[5:]])  # another extension prompt, same job id
    assert other_spec.exit_code == 2, other_spec.output
    assert "belongs to another job" in other_spec.stderr and FAST_LINE not in other_spec.stderr
    assert creates(emulator) == paid


def test_a_finished_job_on_s3_is_served_and_a_tampered_or_failed_one_is_not_proven(
    prefect_server: Any, emulator: Any, s3_endpoint: str, tmp_path: Path
) -> None:
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket=BUCKET)
    dest, job_id = f"s3://{BUCKET}/v", f"heron-{uuid.uuid4().hex[:8]}"
    args = job_args(dest, job_id, extend=False)  # one step: the S3 proof is the same for one as for many
    first = run_here(args)
    assert first.exit_code == 0, first.output
    uri = first.stdout.strip().splitlines()[-1]
    assert uri == f"{dest}/{job_id}/final.mp4"
    requests = emulator.stats()["requests"]

    done, modules = run_child(args, prefect_server, tmp_path)
    assert_served_fast(done, modules, uri, emulator, requests)

    # Another task's video under final.mp4, carrying its own sha256 and task id as any stored step does, or a
    # ledger that says the job failed: not proven (the CLI then runs the flow, as in the folder's test above).
    final, manifest_key = f"v/{job_id}/final.mp4", f"v/{job_id}/manifest.json"
    job = build_job("a heron in the reeds", None, None, None, "kling-v1", "std", "5", "16:9", None, dest, job_id,
                    None)
    kept = s3.get_object(Bucket=BUCKET, Key=final)
    other = b"another task's video"
    s3.put_object(Bucket=BUCKET, Key=final, Body=other,
                  Metadata={"sha256": hashlib.sha256(other).hexdigest(), "task_id": "another-task"})
    assert proven_final(job, load_settings()).reason == "final.mp4 is not the video the manifest records"
    s3.put_object(Bucket=BUCKET, Key=final, Body=kept["Body"].read(), Metadata={**kept["Metadata"], "task_id": "x"})
    assert proven_final(job, load_settings()).reason == "final.mp4 does not carry the last step's task id"
    manifest = json.loads(s3.get_object(Bucket=BUCKET, Key=manifest_key)["Body"].read())
    s3.put_object(Bucket=BUCKET, Key=manifest_key, Body=json.dumps({**manifest, "status": "failed"}).encode())
    assert proven_final(job, load_settings()).reason == "the job is failed"
    assert emulator.stats()["requests"] == requests
