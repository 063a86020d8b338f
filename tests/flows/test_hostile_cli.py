"""Hostile CLI arguments through the real entry point, in process (typer's CliRunner), against a live emulator:
every refused plan exits 2 with one line naming the defect, and the emulator never sees a request.

A handful of hypothesis cases per command (the bulk of the hostile-input cases runs below the CLI, in
tests/kling_tasks/test_hostile_input.py); `HYPOTHESIS_PROFILE=full` runs ten times more.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import example, given, settings
from hypothesis import strategies as st
from typer.testing import CliRunner

from flows.cli import app
from kling_tasks.jobs import plan_job
from tests.hostile_strategies import Broken, broken_jobs, examples, invalid_job_ids, one_clear_line, valid_jobs

AK, SK = "hostile-cli-ak-0123456789", "hostile-cli-sk-abcdefghijklmnop-0123456789"
# The defects a command line can express (extra fields and non-string types are the jobs file's business).
CLI_DEFECTS = {"prompt-empty", "prompt-long", "negative-long", "mode", "duration", "aspect", "model",
               "not-extendable", "too-many-extensions", "cfg", "job-id", "take", "max-credits", "budget",
               "image-missing", "image-suffix"}
FOLDER = itertools.count()


@pytest.fixture(scope="module")
def emulator() -> Iterator[Any]:
    from kling_emulator import EmulatorConfig, start_emulator

    with start_emulator(EmulatorConfig(access_key=AK, secret_key=SK, time_scale=0.004)) as handle, \
            pytest.MonkeyPatch.context() as env:
        for name, value in {"KLING_PROVIDER": "kling", "KLING_API_BASE_URL": handle.base_url,
                            "KLING_ACCESS_KEY": AK, "KLING_SECRET_KEY": SK, "KLING_ALLOW_PRIVATE_URLS": "1"}.items():
            env.setenv(name, value)
        env.delenv("COMETAPI_KEY", raising=False)
        yield handle


def no_request_seen(emulator: Any, what: object = "") -> None:
    """The counters are cumulative: a request seen is reported with the case that sent it, and cleared."""
    stats = emulator.stats()
    seen = {k: v for k, v in {**stats["requests"], **stats["create_attempts"]}.items() if v}
    if seen:
        emulator.reset()
    assert seen == {}, f"requests after {what}"


def cli(*args: str) -> Any:
    return CliRunner().invoke(app, list(args))


def refused(result: Any, words: list[str], defect: str, after_table: bool = False) -> None:
    """Exit 2 and one line (`estimate` prints its table first); a value typer itself cannot parse
    (`--take x`) is its usage error, also exit 2."""
    assert result.exit_code == 2, f"{defect}: exit {result.exit_code}: {result.output!r}"
    if "Invalid value" in result.stderr or "Missing option" in result.stderr:
        return
    line = result.stderr.strip().splitlines()[-1] if after_table else result.stderr.strip()
    assert line.startswith("error: "), f"{defect}: {result.stderr!r}"
    one_clear_line(line, words, defect)


def as_options(job: dict[str, Any], dest: Path) -> list[str]:
    gen = job["generate"]
    names = {"prompt": "--prompt", "negative_prompt": "--negative-prompt", "image": "--image", "model_name":
             "--model", "mode": "--mode", "duration": "--duration", "aspect_ratio": "--aspect-ratio",
             "cfg_scale": "--cfg-scale"}
    # `=`: a value may start with a dash. A missing value (None) is a missing option.
    args = [f"{names[key]}={value}" for key, value in gen.items() if value is not None]
    args += [f"--extend={ext['prompt']}" for ext in job["extensions"]]
    args += [f"--{key.replace('_', '-')}={job[key]}" for key in ("job_id", "take", "max_credits", "continuation")
             if key in job]
    return [*args, f"--dest={dest}"]


# The generation field each defect breaks: a None there is an option left out on the command line, which the CLI
# fills with its default (a valid plan), so such a case has no command-line form.
_DEFECT_FIELD = {"mode": "mode", "duration": "duration", "aspect": "aspect_ratio", "model": "model_name",
                 "cfg": "cfg_scale"}


def _expressible(broken: Broken) -> bool:
    values = [*broken.job["generate"].values(), *(broken.job.get(k) for k in ("take", "max_credits", "job_id"))]
    field = _DEFECT_FIELD.get(broken.defect)
    if field is not None and broken.job["generate"].get(field) is None:
        return False
    return broken.defect in CLI_DEFECTS and all(
        v is None or (isinstance(v, str) and "\x00" not in v) or (isinstance(v, int | float) and not isinstance(
            v, bool) and not (isinstance(v, float) and math.isinf(v))) for v in values)


@settings(max_examples=examples(12))
@given(broken_jobs().filter(_expressible), st.sampled_from(["run", "estimate"]))
@example(Broken({"generate": {"prompt": "a kite"}, "extensions": [], "max_credits": 0.0625}, "budget",
                ["max_credits"]), "estimate")
def test_run_and_estimate_refuse_a_broken_plan_in_one_line_and_send_nothing(
        emulator: Any, tmp_path: Path, broken: Broken, command: str) -> None:
    args = [command, *as_options(broken.job, tmp_path / f"out-{next(FOLDER)}")]
    result = cli(*args)
    no_request_seen(emulator, args)
    refused(result, broken.words, f"{broken.defect} {args}",
            after_table=command == "estimate" and broken.defect == "budget")


@settings(max_examples=examples(6))
@given(invalid_job_ids)
@example("../../etc")
@example("other-job/manifest")
def test_status_and_batch_id_refuse_names_that_leave_their_folder(emulator: Any, tmp_path: Path,
                                                                   name: str) -> None:
    jobs_file = tmp_path / "jobs.yaml"
    jobs_file.write_text(yaml.safe_dump({"jobs": [{"prompt": "a kite"}]}))
    refused(cli("status", name, f"--dest={tmp_path}"), ["job id"], "status")
    refused(cli("batch", str(jobs_file), f"--batch-id={name}", f"--dest={tmp_path}"), ["--batch-id"], "batch id")
    assert not (tmp_path / "other-job").exists() and list(tmp_path.glob("*.json")) == []
    no_request_seen(emulator)


@settings(max_examples=examples(4))
@given(valid_jobs(), st.sampled_from([("--adopt", "kp-s0-0000000000000000=123", "not an external_task_id"),
                                      ("--assume-not-created", "typo-s0-1", "not an external_task_id"),
                                      ("--adopt", "{ext}=../../v1/account", "a task id is"),
                                      ("--adopt", "{ext}=123?x=1", "a task id is"),
                                      ("--adopt", "{ext}", "expected EXTERNAL_ID=TASK_ID")]))
def test_settling_options_are_checked_against_the_plan(emulator: Any, tmp_path: Path, job: dict[str, Any],
                                                       option: tuple[str, str, str]) -> None:
    from kling_tasks.jobs import VideoJob

    name, value, words = option
    first = plan_job(VideoJob.model_validate(job)).steps[0].external_task_id
    dest = tmp_path / f"out-{next(FOLDER)}"
    result = cli("run", *as_options(job, dest), f"{name}={value.format(ext=first)}")
    refused(result, [words], name)
    no_request_seen(emulator)


@pytest.mark.parametrize("document", [
    {"jobs": [{"prompt": "a"}, {"prompt": "a"}]},  # the same derived job id twice
    {"jobs": [{"prompt": "ok"}, {"prompt": "x", "job_id": "../escape"}]},
    {"jobs": [{"prompt": "x", "mode": "pro"}]},  # mode belongs under generate
    {"defaults": {"extend": ["more"] * 40}, "jobs": [{"prompt": "too long"}]},
    {"jobs": [{"prompt": "line\nbreak", "job_id": "fine", "max_credits": 0.5}]},
])
def test_batch_refuses_a_hostile_jobs_file_in_one_line(emulator: Any, tmp_path: Path,
                                                       document: dict[str, Any]) -> None:
    jobs_file = tmp_path / "jobs.yaml"
    jobs_file.write_text(yaml.safe_dump(document, allow_unicode=True))
    refused(cli("batch", str(jobs_file), f"--dest={tmp_path}"), [str(jobs_file)], "jobs file")
    no_request_seen(emulator)
