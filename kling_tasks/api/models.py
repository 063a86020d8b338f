"""Pydantic models of Kling requests and task snapshots (reference §3–§5, §8).

Requests forbid unknown fields (a typo must not be silently dropped and still paid for) and are validated
before any request is sent. Responses tolerate unknown fields everywhere: Kling adds fields over time.
"""

from __future__ import annotations

import base64
import binascii
import os
from pathlib import Path
from typing import Any, ClassVar, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from kling_tasks.api.catalog import (
    I2V_MODELS,
    IMAGE_SUFFIXES,
    MAX_IMAGE_BYTES,
    PROMPT_MAX,
    SOUND_MODES,
    T2V_MODELS,
)
from kling_tasks.api.errors import InvalidRequestError
from kling_tasks.settings import Provider

__all__ = [
    "I2V_MODELS",
    "KNOWN_STATUSES",
    "MAX_IMAGE_BYTES",
    "T2V_MODELS",
    "Image2VideoRequest",
    "ParentVideo",
    "TaskKind",
    "TaskRequest",
    "TaskSnapshot",
    "TaskStatus",
    "Text2VideoRequest",
    "Video",
    "VideoExtendRequest",
]

TaskKind = Literal["text2video", "image2video", "video-extend"]
TaskStatus = Literal["submitted", "processing", "succeed", "failed"]
# The four words of reference §3.2. A provider may say others ("queueing", "running"): a snapshot keeps any
# non-empty word, and the poller reads an unknown one as "still in progress", never as garbage or an end.
KNOWN_STATUSES: frozenset[str] = frozenset(("submitted", "processing", "succeed", "failed"))


def _duration_as_str(value: Any) -> Any:
    # Accept 5 / 5.0 from callers; the wire form is always the string "5".
    if isinstance(value, int | float) and not isinstance(value, bool) and float(value).is_integer():
        return str(int(value))
    return value


class TaskRequest(BaseModel):
    """Base of create requests: ``kind`` picks the endpoint, ``to_body`` builds the JSON body."""

    model_config = ConfigDict(extra="forbid", frozen=True)
    kind: ClassVar[TaskKind]

    def to_body(self, provider: Provider) -> dict[str, Any]:
        """The create body without None fields (``external_task_id`` is added by the client)."""
        return self.model_dump(mode="json", exclude_none=True)


