"""The user's plan: what to generate, how to extend it, where to store it, and what it may cost.

Everything here is pure (no HTTP, no Prefect) so a plan can be validated and priced before anything is paid.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from datetime import date
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

PROMPT_LIMIT = 2500
MAX_TOTAL_SECONDS = 180.0
# Kling adds 4-5 s per extension; plans are checked against the worst case so they can never overrun.
MAX_SECONDS_PER_EXTENSION = 5.0
EXTENDABLE_MODELS = frozenset({"kling-v1", "kling-v1-5", "kling-v1-6"})

TEXT2VIDEO_MODELS = frozenset(
    {"kling-v1", "kling-v1-6", "kling-v2-master", "kling-v2-1-master", "kling-v2-5-turbo", "kling-v2-6"}
)
IMAGE2VIDEO_MODELS = TEXT2VIDEO_MODELS | {"kling-v1-5", "kling-v2-1"}
# Master models have no std/pro split: one price per duration (reference §6, §13).
MASTER_MODELS = frozenset({"kling-v2-master", "kling-v2-1-master"})

# Units per clip (reference §13): (std 5 s, std 10 s, pro 5 s, pro 10 s).
_PRICES: dict[str, tuple[float, float, float, float]] = {
    "kling-v1": (1, 2, 3.5, 7),
    "kling-v1-5": (2, 4, 3.5, 7),
    "kling-v1-6": (2, 4, 3.5, 7),
    "kling-v2-master": (10, 20, 10, 20),
    "kling-v2-1-master": (10, 20, 10, 20),
    "kling-v2-1": (2, 4, 3.5, 7),
    "kling-v2-5-turbo": (1.5, 3, 2.5, 5),
    "kling-v2-6": (1.5, 3, 2.5, 5),
}
# An extension costs a 5 s clip of the source model and mode (reference §8).
_EXTENSION_PRICES: dict[str, tuple[float, float]] = {
    "kling-v1": (1, 3.5),
    "kling-v1-5": (2, 3.5),
    "kling-v1-6": (2, 3.5),
}

DATE_PLACEHOLDER = "{date}"
_JOB_ID_PATTERN = re.compile(r"^[a-z0-9][a-z0-9-]{0,39}$")

StepKind = Literal["text2video", "image2video", "video-extend"]


class PlanError(ValueError):
    """The plan cannot run as given. Raised before any request is sent."""


class GenerationSpec(BaseModel):
    """The first step: text2video, or image2video when `image` is set."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, max_length=PROMPT_LIMIT)
    negative_prompt: str | None = Field(default=None, max_length=PROMPT_LIMIT)
    image: str | None = Field(default=None, description="Local .jpg/.png path or http(s) URL: image2video.")
    model_name: str = "kling-v1"
    mode: Literal["std", "pro"] = "std"
    duration: Literal["5", "10"] = "5"
    aspect_ratio: Literal["16:9", "9:16", "1:1"] = "16:9"
    cfg_scale: float | None = Field(default=None, ge=0, le=1)

    @property
    def kind(self) -> StepKind:
        return "image2video" if self.image else "text2video"


