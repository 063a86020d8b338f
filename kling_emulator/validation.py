"""Create-request validation as the reference gives it: 400/1201 naming the field, 404/1203 for a model."""

from __future__ import annotations

import base64
import binascii
from typing import Any

from kling_emulator import catalog
from kling_emulator.errors import ApiError, bad_param


def _text(body: dict[str, Any], field: str, required: bool = False) -> str | None:
    value = body.get(field)
    if value is None:
        if required:
            raise bad_param(f"{field} is required")
        return None
    if not isinstance(value, str):
        raise bad_param(f"{field} must be a string")
    if len(value) > catalog.PROMPT_LIMIT:
        raise bad_param(f"{field} must be at most {catalog.PROMPT_LIMIT} characters")
    if required and not value.strip():
        raise bad_param(f"{field} is required")
    return value


def _cfg_scale(body: dict[str, Any]) -> None:
    value = body.get("cfg_scale")
    if value is not None and (isinstance(value, bool) or not isinstance(value, int | float) or not 0 <= value <= 1):
        raise bad_param("cfg_scale must be a number in [0, 1]")


def _optional_string(body: dict[str, Any], field: str) -> None:
    if body.get(field) is not None and not isinstance(body[field], str):
        raise bad_param(f"{field} must be a string")


def validate_generation(kind: str, body: dict[str, Any]) -> dict[str, Any]:
    """Returns the normalised settings of a text2video / image2video request."""
    model = body.get("model_name") or "kling-v1"
    if model not in catalog.ALL_MODELS:
        raise ApiError(404, 1203, f"model_name {model} does not exist")
    allowed = catalog.TEXT2VIDEO_MODELS if kind == "text2video" else catalog.IMAGE2VIDEO_MODELS
    if model not in allowed:
        raise bad_param(f"model_name {model} does not support {kind}")
    _text(body, "prompt", required=kind == "text2video")
    _text(body, "negative_prompt")
    _cfg_scale(body)
    mode = body.get("mode", "std")
    if mode not in ("std", "pro"):
        raise bad_param("mode must be std or pro")
    duration = body.get("duration", "5")
    if not isinstance(duration, str):
        raise bad_param("duration must be a string such as \"5\"")
    if duration not in catalog.durations_for(model):
        raise bad_param(f"duration {duration} is not supported by {model}")
    aspect = body.get("aspect_ratio", "16:9")
    if kind == "text2video" and aspect not in catalog.ASPECT_RATIOS:
        raise bad_param(f"aspect_ratio must be one of {', '.join(sorted(catalog.ASPECT_RATIOS))}")
    if kind == "image2video":
        _check_image(body.get("image"))
        aspect = "16:9"  # the output follows the image; the emulator renders 16:9
    for field in ("callback_url", "external_task_id"):
        _optional_string(body, field)
    return {"model": model, "mode": mode, "duration": duration, "aspect_ratio": aspect}


def _check_image(image: Any) -> None:
    if not isinstance(image, str) or not image:
        raise bad_param("image is required (a URL or raw base64)")
    if image.startswith("data:"):
        raise bad_param("image must be raw base64 without a data: prefix")
    if image.startswith(("http://", "https://")):
        return
    try:
        raw = base64.b64decode(image, validate=True)
    except (binascii.Error, ValueError):
        raise bad_param("image must be a URL or raw base64") from None
    if len(raw) > 10 * 1024 * 1024:
        raise bad_param("image must be at most 10 MB")


def validate_extension(body: dict[str, Any], needs_task_id: bool) -> tuple[str, str | None]:
    """Returns (video_id, parent task_id or None)."""
    video_id = body.get("video_id")
    if not isinstance(video_id, str) or not video_id:
        raise bad_param("video_id is required")
    task_id = body.get("task_id")
    if needs_task_id and (not isinstance(task_id, str) or not task_id):
        raise bad_param("task_id is required together with video_id")
    _text(body, "prompt")
    _text(body, "negative_prompt")
    _cfg_scale(body)
    for field in ("callback_url", "external_task_id"):
        _optional_string(body, field)
    return video_id, task_id if needs_task_id else None
