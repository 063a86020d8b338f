"""What the reliability matrices share: the mode (quick or full), seeded picks, and the checks of what a job left.

`KLING_MATRIX=full` runs every case; anything else (the default CI run) runs a seeded subset. `KLING_MATRIX_SEED`
changes the seed (default 20261201). Each case records its seed and draw in its test id and its failure message.

The checks read only the emulator's stats, the bytes the emulator serves and what the destination holds
(moto's S3 server or a local folder): one task per external id, every stored step its own task's file byte
for byte, a manifest that says what is stored, and nothing half-written (no open multipart upload, no temp).
The readers of a destination (`read`, `uri_of`, `open_uploads`, `temps`) serve the crash tests too: an
`s3://bucket/prefix` destination names its own bucket.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import uuid
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, TypeVar

import boto3
import httpx
from botocore.exceptions import ClientError

from kling_tasks.jobs import ExtensionSpec, GenerationSpec, VideoJob, plan_job
from tests.conftest import quiet_werkzeug

T = TypeVar("T")

BUCKET = "matrix-videos"
FULL = os.environ.get("KLING_MATRIX", "quick").strip().lower() == "full"
SEED = int(os.environ.get("KLING_MATRIX_SEED", "20261201"))


def pick(cases: Sequence[T], quick: int, salt: str) -> list[T]:
    """Every case in full mode; else `quick` of them, drawn with the matrix seed (stable across runs)."""
    if FULL or quick >= len(cases):
        return list(cases)
    chosen = sorted(random.Random(f"{SEED}:{salt}").sample(range(len(cases)), quick))
    return [cases[i] for i in chosen]


def new_job_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"  # the session shares one Prefect server: never reuse a job id


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# ---- the servers and the job --------------------------------------------------------------------------------


@contextlib.contextmanager
def moto_server() -> Iterator[str]:
    """moto's real S3 HTTP server on a free port: its endpoint URL."""
    from moto.server import ThreadedMotoServer

    quiet_werkzeug()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


def aws_env(endpoint: str, no_aws: Path) -> dict[str, str]:
    """boto3's environment for moto at `endpoint`: fixed test keys, no config or credential file, no metadata
    probe (set it after removing every other AWS_* variable)."""
    return {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing-access-key",
            "AWS_SECRET_ACCESS_KEY": "testing-secret-key", "AWS_DEFAULT_REGION": "us-east-1",
            "AWS_EC2_METADATA_DISABLED": "true", "AWS_CONFIG_FILE": str(no_aws / "config"),
            "AWS_SHARED_CREDENTIALS_FILE": str(no_aws / "credentials")}


def video_job(dest: str, job_id: str, prompt: str, extensions: Sequence[str]) -> VideoJob:
    return VideoJob(generate=GenerationSpec(prompt=prompt), extensions=[ExtensionSpec(prompt=t) for t in extensions],
                    dest=dest, job_id=job_id)


def planned_ids(dest: str, job_id: str, prompt: str, extensions: Sequence[str]) -> list[str]:
    """The external task ids of the job's steps, in order (what the emulator sees)."""
    return [step.external_task_id for step in plan_job(video_job(dest, job_id, prompt, extensions)).steps]


# ---- the destination ------------------------------------------------------------------------------------------


def is_s3(dest: str) -> bool:
    return dest.startswith("s3://")


def bucket_of(dest: str) -> str:
    return dest.removeprefix("s3://").split("/", 1)[0]


def s3_key(dest: str, key: str) -> str:
    """The object key of `key` under an `s3://bucket/prefix` destination."""
    prefix = dest.removeprefix(f"s3://{bucket_of(dest)}").strip("/")
    return f"{prefix}/{key}" if prefix else key


