"""Join clips into one video without a doubled frame at each seam.

A continuation clip starts from the previous clip's last frame, so that picture would show twice. The last
frame of every clip but the final one is dropped (the continuation's first frame replaces it):
frames(out) = sum(frames(clips)) - (len(clips) - 1).

Two ways, chosen per call:
- stream copy, when every clip has the same video parameters and no frame reordering (no B-frames: then the
  last packet is the last frame and no other frame refers to it, so dropping it is safe); audio packets are
  copied too, cut where the clip's kept video ends;
- re-encoding (H.264, and AAC when any clip has sound) otherwise, at the first clip's size and frame rate.
Both are deterministic: the same clips give the same bytes, so a stitch redone after a crash changes nothing.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Literal

import av
import numpy as np
from av.audio.stream import AudioStream
from av.video.stream import VideoStream

Method = Literal["copy", "reencode"]
AUDIO_RATE = 48_000
_MP4 = {"movflags": "+faststart"}


@dataclass(frozen=True)
class StitchReport:
    method: Method
    frames: int  # video frames written
    dropped: int  # seam frames left out
    seconds: float  # the joined video's length


@dataclass(frozen=True)
class _ClipInfo:
    """What decides whether clips can be joined by stream copy."""

    video: tuple[object, ...]
    audio: tuple[object, ...] | None
    reordered: bool


def stitch_clips(clips: list[Path], out: Path) -> StitchReport:
    """Write `clips` joined in order to `out` (atomically: a temp file, then a rename)."""
    if not clips:
        raise ValueError("nothing to stitch")
    tmp = out.with_name(out.name + ".part")
    try:
        infos = [_info(clip) for clip in clips]
        same = all(info == infos[0] for info in infos) and not infos[0].reordered
        report = _copy(clips, tmp) if same else _reencode(clips, tmp)
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)
    return report


def _info(clip: Path) -> _ClipInfo:
    with av.open(str(clip)) as container:
        v = container.streams.video[0]
        video = (v.codec_context.name, v.width, v.height, v.format.name if v.format else None, v.time_base,
                 v.average_rate, bytes(v.codec_context.extradata or b""))
        audio = None
        if container.streams.audio:
            a = container.streams.audio[0]
            audio = (a.codec_context.name, a.sample_rate, a.layout.name, a.time_base,
                     bytes(a.codec_context.extradata or b""))
        reordered, highest = False, None
        for packet in container.demux(v):
            if packet.pts is None:
                continue
            reordered = reordered or (highest is not None and packet.pts < highest)
            highest = packet.pts if highest is None else max(highest, packet.pts)
    return _ClipInfo(video, audio, reordered)


# ---- stream copy ------------------------------------------------------------------------------------------


def _copy(clips: list[Path], tmp: Path) -> StitchReport:
    frames = dropped = 0
    video_offset = audio_offset = 0  # in the output streams' time bases (the clips' own: they are equal)
    with av.open(str(clips[0])) as first, av.open(str(tmp), "w", format="mp4", options=_MP4) as dst:
        out_v = dst.add_stream_from_template(first.streams.video[0])
        has_audio = bool(first.streams.audio)
        out_a = dst.add_stream_from_template(first.streams.audio[0]) if has_audio else None
        for number, clip in enumerate(clips):
            last_clip = number == len(clips) - 1
            with av.open(str(clip)) as src:
                v = src.streams.video[0]
                v_first, v_last = _pts_range(clip)
                cut = None if last_clip else v_last  # the seam frame: the next clip starts with it
                a = src.streams.audio[0] if out_a is not None and src.streams.audio else None
                a_first: int | None = None
                a_kept = 0
                streams = [v, a] if a is not None else [v]
                for packet in src.demux(*streams):
                    if packet.dts is None:
                        continue  # the demuxer's end-of-stream flush packet
                    if packet.stream.type == "video":
                        if cut is not None and packet.pts == cut:
                            dropped += 1
                            continue
                        packet.pts = None if packet.pts is None else packet.pts - v_first + video_offset
                        packet.dts = packet.dts - v_first + video_offset
                        packet.stream = out_v
                        frames += 1
                        dst.mux(packet)
                    else:
                        assert a is not None and out_a is not None and packet.pts is not None
                        a_first = packet.pts if a_first is None else a_first
                        start = packet.pts - a_first
                        if cut is not None and _seconds(start, a.time_base) >= _seconds(cut - v_first, v.time_base):
                            continue  # sound of the dropped frame and after
                        packet.pts = start + audio_offset
                        packet.dts = packet.pts
                        a_kept = max(a_kept, start + (packet.duration or 0))
                        packet.stream = out_a
                        dst.mux(packet)
                span = (cut if cut is not None else v_last + _frame_ticks(v)) - v_first
                video_offset += span
                audio_offset += a_kept
    assert out_v.time_base is not None
    return StitchReport("copy", frames, dropped, float(video_offset * out_v.time_base))


def _pts_range(clip: Path) -> tuple[int, int]:
    """(first, last) presentation timestamps of the clip's video packets."""
    with av.open(str(clip)) as container:
        stamps = [p.pts for p in container.demux(container.streams.video[0]) if p.pts is not None]
    if not stamps:
        raise ValueError(f"{clip.name} has no video frames")
    return min(stamps), max(stamps)


