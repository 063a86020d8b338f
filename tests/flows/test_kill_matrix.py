"""The kill matrix: SIGKILL of the whole process group at seeded random moments, then reruns until done.

`kling-pipeline run` (a 1 + 3 job) and `kling-pipeline batch` (3 jobs of 1 + 2) run as children in their own
process group (setsid) against one emulator, one moto S3 server and the session's Prefect server. A clean run
is measured first; each case then draws its moment u in [0, 1) from the matrix seed and kills the group at
u x (the clean run's duration) after the start, checks what the killed run left (every visible object whole and
its task's, a manifest consistent with it), and runs the same command again until it exits 0 (at most
MAX_RERUNS). Then: one task per external id (the emulator accepts duplicate ids here, so a resent create
would be a second task), every step and final.mp4 the emulator's file byte for byte, manifests consistent
with the stored objects, no open multipart upload and no temp left. Destinations alternate S3 / local folder.

`KLING_MATRIX=full`: 30 kills of the job and 10 of the batch; the default run kills the job once (seeded).
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import boto3
import pytest
import yaml

from kling_tasks.jobs import ExtensionSpec, GenerationSpec, VideoJob, plan_job
from tests.conftest import quiet_werkzeug
from tests.flows.conftest import EMULATOR_AK, EMULATOR_SK
from tests.flows.matrix_support import (
    BUCKET,
    FULL,
    SEED,
    Served,
    assert_consistent,
    assert_finished_whole,
    duplicates,
    new_job_id,
    read,
    record,
    uri_of,
)

pytestmark = pytest.mark.usefixtures("prefect_server")

CLI = str(Path(sys.executable).with_name("kling-pipeline"))
PROMPT = "a kite over the dunes"
EXTENSIONS = ("the kite climbs", "the string snaps", "the kite drifts out to sea")
BATCH_JOBS = 3
BATCH_EXTENSIONS = ("the tide comes in", "the sun sets")
JOB_KILLS = 30 if FULL else 1
# The default run kills no batch here: tests/flows/test_batch.py kills one in every run already, and the budget
# of the default run is ~90 s for both matrices.
BATCH_KILLS = 10 if FULL else 0
MAX_RERUNS = 3
SLOTS = 100  # a killed run keeps its slot's lease for ~60 s (kling_tasks/slots.py): room for every dead run


@dataclass(frozen=True)
class Kill:
    index: int
    u: float  # the moment, as a fraction of the clean run's duration
    sink: str

    @property
    def id(self) -> str:
        return f"{self.index:02d}-{self.sink}-at{self.u:.3f}"


def kills(what: str, count: int) -> list[Kill]:
    rng = random.Random(f"{SEED}:kill:{what}")
    return [Kill(i, rng.random(), "s3" if i % 2 == 0 else "local") for i in range(count)]


# ---- one emulator, one moto server, the children's environment ------------------------------------------------


@pytest.fixture(scope="module")
def emulator() -> Iterator[Any]:
    from kling_emulator import EmulatorConfig, start_emulator

    # ~1 s per Kling task: a 1 + 3 job spends ~4 s at Kling, the rest is the pipeline's own work.
    config = EmulatorConfig(access_key=EMULATOR_AK, secret_key=EMULATOR_SK, time_scale=0.003, concurrency=50,
                            unique_external_ids=False)
    with start_emulator(config) as handle:
        yield handle


@pytest.fixture(scope="module")
def moto_s3() -> Iterator[str]:
    from moto.server import ThreadedMotoServer

    quiet_werkzeug()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture(scope="module")
def base_env(emulator: Any, moto_s3: str, prefect_server: Any, tmp_path_factory: pytest.TempPathFactory,
             ) -> Iterator[dict[str, str]]:
    aws = {"AWS_ENDPOINT_URL": moto_s3, "AWS_ACCESS_KEY_ID": "testing-access-key",
           "AWS_SECRET_ACCESS_KEY": "testing-secret-key", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_EC2_METADATA_DISABLED": "true"}
    no_aws = tmp_path_factory.mktemp("no-aws")
    env = {name: value for name, value in os.environ.items() if not name.startswith("AWS_")}
    env.update(aws)
    env.update({
        "AWS_CONFIG_FILE": str(no_aws / "config"), "AWS_SHARED_CREDENTIALS_FILE": str(no_aws / "credentials"),
        "KLING_PROVIDER": "kling", "KLING_API_BASE_URL": emulator.base_url, "KLING_ACCESS_KEY": EMULATOR_AK,
        "KLING_SECRET_KEY": EMULATOR_SK, "KLING_ALLOW_PRIVATE_URLS": "1", "KLING_POLL_MIN_SECONDS": "0.05",
        "KLING_POLL_MAX_SECONDS": "0.3", "KLING_MAX_CONCURRENCY": str(SLOTS),
        "PREFECT_API_URL": prefect_server.api_url, "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "COLUMNS": "200",
    })
    saved = {name: os.environ.get(name) for name in aws}
    os.environ.update(aws)  # this process reads the bucket with boto3
    boto3.client("s3").create_bucket(Bucket=BUCKET)
    try:
        yield env
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


class Child:
    """The CLI in its own process group; the kill reaches every process it started."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        with log.open("ab") as sink:
            self.process = subprocess.Popen([CLI, *args], env=env, stdout=subprocess.PIPE, stderr=sink,
                                            start_new_session=True)
        self.started = time.monotonic()

    def kill_group_at(self, moment: float) -> bool:
        """SIGKILL the group `moment` s after the start; False if the run had already ended by then."""
        while time.monotonic() - self.started < moment:
            if self.process.poll() is not None:
                return False
            time.sleep(0.005)
        ended = self.process.poll() is not None
        with contextlib.suppress(ProcessLookupError):  # the group is gone already
            os.killpg(self.process.pid, signal.SIGKILL)
        self.process.communicate(timeout=30)
        return not ended

    def finish(self, timeout: float = 300) -> tuple[int, list[str], float]:
        out, _ = self.process.communicate(timeout=timeout)
        return self.process.returncode, out.decode().strip().splitlines(), time.monotonic() - self.started


