"""Batch makespan against the physical bound, and the baseline a user would write by hand.

N jobs of S steps (1 + S-1 extensions) on an account of C slots, each Kling task taking about L seconds (the
emulator's latencies x --time-scale, ±10 %), cannot finish before bound = max(S·L, ceil(N·S/C)·L).
  batch      produce_batch in this process (one `prefect server start` child, the emulator child with C slots,
             a local folder): wall time of the flow, and the Kling span (first create -> last succeed, from the
             emulator's clock); both divided by the bound. Also the emulator's concurrency high-water mark.
  baseline   jobs one after another, each step created and then polled every 15 s (scaled like L), with the
             client only: no Prefect, no store. --baseline-jobs of them are run and the time is scaled to N
             (every job is the same chain, so the sequential time is linear in N).

    .venv/bin/python bench/batch.py             # N=24, S=4, C=8, L~5 s: ~2 min plus the baseline's ~1.5 min
    .venv/bin/python bench/batch.py --quick     # N=6, S=2, C=3, L~1.5 s
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import math
import os
import time
import uuid
from contextlib import ExitStack
from typing import Any

import common

EXTEND_LATENCY = 320.0  # the emulator's typical video-extend seconds (its text2video is 319 s)


def make_jobs(count: int, steps: int, dest: str, tag: str) -> list[Any]:
    from kling_tasks.jobs import ExtensionSpec, GenerationSpec, VideoJob

    return [VideoJob(generate=GenerationSpec(prompt=f"a lighthouse number {i}"), dest=dest, job_id=f"{tag}-{i}",
                     extensions=[ExtensionSpec(prompt=f"the beam turns, part {k}") for k in range(1, steps)])
            for i in range(count)]


def kling_span(emu: common.Emulator, prefix: str) -> tuple[float, float, int]:
    tasks = [t for t in emu.stats()["tasks"].values() if (t["external_task_id"] or "").startswith(prefix)]
    first = min(t["created_at"] for t in tasks) / 1000
    last = max(t["updated_at"] for t in tasks) / 1000
    return first, last, len(tasks)


def step_gaps(emu: common.Emulator, prefix: str) -> list[float]:
    """Per video, seconds from one step's `succeed` (emulator clock) to the next step's create: the pipeline's
    own time between two Kling tasks of a chain (detection, bookkeeping, task-run hand-offs, the next POST)."""
    by_job: dict[str, list[dict[str, Any]]] = {}
    for task in emu.stats()["tasks"].values():
        ext = task["external_task_id"] or ""
        if ext.startswith(prefix):
            by_job.setdefault(ext.rsplit("-s", 1)[0], []).append(task)
    gaps = []
    for tasks in by_job.values():
        ordered = sorted(tasks, key=lambda t: t["created_at"])
        gaps += [(b["created_at"] - a["updated_at"]) / 1000 for a, b in itertools.pairwise(ordered)]
    return gaps


async def baseline(jobs: list[Any], poll_seconds: float) -> float:
    """What a user writes by hand: one job after another, a fixed poll, nothing else."""
    from kling_tasks.api import KlingClient, PollPolicy
    from kling_tasks.jobs import plan_job
    from kling_tasks.kling_requests import build_request
    from kling_tasks.settings import KlingSettings
    from kling_tasks.steps import summarize

    settings = KlingSettings()
    policy = PollPolicy(min_interval=poll_seconds, max_interval=poll_seconds, jitter=0.0)
    start = time.monotonic()
    async with KlingClient(settings, poll_policy=policy) as client:
        for job in jobs:
            parent = None
            for step in plan_job(job).steps:
                created = await client.create(build_request(step, job.generate, parent), step.external_task_id)
                final = await client.wait(step.kind, created.task_id)
                parent = summarize(step.kind, final, None)
    return time.monotonic() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", type=int, default=24, help="N (default 24)")
    parser.add_argument("--steps", type=int, default=4, help="S: 1 generation + S-1 extensions (default 4)")
    parser.add_argument("--slots", type=int, default=8, help="C, the account's concurrency (default 8)")
    parser.add_argument("--task-seconds", type=float, default=5.0, help="L, seconds per Kling task (default 5)")
    parser.add_argument("--baseline-jobs", type=int, default=2, help="jobs the sequential baseline runs (default 2)")
    parser.add_argument("--quick", action="store_true", help="N=6, S=2, C=3, L=1.5 s, 1 baseline job")
    args = parser.parse_args()
    if args.quick:
        args.jobs, args.steps, args.slots, args.task_seconds, args.baseline_jobs = 6, 2, 3, 1.5, 1
    n, s, c, task_l = args.jobs, args.steps, args.slots, args.task_seconds
    scale = task_l / EXTEND_LATENCY
    bound = max(s * task_l, math.ceil(n * s / c) * task_l)
    results: dict[str, Any] = {"jobs": n, "steps": s, "slots": c, "task_seconds": task_l, "time_scale": scale,
                               "bound_s": bound}
    tag = f"bb{uuid.uuid4().hex[:6]}"

    with ExitStack() as stack:
        tmp = stack.enter_context(common.scratch("bench-batch-"))
        home = tmp / "prefect-home"
        home.mkdir()
        api, _ = stack.enter_context(common.prefect_server(home))
        emu = stack.enter_context(common.emulator(tmp, time_scale=scale, concurrency=c))
        os.environ.update({"PREFECT_HOME": str(home), "PREFECT_API_URL": api, "PREFECT_SERVER_ANALYTICS_ENABLED":
                           "false", "PREFECT_LOGGING_LEVEL": "WARNING", "KLING_MAX_CONCURRENCY": str(c),
                           **common.kling_env(emu.base_url, scale)})
        from flows.batch import produce_batch

        jobs = make_jobs(n, s, str(tmp / "out"), tag)
        print(f"batch: N={n} x S={s}, C={c}, L~{task_l:g} s, bound {bound:g} s ...", flush=True)
        start = time.monotonic()
        asyncio.run(produce_batch(jobs=jobs, dest=str(tmp / "out")))
        wall = time.monotonic() - start
        first, last, tasks = kling_span(emu, tag)
        stats = emu.stats()
        results["batch"] = {
            "wall_s": round(wall, 1), "wall_over_bound": round(wall / bound, 3),
            "kling_span_s": round(last - first, 1), "kling_span_over_bound": round((last - first) / bound, 3),
            "tasks": tasks, "concurrency_high_water": stats["concurrency_high_water"],
            "creates_refused_or_repeated": sum(stats["create_attempts"].values()) - tasks,
            "gap_between_steps_s": common.stats(step_gaps(emu, tag)),
        }
        print(f"baseline: {args.baseline_jobs} job(s) one after another, polled every {15 * scale:.2f} s ...",
              flush=True)
        emu.reset()
        sequential = make_jobs(args.baseline_jobs, s, str(tmp / "base"), f"{tag}-base")
        took = asyncio.run(baseline(sequential, 15 * scale))
        projected = took / args.baseline_jobs * n
        results["baseline"] = {"jobs_run": args.baseline_jobs, "wall_s": round(took, 1),
                               "projected_for_n_s": round(projected, 1),
                               "projected_over_bound": round(projected / bound, 3)}

    batch = results["batch"]
    print(f"\nbound {bound:g} s | batch wall {batch['wall_s']} s ({batch['wall_over_bound']}x), Kling span "
          f"{batch['kling_span_s']} s ({batch['kling_span_over_bound']}x), high-water "
          f"{batch['concurrency_high_water']}/{c}, gap between a video's steps {batch['gap_between_steps_s']} "
          f"| baseline {results['baseline']['projected_for_n_s']} s "
          f"({results['baseline']['projected_over_bound']}x)")
    path = common.write_result("batch-quick" if args.quick else "batch", results)
    print(f"wrote {path.relative_to(common.ROOT)}")


if __name__ == "__main__":
    main()
