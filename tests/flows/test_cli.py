"""The CLI refuses bad plans with one clear line and sends nothing to Kling."""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from flows.cli import app

runner = CliRunner()


def run_cli(*args: str) -> Any:
    return runner.invoke(app, list(args))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--model", "kling-v2-master", "--extend", "more", "--continuation", "extend"], "cannot be extended"),
        (["--extend", "more", "--continuation", "sideways"], "continuation: Input should be"),
        (["--extend", "x"] * 40, "40 extensions may reach 205 s"),
        (["--prompt", "p" * 3000], "at most 2500 characters"),
        (["--max-credits", "2", "--extend", "a", "--extend", "b"], "over max_credits 2"),
        (["--duration", "7"], "duration"),
        (["--image", "picture.gif"], ".jpg, .jpeg or .png"),
    ],
)
def test_bad_plans_are_refused_before_any_request(
    args: list[str], message: str, kling_env: dict[str, str], emulator: Any, tmp_path: Path
) -> None:
    if "--prompt" not in args:
        args = ["--prompt", "a quiet lake", *args]
    result = run_cli("run", *args, "--dest", str(tmp_path / "out"))
    assert result.exit_code == 2, result.output
    assert message in result.output
    assert len(result.output.strip().splitlines()) == 1, "the error is one line"
    assert emulator.stats()["requests"] == {}


def test_missing_credentials_are_refused(monkeypatch: pytest.MonkeyPatch, kling_env: dict[str, str],
                                         emulator: Any, tmp_path: Path) -> None:
    monkeypatch.delenv("KLING_SECRET_KEY")
    result = run_cli("run", "--prompt", "a quiet lake", "--dest", str(tmp_path / "out"))
    assert result.exit_code == 2
    assert "KLING_SECRET_KEY" in result.output
    assert emulator.stats()["requests"] == {}


def test_estimate_prices_the_plan_without_requests(kling_env: dict[str, str], emulator: Any) -> None:
    result = run_cli("estimate", "--prompt", "a quiet lake", "--mode", "pro", "--extend", "a", "--extend", "b")
    assert result.exit_code == 0, result.output
    assert result.output.strip().splitlines()[-1] == "10.5"  # pro kling-v1: 3.5 + 2 x 3.5
    assert emulator.stats()["requests"] == {}


@pytest.mark.usefixtures("prefect_server")
def test_run_prints_the_uri_last_and_status_reads_the_manifest(kling_env: dict[str, str], emulator: Any,
                                                               tmp_path: Path) -> None:
    dest = str(tmp_path / "out")
    job_id = f"lake-{uuid.uuid4().hex[:8]}"  # the session shares one Prefect cache: never reuse a job id
    result = run_cli("run", "--prompt", "a quiet lake", "--extend", "ripples", "--dest", dest, "--job-id", job_id)
    assert result.exit_code == 0, result.output
    final = tmp_path / "out" / job_id / "final.mp4"
    assert result.stdout.strip().splitlines()[-1] == str(final.resolve())
    assert final.is_file()

    status = run_cli("status", job_id, "--dest", dest)
    assert status.exit_code == 0, status.output
    assert "extend-1-of-1" in status.stdout and "stored" in status.stdout
    assert status.stdout.strip().splitlines()[-1] == str(final.resolve())



@pytest.mark.parametrize("command", [["run", "--prompt", "a quiet lake"], ["status", "lake"]])
def test_an_unusable_destination_is_one_clear_line(command: list[str], kling_env: dict[str, str],
                                                   emulator: Any) -> None:
    result = run_cli(*command, "--dest", "gs://bucket/x")
    assert result.exit_code == 2, result.output
    (line,) = result.output.strip().splitlines()
    assert line.startswith("error: ")
    assert line.endswith("unsupported destination 'gs://bucket/x': use s3://bucket/prefix or a folder path")
    assert emulator.stats()["requests"] == {}