def s3_sha256(head: dict[str, Any], bucket: str, key: str) -> str | None:
    """The sha256 an S3 object carries: in its metadata (one PutObject), else as its `sha256` tag (multipart)."""
    if "sha256" in head["Metadata"]:
        return str(head["Metadata"]["sha256"])
    tags = boto3.client("s3").get_object_tagging(Bucket=bucket, Key=key)["TagSet"]
    return next((tag["Value"] for tag in tags if tag["Key"] == "sha256"), None)


def read(dest: str, key: str) -> bytes | None:
    """The bytes stored under `key` at the destination (S3 or a folder), None if nothing is there."""
    if is_s3(dest):
        try:
            body = boto3.client("s3").get_object(Bucket=bucket_of(dest), Key=s3_key(dest, key))["Body"]
            return bytes(body.read())
        except ClientError:
            return None
    path = Path(dest) / key
    return path.read_bytes() if path.is_file() else None


def uri_of(dest: str, key: str) -> str:
    return f"{dest}/{key}" if is_s3(dest) else str((Path(dest) / key).resolve())


def open_uploads(bucket: str = BUCKET, prefix: str = "") -> list[dict[str, Any]]:
    uploads = boto3.client("s3").list_multipart_uploads(Bucket=bucket, Prefix=prefix).get("Uploads", [])
    return [dict(upload) for upload in uploads]


def temps(folder: Path) -> list[Path]:
    """Every temp a writer may leave: the sink's `.{name}.{random}.part`, and any other *.part."""
    return sorted({*folder.glob(".*.part"), *folder.glob("*.part")}) if folder.is_dir() else []


def manifest_of(dest: str, job_id: str) -> dict[str, Any] | None:
    raw = read(dest, f"{job_id}/manifest.json")
    return json.loads(raw) if raw is not None else None


def stored_keys(dest: str, job_id: str) -> set[str]:
    """The step and final videos under the job's folder (names relative to the folder)."""
    if is_s3(dest):
        prefix = s3_key(dest, f"{job_id}/")
        pages = boto3.client("s3").get_paginator("list_objects_v2").paginate(Bucket=bucket_of(dest), Prefix=prefix)
        names = {obj["Key"].removeprefix(prefix) for page in pages for obj in page.get("Contents", [])}
    else:
        folder = Path(dest) / job_id
        names = {path.name for path in folder.iterdir()} if folder.is_dir() else set()
    return {name for name in names if name.endswith(".mp4")}


# ---- the emulator ---------------------------------------------------------------------------------------------


class Served:
    """sha256 of the files the emulator serves, fetched once per video (a case may check them twice)."""

    def __init__(self, emulator: Any) -> None:
        self.emulator = emulator
        self._cache: dict[str, str] = {}

    def sha256_of_task(self, task_id: str) -> str:
        video_id = self.emulator.stats()["tasks"][task_id]["video_id"]
        if video_id not in self._cache:
            self._cache[video_id] = sha256(httpx.get(f"{self.emulator.base_url}/_files/{video_id}.mp4",
                                                     timeout=30).content)
        return self._cache[video_id]


def job_tasks(stats: dict[str, Any], external_ids: set[str]) -> dict[str, list[str]]:
    """external_task_id -> the task ids the emulator holds for it (one, if nothing was paid twice)."""
    found: dict[str, list[str]] = {ext: [] for ext in external_ids}
    for task_id, task in stats["tasks"].items():
        if task["external_task_id"] in found:
            found[task["external_task_id"]].append(task_id)
    return found


def duplicates(stats: dict[str, Any], prefix: str) -> dict[str, int]:
    """External ids of this job (they start with its namespace) with more than one task: paid twice."""
    return {ext: n for ext, n in stats["tasks_created"].items() if ext.startswith(prefix) and n > 1}


# ---- what a run left behind -----------------------------------------------------------------------------------


