"""Rerun of a finished job as a CLI process: wall time, the requests it sends to Kling, and which path served it.

`kling-pipeline run` (a child process, as a user types it) makes a 1 + N job into a local folder; then the same
command runs again --reruns times. A finished job's rerun is served from its proven manifest (the fast path in
kling_tasks/finished.py: no Prefect import, no flow run); one more rerun with `--no-fast-path` times the flow's
path (every step Cached) beside it. Each rerun's wall time (process start, imports and the flow included) and
its Kling requests (the emulator's counts before and after: creates, and every request) are recorded, and the
floor: `kling-pipeline --help`, a process that only imports the CLI.

    .venv/bin/python bench/rerun.py            # 1 + 3, 3 reruns
    .venv/bin/python bench/rerun.py --quick    # 1 + 1, 1 rerun
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import time
import uuid
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import common

PROMPT = "a kite over a windy beach"


FAST_LINE = b"served from its proven manifest"  # the fast path's line on stderr (flows/cli.py)


def child_cpu() -> float:
    """CPU seconds (user + system) of this process's finished children: what a run costs, whatever the load."""
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def cli(job_id: str, extensions: int, dest: str, env: dict[str, str], log: Path,
        *extra: str) -> tuple[float, float, bool]:
    """One `kling-pipeline run` process: its wall time, its CPU time, and whether the fast path served it."""
    args = [str(common.BIN / "kling-pipeline"), "run", "--prompt", PROMPT, "--dest", dest, "--job-id", job_id, *extra]
    for i in range(extensions):
        args += ["--extend", f"the kite dives, part {i + 1}"]
    start, cpu = time.monotonic(), child_cpu()
    done = subprocess.run(args, env=env, capture_output=True, timeout=600, check=False,
                          start_new_session=True)
    took, cpu = time.monotonic() - start, child_cpu() - cpu
    with log.open("ab") as err:
        err.write(done.stderr)
    if done.returncode != 0:
        raise RuntimeError(f"kling-pipeline run exited {done.returncode}; see {log}")
    return took, cpu, FAST_LINE in done.stderr


def timed_rerun(emu: common.Emulator, job_id: str, extensions: int, dest: str, env: dict[str, str], log: Path,
                *extra: str) -> dict[str, Any]:
    creates0, requests0 = counts(emu)
    took, cpu, fast = cli(job_id, extensions, dest, env, log, *extra)
    creates1, requests1 = counts(emu)
    return {"wall_s": round(took, 2), "cpu_s": round(cpu, 2), "creates": creates1 - creates0,
            "kling_requests": requests1 - requests0, "fast_path": fast}


def counts(emu: common.Emulator) -> tuple[int, int]:
    stats = emu.stats()
    return sum(stats["create_attempts"].values()), sum(stats["requests"].values())


def help_seconds(env: dict[str, str]) -> tuple[float, float]:
    """The floor: a process that imports the CLI (typer, pydantic, the plan and storage modules) and exits."""
    start, cpu = time.monotonic(), child_cpu()
    subprocess.run([str(common.BIN / "kling-pipeline"), "--help"], env=env, check=True,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120)
    return time.monotonic() - start, child_cpu() - cpu


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--extensions", type=int, default=3, help="N in the 1 + N job (default 3)")
    parser.add_argument("--reruns", type=int, default=3, help="reruns timed (default 3)")
    parser.add_argument("--time-scale", type=float, default=0.005, help="emulator latency factor (default 0.005)")
    parser.add_argument("--quick", action="store_true", help="1 + 1, 1 rerun")
    args = parser.parse_args()
    if args.quick:
        args.extensions, args.reruns = 1, 1
    scale = args.time_scale
    results: dict[str, Any] = {"extensions": args.extensions, "time_scale": scale}
    with ExitStack() as stack:
        tmp = stack.enter_context(common.scratch("bench-rerun-"))
        home = tmp / "prefect-home"
        home.mkdir()
        api, _ = stack.enter_context(common.prefect_server(home))
        emu = stack.enter_context(common.emulator(tmp, time_scale=scale))
        env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_API_URL": api, "COLUMNS": "200",
               "PREFECT_SERVER_ANALYTICS_ENABLED": "false", **common.kling_env(emu.base_url, scale)}
        job_id, dest = f"bench-rerun-{uuid.uuid4().hex[:6]}", str(tmp / "out")
        print(f"first run: 1 + {args.extensions} ...", flush=True)
        results["first_run_s"] = round(cli(job_id, args.extensions, dest, env, tmp / "cli.log")[0], 2)
        runs = []
        for i in range(args.reruns):
            runs.append(timed_rerun(emu, job_id, args.extensions, dest, env, tmp / "cli.log"))
            print(f"rerun {i + 1}: {runs[-1]}", flush=True)
        results["reruns"] = runs
        results["rerun_wall_s_median"] = round(statistics.median(r["wall_s"] for r in runs), 2)
        results["rerun_cpu_s_median"] = round(statistics.median(r["cpu_s"] for r in runs), 2)
        flow = timed_rerun(emu, job_id, args.extensions, dest, env, tmp / "cli.log", "--no-fast-path")
        print(f"rerun with --no-fast-path (a flow run): {flow}", flush=True)
        results["flow_rerun"] = flow
        floor = [help_seconds(env) for _ in range(3)]
        results["cli_help_s"] = round(statistics.median(wall for wall, _ in floor), 2)
        results["cli_help_cpu_s"] = round(statistics.median(cpu for _, cpu in floor), 2)
    path = common.write_result("rerun-quick" if args.quick else "rerun", results)
    print(f"wrote {path.relative_to(common.ROOT)}")


if __name__ == "__main__":
    main()
