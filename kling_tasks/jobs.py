"""The user's plan: what to generate, how to extend it, where to store it, and what it may cost.

No Prefect and no Kling: a plan is validated and priced before anything is paid. The one read is the start
image's (a file or an S3 object), whose bytes are part of the generation's identity.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import date
from typing import Any, Literal

from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    PrivateAttr,
    SerializationInfo,
    SerializerFunctionWrapHandler,
    field_validator,
    model_serializer,
    model_validator,
)

from kling_tasks import identity, image_sources
from kling_tasks.api.catalog import (
    EXTENDABLE_MODELS,
    I2V_MODELS,
    MAX_EXTENDED_SECONDS,
    MAX_SECONDS_PER_EXTENSION,
    PROMPT_MAX,
    SOUND_MODES,
    T2V_MODELS,
    extension_credits,
    generation_credits,
)

# Re-exported: where the rest of the package has always imported them from.
from kling_tasks.image_sources import public_image as public_image
from kling_tasks.plan_error import PlanError as PlanError

DATE_PLACEHOLDER = "{date}"
# Matched whole (fullmatch: `$` alone would let a trailing newline through into folder names and S3 keys).
_JOB_ID_PATTERN = re.compile(r"[a-z0-9][a-z0-9-]{0,39}")

StepKind = Literal["text2video", "image2video", "video-extend"]
Continuation = Literal["auto", "extend", "last-frame"]
# How a step came to be: the generation, a video-extend call, or an image2video of the previous clip's last frame.
StepSource = Literal["generate", "extend", "last-frame"]


class GenerationSpec(BaseModel):
    """The first step: text2video, or image2video when `image` is set."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, max_length=PROMPT_MAX)
    negative_prompt: str | None = Field(default=None, max_length=PROMPT_MAX)
    # min_length: an empty image was neither image2video nor text2video (its digest read the folder ".")
    image: str | None = Field(default=None, min_length=1, description=(
        "image2video from a local .jpg/.png path or s3://bucket/key (both sent inline), or an http(s) URL."))
    model_name: str = "kling-v1"
    mode: Literal["std", "pro"] = "std"
    duration: Literal["5", "10"] = "5"
    aspect_ratio: Literal["16:9", "9:16", "1:1"] = "16:9"
    cfg_scale: float | None = Field(default=None, ge=0, le=1)
    sound: Literal["on", "off"] | None = Field(
        default=None, description="Native audio (kling-v2-6 pro, kling-v3); continuations keep it.")

    _image_digest: tuple[str, str] | None = PrivateAttr(default=None)  # (image, its digest)

    @property
    def kind(self) -> StepKind:
        return "image2video" if self.image else "text2video"

    def image_digest(self) -> str | None:
        """The image's identity (kling_tasks.image_sources.image_digest), read once per spec object."""
        if self.image is None:
            return None
        if self._image_digest is None or self._image_digest[0] != self.image:
            self._image_digest = (self.image, image_sources.image_digest(self.image))
        return self._image_digest[1]

    @model_serializer(mode="wrap")
    def _image_as_stored(self, handler: SerializerFunctionWrapHandler, info: SerializationInfo) -> Any:
        # JSON is what Prefect stores as a flow run's parameters: a presigned URL's signature stays in memory.
        data = handler(self)
        if info.mode_is_json() and isinstance(data, dict) and isinstance(data.get("image"), str):
            data["image"] = image_sources.withheld(data["image"])
        return data

    def __repr_args__(self) -> Iterator[tuple[str | None, Any]]:
        for name, value in super().__repr_args__():  # a repr ends up in tracebacks and logs
            yield name, public_image(value) if name == "image" and isinstance(value, str) else value


class ExtensionSpec(BaseModel):
    """One video-extend step: Kling continues the previous video by 4-5 s."""

    model_config = ConfigDict(extra="forbid")

    prompt: str = Field(min_length=1, max_length=PROMPT_MAX)
    negative_prompt: str | None = Field(default=None, max_length=PROMPT_MAX)
    cfg_scale: float | None = Field(default=None, ge=0, le=1)


