"""A contact sheet: one frame from the middle of every segment of the final video, tiled into one JPEG.

Frames come from the final video, not from each step's file: every extension re-delivers the whole video
so far, so the final video holds every segment (generation = segment 0, extension i = segment i) and the
sheet shows exactly what the user gets, from one file, decoded once. Segment bounds come from the steps'
durations (each step's duration is the length of the video after that step).

PyAV does the decoding, scaling and JPEG encoding: no image library is needed.
"""

from __future__ import annotations

import io
import logging
from collections.abc import Sequence
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from kling_tasks.storage import Sink, StoredObject

logger = logging.getLogger(__name__)

THUMB_WIDTH = 320
MAX_COLUMNS = 4
GAP = 4  # pixels of background between tiles
BACKGROUND = (24, 24, 27)  # dark grey, close to the Prefect UI's dark theme
MAX_VIDEO_BYTES = 512 * 1024 * 1024  # above this the sheet is skipped rather than loaded into memory
CONTENT_TYPE = "image/jpeg"


def contact_sheet_key(job_id: str) -> str:
    return f"{job_id}/contact-sheet.jpg"


def segment_midpoints(durations: Sequence[float]) -> list[float]:
    """Middle of each segment, given the video's length after each step (cumulative, non-decreasing)."""
    points, start = [], 0.0
    for end in durations:
        end = max(end, start)
        points.append((start + end) / 2)
        start = end
    return points


def grab_frames(video: str | Path | io.BytesIO, times: Sequence[float], width: int = THUMB_WIDTH) -> list[np.ndarray]:
    """RGB thumbnails (`width` wide, even height) of the first frame at or after each time (seconds).

    One seek per time, so a long 1080p video costs a few GOPs per segment rather than a full decode.
    A time past the end gives the last frame.
    """
    thumbs: list[np.ndarray] = []
    with av.open(video if isinstance(video, io.BytesIO) else str(video), mode="r") as container:
        stream = container.streams.video[0]
        stream.thread_type = "AUTO"
        time_base = stream.time_base or Fraction(1, 1000)
        for at in times:
            container.seek(max(0, int(at / time_base)), stream=stream, backward=True)
            chosen = None
            for frame in container.decode(stream):
                chosen = frame
                if frame.time is not None and frame.time >= at:
                    break
            if chosen is None:
                raise ValueError(f"no frame at or before {at:.2f} s")
            height = max(2, round(width * chosen.height / chosen.width / 2) * 2)
            thumbs.append(chosen.reformat(width=width, height=height, format="rgb24").to_ndarray())
    return thumbs


def tile(thumbs: Sequence[np.ndarray], columns: int = MAX_COLUMNS) -> np.ndarray:
    """Lay thumbnails out left to right, top to bottom, with a gap; even dimensions for 4:2:0 JPEG."""
    if not thumbs:
        raise ValueError("no frames to tile")
    columns = max(1, min(columns, len(thumbs)))
    rows = -(-len(thumbs) // columns)
    cell_h = max(t.shape[0] for t in thumbs)
    cell_w = max(t.shape[1] for t in thumbs)
    height = rows * cell_h + (rows + 1) * GAP
    width = columns * cell_w + (columns + 1) * GAP
    sheet = np.empty((height + height % 2, width + width % 2, 3), dtype=np.uint8)
    sheet[:] = BACKGROUND
    for n, thumb in enumerate(thumbs):
        top = GAP + (n // columns) * (cell_h + GAP)
        left = GAP + (n % columns) * (cell_w + GAP)
        sheet[top:top + thumb.shape[0], left:left + thumb.shape[1]] = thumb
    return sheet


def encode_jpeg(rgb: np.ndarray, quality: int = 4) -> bytes:
    """JPEG through FFmpeg's mjpeg encoder; `quality` is its qscale (2 best .. 31 worst)."""
    height, width = rgb.shape[:2]
    codec = av.CodecContext.create("mjpeg", "w")
    codec.width, codec.height = width, height
    codec.pix_fmt = "yuvj420p"
    codec.time_base = Fraction(1, 1)
    codec.options = {"qmin": str(quality), "qmax": str(quality)}
    frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(rgb), format="rgb24").reformat(format="yuvj420p")
    packets = [*codec.encode(frame), *codec.encode(None)]
    return b"".join(bytes(packet) for packet in packets)


def make_contact_sheet(video: str | Path | bytes, durations: Sequence[float], *, width: int = THUMB_WIDTH,
                       columns: int = MAX_COLUMNS) -> bytes:
    """JPEG bytes of one frame per segment of `video` (a path or the file's bytes)."""
    source = io.BytesIO(video) if isinstance(video, bytes) else video
    return encode_jpeg(tile(grab_frames(source, segment_midpoints(durations), width), columns))


def store_contact_sheet(sink: Sink, job_id: str, video_key: str, durations: Sequence[float],
                        video_size: int | None = None) -> StoredObject | None:
    """Make the sheet from the stored video and write it next to it; None if the video is too big to load."""
    if video_size is not None and video_size > MAX_VIDEO_BYTES:
        logger.warning("contact sheet skipped: %s is %d bytes", video_key, video_size)
        return None
    data = sink.read_bytes(video_key)
    if data is None:
        raise FileNotFoundError(f"{video_key} is not in {sink.dest}")
    return sink.write_bytes(contact_sheet_key(job_id), make_contact_sheet(data, durations), CONTENT_TYPE)
