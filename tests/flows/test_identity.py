"""One identity for paid work and for stored videos, end to end through the CLI (issue: never pay twice,
never deliver the wrong video). Every assertion comes from the emulator's counts and the stored bytes."""

from __future__ import annotations

import hashlib
import json
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import boto3
import httpx
import pytest
from typer.testing import CliRunner

from flows.cli import app
from kling_tasks.jobs import ExtensionSpec, GenerationSpec, VideoJob, plan_job

pytestmark = pytest.mark.usefixtures("prefect_server")
runner = CliRunner()


def cli(*args: str | Path) -> Any:
    return runner.invoke(app, [str(arg) for arg in args])


def posts(emulator: Any) -> int:
    """Create requests the emulator received (refused and dropped ones included)."""
    return sum(count for name, count in emulator.stats()["requests"].items() if name.startswith("POST"))


def served_sha256(emulator: Any, task_id: str) -> str:
    video_id = emulator.stats()["tasks"][task_id]["video_id"]
    return hashlib.sha256(httpx.get(f"{emulator.base_url}/_files/{video_id}.mp4").content).hexdigest()


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"  # the session shares one Prefect cache: never reuse a job id


def one_line(result: Any) -> str:
    (line,) = result.output.strip().splitlines()
    return str(line)


@pytest.fixture(params=["local", "s3"])
def dest(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    if request.param == "local":
        yield str(tmp_path / "out")
        return
    request.getfixturevalue("s3_endpoint")
    boto3.client("s3").create_bucket(Bucket="identity")
    yield "s3://identity/videos"


def read(dest: str, key: str) -> bytes:
    if dest.startswith("s3://"):
        bucket, _, prefix = dest.removeprefix("s3://").partition("/")
        return bytes(boto3.client("s3").get_object(Bucket=bucket, Key=f"{prefix}/{key}")["Body"].read())
    return (Path(dest) / key).read_bytes()


def keys(dest: str, job_id: str) -> list[str]:
    if dest.startswith("s3://"):
        bucket, _, prefix = dest.removeprefix("s3://").partition("/")
        listed = boto3.client("s3").list_objects_v2(Bucket=bucket, Prefix=f"{prefix}/{job_id}/")
        return sorted(item["Key"].rsplit("/", 1)[1] for item in listed.get("Contents", []))
    return sorted(path.name for path in (Path(dest) / job_id).iterdir())


def test_a_changed_prompt_under_a_used_job_id_is_refused_then_replaced(kling_env: dict[str, str], emulator: Any,
                                                                        dest: str) -> None:
    job_id = new_id("kite")
    assert cli("run", "--prompt", "a red kite", "--job-id", job_id, "--dest", dest).exit_code == 0
    before = posts(emulator)

    refused = cli("run", "--prompt", "a blue whale", "--job-id", job_id, "--dest", dest)
    assert refused.exit_code == 2, refused.output
    assert "belongs to another job" in one_line(refused) and "--replace" in one_line(refused)
    assert posts(emulator) == before, "refused before any request that creates"

    replaced = cli("run", "--prompt", "a blue whale", "--job-id", job_id, "--dest", dest, "--replace")
    assert replaced.exit_code == 0, replaced.output
    manifest = json.loads(read(dest, f"{job_id}/manifest.json"))
    assert manifest["spec"]["generate"]["prompt"] == "a blue whale"
    whale = manifest["steps"][0]["task_id"]
    for key in ("step-00.mp4", "final.mp4"):
        assert hashlib.sha256(read(dest, f"{job_id}/{key}")).hexdigest() == served_sha256(emulator, whale)
    kept = [name for name in keys(dest, job_id) if name.startswith("manifest.replaced-")]
    assert len(kept) == 1 and json.loads(read(dest, f"{job_id}/{kept[0]}"))["spec"]["generate"]["prompt"] == \
        "a red kite"


def test_another_account_never_gets_the_first_accounts_video(kling_env: dict[str, str], emulator: Any,
                                                            tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from kling_emulator import EmulatorConfig, start_emulator

    job_id, first_dest = new_id("account"), tmp_path / "first"
    args = ["run", "--prompt", "a lighthouse at night", "--extend", "the beam sweeps", "--job-id", job_id]
    assert cli(*args, "--dest", first_dest).exit_code == 0
    other_keys = {"access_key": "other-ak-0123", "secret_key": "other-sk-0123456789abcdef0123456789"}
    with start_emulator(EmulatorConfig(time_scale=0.004, **other_keys)) as other:
        monkeypatch.setenv("KLING_API_BASE_URL", other.base_url)
        monkeypatch.setenv("KLING_ACCESS_KEY", other_keys["access_key"])
        monkeypatch.setenv("KLING_SECRET_KEY", other_keys["secret_key"])
        # Same PREFECT_HOME (this session's cache), same destination: refused before any request.
        refused = cli(*args, "--dest", first_dest)
        assert refused.exit_code == 2 and "written for account" in one_line(refused), refused.output
        assert other.stats()["requests"] == {}
        # Another destination: this account pays for its own tasks and stores its own video.
        second = cli(*args, "--dest", tmp_path / "second")
        assert second.exit_code == 0, second.output
        manifest = json.loads((tmp_path / "second" / job_id / "manifest.json").read_text())
        stats = other.stats()
        assert stats["tasks_created"] == {step["external_task_id"]: 1 for step in manifest["steps"]}
        final = (tmp_path / "second" / job_id / "final.mp4").read_bytes()
        assert hashlib.sha256(final).hexdigest() == served_sha256(other, manifest["steps"][-1]["task_id"])


@pytest.mark.parametrize("job_id", [None, "append"])
def test_appending_an_extension_pays_for_the_new_step_only(kling_env: dict[str, str], emulator: Any,
                                                           tmp_path: Path, job_id: str | None) -> None:
    prompt = f"a paper plane, {uuid.uuid4().hex[:6]}"  # derived jobs share the kp namespace: a fresh spec
    named = ["--job-id", new_id(job_id)] if job_id else []
    base = ["run", "--prompt", prompt, "--extend", "it loops", *named, "--dest", tmp_path / "out"]
    assert cli(*base).exit_code == 0
    before = emulator.stats()
    longer = cli(*base, "--extend", "it lands")
    assert longer.exit_code == 0, longer.output
    after = emulator.stats()
    assert posts(emulator) - sum(c for n, c in before["requests"].items() if n.startswith("POST")) == 1
    new = {ext for ext in after["tasks_created"] if ext not in before["tasks_created"]}
    assert len(new) == 1 and all(count == 1 for count in after["tasks_created"].values())
    assert all(count == 1 for count in after["create_attempts"].values())


def test_a_relative_destination_from_another_folder_and_a_deleted_object_are_stored_again(
        kling_env: dict[str, str], emulator: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    job_id = new_id("relative")
    args = ["run", "--prompt", "a harbour at dawn", "--extend", "boats leave", "--job-id", job_id, "--dest", "./out"]
    for folder in ("a", "b"):
        (tmp_path / folder).mkdir()
        monkeypatch.chdir(tmp_path / folder)
        result = cli(*args)
        assert result.exit_code == 0, result.output
        assert result.stdout.strip().splitlines()[-1] == str(tmp_path / folder / "out" / job_id / "final.mp4")
    assert all(count == 1 for count in emulator.stats()["create_attempts"].values()), "folder b paid nothing"
    job_dir = tmp_path / "b" / "out" / job_id
    manifest = json.loads((job_dir / "manifest.json").read_text())
    for step in manifest["steps"]:
        assert hashlib.sha256((job_dir / f"step-{step['index']:02d}.mp4").read_bytes()).hexdigest() == step["sha256"]

    (job_dir / "step-00.mp4").unlink()
    assert cli(*args).exit_code == 0
    assert hashlib.sha256((job_dir / "step-00.mp4").read_bytes()).hexdigest() == manifest["steps"][0]["sha256"]


def test_an_unknown_queued_status_word_is_waited_out(kling_env: dict[str, str], tmp_path: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    """`queueing` for ~1 s per step (longer than the client's first GET backoff): one task per step, whole video."""
    from kling_emulator import EmulatorConfig, start_emulator

    config = EmulatorConfig(access_key=kling_env["KLING_ACCESS_KEY"], secret_key=kling_env["KLING_SECRET_KEY"],
                            time_scale=0.04, queued_status_word="queueing")
    with start_emulator(config) as slow:
        monkeypatch.setenv("KLING_API_BASE_URL", slow.base_url)
        job_id = new_id("queueing")
        result = cli("run", "--prompt", "snow on a pine", "--extend", "wind", "--job-id", job_id, "--dest",
                     tmp_path / "out")
        assert result.exit_code == 0, result.output
        stats = slow.stats()
    assert len(stats["tasks_created"]) == 2 and set(stats["tasks_created"].values()) == {1}
    assert set(stats["create_attempts"].values()) == {1}
    manifest = json.loads((tmp_path / "out" / job_id / "manifest.json").read_text())
    assert [step["status"] for step in manifest["steps"]] == ["stored", "stored"]


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("behaviour", "lookup"),
    [
        ({"lookup_query": "empty", "lookup_path": "off"}, "auto"),
        ({"lookup_query": "ignored", "lookup_path": "off"}, "auto"),
        ({"lookup_query": "empty", "lookup_path": "on"}, "query"),
        ({}, "off"),
    ],
    ids=["query-empty+path-404", "query-ignored+path-404", "query-only-empty", "lookup-off"],
)
async def test_weak_lookups_duplicate_ids_and_dropped_answers_never_pay_twice(
        kling_env: dict[str, str], emulator: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        behaviour: dict[str, str], lookup: str) -> None:
    """Every create is committed and its answer dropped, on a provider that accepts duplicate external ids
    and whose lookup forms find nothing: the list finds each task, and each is paid for once."""
    from flows.video import produce_video

    monkeypatch.setenv("KLING_EXTERNAL_ID_LOOKUP", lookup)
    emulator.set_behaviour(unique_external_ids=False, **behaviour)
    emulator.set_faults({"rules": [{"match": "create:*", "kind": "drop_after_commit"}]})
    job = VideoJob(generate=GenerationSpec(prompt="a kite over dunes"), dest=str(tmp_path / "out"),
                   extensions=[ExtensionSpec(prompt="it climbs"), ExtensionSpec(prompt="it dives")],
                   job_id=new_id("weak"))
    uri = await produce_video(job)
    stats = emulator.stats()
    planned = [step.external_task_id for step in plan_job(job).steps]
    assert stats["create_attempts"] == {ext: 1 for ext in planned}, "one POST per step"
    assert stats["tasks_created"] == {ext: 1 for ext in planned}, "one task per step, none outside the plan"
    last = json.loads((Path(uri).parent / "manifest.json").read_text())["steps"][-1]
    assert hashlib.sha256(Path(uri).read_bytes()).hexdigest() == served_sha256(emulator, last["task_id"])


def test_bad_settings_and_an_oversized_image_are_one_line_before_any_request(
        kling_env: dict[str, str], emulator: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    big = tmp_path / "big.png"
    big.write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(11 * 1024 * 1024))
    for command in (["run", "--prompt", "x", "--image", big], ["estimate", "--prompt", "x", "--image", big]):
        result = cli(*command, "--dest", tmp_path / "out")
        assert result.exit_code == 2, result.output
        assert "at most 10 MB" in one_line(result)
    monkeypatch.setenv("KLING_PROVIDER", "Kling")
    for command in (["run", "--prompt", "x"], ["estimate", "--prompt", "x"]):
        result = cli(*command, "--dest", tmp_path / "out")
        assert result.exit_code == 2, result.output
        assert "KLING_PROVIDER='Kling'" in one_line(result) and "'kling' or 'cometapi'" in one_line(result)
    assert emulator.stats()["requests"] == {}
