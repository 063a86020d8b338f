"""The last frame of a clip as the JPEG a continuation starts from, within Kling's image rules (§5.2).

Kling's rules for `image`: <= 10 MB, each side >= 300 px, aspect between 1:2.5 and 2.5:1. A frame with a side
under 300 px is scaled up (aspect kept); a frame outside the aspect range cannot be fixed without cropping the
picture the next clip must continue, so it is refused before the continuation's request is sent.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av

from kling_tasks.api.catalog import MAX_IMAGE_BYTES
from kling_tasks.jobs import PlanError

MIN_SIDE = 300
MAX_ASPECT = 2.5
JPEG_QUALITY = 2  # mjpeg's qscale: 2 is near-lossless; a 1080p frame stays well under 1 MB


class FrameError(PlanError):
    """The clip's last frame cannot become a Kling start image (or the clip has no frame at all); raised
    before the continuation's request, so nothing is paid for it."""


@dataclass(frozen=True)
class StartFrame:
    jpeg: bytes
    width: int
    height: int
    source_size: tuple[int, int]  # the clip's own frame size, before any scaling

    @property
    def scaled(self) -> bool:
        return (self.width, self.height) != self.source_size


def frame_size_for(width: int, height: int) -> tuple[int, int]:
    """The size to send for a `width` x `height` frame: refused beyond 2.5:1, scaled up to 300 px a side."""
    aspect = width / height
    if not 1 / MAX_ASPECT <= aspect <= MAX_ASPECT:
        raise FrameError(
            f"the clip is {width}x{height} (aspect {aspect:.2f}:1); Kling's start images must be between 1:2.5 "
            "and 2.5:1, so it cannot be continued from its last frame"
        )
    scale = max(1.0, MIN_SIDE / min(width, height))
    # Even sides (the JPEG is 4:2:0) and never under the minimum after rounding.
    return _even_at_least(width * scale), _even_at_least(height * scale)


def _even_at_least(value: float) -> int:
    side = math.ceil(value)
    return side + (side % 2)


def last_frame(video: Path) -> av.VideoFrame:
    """The clip's last decoded frame: seek to the last keyframe, decode to the end (memory: one GOP at most)."""
    with av.open(str(video)) as container:
        if not container.streams.video:
            raise FrameError(f"{video.name} has no video stream")
        stream = container.streams.video[0]
        if stream.duration is not None:
            container.seek(stream.duration + (stream.start_time or 0), stream=stream, backward=True)
        frame = _last_of(container.decode(stream))
        if frame is None and stream.duration is not None:  # the seek overshot: read from the start
            container.seek(0, stream=stream)
            frame = _last_of(container.decode(stream))
    if frame is None:
        raise FrameError(f"{video.name} has no decodable frame")
    return frame


def _last_of(frames: Iterator[av.VideoFrame]) -> av.VideoFrame | None:
    last = None
    for last in frames:  # noqa: B007 - only the last one is kept
        pass
    return last


def start_frame(video: Path) -> StartFrame:
    """The JPEG of `video`'s last frame, scaled to Kling's minimum if needed."""
    frame = last_frame(video)
    width, height = frame_size_for(frame.width, frame.height)
    codec = av.CodecContext.create("mjpeg", "w")
    codec.width, codec.height, codec.pix_fmt = width, height, "yuvj420p"
    codec.time_base = Fraction(1, 25)
    codec.options = {"qmin": str(JPEG_QUALITY), "qmax": str(JPEG_QUALITY)}
    picture = frame.reformat(width=width, height=height, format="yuvj420p", interpolation="BICUBIC")
    jpeg = b"".join(bytes(packet) for packet in [*codec.encode(picture), *codec.encode(None)])
    if len(jpeg) > MAX_IMAGE_BYTES:
        raise FrameError(f"the last frame is {len(jpeg) / 1e6:.1f} MB as JPEG; Kling accepts at most 10 MB")
    return StartFrame(jpeg=jpeg, width=width, height=height, source_size=(frame.width, frame.height))
