"""The `batch` jobs file (DESIGN §5): YAML, JSON, JSONL or CSV in, validated and priced `VideoJob`s out.

Pure (no HTTP, no Prefect). Every refusal is one `JobsFileError` line that says where: `jobs.yaml: job 3
(index 2): generate.prompt: ...`, `jobs.jsonl line 5: ...`, `jobs.csv line 7: ...` (file lines, the CSV
header is line 1). The first problem of each entry is reported, all entries in one line joined by `; `.

Precedence per job: the job's own values, then the file's `defaults:` (a deep merge, so `generate` keys
merge one by one; `extensions` is a list and is taken whole from the defaults only when the job has neither
`extensions` nor `extend`, so `extensions: []` opts out), then `--dest` for a job still without a dest.
Local image paths are read relative to the working directory, as with `run --image`.
"""

from __future__ import annotations

import csv
import io
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any

import yaml
from pydantic import ValidationError

from kling_tasks.jobs import GenerationSpec, PlanError, VideoJob, check_budget, plan_job

MAX_REPORTED = 10
SUFFIXES = (".yaml", ".yml", ".json", ".jsonl", ".csv")
_JOB_KEYS = frozenset(VideoJob.model_fields) | {"prompt", "extend"}
_GENERATE_KEYS = frozenset(GenerationSpec.model_fields)
_CSV_GENERATE = ("prompt", "negative_prompt", "image", "model_name", "mode", "duration", "aspect_ratio", "cfg_scale",
                 "sound")
_CSV_JOB = ("job_id", "take", "dest", "max_credits", "continuation", "max_seconds")
_CSV_EXTEND = re.compile(r"^extend_([1-9][0-9]*)$")

Loc = tuple[int | str, ...]


class JobsFileError(PlanError):
    """The jobs file cannot run as given: one line naming the file and each bad entry's line or index."""

    def __init__(self, message: str) -> None:
        super().__init__(re.sub(r"\s*\n\s*", " ", message).strip())


class _Loader(yaml.SafeLoader):
    """YAML 1.1 without base-60 numbers: `aspect_ratio: 16:9` is the string "16:9", not the integer 969."""


_BASE_60 = ("tag:yaml.org,2002:str", re.compile(r"^[-+]?[0-9][0-9_]*(?::[0-5]?[0-9])+(?:\.[0-9_]*)?$"))
_Loader.yaml_implicit_resolvers = {  # looked up by first character, in order: base-60 is a string before a number
    first: [_BASE_60, *resolvers] if first in set("-+0123456789") else resolvers
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}


@dataclass
class _Entry:
    where: str  # the full location prefix: "jobs.yaml: job 3 (index 2)", "jobs.csv line 7"
    label: str  # the short one for duplicates: "job 3", "line 7"
    data: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    rename: Callable[[Loc], str] = lambda loc: ".".join(str(part) for part in loc)


def _type_name(value: object) -> str:
    return "nothing" if value is None else type(value).__name__


# ---- per format: text -> entries ---------------------------------------------------------------------------


def _expand(raw: dict[str, Any]) -> dict[str, Any]:
    """The flat shorthand (`prompt`, `extend: [...]`) as the full form; refuses a job that mixes the two."""
    data = dict(raw)
    if "prompt" in data:
        if "generate" in data:
            raise ValueError("give either prompt (the shorthand) or generate, not both")
        data["generate"] = {"prompt": data.pop("prompt")}
    if "extend" in data:
        if "extensions" in data:
            raise ValueError("give either extend (the shorthand) or extensions, not both")
        prompts = data.pop("extend")
        if not isinstance(prompts, list) or not all(isinstance(p, str) for p in prompts):
            raise ValueError("extend: must be a list of prompt strings")
        data["extensions"] = [{"prompt": p} for p in prompts]
    return data


