"""Pipeline overhead per step, and how it holds up with many concurrent jobs in one worker process.

For each N in --jobs, one `produce_batch` of N jobs x S steps runs in this process with N account slots (so no
job waits for a slot and every job is in flight at once), against the Kling emulator (child process, latencies
x the time scale, concurrency N) and a local folder. Per job, from the batch's entries and the emulator's clock:
  overhead per step  (the job's wall time - Σ its Kling tasks' created -> succeed) / S: everything the pipeline
                     adds to Kling's time: detection delay, submit, task-run hand-offs, ledger, artifacts, store
                     of the last step, final copy and contact sheet
  CPU per step       this process's CPU seconds during the batch (all threads) / (N x S); the Prefect server's
                     and the emulator's CPU are separate processes, reported beside it
  detection per step  Σ (first answer that showed a task ended - its end) / S, from the emulator's clock; the
                     pipeline's own time per step is the overhead less this (goal 1 bounds it as a share of
                     the task's length)
  phases             where the pipeline's own time goes (bench/phases.py): subflow start, first create,
                     hand-offs, end
A warm-up batch first teaches the account's task lengths (the learned poll schedule) and warms Prefect's
client; then empty task and subflow runs measure Prefect's own CPU per step here (bench/prefect_floor.py).
Polls per task come from the emulator's counts.

Two loads, each at every N (steady first):
  burst   every job starts at once and the tasks all last --task-seconds: the N jobs' submits, stores and
          hand-offs fall due together, so the wall overhead is mostly their queue for 2 cores (N x the CPU
          per step / cores); a stress test: does one process carry N jobs, and does its CPU per step hold?
  steady  the same work rate at every N: jobs start 1/--rate s apart over one task length, and the tasks last
          N / --rate s (the emulator's time scale follows), so N jobs are in flight at once while the steps
          fall due at the same rate at every N (by default the rate of 500 jobs of Kling's 320 s tasks).
          What grows from 50 to 500 here is what carrying more concurrent jobs costs (the goal's ratio), not
          a longer queue for the cores. Each N gets its own
          emulator; its account starts from the warm-up's learned task lengths, rescaled to its time scale.

    .venv/bin/python bench/overhead.py                 # N = 50, 200, 500 on PostgreSQL when available
    .venv/bin/python bench/overhead.py --quick         # N = 4 on SQLite
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import time
import uuid
from collections.abc import Callable
from contextlib import ExitStack
from typing import Any

import api_calls
import common
import phases
import prefect_floor

EXTEND_LATENCY = 320.0
# The steady load's rate: 500 jobs in flight with Kling's own 320 s extensions start a step every 0.64 s, so at
# N = 500 the tasks last Kling's 320 s, and every smaller N gets the same rate with shorter tasks.
STEADY_RATE = 500 / EXTEND_LATENCY


def make_jobs(count: int, steps: int, dest: str, tag: str) -> list[Any]:
    from kling_tasks.jobs import ExtensionSpec, GenerationSpec, VideoJob

    return [VideoJob(generate=GenerationSpec(prompt=f"an origami crane number {i}"), dest=dest, job_id=f"{tag}-{i}",
                     extensions=[ExtensionSpec(prompt=f"it unfolds, part {k}") for k in range(1, steps)])
            for i in range(count)]


def seconds_by_job(stats: dict[str, Any], tag: str, seconds: Callable[[str, dict[str, Any]], float | None]
                   ) -> dict[str, float]:
    """Σ seconds(task_id, task) over each job's succeeded tasks (None: not counted); job id = the external id's
    namespace."""
    out: dict[str, float] = {}
    for task_id, task in stats["tasks"].items():
        ext = task["external_task_id"] or ""
        if ext.startswith(f"{tag}-") and task["status"] == "succeed":
            value = seconds(task_id, task)
            if value is not None:
                job = ext.rsplit("-s", 1)[0]
                out[job] = out.get(job, 0.0) + value
    return out


def kling_seconds_by_job(stats: dict[str, Any], tag: str) -> dict[str, float]:
    """Σ (succeed - created) of each job's tasks, emulator clock."""
    return seconds_by_job(stats, tag, lambda _, task: (task["updated_at"] - task["created_at"]) / 1000)