class _GenerationRequest(TaskRequest):
    model_name: str = "kling-v1"
    negative_prompt: str | None = Field(None, max_length=PROMPT_MAX)
    cfg_scale: float | None = Field(None, ge=0.0, le=1.0)
    mode: Literal["std", "pro"] = "std"
    duration: Literal["5", "10"] = "5"
    sound: Literal["on", "off"] | None = None  # v2.6+ (§5.1); None: not sent (Kling's default is off)
    callback_url: str | None = None

    _allowed_models: ClassVar[frozenset[str]] = T2V_MODELS

    @field_validator("duration", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> Any:
        return _duration_as_str(value)

    @field_validator("model_name")
    @classmethod
    def _model(cls, value: str) -> str:
        if value not in cls._allowed_models:
            raise ValueError(f"model {value!r} is not accepted by {cls.kind}; use one of {sorted(cls._allowed_models)}")
        return value

    @model_validator(mode="after")
    def _sound(self) -> Self:
        if self.sound == "on" and (self.model_name, self.mode) not in SOUND_MODES:
            raise ValueError(f"sound is only made by {', '.join(f'{m} {o}' for m, o in sorted(SOUND_MODES))}")
        return self


class Text2VideoRequest(_GenerationRequest):
    kind: ClassVar[TaskKind] = "text2video"
    prompt: str = Field(min_length=1, max_length=PROMPT_MAX)
    aspect_ratio: Literal["16:9", "9:16", "1:1"] = "16:9"


class Image2VideoRequest(_GenerationRequest):
    """``image``: an http(s) URL or raw base64 (no ``data:`` prefix). No ``aspect_ratio`` (image decides)."""

    kind: ClassVar[TaskKind] = "image2video"
    _allowed_models: ClassVar[frozenset[str]] = I2V_MODELS
    image: str = Field(min_length=1)
    prompt: str | None = Field(None, min_length=1, max_length=PROMPT_MAX)  # optional for I2V (§5.2)

    @field_validator("image")
    @classmethod
    def _image(cls, value: str) -> str:
        if value.startswith(("http://", "https://")):
            return value
        if value.startswith("data:"):
            raise ValueError("image must be raw base64 without a data: prefix")
        try:
            base64.b64decode(value, validate=True)
        except (binascii.Error, ValueError):
            raise ValueError(
                "image must be an http(s) URL or raw base64; for a local file use Image2VideoRequest.from_source"
            ) from None
        if len(value) * 3 // 4 > MAX_IMAGE_BYTES:
            raise ValueError("image is larger than 10 MB")
        return value

    @classmethod
    def from_source(cls, image: str | os.PathLike[str], **fields: Any) -> Self:
        """From an http(s) URL (sent as is) or a local .jpg/.jpeg/.png file (<= 10 MB, base64-encoded)."""
        text = os.fspath(image)
        if text.startswith(("http://", "https://")):
            return cls(image=text, **fields)
        path = Path(text).expanduser()
        if path.suffix.lower() not in IMAGE_SUFFIXES:
            raise ValueError(f"image file {path} must be .jpg, .jpeg or .png")
        if not path.is_file():
            raise ValueError(f"image file {path} does not exist")
        size = path.stat().st_size
        if size > MAX_IMAGE_BYTES:
            raise ValueError(f"image file {path} is {size} bytes; Kling accepts at most 10 MB")
        return cls(image=base64.b64encode(path.read_bytes()).decode("ascii"), **fields)


class VideoExtendRequest(TaskRequest):
    """Extends a finished video by 4–5 s (§8). Kling takes ``video_id`` only; CometAPI also needs the parent
    ``task_id`` to route the job to the upstream account that owns the video (§14)."""

    kind: ClassVar[TaskKind] = "video-extend"
    video_id: str = Field(min_length=1)
    parent_task_id: str | None = None
    prompt: str | None = Field(None, min_length=1, max_length=PROMPT_MAX)
    negative_prompt: str | None = Field(None, max_length=PROMPT_MAX)
    cfg_scale: float | None = Field(None, ge=0.0, le=1.0)
    callback_url: str | None = None

    def to_body(self, provider: Provider) -> dict[str, Any]:
        body = self.model_dump(mode="json", exclude_none=True, exclude={"parent_task_id"})
        if provider == "cometapi":
            if not self.parent_task_id:
                raise InvalidRequestError(
                    "CometAPI video-extend needs the parent task id: set VideoExtendRequest.parent_task_id"
                )
            body["task_id"] = self.parent_task_id
        return body


# ---- responses -------------------------------------------------------------------------------------------


def _as_float(value: Any) -> Any:
    # Kling sends durations as strings ("5", "5.042").
    if isinstance(value, str):
        return float(value.strip())
    return value


class ParentVideo(BaseModel):
    """The video an extension continued (``task_info.parent_video``); duration is before the extension."""

    model_config = ConfigDict(extra="ignore", frozen=True)
    id: str
    url: str
    duration: float

    @field_validator("duration", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> Any:
        return _as_float(value)


class Video(ParentVideo):
    """A result video (``task_result.videos[]``); its ``id`` is the video_id that extensions take."""

    watermark_url: str | None = None


class TaskSnapshot(BaseModel):
    """One observation of a task (§3.4), flattened: ``task_info``/``task_result`` are lifted to the top."""

    model_config = ConfigDict(extra="ignore", frozen=True)
    task_id: str = Field(min_length=1)
    task_status: str = Field(min_length=1)  # normalized (strip + lower); see KNOWN_STATUSES
    task_status_msg: str = ""
    external_task_id: str | None = None
    parent_video: ParentVideo | None = None
    videos: list[Video] = Field(default_factory=list)
    final_unit_deduction: str | None = None
    created_at: int = 0
    updated_at: int = 0
    request_id: str | None = None

    @model_validator(mode="before")
    @classmethod
    def _flatten(cls, data: Any) -> Any:
        if not isinstance(data, dict):
            return data
        out = dict(data)
        info = out.pop("task_info", None)
        if isinstance(info, dict):
            out.setdefault("external_task_id", info.get("external_task_id") or None)
            out.setdefault("parent_video", info.get("parent_video") or None)
        result = out.pop("task_result", None)
        if isinstance(result, dict):
            out.setdefault("videos", result.get("videos") or [])
        if isinstance(out.get("task_id"), int):
            out["task_id"] = str(out["task_id"])
        if isinstance(out.get("task_status"), str):
            out["task_status"] = out["task_status"].strip().lower()
        if out.get("task_status_msg") is None:
            out["task_status_msg"] = ""
        if isinstance(out.get("final_unit_deduction"), int | float):
            out["final_unit_deduction"] = str(out["final_unit_deduction"])
        return out

    @property
    def video(self) -> Video | None:
        return self.videos[0] if self.videos else None

    @property
    def credits(self) -> float | None:
        """``final_unit_deduction`` as a number (billing units), None when absent or unparsable."""
        try:
            return float(self.final_unit_deduction) if self.final_unit_deduction else None
        except ValueError:
            return None

    @property
    def is_terminal(self) -> bool:
        """``succeed`` or ``failed``: only these two words end a task; an unknown word never does."""
        return self.task_status in ("succeed", "failed")

    @property
    def is_known_status(self) -> bool:
        """One of Kling's four documented words (``TaskStatus``); False for a word a provider made up."""
        return self.task_status in KNOWN_STATUSES
