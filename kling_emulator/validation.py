"""Create-request validation as the reference gives it: 400/1201 naming the field, 404/1203 for a model."""

from __future__ import annotations

import base64
import binascii
from typing import Any

from kling_emulator import catalog, render
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


def watermark(body: dict[str, Any]) -> bool:
    """`watermark_info: {"enabled": bool}` (newer docs); absent means no watermark."""
    info = body.get("watermark_info")
    if info is None:
        return False
    if not isinstance(info, dict) or not isinstance(info.get("enabled", False), bool):
        raise bad_param("watermark_info must be {\"enabled\": true|false}")
    return bool(info.get("enabled", False))


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
        _check_images(body, model, mode, duration)
        aspect = "16:9"  # the output follows the image; the emulator renders 16:9
    _check_camera(kind, body.get("camera_control"), model, mode, duration)
    for field in ("callback_url", "external_task_id"):
        _optional_string(body, field)
    sound = body.get("sound", "off")
    if sound not in ("on", "off"):
        raise bad_param("sound must be on or off")
    if sound == "on" and (model, mode) not in catalog.SOUND:
        raise bad_param(f"sound is not supported by {model} {mode}")
    return {"model": model, "mode": mode, "duration": duration, "aspect_ratio": aspect, "sound": sound == "on"}


def _check_images(body: dict[str, Any], model: str, mode: str, duration: str) -> None:
    """`image` and/or `image_tail` (at least one), the start/end-frame capability, the option groups."""
    if body.get("image") is None and body.get("image_tail") is None:
        raise bad_param("image is required (a URL or raw base64), or image_tail")
    for field in ("image", "image_tail"):
        if body.get(field) is not None:
            _check_image(field, body[field])
    groups = [name for name, present in (
        ("image_tail", body.get("image_tail") is not None),
        ("static_mask/dynamic_masks", body.get("static_mask") is not None or body.get("dynamic_masks") is not None),
        ("camera_control", body.get("camera_control") is not None),
    ) if present]
    if len(groups) > 1:
        raise bad_param(f"{' and '.join(groups)} cannot be used together")
    if body.get("image_tail") is not None:
        allowed = catalog.I2V_TAIL.get(model, set())
        if allowed is not None and (mode, duration) not in allowed:
            raise bad_param(f"image_tail is not supported by {model} {mode} {duration} s")


def _check_image(field: str, image: Any) -> None:
    if not isinstance(image, str) or not image:
        raise bad_param(f"{field} must be a URL or raw base64")
    if image.startswith("data:"):
        raise bad_param(f"{field} must be raw base64 without a data: prefix")
    if image.startswith(("http://", "https://")):
        return
    try:
        raw = base64.b64decode(image, validate=True)
    except (binascii.Error, ValueError):
        raise bad_param(f"{field} must be a URL or raw base64") from None
    if len(raw) > 10 * 1024 * 1024:
        raise bad_param(f"{field} must be at most 10 MB")
    try:
        width, height = render.image_size(raw)
    except ValueError:
        raise bad_param(f"{field} must be a .jpg/.jpeg/.png image") from None
    if min(width, height) < 300:
        raise bad_param(f"{field} must be at least 300 px on each side, got {width}x{height}")
    if field == "image" and not 1 / 2.5 <= width / height <= 2.5:
        raise bad_param(f"{field} aspect ratio must be between 1:2.5 and 2.5:1, got {width}x{height}")


def _check_camera(kind: str, camera: Any, model: str, mode: str, duration: str) -> None:
    if camera is None:
        return
    if not isinstance(camera, dict) or camera.get("type") not in catalog.CAMERA_TYPES:
        raise bad_param(f"camera_control.type must be one of {', '.join(sorted(catalog.CAMERA_TYPES))}")
    table = catalog.T2V_CAMERA if kind == "text2video" else catalog.I2V_CAMERA
    if (mode, duration) not in table.get(model, set()) or (kind == "image2video" and camera["type"] != "simple"):
        raise bad_param(f"camera_control ({camera['type']}) is not supported by {model} {mode} {duration} s")
    config = camera.get("config")
    if camera["type"] != "simple":
        if config is not None:
            raise bad_param("camera_control.config is only for type simple")
        return
    if not isinstance(config, dict) or set(config) - set(catalog.CAMERA_AXES):
        raise bad_param(f"camera_control.config needs some of {', '.join(catalog.CAMERA_AXES)}")
    values = [config.get(axis, 0) for axis in catalog.CAMERA_AXES]
    if any(isinstance(v, bool) or not isinstance(v, int | float) or not -10 <= v <= 10 for v in values):
        raise bad_param("camera_control.config values must be numbers in [-10, 10]")
    if sum(1 for v in values if v != 0) != 1:
        raise bad_param("camera_control.config must set exactly one non-zero value")


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
