"""Counts what this process asks of the Prefect server: HTTP calls by route, events by name, log batches.

bench/overhead.py divides the counts by the steps run, so each result carries the per-step budget of Prefect
calls next to the CPU they cost. Counting wraps httpx's send (sync and async clients), Prefect's events worker
and its API log worker: a dict increment per call, cheap beside the call itself.
"""

from __future__ import annotations

import re
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}|(?<=/name/)[^/]+")


def route(method: str, path: str, api_path: str) -> str:
    """`PATCH /artifacts/{id}`: the API route of a request, ids (and names of by-name routes) folded."""
    return f"{method} {_ID.sub('{id}', path.removeprefix(api_path))}"


def event_kind(name: str) -> str:
    """`prefect.task-run.Running` -> `prefect.task-run.*`; `kling.task.submitted` stays as it is."""
    if name.startswith("prefect."):
        return ".".join(name.split(".")[:2]) + ".*"
    return name


class Counts:
    def __init__(self) -> None:
        self.http: Counter[str] = Counter()
        self.events: Counter[str] = Counter()
        self.log_batches = 0
        self.log_records = 0

    def snapshot(self) -> dict[str, Any]:
        return {"http": dict(self.http), "events": dict(self.events), "log_batches": self.log_batches,
                "log_records": self.log_records}


def per_step(before: dict[str, Any], after: dict[str, Any], steps: int) -> dict[str, Any]:
    """(after - before) / steps, by kind, and the totals: what one step asked of the Prefect server."""
    def diff(name: str) -> dict[str, float]:
        keys = set(after[name]) | set(before[name])
        out = {k: round((after[name].get(k, 0) - before[name].get(k, 0)) / steps, 2) for k in sorted(keys)}
        return {k: v for k, v in sorted(out.items(), key=lambda kv: -kv[1]) if v}

    http, events = diff("http"), diff("events")
    return {"http_total": round(sum(http.values()), 2), "events_total": round(sum(events.values()), 2),
            "log_batches": round((after["log_batches"] - before["log_batches"]) / steps, 2),
            "log_records": round((after["log_records"] - before["log_records"]) / steps, 2),
            "http": http, "events": events}


@contextmanager
def counting(api_url: str) -> Iterator[Counts]:
    import httpx
    from prefect.events.worker import EventsWorker
    from prefect.logging.handlers import APILogWorker

    counts = Counts()
    api_path = httpx.URL(api_url).path.rstrip("/")
    host = httpx.URL(api_url).netloc

    def note(request: httpx.Request) -> None:
        if request.url.netloc == host:
            counts.http[route(request.method, request.url.path, api_path)] += 1

    sync_send, async_send = httpx.Client.send, httpx.AsyncClient.send
    events_send, logs_batch = EventsWorker.send, APILogWorker._handle_batch

    def send(self: httpx.Client, request: httpx.Request, **kwargs: Any) -> httpx.Response:
        note(request)
        return sync_send(self, request, **kwargs)

    async def asend(self: httpx.AsyncClient, request: httpx.Request, **kwargs: Any) -> httpx.Response:
        note(request)
        return await async_send(self, request, **kwargs)

    def send_event(self: EventsWorker, event: Any) -> None:
        counts.events[event_kind(event.event)] += 1
        events_send(self, event)

    async def handle_logs(self: APILogWorker, items: list[bytes]) -> None:
        counts.log_batches += 1
        counts.log_records += len(items)
        await logs_batch(self, items)

    httpx.Client.send, httpx.AsyncClient.send = send, asend  # type: ignore[method-assign,assignment]
    EventsWorker.send = send_event  # type: ignore[method-assign]
    APILogWorker._handle_batch = handle_logs  # type: ignore[method-assign]
    try:
        yield counts
    finally:
        httpx.Client.send, httpx.AsyncClient.send = sync_send, async_send  # type: ignore[method-assign]
        EventsWorker.send = events_send  # type: ignore[method-assign]
        APILogWorker._handle_batch = logs_batch  # type: ignore[method-assign]
