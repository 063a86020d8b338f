"""Every benchmark of the performance issue in one command, side by side in one run, and docs/benchmarks.md.

One Prefect server for every part (PostgreSQL when it can run here, else SQLite; --sqlite forces it), handed
to each part as BENCH_PREFECT_API_URL; each part runs as its own child process (Prefect reads its settings at
import), one after another (--quick: all at once), and writes bench/results/<part>[-quick].json; then the page
is written from those files:
  polling    learned schedule vs adaptive vs fixed 5/10/15 s, task lengths 60-1200 s (bench/polling.py)
  overhead   per-step wall and CPU beyond Kling's time at N concurrent jobs in one process (bench/overhead.py)
  batch      a batch's makespan against the physical bound, and the sequential baseline (bench/batch.py)
  makespan   one 1 + 3 job: where its wall time goes; cached rerun in-process (bench/makespan.py)
  rerun      a finished job's rerun as a CLI process: seconds and Kling requests (bench/rerun.py)
  transfer   bench.transfer.run(quick) when that function exists (owned by the transfer benchmark)

    .venv/bin/python bench/run.py                       # everything, ~25 min on 2 cores; writes docs/benchmarks.md
    .venv/bin/python bench/run.py --quick --doc OUT.md  # every part small (CI: tests/bench/test_run_quick.py)
    .venv/bin/python bench/run.py --only polling,rerun  # some parts; the page keeps the others' last figures
"""

from __future__ import annotations

import argparse
import importlib
import json
import os
import subprocess
import sys
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import common
import report

PARTS = ("polling", "overhead", "batch", "makespan", "rerun", "transfer")
DOC = common.ROOT / "docs" / "benchmarks.md"


def start_part(name: str, quick: bool, env: dict[str, str], extra: list[str] | None = None) -> subprocess.Popen[bytes]:
    args = [sys.executable, str(common.ROOT / "bench" / f"{name}.py"), *(["--quick"] if quick else []),
            *(extra or [])]
    (common.RESULTS / f"{name}{'-quick' if quick else ''}.json").unlink(missing_ok=True)  # no stale figures
    print(f"\n=== {name}: {' '.join(args[1:])}", flush=True)
    return subprocess.Popen(args, env=env, cwd=common.ROOT, start_new_session=True)


def finish_part(name: str, process: subprocess.Popen[bytes], started: float) -> float:
    try:
        code = process.wait(timeout=7200)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, 9)
        raise
    if code != 0:  # the others still run; the page says this part has no figures
        print(f"bench part {name} FAILED (exit {code})", flush=True)
    return time.monotonic() - started


def run_transfer(quick: bool) -> Any:
    """The transfer benchmark's hook: bench.transfer.run(quick) -> its figures, if it has one yet."""
    sys.path.insert(0, str(common.ROOT / "bench"))
    try:
        module = importlib.import_module("transfer")
    finally:
        sys.path.pop(0)
    run = getattr(module, "run", None)
    if run is None:
        print("transfer: bench.transfer.run(quick) does not exist yet: HOOK left for it", flush=True)
        return None
    return run(quick)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="every part in its --quick form")
    parser.add_argument("--only", default=",".join(PARTS), help=f"comma-separated parts (default {','.join(PARTS)})")
    parser.add_argument("--sqlite", action="store_true", help="the shared Prefect server on SQLite")
    parser.add_argument("--parallel", action="store_true", help="run the parts at once (default with --quick)")
    parser.add_argument("--render-only", action="store_true", help="run nothing: write the page from the results")
    parser.add_argument("--overhead-jobs", default=None, help="N for the overhead part (default its 50,200,500)")
    parser.add_argument("--doc", type=Path, default=None,
                        help="page to write (default docs/benchmarks.md; --quick: bench/results/benchmarks-quick.md)")
    args = parser.parse_args()
    parts = [] if args.render_only else [p.strip() for p in args.only.split(",") if p.strip()]
    args.parallel = args.parallel or args.quick
    unknown = set(parts) - set(PARTS)
    if unknown:
        parser.error(f"unknown part(s) {', '.join(sorted(unknown))}; known: {', '.join(PARTS)}")
    doc = args.doc or (common.RESULTS / "benchmarks-quick.md" if args.quick else DOC)
    took: dict[str, float] = {}
    transfer: Any = None
    with ExitStack() as stack:
        env = dict(os.environ)
        needs_server = any(p in parts for p in ("overhead", "batch", "makespan", "rerun"))
        database = "shared"
        if needs_server and not env.get(common.SHARED_API):
            tmp = stack.enter_context(common.scratch("bench-run-"))
            url = None if args.sqlite or args.quick else stack.enter_context(common.postgres())
            database = "postgresql" if url else "sqlite"
            home = tmp / "prefect-home"
            home.mkdir()
            api, started = stack.enter_context(common.prefect_server(home, url))
            print(f"prefect server on {database}: healthy after {started:.1f} s", flush=True)
            env.update({common.SHARED_API: api, "BENCH_PREFECT_SERVER_PID": str(common.SERVER_PID or ""),
                        "BENCH_PREFECT_DATABASE": database})
        children = [p for p in parts if p != "transfer"]
        extras = {"overhead": ["--jobs", args.overhead_jobs]} if args.overhead_jobs else {}
        if args.parallel:  # every part at once: quick figures only show the benchmarks work, and CI waits less
            started = time.monotonic()
            running = {name: start_part(name, args.quick, env, extras.get(name)) for name in children}
            for name, process in running.items():
                took[name] = finish_part(name, process, started)
        else:  # one after another, so no part's timings share the cores with another's
            for name in children:
                start = time.monotonic()
                took[name] = finish_part(name, start_part(name, args.quick, env, extras.get(name)), start)
        if "transfer" in parts:
            start = time.monotonic()
            transfer = run_transfer(args.quick)
            took["transfer"] = time.monotonic() - start
            if transfer is not None:  # its own file too, with the machine and the command, as bench/transfer.py writes
                written = common.write_result("transfer-quick" if args.quick else "transfer", transfer)
                transfer = json.loads(written.read_text())
    suffix = "-quick" if args.quick else ""
    meta = {"database": database, "part_seconds": {k: round(v, 1) for k, v in took.items()}, "transfer": transfer,
            "command_line": " ".join([".venv/bin/python", "bench/run.py", *sys.argv[1:]])}
    if args.render_only:  # the page of the last run, with its own command and settings
        meta = load(f"run{suffix}") or meta
    else:
        common.write_result(f"run{suffix}", meta)
    figures = {name: load(f"{name}{suffix}") for name in PARTS if name != "transfer"}
    page = report.render(figures, transfer=meta["transfer"], quick=args.quick, database=meta["database"],
                         part_seconds=meta["part_seconds"], command=meta["command_line"])
    doc.parent.mkdir(parents=True, exist_ok=True)
    doc.write_text(page)
    print(f"\nwrote {doc}", flush=True)


def load(name: str) -> dict[str, Any] | None:
    path = common.RESULTS / f"{name}.json"
    return json.loads(path.read_text()) if path.exists() else None  # type: ignore[no-any-return]


if __name__ == "__main__":
    main()
