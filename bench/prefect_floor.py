"""The CPU a step cannot go below on this machine: Prefect's own cost of the runs a step is made of.

A step is three task runs (submit, wait, store: DESIGN 2.6, each with its own cache key and persisted result)
and its share of its job's subflow run. Here the same shapes run with nothing inside: N empty task runs with
the steps' options (a cache key, a JSON result persisted), and N empty subflow runs started as a batch starts
its jobs (no heartbeat thread, parameters not validated again), `CONCURRENT` at a time, in this process and
against the same Prefect server as the overhead benchmark. Their CPU per run is what Prefect's engine costs
in the worker before the pipeline does any work.
"""

from __future__ import annotations

import asyncio
import time
import uuid
from typing import Any

CONCURRENT = 8


async def _cpu_per_call(calls: list[Any]) -> float:
    """CPU milliseconds per awaited call, CONCURRENT at a time."""
    gate = asyncio.Semaphore(CONCURRENT)

    async def one(call: Any) -> None:
        async with gate:
            await call()

    start = time.process_time()
    await asyncio.gather(*(one(call) for call in calls))
    return round((time.process_time() - start) / max(1, len(calls)) * 1000, 1)


def measure(runs: int = 100, steps_per_job: int = 2) -> dict[str, Any]:
    from prefect import flow, task
    from prefect.context import TaskRunContext

    from kling_tasks.prefect_api import jobs_in_this_process

    nonce = uuid.uuid4().hex[:8]

    def key(_: TaskRunContext, parameters: dict[str, Any]) -> str:
        return f"bench-floor-{nonce}-{parameters['index']}"

    @task(name="empty-step-task", cache_key_fn=key, persist_result=True, result_serializer="json")
    async def empty_task(index: int) -> dict[str, int]:
        return {"index": index}

    @flow(name="empty-job")
    async def empty_job(index: int) -> int:
        return index

    @flow(name="bench-prefect-floor")
    async def floor() -> dict[str, float]:
        await _cpu_per_call([lambda i=i: empty_task(-1 - i) for i in range(CONCURRENT)])  # warm
        task_ms = await _cpu_per_call([lambda i=i: empty_task(i) for i in range(runs)])
        job = empty_job.with_options(validate_parameters=False)
        async with jobs_in_this_process():
            subflow_ms = await _cpu_per_call([lambda i=i: job(i) for i in range(runs)])
        return {"task_run_ms": task_ms, "subflow_run_ms": subflow_ms}

    figures = asyncio.run(floor())
    return {"runs": runs, "concurrent": CONCURRENT, **figures,
            "per_step_ms": round(3 * figures["task_run_ms"] + figures["subflow_run_ms"] / steps_per_job, 1)}
