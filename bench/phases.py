"""Where a job's own time goes (bench/overhead.py), from its flow run's timestamps and the emulator's clock.

A job's wall time is its Kling tasks' time (created -> succeed), their detection delay, and four pieces that
nothing hides (the rendering hides whatever runs beside it, the stores of all but the last step included):
  subflow start  the run created -> Running: Prefect's engine (the parent task run, the run, its state)
  first create   Running -> the emulator received the job's first create: prepare, the ledger, the account
                 slot, the submit task (its cache lookup, the write-ahead intent) and the POST
  hand-offs      a poll saw a task end -> the next step's create: the wait task's end (its result, its
                 events), the ledger, the next submit task and its POST
  end            a poll saw the last task end -> the run's end: the wait's end, the last store, final.mp4,
                 the contact sheet, the job's last artifacts and the run's Completed state; split by the task
                 runs' end times into end_wait (-> the last wait task's end), end_store (-> the last store
                 task's end) and end_finish (-> the run's end: slot release, final.mp4, sheet, artifacts)
Each figure is the mean over the jobs of its sum / steps: the four add up to the pipeline's own time per step,
less the moments outside the run (its creation request, the batch's entry), reported as `outside`.
"""

from __future__ import annotations

import asyncio
import time
from datetime import datetime
from typing import Any

PAGE = 200  # Prefect's read limit per request
RECORDER_WAITS = 30  # reads 2 s apart, for the server to record the last task-run states


async def flow_runs_named(names: list[str]) -> tuple[dict[str, Any], dict[Any, list[Any]]]:
    """The produce-video runs of these jobs (a run is named after its job) by name, and their task runs by run id."""
    from prefect import get_client
    from prefect.client.schemas.filters import (
        FlowRunFilter,
        FlowRunFilterName,
        TaskRunFilter,
        TaskRunFilterFlowRunId,
    )
    from prefect.client.schemas.sorting import TaskRunSort

    runs: dict[str, Any] = {}
    task_runs: dict[Any, list[Any]] = {}
    async with get_client() as client:
        for start in range(0, len(names), PAGE):
            chunk = names[start:start + PAGE]
            found = await client.read_flow_runs(flow_run_filter=FlowRunFilter(name=FlowRunFilterName(any_=chunk)),
                                                limit=PAGE)
            runs.update((run.name, run) for run in found)
            ids = [run.id for run in found]
            offset = 0
            while ids:
                page = await client.read_task_runs(task_run_filter=TaskRunFilter(
                    flow_run_id=TaskRunFilterFlowRunId(any_=ids)), sort=TaskRunSort.ID_DESC, limit=PAGE, offset=offset)
                for task_run in page:
                    task_runs.setdefault(task_run.flow_run_id, []).append(task_run)
                if len(page) < PAGE:
                    break
                offset += PAGE
    return runs, task_runs


def _ends(task_runs: list[Any], prefix: str) -> list[float]:
    """End times (ms) of the task runs named `prefix`..., those that have one."""
    return [end for t in task_runs if t.name.startswith(prefix) and (end := _ms(t.end_time)) is not None]


def _recorded(task_runs: list[Any], steps: int) -> bool:
    """The server recorded the end of every step's wait and store (from their events, seconds late when busy)."""
    return len(_ends(task_runs, "wait-")) >= steps and len(_ends(task_runs, "store-")) >= steps


def _ms(moment: datetime | None) -> float | None:
    return None if moment is None else moment.timestamp() * 1000


def job_phases(run: Any, task_runs: list[Any], tasks: list[dict[str, Any]], seen_at: dict[str, int],
               wall_s: float) -> dict[str, float] | None:
    """One job's pieces in seconds (summed over its steps); None when a timestamp is missing."""
    created, started, ended = _ms(run.created), _ms(run.start_time), _ms(run.end_time)
    if created is None or started is None or ended is None or not tasks or not _recorded(task_runs, len(tasks)):
        return None  # every step's ends or nothing: a missing last one would make an earlier step's the last
    wait_end, store_end = max(_ends(task_runs, "wait-")), max(_ends(task_runs, "store-"))
    tasks = sorted(tasks, key=lambda task: task["created_at"])
    seen = [seen_at.get(task["task_id"]) for task in tasks]
    if any(moment is None for moment in seen):
        return None
    last_seen = float(seen[-1] or 0)
    hand_offs = sum(task["created_at"] - before for task, before in zip(tasks[1:], seen[:-1], strict=True))
    return {"subflow_start": (started - created) / 1000, "first_create": (tasks[0]["created_at"] - started) / 1000,
            "hand_offs": hand_offs / 1000, "end": (ended - last_seen) / 1000,
            "end_wait": (wait_end - last_seen) / 1000, "end_store": (store_end - wait_end) / 1000,
            "end_finish": (ended - store_end) / 1000, "outside": wall_s - (ended - created) / 1000}


def phases_per_step(entries: list[Any], stats: dict[str, Any], tag: str, steps: int) -> dict[str, float]:
    """Mean per step of each piece over the succeeded jobs of this run (tag), with how many jobs it covers."""
    done = [entry for entry in entries if entry.status == "succeeded" and entry.seconds is not None]
    runs, task_runs = asyncio.run(flow_runs_named([entry.job_id for entry in done]))
    for _ in range(RECORDER_WAITS):  # the task runs' last states may not be recorded yet
        if all(_recorded(task_runs.get(run.id, []), steps) for run in runs.values()):
            break
        time.sleep(2)
        runs, task_runs = asyncio.run(flow_runs_named([entry.job_id for entry in done]))
    by_job: dict[str, list[dict[str, Any]]] = {}
    for task_id, task in stats["tasks"].items():
        ext = task["external_task_id"] or ""
        if ext.startswith(f"{tag}-") and task["status"] == "succeed":
            by_job.setdefault(ext.rsplit("-s", 1)[0], []).append({**task, "task_id": task_id})
    measured = [phases for entry in done if entry.job_id in runs and (phases := job_phases(
        runs[entry.job_id], task_runs.get(runs[entry.job_id].id, []), by_job.get(entry.job_id, []),
        stats.get("final_seen_at", {}), entry.seconds))]
    if not measured:
        return {"jobs": 0}
    keys = ("subflow_start", "first_create", "hand_offs", "end", "end_wait", "end_store", "end_finish", "outside")
    return {"jobs": len(measured), **{key: round(sum(p[key] for p in measured) / len(measured) / steps, 3)
                                      for key in keys}}
