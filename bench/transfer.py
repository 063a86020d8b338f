"""Store throughput and memory: emulator 720p videos streamed into a local folder and into S3 (moto, multipart).

1. Render: the emulator (child process, 720p, latencies × 0.0005 so rendering dominates) makes a 10 s
   text2video and extends it --extensions times; each step's create -> succeed wall time is recorded.
2. Store: `open_sink(dest).store_from_url(url, key, ...)` into each sink, --repeat times, of the 10 s clip,
   the final video and, because the emulator's synthetic frames compress to ~20 KB per second of video (far
   below one 5 MiB S3 part), of two incompressible bodies sized like real Kling output (--sizes, MiB) served
   by `python -m http.server` on loopback. Recorded: MiB/s (median) and memory of this process:
     tracemalloc peak   Python allocations (all threads), in a separate pass: tracing slows the copy;
     RSS peak delta     /proc/self/statm sampled every 2 ms, minus RSS just before the store.
   A naive baseline (`httpx.get(url).content`, then one write) shows what unbounded memory looks like.
Emulator and moto run as child processes, so neither their buffers nor moto's stored objects count here.

    .venv/bin/python bench/transfer.py             # ~90 s on 2 cores; ~55 s video; 16 and 64 MiB bodies
    .venv/bin/python bench/transfer.py --quick     # 5 extensions (~32 s video), 8 and 32 MiB, 1 repeat
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import threading
import time
import tracemalloc
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

import common
import httpx

MB = 1024 * 1024
BUCKET = "bench-transfer"
PAGE = os.sysconf("SC_PAGE_SIZE")


def rss() -> int:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * PAGE


@contextmanager
def rss_peak(out: dict[str, float], period: float = 0.002) -> Iterator[None]:
    """Sample RSS on a thread while the block runs; out['rss_delta_mb'] = peak − RSS before the block."""
    base, peak = rss(), [0]
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], rss())
            stop.wait(period)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        out["rss_delta_mb"] = round(max(0, max(peak[0], rss()) - base) / MB, 2)


async def render(base_url: str, extensions: int) -> list[dict[str, Any]]:
    """A 10 s 720p clip, then `extensions` extensions in a row; per step: seconds, video duration, url."""
    from kling_tasks.api import KlingClient, PollPolicy, Text2VideoRequest, VideoExtendRequest
    from kling_tasks.settings import KlingSettings

    settings = KlingSettings(api_base_url=base_url, access_key=common.AK, secret_key=common.SK)
    steps: list[dict[str, Any]] = []
    async with KlingClient(settings, poll_policy=PollPolicy(min_interval=0.01, max_interval=0.01)) as client:
        video_id = None
        for i in range(extensions + 1):
            start = time.monotonic()
            request: Any = (Text2VideoRequest(prompt="a long 720p take", duration="10") if video_id is None
                            else VideoExtendRequest(video_id=video_id, prompt=f"more, part {i}"))
            snap = await client.create(request, None)
            done = await client.wait(request.kind, snap.task_id)
            assert done.video is not None
            video_id = done.video.id
            steps.append({"step": i, "seconds": round(time.monotonic() - start, 3),
                          "video_seconds": done.video.duration, "url": done.video.url})
    return steps


def naive_store(url: str, path: Path) -> int:
    body = httpx.get(url, timeout=60).content  # the whole video in memory: what streaming avoids
    path.write_bytes(body)
    return len(body)


def measure(fn: Callable[[], int], repeat: int) -> dict[str, Any]:
    """MB/s and RSS peak delta over `repeat` timed runs, then one traced run for the tracemalloc peak."""
    speeds, deltas = [], []
    size = 0
    for _ in range(repeat):
        mem: dict[str, float] = {}
        with rss_peak(mem):
            start = time.perf_counter()
            size = fn()
            took = time.perf_counter() - start
        speeds.append(size / MB / took)
        deltas.append(mem["rss_delta_mb"])
    tracemalloc.start()
    try:
        fn()
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return {"size_mb": round(size / MB, 2), "mb_per_s_median": round(statistics.median(speeds), 1),
            "mb_per_s_all": [round(s, 1) for s in speeds], "rss_delta_mb_max": max(deltas),
            "tracemalloc_peak_mb": round(peak / MB, 2)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--extensions", type=int, default=10, help="extensions after the 10 s clip (default 10)")
    parser.add_argument("--repeat", type=int, default=3, help="timed stores per size and sink (default 3)")
    parser.add_argument("--sizes", default="16,64", help="MiB of the two incompressible bodies (default 16,64)")
    parser.add_argument("--quick", action="store_true", help="5 extensions, 8 and 32 MiB, 1 repeat")
    args = parser.parse_args()
    if args.quick:
        args.extensions, args.repeat, args.sizes = 5, 1, "8,32"
    sizes = [int(x) for x in args.sizes.split(",")]
    results: dict[str, Any] = {"extensions": args.extensions, "repeat": args.repeat}

    with ExitStack() as stack:
        tmp = stack.enter_context(common.scratch("bench-transfer-"))
        emu = stack.enter_context(common.emulator(tmp, time_scale=0.0005, resolution="720p"))
        endpoint = stack.enter_context(common.moto_s3(tmp))
        os.environ.update(common.s3_env(endpoint))
        import boto3

        from kling_tasks.storage import PART_SIZE, open_sink

        boto3.client("s3").create_bucket(Bucket=BUCKET)
        print(f"rendering a 10 s 720p clip + {args.extensions} extensions ...", flush=True)
        steps = asyncio.run(render(emu.base_url, args.extensions))
        results["render"] = [{k: v for k, v in s.items() if k != "url"} for s in steps]
        results["s3_part_size_mb"] = PART_SIZE / MB
        sinks = {"local": open_sink(str(tmp / "out")), "s3": open_sink(f"s3://{BUCKET}/bench")}
        files = tmp / "files"
        files.mkdir()
        for n in sizes:  # incompressible, like an encoded video
            with (files / f"body-{n}.mp4").open("wb") as fh:
                for _ in range(n):
                    fh.write(os.urandom(MB))
        port = common.free_port()
        server = common.Child("http-server", [sys.executable, "-m", "http.server", "--bind", "127.0.0.1",
                                              str(port), "--directory", str(files)], tmp)
        stack.callback(server.stop)
        server.wait_http(f"http://127.0.0.1:{port}/")
        sources = {"10s 720p clip": steps[0]["url"],
                   f"{steps[-1]['video_seconds']:.0f}s 720p video": steps[-1]["url"],
                   **{f"{n} MiB body": f"http://127.0.0.1:{port}/body-{n}.mp4" for n in sizes}}
        counter = iter(range(10**6))

        def store(sink: Any, url: str) -> int:
            key = f"run-{next(counter)}/video.mp4"  # a new key each time: store_from_url skips existing ones
            return int(sink.store_from_url(url, key, metadata={"bench": "transfer"}, allow_private=True).size)

        store(sinks["s3"], steps[0]["url"])  # warm-up: boto3 client, connection pools, imports
        store(sinks["local"], steps[0]["url"])
        naive_file = tmp / "naive.mp4"
        rows = []
        for vname, url in sources.items():
            for sname, sink in sinks.items():
                print(f"store {vname} -> {sname} ...", flush=True)
                rows.append({"video": vname, "sink": sname,
                             **measure(lambda s=sink, u=url: store(s, u), args.repeat)})
            rows.append({"video": vname, "sink": "naive (read all, then write)",
                         **measure(lambda u=url: naive_store(u, naive_file), args.repeat)})
        results["stores"] = rows

    render_rows = results["render"]
    ext = [r["seconds"] for r in render_rows[1:]]
    print(f"\nrender (720p, create -> succeed): 10 s clip {render_rows[0]['seconds']:.2f} s; "
          f"extensions median {statistics.median(ext) if ext else 0:.2f} s, last {ext[-1] if ext else 0:.2f} s; "
          f"final video {render_rows[-1]['video_seconds']:.1f} s")
    header = ["source", "sink", "MiB", "MiB/s", "RSS peak Δ MiB", "tracemalloc peak MiB"]
    table = [[r["video"], r["sink"], f"{r['size_mb']:.1f}", f"{r['mb_per_s_median']:.0f}",
              f"{r['rss_delta_mb_max']:.1f}", f"{r['tracemalloc_peak_mb']:.1f}"] for r in rows]
    widths = [max(len(x) for x in col) for col in zip(header, *table, strict=True)]
    for row in [header, ["-" * w for w in widths], *table]:
        print("  ".join(x.rjust(w) for x, w in zip(row, widths, strict=True)))
    path = common.write_result("transfer-quick" if args.quick else "transfer", results)
    print(f"wrote {path.relative_to(common.ROOT)}")


if __name__ == "__main__":
    main()
