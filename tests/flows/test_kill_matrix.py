"""The kill matrix: SIGKILL of the whole process group at seeded random moments, then reruns until done.

`kling-pipeline run` (a 1 + 3 job) and `kling-pipeline batch` (3 jobs of 1 + 2) run as children in their own
process group (setsid) against one emulator, one moto S3 server and the session's Prefect server. Clean runs
are measured first, from the flow run's start (its first log line: the start-up before it is about half of
the process's life on a loaded machine, and pays for or stores nothing) to the exit. Each case draws its
moment u in [0, 1) from its own seeded stream and kills the group u x (the shortest such span seen so far)
after its own flow run began. A kill counts only if it lands on a live run (the child dies of the SIGKILL):
when the run had already exited, that run is checked as a clean one, its length narrows the span, and the
case draws its next u (at most MAX_DRAWS). After a landed kill: what the killed run left (every visible
object whole and its task's, a manifest consistent with it) and where it was (the ledger's front step and
its stage), then the same command again until it exits 0 (at most MAX_RERUNS). Then:
one task per external id (the emulator accepts duplicate ids here, so a resent create would be a second
task), every step and final.mp4 the emulator's file byte for byte, manifests consistent with the stored
objects, no open multipart upload and no temp left. Destinations alternate S3 / local folder.

`KLING_MATRIX=full`: 30 landed kills of the job and 10 of the batch, spans from two clean runs each; the
default run has one clean run and one landed kill of the job (seeded).
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
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import boto3
import pytest
import yaml

from tests.flows.conftest import EMULATOR_AK, EMULATOR_SK
from tests.flows.matrix_support import (
    BUCKET,
    FULL,
    SEED,
    Served,
    assert_consistent,
    assert_finished_whole,
    aws_env,
    duplicates,
    manifest_of,
    moto_server,
    new_job_id,
    planned_ids,
    read,
    record,
    uri_of,
)

pytestmark = pytest.mark.usefixtures("prefect_server")

CLI = str(Path(sys.executable).with_name("kling-pipeline"))
JOB_KILLS = 30 if FULL else 1
# The default run kills no batch here: tests/flows/test_batch.py kills one in every run already, and the budget
# of the default run is ~90 s for both matrices.
BATCH_KILLS = 10 if FULL else 0
CLEAN_RUNS = 2 if FULL else 1  # the span is the shortest whole run: a slow first run makes late moments miss
MAX_DRAWS = 5  # a case whose run ends before its moment draws again; this many misses in a row fail it
MAX_RERUNS = 3
SLOTS = 100  # a killed run keeps its slot's lease for up to 300 s (kling_tasks/slot_leases.py): room for every dead run


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
def base_env(emulator: Any, prefect_server: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, str]]:
    with moto_server() as endpoint:
        aws = aws_env(endpoint, tmp_path_factory.mktemp("no-aws"))
        env = {name: value for name, value in os.environ.items() if not name.startswith("AWS_")}
        env.update(aws)
        env.update({
            "KLING_PROVIDER": "kling", "KLING_API_BASE_URL": emulator.base_url, "KLING_ACCESS_KEY": EMULATOR_AK,
            "KLING_SECRET_KEY": EMULATOR_SK, "KLING_ALLOW_PRIVATE_URLS": "1", "KLING_POLL_MIN_SECONDS": "0.05",
            "KLING_POLL_MAX_SECONDS": "0.3", "KLING_MAX_CONCURRENCY": str(SLOTS),
            "PREFECT_API_URL": prefect_server.api_url, "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "COLUMNS": "200",
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


# The flow run's first log line: where the job's own span starts (the start-up before it, imports and the CLI's
# checks of the plan and the destination, pays for or stores nothing; under load it is half the process's life).
FLOW_BEGINS = b"Beginning flow run"


@dataclass(frozen=True)
class Ended:
    """How a child's run ended: killed by our SIGKILL, or exited by itself `seconds` after its flow run began
    (with its output)."""

    killed: bool
    code: int
    seconds: float
    lines: list[str]


class Child:
    """The CLI in its own process group; the kill reaches every process it started."""

    def __init__(self, args: list[str], env: dict[str, str], log: Path) -> None:
        self.log = log
        with log.open("ab") as sink:
            self.process = subprocess.Popen([CLI, *args], env=env, stdout=subprocess.PIPE, stderr=sink,
                                            start_new_session=True)
        self.started = time.monotonic()
        self.flow_began: float | None = None

    def wait_for_flow(self, timeout: float = 300) -> bool:
        """Until the flow run begins (its line in the child's log): False if the process exited first."""
        seen, deadline = b"", time.monotonic() + timeout
        with self.log.open("rb") as log:
            while time.monotonic() < deadline:
                seen = seen[-len(FLOW_BEGINS):] + log.read()
                if FLOW_BEGINS in seen:
                    self.flow_began = time.monotonic()
                    return True
                if self.process.poll() is not None:
                    return False
                time.sleep(0.005)
        raise AssertionError(f"no flow run began in {timeout} s: {self.log.read_text()[-3000:]}")

    def kill_group_at(self, moment: float) -> Ended:
        """SIGKILL the group `moment` s after its flow run began, unless the run has exited by then. The kill
        landed only if the child died of it (a run exiting in the same instant counts as exited)."""
        if self.wait_for_flow():
            assert self.flow_began is not None
            while time.monotonic() - self.flow_began < moment:
                if self.process.poll() is not None:
                    break
                time.sleep(0.005)
        exited = time.monotonic() - (self.flow_began or self.started)
        if self.process.poll() is None:
            with contextlib.suppress(ProcessLookupError):  # the group is gone already
                os.killpg(self.process.pid, signal.SIGKILL)
        out, _ = self.process.communicate(timeout=30)
        code = self.process.returncode
        return Ended(code == -signal.SIGKILL, code, exited, out.decode().strip().splitlines())

    def finish(self, timeout: float = 300) -> Ended:
        """Until the run exits; its seconds from the flow run's start if that was watched, else from the start."""
        out, _ = self.process.communicate(timeout=timeout)
        code = self.process.returncode
        seconds = time.monotonic() - (self.flow_began or self.started)
        return Ended(False, code, seconds, out.decode().strip().splitlines())


def case_env(base_env: dict[str, str], tmp_path: Path) -> dict[str, str]:
    home = tmp_path / "prefect-home"  # one machine's Prefect home, shared by the killed run and its reruns
    home.mkdir(parents=True, exist_ok=True)
    return {**base_env, "PREFECT_HOME": str(home)}


def rerun_until_done(args: list[str], env: dict[str, str], tmp_path: Path, where: str) -> tuple[list[str], int]:
    """The same command again until it exits 0: (its stdout lines, how many reruns it took)."""
    for attempt in range(1, MAX_RERUNS + 1):
        log = tmp_path / f"rerun-{attempt}.log"
        ended = Child(args, env, log).finish()
        if ended.code == 0:
            return ended.lines, attempt
        last = log.read_text().strip().splitlines()[-1:] or ["(no output)"]
        print(f"{where}: rerun {attempt} exited {ended.code}: {last[0]}")
    raise AssertionError(f"{where}: not done after {MAX_RERUNS} reruns: {log.read_text()[-3000:]}")


# ---- what is killed: the 1 + 3 job, the batch -----------------------------------------------------------------


class Target:
    """One command of the matrix: its arguments for a tag (the job id, or the batch id), the jobs it makes,
    and the checks of a finished run."""

    what = ""
    folder = ""  # the S3 prefix of its cases

    def job_ids(self, tag: str) -> list[str]:
        raise NotImplementedError

    def args(self, tag: str, dest: str, tmp_path: Path) -> list[str]:
        raise NotImplementedError

    def assert_done(self, emulator: Any, dest: str, tag: str, lines: list[str], served: Served) -> None:
        raise NotImplementedError


class Job(Target):
    what, folder = "job", "kills"
    prompt = "a kite over the dunes"
    extensions = ("the kite climbs", "the string snaps", "the kite drifts out to sea")

    def job_ids(self, tag: str) -> list[str]:
        return [tag]

    def args(self, tag: str, dest: str, tmp_path: Path) -> list[str]:
        args = ["run", "--prompt", self.prompt, "--dest", dest, "--job-id", tag]
        for text in self.extensions:
            args += ["--extend", text]
        return args

    def assert_done(self, emulator: Any, dest: str, tag: str, lines: list[str], served: Served) -> None:
        assert lines[-1:] == [uri_of(dest, f"{tag}/final.mp4")], lines
        assert_finished_whole(emulator, dest, tag, planned_ids(dest, tag, self.prompt, self.extensions), served)


class Batch(Target):
    what, folder = "batch", "batch-kills"
    jobs = 3
    extensions = ("the tide comes in", "the sun sets")

    def job_ids(self, tag: str) -> list[str]:
        return [f"{tag}-{i}" for i in range(1, self.jobs + 1)]

    def args(self, tag: str, dest: str, tmp_path: Path) -> list[str]:
        spec = {"defaults": {"extend": list(self.extensions)},
                "jobs": [{"prompt": f"a sandcastle number {i}", "job_id": job_id}
                         for i, job_id in enumerate(self.job_ids(tag))]}
        path = tmp_path / "jobs.yaml"
        path.write_text(yaml.safe_dump(spec))
        return ["batch", str(path), "--dest", dest, "--batch-id", tag]

    def assert_done(self, emulator: Any, dest: str, tag: str, lines: list[str], served: Served) -> None:
        job_ids = self.job_ids(tag)
        assert lines == [f"{job_id}\t{uri_of(dest, f'{job_id}/final.mp4')}" for job_id in job_ids], lines
        for i, job_id in enumerate(job_ids):
            ids = planned_ids(dest, job_id, f"a sandcastle number {i}", self.extensions)
            assert_finished_whole(emulator, dest, job_id, ids, served)
        raw = read(dest, f"{tag}.json")
        assert raw is not None, "the batch manifest is stored"
        batch = json.loads(raw)
        assert batch["status"] == "succeeded"
        assert [(e["job_id"], e["final_uri"]) for e in batch["jobs"]] == \
            [(job_id, uri_of(dest, f"{job_id}/final.mp4")) for job_id in job_ids], \
            "the batch manifest says what is stored"


JOB, BATCH = Job(), Batch()


def dest_for(sink: str, tmp_path: Path, target: Target) -> str:
    return f"s3://{BUCKET}/{target.folder}" if sink == "s3" else str(tmp_path / "out")


@dataclass
class Span:
    """The span the moments are drawn over: the shortest whole run of the command seen so far (the clean
    runs, then every run a moment came too late for), from its flow run's start to the process's exit."""

    runs: list[float] = field(default_factory=list)

    @property
    def seconds(self) -> float:
        return min(self.runs)


def clean_spans(target: Target, base_env: dict[str, str], emulator: Any, tmp_path: Path) -> Span:
    span = Span()
    for run in range(1, CLEAN_RUNS + 1):
        folder = tmp_path / f"clean-{run}"
        folder.mkdir()
        tag, dest = new_job_id(f"k{target.what[0]}-clean"), dest_for("s3" if run % 2 else "local", folder, target)
        child = Child(target.args(tag, dest, folder), case_env(base_env, folder), folder / "log")
        assert child.wait_for_flow(), (folder / "log").read_text()[-3000:]
        ended = child.finish()
        assert ended.code == 0, (folder / "log").read_text()[-3000:]
        target.assert_done(emulator, dest, tag, ended.lines, Served(emulator))
        assert child.flow_began is not None
        record("kill-clean", what=target.what, seconds=round(ended.seconds, 2),
               start_up=round(child.flow_began - child.started, 2))
        span.runs.append(ended.seconds)
    return span


@pytest.fixture(scope="module")
def job_span(base_env: dict[str, str], emulator: Any, tmp_path_factory: pytest.TempPathFactory) -> Span:
    return clean_spans(JOB, base_env, emulator, tmp_path_factory.mktemp("clean-job"))


@pytest.fixture(scope="module")
def batch_span(base_env: dict[str, str], emulator: Any, tmp_path_factory: pytest.TempPathFactory) -> Span:
    return clean_spans(BATCH, base_env, emulator, tmp_path_factory.mktemp("clean-batch"))


# ---- where a kill landed --------------------------------------------------------------------------------------

STAGE_OF = {"pending": "before its create", "submitting": "submit", "submitted": "wait", "processing": "wait",
            "succeed": "store", "failed": "failed", "stored": "stored"}


def stage_of_job(dest: str, job_id: str) -> tuple[str, str]:
    """Where the killed job was, as its ledger tells: (the front step and its stage, every step's status).
    The front is the furthest step past `pending` (a step's store runs beside the next step's create)."""
    manifest = manifest_of(dest, job_id)
    if manifest is None:
        return "start-up (no ledger yet)", "-"
    steps = manifest["steps"]
    statuses = ",".join(step["status"] for step in steps)
    begun = [step for step in steps if step["status"] != "pending"]
    if not begun:
        return "start-up (ledger, no create)", statuses
    front = begun[-1]
    if front is steps[-1] and front["status"] == "stored":
        final = "final stored" if read(dest, f"{job_id}/final.mp4") is not None else "final not yet copied"
        return f"after the last store ({final})", statuses
    return f"{front['name']} {STAGE_OF[front['status']]}", statuses


def stage_at_kill(target: Target, dest: str, tag: str) -> tuple[str, str]:
    stages = [stage_of_job(dest, job_id) for job_id in target.job_ids(tag)]
    if len(stages) == 1:
        return stages[0]
    statuses = [status for _, status in stages]
    stored = sum(status.split(",").count("stored") for status in statuses if status != "-")
    total = len(stages) * (1 + len(BATCH.extensions))
    return f"{stored} of {total} steps stored", " | ".join(statuses)


# ---- one case: draw until a kill lands, check, rerun until done, check --------------------------------------


@dataclass(frozen=True)
class Kill:
    target: Target
    index: int
    sink: str

    def draws(self) -> Iterator[float]:
        """This case's moments (fractions of the span), from its own seeded stream: stable across runs."""
        rng = random.Random(f"{SEED}:kill:{self.target.what}:{self.index}")
        while True:
            yield rng.random()

    @property
    def id(self) -> str:
        return f"{self.index:02d}-{self.sink}-at{next(self.draws()):.3f}"


def kills(target: Target, count: int) -> list[Kill]:
    return [Kill(target, i, "s3" if i % 2 == 0 else "local") for i in range(count)]


def kill_and_rerun(kill: Kill, span: Span, base_env: dict[str, str], emulator: Any, tmp_path: Path) -> None:
    target, missed = kill.target, list[dict[str, float]]()
    for draw, u in enumerate(kill.draws(), start=1):
        if draw > MAX_DRAWS:
            raise AssertionError(f"{target.what} kill {kill.id} (seed {SEED}): no kill landed in {MAX_DRAWS} draws: "
                                 f"{missed}")
        folder = tmp_path / f"draw-{draw}"
        folder.mkdir()
        moment, of = u * span.seconds, span.seconds
        where = (f"{target.what} kill {kill.id} (seed {SEED}, draw {draw}, u {u:.4f}, moment {moment:.2f} s of "
                 f"{of:.2f} s)")
        tag = new_job_id(f"k{target.what[0]}-{kill.index:02d}")
        dest = dest_for(kill.sink, folder, target)
        args, env, served = target.args(tag, dest, folder), case_env(base_env, folder), Served(emulator)
        ended = Child(args, env, folder / "killed.log").kill_group_at(moment)
        if ended.killed:
            break
        # Too late: the run exited before its moment. It is a whole run like a clean one (checked as one), and
        # its length narrows the span of the next draw.
        assert ended.code == 0, f"{where}: {(folder / 'killed.log').read_text()[-3000:]}"
        target.assert_done(emulator, dest, tag, ended.lines, served)
        assert duplicates(emulator.stats(), tag) == {}, f"{where}: paid twice"
        missed.append({"u": round(u, 4), "moment": round(moment, 2), "span": round(of, 2),
                       "run": round(ended.seconds, 2)})
        span.runs.append(ended.seconds)

    stage, ledger = stage_at_kill(target, dest, tag)
    for job_id in target.job_ids(tag):
        assert_consistent(emulator, dest, job_id, served, partial_ok=True)
    lines, reruns = rerun_until_done(args, env, folder, f"{where}, killed at {stage}")
    stats = emulator.stats()
    assert duplicates(stats, tag) == {}, f"{where}: paid twice"
    target.assert_done(emulator, dest, tag, lines, served)
    record(f"kill-{target.what}", case=kill.id, draws=draw, missed=missed, u=round(u, 4), moment=round(moment, 2),
           span=round(of, 2), stage=stage, ledger=ledger, reruns=reruns, sink=kill.sink, duplicates=0,
           posts=sum(n for ext, n in stats["create_attempts"].items() if ext.startswith(tag)),
           tasks=sum(n for ext, n in stats["tasks_created"].items() if ext.startswith(tag)))


@pytest.mark.parametrize("kill", kills(JOB, JOB_KILLS), ids=lambda kill: kill.id)
def test_killed_job_reruns_to_one_whole_video(kill: Kill, job_span: Span, base_env: dict[str, str],
                                              emulator: Any, tmp_path: Path) -> None:
    kill_and_rerun(kill, job_span, base_env, emulator, tmp_path)


@pytest.mark.parametrize("kill", kills(BATCH, BATCH_KILLS), ids=lambda kill: kill.id)
def test_killed_batch_reruns_to_whole_videos(kill: Kill, batch_span: Span, base_env: dict[str, str],
                                             emulator: Any, tmp_path: Path) -> None:
    kill_and_rerun(kill, batch_span, base_env, emulator, tmp_path)
