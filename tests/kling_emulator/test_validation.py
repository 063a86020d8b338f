"""Create-request validation (reference §5, §6, §8, §11): 400/1201 naming the field, 404/1203 for a model."""

from __future__ import annotations

import base64
import itertools
from collections.abc import Iterator
from typing import Any

import pytest

from kling_emulator import EmulatorConfig, start_emulator

from .conftest import jpeg

IMAGE = "https://example.invalid/start.png"
ZOOM = {"type": "simple", "config": {"zoom": 5}}

T2V_REFUSED = [
    ({"model_name": "kling-v9"}, 404, 1203, "model_name"),
    ({"model_name": "kling-v1-5"}, 400, 1201, "model_name"),  # image2video only
    ({"model_name": "kling-v2-1"}, 400, 1201, "model_name"),
    ({"mode": "turbo"}, 400, 1201, "mode"),
    ({"duration": 5}, 400, 1201, "duration"),  # must be a JSON string
    ({"duration": "7"}, 400, 1201, "duration"),  # 3-15 only on kling-v3
    ({"model_name": "kling-v3", "duration": "16"}, 400, 1201, "duration"),
    ({"prompt": "x" * 2501}, 400, 1201, "prompt"),
    ({"prompt": None}, 400, 1201, "prompt"),
    ({"prompt": "  "}, 400, 1201, "prompt"),
    ({"negative_prompt": "x" * 2501}, 400, 1201, "negative_prompt"),
    ({"cfg_scale": 1.5}, 400, 1201, "cfg_scale"),
    ({"cfg_scale": "0.5"}, 400, 1201, "cfg_scale"),
    ({"aspect_ratio": "4:3"}, 400, 1201, "aspect_ratio"),
    ({"external_task_id": 12}, 400, 1201, "external_task_id"),
    ({"callback_url": ["x"]}, 400, 1201, "callback_url"),
    # Camera control only on kling-v1 std 5 s (capability map): a mode/duration combination check.
    ({"camera_control": ZOOM, "mode": "pro"}, 400, 1201, "camera_control"),
    ({"camera_control": ZOOM, "duration": "10"}, 400, 1201, "camera_control"),
    ({"camera_control": ZOOM, "model_name": "kling-v1-6"}, 400, 1201, "camera_control"),
    ({"camera_control": {"type": "orbit"}}, 400, 1201, "camera_control"),
    ({"camera_control": {"type": "simple"}}, 400, 1201, "camera_control"),
    ({"camera_control": {"type": "simple", "config": {"zoom": 5, "pan": 1}}}, 400, 1201, "camera_control"),
    ({"camera_control": {"type": "simple", "config": {"zoom": 11}}}, 400, 1201, "camera_control"),
    ({"camera_control": {"type": "down_back", "config": {"zoom": 1}}}, 400, 1201, "camera_control"),
]


@pytest.mark.parametrize(("change", "status", "code", "field"), T2V_REFUSED)
def test_text2video_refusals(kling: Any, change: dict[str, Any], status: int, code: int, field: str) -> None:
    body = {"prompt": "a quiet harbour", "model_name": "kling-v1", **change}
    response = kling.post("text2video", {k: v for k, v in body.items() if v is not None})
    assert (response.status_code, response.json()["code"]) == (status, code), response.text
    assert field in response.json()["message"]
    assert kling.stats()["tasks"] == {}


@pytest.mark.parametrize(
    "change",
    [
        {"model_name": "kling-v3", "duration": "7", "mode": "pro"},
        {"model_name": "kling-v2-master", "duration": "10"},
        {"model_name": "kling-v1-6", "mode": "pro", "aspect_ratio": "9:16", "cfg_scale": 0},
        {"prompt": "x" * 2500, "negative_prompt": "y" * 2500},
        {"camera_control": ZOOM},
        {"camera_control": {"type": "forward_up"}},
        {"model": "legacy-field-is-ignored"},
        {"model_name": None},  # defaults to kling-v1
    ],
)
def test_text2video_accepted(kling: Any, change: dict[str, Any]) -> None:
    body = {"prompt": "a quiet harbour", "model_name": "kling-v1", **change}
    response = kling.post("text2video", {k: v for k, v in body.items() if v is not None})
    assert response.status_code == 200, response.text


I2V_REFUSED = [
    ({"image": None}, "image"),
    ({"image": "data:image/png;base64,AAAA"}, "image"),
    ({"image": "not base64 !!"}, "image"),
    ({"image": "aGVsbG8="}, "image"),  # base64, but not of an image
    ({"image_tail": IMAGE, "model_name": "kling-v2-master"}, "image_tail"),
    ({"image_tail": IMAGE, "model_name": "kling-v1", "duration": "10"}, "image_tail"),
    ({"image_tail": IMAGE, "model_name": "kling-v1-6", "mode": "std"}, "image_tail"),
    ({"image_tail": IMAGE, "camera_control": ZOOM}, "camera_control"),
    ({"camera_control": ZOOM, "model_name": "kling-v1-5", "mode": "std"}, "camera_control"),
    ({"camera_control": {"type": "down_back"}, "model_name": "kling-v1-5", "mode": "pro"}, "camera_control"),
    ({"prompt": "x" * 2501}, "prompt"),
]


@pytest.mark.parametrize(("change", "field"), I2V_REFUSED)
def test_image2video_refusals(kling: Any, change: dict[str, Any], field: str) -> None:
    body = {"image": IMAGE, **change}
    response = kling.post("image2video", {k: v for k, v in body.items() if v is not None})
    assert (response.status_code, response.json()["code"]) == (400, 1201), response.text
    assert field in response.json()["message"]


