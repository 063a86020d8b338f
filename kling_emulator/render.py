"""Real H.264 MP4s with PyAV: one colour/pattern per segment, segment number and running time drawn on.

A video is a list of segments (frame counts). A generation is one segment; an extension is the parent's
segments plus one new one. Extensions copy the parent's packets (stream copy) and encode only the new
segment, which is what keeps 720p chains cheap; if the encoder's parameter sets ever differ from the
parent's, the whole video is re-rendered instead (same picture, slower).
"""

from __future__ import annotations

import io
import os
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path

import av
import numpy as np

from kling_emulator.font import draw_text, text_box

FPS = 24
_SIZES = {
    "small": {"16:9": (320, 180), "9:16": (180, 320), "1:1": (180, 180)},
    "720p": {"16:9": (1280, 720), "9:16": (720, 1280), "1:1": (720, 720)},
}
# (Y mean, U, V) per segment: far apart hues so neighbouring segments are obvious by eye.
_PALETTE = [(90, 90, 200), (110, 200, 110), (120, 60, 80), (150, 180, 190), (70, 200, 60), (140, 90, 60)]


@dataclass(frozen=True)
class RenderSpec:
    width: int
    height: int
    fps: int = FPS


def spec_for(resolution: str, aspect_ratio: str = "16:9") -> RenderSpec:
    sizes = _SIZES.get(resolution, _SIZES["small"])
    width, height = sizes.get(aspect_ratio, sizes["16:9"])
    return RenderSpec(width, height)


def frames_for(seconds: float, fps: int = FPS) -> int:
    """Whole frames, so the decoded duration is exactly frames / fps."""
    return max(1, round(seconds * fps))


def seconds_label(frames: int, fps: int = FPS) -> str:
    """The API's duration string for a clip of `frames` frames, e.g. "5.000"."""
    return f"{frames / fps:.3f}"


