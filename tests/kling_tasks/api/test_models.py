"""Request validation and bodies, snapshot parsing."""

from __future__ import annotations

import base64
from pathlib import Path

import pytest
from pydantic import ValidationError

from kling_tasks.api import (
    Image2VideoRequest,
    InvalidRequestError,
    TaskSnapshot,
    Text2VideoRequest,
    VideoExtendRequest,
)


def test_t2v_body_defaults_and_drops_none() -> None:
    body = Text2VideoRequest(prompt="a cat").to_body("kling")
    assert body == {"model_name": "kling-v1", "prompt": "a cat", "mode": "std", "duration": "5",
                    "aspect_ratio": "16:9"}  # fmt: skip


def test_t2v_duration_is_sent_as_string() -> None:
    assert Text2VideoRequest(prompt="x", duration=10).to_body("kling")["duration"] == "10"  # type: ignore[arg-type]
    assert Text2VideoRequest(prompt="x", duration="10").to_body("kling")["duration"] == "10"


@pytest.mark.parametrize(
    "fields",
    [
        {"prompt": "x" * 3000},
        {"prompt": ""},
        {"prompt": "x", "negative_prompt": "n" * 2501},
        {"prompt": "x", "cfg_scale": 2},
        {"prompt": "x", "cfg_scale": -0.1},
        {"prompt": "x", "duration": "7"},
        {"prompt": "x", "mode": "turbo"},
        {"prompt": "x", "aspect_ratio": "4:3"},
        {"prompt": "x", "model_name": "kling-v9"},
        {"prompt": "x", "model_name": "kling-v1-5"},  # I2V only
        {"prompt": "x", "unknown_field": 1},
    ],
)
def test_t2v_rejects(fields: dict[str, object]) -> None:
    with pytest.raises(ValidationError):
        Text2VideoRequest(**fields)  # type: ignore[arg-type]


def test_i2v_models_and_no_aspect_ratio() -> None:
    req = Image2VideoRequest(image="https://img.test/a.png", model_name="kling-v1-5", prompt="go")
    body = req.to_body("kling")
    assert "aspect_ratio" not in body and body["image"] == "https://img.test/a.png"
    assert Image2VideoRequest(image="https://img.test/a.png").to_body("kling").get("prompt") is None
    with pytest.raises(ValidationError):
        Image2VideoRequest(image="https://img.test/a.png", aspect_ratio="16:9")  # type: ignore[call-arg]
    with pytest.raises(ValidationError):
        Image2VideoRequest(image="https://img.test/a.png", model_name="kling-v9")


@pytest.mark.parametrize("image", ["data:image/png;base64,AAAA", "not base64 !!", "/tmp/a.png", ""])
def test_i2v_rejects_bad_image_strings(image: str) -> None:
    with pytest.raises(ValidationError):
        Image2VideoRequest(image=image)


def test_from_source_url_and_file(tmp_path: Path) -> None:
    assert Image2VideoRequest.from_source("https://img.test/a.jpg").image == "https://img.test/a.jpg"
    png = tmp_path / "frame.PNG"
    png.write_bytes(b"\x89PNG fake bytes")
    req = Image2VideoRequest.from_source(str(png), prompt="move", mode="pro")
    assert base64.b64decode(req.image) == b"\x89PNG fake bytes" and req.mode == "pro"
    assert not req.image.startswith("data:")


def test_from_source_rejects_big_or_wrong_files(tmp_path: Path) -> None:
    big = tmp_path / "big.jpg"
    with big.open("wb") as fh:
        fh.truncate(10 * 1024 * 1024 + 1)
    with pytest.raises(ValueError, match=r"big\.jpg"):
        Image2VideoRequest.from_source(big)
    gif = tmp_path / "anim.gif"
    gif.write_bytes(b"GIF89a")
    with pytest.raises(ValueError, match=r"anim\.gif"):
        Image2VideoRequest.from_source(gif)
    with pytest.raises(ValueError, match=r"missing\.jpeg"):
        Image2VideoRequest.from_source(tmp_path / "missing.jpeg")


def test_extend_bodies_per_provider() -> None:
    req = VideoExtendRequest(video_id="v1", parent_task_id="t1", prompt="more")
    assert req.to_body("kling") == {"video_id": "v1", "prompt": "more"}
    assert req.to_body("cometapi") == {"video_id": "v1", "task_id": "t1", "prompt": "more"}
    with pytest.raises(InvalidRequestError, match="parent_task_id"):
        VideoExtendRequest(video_id="v1").to_body("cometapi")
    with pytest.raises(ValidationError):
        VideoExtendRequest(video_id="v1", cfg_scale=2)
    with pytest.raises(ValidationError):
        VideoExtendRequest(video_id="")


def test_snapshot_parsing_full() -> None:
    snap = TaskSnapshot.model_validate(
        {
            "task_id": "867283741759111202",
            "task_status": "succeed",
            "task_status_msg": "",
            "task_info": {"external_task_id": "job-s1-abc", "parent_video": {"id": "p", "url": "u", "duration": "5"}},
            "task_result": {"videos": [{"id": "v2", "url": "https://cdn/x.mp4", "duration": "9.708", "seed": "1",
                                        "watermark_url": "https://cdn/w.mp4"}]},
            "watermark_info": {"enabled": False},
            "final_unit_deduction": "3.5",
            "created_at": 1774805076166,
            "updated_at": 1774805076999,
            "brand_new_field": {"x": 1},
            "request_id": "r-1",
        }
    )  # fmt: skip
    assert snap.external_task_id == "job-s1-abc" and snap.parent_video and snap.parent_video.duration == 5.0
    assert snap.video and snap.video.duration == pytest.approx(9.708) and snap.video.id == "v2"
    assert snap.credits == 3.5 and snap.is_terminal and snap.request_id == "r-1"


def test_snapshot_parsing_minimal() -> None:
    snap = TaskSnapshot.model_validate(
        {"task_id": 878106242831892487, "task_info": {}, "task_result": {}, "task_status": "Processing",
         "task_status_msg": None}
    )  # fmt: skip
    assert snap.task_id == "878106242831892487" and snap.task_status == "processing"
    assert snap.external_task_id is None and snap.video is None and snap.credits is None
    assert not snap.is_terminal and snap.task_status_msg == ""
    assert snap.is_known_status


@pytest.mark.parametrize("word", ["submitted", "processing", "succeed", "failed"])
def test_known_status_words(word: str) -> None:
    snap = TaskSnapshot.model_validate({"task_id": "1", "task_status": f" {word.upper()} "})
    assert snap.task_status == word and snap.is_known_status
    assert snap.is_terminal == (word in ("succeed", "failed"))


@pytest.mark.parametrize("word", ["queueing", " Queueing ", "RUNNING", "exploded", "succeeded"])
def test_unknown_status_word_is_kept_as_in_progress(word: str) -> None:
    # A provider's own word is "in progress", never garbage: kept (normalized), neither known nor terminal.
    snap = TaskSnapshot.model_validate({"task_id": "1", "task_status": word})
    assert snap.task_status == word.strip().lower()
    assert not snap.is_known_status and not snap.is_terminal


@pytest.mark.parametrize("status", ["", "   ", None, 3])
def test_empty_or_non_text_status_is_refused(status: object) -> None:
    with pytest.raises(ValidationError):
        TaskSnapshot.model_validate({"task_id": "1", "task_status": status})
    with pytest.raises(ValidationError):
        TaskSnapshot.model_validate({"task_id": "1"})
