"""Last-frame continuation end to end: kling-v2-6 (which has no video-extend) made long by image2video from each
clip's last frame, stored in moto's S3 server, checked on decoded pixels and the emulator's records."""

from __future__ import annotations

import hashlib
import io
import json
import uuid
from pathlib import Path
from typing import Any

import av
import boto3
import numpy as np
import pytest
from typer.testing import CliRunner

from flows.cli import app

pytestmark = pytest.mark.usefixtures("prefect_server")
runner = CliRunner()
BUCKET = "continuation"
DEST = f"s3://{BUCKET}/videos"
V2_6 = ["--model", "kling-v2-6", "--mode", "std", "--duration", "5"]
PROMPTS = ["a red kite over a beach", "it climbs into the clouds", "it dives to the sea", "it lands on the sand"]


def cli(*args: str | Path) -> Any:
    return runner.invoke(app, [str(arg) for arg in args])


def run_args(job_id: str, dest: str = DEST, *extra: str) -> list[str]:
    args = ["run", "--prompt", PROMPTS[0], *V2_6, "--job-id", job_id, "--dest", dest, *extra]
    for prompt in PROMPTS[1:]:
        args += ["--extend", prompt]
    return args


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"  # the session shares one Prefect cache: never reuse a job id


def s3_bytes(key: str) -> bytes:
    return bytes(boto3.client("s3").get_object(Bucket=BUCKET, Key=f"videos/{key}")["Body"].read())


def gray_frames(data: bytes) -> list[np.ndarray]:
    """Every decoded frame's luma, as floats."""
    with av.open(io.BytesIO(data)) as container:
        return [frame.to_ndarray(format="gray").astype(np.float64) for frame in container.decode(video=0)]


def differ(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a - b).mean())


@pytest.fixture
def bucket(s3_endpoint: str) -> str:
    boto3.client("s3").create_bucket(Bucket=BUCKET)
    return DEST


def test_three_continuations_on_v2_6_make_one_seamless_video(kling_env: dict[str, str], emulator: Any,
                                                             bucket: str) -> None:
    job_id = new_id("lastframe")
    result = cli(*run_args(job_id))
    assert result.exit_code == 0, result.output

    stats = emulator.stats()
    tasks = sorted(stats["tasks"].values(), key=lambda task: task["created_at"])
    assert [task["kind"] for task in tasks] == ["text2video", "image2video", "image2video", "image2video"]
    assert set(stats["create_attempts"].values()) == {1} and len(stats["create_attempts"]) == 4, "each created once"
    assert set(stats["tasks_created"].values()) == {1}

    manifest = json.loads(s3_bytes(f"{job_id}/manifest.json"))
    assert manifest["continuation"] == "last-frame" and manifest["status"] == "succeeded"
    assert [step["name"] for step in manifest["steps"]] == ["generate", "continue-1-of-3", "continue-2-of-3",
                                                            "continue-3-of-3"]
    assert manifest["credits_charged"] == manifest["estimated_credits"] == 4 * 1.5, "four 5 s std clips of v2-6"

    clips = [gray_frames(s3_bytes(f"{job_id}/clip-{index:02d}.mp4")) for index in range(4)]
    final = gray_frames(s3_bytes(f"{job_id}/final.mp4"))
    assert len(final) == sum(len(clip) for clip in clips) - 3, "every frame of every clip but one per seam"
    for index in range(4):  # step-NN.mp4 is the whole video so far
        whole = gray_frames(s3_bytes(f"{job_id}/step-{index:02d}.mp4"))
        assert len(whole) == sum(len(clip) for clip in clips[: index + 1]) - index
    assert s3_bytes(f"{job_id}/final.mp4") == s3_bytes(f"{job_id}/step-03.mp4")

    start = 0
    for index in range(3):  # each seam: the frames either side are close, frames of two segments are not
        start += len(clips[index]) - 1
        seam = differ(final[start - 1], final[start])
        segments = differ(final[start - 1], final[start + len(clips[index + 1]) - 2])
        assert seam < 0.6 * segments, f"seam {index + 1}: {seam:.1f} vs {segments:.1f} between segments"

    sent = {task["external_task_id"]: task["image_sha256"] for task in tasks}
    for index in range(1, 4):  # the image each continuation sent is the previous clip's last frame
        step = manifest["steps"][index]
        jpeg = s3_bytes(f"{job_id}/frame-{index:02d}.jpg")
        assert sent[step["external_task_id"]] == hashlib.sha256(jpeg).hexdigest() == step["start_frame_sha256"]
        with av.open(io.BytesIO(jpeg)) as image:
            picture = next(image.decode(video=0))
        assert min(picture.width, picture.height) >= 300, "the emulator's 320x180 clips are scaled up for Kling"
        last = clips[index - 1][-1]
        shrunk = picture.reformat(width=last.shape[1], height=last.shape[0], format="gray").to_ndarray()
        assert differ(shrunk.astype(np.float64), last) < 4.0, f"frame-{index:02d}.jpg is clip {index - 1}'s end"
    assert {step["stitched_by"] for step in manifest["steps"][1:]} == {"copy"}, "same encoder: stream copy"


