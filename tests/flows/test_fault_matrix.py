"""The fault matrix: every fault kind the emulator injects, at every stage of a step, for both providers.

Each case runs `produce_video` end to end on a 1 + 2 job (the emulator, moto's S3 server or a local folder, the
session's Prefect server) with the fault aimed at the first extension's step:

* submit: its create POST (or, for read faults, the lookups that come before it);
* wait: its polls while the task is `submitted`/`processing` (`task_status` rules);
* store: its store's fresh-URL read of the succeeded task (the second read of a finished extension: the first
  is the wait's last poll) or its download.

Expected: a transient fault -> the job completes; a fatal one -> it stops with one line naming the step (and the
Kling code, when Kling gave one), and once the cause is gone a rerun completes. Always: no external id with two
tasks (the emulator accepts duplicate ids here, like a proxy pooling accounts, so a resent create would show as
a second task), every stored step the emulator's file byte for byte, nothing half-written, a manifest
consistent with what is stored. The fault must really have fired (from the emulator's `faults_fired`).

`KLING_MATRIX=full` runs all cases (docs/reliability.md has the figures); the default run takes a seeded few.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import anyio
import boto3
import httpx
import pytest

from flows.video import produce_video
from kling_tasks.api.auth import auth_from_settings
from kling_tasks.api.lookup import TaskFinder
from kling_tasks.jobs import VideoJob, plan_job
from kling_tasks.settings import load_settings
from tests.flows.conftest import EMULATOR_AK, EMULATOR_API_KEY, EMULATOR_SK
from tests.flows.matrix_support import (
    BUCKET,
    FULL,
    SEED,
    Served,
    assert_consistent,
    assert_finished_whole,
    aws_env,
    duplicates,
    job_tasks,
    moto_server,
    new_job_id,
    pick,
    planned_ids,
    record,
    video_job,
)

pytestmark = [pytest.mark.anyio, pytest.mark.usefixtures("prefect_server")]

Stage = Literal["submit", "wait", "store"]
Provider = Literal["kling", "cometapi"]
STAGES: tuple[Stage, ...] = ("submit", "wait", "store")
PROVIDERS: tuple[Provider, ...] = ("kling", "cometapi")
TARGET = "video-extend"  # the faults hit the first extension (the CometAPI extend body is its own)
READ_TIMEOUT = 1.0  # KLING_READ_TIMEOUT of the slow-answer cases; the slow answer takes longer
RUNNING = ["submitted", "processing"]
PRESENT = ["submitted", "processing", "succeed", "failed"]
LOOKUPS_OFF = {"lookup_query": "empty", "lookup_path": "off"}


def nth(skip: int, *faults: dict[str, Any]) -> list[dict[str, Any]]:
    """Rules firing on consecutive concerned requests, after `skip` of them: the i-th fault on request skip+i.

    Rules are tried in order and stop at the first that fires, so every rule sees the `skip` requests before
    it, then only its own: a sequence of `skip` falses and one true each.
    """
    return [{**fault, "sequence": [False] * skip + [True]} for fault in faults]


def http_error(code: int) -> dict[str, Any]:
    return {"kind": "http_error", "params": {"code": code}}


def on_reads(stage: Stage, *faults: dict[str, Any]) -> list[dict[str, Any]]:
    """Read faults of a stage: the lookups before the create, the polls, or the store's read of the task."""
    if stage == "submit":  # the query-form lookup and the list scan are both list requests
        return nth(0, *({"match": f"list:{TARGET}", **f} for f in faults))
    if stage == "wait":
        # The burst starts on a poll of the running task; the client's retries (1 s, 2 s, ... apart) may reach
        # it finished, and still belong to the burst: any read of a task that exists, after the first.
        first, *rest = faults
        return nth(0, {"match": f"get:{TARGET}", "task_status": RUNNING, **first},
                   *({"match": f"get:{TARGET}", "task_status": PRESENT, **f} for f in rest))
    return nth(1, *({"match": f"get:{TARGET}", "task_status": ["succeed"], **f} for f in faults))


