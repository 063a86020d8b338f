"""The `batch` jobs file: every format in, validated VideoJobs out; every refusal one line that says where."""

from __future__ import annotations

import json
from datetime import date
from pathlib import Path

import pytest

from kling_tasks.jobs import PlanError, VideoJob, plan_job
from kling_tasks.jobs_file import JobsFileError, check_batch_budget, load_jobs, price_batch

LONG = "x" * 2501


@pytest.fixture(autouse=True)
def _in_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Files are named relative to the working directory, so messages read `jobs.yaml: ...` exactly."""
    monkeypatch.chdir(tmp_path)


def write(name: str, text: str) -> str:
    Path(name).write_text(text, encoding="utf-8")
    return name


def refusal(path: str, **kwargs: object) -> str:
    with pytest.raises(JobsFileError) as caught:
        load_jobs(path, **kwargs)  # type: ignore[arg-type]
    message = str(caught.value)
    assert isinstance(caught.value, PlanError)
    assert "\n" not in message and "\r" not in message, "one line"
    assert "Value error" not in message and "pydantic" not in message and "Traceback" not in message
    assert "validation error" not in message and "input_value" not in message
    return message


# ---- formats ------------------------------------------------------------------------------------------------

YAML = """\
defaults:
  dest: ./renders
  generate:
    model_name: kling-v1-6
    mode: pro
    aspect_ratio: 9:16      # unquoted: YAML 1.1 would read 556
    negative_prompt: blurry
  extensions:
    - prompt: the camera pulls back
jobs:
  - job_id: teaser-{date}
    generate:
      prompt: a red fox trots through fresh snow
      mode: std             # the job wins over the defaults
      duration: 10          # a number is fine
  - prompt: a lighthouse at dusk
    extend: [waves crash, the light turns on]
    take: 2
    max_credits: 20
  - prompt: an owl blinks
    extensions: []          # opts out of the default extensions
    dest: s3://bucket/owls
