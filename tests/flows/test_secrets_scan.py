"""The secrets scan: two real `kling-pipeline run` processes against the emulator, moto's S3 and the session's
Prefect server (one job that succeeds on Kling's own API, one that fails on purpose through the CometAPI
provider), then everything they left behind is read back and searched for the secrets:

the Kling access and secret keys, every JWT the run could have minted (computed from the keys for each second
of the run) and its signature, the CometAPI key, the AWS secret, and the signature and session-token parts of
the presigned image URLs the jobs were given.

Where it looks: the processes' stdout and stderr; through the Prefect API the logs, artifacts, flow-run and
task-run records (parameters, state messages: the exception texts), events; the persisted results
(PREFECT_RESULTS_LOCAL_STORAGE_PATH, file names and bytes); the S3 objects' keys, user metadata and every
JSON object (the manifests). Each place is its own test, so a failure names the place.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import boto3
import pytest

from kling_tasks.api.auth import JwtAuth

AK = "scan-ak-3f9c1e7a5b2d"
SK = "scan-sk-8d2b6f4a1c9e7b3d5f0a2c4e"  # >= 32 bytes: HS256 key
COMET_KEY = "scan-comet-key-6a1f9d3b7e5c"
AWS_SECRET = "scan-aws-secret-2e8b4d6f0a1c"
AWS_KEY_ID = "AKIASCANEXAMPLE00001"
SIGNATURES = ["5e1f" * 16, "9a7c" * 16]  # X-Amz-Signature of each job's image URL
SESSION_TOKENS = ["IQoJb3JpZ2luX2VjEScan0token0one0x", "IQoJb3JpZ2luX2VjEScan0token0two0y"]
# Quotes, a newline, unicode and path-like text: none of it may reach a key or a file name.
PROMPT = 'A "kite" over\nit\'s hills ☃ ../../etc/passwd C:\\temp'
SAFE_S3_KEY = re.compile(r"scan/(scan-[a-z0-9-]+/(step-\d{2}\.mp4|final\.mp4|manifest\.json|contact-sheet\.jpg))")
_DATA_URI = re.compile(r"data:[a-z/+-]+;base64,[A-Za-z0-9+/=]+")
T = TypeVar("T")


def signed_image_url(n: int) -> str:
    return (f"https://images.example.test/inputs/kite-{n}.png?X-Amz-Algorithm=AWS4-HMAC-SHA256"
            f"&X-Amz-Credential={AWS_KEY_ID}%2F20261201%2Fus-east-1%2Fs3%2Faws4_request&X-Amz-Date=20261201T000000Z"
            f"&X-Amz-Expires=3600&X-Amz-SignedHeaders=host&X-Amz-Security-Token={SESSION_TOKENS[n]}"
            f"&X-Amz-Signature={SIGNATURES[n]}")


@dataclass
class Process:
    job_id: str
    exit_code: int
    stdout: str
    stderr: str
    started: float
    ended: float


@dataclass
class Scan:
    runs: dict[str, Process]
    flow_runs: dict[str, Any]  # job id -> FlowRun
    results_dir: Path
    s3_keys: list[str]
    s3_texts: list[tuple[str, str]]
    secrets: list[str] = field(default_factory=list)


def poll(read: Callable[[], T], ok: Callable[[T], bool], timeout: float = 30.0) -> T:
    deadline = time.monotonic() + timeout
    while True:
        value = read()
        if ok(value) or time.monotonic() > deadline:
            return value
        time.sleep(0.3)


def start_cli(env: dict[str, str], job_id: str, image: str) -> tuple[subprocess.Popen[str], float]:
    command = [str(Path(sys.executable).parent / "kling-pipeline"), "run", "--prompt", PROMPT, "--image", image,
               "--extend", "The kite climbs; \"higher\"\n/tmp/x", "--dest", "s3://videos/scan", "--job-id", job_id]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True), time.time()


def finish(process: subprocess.Popen[str], job_id: str, started: float) -> Process:
    try:
        out, err = process.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, 9)
        out, err = process.communicate()
    return Process(job_id, process.returncode, out, err, started, time.time())


def jwt_candidates(start: float, end: float) -> list[str]:
    """Every token JwtAuth mints for these keys in [start, end] (it stamps whole seconds), and each signature."""
    tokens = [JwtAuth(AK, SK, clock=lambda t=t: float(t)).token() for t in range(int(start) - 2, int(end) + 3)]
    return tokens + [token.rsplit(".", 1)[1] for token in tokens]


@pytest.fixture(scope="module")
def scan(prefect_server: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Scan]:
    from moto.server import ThreadedMotoServer
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterName

    from kling_emulator import EmulatorConfig, start_emulator

    s3_server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    s3_server.start()
    host, port = s3_server.get_host_and_port()
    results = tmp_path_factory.mktemp("scan-results")
    suffix = uuid.uuid4().hex[:8]
    ok_job, failing_job = f"scan-ok-{suffix}", f"scan-refused-{suffix}"
    try:
        with start_emulator(EmulatorConfig(access_key=AK, secret_key=SK, time_scale=0.004)) as kling, \
                start_emulator(EmulatorConfig(provider="cometapi", api_key=COMET_KEY, time_scale=0.004)) as comet:
            aws = {"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": AWS_KEY_ID,
                   "AWS_SECRET_ACCESS_KEY": AWS_SECRET, "AWS_DEFAULT_REGION": "us-east-1"}
            s3 = boto3.client("s3", endpoint_url=aws["AWS_ENDPOINT_URL"], aws_access_key_id=AWS_KEY_ID,
                              aws_secret_access_key=AWS_SECRET, region_name="us-east-1")
            s3.create_bucket(Bucket="videos")
            # Every secret is in both processes' environment: the one a run does not use must not leak either.
            base = {**os.environ, **prefect_server.env, **aws, "PREFECT_RESULTS_LOCAL_STORAGE_PATH": str(results),
                    "KLING_ACCESS_KEY": AK, "KLING_SECRET_KEY": SK, "COMETAPI_KEY": COMET_KEY,
                    "KLING_ALLOW_PRIVATE_URLS": "1", "KLING_POLL_MIN_SECONDS": "0.05", "KLING_POLL_MAX_SECONDS": "0.3",
                    "PREFECT_SERVER_ANALYTICS_ENABLED": "false", "COLUMNS": "200"}
            comet.set_faults({"rules": [{"match": "create:video-extend", "kind": "task_fail",
                                         "params": {"message": "refused by content policy"}}]})
            ok = start_cli({**base, "KLING_PROVIDER": "kling", "KLING_API_BASE_URL": kling.base_url}, ok_job,
                           signed_image_url(0))
            failing = start_cli({**base, "KLING_PROVIDER": "cometapi", "KLING_API_BASE_URL": comet.base_url},
                                failing_job, signed_image_url(1))
            runs = {ok_job: finish(ok[0], ok_job, ok[1]), failing_job: finish(failing[0], failing_job, failing[1])}
            kinds = sorted(t["kind"] for t in kling.stats()["tasks"].values())
            comet_kinds = sorted((t["kind"], t["status"]) for t in comet.stats()["tasks"].values())
        assert runs[ok_job].exit_code == 0, runs[ok_job].stderr[-3000:]
        assert runs[failing_job].exit_code == 1, runs[failing_job].stderr[-3000:]
        assert kinds == ["image2video", "video-extend"]  # the signed image URL really was sent
        assert comet_kinds == [("image2video", "succeed"), ("video-extend", "failed")]

        with get_client(sync_client=True) as client:
            flow_runs = {job: poll(lambda job=job: client.read_flow_runs(flow_run_filter=FlowRunFilter(
                name=FlowRunFilterName(any_=[job]))), lambda found: len(found) == 1)[0] for job in runs}
        keys = [obj["Key"] for obj in s3.list_objects_v2(Bucket="videos").get("Contents", [])]
        texts = []
        for key in keys:
            head = s3.head_object(Bucket="videos", Key=key)
            texts.append((f"s3 metadata {key}", json.dumps(head.get("Metadata", {}))))
            if key.endswith(".json"):
                texts.append((f"s3 object {key}", s3.get_object(Bucket="videos", Key=key)["Body"].read().decode()))
        secrets = [AK, SK, COMET_KEY, AWS_SECRET, *SIGNATURES, *SESSION_TOKENS,
                   *jwt_candidates(runs[ok_job].started, runs[ok_job].ended)]
        yield Scan(runs=runs, flow_runs=flow_runs, results_dir=results, s3_keys=keys, s3_texts=texts,
                   secrets=secrets)
    finally:
        s3_server.stop()


def leaks(scan: Scan, texts: list[tuple[str, str]]) -> list[str]:
    found = []
    for where, text in texts:
        text = _DATA_URI.sub("<inline image>", text)  # base64 pixels may spell anything
        found += [f"{secret[:10]}... in {where}" for secret in scan.secrets if secret in text]
        if "eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9" in text:  # any HS256 JWT's first segment
            found.append(f"a JWT in {where}")
    return found


def test_the_scan_finds_what_it_looks_for(scan: Scan) -> None:
    # A token of the window the scan looks in (the run's own seconds): one minted now, after the module's slower
    # tests, is outside it and only the generic JWT check would find it.
    started = next(run.started for job, run in scan.runs.items() if "scan-ok" in job)
    planted = f"Bearer {jwt_candidates(started, started)[0]} {signed_image_url(0)}"
    assert len(leaks(scan, [("planted", planted)])) >= 4  # the token, its signature, the URL's two parts


def test_no_secret_in_the_processes_stdout_or_stderr(scan: Scan) -> None:
    texts = [(f"{job} {stream}", getattr(run, stream)) for job, run in scan.runs.items()
             for stream in ("stdout", "stderr")]
    failing = next(run for job, run in scan.runs.items() if "refused" in job)
    assert "refused by content policy" in failing.stderr and "error:" in failing.stderr  # the exception's text
    ok = next(run for job, run in scan.runs.items() if "scan-ok" in job)
    assert ok.stdout.strip().splitlines()[-1].startswith("s3://videos/scan/")
    assert leaks(scan, texts) == []


def test_no_secret_in_the_logs(scan: Scan) -> None:
    from prefect import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.client.schemas.sorting import LogSort

    texts = []
    with get_client(sync_client=True) as client:
        for job, flow_run in scan.flow_runs.items():
            def read(flow_run: Any = flow_run) -> list[Any]:
                logs: list[Any] = []
                while True:
                    page = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run.id])),
                                            limit=200, offset=len(logs), sort=LogSort.TIMESTAMP_ASC)
                    logs += page
                    if len(page) < 200:
                        return logs

            logs = poll(read, lambda logs: any("Finished in state" in log.message for log in logs))
            assert any("Finished in state" in log.message for log in logs), f"{job}: logs incomplete"
            texts += [(f"{job} log {log.name}", log.message) for log in logs]
    assert len(texts) > 20
    assert leaks(scan, texts) == []


def test_no_secret_in_the_artifacts(scan: Scan) -> None:
    from prefect import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId

    texts = []
    with get_client(sync_client=True) as client:
        for job, flow_run in scan.flow_runs.items():
            artifacts = client.read_artifacts(artifact_filter=ArtifactFilter(
                flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run.id])))
            assert artifacts, f"{job}: no artifacts"
            texts += [(f"{job} artifact {a.key}", a.model_dump_json()) for a in artifacts]
    assert leaks(scan, texts) == []


def test_no_secret_in_task_runs_state_messages_or_events(scan: Scan) -> None:
    from prefect import get_client
    from prefect.client.schemas.filters import FlowRunFilter
    from prefect.events.filters import EventAnyResourceFilter, EventFilter

    texts = []
    with get_client(sync_client=True) as client:
        for job, flow_run in scan.flow_runs.items():
            current = client.read_flow_run(flow_run.id)
            assert current.state is not None
            texts.append((f"{job} flow-run state", current.state.model_dump_json()))
            task_runs = client.read_task_runs(flow_run_filter=FlowRunFilter(id={"any_": [flow_run.id]}), limit=200)
            assert task_runs
            texts += [(f"{job} task run {t.name}", t.model_dump_json()) for t in task_runs]
            page = client.read_events(filter=EventFilter(any_resource=EventAnyResourceFilter(
                id=[f"prefect.flow-run.{flow_run.id}"])), limit=50)
            events = list(page.events)
            while page.next_page:
                page = client.read_events_page(page.next_page)
                events += page.events
            texts += [(f"{job} event {e.event}", e.model_dump_json()) for e in events]
    failed = next(text for where, text in texts if "refused" in where and where.endswith("flow-run state"))
    assert "refused by content policy" in failed  # the exception's text is among what was scanned
    assert leaks(scan, texts) == []


def test_no_secret_in_the_flow_run_parameters(scan: Scan) -> None:
    from prefect import get_client

    with get_client(sync_client=True) as client:
        texts = [(f"{job} parameters", json.dumps(client.read_flow_run(run.id).parameters))
                 for job, run in scan.flow_runs.items()]
    assert leaks(scan, texts) == []


def test_no_secret_in_the_flow_run_record_apart_from_its_parameters(scan: Scan) -> None:
    from prefect import get_client

    with get_client(sync_client=True) as client:
        texts = [(f"{job} flow run", client.read_flow_run(run.id).model_dump_json(exclude={"parameters"}))
                 for job, run in scan.flow_runs.items()]
    assert leaks(scan, texts) == []


def test_no_secret_in_the_persisted_results_and_no_prompt_in_their_names(scan: Scan) -> None:
    files = [path for path in scan.results_dir.rglob("*") if path.is_file()]
    assert len(files) >= 6, "the runs persisted their task results here"
    for path in files:
        assert re.fullmatch(r"[A-Za-z0-9/_.-]+", str(path.relative_to(scan.results_dir))), path
    texts = [(f"result {path.relative_to(scan.results_dir)}", path.read_bytes().decode("utf-8", "replace"))
             for path in files]
    assert leaks(scan, texts) == []


def test_no_secret_in_the_manifests_or_object_metadata_and_no_prompt_in_a_key(scan: Scan) -> None:
    assert any(key.endswith("/manifest.json") for key in scan.s3_keys) and len(scan.s3_texts) >= 5
    for key in scan.s3_keys:
        assert SAFE_S3_KEY.fullmatch(key), key
    manifests = [json.loads(text) for where, text in scan.s3_texts
                 if where.startswith("s3 object") and where.endswith("/manifest.json")]
    assert len(manifests) == 2
    assert {m["spec"]["generate"]["image"] for m in manifests} == {
        f"https://images.example.test/inputs/kite-{n}.png" for n in (0, 1)}  # the URL without its query
    assert leaks(scan, scan.s3_texts) == []
