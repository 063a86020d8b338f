"""Endpoints and shapes: create / get / list for the three kinds, both providers, both external-id lookups."""

from __future__ import annotations

import re
import time
import uuid
from typing import Any

import pytest

IMAGE = "https://example.invalid/start.png"
TASK_ID = re.compile(r"^[1-9]\d{17}$")


def check_envelope(body: dict[str, Any]) -> Any:
    assert set(body) == {"code", "message", "request_id", "data"}
    assert body["code"] == 0 and body["message"] == "SUCCEED"
    assert uuid.UUID(body["request_id"]).version == 4
    return body["data"]


def check_task(data: dict[str, Any]) -> None:
    assert TASK_ID.match(data["task_id"]), data["task_id"]
    assert data["task_status"] in ("submitted", "processing", "succeed", "failed")
    now_ms = time.time() * 1000
    for key in ("created_at", "updated_at"):
        assert isinstance(data[key], int) and now_ms - 600_000 < data[key] <= now_ms + 1000, "ms timestamps"


@pytest.mark.parametrize("provider", ["kling", "cometapi"])
def test_create_get_list_text2video_and_image2video(provider: str, kling: Any, comet: Any) -> None:
    api = kling if provider == "kling" else comet
    for kind, body in (("text2video", {"prompt": "a fox", "external_task_id": "ext-text2video"}),
                       ("image2video", {"image": IMAGE, "external_task_id": "ext-image2video"})):
        created = api.post(kind, body)
        assert created.status_code == 200
        data = check_envelope(created.json())
        check_task(data)
        assert data["task_status"] == "submitted"
        assert data["task_info"] == {"external_task_id": body["external_task_id"]}

        got = check_envelope(api.get(f"{api.prefix}/v1/videos/{kind}/{data['task_id']}").json())
        assert got["task_id"] == data["task_id"] and got["created_at"] == data["created_at"]
        for key in ("task_status_msg", "task_info", "task_result", "watermark_info", "final_unit_deduction"):
            assert key in got

        listed = check_envelope(api.get(f"{api.prefix}/v1/videos/{kind}", pageNum=1, pageSize=30).json())
        assert [t["task_id"] for t in listed] == [data["task_id"]], "each kind lists only its own tasks"


def test_finished_task_shape(kling: Any) -> None:
    data = kling.finished(external_task_id="shape-1", duration="5")
    assert data["task_status"] == "succeed" and data["task_status_msg"] == ""
    (video,) = data["task_result"]["videos"]
    assert set(video) >= {"id", "url", "watermark_url", "duration"}
    assert isinstance(video["duration"], str) and float(video["duration"]) == pytest.approx(5.0)
    assert video["url"].startswith(kling.handle.base_url)
    assert data["final_unit_deduction"] == "1", "kling-v1 std 5 s costs 1 unit"
    assert data["watermark_info"] == {"enabled": False}
    assert data["updated_at"] > data["created_at"]


def test_watermark_info_is_echoed(kling: Any) -> None:
    marked = kling.finished(watermark_info={"enabled": True})
    assert marked["watermark_info"] == {"enabled": True}
    assert marked["task_result"]["videos"][0]["watermark_url"].endswith(".mp4")
    plain = kling.finished()
    assert plain["watermark_info"] == {"enabled": False}
    assert plain["task_result"]["videos"][0]["watermark_url"] == ""
    refused = kling.post("text2video", {"prompt": "x", "watermark_info": {"enabled": "yes"}})
    assert refused.json()["code"] == 1201 and "watermark_info" in refused.json()["message"]


def test_task_info_is_empty_without_external_id(kling: Any) -> None:
    assert kling.create()["task_info"] == {}


@pytest.mark.parametrize("provider", ["kling", "cometapi"])
def test_lookup_by_external_task_id_in_both_forms(provider: str, kling: Any, comet: Any) -> None:
    api = kling if provider == "kling" else comet
    task_id = api.create(external_task_id="my-ext-id")["task_id"]
    by_path = check_envelope(api.get(f"{api.prefix}/v1/videos/text2video/my-ext-id").json())
    by_query = check_envelope(api.get(f"{api.prefix}/v1/videos/text2video", external_task_id="my-ext-id").json())
    assert by_path["task_id"] == by_query["task_id"] == task_id
    missing = api.get(f"{api.prefix}/v1/videos/text2video", external_task_id="nope")
    assert (missing.status_code, missing.json()["code"]) == (404, 1203)


def test_unknown_task_and_wrong_kind_are_404(kling: Any) -> None:
    task_id = kling.create()["task_id"]
    for path in ("/v1/videos/text2video/123456789012345678", f"/v1/videos/image2video/{task_id}"):
        response = kling.get(path)
        assert (response.status_code, response.json()["code"]) == (404, 1203)


def test_list_pages_newest_first(kling: Any) -> None:
    ids = [kling.create(prompt=f"clip {i}")["task_id"] for i in range(3)]
    page1 = kling.get("/v1/videos/text2video", pageNum=1, pageSize=2).json()["data"]
    page2 = kling.get("/v1/videos/text2video", pageNum=2, pageSize=2).json()["data"]
    assert [t["task_id"] for t in page1 + page2] == ids[::-1]
    for params in ({"pageNum": 0}, {"pageSize": 501}, {"pageNum": "x"}):
        response = kling.get("/v1/videos/text2video", **params)
        assert (response.status_code, response.json()["code"]) == (400, 1201)
        assert next(iter(params)) in response.json()["message"]


def test_kling_has_no_cometapi_prefix_and_vice_versa(kling: Any, comet: Any) -> None:
    for api, path in ((kling, "/kling/v1/videos/text2video"), (comet, "/v1/videos/text2video")):
        assert api.http.post(path, json={"prompt": "x"}, headers=api.headers()).status_code == 404


def test_unknown_endpoint(kling: Any) -> None:
    response = kling.post("lip-sync", {"video_id": "x"})
    assert response.status_code == 404 and response.json()["code"] in (1202, 1203)


def test_cometapi_generic_get_route(comet: Any) -> None:
    parent = comet.finished()
    ext = comet.extend(parent)
    for kind, task in (("text2video", parent), ("video-extend", ext)):
        data = check_envelope(comet.get(f"/kling/v1/videos/{kind}/{task['task_id']}").json())
        assert data["task_status"] == "succeed"
    image = comet.create("image2video", image=IMAGE)
    assert check_envelope(comet.get(f"/kling/v1/videos/image2video/{image['task_id']}").json())["task_id"]
    other = comet.get(f"/kling/v1/images/generations/{parent['task_id']}")
    assert other.status_code == 404 and other.json()["code"] == 1203
    listed = check_envelope(comet.get("/kling/v1/videos/video-extend").json())
    assert [t["task_id"] for t in listed] == [ext["task_id"]]