def test_auto_keeps_video_extend_where_the_model_has_it(kling_env: dict[str, str], emulator: Any,
                                                         tmp_path: Path) -> None:
    job_id = new_id("auto-extend")
    result = cli("run", "--prompt", "a kite", "--model", "kling-v1-6", "--extend", "it climbs", "--job-id", job_id,
                 "--dest", tmp_path)
    assert result.exit_code == 0, result.output
    kinds = sorted(task["kind"] for task in emulator.stats()["tasks"].values())
    assert kinds == ["text2video", "video-extend"]
    manifest = json.loads((tmp_path / job_id / "manifest.json").read_text())
    assert manifest["continuation"] == "extend"
    assert not list((tmp_path / job_id).glob("clip-*.mp4")), "video-extend jobs keep no separate clips"


def test_extend_on_a_model_without_video_extend_is_refused_before_any_request(kling_env: dict[str, str],
                                                                               emulator: Any, tmp_path: Path) -> None:
    result = cli("run", "--prompt", "a kite", *V2_6, "--extend", "it climbs", "--continuation", "extend",
                 "--dest", tmp_path)
    assert result.exit_code == 2, result.output
    assert "cannot be extended with video-extend" in result.output and "last-frame" in result.output
    assert emulator.stats()["requests"] == {}, "nothing was sent"


def test_estimate_prices_continuations_as_image2video_clips(kling_env: dict[str, str], emulator: Any) -> None:
    result = cli("estimate", "--prompt", "a kite", "--model", "kling-v2-6", "--mode", "pro", "--extend", "on",
                 "--extend", "and on")
    assert result.exit_code == 0, result.output
    assert result.stdout.strip().splitlines()[-1] == "7.5", "three 5 s pro clips of v2-6 at 2.5 each"
    over = cli("run", "--prompt", "a kite", *V2_6, "--extend", "a", "--extend", "b", "--max-seconds", "12")
    assert over.exit_code == 2 and "max_seconds" in over.output, over.output
    assert emulator.stats()["requests"] == {}


def test_sound_is_asked_for_each_clip_and_stitched_with_the_picture(kling_env: dict[str, str], emulator: Any,
                                                                    tmp_path: Path) -> None:
    job_id = new_id("lastframe-sound")
    result = cli("run", "--prompt", "waves on a shore", "--model", "kling-v2-6", "--mode", "pro", "--sound", "on",
                 "--extend", "a gull calls", "--job-id", job_id, "--dest", tmp_path)
    assert result.exit_code == 0, result.output
    folder = tmp_path / job_id
    for name in ("clip-00.mp4", "clip-01.mp4"):
        with av.open(str(folder / name)) as clip:
            assert clip.streams.audio, f"{name}: the continuation asked for sound too"
    with av.open(str(folder / "final.mp4")) as final:
        assert final.streams.audio, "the stitched video keeps the sound"
        sound = sum(frame.samples for frame in final.decode(audio=0)) / 48_000
    pictures = len(gray_frames((folder / "final.mp4").read_bytes()))
    assert abs(sound - pictures / 24) < 0.1, (sound, pictures / 24)
    refused = cli("run", "--prompt", "waves", *V2_6, "--sound", "on", "--dest", tmp_path)
    assert refused.exit_code == 2 and "makes no sound" in refused.output, "v2-6 std renders no audio"
