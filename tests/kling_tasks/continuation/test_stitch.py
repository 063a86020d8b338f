"""Stitching clips: one frame fewer per seam, stream copy where it is safe, re-encoding where it is not."""

from __future__ import annotations

import hashlib
from pathlib import Path

import av
import numpy as np

from kling_tasks.continuation.stitch import stitch_clips

from .clips import audio_seconds, decoded, make_clip


def test_same_clips_are_joined_by_stream_copy_without_the_seam_frames(tmp_path: Path) -> None:
    clips = [make_clip(tmp_path / f"c{i}.mp4", frames=20 + i, shade=40 + 60 * i) for i in range(3)]
    report = stitch_clips(clips, tmp_path / "out.mp4")
    assert (report.method, report.frames, report.dropped) == ("copy", 20 + 21 + 22 - 2, 2)
    assert abs(report.seconds - (20 + 21 + 22 - 2) / 24) < 1e-9
    parts = [decoded(clip) for clip in clips]
    expected = parts[0][:-1] + parts[1][:-1] + parts[2]  # copied packets decode to the very same pictures
    got = decoded(tmp_path / "out.mp4")
    assert len(got) == len(expected)
    assert all(np.array_equal(a, b) for a, b in zip(got, expected, strict=True))


def test_stitching_is_deterministic(tmp_path: Path) -> None:
    clips = [make_clip(tmp_path / f"c{i}.mp4", shade=50 * i + 30) for i in range(2)]
    stitch_clips(clips, tmp_path / "a.mp4")
    stitch_clips(clips, tmp_path / "b.mp4")
    a, b = ((tmp_path / name).read_bytes() for name in ("a.mp4", "b.mp4"))
    assert hashlib.sha256(a).digest() == hashlib.sha256(b).digest(), "a stitch redone after a crash is the same"
    assert not list(tmp_path.glob("*.part")), "the temp file is gone"


def test_clips_that_differ_are_reencoded_at_the_first_clips_size(tmp_path: Path) -> None:
    clips = [make_clip(tmp_path / "small.mp4", frames=24), make_clip(tmp_path / "big.mp4", frames=30, size=(640, 360)),
             make_clip(tmp_path / "small2.mp4", frames=12)]
    report = stitch_clips(clips, tmp_path / "out.mp4")
    assert (report.method, report.frames, report.dropped) == ("reencode", 24 + 30 + 12 - 2, 2)
    with av.open(str(tmp_path / "out.mp4")) as container:
        stream = container.streams.video[0]
        assert (stream.width, stream.height) == (320, 180)
    assert len(decoded(tmp_path / "out.mp4")) == 64


def test_clips_with_b_frames_are_reencoded(tmp_path: Path) -> None:
    """With frame reordering the last packet is not the last picture: dropping it is unsafe, so re-encode."""
    clips = [make_clip(tmp_path / f"b{i}.mp4", frames=30, preset="medium") for i in range(2)]
    report = stitch_clips(clips, tmp_path / "out.mp4")
    assert report.method == "reencode" and len(decoded(tmp_path / "out.mp4")) == 59


def test_sound_is_copied_and_cut_at_each_seam(tmp_path: Path) -> None:
    clips = [make_clip(tmp_path / f"s{i}.mp4", frames=48, tone=440.0 + 110 * i) for i in range(3)]
    report = stitch_clips(clips, tmp_path / "out.mp4")
    assert report.method == "copy"
    sound = audio_seconds(tmp_path / "out.mp4")
    assert sound is not None and abs(sound - report.seconds) < 0.1, (sound, report.seconds)


def test_sound_is_reencoded_with_silence_for_a_clip_without_any(tmp_path: Path) -> None:
    clips = [make_clip(tmp_path / "tone.mp4", frames=48, tone=440.0),
             make_clip(tmp_path / "mute.mp4", frames=36, size=(480, 270))]
    report = stitch_clips(clips, tmp_path / "out.mp4")
    assert report.method == "reencode"
    sound = audio_seconds(tmp_path / "out.mp4")
    assert sound is not None and abs(sound - report.seconds) < 0.1, (sound, report.seconds)