def assert_consistent(emulator: Any, dest: str, job_id: str, served: Served | None = None, *,
                      partial_ok: bool = False) -> dict[str, Any] | None:
    """Whatever state the job is in (finished, failed, killed): what the manifest calls stored is stored, whole,
    and its task's file; no step video is stored that the manifest does not account for as this job's; no
    half-written object (`partial_ok`: right after a kill, an open multipart upload or a temp may be left, never
    under a final key; the rerun must clear them). Returns the manifest (None if the run died before one)."""
    served = served or Served(emulator)
    stats = emulator.stats()
    folder_names = stored_keys(dest, job_id)
    if partial_ok:
        pass
    elif is_s3(dest):
        assert open_uploads(bucket_of(dest)) == [], "no multipart upload left open"
    else:
        assert temps(Path(dest) / job_id) == [], "no temporary file left in the job folder"
    manifest = manifest_of(dest, job_id)
    if manifest is None:
        assert folder_names == set(), f"videos without a manifest: {folder_names}"
        return None
    assert manifest["job_id"] == job_id
    recorded = {f"step-{step['index']:02d}.mp4": step for step in manifest["steps"]}
    for name in sorted(folder_names - {"final.mp4"}):
        step = recorded.get(name)
        assert step is not None, f"{name} is not a step of the plan"
        data = read(dest, f"{job_id}/{name}")
        assert data is not None
        # A store may have finished after the last manifest write only in a killed run; then the object still
        # has to be its task's file, whole (the rerun records it).
        task_id = step["task_id"]
        assert task_id in stats["tasks"], f"{name}: the manifest's task {task_id} exists at the emulator"
        assert sha256(data) == served.sha256_of_task(task_id), f"{name} is its task's video, whole"
        if step["status"] == "stored":
            assert (len(data), sha256(data)) == (step["size"], step["sha256"]), f"{name} is what the ledger says"
            assert step["uri"] == uri_of(dest, f"{job_id}/{name}")
    for name, step in recorded.items():
        if step["status"] == "stored":
            assert name in folder_names, f"the ledger says {name} is stored; it is not there"
    if "final.mp4" in folder_names:
        final = read(dest, f"{job_id}/final.mp4")
        assert final is not None
        last = manifest["steps"][-1]
        assert last["task_id"] is not None and sha256(final) == served.sha256_of_task(last["task_id"]), \
            "final.mp4 is the last step's video, whole"
    return manifest


def assert_finished_whole(emulator: Any, dest: str, job_id: str, external_ids: Sequence[str],
                          served: Served | None = None) -> dict[str, Any]:
    """The job succeeded: one task per planned step, every step and final.mp4 stored whole, the ledger true."""
    served = served or Served(emulator)
    stats = emulator.stats()
    tasks = job_tasks(stats, set(external_ids))
    assert {ext: len(ids) for ext, ids in tasks.items()} == {ext: 1 for ext in external_ids}, \
        "one task per planned step: nothing paid twice, nothing missing"
    manifest = assert_consistent(emulator, dest, job_id, served)
    assert manifest is not None
    assert manifest["status"] == "succeeded"
    assert manifest["final_uri"] == uri_of(dest, f"{job_id}/final.mp4")
    assert [step["external_task_id"] for step in manifest["steps"]] == list(external_ids)
    for step in manifest["steps"]:
        assert step["status"] == "stored", f"{step['name']} is stored"
        assert step["task_id"] == tasks[step["external_task_id"]][0], "the ledger names the step's only task"
    final = read(dest, f"{job_id}/final.mp4")
    assert final is not None and sha256(final) == manifest["steps"][-1]["sha256"]
    assert stored_keys(dest, job_id) == {f"step-{i:02d}.mp4" for i in range(len(external_ids))} | {"final.mp4"}
    return manifest


def record(matrix: str, **fields: Any) -> None:
    """Append one case's outcome to $KLING_MATRIX_REPORT (JSON lines), the source of docs/reliability.md."""
    path = os.environ.get("KLING_MATRIX_REPORT")
    if path:
        with open(path, "a") as out:
            out.write(json.dumps({"matrix": matrix, "seed": SEED, "full": FULL, **fields}, sort_keys=True) + "\n")