"""


def test_yaml_with_defaults_deep_merges_generate_and_inherits_extensions() -> None:
    fox, lighthouse, owl = load_jobs(write("jobs.yaml", YAML), dest="./cli-dest")
    assert fox.job_id == "teaser-{date}", "resolved at run time, not at load"
    assert fox.for_date(date(2026, 3, 1)).job_id == "teaser-20260301"
    assert fox.generate.model_dump(exclude_defaults=True) == {
        "prompt": "a red fox trots through fresh snow", "model_name": "kling-v1-6",
        "duration": "10", "aspect_ratio": "9:16", "negative_prompt": "blurry"}
    assert fox.generate.mode == "std"
    assert [e.prompt for e in fox.extensions] == ["the camera pulls back"]
    assert fox.dest == "./renders", "the file's defaults are the job's own dest; --dest fills only the rest"
    assert lighthouse.generate.prompt == "a lighthouse at dusk" and lighthouse.generate.mode == "pro"
    assert [e.prompt for e in lighthouse.extensions] == ["waves crash", "the light turns on"]
    assert (lighthouse.take, lighthouse.max_credits) == (2, 20)
    assert owl.extensions == [] and owl.dest == "s3://bucket/owls"


def test_a_bare_yml_list_and_cli_dest_for_jobs_without_one() -> None:
    jobs = load_jobs(write("jobs.yml", "- prompt: one\n- prompt: two\n  dest: ./own\n"), dest="s3://b/p")
    assert [(j.generate.prompt, j.dest) for j in jobs] == [("one", "s3://b/p"), ("two", "./own")]
    assert load_jobs("jobs.yml")[0].dest == VideoJob.model_fields["dest"].default


def test_json_mapping_with_defaults_and_a_bare_json_list() -> None:
    document = {"defaults": {"generate": {"model_name": "kling-v1-6", "duration": 10}},
                "jobs": [{"generate": {"prompt": "a"}, "job_id": "a"}, {"prompt": "b", "extend": ["c"]}]}
    a, b = load_jobs(write("jobs.json", json.dumps(document, indent=2)))
    assert (a.job_id, a.generate.model_name, a.generate.duration) == ("a", "kling-v1-6", "10")
    assert b.generate.model_name == "kling-v1-6" and [e.prompt for e in b.extensions] == ["c"]
    [only] = load_jobs(write("list.json", '[{"prompt": "solo", "take": 3}]'))
    assert (only.generate.prompt, only.take) == ("solo", 3)


def test_jsonl_one_job_per_non_empty_line() -> None:
    lines = ['{"prompt": "a fox", "extend": ["runs"], "job_id": "fox"}', "", "  ",
             '{"generate": {"prompt": "a cat", "mode": "pro"}, "extensions": [{"prompt": "naps", "cfg_scale": 0.3}]}']
    fox, cat = load_jobs(write("jobs.jsonl", "\r\n".join(lines) + "\r\n"), dest="./out")
    assert (fox.job_id, fox.generate.prompt, [e.prompt for e in fox.extensions]) == ("fox", "a fox", ["runs"])
    assert cat.generate.mode == "pro" and cat.extensions[0].cfg_scale == 0.3 and cat.dest == "./out"


CSV = (
    "\ufeffprompt,extend_1,extend_2,job_id,model_name,mode,duration,aspect_ratio,cfg_scale,take,max_credits,dest\n"
    "a fox in the snow,it runs,it jumps,fox,kling-v1-6,pro,10,9:16,0.5,2,30,s3://b/foxes\n"
    '"a cat, on a sofa\nat night",it yawns,,,,,,,,,,\n'
    "\n"
    "an owl,,,,,,,,,,,\n"
)


def test_csv_columns_empty_cells_and_quoted_multiline_prompts() -> None:
    fox, cat, owl = load_jobs(write("jobs.csv", CSV), dest="./cli")
    assert fox.generate.model_dump(exclude_defaults=True) == {
        "prompt": "a fox in the snow", "model_name": "kling-v1-6", "mode": "pro", "duration": "10",
        "aspect_ratio": "9:16", "cfg_scale": 0.5}
    assert ([e.prompt for e in fox.extensions], fox.job_id, fox.take, fox.max_credits, fox.dest) == (
        ["it runs", "it jumps"], "fox", 2, 30, "s3://b/foxes")
    assert cat.generate.prompt == "a cat, on a sofa\nat night" and [e.prompt for e in cat.extensions] == ["it yawns"]
    assert (cat.job_id, cat.take, cat.dest) == (None, 1, "./cli"), "empty cells mean not given"
    assert owl.extensions == [] and owl.generate == VideoJob(generate={"prompt": "an owl"}).generate


def test_csv_image_and_negative_prompt_columns(tmp_path: Path) -> None:
    (tmp_path / "first-frame.png").write_bytes(b"\x89PNG fake")
    [job] = load_jobs(write("jobs.csv", "prompt,image,negative_prompt\nit wakes,first-frame.png,text\n"))
    assert job.generate.kind == "image2video" and job.generate.negative_prompt == "text"


# ---- where an error is --------------------------------------------------------------------------------------


def test_yaml_error_names_the_job_and_its_index() -> None:
    path = write("jobs.yaml", f"jobs:\n  - prompt: a\n  - prompt: b\n  - prompt: {LONG}\n")
    assert refusal(path) == "jobs.yaml: job 3 (index 2): generate.prompt: String should have at most 2500 characters"


def test_jsonl_error_names_the_file_line() -> None:
    lines = ['{"prompt": "a"}', '{"prompt": "b"}', "", '{"prompt": "c"}', '{"prompt": "d", "take": 0}']
    assert refusal(write("jobs.jsonl", "\n".join(lines))) == (
        "jobs.jsonl line 5: take: Input should be greater than or equal to 1")


def test_csv_error_names_the_file_line_with_the_header_as_line_1() -> None:
    rows = ["prompt,mode", "a,std", '"b', 'still b",pro', "", "c,std", "d,fast"]
    assert refusal(write("jobs.csv", "\n".join(rows) + "\n")) == "jobs.csv line 7: mode: Input should be 'std' or 'pro'"


def test_csv_errors_use_the_column_names() -> None:
    path = write("jobs.csv", f"prompt,extend_1,cfg_scale\na,{LONG},\nb,,2\n")
    assert refusal(path) == ("jobs.csv line 2: extend_1: String should have at most 2500 characters; "
                             "jobs.csv line 3: cfg_scale: Input should be less than or equal to 1")


def test_the_first_error_of_every_entry_in_one_line() -> None:
    path = write("jobs.yaml", "- {prompt: '', take: 0}\n- {prompt: ok}\n"
                              "- {generate: {prompt: b, mode: fast}, take: 0}\n")
    assert refusal(path) == ("jobs.yaml: job 1 (index 0): generate.prompt: String should have at least 1 character; "
                             "jobs.yaml: job 3 (index 2): generate.mode: Input should be 'std' or 'pro'")


def test_a_newline_inside_a_reported_value_is_flattened() -> None:
    path = write("jobs.jsonl", json.dumps({"prompt": "a", "bad\nkey": 1}) + "\n")
    assert refusal(path) == "jobs.jsonl line 1: bad key: Extra inputs are not permitted"


def test_at_most_ten_errors_then_a_count() -> None:
    message = refusal(write("jobs.jsonl", '{"prompt": ""}\n' * 13))
    assert message.count("String should have at least 1 character") == 10
    assert message.startswith("jobs.jsonl line 1: generate.prompt: ")
    assert "jobs.jsonl line 10: " in message and "line 11" not in message
    assert message.endswith("; and 3 more")


@pytest.mark.parametrize(("text", "expected"), [
    ("- prompt: a\n  generate: {prompt: b}\n", "give either prompt (the shorthand) or generate, not both"),
    ("- prompt: a\n  extend: [b]\n  extensions: [{prompt: c}]\n", "give either extend (the shorthand) or extensions"),
    ("- prompt: a\n  extend: b\n", "extend: must be a list of prompt strings"),
    ("- just a prompt\n", "expected a mapping of job fields, got str"),
    ("- prompt: a\n  colour: red\n", "colour: Extra inputs are not permitted"),
    ("- {prompt: a, job_id: Teaser}\n", "job_id: job_id must be 1-40 characters of lowercase letters"),
    ("- {generate: {prompt: a, model_name: kling-v2-master}, extend: [b], continuation: extend}\n",
     "model 'kling-v2-master' cannot be extended with video-extend, which needs one of"),
    ("- {generate: {prompt: a, image: missing.png}}\n", "image file 'missing.png' does not exist"),
    ("- {prompt: a, mode: pro}\n", "mode: belongs under generate: (only prompt has a flat shorthand)"),
    ("- {prompt: a, extend: [b, c], max_credits: 2}\n", "the plan is estimated at 3 credits, over max_credits 2"),
])
def test_entry_errors(text: str, expected: str) -> None:
    assert refusal(write("jobs.yaml", text)).startswith(f"jobs.yaml: job 1 (index 0): {expected}")


@pytest.mark.parametrize(("name", "text", "expected"), [
    ("jobs.yaml", "jobs:\n  - prompt: a\n   - prompt: b\n", "jobs.yaml line 3: malformed YAML: "),
    ("jobs.yaml", "jobs: [\n", "jobs.yaml line 2: malformed YAML: "),
    ("jobs.json", '{"jobs": [\n  {"prompt": "a"}\n  {"prompt": "b"}]}', "jobs.json line 3: malformed JSON: "
                                                                         "Expecting ',' delimiter (column 3)"),
    ("jobs.jsonl", '{"prompt": "a"}\n{"prompt": "b",}\n', "jobs.jsonl line 2: malformed JSON: "),
    ("jobs.csv", f"prompt\na\n{'x' * 200_000}\n", "jobs.csv line 3: malformed CSV: field larger than field limit"),
])
def test_malformed_files_name_the_line(name: str, text: str, expected: str) -> None:
    assert refusal(write(name, text)).startswith(expected)


@pytest.mark.parametrize(("name", "text"), [
    ("jobs.yaml", ""), ("jobs.yaml", "# nothing yet\n"), ("jobs.yaml", "jobs: []\n"), ("jobs.yml", "jobs:\n"),
    ("jobs.json", ""), ("jobs.json", "[]"), ("jobs.jsonl", "\n\n  \n"), ("jobs.csv", ""), ("jobs.csv", "prompt\n\n"),
])
def test_a_file_without_jobs_is_refused(name: str, text: str) -> None:
    assert refusal(write(name, text)) == f"{name}: the file has no jobs"


@pytest.mark.parametrize(("text", "expected"), [
    ("prompt: a\n", "jobs.yaml: expected jobs: (a list) and optional defaults: at the top, found prompt"),
    ("jobs: [{prompt: a}]\ndefault: {}\n", "jobs.yaml: expected jobs: (a list) and optional defaults: at the "
                                           "top, found jobs, default"),
    ("jobs: {prompt: a}\n", "jobs.yaml: expected a list of jobs, or a mapping with jobs:, got dict"),
    ("just text\n", "jobs.yaml: expected a list of jobs, or a mapping with jobs:, got str"),
    ("defaults: [a]\njobs: [{prompt: a}]\n", "jobs.yaml: defaults: must be a mapping of job fields, got list"),
    ("defaults: {colour: red, generate: {size: 3}}\njobs: [{prompt: a}]\n",
     "jobs.yaml: defaults: unknown fields colour, generate.size"),
    ("defaults: {prompt: a, generate: {mode: pro}}\njobs: [{prompt: a}]\n",
     "jobs.yaml: defaults: give either prompt (the shorthand) or generate, not both"),
])
def test_document_shape_errors(text: str, expected: str) -> None:
    assert refusal(write("jobs.yaml", text)) == expected


def test_defaults_shorthand_merges_under_the_job() -> None:
    [job] = load_jobs(write("jobs.yaml", "defaults: {prompt: shared, extend: [more]}\njobs: [{take: 2}]\n"))
    assert (job.generate.prompt, [e.prompt for e in job.extensions], job.take) == ("shared", ["more"], 2)


def test_unreadable_files_and_unknown_suffixes(tmp_path: Path) -> None:
    assert refusal("missing.yaml") == "missing.yaml: cannot read the jobs file: No such file or directory"
    (tmp_path / "folder.json").mkdir()
    assert refusal("folder.json") == "folder.json: cannot read the jobs file: Is a directory"
    Path("latin1.csv").write_bytes(b"prompt\ncaf\xe9\n")
    assert refusal("latin1.csv") == "latin1.csv: cannot read the jobs file: not UTF-8 text (byte 10)"
    assert refusal(write("jobs.txt", "- prompt: a\n")) == (
        "jobs.txt: unknown jobs file type '.txt'; use .yaml, .yml, .json, .jsonl, .csv")
    assert refusal(write("jobs", "")).startswith("jobs: unknown jobs file type '(no suffix)'")
    assert len(load_jobs(write("JOBS.YAML", "- prompt: a\n"))) == 1, "the suffix is case-insensitive"


# ---- CSV columns --------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("header", "expected"), [
    ("prompt,colour,Size", "unknown columns colour, size (known: aspect_ratio, cfg_scale, continuation, dest, "
                           "duration, image, job_id, max_credits, max_seconds, mode, model_name, negative_prompt, "
                           "prompt, sound, take, extend_1..extend_N)"),
    ("prompt,extend_1,extend_3", "extend columns must be extend_1..extend_N; missing extend_2"),
    ("prompt,extend_0", "unknown columns extend_0"),
    ("job_id,mode", "missing column prompt"),
    ("prompt,mode,mode", "repeated columns mode"),
])
def test_csv_header_errors(header: str, expected: str) -> None:
    assert refusal(write("jobs.csv", f"{header}\na,b,c\n")).startswith(f"jobs.csv line 1: {expected}")


def test_csv_extensions_cannot_have_gaps() -> None:
    path = write("jobs.csv", "prompt,extend_1,extend_2,extend_3\na,one,,three\nb,,two,\nc,one,two,\n")
    assert refusal(path) == ("jobs.csv line 2: extend_3 is given after an empty extend_2; extensions cannot have gaps; "
                             "jobs.csv line 3: extend_2 is given after an empty extend_1; extensions cannot have gaps")


def test_csv_row_with_more_cells_than_columns() -> None:
    assert refusal(write("jobs.csv", "prompt,mode\na,std,extra\n")) == (
        "jobs.csv line 2: 3 cells, but the header has 2 columns")
    [job] = load_jobs(write("ok.csv", "prompt,mode\na,pro,,\n"))
    assert job.generate.mode == "pro", "trailing empty cells from a spreadsheet are fine"


def test_csv_empty_prompt_cell() -> None:
    assert refusal(write("jobs.csv", "prompt,mode\n  ,pro\n")) == "jobs.csv line 2: prompt: Field required"


# ---- duplicates ---------------------------------------------------------------------------------------------


def test_duplicate_explicit_job_ids() -> None:
    jobs = "".join(f"  - {{prompt: p{i}, job_id: {'teaser-1' if i in (2, 5) else f'j{i}'}}}\n" for i in range(1, 6))
    assert refusal(write("jobs.yaml", f"jobs:\n{jobs}")) == "jobs.yaml: job 2 and job 5 both have job_id teaser-1"
    csv = refusal(write("jobs.csv", "prompt,job_id\na,x\nb,x\nc,x\n"))
    assert csv == "jobs.csv: line 2, line 3 and line 4 all have job_id x"


def test_identical_specs_without_job_id_are_duplicates() -> None:
    derived = VideoJob(generate={"prompt": "same"}).effective_job_id()
    message = refusal(write("jobs.jsonl", '{"prompt": "same"}\n{"prompt": "other"}\n{"prompt": "same"}\n'))
    assert message.startswith(f"jobs.jsonl: line 1 and line 3 both have job_id {derived} (derived from the same spec")
    assert len(load_jobs(write("takes.jsonl", '{"prompt": "same"}\n{"prompt": "same", "take": 2}\n'))) == 2
    explicit = refusal(write("mixed.jsonl", f'{{"prompt": "same"}}\n{{"prompt": "b", "job_id": "{derived}"}}\n'))
    assert explicit == f"mixed.jsonl: line 1 and line 2 both have job_id {derived}", "no derived-spec hint"


def test_duplicates_are_checked_on_the_ids_resolved_for_the_day() -> None:
    path = write("jobs.yaml", "- {prompt: a, job_id: 'clip-{date}'}\n- {prompt: b, job_id: clip-20260102}\n")
    assert refusal(path, day=date(2026, 1, 2)) == "jobs.yaml: job 1 and job 2 both have job_id clip-20260102"
    assert [j.job_id for j in load_jobs(path, day=date(2026, 1, 3))] == ["clip-{date}", "clip-20260102"]
    same = write("same.yaml", "- prompt: a\n  job_id: clip-{date}\n- prompt: b\n  job_id: clip-{date}\n")
    assert refusal(same).startswith("same.yaml: job 1 and job 2 both have job_id clip-2"), "today by default"


def test_entry_errors_and_duplicates_are_reported_together() -> None:
    path = write("jobs.yaml", "- {prompt: a, job_id: x}\n- {prompt: '', job_id: y}\n- {prompt: c, job_id: x}\n")
    assert refusal(path) == ("jobs.yaml: job 2 (index 1): generate.prompt: String should have at least 1 character; "
                             "jobs.yaml: job 1 and job 3 both have job_id x")


# ---- budget -------------------------------------------------------------------------------------------------


def test_price_batch_sums_every_plan_and_the_budget_refuses_over_it() -> None:
    jobs = load_jobs(write("jobs.yaml", """\
- prompt: cheap                       # kling-v1 std 5 s: 1, plus 2 extensions at 1
  extend: [a, b]
- generate: {prompt: dear, model_name: kling-v1-6, mode: pro, duration: 10}   # 7, plus 1 extension at 3.5
  extend: [c]
"""))
    assert [plan_job(j).estimated_credits for j in jobs] == [3, 10.5]
    assert price_batch(jobs) == 13.5
    check_batch_budget(jobs, 13.5)
    check_batch_budget(jobs, None)
    with pytest.raises(PlanError) as caught:
        check_batch_budget(jobs, 13)
    assert str(caught.value) == ("the batch is estimated at 13.5 credits, over --max-credits 13; "
                                 "raise --max-credits or remove jobs from the file")
    assert price_batch([]) == 0