def on_create(*faults: dict[str, Any]) -> list[dict[str, Any]]:
    return nth(0, *({"match": f"create:{TARGET}", **f} for f in faults))


def on_download(*faults: dict[str, Any]) -> list[dict[str, Any]]:
    return nth(1, *({"match": "download", **f} for f in faults))  # the second download: the extension's


def at_every_stage(*faults: dict[str, Any]) -> dict[Stage, list[dict[str, Any]]]:
    """The same fault on the create, on the polls and on the store's read."""
    return {"submit": on_create(*faults), "wait": on_reads("wait", *faults), "store": on_reads("store", *faults)}


@dataclass(frozen=True)
class Fault:
    """One fault kind: its rules per stage (a stage it cannot happen at is absent, with the reason)."""

    name: str
    rules: dict[Stage, list[dict[str, Any]]]
    fatal: bool = False
    code: int | None = None  # the Kling code a fatal stop names
    behaviour: dict[str, Any] = field(default_factory=dict)  # switches for the whole case
    env: dict[str, str] = field(default_factory=dict)
    not_at: dict[Stage, str] = field(default_factory=dict)  # stage -> why the fault cannot happen there
    rerun: dict[str, Any] = field(default_factory=dict)  # produce_video options of the rerun after a stop


DROP = {"kind": "drop_before"}
SLOW = {"kind": "slow", "params": {"seconds": READ_TIMEOUT + 1.0}}
POLL_ERRORS = ({"kind": "drop_before"}, http_error(5001), http_error(5000))  # a burst of three failed reads
NO_DOWNLOAD = "no download happens at this stage"
ONLY_CREATES = "only a create can be committed"

FAULTS: tuple[Fault, ...] = (
    Fault("1302", at_every_stage(http_error(1302), http_error(1302))),
    Fault("1303", at_every_stage(http_error(1303), http_error(1303))),
    Fault("5000", at_every_stage(http_error(5000))),
    Fault("5001", at_every_stage(http_error(5001))),
    Fault("5002", at_every_stage(http_error(5002))),
    Fault("drop_before", {"submit": on_create(DROP), "wait": on_reads("wait", DROP), "store": on_download(DROP)}),
    Fault("drop_after_commit", {"submit": on_create({"kind": "drop_after_commit"})},
          not_at={"wait": ONLY_CREATES, "store": ONLY_CREATES}),
    Fault("slow_past_read_timeout", at_every_stage(SLOW), env={"KLING_READ_TIMEOUT": str(READ_TIMEOUT)}),
    Fault("poll_errors", {stage: on_reads(stage, *POLL_ERRORS) for stage in STAGES}),
    Fault("truncated_download", {"store": on_download({"kind": "download_cut"})},
          not_at={"submit": NO_DOWNLOAD, "wait": NO_DOWNLOAD}),
    Fault("expired_url", {"store": on_download({"kind": "url_expired"})},
          not_at={"submit": NO_DOWNLOAD, "wait": NO_DOWNLOAD}),
    Fault("task_fail", {"submit": on_create({"kind": "task_fail",
                                             "params": {"message": "Failure to pass the risk control system"}})},
          fatal=True, not_at={"wait": "a task's failure is decided at its create",
                              "store": "a task's failure is decided at its create"},
          rerun={"resubmit_failed": True}),
    Fault("1102", {"submit": on_create({"kind": "pack_exhausted"}), "wait": on_reads("wait", http_error(1102)),
                   "store": on_reads("store", http_error(1102))}, fatal=True, code=1102),
    Fault("unknown_status_word", {"wait": []}, behaviour={"queued_status_word": "queueing"},
          not_at={"submit": "the word is a behaviour of every answer: one case covers submit and wait",
                  "store": "a finished task is never `submitted`"}),
    # Both lookup forms switched off at the provider: a lost create answer is found by the list scan, and
    # nothing else at the later stages depends on a lookup.
    Fault("lookups_off", {"submit": on_create({"kind": "drop_after_commit"}), "wait": on_reads("wait", DROP),
                          "store": on_download({"kind": "download_cut"})}, behaviour=LOOKUPS_OFF),
    # ... and a create lost before it was handled: nothing can prove that no task exists, so the run stops
    # and names the external id (DESIGN 2.3); `--assume-not-created` pays for it.
    Fault("lookups_off_lost_create", {"submit": on_create(DROP)}, fatal=True, behaviour=LOOKUPS_OFF,
          not_at={"wait": ONLY_CREATES, "store": ONLY_CREATES}),
)


