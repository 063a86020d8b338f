"""Large and slow result files for mid-transfer crash tests: --pad-bytes, the slow_stream fault, download_bytes,
byte ranges, and a client killed mid-body."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from kling_emulator import EmulatorConfig, start_emulator

MiB = 1024 * 1024
PAD = 6 * MiB  # more than one 5 MiB S3 part on its own
AFTER = 5 * MiB + 64 * 1024  # slow_stream's default pause point


@pytest.fixture(scope="module")
def padded_handle(tools: Any) -> Iterator[Any]:
    config = EmulatorConfig(access_key=tools.AK, secret_key=tools.SK, time_scale=tools.SCALE, pad_bytes=PAD)
    with start_emulator(config) as handle:
        yield handle


@pytest.fixture
def padded(padded_handle: Any, tools: Any) -> Iterator[Any]:
    tools.reset(padded_handle)
    api = tools.Api(padded_handle)
    yield api
    api.http.close()


def video_of(data: dict[str, Any]) -> dict[str, Any]:
    return data["task_result"]["videos"][0]  # type: ignore[no-any-return]


def on_disk(api: Any, video_id: str) -> bytes:
    return api.handle.emulator.engine.path_of(video_id).read_bytes()  # type: ignore[no-any-return]


def check_padded(api: Any, tools: Any, data: dict[str, Any], dest: Path) -> bytes:
    """The served file is the stored MP4 plus one `free` box of PAD bytes, and decodes like the stored one."""
    video = video_of(data)
    served = tools.download(video["url"], dest).content
    stored = on_disk(api, video["id"])
    assert len(served) == len(stored) + PAD
    assert served[: len(stored)] == stored
    assert served[len(stored): len(stored) + 8] == PAD.to_bytes(4, "big") + b"free"
    assert served[len(stored) + 8:] == bytes(PAD - 8)
    seconds, frames, _ = tools.decode(dest)
    assert abs(seconds - float(video["duration"])) <= 0.1, (seconds, video["duration"])
    assert len(frames) == round(float(video["duration"]) * 24)
    return served


def test_padding_makes_large_files_that_decode_the_same(padded: Any, tools: Any, tmp_path: Path) -> None:
    video = padded.finished()
    check_padded(padded, tools, video, tmp_path / "a.mp4")
    # Extensions are made from the parent's stored (unpadded) file: the padding neither piles up nor breaks it.
    for step in range(2):
        video = padded.extend(video)
        check_padded(padded, tools, video, tmp_path / f"ext-{step}.mp4")
    assert len(on_disk(padded, video_of(video)["id"])) < PAD, "what is stored carries no padding"


def test_download_bytes_count_what_was_sent(padded: Any, kling: Any) -> None:
    for api in (padded, kling):
        video = video_of(api.finished())
        size = len(httpx.get(video["url"]).content)
        assert api.stats()["download_bytes"] == {video["id"]: size}
        httpx.get(video["url"]).raise_for_status()
        assert api.stats()["download_bytes"] == {video["id"]: 2 * size}, "summed over downloads"
        assert api.stats()["downloads"] == {video["id"]: 2}


def test_download_bytes_of_cut_and_dropped_downloads(kling: Any) -> None:
    video = video_of(kling.finished())
    size = len(on_disk(kling, video["id"]))
    kling.handle.set_faults({"rules": [{"match": "download", "kind": "drop_before", "times": 1},
                                       {"match": "download", "kind": "download_cut", "times": 1}]})
    with pytest.raises(httpx.TransportError):
        httpx.get(video["url"])
    assert kling.stats()["download_bytes"] == {}, "nothing was sent"
    with pytest.raises(httpx.TransportError):
        httpx.get(video["url"])
    assert kling.stats()["download_bytes"] == {video["id"]: size // 2}
    assert kling.stats()["faults_fired"] == {"drop_before": 1, "download_cut": 1}


def test_byte_ranges(padded: Any) -> None:
    video = video_of(padded.finished())
    full = httpx.get(video["url"]).content
    size = len(full)
    stored = size - PAD
    cases = (("bytes=0-99", (0, 100)), (f"bytes={stored - 4}-{stored + 11}", (stored - 4, stored + 12)),
             ("bytes=-10", (size - 10, size)), (f"bytes={size - 5}-", (size - 5, size)),
             (f"bytes=100-{size * 2}", (100, size)))
    for header, (start, end) in cases:
        part = httpx.get(video["url"], headers={"Range": header})
        assert part.status_code == 206, header
        assert part.headers["content-range"] == f"bytes {start}-{end - 1}/{size}"
        assert int(part.headers["content-length"]) == end - start
        assert part.content == full[start:end], header
    for unsatisfiable in (f"bytes={size}-", "bytes=-0"):
        refused = httpx.get(video["url"], headers={"Range": unsatisfiable})
        assert refused.status_code == 416 and refused.headers["content-range"] == f"bytes */{size}"
    for ignored in ("bytes=0-1,5-6", "items=0-5", "bytes=x-y"):
        whole = httpx.get(video["url"], headers={"Range": ignored})
        assert whole.status_code == 200 and whole.content == full, ignored
    assert httpx.get(video["url"]).headers["accept-ranges"] == "bytes"


def test_slow_stream_pauses_mid_body(padded: Any, tools: Any) -> None:
    video = video_of(padded.finished())
    full = on_disk(padded, video["id"]) + PAD.to_bytes(4, "big") + b"free" + bytes(PAD - 8)
    padded.handle.set_faults({"rules": [{"match": "download", "kind": "slow_stream", "times": 1,
                                         "params": {"seconds": 3}}]})
    received = bytearray()
    with httpx.stream("GET", video["url"], timeout=30) as response:
        assert response.status_code == 200
        assert int(response.headers["content-length"]) == len(full), "the whole length is announced at once"
        chunks = response.iter_raw()
        while len(received) < AFTER:
            received += next(chunks)
        # The server has handed over exactly the bytes before the pause point and is now waiting: the
        # client holds more than one 5 MiB part of a file it has not finished.
        assert len(received) == AFTER
        assert padded.stats()["download_bytes"] == {video["id"]: AFTER}
        for chunk in chunks:
            received += chunk
    assert bytes(received) == full
    assert padded.stats()["download_bytes"] == {video["id"]: len(full)}
    assert padded.stats()["faults_fired"] == {"slow_stream": 1}


def test_slow_stream_params_and_a_file_shorter_than_the_pause_point(kling: Any) -> None:
    video = video_of(kling.finished())
    full = httpx.get(video["url"]).content
    kling.handle.set_faults({"rules": [{"match": "download", "kind": "slow_stream", "times": 2,
                                        "params": {"after_bytes": 1000, "seconds": 0.2}}]})
    with httpx.stream("GET", video["url"]) as response:
        assert b"".join(response.iter_raw()) == full, "paused after 1000 bytes, then the rest, intact"
    assert kling.stats()["faults_fired"] == {"slow_stream": 1}
    kling.handle.set_faults({"rules": [{"match": "download", "kind": "slow_stream"}]})  # default: after 5 MiB
    assert httpx.get(video["url"]).content == full, "shorter than after_bytes: no pause, the whole file"


CLIENT = """
import sys, httpx
with httpx.stream("GET", sys.argv[1], timeout=60) as response:
    for chunk in response.iter_raw():
        pass