def detection_by_job(stats: dict[str, Any], tag: str) -> dict[str, float]:
    """Σ (the first answer that showed a task ended - its end) of each job's tasks: the polls' detection delay."""
    seen_at = stats.get("final_seen_at", {})
    return seconds_by_job(stats, tag, lambda task_id, task: None if task_id not in seen_at
                          else max(0.0, seen_at[task_id] - task["updated_at"]) / 1000)


def polls_of(stats: dict[str, Any], tag: str) -> list[float]:
    return [float(stats["polls"].get(tid, 0)) for tid, t in stats["tasks"].items()
            if (t["external_task_id"] or "").startswith(f"{tag}-")]


def run_batch(n: int, steps: int, dest: str, tag: str, spacing: float) -> tuple[float, float, list[Any]]:
    """produce_batch of the N jobs (spacing 0), or the same jobs started `spacing` seconds apart."""
    from flows.batch import produce_batch
    from kling_tasks.batch_ledger import load_batch
    from kling_tasks.storage import open_sink

    jobs = make_jobs(n, steps, dest, tag)
    cpu0, start = time.process_time(), time.monotonic()
    if spacing > 0:
        entries = asyncio.run(staggered_jobs(jobs, spacing))
    else:
        asyncio.run(produce_batch(jobs=jobs, dest=dest, batch_id=f"batch-{tag}", return_state=True))
        manifest = load_batch(open_sink(dest), f"batch-{tag}")  # every job's outcome, failed ones too
        entries = manifest.jobs if manifest is not None else []
    wall, cpu = time.monotonic() - start, time.process_time() - cpu0
    return wall, cpu, entries


async def staggered_jobs(jobs: list[Any], spacing: float) -> list[Any]:
    """The jobs as produce_batch runs them in its own process (flows.batch.run_one: a produce_video subflow
    each, its entry timed), job i starting at i x spacing; all in one flow run and one event loop."""
    from prefect import flow

    from flows.batch import run_one
    from kling_tasks.batch_ledger import BatchEntry
    from kling_tasks.prefect_api import jobs_in_this_process
    from kling_tasks.settings import load_settings
    from kling_tasks.slots import ensure_account_limit

    @flow(name="bench-staggered-jobs")
    async def staggered() -> list[BatchEntry]:
        account = account_now()
        await ensure_account_limit(account, load_settings().max_concurrency)
        entries = [BatchEntry(job_id=job.effective_job_id(), dest=job.dest) for job in jobs]

        async def start(index: int) -> None:
            await asyncio.sleep(index * spacing)
            await run_one(jobs[index], entries[index], False, None, account)

        async with jobs_in_this_process():  # as produce_batch runs its jobs
            await asyncio.gather(*(start(i) for i in range(len(jobs))))
        return entries

    return await staggered()


def account_now() -> str:
    from kling_tasks.identity import account_fingerprint
    from kling_tasks.settings import load_settings

    return account_fingerprint(load_settings())


async def copy_task_lengths(source: str, target: str, factor: float) -> None:
    """Give a new emulator's account the task lengths learned on another, x `factor` (the ratio of their time
    scales: the pipeline learns the seconds it saw, which are Kling's against the real one)."""
    from kling_tasks.task_lengths import PrefectVariableStore

    deadline = time.monotonic() + 30  # the warm-up's book writes its variable a few seconds after a task ends
    while not (value := await PrefectVariableStore(source).load()) and time.monotonic() < deadline:
        await asyncio.sleep(1)
    if value:
        await PrefectVariableStore(target).save(
            {key: [[q * factor, p * factor] for q, p in samples] for key, samples in value.items()})
    else:
        print("  no learned task lengths to start from: the first tasks poll by the adaptive policy", flush=True)


class ExpiredLeases(logging.Handler):
    """Counts the account-slot leases that expired before their renewal (kling_tasks.slot_leases warns once each)."""

    def __init__(self) -> None:
        super().__init__(logging.WARNING)
        self.count = 0

    def emit(self, record: logging.LogRecord) -> None:
        self.count += "expired before its renewal" in record.getMessage()