class VideoJob(BaseModel):
    """A whole long video: generate, extend N times, store every step under `dest`."""

    model_config = ConfigDict(extra="forbid")

    generate: GenerationSpec
    extensions: list[ExtensionSpec] = Field(default_factory=list)
    dest: str = Field(default="./kling-output", description="s3://bucket/prefix or a local folder.")
    job_id: str | None = Field(
        default=None,
        description="Names the job's folder and namespaces its Kling tasks. Default: a digest of the spec.",
    )
    take: int = Field(default=1, ge=1, le=999, description="2, 3, ...: pay for a deliberate new take of the same spec.")
    max_credits: float | None = Field(default=None, gt=0, description="Refuse plans estimated above this.")
    continuation: Continuation = Field(
        default="auto",
        description="How extensions continue the video: `extend` (Kling's video-extend: kling-v1, v1-5, v1-6), "
                    "`last-frame` (image2video from the previous clip's last frame, any model), or `auto` "
                    "(video-extend where the model has it, else last-frame).",
    )
    max_seconds: float = Field(default=MAX_EXTENDED_SECONDS, gt=0, le=3600,
                               description="Longest a last-frame chain may grow (video-extend's cap is 180 s).")

    @field_validator("job_id")
    @classmethod
    def _job_id_shape(cls, value: str | None) -> str | None:
        if value is not None and not _JOB_ID_PATTERN.fullmatch(value.replace(DATE_PLACEHOLDER, "20260101")):
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

    def resolved_continuation(self) -> Literal["extend", "last-frame"]:
        """What `auto` means for this job's model: video-extend where Kling has it, last-frame otherwise."""
        if self.continuation == "auto":
            return "extend" if self.generate.model_name in EXTENDABLE_MODELS else "last-frame"
        return self.continuation

    def step_contents(self) -> list[dict[str, object]]:
        """Each step's own content (non-default values only): the inputs of the identity chain.

        A last-frame continuation is another task than a video-extend of the same prompt, so its content
        says so; video-extend steps keep the content (and so the ids) they had before continuations existed.
        """
        generation = identity.generation_content(
            self.generate.model_dump(mode="json", exclude_defaults=True), self.generate.image_digest(), self.take)
        via = {"via": "last-frame"} if self.resolved_continuation() == "last-frame" else {}
        return [generation, *({**ext.model_dump(mode="json", exclude_defaults=True), **via}
                              for ext in self.extensions)]

    def effective_job_id(self) -> str:
        """The user's job id, or `job-{digest of the whole spec}` (its folder; the tasks' namespace is `kp`)."""
        return self.job_id or f"job-{identity.digest(self.step_contents())[:12]}"

    def namespace(self) -> str:
        return self.job_id or identity.DERIVED_NAMESPACE

    def public_spec(self) -> dict[str, object]:
        """The spec as written to manifests and artifacts: no image bytes, no signed URL query, nothing secret."""
        spec = self.model_dump(mode="json")
        spec["job_id"] = self.effective_job_id()
        if self.generate.image is not None:
            spec["generate"]["image"] = public_image(self.generate.image)
        return spec


def check_folder_id(value: str, what: str) -> str:
    """A resolved job id or batch id given on its own (`status JOB_ID`, `--batch-id`): one folder or file name
    under the destination, never a path (`../x`, `other-job/manifest`) nor a name with odd characters."""
    if not _JOB_ID_PATTERN.fullmatch(value):
        raise PlanError(f"{what} {value!r} is not valid: 1-40 characters of lowercase letters, digits and dashes")
    return value


def check_capabilities(job: VideoJob) -> None:
    """Model, mode, duration, length and image rules from the client's catalogue (reference §5, §6, §8)."""
    gen = job.generate
    allowed = I2V_MODELS if gen.kind == "image2video" else T2V_MODELS
    if gen.model_name not in allowed:
        raise PlanError(
            f"model {gen.model_name!r} cannot do {gen.kind}; choose one of {', '.join(sorted(allowed))}"
        )
    if job.extensions and job.resolved_continuation() == "last-frame":
        check_last_frame_chain(job)
    elif job.extensions:
        check_extend_chain(job)
    if gen.sound == "on" and (gen.model_name, gen.mode) not in SOUND_MODES:
        raise PlanError(f"model {gen.model_name!r} in {gen.mode} mode makes no sound; sound needs one of "
                        f"{', '.join(f'{model} {mode}' for model, mode in sorted(SOUND_MODES))}")
    if gen.image is not None and image_sources.is_url(gen.image):
        image_sources.check_url(gen.image)
    elif gen.image is not None:
        gen.image_digest()  # reading a file or an S3 object checks it: there, readable, an image, <= 10 MB


