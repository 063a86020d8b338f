"""The Kling create request of each planned step, and the check that every one of them would be accepted.

Preflight builds every request of the plan before anything is sent, so anything the client would refuse
(an oversized image, a prompt over the limit, a field the provider needs) is a PlanError up front.
"""

from __future__ import annotations

import base64
from typing import Any

from pydantic import ValidationError

from kling_tasks.api import Image2VideoRequest, KlingError, Text2VideoRequest, VideoExtendRequest
from kling_tasks.image_sources import is_url
from kling_tasks.jobs import GenerationSpec, Plan, PlanError, PlannedStep, VideoJob
from kling_tasks.settings import Provider
from kling_tasks.step_results import Rendered

TaskRequest = Text2VideoRequest | Image2VideoRequest | VideoExtendRequest


# What check_requests sends through the request models in place of a picture sent inline (a continuation's
# frame is not known yet; a file's or S3 object's size and kind were checked by the plan): a tiny valid JPEG
# header is enough, the models check the encoding and the size, not the picture.
_PLANNED_FRAME = b"\xff\xd8\xff\xe0planned-frame\xff\xd9"


def build_request(step: PlannedStep, generation: GenerationSpec, parent: Rendered | None,
                  picture: bytes | None = None) -> TaskRequest:
    """The create request of `step`. `picture` is what an image2video step sends inline: a last-frame
    continuation's start frame, or the generation's file or S3 image (a URL image is sent as the URL)."""
    if step.from_last_frame:
        if picture is None:
            raise ValueError(f"{step.name} needs the previous clip's last frame")
        return Image2VideoRequest(
            image=base64.b64encode(picture).decode("ascii"), model_name=generation.model_name,
            prompt=step.prompt, negative_prompt=step.negative_prompt, cfg_scale=step.cfg_scale,
            mode=generation.mode, duration=generation.duration, sound=generation.sound)
    if step.kind == "video-extend":
        if parent is None:
            raise ValueError(f"{step.name} needs its parent's video")
        return VideoExtendRequest(video_id=parent.video_id, parent_task_id=parent.task_id, prompt=step.prompt,
                                  negative_prompt=step.negative_prompt, cfg_scale=step.cfg_scale)
    common: dict[str, Any] = {
        "model_name": generation.model_name,
        "prompt": generation.prompt,
        "negative_prompt": generation.negative_prompt,
        "cfg_scale": generation.cfg_scale,
        "mode": generation.mode,
        "duration": generation.duration,
        "sound": generation.sound,
    }
    if step.kind == "image2video":
        assert generation.image is not None
        if is_url(generation.image):
            return Image2VideoRequest(image=generation.image, **common)
        if picture is None:
            raise ValueError(f"{step.name} needs the bytes of {generation.image!r}")
        return Image2VideoRequest(image=base64.b64encode(picture).decode("ascii"), **common)
    return Text2VideoRequest(aspect_ratio=generation.aspect_ratio, **common)


def check_requests(job: VideoJob, plan: Plan, provider: Provider) -> None:
    """Build (and render to a body) every request of the plan; a refusal is one PlanError line."""
    stand_in = Rendered(kind="text2video", task_id="0", external_task_id=None, video_id="planned", url="",
                        duration=0.0, credits=None, request_id=None, queued_seconds=0.0, processing_seconds=0.0)
    for step in plan.steps:
        try:
            build_request(step, job.generate, stand_in, _PLANNED_FRAME).to_body(provider)
        except ValidationError as exc:
            problems = "; ".join(str(error["msg"]).removeprefix("Value error, ") for error in exc.errors())
            raise PlanError(f"{step.name}: Kling would refuse the request: {problems}") from None
        except (ValueError, KlingError) as exc:
            raise PlanError(f"{step.name}: Kling would refuse the request: {exc}") from None
