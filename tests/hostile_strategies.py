"""Hypothesis profiles and strategies shared by the hostile-input tests (job spec, jobs file, CLI).

Profiles: `ci` (the default) keeps the default suite's share to seconds; `HYPOTHESIS_PROFILE=full` runs ten
times as many cases per test. No example database: a failure prints its reproduction blob instead.

A "broken job" is a valid job with exactly one defect injected; it carries the words its error must name, so
a test checks that the refusal is the right one, not merely a refusal.
"""

from __future__ import annotations

import math
import os
import re
from dataclasses import dataclass, field
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from kling_tasks.api.catalog import EXTENDABLE_MODELS, PROMPT_MAX, T2V_MODELS

settings.register_profile("ci", database=None, deadline=None, print_blob=True,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
settings.register_profile("full", parent=settings.get_profile("ci"))
PROFILE = os.environ.get("HYPOTHESIS_PROFILE", "ci")
settings.load_profile(PROFILE)
SCALE = 10 if PROFILE == "full" else 1


def examples(n: int) -> int:
    """Cases for one test: `n` in the default suite, ten times more under HYPOTHESIS_PROFILE=full."""
    return n * SCALE


# ---- text a user (or an attacker writing a jobs file) may send ----------------------------------------------

NASTY = [
    "../../etc/passwd", "..", ".", "../", "..\\..\\boot.ini", "/abs/path", "a/b/c", "C:\\temp\\x", "~/x",
    "%2e%2e%2f", "'; DROP TABLE jobs; --", '"quoted"', "it's", "line1\nline2", "\r\n", "tab\there", "\x00nul",
    "{date}", "{date}/../x", "$(rm -rf /)", "`id`", "${HOME}", "🎬 clip", "\u202eevil", "a\u2028b", "ｆｕｌｌ",
    "s3://bucket/key", "file:///etc/passwd", "CON", "nul.txt", "manifest.json", "step-00.mp4", " ", "x" * 300,
]
hostile_text = st.one_of(
    st.sampled_from(NASTY),
    st.text(min_size=1, max_size=40),
    st.lists(st.sampled_from(NASTY) | st.text(max_size=8), min_size=2, max_size=4).map("".join),
)
prompts = hostile_text.filter(lambda t: 0 < len(t) <= PROMPT_MAX)
_JOB_ID = re.compile(r"[a-z0-9][a-z0-9-]{0,39}")
valid_job_ids = st.from_regex(r"\A[a-z0-9][a-z0-9-]{0,30}\Z").filter(lambda s: _JOB_ID.fullmatch(s) is not None)
invalid_job_ids = st.one_of(
    hostile_text,
    valid_job_ids.map(lambda s: s + "\n"),
    valid_job_ids.map(lambda s: "../" + s),
    valid_job_ids.map(lambda s: s + "/manifest"),
    valid_job_ids.map(str.upper),
    st.just("a" * 41),
).filter(lambda s: _JOB_ID.fullmatch(s.replace("{date}", "20260101")) is None)


@st.composite
def valid_jobs(draw: Any) -> dict[str, Any]:
    """A job VideoJob accepts (and that preflight passes with a writable destination and credentials)."""
    model = draw(st.sampled_from(sorted(EXTENDABLE_MODELS & T2V_MODELS)))
    duration = draw(st.sampled_from(["5", "10"]))
    generate: dict[str, Any] = {"prompt": draw(prompts), "model_name": model, "duration": duration,
                                "mode": draw(st.sampled_from(["std", "pro"])),
                                "aspect_ratio": draw(st.sampled_from(["16:9", "9:16", "1:1"]))}
    if draw(st.booleans()):
        generate["negative_prompt"] = draw(prompts)
    if draw(st.booleans()):
        generate["cfg_scale"] = draw(st.floats(0, 1))
    job: dict[str, Any] = {"generate": generate,
                           "extensions": [{"prompt": p} for p in draw(st.lists(prompts, max_size=3))]}
    if draw(st.booleans()):
        job["job_id"] = draw(valid_job_ids)
    if draw(st.booleans()):
        job["take"] = draw(st.integers(1, 999))
    return job


@dataclass
class Broken:
    job: dict[str, Any]
    defect: str  # what was broken, for the failure message
    words: list[str] = field(default_factory=list)  # the error must name at least one of these


def _not_in(allowed: set[str] | frozenset[str]) -> Any:
    # Not even as text: `--duration 5` and a jobs file's `duration: 5` are the valid "5".
    return st.one_of(hostile_text, st.integers(), st.floats(), st.none(), st.booleans()).filter(
        lambda v: str(v) not in allowed)


def _bad_numbers(low: float, high: float, integral: bool = False) -> Any:
    out_of_range = st.one_of(st.floats(max_value=low, exclude_max=True), st.floats(min_value=high,
                                                                                   exclude_min=True))
    if integral:
        return st.one_of(st.integers(max_value=int(low) - 1), st.integers(min_value=int(high) + 1),
                         hostile_text.filter(lambda t: not t.strip().lstrip("+-").isdigit()),
                         st.floats().filter(lambda f: not f.is_integer() if math.isfinite(f) else True))
    return st.one_of(out_of_range.filter(lambda f: not math.isnan(f)), st.just(math.nan),
                     hostile_text.filter(lambda t: _not_a_number(t)))


def _not_a_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return True
    return False


@st.composite
def broken_jobs(draw: Any) -> Broken:
    """A valid job with one defect; every defect is one preflight must refuse before any request."""
    job = draw(valid_jobs())
    gen = job["generate"]
    kind = draw(st.sampled_from([
        "prompt-empty", "prompt-long", "negative-long", "mode", "duration", "aspect", "model", "not-extendable",
        "too-many-extensions", "cfg", "ext-cfg", "ext-prompt-empty", "job-id", "take", "max-credits", "budget",
        "image-missing", "image-suffix", "extra-key", "extra-generate-key", "prompt-type", "extensions-type",
    ]))
    words: list[str]
    if kind == "prompt-empty":
        gen["prompt"], words = draw(st.sampled_from(["", None])), ["prompt"]
    elif kind == "prompt-long":
        gen["prompt"], words = draw(st.text(min_size=PROMPT_MAX + 1, max_size=PROMPT_MAX + 40)), ["prompt"]
    elif kind == "negative-long":
        gen["negative_prompt"], words = "n" * (PROMPT_MAX + draw(st.integers(1, 50))), ["negative_prompt"]
    elif kind == "mode":
        gen["mode"], words = draw(_not_in({"std", "pro"})), ["mode"]
    elif kind == "duration":
        gen["duration"], words = draw(_not_in({"5", "10"})), ["duration"]
    elif kind == "aspect":
        gen["aspect_ratio"], words = draw(_not_in({"16:9", "9:16", "1:1"})), ["aspect_ratio"]
    elif kind == "model":
        gen["model_name"], words = draw(hostile_text.filter(lambda t: t not in T2V_MODELS)), ["model"]
    elif kind == "not-extendable":
        gen["model_name"] = draw(st.sampled_from(sorted(T2V_MODELS - EXTENDABLE_MODELS)))
        job["extensions"] = job["extensions"] or [{"prompt": "more"}]
        job["continuation"] = "extend"  # `auto` would continue from last frames: a valid plan
        words = ["cannot be extended"]
    elif kind == "too-many-extensions":
        job["extensions"], words = [{"prompt": "again"}] * draw(st.integers(36, 60)), ["extensions"]
    elif kind == "cfg":
        gen["cfg_scale"], words = draw(_bad_numbers(0, 1)), ["cfg_scale"]
    elif kind == "ext-cfg":
        job["extensions"] = [{"prompt": "on", "cfg_scale": draw(_bad_numbers(0, 1))}]
        words = ["cfg_scale"]
    elif kind == "ext-prompt-empty":
        job["extensions"], words = [*job["extensions"], {"prompt": ""}], ["prompt"]
    elif kind == "job-id":
        job["job_id"], words = draw(invalid_job_ids), ["job_id"]
    elif kind == "take":
        job["take"], words = draw(_bad_numbers(1, 999, integral=True)), ["take"]
    elif kind == "max-credits":
        job["max_credits"] = draw(st.one_of(st.floats(max_value=0), st.just(math.nan),
                                            hostile_text.filter(_not_a_number)))
        words = ["max_credits"]
    elif kind == "budget":
        job["max_credits"], words = draw(st.floats(1e-6, 0.099)), ["max_credits", "estimated"]
    elif kind == "image-missing":
        stem = draw(hostile_text.filter(lambda t: "\x00" not in t and not t.startswith(("http://", "https://"))))
        gen["image"], words = f"/nonexistent-kling-dir/{stem}.png", ["image"]
    elif kind == "image-suffix":
        stem = draw(hostile_text.filter(lambda t: not t.startswith(("http://", "https://"))))
        gen["image"], words = stem.rstrip(".") + draw(st.sampled_from([".gif", ".txt", "", ".png.exe"])), ["image"]
    elif kind == "extra-key":
        name = draw(hostile_text.filter(lambda t: t not in ("generate", "extensions", "dest", "job_id", "take",
                                                              "max_credits")))
        job[name], words = "x", ["Extra inputs"]
    elif kind == "extra-generate-key":
        name = draw(hostile_text.filter(lambda t: t not in gen and t not in (
            "image", "negative_prompt", "cfg_scale", "prompt", "model_name", "mode", "duration", "aspect_ratio")))
        gen[name], words = "x", ["Extra inputs"]
    elif kind == "prompt-type":
        gen["prompt"], words = draw(st.one_of(st.integers(), st.lists(st.text()), st.dictionaries(
            st.text(), st.text(), max_size=2))), ["prompt"]
    else:
        job["extensions"], words = draw(st.one_of(hostile_text, st.integers(), st.lists(st.integers(), min_size=1))), [
            "extensions"]
    return Broken(job=job, defect=kind, words=words)


def one_clear_line(message: str, words: list[str], defect: str) -> None:
    """A refusal is one line that names what is wrong."""
    assert message.strip(), f"{defect}: empty error"
    assert "\n" not in message.strip(), f"{defect}: error of several lines: {message!r}"
    assert "Traceback" not in message, f"{defect}: a traceback: {message!r}"
    assert any(word in message for word in words), f"{defect}: error does not name {words}: {message!r}"