def measure(n: int, steps: int, dest: str, emu: common.Emulator, tag: str,
            calls: api_calls.Counts, spacing: float = 0.0) -> dict[str, Any]:
    server_cpu0 = common.group_cpu_seconds(common.SERVER_PID)
    emu_cpu0 = common.group_cpu_seconds(emu.child.process.pid)
    calls0 = calls.snapshot()
    expired = ExpiredLeases()
    leases_log = logging.getLogger("kling_tasks.slot_leases")
    leases_log.addHandler(expired)
    try:
        wall, cpu, entries = run_batch(n, steps, dest, tag, spacing)
    finally:
        leases_log.removeHandler(expired)
    prefect_calls = api_calls.per_step(calls0, calls.snapshot(), max(1, n * steps))
    server_cpu = common.group_cpu_seconds(common.SERVER_PID) - server_cpu0
    emu_cpu = common.group_cpu_seconds(emu.child.process.pid) - emu_cpu0
    stats = emu.stats()
    kling = kling_seconds_by_job(stats, tag)
    done = [e for e in entries if e.status == "succeeded" and e.seconds is not None and e.job_id in kling]
    per_step = [(e.seconds - kling[e.job_id]) / steps for e in done]
    detect = detection_by_job(stats, tag)
    detection = [detect.get(e.job_id, 0.0) / steps for e in done]
    return {"jobs": n, "steps": steps, "succeeded": len(done), "failed": len(entries) - len(done),
            "errors": sorted({e.error for e in entries if e.error})[:3],
            "batch_wall_s": round(wall, 1), "overhead_per_step_s": common.stats(per_step),
            "detection_per_step_s": common.stats(detection),
            "pipeline_per_step_s": common.stats([o - d for o, d in zip(per_step, detection, strict=True)]),
            "kling_per_step_s": common.stats([kling[e.job_id] / steps for e in done]),
            "cpu_per_step_s": round(cpu / max(1, n * steps), 4),
            "prefect_server_cpu_per_step_s": round(server_cpu / max(1, n * steps), 4) if common.SERVER_PID else None,
            "emulator_cpu_per_step_s": round(emu_cpu / max(1, n * steps), 4),
            "pipeline_phases_per_step_s": phases.phases_per_step(entries, stats, tag, steps),
            "polls_per_task": common.stats(polls_of(stats, tag)),
            "prefect_calls_per_step": prefect_calls,
            "concurrency_high_water": stats["concurrency_high_water"], "leases_expired": expired.count}


