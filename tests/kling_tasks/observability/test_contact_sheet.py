"""Contact sheet: one frame from the middle of each segment, tiled, JPEG, stored next to the video."""

from __future__ import annotations

import io
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
import pytest

from kling_tasks.observability.contact_sheet import (
    contact_sheet_key,
    grab_frames,
    make_contact_sheet,
    segment_midpoints,
    store_contact_sheet,
    tile,
)
from kling_tasks.storage import LocalSink

# Far-apart colours, one per segment, so a tile's colour says which segment it came from.
COLOURS = [(220, 40, 40), (40, 200, 60), (40, 60, 220), (230, 220, 40)]
FPS = 24


def write_video(path: Path, seconds: list[float], size: tuple[int, int] = (160, 90)) -> None:
    """An H.264 MP4 whose segment i (seconds[i] long) is a solid COLOURS[i]."""
    width, height = size
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=FPS)
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        stream.options = {"g": "48"}  # keyframes every 2 s, so seeking lands before the target
        pts = 0
        for segment, length in enumerate(seconds):
            rgb = np.empty((height, width, 3), dtype=np.uint8)
            rgb[:] = COLOURS[segment]
            for _ in range(round(length * FPS)):
                frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
                frame.pts, frame.time_base = pts, Fraction(1, FPS)
                pts += 1
                out.mux(stream.encode(frame))
        out.mux(stream.encode(None))


def decode_jpeg(data: bytes) -> np.ndarray:
    with av.open(io.BytesIO(data), format="mjpeg") as container:
        return next(container.decode(video=0)).to_ndarray(format="rgb24")


def test_midpoints_follow_the_cumulative_durations() -> None:
    assert segment_midpoints([5.0, 9.5, 14.0]) == [2.5, 7.25, 11.75]
    assert segment_midpoints([5.0, 4.0]) == [2.5, 5.0], "a shorter later duration never goes backwards"


def test_one_frame_from_the_middle_of_each_segment(tmp_path: Path) -> None:
    video = tmp_path / "final.mp4"
    write_video(video, [5.0, 4.5, 4.5, 4.5])
    thumbs = grab_frames(video, segment_midpoints([5.0, 9.5, 14.0, 18.5]), width=80)
    assert [t.shape for t in thumbs] == [(44, 80, 3)] * 4  # 80 * 90/160 = 45 -> even (round half to even)
    for thumb, colour in zip(thumbs, COLOURS, strict=True):
        assert np.abs(thumb.reshape(-1, 3).mean(axis=0) - colour).max() < 25


def test_sheet_is_a_tiled_jpeg_in_segment_order(tmp_path: Path) -> None:
    video = tmp_path / "final.mp4"
    write_video(video, [5.0, 4.5, 4.5])
    data = make_contact_sheet(video.read_bytes(), [5.0, 9.5, 14.0], width=80, columns=2)
    assert data[:3] == b"\xff\xd8\xff", "JPEG magic"
    sheet = decode_jpeg(data)
    # 2 columns x 2 rows of 80x44 tiles with a 4 px gap.
    assert sheet.shape == (2 * 44 + 3 * 4, 2 * 80 + 3 * 4, 3)
    centres = [(4 + 22, 4 + 40), (4 + 22, 8 + 80 + 40), (8 + 44 + 22, 4 + 40)]
    for (y, x), colour in zip(centres, COLOURS, strict=False):
        assert np.abs(sheet[y, x].astype(int) - colour).max() < 40


def test_tile_pads_to_even_size_and_refuses_nothing() -> None:
    odd = [np.zeros((5, 7, 3), dtype=np.uint8)]
    assert tile(odd).shape[0] % 2 == 0 and tile(odd).shape[1] % 2 == 0
    with pytest.raises(ValueError):
        tile([])


def test_stored_next_to_the_video(tmp_path: Path) -> None:
    sink = LocalSink(tmp_path / "out")
    video = tmp_path / "v.mp4"
    write_video(video, [2.0, 2.0])
    sink.write_bytes("job-1/final.mp4", video.read_bytes(), "video/mp4")
    stored = store_contact_sheet(sink, "job-1", "job-1/final.mp4", [2.0, 4.0])
    assert stored is not None and stored.key == contact_sheet_key("job-1") == "job-1/contact-sheet.jpg"
    assert Path(stored.uri) == tmp_path / "out" / "job-1" / "contact-sheet.jpg"
    assert 0 < stored.size < 50_000, "small enough to embed in a markdown artifact"
    assert store_contact_sheet(sink, "job-1", "job-1/final.mp4", [2.0, 4.0], video_size=10**12) is None
    with pytest.raises(FileNotFoundError):
        store_contact_sheet(sink, "job-1", "job-1/missing.mp4", [2.0])
