"""Hostile input, property-based (hypothesis): the job spec, the jobs file and preflight.

* every plan with a defect is refused in one line that names the defect, before any request: preflight runs
  against a live emulator whose request counters stay at zero;
* prompts with quotes, newlines, unicode and path-like text never reach a storage key, a file name or a
  cache key; job ids that try to leave the destination are refused;
* a jobs file, whatever its bytes, loads or is refused in one line (never a traceback).

Case counts: `examples(n)` (tests/hostile_strategies.py); `HYPOTHESIS_PROFILE=full` runs ten times more.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from hypothesis import example, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from flows.cli import describe
from kling_tasks.identity import account_fingerprint, submit_key
from kling_tasks.jobs import GenerationSpec, PlanError, VideoJob, check_budget, check_folder_id, plan_job
from kling_tasks.jobs_file import MAX_REPORTED, JobsFileError, load_jobs
from kling_tasks.kling_requests import check_requests
from kling_tasks.manifest import final_key, manifest_key, replaced_manifest_key, step_key
from kling_tasks.observability.contact_sheet import contact_sheet_key
from kling_tasks.preflight import prepare
from kling_tasks.settings import KlingSettings
from kling_tasks.storage import LocalSink
from tests.hostile_strategies import (
    Broken,
    broken_jobs,
    examples,
    hostile_text,
    invalid_job_ids,
    one_clear_line,
    valid_job_ids,
    valid_jobs,
)

AK, SK = "hostile-ak-0123456789", "hostile-sk-abcdefghijklmnop-0123456789"
SAFE_KEY = re.compile(r"[a-z0-9][a-z0-9-]{0,39}/(step-\d{2}\.mp4|final\.mp4|manifest\.json|contact-sheet\.jpg|"
                      r"manifest\.replaced-\d{8}T\d{6}Z\.json)")
SAFE_EXTERNAL_ID = re.compile(r"[a-z0-9][a-z0-9-]{0,63}")


@pytest.fixture(scope="module")
def emulator() -> Iterator[Any]:
    from kling_emulator import EmulatorConfig, start_emulator

    with start_emulator(EmulatorConfig(access_key=AK, secret_key=SK, time_scale=0.004)) as handle:
        yield handle


def kling_requests_seen(emulator: Any) -> dict[str, int]:
    stats = emulator.stats()
    seen: dict[str, int] = {**stats["requests"], **stats["create_attempts"]}
    return {k: v for k, v in seen.items() if v}


def refusal(job_data: dict[str, Any]) -> str | None:
    """What the CLI would say about this job before sending anything (None: the plan is fine)."""
    try:
        job = VideoJob.model_validate(job_data)
        plan = plan_job(job)
        check_requests(job, plan, "kling")
        check_budget(job, plan)
    except ValidationError as exc:
        return describe(exc)
    except PlanError as exc:
        return str(exc)
    return None


# ---- the job spec ----------------------------------------------------------------------------------------


@settings(max_examples=examples(300))
@given(broken_jobs())
@example(Broken({"generate": {"prompt": "a kite", "image": ""}}, "image-empty", ["image"]))  # was a traceback
@example(Broken({"generate": {"prompt": "a kite", "image": "~nobody-here/x.gif"}}, "image-suffix", ["image"]))
def test_a_plan_with_a_defect_is_refused_in_one_line_naming_it(broken: Broken) -> None:
    message = refusal(broken.job)
    assert message is not None, f"{broken.defect} was accepted: {broken.job}"
    one_clear_line(message, broken.words, broken.defect)


@settings(max_examples=examples(200))
@given(valid_jobs())
def test_prompts_never_reach_a_storage_key_a_file_name_or_a_cache_key(data: dict[str, Any]) -> None:
    assert refusal(data) is None
    job = VideoJob.model_validate(data)
    plan = plan_job(job)
    keys = [manifest_key(plan.job_id), final_key(plan.job_id), contact_sheet_key(plan.job_id),
            replaced_manifest_key(plan.job_id, datetime(2026, 12, 1, 19, 42))]
    keys += [step_key(plan.job_id, step.index) for step in plan.steps]
    root = Path("/srv/kling-out")
    account = account_fingerprint(KlingSettings(access_key=AK, secret_key=SK))
    for key in keys:
        assert SAFE_KEY.fullmatch(key), key
        assert LocalSink(root)._path(key).resolve().is_relative_to(root)
    for step in plan.steps:
        assert SAFE_EXTERNAL_ID.fullmatch(step.external_task_id), step.external_task_id
        # Prefect writes the cached result of a submit under this key: a file name too.
        assert re.fullmatch(r"kling/v2/[0-9a-f]{12}/submit/[a-z0-9-]+", submit_key(account, step.external_task_id))
    assert re.fullmatch(r"job-[0-9a-f]{12}|[a-z0-9][a-z0-9-]{0,39}", plan.job_id)


@settings(max_examples=examples(150))
@given(invalid_job_ids)
@example("abc\n")  # `re.match` with `$` let a trailing newline through into folder names
@example("x/manifest")  # `--batch-id x/manifest` wrote the batch's ledger over job x's
def test_job_ids_that_try_to_escape_the_destination_are_refused(job_id: str) -> None:
    message = refusal({"generate": {"prompt": "a kite"}, "job_id": job_id})
    assert message is not None and message.startswith("job_id: job_id must be"), message
    with pytest.raises(PlanError, match="not valid: 1-40 characters") as err:
        check_folder_id(job_id, "job id")
    one_clear_line(str(err.value), ["job id"], "folder id")


@settings(max_examples=examples(50))
@given(valid_job_ids)
def test_a_valid_job_id_is_one_folder_inside_the_destination(job_id: str) -> None:
    assert check_folder_id(job_id, "job id") == job_id
    path = LocalSink("/srv/kling-out")._path(manifest_key(job_id)).resolve()
    assert path.parent.parent == Path("/srv/kling-out") and path.parent.name == job_id


# ---- preflight against a live emulator -------------------------------------------------------------------


@pytest.fixture(scope="module")
def emulated_settings(emulator: Any) -> KlingSettings:
    return KlingSettings(api_base_url=emulator.base_url, access_key=AK, secret_key=SK, allow_private_urls=True)


def test_preflight_refuses_every_broken_plan_before_any_request(
        emulator: Any, emulated_settings: KlingSettings, tmp_path: Path) -> None:
    dest = tmp_path / "dest"
    outcomes = {"refused": 0, "prepared": 0}

    @settings(max_examples=examples(150))
    @given(st.one_of(broken_jobs(), valid_jobs()))
    def preflight(case: Broken | dict[str, Any]) -> None:
        data = {**(case.job if isinstance(case, Broken) else case), "dest": str(dest)}
        try:
            job = VideoJob.model_validate(data)
            prepared = prepare(job, emulated_settings)
        except ValidationError as exc:
            assert isinstance(case, Broken), f"a valid job was refused: {describe(exc)}"
            one_clear_line(describe(exc), case.words, case.defect)
            outcomes["refused"] += 1
        except PlanError as exc:
            assert isinstance(case, Broken), f"a valid job was refused: {exc}"
            one_clear_line(str(exc), case.words, case.defect)
            outcomes["refused"] += 1
        else:
            assert not isinstance(case, Broken), f"{case.defect} passed preflight: {case.job}"
            assert prepared.plan.job_id == job.effective_job_id()
            outcomes["prepared"] += 1

    preflight()
    assert outcomes["refused"] > 0 and outcomes["prepared"] > 0, outcomes
    assert kling_requests_seen(emulator) == {}  # read once: the counters are cumulative


def test_no_request_reached_the_emulator_and_preflight_saw_it(emulator: Any,
                                                            emulated_settings: KlingSettings) -> None:
    """The zero above is a real zero: the same emulator counts a request the client does send."""
    import asyncio

    from kling_tasks.api import KlingClient, KlingError

    assert kling_requests_seen(emulator) == {}

    async def one_get() -> None:
        async with KlingClient(emulated_settings) as client:
            with pytest.raises(KlingError):
                await client.get("text2video", "404")

    asyncio.run(one_get())
    assert sum(kling_requests_seen(emulator).values()) >= 1
    emulator.reset()


# ---- the jobs file ---------------------------------------------------------------------------------------


def _write(path: Path, fmt: str, jobs: list[dict[str, Any]]) -> Path:
    target = path / f"jobs.{fmt}"
    if fmt == "yaml":
        # Escaped: written raw, YAML folds line breaks such as U+0085 (its rule, not ours); JSON keeps raw text.
        target.write_text(yaml.safe_dump({"jobs": jobs}, allow_unicode=False), encoding="utf-8")
    elif fmt == "json":
        target.write_text(json.dumps({"jobs": jobs}, ensure_ascii=False), encoding="utf-8")
    else:
        target.write_text("\n".join(json.dumps(job) for job in jobs) + "\n", encoding="utf-8")
    return target


@settings(max_examples=examples(150))
@given(st.lists(st.one_of(valid_jobs(), broken_jobs()), min_size=1, max_size=4),
       st.sampled_from(["yaml", "json", "jsonl"]))
def test_a_jobs_file_loads_as_written_or_is_refused_in_one_line_naming_the_entry(
        tmp_path: Path, entries: list[dict[str, Any] | Broken], fmt: str) -> None:
    raw = [entry.job if isinstance(entry, Broken) else entry for entry in entries]
    path = _write(tmp_path, fmt, raw)
    broken = [(i, e) for i, e in enumerate(entries) if isinstance(e, Broken)]
    try:
        jobs = load_jobs(path, dest=str(tmp_path / "out"))
    except JobsFileError as exc:
        message = str(exc)
        if not broken:  # only a clash of job ids may refuse valid jobs
            one_clear_line(message, ["both have job_id", "all have job_id"], "duplicates")
            return
        index, first = broken[0]
        label = f"job {index + 1} (index {index})" if fmt != "jsonl" else f"line {index + 1}"
        one_clear_line(message, first.words if index < MAX_REPORTED else ["more"], first.defect)
        assert label in message, f"{first.defect}: {label} not named in {message!r}"
        return
    assert not broken, f"{[e.defect for _, e in broken]} loaded from {fmt}"
    assert [job.generate.prompt for job in jobs] == [job["generate"]["prompt"] for job in raw]
    assert [[e.prompt for e in job.extensions] for job in jobs] == [
        [e["prompt"] for e in job["extensions"]] for job in raw]


def _csv_text(rows: list[list[str]]) -> str:
    out = io.StringIO()
    csv.writer(out).writerows(rows)
    return out.getvalue()


_JOB_WORDS = st.sampled_from(["jobs", "defaults", "prompt", "generate", "extend", "extensions", "job_id", "mode"])
junk_documents = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), hostile_text),
    lambda inner: st.one_of(st.lists(inner, max_size=4),
                            st.dictionaries(_JOB_WORDS | hostile_text, inner, max_size=4)),
    max_leaves=12,
)


@settings(max_examples=examples(150))
@given(st.one_of(
    st.tuples(st.sampled_from(["yaml", "json", "jsonl", "csv"]), st.one_of(st.text(max_size=200), hostile_text)),
    st.tuples(st.just("yaml"), junk_documents.map(lambda d: yaml.safe_dump(d, allow_unicode=True))),
    st.tuples(st.just("json"), junk_documents.map(lambda d: json.dumps(d))),
    st.tuples(st.just("csv"), st.lists(st.lists(hostile_text | st.sampled_from(
        ["prompt", "extend_1", "extend_3", "job_id", "mode", "duration"]), max_size=5), max_size=5).map(_csv_text)),
    st.tuples(st.sampled_from(["yaml", "json", "csv"]), st.binary(max_size=100).map(
        lambda b: b.decode("latin-1"))),
))
@example(("json", "[" * 50_000))  # each level is a recursion of the parser: was a RecursionError traceback
@example(("yaml", "[" * 1_000))
@example(("jsonl", "[" * 50_000))
@example(("yaml", "jobs: &a [*a]"))
def test_any_jobs_file_loads_or_is_refused_in_one_line(tmp_path: Path, document: tuple[str, str]) -> None:
    fmt, text = document
    path = tmp_path / f"jobs.{fmt}"
    path.write_bytes(text.encode("utf-8", "surrogatepass"))
    try:
        jobs = load_jobs(path, dest=str(tmp_path / "out"))
    except JobsFileError as exc:
        assert str(exc).startswith(str(path)), str(exc)
        one_clear_line(str(exc), [str(path)], f"{fmt} file")
    else:
        assert jobs and all(isinstance(job, VideoJob) for job in jobs)


# ---- secrets in a signed image URL -----------------------------------------------------------------------

# A marker prefix: a bare generated word could be a field name of the repr itself ("continuation").
_secret_part = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789", min_size=12, max_size=24).map(
    lambda part: f"zz9{part}")


@settings(max_examples=examples(50))
@given(_secret_part, _secret_part, _secret_part)
def test_a_signed_image_url_shows_no_signature_token_or_password(signature: str, token: str,
                                                                password: str) -> None:
    url = (f"https://reader:{password}@images.example/in/kite.png?X-Amz-Signature={signature}"
           f"&X-Amz-Security-Token={token}#{token}")
    job = VideoJob(generate=GenerationSpec(prompt="a kite", image=url), job_id="signed")
    shown = [repr(job), str(job), repr(job.generate), json.dumps(job.public_spec())]
    for text in shown:
        assert signature not in text and token not in text and password not in text, text
    assert job.public_spec()["generate"]["image"] == "https://images.example/in/kite.png"  # type: ignore[index]
    assert job.generate.image == url  # what is sent to Kling is the URL as given