def report(row: dict[str, Any]) -> None:
    o, p = row["overhead_per_step_s"], row["pipeline_per_step_s"]
    print(f"  {row['succeeded']}/{row['jobs']} ok, overhead/step mean {o.get('mean')} s p90 {o.get('p90')} s "
          f"(pipeline {p.get('mean')} s, detection {row['detection_per_step_s'].get('mean')} s), "
          f"CPU/step {row['cpu_per_step_s']} s (server {row['prefect_server_cpu_per_step_s']} s), "
          f"polls/task {row['polls_per_task'].get('mean')}, wall {row['batch_wall_s']} s, "
          f"{row['leases_expired']} slot lease(s) expired", flush=True)
    ph = row["pipeline_phases_per_step_s"]
    print(f"  pipeline's own time per step, {ph.get('jobs')} jobs: subflow start {ph.get('subflow_start')} s, first "
          f"create {ph.get('first_create')} s, hand-offs {ph.get('hand_offs')} s, end {ph.get('end')} s (wait "
          f"{ph.get('end_wait')}, store {ph.get('end_store')}, finish {ph.get('end_finish')}), "
          f"outside the run {ph.get('outside')} s", flush=True)
    pc = row["prefect_calls_per_step"]
    print(f"  per step: {pc['http_total']} HTTP calls to Prefect, {pc['events_total']} events, "
          f"{pc['log_batches']} log batches: {pc['http']} {pc['events']}", flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--jobs", default="50,200,500", help="comma-separated N (default 50,200,500)")
    parser.add_argument("--steps", type=int, default=2, help="S: 1 generation + S-1 extensions (default 2)")
    parser.add_argument("--task-seconds", type=float, default=10.0,
                        help="burst: wall seconds of an extension (the emulator's time scale; default 10)")
    parser.add_argument("--rate", type=float, default=STEADY_RATE,
                        help=f"steady: jobs started per second; an extension lasts N / rate s (default "
                             f"{STEADY_RATE:g}: 500 jobs of Kling's 320 s)")
    parser.add_argument("--loads", default="burst,steady", help="which loads (default burst,steady)")
    parser.add_argument("--sqlite", action="store_true", help="the Prefect server on SQLite, not PostgreSQL")
    parser.add_argument("--warm-up", type=int, default=3, help="jobs of the warm-up batch (default 3)")
    parser.add_argument("--quick", action="store_true", help="N = 4; 2 s tasks; rate 2; 2 warm-up jobs; SQLite")
    args = parser.parse_args()
    if args.quick:
        args.jobs, args.task_seconds, args.rate, args.sqlite, args.warm_up = "4", 2.0, 2.0, True, 2
    sizes = [int(x) for x in args.jobs.split(",") if x.strip()]
    loads = [x.strip() for x in args.loads.split(",") if x.strip()]
    scale = args.task_seconds / EXTEND_LATENCY
    results: dict[str, Any] = {"time_scale": scale, "task_seconds": args.task_seconds, "steps": args.steps,
                               "rate": args.rate}
    name = "overhead-quick" if args.quick else "overhead"
    tag = f"ov{uuid.uuid4().hex[:5]}"
    with ExitStack() as stack:
        tmp = stack.enter_context(common.scratch("bench-overhead-"))
        home = tmp / "prefect-home"
        home.mkdir()
        db = None if args.sqlite or os.environ.get(common.SHARED_API) else stack.enter_context(common.postgres())
        api, took = stack.enter_context(common.prefect_server(home, db))
        results["prefect_database"] = os.environ.get("BENCH_PREFECT_DATABASE") or ("postgresql" if db else "sqlite")
        results["prefect_server_start_s"] = round(took, 1)
        emu = stack.enter_context(common.emulator(tmp, time_scale=scale, concurrency=max(sizes) + 10))
        os.environ.update({"PREFECT_HOME": str(home), "PREFECT_API_URL": api, "PREFECT_SERVER_ANALYTICS_ENABLED":
                           "false", "PREFECT_LOGGING_LEVEL": "WARNING", "KLING_MAX_CONCURRENCY": str(max(sizes) + 10),
                           **common.kling_env(emu.base_url, scale)})
        dest = str(tmp / "out")
        from kling_tasks.slot_leases import LEASE_SECONDS

        results["slot_lease_s"] = LEASE_SECONDS  # renewed at half-life: the renewals per step follow from it
        calls = stack.enter_context(api_calls.counting(api))
        print(f"warm-up: {args.warm_up} jobs x {args.steps} steps (learns the task lengths) ...", flush=True)
        results["warm_up"] = measure(args.warm_up, args.steps, dest, emu, f"{tag}w", calls)
        learned_on = account_now()
        results["prefect_floor"] = floor = prefect_floor.measure(10 if args.quick else 100, args.steps)
        print(f"Prefect's own CPU: {floor['task_run_ms']} ms per empty task run, {floor['subflow_run_ms']} ms per "
              f"empty subflow run: {floor['per_step_ms']} ms per step", flush=True)
        results["runs"], results["steady"] = [], []
        # Steady first: after a burst of 500 jobs the Prefect server digests their events for minutes, which
        # doubled its CPU per step in a steady run after it.
        for n in sizes if "steady" in loads else []:
            seconds = n / args.rate
            print(f"steady: {n} jobs, one every {1 / args.rate:g} s, ~{seconds:g} s tasks ...", flush=True)
            with common.emulator(tmp, time_scale=seconds / EXTEND_LATENCY, concurrency=n + 10) as steady_emu:
                os.environ.update(common.kling_env(steady_emu.base_url, seconds / EXTEND_LATENCY))
                asyncio.run(copy_task_lengths(learned_on, account_now(), seconds / args.task_seconds))
                row = measure(n, args.steps, dest, steady_emu, f"{tag}s{n}", calls, spacing=1 / args.rate)
            results["steady"].append({**row, "task_seconds": seconds, "time_scale": seconds / EXTEND_LATENCY})
            report(row)
            common.write_result(name, results)
        os.environ.update(common.kling_env(emu.base_url, scale))  # the burst's emulator again
        for n in sizes if "burst" in loads else []:
            print(f"burst: {n} jobs at once x {args.steps} steps, ~{args.task_seconds:g} s tasks ...", flush=True)
            results["runs"].append(measure(n, args.steps, dest, emu, f"{tag}n{n}", calls))
            report(results["runs"][-1])
            common.write_result(name, results)  # each N as it ends
        from prefect.logging.handlers import APILogWorker

        APILogWorker.drain_all(timeout=10)
    path = common.write_result(name, results)
    print(f"wrote {path.relative_to(common.ROOT)}")


if __name__ == "__main__":
    main()
