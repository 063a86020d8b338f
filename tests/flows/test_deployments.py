"""Deployments on a real Prefect server on PostgreSQL, run by two process workers (issue 10).

The module shares one set-up, made the way README "Deploying" says: a private PostgreSQL cluster, `prefect server
start` on it, `kling-pipeline setup` (process pool `kling`, the account's global concurrency limit, the crash
automations), `prefect --no-prompt deploy --all --prefect-file deployments/prefect.yaml` (run from the repository,
KLING_PIPELINE_HOME unset so each worker resolves its own) and two `prefect worker start --pool kling --limit 3`
processes, each in its own process group with its own PREFECT_HOME (its own result storage: two machines that
share no cache). The Kling account has 3 slots; the emulator itself admits 6 tasks at once, so a breach of the
account's limit would show in its high-water mark instead of hiding behind a 1303 refusal. Videos go to moto's
S3 server, bucket `kling-videos` (the one the deployments' example parameters name).

Every assertion comes from the Prefect server (runs, states, labels), the emulator's counters and the stored
bytes (sha256 of each step against the file the emulator serves, decoded with PyAV).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import boto3
import httpx
import pytest

from .postgres import PostgresCluster, PostgresUnavailable, PrefectServerProcess, stop_group

REPO = Path(__file__).resolve().parents[2]
BIN = Path(sys.executable).parent
BUCKET = "kling-videos"
POOL = "kling"
SLOTS = 3  # KLING_MAX_CONCURRENCY: the account's global concurrency limit
EMULATOR_SLOTS = 6  # what the emulated account would admit: room to see a breach of the limit
WORKER_LIMIT = 3  # flow runs per worker: 6 jobs cannot all land on one
HEARTBEAT = 30  # PREFECT_FLOWS_HEARTBEAT_FREQUENCY (Prefect's minimum)
SILENT_AFTER = 45  # kling-pipeline setup --silent-after: a run without a heartbeat for 45 s is Crashed
SETTLE = 15  # kling-pipeline setup --reschedule-after: a crashed video is rescheduled 15 s after its crash
AK, SK = "deploy-ak-0123456789", "deploy-sk-abcdefghijklmnop-0123456789"
WORKERS = ("worker-a", "worker-b")
VIDEO, BATCH = "produce-video/produce-video", "produce-batch/produce-batch"

T = TypeVar("T")


def wait_until(what: str, check: Callable[[], T | None], timeout: float, every: float = 0.5,
               explain: Callable[[], str] = lambda: "") -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {timeout:g} s. {explain()}")
        time.sleep(every)


@dataclass(frozen=True)
class Proc:
    """A process we started (directly or through a worker): its pid and its start time, so that a pid the
    system has given to another process since is never signalled."""

    pid: int
    started: str

    @staticmethod
    def stat(pid: int) -> list[str] | None:
        try:
            text = Path(f"/proc/{pid}/stat").read_text()
        except OSError:
            return None
        return text.rsplit(")", 1)[1].split()  # fields from 3 on: state, ppid, ... (the name may hold spaces)

    def same(self) -> bool:
        fields = self.stat(self.pid)
        return fields is not None and fields[19] == self.started


def descendants(pid: int) -> list[Proc]:
    """Every live process below `pid` (from /proc)."""
    children: dict[int, list[Proc]] = {}
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit() and (fields := Proc.stat(int(entry.name))) is not None:
            children.setdefault(int(fields[1]), []).append(Proc(int(entry.name), fields[19]))
    found, todo = [], [pid]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child.pid)
    return found


def kill_groups(procs: list[Proc], sig: signal.Signals = signal.SIGKILL) -> None:
    """Signal the process group of each of these processes that is still the one we started."""
    groups = set()
    for proc in procs:
        if proc.same():
            with contextlib.suppress(ProcessLookupError):
                groups.add(os.getpgid(proc.pid))
    for group in groups:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(group, sig)


@dataclass
class Cluster:
    root: Path
    api_url: str
    env: dict[str, str]  # what a worker or the CLI gets (without PREFECT_HOME)
    emulator: Any
    server: PrefectServerProcess
    workers: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)
    started: dict[str, datetime] = field(default_factory=dict)

    def cli(self, *args: str, home: str = "cli-home", timeout: float = 180,
            env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
        (self.root / home).mkdir(exist_ok=True)
        return subprocess.run(list(args), env={**(env or self.env), "PREFECT_HOME": str(self.root / home)},
                              cwd=REPO, capture_output=True, text=True, timeout=timeout, check=False)

    def start_worker(self, name: str) -> None:
        home = self.root / name
        home.mkdir(exist_ok=True)
        self.started[name] = datetime.now(UTC)
        with (self.root / f"{name}.log").open("ab") as log:
            # cwd is the worker's own folder: the deployment's pull step must take it to the checkout.
            self.workers[name] = subprocess.Popen(
                [str(BIN / "prefect"), "worker", "start", "--pool", POOL, "--name", name, "--limit",
                 str(WORKER_LIMIT)], env={**self.env, "PREFECT_HOME": str(home)}, cwd=home, stdout=log,
                stderr=subprocess.STDOUT, start_new_session=True)

    def wait_workers_online(self, names: tuple[str, ...] = WORKERS, timeout: float = 60) -> None:
        """Each worker named has sent a heartbeat since it was (re)started."""
        from prefect import get_client

        def online() -> bool:
            with get_client(sync_client=True) as client:
                beats = {w.name: w.last_heartbeat_time for w in client.read_workers_for_work_pool(POOL)}
            return all(beats.get(name) and beats[name] >= self.started[name] for name in names)

        wait_until("both workers online", online, timeout, explain=lambda: self.log_tail(*names))

    def kill_worker(self, name: str) -> list[Proc]:
        """SIGKILL to the worker's process group; returns the pids of the flow runs it had started, which live
        in sessions of their own (Prefect 3.9) and end by themselves once their worker is gone."""
        worker = self.workers.pop(name)
        runs = descendants(worker.pid)
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait(timeout=10)
        return runs

    def kill_machine(self, name: str) -> list[Proc]:
        """The worker's machine dies: SIGKILL to the worker's process group and to every process it started
        (Prefect 3.9 starts each flow run in a session of its own, so the group alone would leave them)."""
        worker = self.workers.pop(name)
        with contextlib.suppress(ProcessLookupError):
            os.killpg(worker.pid, signal.SIGSTOP)  # nothing new is spawned while we look
        doomed = descendants(worker.pid)
        kill_groups(doomed)  # the runs first: with their worker gone first they might still report a crash
        os.killpg(worker.pid, signal.SIGKILL)
        worker.wait(timeout=10)
        return doomed

    def stop_worker(self, name: str) -> None:
        worker = self.workers.pop(name)
        left = descendants(worker.pid)
        stop_group(worker)
        kill_groups(left)

    def log_tail(self, *names: str) -> str:
        return "\n".join(f"--- {name}:\n{(self.root / f'{name}.log').read_text(errors='replace')[-3000:]}"
                         for name in names if (self.root / f"{name}.log").exists())


def plain_env() -> dict[str, str]:
    return {k: v for k, v in os.environ.items() if not k.startswith(("PREFECT_", "KLING_", "AWS_"))}


@pytest.fixture(scope="module")
def cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    from moto.server import ThreadedMotoServer
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_FLOWS_HEARTBEAT_FREQUENCY,
        PREFECT_RESULTS_LOCAL_STORAGE_PATH,
        temporary_settings,
    )

    from kling_emulator import EmulatorConfig, start_emulator
    from kling_tasks.api.lookup import TaskFinder

    try:
        pg = PostgresCluster.start()
    except PostgresUnavailable as exc:
        pytest.skip(f"the deployment tests need PostgreSQL: {exc}")
    root = tmp_path_factory.mktemp("deployments")
    with contextlib.ExitStack() as stack:
        stack.callback(shutil.rmtree, root, True)  # last: the homes, logs and results of every process
        stack.callback(pg.stop)
        pg.create_database("prefect")
        server = PrefectServerProcess.start({
            **plain_env(), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
            "PREFECT_SERVER_DATABASE_CONNECTION_URL": pg.url("prefect"),
            "PREFECT_SERVER_SERVICES_SCHEDULER_LOOP_SECONDS": "5"}, root)
        stack.callback(server.stop)
        moto = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
        moto.start()
        stack.callback(moto.stop)
        host, port = moto.get_host_and_port()
        TaskFinder.forget_all()
        emulator = stack.enter_context(start_emulator(EmulatorConfig(
            access_key=AK, secret_key=SK, time_scale=0.01, concurrency=EMULATOR_SLOTS)))
        stack.callback(TaskFinder.forget_all)
        aws = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "testing-access-key",
               "AWS_SECRET_ACCESS_KEY": "testing-secret-key", "AWS_DEFAULT_REGION": "us-east-1",
               "AWS_EC2_METADATA_DISABLED": "true", "AWS_CONFIG_FILE": str(root / "no-aws" / "config"),
               "AWS_SHARED_CREDENTIALS_FILE": str(root / "no-aws" / "credentials")}
        kling = {"KLING_PROVIDER": "kling", "KLING_API_BASE_URL": emulator.base_url, "KLING_ACCESS_KEY": AK,
                 "KLING_SECRET_KEY": SK, "KLING_ALLOW_PRIVATE_URLS": "1", "KLING_MAX_CONCURRENCY": str(SLOTS),
                 "KLING_POLL_MIN_SECONDS": "0.2", "KLING_POLL_MAX_SECONDS": "1"}
        env = {**plain_env(), **aws, **kling, "PREFECT_API_URL": server.api_url,
               "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "PREFECT_WORKER_QUERY_SECONDS": "1",
               "PREFECT_FLOWS_HEARTBEAT_FREQUENCY": str(HEARTBEAT), "PREFECT_RUNNER_POLL_FREQUENCY": "1",
               "KLING_PIPELINE_HOME": str(REPO), "COLUMNS": "200"}
        # This process (the tests, an in-process batch) talks to the same server, S3 and account.
        patch = stack.enter_context(pytest.MonkeyPatch.context())
        for name in [n for n in os.environ if n.startswith("AWS_")]:
            patch.delenv(name)
        for name, value in {**aws, **kling}.items():
            patch.setenv(name, value)
        stack.enter_context(temporary_settings(updates={
            PREFECT_API_URL: server.api_url, PREFECT_RESULTS_LOCAL_STORAGE_PATH: root / "test-results",
            PREFECT_FLOWS_HEARTBEAT_FREQUENCY: HEARTBEAT}))
        boto3.client("s3").create_bucket(Bucket=BUCKET)
        cluster = Cluster(root=root, api_url=server.api_url, env=env, emulator=emulator, server=server)

        done = cluster.cli(str(BIN / "kling-pipeline"), "setup", "--pool", POOL, "--silent-after", str(SILENT_AFTER),
                           "--reschedule-after", str(SETTLE))
        assert done.returncode == 0, done.stderr[-3000:]
        # Deployed without KLING_PIPELINE_HOME: the pull step keeps "{{ $KLING_PIPELINE_HOME }}" and every
        # worker resolves it to its own checkout at run time.
        deploy_env = {k: v for k, v in env.items() if k != "KLING_PIPELINE_HOME"}
        done = cluster.cli(str(BIN / "prefect"), "--no-prompt", "deploy", "--all", "--prefect-file",
                           "deployments/prefect.yaml", env=deploy_env)
        assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
        for name in WORKERS:
            cluster.start_worker(name)
        stack.callback(lambda: [cluster.stop_worker(name) for name in list(cluster.workers)])
        cluster.wait_workers_online()
        yield cluster
        from prefect.logging.handlers import APILogWorker

        APILogWorker.drain_all(timeout=10)


@pytest.fixture
def fresh_emulator(cluster: Cluster) -> Any:
    """Counters from zero (the high-water mark is the emulator's, not a job's) and default behaviour."""
    cluster.emulator.reset()
    return cluster.emulator


# ---------------------------------------------------------------------------------------------------- helpers

def s3() -> Any:
    return boto3.client("s3")


def s3_bytes(key: str) -> bytes:
    return s3().get_object(Bucket=BUCKET, Key=key)["Body"].read()  # type: ignore[no-any-return]


def served_sha256(emulator: Any, task_id: str) -> str:
    video_id = emulator.stats()["tasks"][task_id]["video_id"]
    return hashlib.sha256(httpx.get(f"{emulator.base_url}/_files/{video_id}.mp4", timeout=30).content).hexdigest()


def check_whole(emulator: Any, prefix: str, job_ids: list[str], tmp_path: Path, decode_seconds: Any) -> None:
    """Every step of every job stored, each the very file its Kling task served; the final video decodes."""
    for job_id in job_ids:
        manifest = json.loads(s3_bytes(f"{prefix}/{job_id}/manifest.json"))
        assert manifest["status"] == "succeeded", (job_id, manifest["status"])
        for step in manifest["steps"]:
            stored = s3_bytes(f"{prefix}/{job_id}/step-{step['index']:02d}.mp4")
            assert hashlib.sha256(stored).hexdigest() == step["sha256"] == served_sha256(emulator, step["task_id"])
        final = tmp_path / f"{job_id}.mp4"
        final.write_bytes(s3_bytes(f"{prefix}/{job_id}/final.mp4"))
        last = manifest["steps"][-1]
        assert hashlib.sha256(final.read_bytes()).hexdigest() == last["sha256"]
        assert abs(decode_seconds(final) - last["duration"]) < 0.1
    assert "Uploads" not in s3().list_multipart_uploads(Bucket=BUCKET)


def make_jobs(tag: str, count: int, dest: str) -> list[Any]:
    from kling_tasks.jobs import ExtensionSpec, GenerationSpec, VideoJob

    return [VideoJob(generate=GenerationSpec(prompt=f"a lighthouse number {i}"),
                     extensions=[ExtensionSpec(prompt="the camera pulls back"), ExtensionSpec(prompt="night falls")],
                     dest=dest, job_id=f"{tag}-{i}") for i in range(1, count + 1)]


def planned_ids(jobs: list[Any]) -> list[str]:
    from kling_tasks.jobs import plan_job

    return [step.external_task_id for job in jobs for step in plan_job(job).steps]


def counts(emulator: Any, tag: str) -> tuple[dict[str, int], dict[str, int]]:
    stats = emulator.stats()
    return ({k: v for k, v in stats["create_attempts"].items() if k.startswith(tag)},
            {k: v for k, v in stats["tasks_created"].items() if k.startswith(tag)})


def video_runs(names: list[str]) -> list[Any]:
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

    with get_client(sync_client=True) as client:
        deployment = client.read_deployment_by_name(VIDEO)
        runs = client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=names)))
    return [run for run in runs if run.deployment_id == deployment.id]


def states_of(run_id: Any) -> list[Any]:
    from prefect import get_client

    with get_client(sync_client=True) as client:
        return sorted(client.read_flow_run_states(run_id), key=lambda state: state.timestamp)


def assert_rescheduled_once(run: Any, crash_message: str | None = None) -> None:
    """Crashed once, rescheduled once by the automation, executed once more (one process), Completed once."""
    from kling_tasks.recovery import RESCHEDULED_MESSAGE

    history = [(state.type.value, state.message or "") for state in states_of(run.id)]
    kinds = [kind for kind, _ in history]
    crashed = kinds.index("CRASHED")
    assert kinds.count("CRASHED") == 1 and kinds.count("RUNNING") == 2 and kinds.count("COMPLETED") == 1, history
    assert history[crashed + 1] == ("SCHEDULED", RESCHEDULED_MESSAGE), history
    assert crash_message is None or history[crashed][1] == crash_message, history
    assert run.run_count == 2 and run.state_name == "Completed", run


def describe_runs(names: list[str]) -> str:
    return "; ".join(f"{run.name} run {run.run_count} on {run.labels.get('prefect.worker.name')}: "
                     + " > ".join(f"{state.name}" for state in states_of(run.id)) for run in video_runs(names))


def final_run(run_id: Any) -> Any:
    from prefect import get_client

    with get_client(sync_client=True) as client:
        run = client.read_flow_run(run_id)
    return run if run.state is not None and run.state.is_final() else None


# ------------------------------------------------------------------------------- a jobs file on S3 (no server)

def test_a_jobs_file_on_s3_reads_like_a_local_one(s3_endpoint: str, tmp_path: Path) -> None:
    from datetime import date

    from flows.batch import resolve_jobs
    from kling_tasks.jobs import PlanError

    s3().create_bucket(Bucket="jobs-bucket")
    local = REPO / "deployments" / "jobs" / "nightly-teasers.yaml"
    s3().put_object(Bucket="jobs-bucket", Key="series/nightly.yaml", Body=local.read_bytes())
    s3().put_object(Bucket="jobs-bucket", Key="flat.csv",
                    Body=b"prompt,extend_1,job_id\na kite,it climbs,kite-{date}\n")
    day = date(2026, 11, 21)
    assert (resolve_jobs(None, "s3://jobs-bucket/series/nightly.yaml", "s3://out/x", day)
            == resolve_jobs(None, str(local), "s3://out/x", day))
    [kite] = resolve_jobs(None, "s3://jobs-bucket/flat.csv", None, day)
    assert kite.job_id == "kite-20261121" and [e.prompt for e in kite.extensions] == ["it climbs"]

    s3().put_object(Bucket="jobs-bucket", Key="bad.yaml", Body=b"jobs:\n  - {prompt: '', job_id: x}\n")
    with pytest.raises(PlanError) as bad:
        resolve_jobs(None, "s3://jobs-bucket/bad.yaml", None, day)
    assert str(bad.value).startswith("s3://jobs-bucket/bad.yaml") and "kling-jobs-" not in str(bad.value)
    with pytest.raises(PlanError, match=r"^s3://jobs-bucket/missing.yaml: cannot read the jobs file: no such object"):
        resolve_jobs(None, "s3://jobs-bucket/missing.yaml", None, day)
    with pytest.raises(PlanError, match="expected s3://bucket/key"):
        resolve_jobs(None, "s3://jobs-bucket/", None, day)


# ------------------------------------------------------------------------------------------ the shared server

def test_setup_is_idempotent_and_names_the_accounts_limit(cluster: Cluster) -> None:
    from prefect import get_client
    from prefect.client.schemas.actions import WorkPoolCreate

    from kling_tasks.identity import account_fingerprint
    from kling_tasks.recovery import CRASH_SILENT, RESCHEDULE_CRASHED
    from kling_tasks.settings import load_settings
    from kling_tasks.slots import limit_name

    limit = limit_name(account_fingerprint(load_settings()))
    again = cluster.cli(str(BIN / "kling-pipeline"), "setup", "--pool", POOL, "--silent-after", str(SILENT_AFTER),
                           "--reschedule-after", str(SETTLE))
    assert again.returncode == 0, again.stderr
    assert again.stdout.splitlines() == [
        f"work pool {POOL} (process): exists", f"global concurrency limit {limit}: {SLOTS} slot(s)",
        f"automation {CRASH_SILENT}: updated", f"automation {RESCHEDULE_CRASHED}: updated",
        f"a run with no heartbeat for {SILENT_AFTER} s is marked Crashed",
        f"a crashed produce-video run is rescheduled once, {SETTLE} s after its crash"]
    with get_client(sync_client=True) as client:
        assert client.read_work_pool(POOL).type == "process"
        assert client.read_global_concurrency_limit_by_name(limit).limit == SLOTS
        for name in (CRASH_SILENT, RESCHEDULE_CRASHED):
            assert len(client.read_automations_by_name(name)) == 1, name
        client.create_work_pool(WorkPoolCreate(name="not-a-process-pool", type="kubernetes"))
    wrong = cluster.cli(str(BIN / "kling-pipeline"), "setup", "--pool", "not-a-process-pool")
    assert wrong.returncode == 2 and wrong.stdout == ""
    assert wrong.stderr.strip().splitlines() == [
        "error: work pool 'not-a-process-pool' exists with type 'kubernetes'; kling-pipeline's deployments need "
        "a 'process' pool: pass --pool with another name"]


def test_both_deployments_register_with_schedules_and_forms_and_their_examples_complete(
        cluster: Cluster, fresh_emulator: Any, tmp_path: Path, decode_seconds: Any) -> None:
    from prefect import get_client
    from prefect.client.schemas.schedules import CronSchedule
    from prefect.deployments import run_deployment
    from prefect.exceptions import PrefectHTTPStatusError
    from prefect.states import Scheduled
    from prefect.utilities.schema_tools import validate

    from flows.batch import produce_batch
    from flows.video import produce_video

    with get_client(sync_client=True) as client:
        video, batch = client.read_deployment_by_name(VIDEO), client.read_deployment_by_name(BATCH)
    pull = [{"prefect.deployments.steps.set_working_directory": {"directory": "{{ $KLING_PIPELINE_HOME }}"}}]
    for deployment in (video, batch):
        assert deployment.work_pool_name == POOL and deployment.pull_steps == pull
        assert deployment.concurrency_limit is None and deployment.enforce_parameter_schema
    assert not produce_video.retries and not produce_batch.retries, "no flow retries (Crashed, never retried)"

    # The forms: a job, and a batch of jobs inline or a jobs file.
    form = video.parameter_openapi_schema
    assert form["required"] == ["job"] and form["properties"]["job"]["$ref"] == "#/definitions/VideoJob"
    assert form["definitions"]["GenerationSpec"]["properties"]["mode"]["enum"] == ["std", "pro"]
    batch_form = batch.parameter_openapi_schema["properties"]
    assert batch_form["jobs"]["anyOf"][0] == {"type": "array", "items": {"$ref": "#/definitions/VideoJob"}}
    assert batch_form["jobs_file"]["anyOf"][0] == {"type": "string"}
    assert batch_form["via_deployment"]["type"] == "boolean"

    # Schedules with their own parameters, on the batch deployment only.
    assert video.schedules == []
    by_slug = {schedule.slug: schedule for schedule in batch.schedules}
    assert by_slug.keys() == {"nightly-teasers", "weekly-trailers"}
    nightly = by_slug["nightly-teasers"]
    assert nightly.schedule == CronSchedule(cron="0 3 * * *", timezone="UTC") and nightly.active
    assert nightly.parameters == {"jobs_file": f"s3://{BUCKET}/jobs/nightly-teasers.yaml",
                                  "dest": f"s3://{BUCKET}/nightly", "max_credits": 60}
    assert by_slug["weekly-trailers"].schedule == CronSchedule(cron="0 4 * * 1", timezone="Europe/Paris")
    assert video.parameters["job"]["job_id"] == "teaser-{date}"
    assert batch.parameters == {"via_deployment": True, "dest": f"s3://{BUCKET}/batches", "max_credits": 100}
    examples = [(video, video.parameters)] + [(batch, {**batch.parameters, **s.parameters}) for s in batch.schedules]
    for deployment, parameters in examples:
        assert validate(parameters, deployment.parameter_openapi_schema, raise_on_error=False) == [], parameters
    with get_client(sync_client=True) as client, pytest.raises(PrefectHTTPStatusError, match="Validation failed"):
        client.create_flow_run_from_deployment(video.id, parameters={"job": {"generate": {"prompt": "a kite",
                                                                                          "mode": "ultra"}}})

    # The examples run: the video form as shipped, and the scheduler's next nightly-teasers run, moved to now
    # (its jobs file uploaded where the schedule reads it).
    s3().put_object(Bucket=BUCKET, Key="jobs/nightly-teasers.yaml",
                    Body=(REPO / "deployments" / "jobs" / "nightly-teasers.yaml").read_bytes())

    def next_nightly() -> Any:
        from prefect.client.schemas.filters import (
            DeploymentFilter,
            DeploymentFilterId,
            FlowRunFilter,
            FlowRunFilterState,
            FlowRunFilterStateType,
        )
        from prefect.client.schemas.objects import StateType

        with get_client(sync_client=True) as client:
            runs = client.read_flow_runs(
                deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[batch.id])),
                flow_run_filter=FlowRunFilter(state=FlowRunFilterState(
                    type=FlowRunFilterStateType(any_=[StateType.SCHEDULED]))))
        mine = [run for run in runs if run.parameters.get("jobs_file") == nightly.parameters["jobs_file"]]
        return min(mine, key=lambda run: run.expected_start_time) if mine else None

    scheduled = wait_until("the scheduler's nightly-teasers runs", next_nightly, 60)
    assert scheduled.parameters == {**batch.parameters, **nightly.parameters}
    night = scheduled.expected_start_time.astimezone(UTC)
    assert (night.hour, night.minute) == (3, 0), night
    with get_client(sync_client=True) as client:
        client.set_flow_run_state(scheduled.id, Scheduled(scheduled_time=datetime.now(UTC)), force=True)
    on_demand = run_deployment(VIDEO, timeout=0)
    runs = {"video": on_demand.id, "batch": scheduled.id}
    finished = {what: wait_until(f"the {what} example run", lambda run_id=run_id: final_run(run_id), 200, every=2,
                                 explain=lambda: cluster.log_tail(*WORKERS)) for what, run_id in runs.items()}
    for what, run in finished.items():
        assert run.state.is_completed(), (what, run.state, cluster.log_tail(*WORKERS))

    teaser = finished["video"].name
    assert teaser == f"teaser-{finished['video'].expected_start_time.astimezone(UTC):%Y%m%d}"
    check_whole(fresh_emulator, "on-demand", [teaser], tmp_path, decode_seconds)
    day = finished["batch"].expected_start_time.astimezone(UTC).strftime("%Y%m%d")
    nightly_ids = [f"{name}-{day}" for name in ("lighthouse", "boat", "fox")]
    check_whole(fresh_emulator, "nightly", nightly_ids, tmp_path, decode_seconds)
    assert {run.state_name for run in video_runs(nightly_ids)} == {"Completed"}
    [manifest_key] = [o["Key"] for o in s3().list_objects_v2(Bucket=BUCKET, Prefix="nightly/batch-")["Contents"]]
    assert json.loads(s3_bytes(manifest_key))["status"] == "succeeded"
    attempts, created = counts(fresh_emulator, "")
    assert len(created) == 4 * 3 and set(created.values()) == set(attempts.values()) == {1}


def test_a_batch_through_the_deployments_spreads_over_both_workers_and_pays_once(
        cluster: Cluster, fresh_emulator: Any, tmp_path: Path, decode_seconds: Any) -> None:
    from flows.batch import produce_batch

    tag = f"spread-{uuid.uuid4().hex[:6]}"
    jobs = make_jobs(tag, 6, f"s3://{BUCKET}/{tag}")
    job_ids = [job.job_id for job in jobs]
    state = asyncio.run(produce_batch(jobs=jobs, dest=f"s3://{BUCKET}/{tag}", via_deployment=True, batch_id=tag,
                                      return_state=True))
    assert state.is_completed(), (state.message, cluster.log_tail(*WORKERS))
    entries = state.result()
    assert [(e.job_id, e.status, e.final_uri) for e in entries] == [
        (job_id, "succeeded", f"s3://{BUCKET}/{tag}/{job_id}/final.mp4") for job_id in job_ids]

    runs = video_runs(job_ids)
    assert sorted(run.name for run in runs) == sorted(job_ids), "one produce-video deployment run per job"
    assert {run.state_name for run in runs} == {"Completed"}
    assert {run.labels["prefect.worker.name"] for run in runs} == set(WORKERS), "the runs went to both workers"
    assert all(run.infrastructure_pid for run in runs)

    planned = planned_ids(jobs)
    attempts, created = counts(fresh_emulator, tag)
    assert attempts == created == {ext: 1 for ext in planned}, "each external id created once, by one POST"
    high_water = fresh_emulator.stats()["concurrency_high_water"]
    assert 2 <= high_water <= SLOTS, f"high-water {high_water}: the account's {SLOTS} slots bound both workers"
    check_whole(fresh_emulator, tag, job_ids, tmp_path, decode_seconds)
    assert json.loads(s3_bytes(f"{tag}/{tag}.json"))["status"] == "succeeded"


def test_a_killed_worker_s_jobs_resume_on_the_other_worker_without_paying_twice(
        cluster: Cluster, fresh_emulator: Any, tmp_path: Path, decode_seconds: Any) -> None:
    """SIGKILL to a worker's process group mid-batch. Its runs end Crashed (each stops at its next write to the
    dead worker's pipe), the automation reschedules each once, the other worker resumes them from the ledger and
    the Kling-side lookup (it has none of the victim's cached results), and nothing is created twice although
    the emulator would accept a second POST of an external id as a second task."""
    from flows.batch import produce_batch

    assert fresh_emulator.set_behaviour(unique_external_ids=False)["unique_external_ids"] is False
    tag = f"kill-{uuid.uuid4().hex[:6]}"
    dest = f"s3://{BUCKET}/{tag}"
    jobs = make_jobs(tag, 6, dest)
    job_ids = [job.job_id for job in jobs]
    victim, survivor = WORKERS
    orphans: list[Proc] = []

    def mid_job_on_victim() -> list[Any]:
        """Runs of the victim with a job part-way: some of its steps created at Kling, not all."""
        _, created = counts(fresh_emulator, tag)
        runs = [run for run in video_runs(job_ids) if run.state_name == "Running"
                and run.labels.get("prefect.worker.name") == victim]
        return [run for run in runs if 1 <= sum(ext.startswith(f"{run.name}-s") for ext in created) < 3]

    async def batch_with_a_kill() -> tuple[Any, list[Any]]:
        batch = asyncio.create_task(produce_batch(jobs=jobs, dest=dest, via_deployment=True, batch_id=tag,
                                                  return_state=True))
        deadline = time.monotonic() + 120
        while not (caught := await asyncio.to_thread(mid_job_on_victim)):
            assert not batch.done() and time.monotonic() < deadline, "the victim never held a job mid-way"
            await asyncio.sleep(0.3)
        orphans.extend(cluster.kill_worker(victim))
        try:
            return await asyncio.wait_for(batch, timeout=240), caught
        except TimeoutError:
            raise AssertionError(f"the batch did not end: {await asyncio.to_thread(describe_runs, job_ids)}\n"
                                 f"{cluster.log_tail(survivor)}") from None

    try:
        state, caught = asyncio.run(batch_with_a_kill())

        def all_completed() -> list[Any] | None:
            runs = video_runs(job_ids)
            return runs if len(runs) == 6 and all(run.state_name == "Completed" for run in runs) else None

        runs = wait_until("every job's run Completed", all_completed, 180, every=1,
                          explain=lambda: describe_runs(job_ids))
        resumed = [run for run in runs if run.run_count == 2]
        assert {run.id for run in caught} <= {run.id for run in resumed}, describe_runs(job_ids)
        for run in resumed:
            assert run.labels["prefect.worker.name"] == survivor
            assert_rescheduled_once(run)
        assert all(run.run_count == 1 for run in runs if run not in resumed)

        planned = planned_ids(jobs)
        attempts, created = counts(fresh_emulator, tag)
        assert created == {ext: 1 for ext in planned}, "no step was created twice"
        assert attempts == {ext: 1 for ext in planned}, "no create was sent twice"
        # A run that stops releases its slot while its Kling task still renders (a real account answers an
        # extra create with 1303, which waits): at most one task over the limit per crashed run.
        assert fresh_emulator.stats()["concurrency_high_water"] <= SLOTS + len(resumed)
        check_whole(fresh_emulator, tag, job_ids, tmp_path, decode_seconds)
        # The batch waited through the reschedules: every job counts as succeeded.
        assert state.is_completed(), state.message
        assert json.loads(s3_bytes(f"{tag}/{tag}.json"))["status"] == "succeeded"
    finally:
        kill_groups(orphans)  # none should be left; never leak one
        cluster.start_worker(victim)  # the next tests get two workers again
        cluster.wait_workers_online()


def test_a_batch_counts_a_job_the_automation_resumed_after_its_machine_was_lost(
        cluster: Cluster, fresh_emulator: Any, tmp_path: Path, decode_seconds: Any) -> None:
    """A job's machine is lost mid-job (its worker and the run's process, SIGKILL): the run stops heartbeating,
    `kling-crash-silent-runs` marks it Crashed, the automation reschedules it once and the other worker resumes
    it, paying nothing twice.

    The batch (via_deployment=True) counts the job once its rescheduled run completed: Prefect's
    wait_for_flow_run returns on the first terminal state, and Crashed is one, so the batch watches a Crashed
    first run for the automation's reschedule before taking it as the outcome.
    """
    from flows.batch import produce_batch

    tag = f"lost-{uuid.uuid4().hex[:6]}"
    dest = f"s3://{BUCKET}/{tag}"
    [job] = make_jobs(tag, 1, dest)
    lost: list[str] = []

    def mid_job() -> Any:
        _, created = counts(fresh_emulator, tag)
        runs = [run for run in video_runs([job.job_id]) if run.state_name == "Running"]
        return runs[0] if runs and 1 <= len(created) < 3 else None

    async def batch_with_a_lost_machine() -> Any:
        batch = asyncio.create_task(produce_batch(jobs=[job], dest=dest, via_deployment=True, batch_id=tag,
                                                  return_state=True))
        deadline = time.monotonic() + 120
        while not (run := await asyncio.to_thread(mid_job)):
            assert not batch.done() and time.monotonic() < deadline, "the job was never caught mid-way"
            await asyncio.sleep(0.2)
        lost.append(run.labels["prefect.worker.name"])
        assert cluster.kill_machine(lost[0]), "the run's process was found and killed with its worker"
        return await asyncio.wait_for(batch, timeout=240)

    try:
        state = asyncio.run(batch_with_a_lost_machine())
        [run] = wait_until("the lost job's run Completed", lambda: [
            r for r in video_runs([job.job_id]) if r.state_name == "Completed"], 180, every=1,
            explain=lambda: describe_runs([job.job_id]))
        assert_rescheduled_once(run, f"No heartbeat for {SILENT_AFTER} s: the run's worker or machine is gone")
        assert run.labels["prefect.worker.name"] != lost[0]
        attempts, created = counts(fresh_emulator, tag)
        assert attempts == created == {ext: 1 for ext in planned_ids([job])}
        check_whole(fresh_emulator, tag, [job.job_id], tmp_path, decode_seconds)
        assert state.is_completed(), (
            f"the batch recorded its job as failed although it completed after the automation: {state.message}")
    finally:
        for name in lost:
            cluster.start_worker(name)
        cluster.wait_workers_online()


def test_serve_runs_both_flows_from_one_process_without_a_work_pool(
        cluster: Cluster, fresh_emulator: Any, tmp_path: Path, decode_seconds: Any) -> None:
    """`kling-pipeline serve` on a server of its own (its deployments share the yaml's names)."""
    from prefect import get_client
    from prefect.deployments import run_deployment
    from prefect.settings import PREFECT_API_URL, temporary_settings

    own = tmp_path / "serve-server"
    own.mkdir()
    server = PrefectServerProcess.start({**plain_env(), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}, own)
    served = None
    try:
        env = {**cluster.env, "PREFECT_API_URL": server.api_url, "PREFECT_HOME": str(tmp_path / "serve-home")}
        with (tmp_path / "serve.log").open("wb") as log:
            served = subprocess.Popen([str(BIN / "kling-pipeline"), "serve", "--limit", "4"], env=env, cwd=tmp_path,
                                      stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        with temporary_settings(updates={PREFECT_API_URL: server.api_url}):
            def both_served() -> bool:
                with get_client(sync_client=True) as client:
                    names = {d.name for d in client.read_deployments()}
                return names >= {"produce-video", "produce-batch"}

            wait_until("both flows served", both_served, 60,
                       explain=lambda: (tmp_path / "serve.log").read_text(errors="replace")[-3000:])
            with get_client(sync_client=True) as client:
                assert client.read_deployment_by_name(BATCH).work_pool_name is None
            tag = f"serve-{uuid.uuid4().hex[:6]}"
            jobs = make_jobs(tag, 1, f"s3://{BUCKET}/{tag}")
            run = run_deployment(BATCH, parameters={"jobs": [job.model_dump(mode="json") for job in jobs],
                                                    "dest": f"s3://{BUCKET}/{tag}"}, timeout=180, poll_interval=2)
            assert run.state is not None and run.state.is_completed(), (
                run.state, (tmp_path / "serve.log").read_text(errors="replace")[-4000:])
        check_whole(fresh_emulator, tag, [job.job_id for job in jobs], tmp_path, decode_seconds)
        attempts, created = counts(fresh_emulator, tag)
        assert attempts == created == {ext: 1 for ext in planned_ids(jobs)}
    finally:
        if served is not None:
            left = descendants(served.pid)
            stop_group(served, timeout=10)
            kill_groups(left)
        server.stop()
