"""Output: real MP4s whose decoded length is what the task says; extensions are the whole video; TTL; 720p."""

from __future__ import annotations

import base64
import hashlib
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from kling_emulator import EmulatorConfig, start_emulator

from .conftest import jpeg


def mean_rgb(frame: np.ndarray) -> np.ndarray:
    return frame.reshape(-1, 3).mean(axis=0)  # type: ignore[no-any-return]


def check_video(tools: Any, data: dict[str, Any], dest: Path) -> tuple[float, list[np.ndarray], tuple[int, int]]:
    video = data["task_result"]["videos"][0]
    response = tools.download(video["url"], dest)
    assert response.headers["content-type"] == "video/mp4"
    assert int(response.headers["content-length"]) == len(response.content) > 0
    seconds, frames, size = tools.decode(dest)
    assert abs(seconds - float(video["duration"])) <= 0.1, (seconds, video["duration"])
    return seconds, frames, size


def check_chain(api: Any, tools: Any, tmp_path: Path, extensions: int) -> None:
    video = api.finished(model_name="kling-v1-6", duration="5")
    first_seconds, first_frames, _ = check_video(tools, video, tmp_path / "step-0.mp4")
    assert first_seconds == pytest.approx(5.0, abs=0.1)
    for step in range(1, extensions + 1):
        parent = video["task_result"]["videos"][0]
        video = api.extend(video, prompt=f"and then {step}")
        info = video["task_info"]["parent_video"]
        assert info["id"] == parent["id"] and info["duration"] == parent["duration"]
        assert info["url"] == parent["url"]
        new = float(video["task_result"]["videos"][0]["duration"])
        added = new - float(parent["duration"])
        assert 4 - 1e-9 <= added <= 5 + 1e-9, "an extension adds 4-5 s"  # (5.000 can come out 5.000000000002)
        assert video["task_result"]["videos"][0]["id"] != parent["id"]
        seconds, frames, _ = check_video(tools, video, tmp_path / f"step-{step}.mp4")
        # The WHOLE video: the parent's frames come first, then one new segment that looks different.
        parent_frames = round(float(parent["duration"]) * 24)
        assert len(frames) == round(seconds * 24)
        assert np.abs(mean_rgb(frames[parent_frames - 1]) - mean_rgb(frames[parent_frames + 1])).max() > 15
        assert np.array_equal(mean_rgb(frames[10]).round(), mean_rgb(first_frames[10]).round())
        assert video["final_unit_deduction"] == "2", "a kling-v1-6 std extension costs 2 units"


def test_kling_generate_then_extend_three_times(kling: Any, tools: Any, tmp_path: Path) -> None:
    check_chain(kling, tools, tmp_path, extensions=3)


def test_cometapi_generate_then_extend_with_task_and_video_id(comet: Any, tools: Any, tmp_path: Path) -> None:
    check_chain(comet, tools, tmp_path, extensions=1)


def test_segments_differ_by_eye(kling: Any, tools: Any, tmp_path: Path) -> None:
    video = kling.extend(kling.finished(duration="5"))
    _, frames, _ = check_video(tools, video, tmp_path / "v.mp4")
    one, two = mean_rgb(frames[60]), mean_rgb(frames[-20])
    assert np.abs(one - two).max() > 30, (one, two)
    assert not np.array_equal(frames[0], frames[1]), "frames move (progress bar, running time)"


@pytest.mark.parametrize(("aspect", "size"), [("16:9", (320, 180)), ("9:16", (180, 320)), ("1:1", (180, 180))])
def test_aspect_ratios_at_the_small_size(kling: Any, tools: Any, tmp_path: Path, aspect: str,
                                         size: tuple[int, int]) -> None:
    video = kling.finished(aspect_ratio=aspect)
    assert check_video(tools, video, tmp_path / "v.mp4")[2] == size