class ExtensionSpec(BaseModel):
    """One video-extend step: Kling continues the previous video by 4-5 s."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, max_length=PROMPT_LIMIT)
    negative_prompt: str | None = Field(default=None, max_length=PROMPT_LIMIT)
    cfg_scale: float | None = Field(default=None, ge=0, le=1)


class VideoJob(BaseModel):
    """A whole long video: generate, extend N times, store every step under `dest`."""

    model_config = ConfigDict(extra="forbid")

    generate: GenerationSpec
    extensions: list[ExtensionSpec] = Field(default_factory=list)
    dest: str = Field(default="./kling-output", description="s3://bucket/prefix or a local folder.")
    job_id: str | None = Field(default=None, description="Default: a stable digest of the spec.")
    max_credits: float | None = Field(default=None, gt=0, description="Refuse plans estimated above this.")

    @field_validator("job_id")
    @classmethod
    def _job_id_shape(cls, value: str | None) -> str | None:
        if value is not None and not _JOB_ID_PATTERN.match(value.replace(DATE_PLACEHOLDER, "20260101")):
            raise ValueError(
                "job_id must be 1-40 characters of lowercase letters, digits and dashes "
                f"(it may contain {DATE_PLACEHOLDER}, replaced by the run's scheduled date)"
            )
        return value

    @model_validator(mode="after")
    def _plan_is_possible(self) -> VideoJob:
        check_capabilities(self)
        return self

    def for_date(self, day: date) -> VideoJob:
        """Resolve `{date}` in job_id: a scheduled deployment makes a new video per day, while a retry or
        rerun of the same day's run still finds (and never re-pays) that day's steps."""
        if self.job_id is None or DATE_PLACEHOLDER not in self.job_id:
            return self
        return self.model_copy(update={"job_id": self.job_id.replace(DATE_PLACEHOLDER, day.strftime("%Y%m%d"))})

    def spec_digest(self) -> str:
        """Digest of what is generated (not where it is stored): the same plan gives the same ids."""
        spec = self.model_dump(include={"generate", "extensions"}, mode="json", exclude_defaults=True)
        spec["generate"]["image"] = image_fingerprint(self.generate.image)
        return _digest(spec)

    def effective_job_id(self) -> str:
        return self.job_id or f"job-{self.spec_digest()[:12]}"

    def public_spec(self) -> dict[str, object]:
        """The spec as written to manifests and artifacts: no image bytes, nothing secret."""
        spec = self.model_dump(mode="json")
        spec["job_id"] = self.effective_job_id()
        return spec


def check_capabilities(job: VideoJob) -> None:
    """Model, mode, duration and length rules from the reference's capability map (§6, §8)."""
    gen = job.generate
    allowed = IMAGE2VIDEO_MODELS if gen.kind == "image2video" else TEXT2VIDEO_MODELS
    if gen.model_name not in allowed:
        raise PlanError(
            f"model {gen.model_name!r} cannot do {gen.kind}; choose one of {', '.join(sorted(allowed))}"
        )
    if job.extensions and gen.model_name not in EXTENDABLE_MODELS:
        raise PlanError(
            f"model {gen.model_name!r} cannot be extended; video-extend needs one of "
            f"{', '.join(sorted(EXTENDABLE_MODELS))} (or drop the extensions)"
        )
    worst = float(gen.duration) + MAX_SECONDS_PER_EXTENSION * len(job.extensions)
    if worst > MAX_TOTAL_SECONDS:
        most = int((MAX_TOTAL_SECONDS - float(gen.duration)) // MAX_SECONDS_PER_EXTENSION)
        raise PlanError(
            f"{len(job.extensions)} extensions may reach {worst:.0f} s, over Kling's {MAX_TOTAL_SECONDS:.0f} s "
            f"cap for an extended video; use at most {most} extensions after a {gen.duration} s clip"
        )
    if gen.image and not gen.image.startswith(("http://", "https://")):
        path = Path(gen.image)
        if path.suffix.lower() not in {".jpg", ".jpeg", ".png"}:
            raise PlanError(f"image {gen.image!r} must be a .jpg, .jpeg or .png file or an http(s) URL")


def image_fingerprint(image: str | None) -> str | None:
    """A local image is identified by its bytes (a renamed file is the same input), a URL by itself."""
    if image is None or image.startswith(("http://", "https://")):
        return image
    path = Path(image)
    if not path.is_file():
        raise PlanError(f"image file {image!r} does not exist")
    return "sha256:" + hashlib.sha256(path.read_bytes()).hexdigest()


@dataclass(frozen=True)
class PlannedStep:
    index: int
    kind: StepKind
    name: str  # what the step does, for task-run names: generate, extend-2-of-3
    external_task_id: str
    estimated_credits: float
    prompt: str
    negative_prompt: str | None
    cfg_scale: float | None
    attempt: int

    @property
    def label(self) -> str:
        return f"step-{self.index:02d}"


@dataclass(frozen=True)
class Plan:
    job_id: str
    model_name: str
    mode: str
    steps: tuple[PlannedStep, ...]

    @property
    def estimated_credits(self) -> float:
        return sum(step.estimated_credits for step in self.steps)


def generation_credits(model_name: str, mode: str, duration: str) -> float:
    std5, std10, pro5, pro10 = _PRICES[model_name]
    if mode == "pro" and model_name not in MASTER_MODELS:
        return pro5 if duration == "5" else pro10
    return std5 if duration == "5" else std10


def extension_credits(model_name: str, mode: str) -> float:
    std, pro = _EXTENSION_PRICES[model_name]
    return pro if mode == "pro" else std


def plan_job(job: VideoJob, attempts: dict[int, int] | None = None) -> Plan:
    """Turn a job into steps with deterministic external_task_ids and a credit estimate.

    `attempts` maps a step index to its resubmission number (0 = first try); bumping one changes that
    step's id and, through the chain digest, every later step's id.
    """
    attempts = attempts or {}
    job_id = job.effective_job_id()
    gen = job.generate
    total = len(job.extensions)
    # Digests cover only values that differ from the defaults, so adding an optional field in a later release
    # leaves every existing id alone (a changed id would make in-flight jobs pay again after an upgrade).
    chain = _digest({"image": image_fingerprint(gen.image),
                     **gen.model_dump(exclude={"image"}, mode="json", exclude_defaults=True)})
    steps: list[PlannedStep] = []

    def add(index: int, kind: StepKind, name: str, spec: dict[str, object], credits: float,
            prompt: str, negative: str | None, cfg: float | None) -> None:
        nonlocal chain
        attempt = attempts.get(index, 0)
        chain = _digest({"parent": chain, "step": spec, "attempt": attempt})
        steps.append(PlannedStep(index=index, kind=kind, name=name,
                                 external_task_id=external_task_id(job_id, index, chain, attempt),
                                 estimated_credits=credits, prompt=prompt, negative_prompt=negative,
                                 cfg_scale=cfg, attempt=attempt))

    add(0, gen.kind, "generate", {}, generation_credits(gen.model_name, gen.mode, gen.duration),
        gen.prompt, gen.negative_prompt, gen.cfg_scale)
    for i, ext in enumerate(job.extensions, start=1):
        add(i, "video-extend", f"extend-{i}-of-{total}", ext.model_dump(mode="json", exclude_defaults=True),
            extension_credits(gen.model_name, gen.mode), ext.prompt, ext.negative_prompt, ext.cfg_scale)
    return Plan(job_id=job_id, model_name=gen.model_name, mode=gen.mode, steps=tuple(steps))


def check_budget(job: VideoJob, plan: Plan) -> None:
    if job.max_credits is not None and plan.estimated_credits > job.max_credits:
        raise PlanError(
            f"the plan is estimated at {plan.estimated_credits:g} credits, over max_credits "
            f"{job.max_credits:g}; raise --max-credits or shorten the plan"
        )


def external_task_id(job_id: str, index: int, chain_digest: str, attempt: int = 0) -> str:
    """`{job_id}-s{index}-{digest}`: <= 64 chars of [A-Za-z0-9-], unique per step, plan and attempt."""
    suffix = f"-r{attempt}" if attempt else ""
    return f"{job_id}-s{index}{suffix}-{chain_digest[:12]}"


def _digest(value: object) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, separators=(",", ":")).encode()).hexdigest()