def case_env(base_env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    home = tmp_path / "prefect-home"  # one machine's Prefect home, shared by the killed run and its reruns
    home.mkdir(exist_ok=True)
    return {**base_env, "PREFECT_HOME": str(home)}


def dest_for(sink: str, tmp_path: Path, what: str) -> str:
    return f"s3://{BUCKET}/{what}" if sink == "s3" else str(tmp_path / "out")


def rerun_until_done(args: list[str], env: dict[str, str], tmp_path: Path, where: str) -> tuple[list[str], int]:
    """The same command again until it exits 0: (its stdout lines, how many reruns it took)."""
    for attempt in range(1, MAX_RERUNS + 1):
        log = tmp_path / f"rerun-{attempt}.log"
        code, lines, _ = Child(args, env, log).finish()
        if code == 0:
            return lines, attempt
        last = log.read_text().strip().splitlines()[-1:] or ["(no output)"]
        print(f"{where}: rerun {attempt} exited {code}: {last[0]}")
    raise AssertionError(f"{where}: not done after {MAX_RERUNS} reruns: {log.read_text()[-3000:]}")


# ---- the 1 + 3 job --------------------------------------------------------------------------------------------


def job_args(job_id: str, dest: str) -> list[str]:
    args = ["run", "--prompt", PROMPT, "--dest", dest, "--job-id", job_id]
    for text in EXTENSIONS:
        args += ["--extend", text]
    return args


def planned_ids(job_id: str, dest: str, prompt: str = PROMPT, extensions: tuple[str, ...] = EXTENSIONS) -> list[str]:
    job = VideoJob(generate=GenerationSpec(prompt=prompt), extensions=[ExtensionSpec(prompt=t) for t in extensions],
                   dest=dest, job_id=job_id)
    return [step.external_task_id for step in plan_job(job).steps]


@pytest.fixture(scope="module")
def job_duration(base_env: dict[str, str], emulator: Any, tmp_path_factory: pytest.TempPathFactory) -> float:
    """A clean 1 + 3 run, start to exit: the span the kill moments are drawn over (and a first whole run)."""
    tmp_path = tmp_path_factory.mktemp("clean-job")
    job_id, dest = new_job_id("km-clean"), f"s3://{BUCKET}/kills"
    code, lines, seconds = Child(job_args(job_id, dest), case_env(base_env, tmp_path), tmp_path / "log").finish()
    assert code == 0, (tmp_path / "log").read_text()[-3000:]
    assert lines[-1] == uri_of(dest, f"{job_id}/final.mp4")
    assert_finished_whole(emulator, dest, job_id, planned_ids(job_id, dest))
    record("kill-clean", what="job", seconds=round(seconds, 2))
    return seconds


@pytest.mark.parametrize("kill", kills("job", JOB_KILLS), ids=lambda kill: kill.id)
def test_killed_job_reruns_to_one_whole_video(kill: Kill, job_duration: float, base_env: dict[str, str],
                                              emulator: Any, tmp_path: Path) -> None:
    moment = kill.u * job_duration
    where = f"job kill {kill.id} (seed {SEED}, u {kill.u:.4f}, moment {moment:.2f} s of {job_duration:.2f} s)"
    job_id = new_job_id(f"km-{kill.index:02d}")
    dest = dest_for(kill.sink, tmp_path, "kills")
    ids = planned_ids(job_id, dest)
    env = case_env(base_env, tmp_path)
    served = Served(emulator)

    killed = Child(job_args(job_id, dest), env, tmp_path / "killed.log").kill_group_at(moment)
    assert_consistent(emulator, dest, job_id, served, partial_ok=True)
    lines, reruns = rerun_until_done(job_args(job_id, dest), env, tmp_path, where)
    assert lines[-1] == uri_of(dest, f"{job_id}/final.mp4"), where
    stats = emulator.stats()
    assert duplicates(stats, job_id) == {}, f"{where}: paid twice"
    assert_finished_whole(emulator, dest, job_id, ids, served)
    record("kill-job", case=kill.id, u=round(kill.u, 4), moment=round(moment, 2), span=round(job_duration, 2),
           killed=killed, reruns=reruns, sink=kill.sink, duplicates=0,
           posts={ext: stats["create_attempts"].get(ext, 0) for ext in ids})


# ---- the batch ------------------------------------------------------------------------------------------------


def batch_file(tmp_path: Path, tag: str, dest: str) -> tuple[Path, list[str]]:
    job_ids = [f"{tag}-{i}" for i in range(1, BATCH_JOBS + 1)]
    spec = {"defaults": {"extend": list(BATCH_EXTENSIONS)},
            "jobs": [{"prompt": f"a sandcastle number {i}", "job_id": job_id} for i, job_id in enumerate(job_ids)]}
    path = tmp_path / "jobs.yaml"
    path.write_text(yaml.safe_dump(spec))
    return path, job_ids


def batch_args(path: Path, dest: str, batch_id: str) -> list[str]:
    return ["batch", str(path), "--dest", dest, "--batch-id", batch_id]


def assert_batch_whole(emulator: Any, dest: str, batch_id: str, job_ids: list[str], served: Served) -> None:
    for i, job_id in enumerate(job_ids):
        ids = planned_ids(job_id, dest, f"a sandcastle number {i}", BATCH_EXTENSIONS)
        assert_finished_whole(emulator, dest, job_id, ids, served)
    raw = read(dest, f"{batch_id}.json")
    assert raw is not None, "the batch manifest is stored"
    batch = json.loads(raw)
    assert batch["status"] == "succeeded"
    assert [(e["job_id"], e["final_uri"]) for e in batch["jobs"]] == \
        [(job_id, uri_of(dest, f"{job_id}/final.mp4")) for job_id in job_ids], "the batch manifest says what is stored"


@pytest.fixture(scope="module")
def batch_duration(base_env: dict[str, str], emulator: Any, tmp_path_factory: pytest.TempPathFactory) -> float:
    tmp_path = tmp_path_factory.mktemp("clean-batch")
    tag, dest = new_job_id("kb-clean"), str(tmp_path / "out")
    path, job_ids = batch_file(tmp_path, tag, dest)
    code, lines, seconds = Child(batch_args(path, dest, tag), case_env(base_env, tmp_path),
                                 tmp_path / "log").finish()
    assert code == 0, (tmp_path / "log").read_text()[-3000:]
    assert len(lines) == BATCH_JOBS
    assert_batch_whole(emulator, dest, tag, job_ids, Served(emulator))
    record("kill-clean", what="batch", seconds=round(seconds, 2))
    return seconds


@pytest.mark.parametrize("kill", kills("batch", BATCH_KILLS), ids=lambda kill: kill.id)
def test_killed_batch_reruns_to_whole_videos(kill: Kill, batch_duration: float, base_env: dict[str, str],
                                             emulator: Any, tmp_path: Path) -> None:
    moment = kill.u * batch_duration
    where = f"batch kill {kill.id} (seed {SEED}, u {kill.u:.4f}, moment {moment:.2f} s of {batch_duration:.2f} s)"
    tag = new_job_id(f"kb-{kill.index:02d}")
    dest = dest_for(kill.sink, tmp_path, "batch-kills")
    path, job_ids = batch_file(tmp_path, tag, dest)
    env = case_env(base_env, tmp_path)
    served = Served(emulator)

    killed = Child(batch_args(path, dest, tag), env, tmp_path / "killed.log").kill_group_at(moment)
    for job_id in job_ids:
        assert_consistent(emulator, dest, job_id, served, partial_ok=True)
    lines, reruns = rerun_until_done(batch_args(path, dest, tag), env, tmp_path, where)
    assert lines == [f"{job_id}\t{uri_of(dest, f'{job_id}/final.mp4')}" for job_id in job_ids], where
    stats = emulator.stats()
    assert duplicates(stats, tag) == {}, f"{where}: paid twice"
    assert_batch_whole(emulator, dest, tag, job_ids, served)
    record("kill-batch", case=kill.id, u=round(kill.u, 4), moment=round(moment, 2), span=round(batch_duration, 2),
           killed=killed, reruns=reruns, sink=kill.sink, duplicates=0)
