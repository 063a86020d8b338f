"""Result files as served: streamed in chunks with a Content-Length, optionally padded with an MP4 `free` box,
single byte ranges, the download faults that act mid-body, and a count of the bytes actually sent.

Files are stored unpadded (an extension stream-copies its parent's file, so padding on disk would break the
remux or pile up); the padding exists only on the wire, as a top-level `free` box after the last box, which
every MP4 reader skips: the served file decodes to the same frames and duration, only larger.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

from fastapi.responses import JSONResponse, Response, StreamingResponse

from kling_emulator.drops import DroppedConnection
from kling_emulator.faults import SLOW_STREAM_AFTER, SLOW_STREAM_SECONDS, Rule

CHUNK = 64 * 1024
MAX_PAD = 2**32 - 1  # a `free` box with a 32-bit size field


def check_pad(pad_bytes: int) -> int:
    if isinstance(pad_bytes, bool) or not isinstance(pad_bytes, int) or not (
            pad_bytes == 0 or 8 <= pad_bytes <= MAX_PAD):
        raise ValueError(f"pad_bytes must be 0 or a box size in [8, {MAX_PAD}] (8 bytes of box header)")
    return pad_bytes


@dataclass(frozen=True)
class Served:
    """One result file as it goes out: the MP4 on disk, then a `free` box of `pad` bytes (none if 0)."""

    path: Path
    pad: int = 0

    @property
    def file_size(self) -> int:
        return self.path.stat().st_size

    def chunks(self, start: int, end: int) -> Iterator[bytes]:
        """Bytes [start, end) of the served file, at most CHUNK at a time."""
        file_size = self.file_size
        header = self.pad.to_bytes(4, "big") + b"free" if self.pad else b""
        with self.path.open("rb") as source:
            position = start
            while position < end:
                size = min(CHUNK, end - position)
                if position < file_size:
                    source.seek(position)
                    data = source.read(min(size, file_size - position))
                    if not data:
                        raise OSError(f"{self.path} shrank while it was served")
                else:
                    offset = position - file_size
                    head = header[offset: offset + size]
                    data = head + bytes(size - len(head))
                yield data
                position += len(data)

    def read(self, start: int, end: int) -> bytes:
        return b"".join(self.chunks(start, end))


class Unsatisfiable(ValueError):
    pass


def byte_range(header: str | None, size: int) -> tuple[int, int] | None:
    """[start, end) of a single `bytes=` range, None for the whole file (no header, or several ranges, which
    a server may answer in full); Unsatisfiable if it lies outside the file."""
    if not header or not header.startswith("bytes=") or "," in header:
        return None
    first, dash, last = header[len("bytes="):].strip().partition("-")
    if not dash or not (first or last) or not all(part.isdigit() for part in (first, last) if part):
        return None  # a malformed header is ignored
    if not first:  # "-N": the last N bytes
        if int(last) == 0:
            raise Unsatisfiable(header)
        return max(0, size - int(last)), size
    start = int(first)
    end = size if not last else min(size, int(last) + 1)
    if start >= size or end <= start:
        raise Unsatisfiable(header)
    return start, end


async def _body(served: Served, start: int, end: int, sent: Callable[[int], None],
                pause_after: int | None, pause: float) -> AsyncIterator[bytes]:
    """The body, counting each chunk once the server has handed it to the connection."""
    cut = end if pause_after is None else min(end, start + pause_after)
    for chunk in served.chunks(start, cut):
        yield chunk
        sent(len(chunk))
    if cut < end:
        await asyncio.sleep(pause)  # mid-body: the client already holds `pause_after` bytes
    for chunk in served.chunks(cut, end):
        yield chunk
        sent(len(chunk))


def file_response(served: Served, range_header: str | None, rule: Rule | None,
                  sent: Callable[[int], None]) -> Response:
    """The answer to a download: the whole file (200) or one range (206), streamed, shaped by a fault that acts
    mid-body (`download_cut`, `slow_stream`); faults that act before the body are the caller's."""
    size = served.file_size + served.pad
    try:
        span = byte_range(range_header, size)
    except Unsatisfiable:
        return JSONResponse({"message": "range not satisfiable"}, status_code=416,
                            headers={"content-range": f"bytes */{size}"})
    start, end = span or (0, size)
    if rule is not None and rule.kind == "download_cut":  # the full length announced, half sent, then FIN
        length = end - start
        return DroppedConnection(served.read(start, start + length // 2), length, "video/mp4", sent=sent)
    pause_after, pause = None, 0.0
    if rule is not None and rule.kind == "slow_stream":
        pause_after = int(rule.params.get("after_bytes", SLOW_STREAM_AFTER))
        pause = float(rule.params.get("seconds", SLOW_STREAM_SECONDS))
    headers = {"content-length": str(end - start), "accept-ranges": "bytes"}
    if span is not None:
        headers["content-range"] = f"bytes {start}-{end - 1}/{size}"
    return StreamingResponse(_body(served, start, end, sent, pause_after, pause), status_code=206 if span else 200,
                             headers=headers, media_type="video/mp4")