@pytest.mark.parametrize(
    "body",
    [
        {"image": base64.b64encode(jpeg((90, 120, 150))).decode()},  # raw base64 of a JPEG
        {"image_tail": IMAGE, "model_name": "kling-v1-6", "mode": "pro"},  # the end frame alone (current doc)
        {"image": IMAGE, "image_tail": IMAGE, "model_name": "kling-v1", "mode": "std"},
        {"image": IMAGE, "model_name": "kling-v1-5", "mode": "pro", "camera_control": ZOOM},
        {"image": IMAGE, "aspect_ratio": "1:1"},  # not an I2V field: accepted and ignored
    ],
)
def test_image2video_accepted(kling: Any, body: dict[str, Any]) -> None:
    assert kling.post("image2video", body).status_code == 200


def test_invalid_json_body(kling: Any) -> None:
    response = kling.http.post("/v1/videos/text2video", content=b"{not json", headers=kling.headers())
    assert response.status_code == 400 and response.json()["code"] in (1200, 1201)


def test_duplicate_external_task_id(kling: Any) -> None:
    kling.create(external_task_id="dup-1")
    again = kling.post("text2video", {"prompt": "again", "external_task_id": "dup-1"})
    assert (again.status_code, again.json()["code"]) == (400, 1201)
    assert "external_task_id" in again.json()["message"]
    stats = kling.stats()
    assert stats["create_attempts"] == {"dup-1": 2}
    assert stats["tasks_created"] == {"dup-1": 1}


# --- video-extend ------------------------------------------------------------------------------------------------


def refused(api: Any, body: dict[str, Any], field: str) -> str:
    response = api.post("video-extend", body)
    assert (response.status_code, response.json()["code"]) == (400, 1201), response.text
    message: str = response.json()["message"]
    assert field in message
    return message


def test_extension_needs_a_succeeded_video_from_an_extendable_model(kling: Any) -> None:
    refused(kling, {}, "video_id")
    refused(kling, {"video_id": "no-such-video"}, "video_id")
    running = kling.create()
    refused(kling, {"video_id": kling.stats()["tasks"][running["task_id"]]["video_id"]}, "video_id")
    v2 = kling.finished(model_name="kling-v2-master")
    refused(kling, {"video_id": v2["task_result"]["videos"][0]["id"]}, "video_id")
    v16 = kling.finished(model_name="kling-v1-6")
    refused(kling, {"video_id": v16["task_result"]["videos"][0]["id"], "prompt": "x" * 2501}, "prompt")
    refused(kling, {"video_id": v16["task_result"]["videos"][0]["id"], "cfg_scale": 2}, "cfg_scale")
    # Kling takes no task_id: a CometAPI-style extra field is ignored, even a wrong one.
    ext = kling.finished("video-extend", video_id=v16["task_result"]["videos"][0]["id"], task_id="1")
    assert ext["task_info"]["parent_video"]["id"] == v16["task_result"]["videos"][0]["id"]


def test_extension_of_a_failed_task_is_refused(kling: Any) -> None:
    kling.handle.set_faults({"rules": [{"match": "create:text2video", "kind": "task_fail", "times": 1}]})
    failed = kling.wait("text2video", kling.create()["task_id"])
    assert failed["task_status"] == "failed"
    video_id = kling.stats()["tasks"][failed["task_id"]]["video_id"]
    refused(kling, {"video_id": video_id}, "video_id")


def test_cometapi_extension_needs_the_parent_task_id(comet: Any) -> None:
    parent = comet.finished()
    video_id = parent["task_result"]["videos"][0]["id"]
    refused(comet, {"video_id": video_id}, "task_id")
    other = comet.finished(prompt="another clip")
    refused(comet, {"video_id": video_id, "task_id": other["task_id"]}, "task_id")
    ext = comet.finished("video-extend", video_id=video_id, task_id=parent["task_id"])
    assert ext["task_info"]["parent_video"]["id"] == video_id


@pytest.fixture(scope="module")
def quick() -> Iterator[Any]:
    # A tiny time scale: an extension lives ~30 ms, so a chain to the 180 s cap takes a few seconds.
    with start_emulator(EmulatorConfig(time_scale=0.0001)) as handle:
        yield handle


def test_extensions_chain_until_the_180_second_cap(quick: Any, tools: Any) -> None:
    api = tools.Api(quick)
    api.headers = lambda: {"Authorization": f"Bearer {tools.make_token('emulator-ak', quick.config.secret_key)}"}
    video = api.finished(duration="10")
    totals = [float(video["task_result"]["videos"][0]["duration"])]
    while True:
        response = api.post("video-extend", {"video_id": video["task_result"]["videos"][0]["id"]})
        if response.status_code != 200:
            break
        video = api.wait("video-extend", response.json()["data"]["task_id"])
        assert video["task_status"] == "succeed"
        totals.append(float(video["task_result"]["videos"][0]["duration"]))
    assert (response.status_code, response.json()["code"]) == (400, 1201)
    assert "180" in response.json()["message"]
    # Each total is a label rounded to 1 ms, so a difference of two carries up to 1 ms of that rounding
    # (5 s of frames at 24 fps read as 19.042 - 14.042 = 5.000000000000002, or 5.001).
    assert all(4 - 0.001 <= b - a <= 5 + 0.001 for a, b in itertools.pairwise(totals)), "each adds 4-5 s"
    assert totals[-1] <= 180 < totals[-1] + 5, "refused only when the next one would pass 180 s"
    api.http.close()