@dataclass(frozen=True)
class Case:
    fault: Fault
    stage: Stage
    provider: Provider
    sink: Literal["s3", "local"]

    @property
    def id(self) -> str:
        return f"{self.fault.name}-{self.stage}-{self.provider}-{self.sink}"


def all_cases() -> list[Case]:
    cells = [(fault, stage, provider) for fault in FAULTS for stage in STAGES if stage in fault.rules
             for provider in PROVIDERS]
    return [Case(fault, stage, provider, "s3" if i % 2 == 0 else "local")
            for i, (fault, stage, provider) in enumerate(cells)]


CASES = all_cases()
# The default run: one seeded transient case; the fatal outcome (and its rerun) is the CLI case below. All in full.
QUICK = CASES if FULL else pick([c for c in CASES if not c.fault.fatal], 1, "fault-matrix")


def test_every_fault_kind_is_placed_at_every_stage() -> None:
    """A stage a fault is not tried at says why; nothing is left out silently."""
    for fault in FAULTS:
        for stage in STAGES:
            assert (stage in fault.rules) != (stage in fault.not_at), f"{fault.name} at {stage}"


# ---- fixtures: one emulator per provider and one moto server for the module -----------------------------------


@pytest.fixture(scope="module")
def emulators() -> Iterator[dict[str, Any]]:
    from kling_emulator import EmulatorConfig, start_emulator

    common = {"access_key": EMULATOR_AK, "secret_key": EMULATOR_SK, "api_key": EMULATOR_API_KEY,
              "time_scale": 0.002, "unique_external_ids": False}
    with contextlib.ExitStack() as stack:
        yield {provider: stack.enter_context(start_emulator(EmulatorConfig(provider=provider, **common)))
               for provider in PROVIDERS}


@pytest.fixture(scope="module")
def moto_s3() -> Iterator[str]:
    with moto_server() as endpoint:
        yield endpoint


