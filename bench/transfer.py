"""Store throughput and peak memory: large videos streamed over HTTP into moto's S3 server, against boto3's own
`upload_file` of the same bytes from local disk.

Servers are child processes on loopback: moto's S3 server, `python -m http.server` serving incompressible
bodies (an encoded video does not compress) and the Kling emulator (720p) for real rendered videos.
Every measured store runs in a child process of its own (`--child`), so one size's memory cannot
contaminate another's; the child warms up (imports, a first small store), resets its peak RSS
(/proc/self/clear_refs), runs one store and reports its wall time and VmHWM. Methods:

  upload_file   boto3 `client.upload_file(path)` from local disk, default TransferConfig (the target)
  managed       `S3Sink.store_from_url`: HTTP download -> bounded pipe -> boto3's managed transfer
                (parallel parts, abort on failure) -> the sha256 as the object's tag (the project's store)
  managed-copy  the same store as on a store that refuses object tags: the sha256 goes into the metadata by
                an in-place copy (CopyObject REPLACE): the previous contract, kept as the baseline
  sequential    the store with the first, hand-written uploader (bench/sequential_upload.py)
  local         `LocalSink.store_from_url` into a folder (fsync, rename)
  naive         `httpx.get(url).content`, then one write: what unbounded memory looks like (sizes < 1 GiB)

Methods alternate within each repeat (upload_file, managed, managed-copy, ...), so a load change on the
shared machine hits them alike. MiB/s = body size / wall time of the call, median over --repeat. The script
writes bench/results/transfer.json and (full runs) the page's section from it, bench/results/transfer.md.

    .venv/bin/python bench/transfer.py             # 16, 256, 1024 MiB, 3 repeats; ~6-15 min on 2 cores
    .venv/bin/python bench/transfer.py --quick     # 8 and 32 MiB, 1 repeat, 3 methods, no renders: 20-30 s
                                                   # at load ~7 on 2 cores, ~60 s at load 10
From Python (the lead's bench command): `import transfer; figures = transfer.run(quick=True)`.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))  # `common`, `sequential_upload` when imported

import common
import httpx
from transfer_page import section

MB = 1024 * 1024
BUCKET = "bench-transfer"
METHODS = ("upload_file", "managed", "managed-copy", "sequential", "local", "naive")
QUICK_METHODS = METHODS[:3]
NAIVE_MAX_MB = 512  # the naive copy holds the whole body: skipped above this


# ---- the child: one store, its wall time and peak RSS --------------------------------------------------------


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def _reset_peak_rss() -> bool:
    try:  # "5" resets VmHWM to the current RSS (Linux >= 4.0)
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def child(spec: dict[str, Any]) -> dict[str, Any]:
    import boto3
    from boto3.s3.transfer import TransferConfig
    from sequential_upload import SequentialS3Sink

    from kling_tasks.storage import LocalSink, S3Sink
    from kling_tasks.storage import s3 as s3_sink_module

    method, url, path, key = spec["method"], spec["url"], spec["path"], spec["key"]
    s3 = boto3.session.Session().client("s3")
    copying = S3Sink(BUCKET, client=s3, part_size=spec["part_size"], concurrency=spec["concurrency"])
    if method == "managed-copy":  # as after this destination's first refused tag: the copy at once, no warning
        s3_sink_module._TAGS_REFUSED.add((str(s3.meta.endpoint_url), BUCKET))
    sinks: dict[str, Any] = {"managed": S3Sink(BUCKET, client=s3, part_size=spec["part_size"],
                                               concurrency=spec["concurrency"]),
                             "managed-copy": copying,
                             "sequential": SequentialS3Sink(BUCKET, client=s3, part_size=spec["part_size"]),
                             "local": LocalSink(spec["local_dir"])}
    # The step that adds the sha256 once the upload is complete: PutObjectTagging (or the fallback's CopyObject).
    proof_seconds: dict[str, list[float]] = {"PutObjectTagging": [], "CopyObject": []}
    started: list[float] = []
    for operation, spent in proof_seconds.items():
        s3.meta.events.register(f"before-call.s3.{operation}", lambda **_: started.append(time.perf_counter()))
        s3.meta.events.register(f"after-call.s3.{operation}",
                                lambda spent=spent, **_: spent.append(time.perf_counter() - started[-1]))

    def call(warm: bool) -> int:
        the_url, the_key = (spec["warm_url"], key + ".warm") if warm else (url, key)
        if method == "upload_file":
            the_path = spec["warm_path"] if warm else path
            s3.upload_file(the_path, BUCKET, the_key, Config=TransferConfig())
            return os.path.getsize(the_path)
        if method == "naive":
            body = httpx.get(the_url, timeout=120).content
            Path(spec["local_dir"], "naive.mp4").write_bytes(body)
            return len(body)
        stored = sinks[method].store_from_url(the_url, the_key, metadata={"task_id": f"bench-{the_key}"},
                                              allow_private=True)
        return int(stored.size)

    call(warm=True)  # imports, the boto3 client, connection pools, transfer threads: not part of the figure
    for spent in proof_seconds.values():
        spent.clear()
    rss_before = _status_kb("VmRSS")
    reset = _reset_peak_rss()
    start = time.perf_counter()
    size = call(warm=False)
    seconds = time.perf_counter() - start
    peak = _status_kb("VmHWM")
    return {"size_mb": round(size / MB, 2), "seconds": round(seconds, 3),
            "rss_before_mb": round(rss_before / 1024, 1), "peak_rss_mb": round(peak / 1024, 1),
            "peak_rss_is_of_the_store": reset, "tag_seconds": round(sum(proof_seconds["PutObjectTagging"]), 3),
            "tag_copy_seconds": round(sum(proof_seconds["CopyObject"]), 3)}


def run_child(spec: dict[str, Any], env: dict[str, str]) -> dict[str, Any]:
    proc = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(spec)],
                          env=env, capture_output=True, text=True, timeout=900, start_new_session=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"child {spec['method']} failed: {proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


# ---- the parent: servers, bodies, the measurement plan ---------------------------------------------------------


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


def rendered_stores(stack: ExitStack, tmp: Path, extensions: int, log: Callable[[str], None]) -> dict[str, Any]:
    """Real emulator videos: render time at 720p, then per-store overhead (they are small: ~20 KB per second)."""
    from kling_tasks.storage import open_sink

    emu = stack.enter_context(common.emulator(tmp, time_scale=0.0005, resolution="720p"))
    log(f"rendering a 10 s 720p clip + {extensions} extensions ...")
    steps = asyncio.run(render(emu.base_url, extensions))
    rendered = []
    for v, (label, url) in enumerate({"10 s 720p clip": steps[0]["url"],
                                      f"{steps[-1]['video_seconds']:.0f} s 720p video": steps[-1]["url"]}.items()):
        for sname, dest in (("local", str(tmp / "out")), ("managed", f"s3://{BUCKET}/rendered")):
            sink = open_sink(dest)
            times = []
            for i in range(3):
                start = time.perf_counter()
                got = sink.store_from_url(url, f"v{v}-r{i}/v.mp4", metadata={"task_id": f"v{v}-r{i}"},
                                          allow_private=True)
                times.append(time.perf_counter() - start)
            rendered.append({"video": label, "sink": sname, "size_mb": round(got.size / MB, 2),
                             "seconds_median": round(statistics.median(times), 3)})
    return {"render": [{k: v for k, v in s.items() if k != "url"} for s in steps], "rendered_videos": rendered}


def write_body(path: Path, size_mb: int) -> None:
    with path.open("wb") as fh:  # incompressible, like an encoded video
        for _ in range(size_mb):
            fh.write(os.urandom(MB))


def run(quick: bool, *, sizes: list[int] | None = None, repeat: int | None = None, extensions: int | None = None,
        part_size_mb: int | None = None, concurrency: int | None = None, methods: list[str] | None = None,
        log: Callable[[str], None] = print) -> dict[str, Any]:
    """Measure; return the figures (what the JSON holds).

    quick: 8 and 32 MiB, 1 repeat, only upload_file / managed / sequential, no emulator renders (< 30 s on a
    quiet machine)."""
    from kling_tasks.storage.s3_upload import CONCURRENCY, PART_SIZE

    sizes = sizes or ([8, 32] if quick else [16, 256, 1024])
    repeat = repeat or (1 if quick else 3)
    extensions = extensions if extensions is not None else (-1 if quick else 10)  # -1: no emulator renders
    part_size = (part_size_mb * MB) if part_size_mb else PART_SIZE
    concurrency = concurrency or CONCURRENCY
    results: dict[str, Any] = {"sizes_mb": sizes, "repeat": repeat, "extensions": extensions,
                               "managed_part_size_mb": part_size / MB, "managed_concurrency": concurrency,
                               "upload_file_config": "boto3 TransferConfig() defaults: 8 MiB parts, 10 threads"}
    with ExitStack() as stack:
        tmp = stack.enter_context(common.scratch("bench-transfer-"))
        endpoint = stack.enter_context(common.moto_s3(tmp))
        env = {**os.environ, **common.s3_env(endpoint), "PYTHONPATH": str(common.ROOT)}
        saved = {name: os.environ.get(name) for name in common.s3_env(endpoint)}
        stack.callback(restore_env, saved)  # a caller's later benchmarks must not reach this (stopped) moto
        os.environ.update(common.s3_env(endpoint))
        import boto3


        s3 = boto3.session.Session().client("s3")
        s3.create_bucket(Bucket=BUCKET)
        files = tmp / "files"
        files.mkdir()
        write_body(files / "warm.mp4", 12)  # multipart for every method: the first use of its code path is warm-up
        for n in sizes:
            write_body(files / f"body-{n}.mp4", n)
        port = common.free_port()
        server = common.Child("http-server", [sys.executable, "-m", "http.server", "--bind", "127.0.0.1",
                                              str(port), "--directory", str(files)], tmp)
        stack.callback(server.stop)
        server.wait_http(f"http://127.0.0.1:{port}/")
        base = f"http://127.0.0.1:{port}"

        if extensions >= 0:
            results.update(rendered_stores(stack, tmp, extensions, log))

        rows: list[dict[str, Any]] = []
        failed: list[dict[str, Any]] = []
        results["failed_stores"] = failed
        counter = iter(range(10**6))
        for n in sizes:
            chosen = methods or (QUICK_METHODS if quick else METHODS)
            methods_here = [m for m in chosen if m != "naive" or n <= NAIVE_MAX_MB]
            runs: dict[str, list[dict[str, Any]]] = {m: [] for m in methods_here}
            for r in range(repeat):
                for method in methods_here:
                    key = f"run-{next(counter)}/video.mp4"
                    log(f"{n} MiB, {method}, repeat {r + 1}/{repeat} ...")
                    spec = {"method": method, "url": f"{base}/body-{n}.mp4", "path": str(files / f"body-{n}.mp4"),
                            "warm_url": f"{base}/warm.mp4", "warm_path": str(files / "warm.mp4"), "key": key,
                            "local_dir": str(tmp / "out-child"), "part_size": part_size, "concurrency": concurrency}
                    try:
                        got: dict[str, Any] | None = run_child(spec, env)
                    except RuntimeError as exc:  # one failed store (moto answered 500, say) is a figure, not the end
                        log(f"{n} MiB, {method}: FAILED: {str(exc).splitlines()[-1]}")
                        failed.append({"size_mb": n, "method": method, "error": str(exc).splitlines()[-1][:300]})
                        got = None
                    if method not in ("local", "naive"):  # moto keeps objects: free its memory and disk
                        s3.delete_object(Bucket=BUCKET, Key=key)
                        s3.delete_object(Bucket=BUCKET, Key=key + ".warm")
                        left = s3.list_multipart_uploads(Bucket=BUCKET).get("Uploads", [])
                        assert got is None or not left, "an upload left open"
                        for upload in left:
                            s3.abort_multipart_upload(Bucket=BUCKET, Key=upload["Key"], UploadId=upload["UploadId"])
                    for leftover in (tmp / "out-child").rglob("*.mp4"):
                        leftover.unlink()
                    if got is not None:
                        runs[method].append({**got, "repeat": r})
            target = {x["repeat"]: x["size_mb"] / x["seconds"] for x in runs.get("upload_file", [])}
            for method, got_runs in runs.items():
                if not got_runs:
                    continue
                speeds = [x["size_mb"] / x["seconds"] for x in got_runs]
                # the transfer alone: the store less the step that adds the sha256 (tag or copy)
                alone = [x["size_mb"] / (x["seconds"] - x["tag_seconds"] - x["tag_copy_seconds"]) for x in got_runs]
                rows.append({"size_mb": n, "method": method, "mb_per_s_median": round(statistics.median(speeds), 1),
                             "mb_per_s_all": [round(s, 1) for s in speeds],
                             "vs_upload_file_paired": paired(got_runs, speeds, target),
                             "transfer_only_vs_upload_file_paired": paired(got_runs, alone, target),
                             "peak_rss_mb_max": max(x["peak_rss_mb"] for x in got_runs),
                             "rss_before_mb": got_runs[0]["rss_before_mb"],
                             "peak_rss_is_of_the_store": all(x["peak_rss_is_of_the_store"] for x in got_runs),
                             "tag_seconds_median": round(statistics.median(x["tag_seconds"] for x in got_runs), 3),
                             "tag_copy_seconds_median": round(statistics.median(
                                 x["tag_copy_seconds"] for x in got_runs), 3),
                             "mb_per_s_transfer_only_median": round(statistics.median(alone), 1)})
        results["stores"] = rows
        for name, method, field in (("managed_vs_upload_file", "managed", "vs_upload_file_paired"),
                                    ("managed_copy_vs_upload_file", "managed-copy", "vs_upload_file_paired"),
                                    ("managed_transfer_only_vs_upload_file", "managed",
                                     "transfer_only_vs_upload_file_paired"),
                                    ("sequential_vs_upload_file", "sequential", "vs_upload_file_paired")):
            results[name] = ratios(rows, sizes, method, field)
    return results


def restore_env(saved: dict[str, str | None]) -> None:
    for name, value in saved.items():
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value


def paired(got_runs: list[dict[str, Any]], speeds: list[float], target: dict[int, float]) -> list[float]:
    """Each store's MiB/s over that of the upload_file of its own repeat (run just before it), so a load change
    between repeats cancels out instead of landing on one side of the division."""
    return [round(speed / target[x["repeat"]], 3) for x, speed in zip(got_runs, speeds, strict=True)
            if x["repeat"] in target]


def ratios(rows: list[dict[str, Any]], sizes: list[int], method: str, field: str) -> dict[str, float]:
    """Per size: the median of `method`'s paired ratios to upload_file (`field`); sizes without a pair are left
    out."""
    out = {}
    for n in sizes:
        got = [r[field] for r in rows if r["method"] == method and r["size_mb"] == n]
        if got and got[0]:
            out[str(n)] = round(statistics.median(got[0]), 2)
    return out


def print_table(results: dict[str, Any]) -> None:
    header = ["MiB", "method", "MiB/s", "runs", "peak RSS MiB", "RSS before", "tag s", "copy s", "transfer MiB/s"]
    table = [[str(r["size_mb"]), r["method"], f"{r['mb_per_s_median']:.0f}",
              " ".join(f"{s:.0f}" for s in r["mb_per_s_all"]), f"{r['peak_rss_mb_max']:.1f}",
              f"{r['rss_before_mb']:.1f}", f"{r['tag_seconds_median']:.2f}", f"{r['tag_copy_seconds_median']:.2f}",
              f"{r['mb_per_s_transfer_only_median']:.0f}"] for r in results["stores"]]
    widths = [max(len(x) for x in col) for col in zip(header, *table, strict=True)]
    for row in [header, ["-" * w for w in widths], *table]:
        print("  ".join(x.rjust(w) for x, w in zip(row, widths, strict=True)))
    print(f"managed / upload_file: {results['managed_vs_upload_file']} "
          f"(transfer only {results['managed_transfer_only_vs_upload_file']}); "
          f"managed-copy / upload_file: {results['managed_copy_vs_upload_file']}; "
          f"sequential / upload_file: {results['sequential_vs_upload_file']}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="8 and 32 MiB, 1 repeat, 3 methods, no renders (< 30 s)")
    parser.add_argument("--sizes", help="MiB of the bodies, comma-separated (default 16,256,1024)")
    parser.add_argument("--repeat", type=int, help="stores per size and method (default 2)")
    parser.add_argument("--extensions", type=int, help="extensions after the 10 s clip (default 10; -1: no renders)")
    parser.add_argument("--part-size", type=int, help="managed part size, MiB (default the project's)")
    parser.add_argument("--concurrency", type=int, help="managed parts in flight (default the project's)")
    parser.add_argument("--methods", help=f"comma-separated subset of {','.join(METHODS)}")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(json.loads(args.child))))
        return
    sizes = [int(x) for x in args.sizes.split(",")] if args.sizes else None
    started = time.monotonic()
    results = run(args.quick, sizes=sizes, repeat=args.repeat, extensions=args.extensions,
                  part_size_mb=args.part_size, concurrency=args.concurrency,
                  methods=args.methods.split(",") if args.methods else None)
    results["wall_seconds"] = round(time.monotonic() - started, 1)
    print_table(results)
    path = common.write_result("transfer-quick" if args.quick else "transfer", results)
    print(f"wrote {path.relative_to(common.ROOT)} ({results['wall_seconds']} s)")
    if not args.quick:  # quick figures are a smoke test, not the page's
        page = path.with_suffix(".md")
        page.write_text(section(json.loads(path.read_text())))
        print(f"wrote {page.relative_to(common.ROOT)}")


if __name__ == "__main__":
    main()