def test_720p_on_request(tools: Any, tmp_path: Path) -> None:
    config = EmulatorConfig(access_key=tools.AK, secret_key=tools.SK, time_scale=0.0005, resolution="720p")
    with start_emulator(config) as handle:
        api = tools.Api(handle)
        video = api.finished()
        assert check_video(tools, video, tmp_path / "a.mp4")[2] == (1280, 720)
        extended = api.extend(video)
        assert check_video(tools, extended, tmp_path / "b.mp4")[2] == (1280, 720)
        api.http.close()


TTL = 2.0  # seconds; a task lives ~0.16 s, so the fresh download comes well within it


@pytest.fixture(scope="module")
def short_ttl(tools: Any) -> Iterator[Any]:
    config = EmulatorConfig(access_key=tools.AK, secret_key=tools.SK, time_scale=0.0005, result_ttl_seconds=TTL)
    with start_emulator(config) as handle:
        yield handle


def test_results_expire_after_the_ttl(short_ttl: Any, tools: Any, tmp_path: Path) -> None:
    api = tools.Api(short_ttl)
    video = api.finished()
    url = video["task_result"]["videos"][0]["url"]
    tools.download(url, tmp_path / "fresh.mp4")
    tools.until(lambda: api.http.get(url).status_code == 410, timeout=TTL + 10, what="the expiry")
    assert time.time() >= video["created_at"] / 1000 + TTL - 0.01, "not before the TTL (the emulator's clock)"
    refused = api.post("video-extend", {"video_id": video["task_result"]["videos"][0]["id"]})
    assert (refused.status_code, refused.json()["code"]) == (400, 1201)
    assert "expired" in refused.json()["message"]
    api.http.close()


def test_unknown_file_is_404(kling: Any) -> None:
    assert kling.http.get("/_files/00000000-0000-0000-0000-000000000000.mp4").status_code == 404


def test_image2video_starts_as_the_image_it_was_given_and_records_its_digest(kling: Any, tools: Any,
                                                                             tmp_path: Path) -> None:
    """The seam of a last-frame continuation can be checked on pixels: frame 0 is the picture sent, the clip
    then moves to a look of its own; the digest of what was received is in the stats."""
    image = jpeg((170, 80, 70))
    video = kling.finished("image2video", image=base64.b64encode(image).decode(), model_name="kling-v2-6",
                           external_task_id="i2v-start")
    _, frames, _ = check_video(tools, video, tmp_path / "i2v.mp4")
    assert np.abs(mean_rgb(frames[0]) - (170, 80, 70)).max() < 16, "the first frame is the image"
    assert np.abs(mean_rgb(frames[-1]) - mean_rgb(frames[0])).max() > 30, "and the clip moves on from it"
    task = kling.stats()["tasks"][video["task_id"]]
    assert task["image_sha256"] == hashlib.sha256(image).hexdigest()


@pytest.mark.parametrize(("size", "message"), [((200, 200), "at least 300 px"), ((900, 300), "aspect ratio")])
def test_image2video_refuses_images_outside_klings_rules(kling: Any, size: tuple[int, int], message: str) -> None:
    body = {"image": base64.b64encode(jpeg((90, 90, 90), size)).decode(), "model_name": "kling-v2-6"}
    answer = kling.post("image2video", body)
    assert answer.status_code == 400 and answer.json()["code"] == 1201 and message in answer.json()["message"]


def test_sound_on_renders_an_audio_track_as_long_as_the_picture(kling: Any, tools: Any, tmp_path: Path) -> None:
    import av

    video = kling.finished(model_name="kling-v2-6", mode="pro", sound="on", prompt="waves")
    seconds, _, _ = check_video(tools, video, tmp_path / "loud.mp4")
    with av.open(str(tmp_path / "loud.mp4")) as container:
        assert container.streams.audio
        sound = sum(frame.samples for frame in container.decode(audio=0)) / 48_000
    assert abs(sound - seconds) < 0.1
    refused = kling.post("text2video", {"model_name": "kling-v2-6", "mode": "std", "sound": "on", "prompt": "x"})
    assert refused.status_code == 400 and "sound is not supported" in refused.json()["message"]