@pytest.fixture
def case_env(emulators: dict[str, Any], moto_s3: str, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Any:
    """Points this process at one provider's emulator (a fresh process: no lookup proofs, no known tasks)."""
    for name in [n for n in os.environ if n.startswith("AWS_")]:
        monkeypatch.delenv(name)
    for name, value in aws_env(moto_s3, tmp_path / "no-aws").items():
        monkeypatch.setenv(name, value)
    with contextlib.suppress(Exception):
        boto3.client("s3").create_bucket(Bucket=BUCKET)

    def point_at(provider: Provider, extra: dict[str, str]) -> Any:
        emulator = emulators[provider]
        env = {"KLING_PROVIDER": provider, "KLING_API_BASE_URL": emulator.base_url, "KLING_ALLOW_PRIVATE_URLS": "1",
               "KLING_POLL_MIN_SECONDS": "0.05", "KLING_POLL_MAX_SECONDS": "0.3", **extra}
        for name in ("KLING_ACCESS_KEY", "KLING_SECRET_KEY", "COMETAPI_KEY", "KLING_READ_TIMEOUT"):
            monkeypatch.delenv(name, raising=False)
        if provider == "cometapi":
            env["COMETAPI_KEY"] = EMULATOR_API_KEY
        else:
            env.update({"KLING_ACCESS_KEY": EMULATOR_AK, "KLING_SECRET_KEY": EMULATOR_SK})
        for name, value in env.items():
            monkeypatch.setenv(name, value)
        TaskFinder.forget_all()
        return emulator

    yield point_at
    TaskFinder.forget_all()
    for emulator in emulators.values():
        emulator.set_faults(None)
        emulator.set_behaviour(**{"lookup_query": "filter", "lookup_path": "on", "queued_status_word": None})


def earlier_task(emulator: Any) -> None:
    """An account in use has tasks, and a lookup form is proven against a task that exists (DESIGN 2.3)."""
    auth = auth_from_settings(load_settings())
    prefix = "/kling" if emulator.config.provider == "cometapi" else ""
    answer = httpx.post(f"{emulator.base_url}{prefix}/v1/videos/text2video", timeout=30,
                        headers={"Authorization": auth.authorization()},
                        json={"prompt": "an earlier video", "model_name": "kling-v1", "duration": "5",
                              "external_task_id": new_job_id("earlier")})
    assert answer.status_code == 200, answer.text


PROMPT = "a heron wading at dawn"
EXTENSIONS = ("the heron takes off", "it crosses the lake")


def make_job(dest: str, job_id: str) -> VideoJob:
    return video_job(dest, job_id, PROMPT, EXTENSIONS)


@pytest.mark.parametrize("case", QUICK, ids=lambda case: case.id)
async def test_fault_matrix(case: Case, case_env: Any, tmp_path: Path) -> None:
    fault, stage = case.fault, case.stage
    emulator = case_env(case.provider, fault.env)
    if not emulator.stats()["tasks"]:
        earlier_task(emulator)
    dest = f"s3://{BUCKET}/faults" if case.sink == "s3" else str(tmp_path / "out")
    job = make_job(dest, new_job_id(f"fm-{fault.name.replace('_', '-')}"))
    job_id = job.effective_job_id()
    steps = plan_job(job).steps
    ids = [step.external_task_id for step in steps]
    where = f"case {case.id} (seed {SEED})"
    if fault.behaviour:
        emulator.set_behaviour(**fault.behaviour)
    emulator.set_faults({"rules": fault.rules[stage]})
    fired_before = sum(emulator.stats()["faults_fired"].values())
    served = Served(emulator)

    error: BaseException | None = None
    try:
        await produce_video(job)
    except Exception as exc:  # the expected outcome decides below
        error = exc
    stats = emulator.stats()
    fired = sum(stats["faults_fired"].values()) - fired_before
    expected_fired = max(1, len(fault.rules[stage]))
    if fault.rules[stage]:
        assert fired >= expected_fired, f"{where}: the fault fired {fired} time(s), not {expected_fired}"
    else:  # a behaviour, not a rule: the provider really answered with the unknown word
        assert any(t["status"] == "succeed" for t in stats["tasks"].values())
    assert duplicates(stats, job.namespace()) == {}, f"{where}: an external id with two tasks"
    assert all(len(tasks) <= 1 for tasks in job_tasks(stats, set(ids)).values()), where

    def done(outcome: str, stop: str | None = None) -> None:
        stats = emulator.stats()
        record("fault", case=case.id, fault=fault.name, stage=stage, provider=case.provider, sink=case.sink,
               outcome=outcome, fired=fired, stop=stop, duplicates=len(duplicates(stats, job.namespace())),
               posts=sum(n for ext, n in stats["create_attempts"].items() if ext.startswith(job.namespace())),
               tasks=sum(n for ext, n in stats["tasks_created"].items() if ext.startswith(job.namespace())))

    if not fault.fatal:
        assert error is None, f"{where}: a transient fault stopped the job: {error!r}"
        assert_finished_whole(emulator, dest, job_id, ids, served)
        done("completed")
        return

    assert error is not None, f"{where}: a fatal fault did not stop the job"
    message = str(error)
    assert "\n" not in message.strip(), f"{where}: the stop is one line: {message!r}"
    assert steps[1].name in message, f"{where}: the stop names the step ({steps[1].name}): {message!r}"
    if fault.code is not None:
        assert str(fault.code) in message, f"{where}: the stop names Kling's code {fault.code}: {message!r}"
    if fault.name == "lookups_off_lost_create":
        assert ids[1] in message and "--assume-not-created" in message, message
    manifest = assert_consistent(emulator, dest, job_id, served)
    assert manifest is not None and manifest["status"] == "failed", f"{where}: the ledger records the stop"

    # The cause goes away; the same job again completes, paying for nothing twice.
    emulator.set_faults(None)
    emulator.set_behaviour(lookup_query="filter", lookup_path="on")
    TaskFinder.forget_all()
    options = dict(fault.rerun)
    if fault.name == "lookups_off_lost_create":  # the user checked the console: nothing was created
        options["assume_not_created"] = [ids[1]]
    await produce_video(job, **options)
    stats = emulator.stats()
    assert duplicates(stats, job.namespace()) == {}, f"{where}: the rerun paid twice"
    manifest = manifest_of_rerun(emulator, dest, job_id, served)
    assert_finished_whole(emulator, dest, job_id, [s["external_task_id"] for s in manifest["steps"]], served)
    done("stopped, rerun completed", message[:160])


def manifest_of_rerun(emulator: Any, dest: str, job_id: str, served: Served) -> dict[str, Any]:
    manifest = assert_consistent(emulator, dest, job_id, served)
    assert manifest is not None
    return manifest


def test_a_fatal_stop_is_one_line_of_the_cli_naming_the_step_and_the_code(case_env: Any, tmp_path: Path) -> None:
    """What the user sees: `kling-pipeline run` stopped by a 1102 while polling the first extension; then the
    same command again completes."""
    from typer.testing import CliRunner

    from flows.cli import app

    emulator = case_env("kling", {})
    emulator.set_faults({"rules": on_reads("wait", http_error(1102))})
    job_id = new_job_id("fm-cli")
    dest = str(tmp_path / "out")
    command = ["run", "--prompt", PROMPT, "--extend", EXTENSIONS[0], "--dest", dest, "--job-id", job_id]
    result = CliRunner().invoke(app, command)
    assert result.exit_code == 1, result.output
    errors = [line for line in result.output.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and "Traceback" not in result.output, result.output
    assert errors[0].startswith("error: extend-1-of-1: ") and "code=1102" in errors[0], errors[0]
    assert errors[0] == result.output.strip().splitlines()[-1], "the stop is the last line"

    emulator.set_faults(None)  # the pack is topped up: the same command completes, paying for nothing twice
    rerun = CliRunner().invoke(app, command)
    assert rerun.exit_code == 0, rerun.output
    assert_finished_whole(emulator, dest, job_id, planned_ids(dest, job_id, PROMPT, EXTENSIONS[:1]))


@pytest.mark.skipif(not FULL, reason="full matrix only (KLING_MATRIX=full): timing-bound; the settle rule is "
                                      "unit-tested in tests/kling_tasks/api (test_retry_table, test_submit)")
async def test_a_create_still_in_flight_at_the_lookup_is_not_paid_twice(case_env: Any, tmp_path: Path) -> None:
    """The create outlasts the read timeout (1 s) and the client's first backoff (1-1.25 s): its lookup comes
    while the server still holds the request, and a proven form truthfully says "not found"."""
    emulator = case_env("cometapi", {"KLING_READ_TIMEOUT": str(READ_TIMEOUT)})
    if not emulator.stats()["tasks"]:
        earlier_task(emulator)
    emulator.set_faults({"rules": on_create({"kind": "slow", "params": {"seconds": READ_TIMEOUT + 2.5}})})
    job = make_job(str(tmp_path / "out"), new_job_id("fm-in-flight"))
    await produce_video(job)
    await anyio.sleep(READ_TIMEOUT + 2.5)  # the held create has committed by now
    assert duplicates(emulator.stats(), job.namespace()) == {}, "the held create and its resend: two tasks"
