"""The start frame of a continuation: the clip's very last picture, within Kling's image rules."""

from __future__ import annotations

import io
from pathlib import Path

import av
import numpy as np
import pytest

from kling_tasks.continuation.frames import FrameError, frame_size_for, last_frame, start_frame

from .clips import decoded, make_clip


@pytest.mark.parametrize(("size", "sent"), [
    ((320, 180), (534, 300)),  # a side under 300 px: scaled up, aspect kept
    ((180, 320), (300, 534)),
    ((1280, 720), (1280, 720)),  # already fine: sent as it is
    ((301, 301), (302, 302)),  # even sides for 4:2:0
])
def test_sizes_are_scaled_up_to_klings_minimum(size: tuple[int, int], sent: tuple[int, int]) -> None:
    assert frame_size_for(*size) == sent


@pytest.mark.parametrize("size", [(1000, 300), (300, 800)])
def test_aspects_beyond_two_and_a_half_to_one_are_refused(size: tuple[int, int]) -> None:
    with pytest.raises(FrameError, match=r"between 1:2\.5 and 2\.5:1"):
        frame_size_for(*size)


@pytest.mark.parametrize("gop", [None, 5])  # one keyframe, or many: the seek lands in the last group
def test_the_last_frame_is_the_clips_last_picture(tmp_path: Path, gop: int | None) -> None:
    clip = make_clip(tmp_path / "clip.mp4", frames=37, gop=gop)
    picture = last_frame(clip).to_ndarray(format="gray")
    assert np.array_equal(picture, decoded(clip)[-1])


def test_the_start_frame_is_a_jpeg_kling_accepts(tmp_path: Path) -> None:
    clip = make_clip(tmp_path / "clip.mp4", frames=30)
    frame = start_frame(clip)
    assert frame.jpeg[:2] == b"\xff\xd8" and frame.scaled and frame.source_size == (320, 180)
    with av.open(io.BytesIO(frame.jpeg)) as image:
        picture = next(image.decode(video=0))
    assert (picture.width, picture.height) == (534, 300)
    back = picture.reformat(width=320, height=180, format="gray").to_ndarray().astype(float)
    assert np.abs(back - decoded(clip)[-1]).mean() < 3, "the JPEG shows the clip's last picture"
    assert start_frame(clip).jpeg == frame.jpeg, "the same clip gives the same bytes (reruns send the same image)"


def test_a_too_wide_clip_cannot_be_continued(tmp_path: Path) -> None:
    clip = make_clip(tmp_path / "wide.mp4", frames=4, size=(960, 300))
    with pytest.raises(FrameError, match="cannot be continued"):
        start_frame(clip)