def _merge(under: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    merged = dict(under)
    for key, value in over.items():
        below = merged.get(key)
        merged[key] = _merge(below, value) if isinstance(below, dict) and isinstance(value, dict) else value
    return merged


def _job_data(raw: object, defaults: dict[str, Any]) -> dict[str, Any]:
    if not isinstance(raw, dict):
        raise ValueError(f"expected a mapping of job fields, got {_type_name(raw)}")
    data = _merge(defaults, _expand(raw))
    generate = data.get("generate")
    if isinstance(generate, dict) and type(generate.get("duration")) is int:  # YAML's `duration: 10`
        data["generate"] = {**generate, "duration": str(generate["duration"])}
    return data


def _defaults(raw: object, name: str) -> dict[str, Any]:
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise JobsFileError(f"{name}: defaults: must be a mapping of job fields, got {_type_name(raw)}")
    try:
        defaults = _expand(raw)
    except ValueError as exc:
        raise JobsFileError(f"{name}: defaults: {exc}") from None
    unknown = sorted(map(str, set(raw) - _JOB_KEYS))
    generate = defaults.get("generate", {})
    if not isinstance(generate, dict):
        raise JobsFileError(f"{name}: defaults: generate: must be a mapping, got {_type_name(generate)}")
    unknown += [f"generate.{key}" for key in sorted(map(str, set(generate) - _GENERATE_KEYS))]
    if unknown:
        raise JobsFileError(f"{name}: defaults: unknown fields {', '.join(unknown)}")
    return defaults


def _document_entries(document: object, name: str) -> list[_Entry]:
    """YAML and JSON: `{jobs: [...], defaults: {...}}` or a bare list of jobs."""
    defaults: dict[str, Any] = {}
    if document is None:
        return []
    if isinstance(document, dict):
        if "jobs" not in document or set(document) - {"jobs", "defaults"}:
            found = ", ".join(map(str, document)) or "nothing"
            raise JobsFileError(f"{name}: expected jobs: (a list) and optional defaults: at the top, found {found}")
        defaults = _defaults(document.get("defaults"), name)
        document = document["jobs"]
        if document is None:
            return []
    if not isinstance(document, list):
        raise JobsFileError(f"{name}: expected a list of jobs, or a mapping with jobs:, got {_type_name(document)}")
    entries = []
    for index, raw in enumerate(document):
        entry = _Entry(where=f"{name}: job {index + 1} (index {index})", label=f"job {index + 1}")
        try:
            entry.data = _job_data(raw, defaults)
        except ValueError as exc:
            entry.error = str(exc)
        entries.append(entry)
    return entries


def _yaml_entries(text: str, name: str) -> list[_Entry]:
    try:
        document = yaml.load(text, Loader=_Loader)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        where = f"{name} line {mark.line + 1}" if mark is not None else name
        raise JobsFileError(f"{where}: malformed YAML: {exc.problem or exc.context}") from None
    except yaml.YAMLError as exc:
        raise JobsFileError(f"{name}: malformed YAML: {exc}") from None
    return _document_entries(document, name)


def _json_entries(text: str, name: str) -> list[_Entry]:
    try:
        document = json.loads(text) if text.strip() else None
    except json.JSONDecodeError as exc:
        raise JobsFileError(f"{name} line {exc.lineno}: malformed JSON: {exc.msg} (column {exc.colno})") from None
    return _document_entries(document, name)


def _jsonl_entries(text: str, name: str) -> list[_Entry]:
    entries = []
    for number, line in enumerate(text.split("\n"), start=1):  # not splitlines: JSON strings may hold U+2028
        if not line.strip():
            continue
        entry = _Entry(where=f"{name} line {number}", label=f"line {number}")
        try:
            entry.data = _job_data(json.loads(line), {})
        except json.JSONDecodeError as exc:
            entry.error = f"malformed JSON: {exc.msg} (column {exc.colno})"
        except ValueError as exc:
            entry.error = str(exc)
        entries.append(entry)
    return entries


def _csv_rename(loc: Loc) -> str:
    """Errors name the CSV's columns: generate.mode -> mode, extensions.0.prompt -> extend_1."""
    if len(loc) >= 2 and loc[0] == "generate":
        return ".".join(map(str, loc[1:]))
    if len(loc) >= 3 and loc[0] == "extensions" and isinstance(loc[1], int):
        return f"extend_{loc[1] + 1}"
    return ".".join(map(str, loc))


def _csv_header(header: list[str], name: str) -> list[str]:
    columns = [cell.strip().lower() for cell in header]
    known = set(_CSV_GENERATE) | set(_CSV_JOB)
    unknown = [c or repr(c) for c in columns if c not in known and not _CSV_EXTEND.match(c)]
    numbers = {int(m.group(1)) for c in columns if (m := _CSV_EXTEND.match(c))}
    gaps = [f"extend_{n}" for n in range(1, max(numbers, default=0)) if n not in numbers]
    repeated = sorted({c for c in columns if columns.count(c) > 1})
    problems = [f"unknown columns {', '.join(unknown)} (known: {', '.join(sorted(known))}, extend_1..extend_N)"
                ] if unknown else []
    problems += [f"repeated columns {', '.join(repeated)}"] if repeated else []
    problems += [] if "prompt" in columns else ["missing column prompt"]
    problems += [f"extend columns must be extend_1..extend_N; missing {', '.join(gaps)}"] if gaps else []
    if problems:
        raise JobsFileError(f"{name} line 1: {'; '.join(problems)}")
    return columns


def _csv_row(columns: list[str], row: list[str]) -> dict[str, Any]:
    if len(row) > len(columns) and any(cell.strip() for cell in row[len(columns):]):
        raise ValueError(f"{len(row)} cells, but the header has {len(columns)} columns")
    cells = {column: cell.strip() for column, cell in zip(columns, row, strict=False) if cell.strip()}
    data: dict[str, Any] = {key: cells[key] for key in _CSV_JOB if key in cells}
    data["generate"] = {key: cells[key] for key in _CSV_GENERATE if key in cells}
    prompts: list[str] = []
    for number in range(1, sum(1 for c in columns if _CSV_EXTEND.match(c)) + 1):
        value = cells.get(f"extend_{number}")
        if value is not None and len(prompts) < number - 1:
            raise ValueError(f"extend_{number} is given after an empty extend_{len(prompts) + 1}; "
                             "extensions cannot have gaps")
        if value is not None:
            prompts.append(value)
    data["extensions"] = [{"prompt": p} for p in prompts]
    return data


def _csv_entries(text: str, name: str) -> list[_Entry]:
    reader = csv.reader(io.StringIO(text, newline=""))
    try:
        header = next(reader, None)
        if header is None or not any(cell.strip() for cell in header):
            return []
        columns = _csv_header(header, name)
        entries: list[_Entry] = []
        while True:
            start = reader.line_num + 1  # a quoted cell may span lines: report the line the row starts on
            row = next(reader, None)
            if row is None:
                return entries
            if not any(cell.strip() for cell in row):
                continue
            entry = _Entry(where=f"{name} line {start}", label=f"line {start}", rename=_csv_rename)
            try:
                entry.data = _csv_row(columns, row)
            except ValueError as exc:
                entry.error = str(exc)
            entries.append(entry)
    except csv.Error as exc:
        raise JobsFileError(f"{name} line {reader.line_num}: malformed CSV: {exc}") from None


_PARSERS: dict[str, Callable[[str, str], list[_Entry]]] = {
    ".yaml": _yaml_entries, ".yml": _yaml_entries, ".json": _json_entries, ".jsonl": _jsonl_entries,
    ".csv": _csv_entries,
}


# ---- the whole file ----------------------------------------------------------------------------------------


def _first_error(exc: ValidationError, rename: Callable[[Loc], str]) -> str:
    error = exc.errors()[0]
    message = str(error["msg"]).removeprefix("Value error, ")
    where = rename(tuple(error["loc"]))
    if error["type"] == "extra_forbidden" and where in _GENERATE_KEYS:  # `mode: pro` next to the shorthand prompt
        message = "belongs under generate: (only prompt has a flat shorthand)"
    return f"{where}: {message}" if where else message


def _duplicates(entries: list[_Entry], jobs: list[VideoJob], name: str, day: date) -> list[str]:
    holders: dict[str, list[tuple[str, bool]]] = {}  # job id -> (label, derived?) of every job that has it
    for entry, job in zip(entries, jobs, strict=True):
        resolved = job.for_date(day)
        holders.setdefault(resolved.effective_job_id(), []).append((entry.label, resolved.job_id is None))
    problems = []
    for job_id, same in holders.items():
        if len(same) > 1:
            labels = [label for label, _ in same]
            who = (f"{labels[0]} and {labels[1]} both have" if len(labels) == 2
                   else f"{', '.join(labels[:-1])} and {labels[-1]} all have")
            derived = all(is_derived for _, is_derived in same)
            hint = " (derived from the same spec; set job_id, or take: 2 for another take)" if derived else ""
            problems.append(f"{name}: {who} job_id {job_id}{hint}")
    return problems


def load_jobs(path: str | Path, *, dest: str | None = None, day: date | None = None) -> list[VideoJob]:
    """Read, validate and check the budget of every job in `path`; `dest` is the CLI's `--dest`.

    Job ids keep `{date}` (resolved at run time by `VideoJob.for_date`). Duplicates are checked on the ids
    resolved for `day` (default: today, UTC), the run's date: `clip-{date}` and `clip-20260102` share one
    folder on 2 January 2026 only, and two equal unresolved ids collide on every day, so they are caught too.
    A scheduled run should pass its scheduled date.
    """
    name = str(path)
    path = Path(path)
    parser = _PARSERS.get(path.suffix.lower())
    if parser is None:
        raise JobsFileError(f"{name}: unknown jobs file type {path.suffix or '(no suffix)'!r}; "
                            f"use {', '.join(SUFFIXES)}")
    try:
        text = path.read_bytes().decode("utf-8-sig")
    except OSError as exc:
        raise JobsFileError(f"{name}: cannot read the jobs file: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise JobsFileError(f"{name}: cannot read the jobs file: not UTF-8 text (byte {exc.start})") from None
    try:
        entries = parser(text, name)
    except RecursionError:  # `[[[[...` thousands deep: the parsers recurse once per level
        raise JobsFileError(f"{name}: nested too deeply to be a jobs file") from None
    if not entries:
        raise JobsFileError(f"{name}: the file has no jobs")
    problems: list[str] = []
    valid: list[_Entry] = []
    jobs: list[VideoJob] = []
    for entry in entries:
        if entry.error is None:
            data = entry.data if dest is None or "dest" in entry.data else {**entry.data, "dest": dest}
            try:
                job = VideoJob.model_validate(data)
                check_budget(job, plan_job(job))
            except ValidationError as exc:
                entry.error = _first_error(exc, entry.rename)
            except PlanError as exc:
                entry.error = str(exc)
            else:
                valid.append(entry)
                jobs.append(job)
        if entry.error is not None:
            problems.append(f"{entry.where}: {entry.error}")
    problems += _duplicates(valid, jobs, name, day or datetime.now(UTC).date())
    if problems:
        shown = problems[:MAX_REPORTED] + ([f"and {len(problems) - MAX_REPORTED} more"]
                                           if len(problems) > MAX_REPORTED else [])
        raise JobsFileError("; ".join(shown))
    return jobs


def price_batch(jobs: Sequence[VideoJob]) -> float:
    """The whole batch's credit estimate: the sum of every job's plan."""
    return sum(plan_job(job).estimated_credits for job in jobs)


def check_batch_budget(jobs: Sequence[VideoJob], max_credits: float | None) -> None:
    """`batch --max-credits`: refuse the whole file before anything is sent when its estimate is over."""
    total = price_batch(jobs)
    if max_credits is not None and total > max_credits:
        raise PlanError(f"the batch is estimated at {total:g} credits, over --max-credits {max_credits:g}; "
                        "raise --max-credits or remove jobs from the file")