def check_last_frame_chain(job: VideoJob) -> None:
    """Every continuation is an image2video clip of the job's model, mode and duration."""
    gen = job.generate
    if gen.model_name not in I2V_MODELS:
        raise PlanError(f"model {gen.model_name!r} cannot do image2video, which last-frame continuation needs")
    length = float(gen.duration) * (1 + len(job.extensions))
    if length > job.max_seconds:
        most = int(job.max_seconds // float(gen.duration)) - 1
        raise PlanError(
            f"{len(job.extensions)} extensions by last-frame continuation, {gen.duration} s each, make "
            f"{length:.0f} s, over max_seconds {job.max_seconds:g}; use at most {max(most, 0)} extensions or "
            "raise max_seconds"
        )


def check_extend_chain(job: VideoJob) -> None:
    gen = job.generate
    if gen.model_name not in EXTENDABLE_MODELS:
        raise PlanError(
            f"model {gen.model_name!r} cannot be extended with video-extend, which needs one of "
            f"{', '.join(sorted(EXTENDABLE_MODELS))}; use continuation auto or last-frame (image2video from "
            "each clip's last frame), or drop the extensions"
        )
    worst = float(gen.duration) + MAX_SECONDS_PER_EXTENSION * len(job.extensions)
    if worst > MAX_EXTENDED_SECONDS:
        most = int((MAX_EXTENDED_SECONDS - float(gen.duration)) // MAX_SECONDS_PER_EXTENSION)
        raise PlanError(
            f"{len(job.extensions)} extensions may reach {worst:.0f} s, over Kling's {MAX_EXTENDED_SECONDS:.0f} s "
            f"cap for an extended video; use at most {most} extensions after a {gen.duration} s clip"
        )


@dataclass(frozen=True)
class PlannedStep:
    index: int
    kind: StepKind  # the Kling task's kind: a last-frame continuation is an image2video task
    name: str  # what the step does, for task-run names: generate, extend-2-of-3, continue-2-of-3
    external_task_id: str
    content_digest: str  # the step's own content, for the ledger's "same spec" check
    estimated_credits: float
    prompt: str
    negative_prompt: str | None
    cfg_scale: float | None
    attempt: int
    source: StepSource = "generate"
    image_digest: str | None = None  # the generation's image as planned: the submit sends only those bytes

    @property
    def label(self) -> str:
        return f"step-{self.index:02d}"

    @property
    def from_last_frame(self) -> bool:
        return self.source == "last-frame"


@dataclass(frozen=True)
class Plan:
    job_id: str
    model_name: str
    mode: str
    steps: tuple[PlannedStep, ...]
    continuation: Literal["extend", "last-frame"] = "extend"

    @property
    def stitched(self) -> bool:
        """Clips are stored one by one (clip-NN.mp4) and joined here (last-frame), not by Kling (video-extend)."""
        return self.continuation == "last-frame"

    @property
    def estimated_credits(self) -> float:
        return sum(step.estimated_credits for step in self.steps)


def plan_job(job: VideoJob, attempts: dict[int, int] | None = None) -> Plan:
    """Turn a job into steps with deterministic external_task_ids (DESIGN §2.1) and a credit estimate.

    `attempts` maps a step index to its resubmission number (0 = first try); bumping one changes that
    step's id and, through the chain, every later step's id.
    """
    attempts = attempts or {}
    gen = job.generate
    total = len(job.extensions)
    contents = job.step_contents()
    continuation = job.resolved_continuation()
    chain: str | None = None
    steps: list[PlannedStep] = []
    for index, content in enumerate(contents):
        attempt = attempts.get(index, 0)
        chain = identity.chain_digest(chain, content, attempt)
        source: StepSource = "generate" if index == 0 else continuation
        if index == 0:
            kind: StepKind = gen.kind
            name, credits = "generate", generation_credits(gen.model_name, gen.mode, gen.duration)
            prompt, negative, cfg = gen.prompt, gen.negative_prompt, gen.cfg_scale
        else:
            ext = job.extensions[index - 1]
            if source == "last-frame":  # an image2video clip of the job's model, mode and duration
                kind, name = "image2video", f"continue-{index}-of-{total}"
                credits = generation_credits(gen.model_name, gen.mode, gen.duration)
            else:
                kind, name = "video-extend", f"extend-{index}-of-{total}"
                credits = extension_credits(gen.model_name, gen.mode)
            prompt, negative, cfg = ext.prompt, ext.negative_prompt, ext.cfg_scale
        steps.append(PlannedStep(
            index=index, kind=kind, name=name,
            external_task_id=identity.external_task_id(job.namespace(), index, chain),
            content_digest=identity.content_digest(content), estimated_credits=credits,
            prompt=prompt, negative_prompt=negative, cfg_scale=cfg, attempt=attempt, source=source,
            image_digest=gen.image_digest() if index == 0 else None))
    return Plan(job_id=job.effective_job_id(), model_name=gen.model_name, mode=gen.mode, steps=tuple(steps),
                continuation=continuation)


def check_budget(job: VideoJob, plan: Plan) -> None:
    if job.max_credits is not None and plan.estimated_credits > job.max_credits:
        raise PlanError(
            f"the plan is estimated at {plan.estimated_credits:g} credits, over max_credits "
            f"{job.max_credits:g}; raise --max-credits or shorten the plan"
        )