def _frame_ticks(stream: VideoStream) -> int:
    rate = stream.average_rate or Fraction(24)
    assert stream.time_base is not None
    return max(1, round(1 / (rate * stream.time_base)))


def _seconds(ticks: int, time_base: Fraction | None) -> Fraction:
    assert time_base is not None
    return ticks * time_base


# ---- re-encoding ------------------------------------------------------------------------------------------


def _reencode(clips: list[Path], tmp: Path) -> StitchReport:
    with av.open(str(clips[0])) as first:
        v0 = first.streams.video[0]
        width, height = v0.width, v0.height
        rate = v0.average_rate or Fraction(24)
    sound = any(_has_audio(clip) for clip in clips)
    frames = dropped = 0
    with av.open(str(tmp), "w", format="mp4", options=_MP4) as dst:
        out_v = dst.add_stream("libx264", rate=rate)
        out_v.width, out_v.height, out_v.pix_fmt = width, height, "yuv420p"
        out_v.options = {"preset": "veryfast", "crf": "18"}
        out_a: AudioStream | None = None
        if sound:
            out_a = dst.add_stream("aac", rate=AUDIO_RATE)
            out_a.layout = "stereo"
        audio_samples = 0
        for number, clip in enumerate(clips):
            last_clip = number == len(clips) - 1
            kept = 0
            for picture in _frames_but_last(clip, keep_last=last_clip):
                frame = picture.reformat(width=width, height=height, format="yuv420p")
                frame.pts, frame.time_base = frames, 1 / rate
                dst.mux(out_v.encode(frame))
                frames += 1
                kept += 1
            dropped += 0 if last_clip else 1
            if out_a is not None:
                audio_samples = _encode_audio(dst, out_a, clip, round(kept / rate * AUDIO_RATE), audio_samples)
        dst.mux(out_v.encode(None))
        if out_a is not None:
            dst.mux(out_a.encode(None))
    return StitchReport("reencode", frames, dropped, float(frames / rate))


def _has_audio(clip: Path) -> bool:
    with av.open(str(clip)) as container:
        return bool(container.streams.audio)


def _frames_but_last(clip: Path, *, keep_last: bool) -> Iterator[av.VideoFrame]:
    """The clip's frames in order, holding one back so the last can be left out."""
    with av.open(str(clip)) as container:
        held = None
        for frame in container.decode(container.streams.video[0]):
            if held is not None:
                yield held
            held = frame
        if held is not None and keep_last:
            yield held


def _encode_audio(dst: av.container.OutputContainer, out: AudioStream, clip: Path, samples: int,
                  written: int) -> int:
    """`samples` of the clip's sound (silence where it has none, or runs short) at 48 kHz stereo."""
    fifo = av.AudioFifo()
    resampler = av.AudioResampler(format="fltp", layout="stereo", rate=AUDIO_RATE)
    fed = 0
    with av.open(str(clip)) as container:
        if container.streams.audio:
            for decoded in container.decode(container.streams.audio[0]):
                for frame in resampler.resample(decoded):
                    take = min(frame.samples, samples - fed)
                    if take <= 0:
                        break
                    fifo.write(_slice(frame, take) if take < frame.samples else frame)
                    fed += take
                if fed >= samples:
                    break
    if fed < samples:
        fifo.write(_silence(samples - fed))
    size = out.codec_context.frame_size or 1024
    while fifo.samples:
        chunk = fifo.read(min(size, fifo.samples))
        assert chunk is not None
        frame = chunk
        frame.pts, frame.time_base = written, Fraction(1, AUDIO_RATE)
        written += frame.samples
        dst.mux(out.encode(frame))
    return written


def _slice(frame: av.AudioFrame, samples: int) -> av.AudioFrame:
    samples_kept = np.ascontiguousarray(frame.to_ndarray()[:, :samples], dtype=np.float32)
    part = av.AudioFrame.from_ndarray(samples_kept, format="fltp",
                                      layout="stereo")
    part.sample_rate = AUDIO_RATE
    return part


def _silence(samples: int) -> av.AudioFrame:
    frame = av.AudioFrame.from_ndarray(np.zeros((2, samples), dtype=np.float32), format="fltp", layout="stereo")
    frame.sample_rate = AUDIO_RATE
    return frame
