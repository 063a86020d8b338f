"""Makespan of a 1 + N job through `produce_video`: where the wall time goes, and what a rerun costs.

One `prefect server start` (child process) for the whole benchmark, the Kling emulator (child process) with
latencies × --time-scale and the poll bounds compressed by the same factor, a local folder (or --s3: moto).
  flow        produce_video in this process: wall time, split on one timeline into
              kling     Σ (updated_at of `succeed` − created_at) per step, from the emulator: Kling working
              detect    Σ (the wait task's "status: succeed" log line − that updated_at): polling delay
              wait end  Σ (end of the wait task − that log line): summary, events, result persistence
              submit    Σ (submit task start → created_at): lookup GET + create POST + task-run start
              store     Σ store task runs: HEAD, GET, streamed download + upload, verify
              between   task-run orchestration and manifest/artifact writes between the task runs
              start/end call → first task run; last task run → return (final.mp4, contact sheet, manifest)
  rerun       the same job again: every step Cached
  cli         `kling-pipeline run` as a child process (process start and imports included), then its rerun
Kling and detect scale with --time-scale; the rest does not, so `projected_real_s` = (kling + detect) /
scale + the rest is what the same job would take against real Kling with the default poll bounds.

    .venv/bin/python bench/makespan.py             # ~75 s on 2 cores (~100 s with --s3)
    .venv/bin/python bench/makespan.py --quick     # 1 + 1, no CLI
    .venv/bin/python bench/makespan.py --s3        # also to S3 (moto)
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import time
import uuid
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import common

PROMPT = "a paper boat on a rainy street"
BUCKET = "bench-videos"


def make_job(job_id: str, extensions: int, dest: str) -> Any:
    from kling_tasks.jobs import ExtensionSpec, GenerationSpec, VideoJob

    return VideoJob(generate=GenerationSpec(prompt=PROMPT), dest=dest, job_id=job_id,
                    extensions=[ExtensionSpec(prompt=f"the boat drifts on, part {i + 1}") for i in range(extensions)])


async def kling_times(emu: common.Emulator, job: Any) -> list[tuple[float, float]]:
    """(created_at, updated_at of succeed) in epoch seconds per step, from the emulator."""
    from kling_tasks.api import KlingClient
    from kling_tasks.jobs import plan_job
    from kling_tasks.settings import KlingSettings

    stats = emu.stats()
    by_ext = {t["external_task_id"]: tid for tid, t in stats["tasks"].items()}
    out = []
    async with KlingClient(KlingSettings()) as client:
        for step in plan_job(job).steps:
            tid = by_ext[step.external_task_id]
            snap = await client.get(step.kind, tid)
            out.append((snap.created_at / 1000, snap.updated_at / 1000))
    return out


async def task_runs(flow_run_id: Any) -> tuple[list[Any], list[float]]:
    """The flow run's task runs, and the time of each "status: succeed" log line (when polling saw it)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import FlowRunFilter, FlowRunFilterId, LogFilter, LogFilterFlowRunId
    from prefect.logging.handlers import APILogWorker

    APILogWorker.drain_all(timeout=10)  # logs are shipped in batches: make sure they are all in
    async with get_client() as client:
        runs = await client.read_task_runs(flow_run_filter=FlowRunFilter(id=FlowRunFilterId(any_=[flow_run_id])))
        logs = await client.read_logs(log_filter=LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    seen = sorted(log.timestamp.timestamp() for log in logs if log.message.endswith(")")
                  and " status: succeed (" in log.message)
    return sorted(runs, key=lambda r: r.expected_start_time or r.created), seen


async def run_flow(job: Any) -> tuple[float, float, Any]:
    from flows.video import produce_video

    t0 = time.time()
    state = await produce_video(job=job, return_state=True)
    t1 = time.time()
    await state.result()  # raises if the flow failed
    return t0, t1, state.state_details.flow_run_id


def breakdown(t0: float, t1: float, runs_and_seen: tuple[list[Any], list[float]], kling: list[tuple[float, float]],
              scale: float) -> dict[str, Any]:
    runs, seen = runs_and_seen
    def span(r: Any) -> tuple[float, float]:
        return r.start_time.timestamp(), r.end_time.timestamp()

    kind = {"submit": [], "wait": [], "store": []}  # type: dict[str, list[tuple[float, float]]]
    for r in runs:
        kind["wait" if r.name.startswith("wait-") else "store" if r.name.startswith("store-") else "submit"].append(
            span(r))
    for spans in kind.values():
        spans.sort()
    wall = t1 - t0
    k = sum(u - c for c, u in kling)
    lag = sum(w[1] - u for w, (_, u) in zip(kind["wait"], kling, strict=True))
    detect = sum(s - u for s, (_, u) in zip(seen, kling, strict=True))
    submit = sum(c - s[0] for s, (c, _) in zip(kind["submit"], kling, strict=True))
    store = sum(e - s for s, e in kind["store"])
    start = kind["submit"][0][0] - t0
    end = t1 - kind["store"][-1][1]
    between = wall - k - lag - submit - store - start - end
    rest = wall - k - detect
    return {"wall_s": round(wall, 2), "kling_s": round(k, 2), "detect_s": round(detect, 2),
            "wait_end_s": round(lag - detect, 2),
            "submit_s": round(submit, 2), "store_s": round(store, 2), "between_tasks_s": round(between, 2),
            "flow_start_s": round(start, 2), "flow_end_s": round(end, 2), "overhead_s": round(rest, 2),
            "per_store_s": [round(e - s, 3) for s, e in kind["store"]],
            "per_submit_s": [round(c - s[0], 3) for s, (c, _) in zip(kind["submit"], kling, strict=True)],
            "kling_seconds_equiv": round(k / scale), "detect_kling_seconds_equiv": round(detect / scale),
            "projected_real_s": round((k + detect) / scale + rest)}


def cached_count(runs: list[Any]) -> str:
    names = [r.state_name for r in runs]
    return f"{names.count('Cached')}/{len(names)} Cached"


def run_cli(job_id: str, extensions: int, dest: str, env: dict[str, str], log: Path) -> tuple[float, str]:
    args = [str(common.BIN / "kling-pipeline"), "run", "--prompt", PROMPT, "--dest", dest, "--job-id", job_id]
    for i in range(extensions):
        args += ["--extend", f"the boat drifts on, part {i + 1}"]
    start = time.monotonic()
    with log.open("ab") as err:
        done = subprocess.run(args, env=env, stdout=subprocess.PIPE, stderr=err, timeout=600, check=False,
                              start_new_session=True)
    took = time.monotonic() - start
    if done.returncode != 0:
        raise RuntimeError(f"kling-pipeline run exited {done.returncode}; see {log}")
    return took, done.stdout.decode().strip().splitlines()[-1]


def timed(args: list[str], env: dict[str, str]) -> float:
    start = time.monotonic()
    subprocess.run(args, env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, timeout=120)
    return round(time.monotonic() - start, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--extensions", type=int, default=3, help="N in the 1 + N job (default 3)")
    parser.add_argument("--time-scale", type=float, default=0.01, help="emulator latency factor (default 0.01)")
    parser.add_argument("--s3", action="store_true", help="also run the job into S3 (moto server)")
    parser.add_argument("--no-cli", action="store_true", help="skip the `kling-pipeline run` subprocess part")
    parser.add_argument("--quick", action="store_true", help="1 + 1 job, no CLI")
    args = parser.parse_args()
    if args.quick:
        args.extensions, args.no_cli = 1, True
    scale = float(args.time_scale)
    results: dict[str, Any] = {"extensions": args.extensions, "time_scale": scale}
    rows: list[tuple[str, dict[str, Any]]] = []
    run_id = uuid.uuid4().hex[:6]

    with ExitStack() as stack:
        tmp = stack.enter_context(common.scratch("bench-makespan-"))
        home = tmp / "prefect-home"
        home.mkdir()
        api, took = stack.enter_context(common.prefect_server(home))
        results["prefect_server_start_s"] = round(took, 1)
        emu = stack.enter_context(common.emulator(tmp, time_scale=scale))
        env = {"PREFECT_HOME": str(home), "PREFECT_API_URL": api, "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
               **common.kling_env(emu.base_url, scale)}
        dests = {"local": str(tmp / "out")}
        if args.s3:
            endpoint = stack.enter_context(common.moto_s3(tmp))
            env.update(common.s3_env(endpoint))
            dests["s3"] = f"s3://{BUCKET}/bench"
        os.environ.update(env)  # before Prefect is first imported: it reads its settings then
        if args.s3:
            import boto3

            boto3.client("s3").create_bucket(Bucket=BUCKET)

        for name, dest in dests.items():
            job = make_job(f"bench-{name}-{run_id}", args.extensions, dest)
            print(f"flow -> {name}: 1 + {args.extensions} steps ...", flush=True)
            t0, t1, fr = asyncio.run(run_flow(job))
            first = breakdown(t0, t1, asyncio.run(task_runs(fr)), asyncio.run(kling_times(emu, job)), scale)
            rows.append((f"flow {name}", first))
            t0, t1, fr = asyncio.run(run_flow(job))
            again, _ = asyncio.run(task_runs(fr))
            rows.append((f"rerun {name} ({cached_count(again)})", {"wall_s": round(t1 - t0, 2)}))

        if not args.no_cli:
            child_env = {**os.environ, "COLUMNS": "200"}
            results["python_import_flows_s"] = timed([sys.executable, "-c", "import flows.video"], child_env)
            results["cli_help_s"] = timed([str(common.BIN / "kling-pipeline"), "--help"], child_env)
            job_id = f"bench-cli-{run_id}"
            print("cli run ...", flush=True)
            took, uri = run_cli(job_id, args.extensions, dests["local"], child_env, tmp / "cli.log")
            rows.append(("cli run local", {"wall_s": round(took, 2)}))
            took, _ = run_cli(job_id, args.extensions, dests["local"], child_env, tmp / "cli.log")
            rows.append(("cli rerun local (all Cached)", {"wall_s": round(took, 2)}))
            results["cli_final_uri_tail"] = Path(uri).name

        from prefect.logging.handlers import APILogWorker

        APILogWorker.drain_all(timeout=10)  # ship queued logs before their server goes away

    cols = ["wall_s", "kling_s", "detect_s", "wait_end_s", "submit_s", "store_s", "between_tasks_s", "flow_start_s",
            "flow_end_s", "projected_real_s"]
    print(f"\nmakespan, 1 + {args.extensions} job, time scale {scale:g} (seconds of wall time)")
    width = max(len(n) for n, _ in rows)
    print(" " * width + "  " + "  ".join(c.removesuffix("_s").rjust(9) for c in cols))
    for name, row in rows:
        print(name.ljust(width) + "  " + "  ".join(str(row.get(c, "")).rjust(9) for c in cols))
    extras = {k: v for k, v in results.items() if k.endswith("_s")}
    print("\n" + ", ".join(f"{k} {v}" for k, v in extras.items()))
    results["runs"] = [{"name": n, **r} for n, r in rows]
    path = common.write_result("makespan-quick" if args.quick else "makespan", results)
    print(f"wrote {path.relative_to(common.ROOT)}")


if __name__ == "__main__":
    main()
