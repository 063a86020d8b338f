"""The CLI's live view of a run: one row per step with its Kling status and elapsed time (on stderr)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from types import TracebackType
from typing import Self

from rich.console import Console
from rich.live import Live
from rich.table import Table

from kling_tasks.jobs import Plan
from kling_tasks.progress import Notice, subscribe


@dataclass
class _Row:
    name: str
    status: str = "pending"
    since: float | None = None
    until: float | None = None
    info: str = ""


class _LiveTable:
    """A rich table on stderr, redrawn from the progress notices while the `with` block runs."""

    live: Live

    def _on_notice(self, notice: Notice) -> None:
        raise NotImplementedError

    def _render(self) -> Table:
        raise NotImplementedError

    def __enter__(self) -> Self:
        self._unsubscribe = subscribe(self._on_notice)
        self.live.__enter__()
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self._unsubscribe()
        self.live.update(self._render())
        self.live.__exit__(exc_type, exc, tb)
        if not self.live.console.is_terminal:
            # rich ends the table's last line only on a terminal: in a log or a pipe, the next line (the run's
            # one-line error) would otherwise be glued to the table's bottom border.
            self.live.console.line()


class LiveProgress(_LiveTable):
    def __init__(self, plan: Plan, console: Console):
        self.plan = plan
        self.started = time.monotonic()
        self.rows = {step.index: _Row(step.name) for step in plan.steps}
        self.live = Live(self._render(), console=console, refresh_per_second=4, transient=False)

    def _on_notice(self, notice: Notice) -> None:
        row = self.rows.get(notice.step_index)
        if row is None or notice.stage in ("planned", "done"):
            return
        row.status = notice.stage
        row.since = row.since or time.monotonic()
        row.until = time.monotonic() if notice.stage == "stored" else None
        if notice.detail.get("task_id"):
            row.info = f"task {notice.detail['task_id']}" + (" (adopted)" if notice.detail.get("adopted") else "")
        if notice.detail.get("uri"):
            row.info = notice.detail["uri"]
        self.live.update(self._render())

    def _render(self) -> Table:
        total = len(self.plan.steps)
        table = Table(title=f"job {self.plan.job_id}  ({time.monotonic() - self.started:.0f} s)")
        for column in ("step", "name", "kling status", "elapsed", ""):
            table.add_column(column)
        for index, row in self.rows.items():
            elapsed = f"{(row.until or time.monotonic()) - row.since:.0f} s" if row.since else ""
            table.add_row(f"{index + 1} of {total}", row.name, row.status, elapsed, row.info)
        return table


@dataclass
class _JobRow:
    total: int
    step: int = 0
    status: str = "pending"
    since: float | None = None
    until: float | None = None
    info: str = ""


class BatchProgress(_LiveTable):
    """One row per job of a batch: step i of N, Kling status, elapsed (on stderr)."""

    def __init__(self, plans: list[Plan], console: Console):
        self.started = time.monotonic()
        self.rows = {plan.job_id: _JobRow(total=len(plan.steps)) for plan in plans}
        self.live = Live(self._render(), console=console, refresh_per_second=2, transient=False)

    def _on_notice(self, notice: Notice) -> None:
        row = self.rows.get(notice.job_id)
        if row is None:
            return
        now = time.monotonic()
        row.since = row.since or now
        if notice.stage == "done":
            row.status, row.until, row.info = "done", now, str(notice.detail.get("uri") or "")
        elif notice.stage == "failed":
            row.status, row.until = "failed", now
        else:
            row.step, row.status = max(row.step, notice.step_index), notice.stage
        self.live.update(self._render())

    def _render(self) -> Table:
        table = Table(title=f"batch of {len(self.rows)} job(s)  ({time.monotonic() - self.started:.0f} s)")
        for column in ("job", "step", "kling status", "elapsed", ""):
            table.add_column(column)
        for job_id, row in self.rows.items():
            elapsed = f"{(row.until or time.monotonic()) - row.since:.0f} s" if row.since else ""
            table.add_row(job_id, f"{row.step + 1} of {row.total}", row.status, elapsed, row.info)
        return table
