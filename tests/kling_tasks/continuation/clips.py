"""Small test clips made with PyAV: a moving gradient per clip, optionally with a sine tone."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import av
import numpy as np


def make_clip(path: Path, *, frames: int = 24, size: tuple[int, int] = (320, 180), shade: int = 60,
              preset: str = "ultrafast", gop: int | None = None, tone: float | None = None, rate: int = 24) -> Path:
    """`frames` frames of `size`; each frame differs (a bar moves), `shade` tints the clip; `tone` adds AAC."""
    width, height = size
    with av.open(str(path), "w", format="mp4") as container:
        video = container.add_stream("libx264", rate=rate)
        video.width, video.height, video.pix_fmt = width, height, "yuv420p"
        video.options = {"preset": preset, "crf": "23", **({"g": str(gop)} if gop else {})}
        audio = container.add_stream("aac", rate=48_000) if tone is not None else None
        if audio is not None:
            audio.layout = "stereo"
        samples = 0
        for index in range(frames):
            picture = np.full((height, width, 3), shade, dtype=np.uint8)
            x = (index * 7) % max(width - 10, 1)
            picture[:, x : x + 10] = 250
            frame = av.VideoFrame.from_ndarray(picture, format="rgb24")
            frame.pts, frame.time_base = index, Fraction(1, rate)
            container.mux(video.encode(frame))
            if audio is not None and tone is not None:
                until = round((index + 1) * 48_000 / rate)
                t = np.arange(samples, until) / 48_000
                wave = (0.2 * np.sin(2 * np.pi * tone * t)).astype(np.float32)
                sound = av.AudioFrame.from_ndarray(np.stack([wave, wave]), format="fltp", layout="stereo")
                sound.sample_rate, sound.pts, sound.time_base = 48_000, samples, Fraction(1, 48_000)
                samples = until
                container.mux(audio.encode(sound))
        container.mux(video.encode(None))
        if audio is not None:
            container.mux(audio.encode(None))
    return path


def decoded(path: Path) -> list[np.ndarray]:
    with av.open(str(path)) as container:
        return [frame.to_ndarray(format="gray") for frame in container.decode(video=0)]


def audio_seconds(path: Path) -> float | None:
    """The decoded sound's length, or None when the file has no audio stream."""
    with av.open(str(path)) as container:
        if not container.streams.audio:
            return None
        samples = sum(frame.samples for frame in container.decode(audio=0))
        return samples / 48_000