class _Painter:
    """Draws frames of one segment: a striped, tinted background, a progress bar and the labels."""

    def __init__(self, spec: RenderSpec, segment: int, frames: int) -> None:
        self.spec, self.segment, self.frames = spec, segment, frames
        h, w = spec.height, spec.width
        y_mean, u, v = _PALETTE[(segment - 1) % len(_PALETTE)]
        yy, xx = np.mgrid[0:h, 0:w]
        period = 12 + 6 * ((segment - 1) % 4)
        # Stripe direction alternates per segment: vertical, diagonal, horizontal, other diagonal.
        axis = [xx, xx + yy, yy, xx - yy][(segment - 1) % 4]
        stripes = ((axis // period) % 2).astype(np.int16) * 40 - 20
        self.base_y = np.clip(y_mean + stripes, 16, 235).astype(np.uint8)
        self.u = np.full((h // 2, w // 2), u, dtype=np.uint8)
        self.v = np.full((h // 2, w // 2), v, dtype=np.uint8)
        self.big = max(2, h // 30)
        self.small = max(2, h // 45)
        label = f"#{segment}"
        draw_text(self.base_y, label, self.big * 2, self.big * 2, self.big)
        self._neutral(text_box(label, self.big * 2, self.big * 2, self.big))
        self.time_xy = (self.small * 2, h - self.small * 10)
        self._neutral(text_box("000.00", *self.time_xy, self.small))

    def _neutral(self, box: tuple[int, int, int, int]) -> None:
        # Grey chroma under the labels so the digits stay white on black whatever the tint.
        y0, y1, x0, x1 = (max(c, 0) // 2 for c in box)
        self.u[y0:y1, x0:x1] = 128
        self.v[y0:y1, x0:x1] = 128

    def frame(self, local_index: int, global_index: int) -> np.ndarray:
        h, w = self.spec.height, self.spec.width
        y = self.base_y.copy()
        bar_x = int((local_index / max(self.frames, 1)) * (w - 8))
        y[h // 3 : 2 * h // 3, bar_x : bar_x + 8] = 235
        x, top = self.time_xy
        draw_text(y, f"{global_index / self.spec.fps:06.2f}", x, top, self.small)
        return np.concatenate([y, self.u.reshape(-1, w), self.v.reshape(-1, w)])


def image_size(raw: bytes) -> tuple[int, int]:
    """(width, height) of a JPEG/PNG; ValueError if it is not a decodable image."""
    try:
        with av.open(io.BytesIO(raw)) as container:
            frame = next(container.decode(video=0))
    except (av.FFmpegError, StopIteration, IndexError) as exc:
        raise ValueError("not a decodable JPEG or PNG image") from exc
    return frame.width, frame.height


def start_picture(raw: bytes, spec: RenderSpec) -> np.ndarray:
    """The image scaled to the output size, as the planar YUV 4:2:0 array the painter produces."""
    with av.open(io.BytesIO(raw)) as container:
        frame = next(container.decode(video=0))
    return frame.reformat(width=spec.width, height=spec.height, format="yuv420p", interpolation="BICUBIC").to_ndarray()


def far_segment(picture: np.ndarray, spec: RenderSpec) -> int:
    """The palette segment whose colours are farthest from the picture's mean: the clip visibly moves on."""
    h = spec.height
    y = float(picture[:h].mean())
    u = float(picture[h : h + h // 4].mean())
    v = float(picture[h + h // 4 :].mean())
    distances = [abs(y - py) + abs(u - pu) + abs(v - pv) for py, pu, pv in _PALETTE]
    return distances.index(max(distances)) + 1


def _open_encoder(path: Path, spec: RenderSpec) -> tuple[av.container.OutputContainer, av.video.VideoStream]:
    container = av.open(str(path), mode="w", format="mp4", options={"movflags": "+faststart"})
    stream = container.add_stream("libx264", rate=spec.fps)
    stream.width, stream.height, stream.pix_fmt = spec.width, spec.height, "yuv420p"
    stream.options = {"preset": "ultrafast", "crf": "30"}
    return container, stream


def render_segments(path: Path, segments: list[int], spec: RenderSpec, first_segment: int = 1,
                    first_frame: int = 0, start: np.ndarray | None = None, sound: bool = False) -> None:
    """Encode `segments` (frame counts) into one MP4, numbering them from `first_segment`.

    `start` (image2video): the first segment begins as that picture and blends into its own pattern, so its
    first frame is the image the task was given and its last is the segment's own look. `sound`: an AAC track,
    one tone per segment."""
    tmp = path.with_name(path.name + ".part")
    container, stream = _open_encoder(tmp, spec)
    audio = _Tone(container, spec.fps) if sound else None
    time_base = Fraction(1, spec.fps)
    global_index = first_frame
    try:
        for offset, frames in enumerate(segments):
            painter = _Painter(spec, first_segment + offset, frames)
            for i in range(frames):
                picture = painter.frame(i, global_index)
                if start is not None and offset == 0:
                    t = i / max(frames - 1, 1)
                    picture = np.round((1 - t) * start + t * picture).astype(np.uint8)
                frame = av.VideoFrame.from_ndarray(picture, format="yuv420p")
                frame.pts, frame.time_base = global_index - first_frame, time_base
                container.mux(stream.encode(frame))
                if audio is not None:
                    audio.add_frame(global_index - first_frame, first_segment + offset)
                global_index += 1
        container.mux(stream.encode(None))
        if audio is not None:
            audio.close()
    finally:
        container.close()
    os.replace(tmp, path)


class _Tone:
    """An AAC stereo track of sine tones, written one video frame's worth at a time (A/V stay in step)."""

    RATE = 48_000

    def __init__(self, container: av.container.OutputContainer, fps: int) -> None:
        self.container, self.fps = container, fps
        self.stream = container.add_stream("aac", rate=self.RATE)
        self.stream.layout = "stereo"

    def add_frame(self, index: int, segment: int) -> None:
        first, end = (round(i * self.RATE / self.fps) for i in (index, index + 1))
        t = np.arange(first, end) / self.RATE
        wave = (0.2 * np.sin(2 * np.pi * 110 * (1 + segment % 4) * t)).astype(np.float32)
        frame = av.AudioFrame.from_ndarray(np.stack([wave, wave]), format="fltp", layout="stereo")
        frame.sample_rate, frame.pts, frame.time_base = self.RATE, first, Fraction(1, self.RATE)
        self.container.mux(self.stream.encode(frame))

    def close(self) -> None:
        self.container.mux(self.stream.encode(None))


def extend_file(parent: Path, out: Path, parent_segments: list[int], new_frames: int, spec: RenderSpec) -> str:
    """Write parent + one new segment to `out`. Returns "remux" or "rerender" (which way it went)."""
    seg_path = out.with_name(out.name + ".seg.mp4")
    render_segments(seg_path, [new_frames], spec, len(parent_segments) + 1, sum(parent_segments))
    try:
        if _concat_copy(parent, seg_path, out, sum(parent_segments), spec):
            return "remux"
    finally:
        seg_path.unlink(missing_ok=True)
    render_segments(out, [*parent_segments, new_frames], spec)
    return "rerender"


def _concat_copy(first: Path, second: Path, out: Path, first_frames: int, spec: RenderSpec) -> bool:
    """Stream-copy two MP4s made by the same encoder settings into one; False if they don't fit."""
    tmp = out.with_name(out.name + ".part")
    with av.open(str(first)) as a, av.open(str(second)) as b:
        sa, sb = a.streams.video[0], b.streams.video[0]
        same = (sa.codec_context.extradata == sb.codec_context.extradata and sa.time_base == sb.time_base
                and (sa.width, sa.height) == (sb.width, sb.height))
        if not same or sa.time_base is None:
            return False
        offset = int(Fraction(first_frames, spec.fps) / sa.time_base)
        with av.open(str(tmp), mode="w", format="mp4", options={"movflags": "+faststart"}) as dst:
            ds = dst.add_stream_from_template(sa)
            for source, shift in ((a, 0), (b, offset)):
                for packet in source.demux(source.streams.video[0]):
                    if packet.dts is None:
                        continue  # the demuxer's end-of-stream flush packet
                    packet.pts = None if packet.pts is None else packet.pts + shift
                    packet.dts += shift
                    packet.stream = ds
                    dst.mux(packet)
    os.replace(tmp, out)
    return True


def probe(path: Path) -> tuple[int, float]:
    """(decoded frame count, duration in seconds) by decoding every frame — for tests and checks."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        count = sum(1 for _ in container.decode(stream))
        rate = stream.average_rate or FPS
    return count, count / float(rate)