"""


def test_a_client_killed_mid_transfer(padded: Any, tools: Any) -> None:
    video = video_of(padded.finished())
    full_size = len(on_disk(padded, video["id"])) + PAD
    padded.handle.set_faults({"rules": [{"match": "download", "kind": "slow_stream", "times": 1,
                                         "params": {"seconds": 3}}]})
    client = subprocess.Popen([sys.executable, "-c", CLIENT, video["url"]], start_new_session=True)
    try:
        # What a crash test does: wait until more than one part has gone out, then SIGKILL the client.
        tools.until(lambda: padded.stats()["download_bytes"].get(video["id"], 0) > 5 * MiB, timeout=30,
                    what="more than 5 MiB sent")
    finally:
        os.killpg(client.pid, signal.SIGKILL)
        client.wait(timeout=10)
    sent = padded.stats()["download_bytes"][video["id"]]
    assert 5 * MiB < sent < full_size
    # The emulator is unharmed and serves the file whole to the next client.
    assert len(httpx.get(video["url"], timeout=30).content) == full_size


@pytest.mark.parametrize("pad", [4, -1, 2**32])
def test_a_pad_that_cannot_be_a_box_is_refused(tools: Any, pad: int) -> None:
    with pytest.raises(ValueError, match="pad_bytes"):
        start_emulator(EmulatorConfig(access_key=tools.AK, secret_key=tools.SK, pad_bytes=pad))
