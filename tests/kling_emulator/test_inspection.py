"""Inspection (/_emulator/stats, /_emulator/reset) and --state-dir persistence across a restart."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import httpx

from kling_emulator import EmulatorConfig, start_emulator


def test_stats_count_what_happened(kling: Any) -> None:
    video = kling.finished(external_task_id="s-1", model_name="kling-v1-6")
    task_id = video["task_id"]
    before = kling.stats()
    polls_before, first_seen = before["polls"][task_id], before["final_seen_at"][task_id]
    kling.task("text2video", task_id)
    kling.get("/v1/videos/text2video")
    size = len(httpx.get(video["task_result"]["videos"][0]["url"]).raise_for_status().content)
    kling.post("text2video", {"prompt": "dup", "external_task_id": "s-1"})
    stats = kling.stats()
    assert set(stats) >= {"requests", "create_attempts", "tasks_created", "tasks", "polls",
                          "concurrency_high_water", "credits_charged", "downloads", "download_bytes",
                          "faults_fired", "behaviour", "final_seen_at"}
    assert stats["requests"]["POST /v1/videos/text2video"] == 2
    assert stats["requests"]["GET /v1/videos/text2video"] == 1
    assert stats["requests"]["GET /v1/videos/text2video/{id}"] == polls_before + 1
    assert stats["polls"] == {task_id: polls_before + 1}
    assert stats["final_seen_at"] == {task_id: first_seen}, "the first answer that showed it ended, not the last"
    assert first_seen >= video["updated_at"]
    assert stats["create_attempts"] == {"s-1": 2} and stats["tasks_created"] == {"s-1": 1}
    assert stats["tasks"][task_id] == {"kind": "text2video", "status": "succeed", "external_task_id": "s-1",
                                       "created_at": video["created_at"], "updated_at": video["updated_at"],
                                       "video_id": video["task_result"]["videos"][0]["id"], "image_sha256": None}
    assert stats["concurrency_high_water"] == 1
    assert stats["credits_charged"] == 2
    assert stats["downloads"] == {video["task_result"]["videos"][0]["id"]: 1}
    assert stats["download_bytes"] == {video["task_result"]["videos"][0]["id"]: size}
    assert stats["faults_fired"] == {}


def test_cometapi_stats_use_its_paths(comet: Any) -> None:
    task_id = comet.create()["task_id"]
    comet.task("text2video", task_id)
    requests = comet.stats()["requests"]
    assert requests == {"POST /kling/v1/videos/text2video": 1, "GET /kling/v1/videos/text2video/{id}": 1}


def test_reset_forgets_tasks_and_counters(kling: Any) -> None:
    task_id = kling.create(external_task_id="r-1")["task_id"]
    response = kling.http.post("/_emulator/reset")
    assert response.status_code == 200
    stats = kling.stats()
    assert stats["tasks"] == {} and stats["requests"] == {} and stats["create_attempts"] == {}
    assert stats["concurrency_high_water"] == 0 and stats["credits_charged"] == 0
    assert stats["downloads"] == stats["download_bytes"] == stats["faults_fired"] == {}
    assert kling.get(f"/v1/videos/text2video/{task_id}").status_code == 404
    assert kling.create(external_task_id="r-1")["task_info"] == {"external_task_id": "r-1"}, "the id is free again"


def test_state_dir_keeps_tasks_and_files_across_a_restart(tools: Any, tmp_path: Path) -> None:
    config = EmulatorConfig(access_key=tools.AK, secret_key=tools.SK, time_scale=tools.SCALE, state_dir=tmp_path)
    with start_emulator(config) as first:
        api = tools.Api(first)
        video = api.extend(api.finished(external_task_id="keep-me"))
        api.http.close()
    with start_emulator(config) as second:
        api = tools.Api(second)
        again = api.task("video-extend", video["task_id"])
        assert again["task_status"] == "succeed"
        assert again["task_info"]["parent_video"] == {**video["task_info"]["parent_video"],
                                                      "url": again["task_info"]["parent_video"]["url"]}
        assert again["task_result"]["videos"][0]["url"].startswith(second.base_url)
        assert api.get("/v1/videos/text2video/keep-me").json()["data"]["task_status"] == "succeed"
        seconds, _, _ = tools.decode(_fetch(again, tmp_path / "again.mp4", tools))
        assert abs(seconds - float(again["task_result"]["videos"][0]["duration"])) <= 0.1
        # The restored video can be extended further, and the external id is still taken.
        api.extend(again)
        dup = api.post("text2video", {"prompt": "x", "external_task_id": "keep-me"})
        assert dup.json()["code"] == 1201
        api.http.close()


def _fetch(task: dict[str, Any], dest: Path, tools: Any) -> Path:
    tools.download(task["task_result"]["videos"][0]["url"], dest)
    return dest


def test_a_task_still_running_at_shutdown_finishes_after_the_restart(tools: Any, tmp_path: Path) -> None:
    # The emulator stops while the task is still running (~2.5 s in all) but after its file was rendered
    # (~0.05 s), which is saved to tasks.json the moment it happens.
    config = EmulatorConfig(access_key=tools.AK, secret_key=tools.SK, time_scale=0.008, state_dir=tmp_path)
    with start_emulator(config) as first:
        api = tools.Api(first)
        task_id = api.create()["task_id"]

        def rendered() -> bool:
            records = json.loads((tmp_path / "tasks.json").read_text())
            return any(r["task_id"] == task_id and r["rendered"] for r in records)

        tools.until(rendered, what="the render")
        assert api.task("text2video", task_id)["task_status"] in ("submitted", "processing")
        api.http.close()
    with start_emulator(config) as second:
        api = tools.Api(second)
        assert api.wait("text2video", task_id)["task_status"] == "succeed"
        api.http.close()


def test_a_task_not_yet_rendered_at_shutdown_is_rendered_after_the_restart(tools: Any, tmp_path: Path) -> None:
    # Four 720p renders on two render threads: stopping right away cancels the queued ones mid-flight.
    config = EmulatorConfig(access_key=tools.AK, secret_key=tools.SK, time_scale=0.004, state_dir=tmp_path,
                            resolution="720p")
    with start_emulator(config) as first:
        api = tools.Api(first)
        ids = [api.create()["task_id"] for _ in range(4)]
        api.http.close()
    records = json.loads((tmp_path / "tasks.json").read_text())
    assert any(not r["rendered"] for r in records), "the test needs a render cut short by the stop"
    with start_emulator(config) as second:
        api = tools.Api(second)
        for task_id in ids:
            done = api.wait("text2video", task_id)
            assert done["task_status"] == "succeed", done
            seconds, _, _ = tools.decode(_fetch(done, tmp_path / f"{task_id}.mp4", tools))
            assert abs(seconds - 5.0) <= 0.1
        api.http.close()
