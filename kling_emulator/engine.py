"""Task state: creation, the submitted -> processing -> succeed|failed lifecycle, rendering, stats, persistence.

Time drives the lifecycle: each task gets its queue and processing durations at creation (the reference's
typical latencies times --time-scale). A ticker advances statuses, so callbacks fire and concurrency slots
free without anyone polling; reads advance the task they touch too, so they never see a stale status.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import secrets
import threading
import time
import uuid
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from kling_emulator import catalog, render
from kling_emulator.errors import ApiError, bad_param

log = logging.getLogger(__name__)
ACTIVE = ("submitted", "processing")


@dataclass
class Task:
    task_id: str
    kind: str
    model: str
    mode: str
    aspect_ratio: str
    external_task_id: str | None
    segments: list[int]  # frame counts; an extension is its parent's segments plus one
    created_at: int  # ms
    updated_at: int
    queued_until: float  # epoch seconds
    done_at: float
    expires_at: float
    price: float
    video_id: str
    status: str = "submitted"
    status_msg: str = ""
    fail_message: str | None = None  # set by a task_fail fault: the task will end failed
    parent_video_id: str | None = None
    parent_duration: str | None = None
    callback_url: str | None = None
    rendered: bool = False
    watermark: bool = False  # watermark_info.enabled as requested (the emulator does not draw a mark)
    image_sha256: str | None = None  # image2video: the decoded bytes of a base64 `image` it was given
    sound: bool = False  # `sound: on`: the video has an audio track

    @property
    def duration(self) -> str:
        return render.seconds_label(sum(self.segments))

    def to_api(self, base_url: str) -> dict[str, Any]:
        info: dict[str, Any] = {}
        if self.external_task_id is not None:
            info["external_task_id"] = self.external_task_id
        if self.parent_video_id is not None:
            info["parent_video"] = {"id": self.parent_video_id, "duration": self.parent_duration,
                                    "url": f"{base_url}/_files/{self.parent_video_id}.mp4"}
        result: dict[str, Any] = {}
        if self.status == "succeed":
            url = f"{base_url}/_files/{self.video_id}.mp4"
            mark = url if self.watermark else ""
            result["videos"] = [{"id": self.video_id, "url": url, "watermark_url": mark, "duration": self.duration}]
        return {
            "task_id": self.task_id, "task_status": self.status, "task_status_msg": self.status_msg,
            "task_info": info, "task_result": result, "watermark_info": {"enabled": self.watermark},
            "final_unit_deduction": f"{self.price:g}" if self.status == "succeed" else "0",
            "created_at": self.created_at, "updated_at": self.updated_at,
        }


@dataclass
class Stats:
    requests: Counter[str] = field(default_factory=Counter)
    create_attempts: Counter[str] = field(default_factory=Counter)
    polls: Counter[str] = field(default_factory=Counter)
    downloads: Counter[str] = field(default_factory=Counter)
    download_bytes: Counter[str] = field(default_factory=Counter)  # body bytes handed to the connection
    faults_fired: Counter[str] = field(default_factory=Counter)  # per fault kind
    # task_id -> ms of the first single-task answer (a poll, a lookup) that showed it ended: a client's
    # detection delay is this minus the task's updated_at
    final_seen_at: dict[str, int] = field(default_factory=dict)
    concurrency_high_water: int = 0


class Engine:
    def __init__(self, *, time_scale: float, concurrency: int, resolution: str, result_ttl_seconds: float,
                 state_dir: Path | None, files_dir: Path):
        self.time_scale, self.concurrency, self.resolution = time_scale, concurrency, resolution
        self.ttl = result_ttl_seconds
        self.state_file = state_dir / "tasks.json" if state_dir else None
        self.files = files_dir
        self.files.mkdir(parents=True, exist_ok=True)
        self.lock = threading.RLock()
        self.tasks: dict[str, Task] = {}
        self.stats = Stats()
        self.renderer = ThreadPoolExecutor(max_workers=2, thread_name_prefix="emulator-render")
        self.changes: list[Task] = []  # snapshots taken at each status change, waiting for their callbacks
        self._load()

    # --- lookups ---------------------------------------------------------------------------------------------
    def find(self, kind: str, ident: str, by_external: bool = True) -> Task | None:
        """By task_id, then (unless `by_external` is off) by external_task_id: the newest task carrying it, as
        there can be several when unique external ids are not enforced (reference §3.6)."""
        with self.lock:
            task = self.tasks.get(ident)
            if task is None and by_external:
                # max() keeps the first of equal timestamps: walking backwards, that is the one created last.
                task = max((t for t in reversed(self.tasks.values()) if t.external_task_id == ident),
                           key=lambda t: t.created_at, default=None)
            if task is None or task.kind != kind:
                return None
            self._advance(task, time.time())
            return task

    def by_video(self, video_id: str) -> Task | None:
        with self.lock:
            return next((t for t in self.tasks.values() if t.video_id == video_id), None)

    def running(self) -> int:
        return sum(1 for t in self.tasks.values() if t.status in ACTIVE)

    # --- creation --------------------------------------------------------------------------------------------
    def create(self, kind: str, *, model: str, mode: str, aspect_ratio: str, frames: list[int], price: float,
               external_task_id: str | None, callback_url: str | None, fail_message: str | None,
               parent: Task | None = None, watermark: bool = False, unique_external_id: bool = True,
               start_image: bytes | None = None, sound: bool = False) -> Task:
        with self.lock:
            if unique_external_id and external_task_id is not None and any(
                t.external_task_id == external_task_id for t in self.tasks.values()
            ):
                raise bad_param(f"external_task_id {external_task_id} already exists")
            if self.running() >= self.concurrency:
                raise ApiError(429, 1303, "parallel task over resource pack limit")
            now = time.time()
            latency = catalog.LATENCY[kind] * self.time_scale * random.uniform(0.9, 1.1)
            task = Task(
                task_id=str(secrets.randbelow(9 * 10**17) + 10**17), kind=kind, model=model, mode=mode,
                aspect_ratio=aspect_ratio, external_task_id=external_task_id, segments=frames,
                created_at=int(now * 1000), updated_at=int(now * 1000),
                queued_until=now + latency * catalog.QUEUED_SHARE, done_at=now + latency,
                expires_at=now + self.ttl, price=price, video_id=str(uuid.uuid4()), fail_message=fail_message,
                parent_video_id=parent.video_id if parent else None,
                parent_duration=parent.duration if parent else None, callback_url=callback_url,
                watermark=watermark,
                image_sha256=hashlib.sha256(start_image).hexdigest() if start_image is not None else None,
                sound=sound,
            )
            if start_image is not None:  # kept beside the video: a restart (--state-dir) renders it again
                self.start_path_of(task.video_id).write_bytes(start_image)
            self.tasks[task.task_id] = task
            self.stats.concurrency_high_water = max(self.stats.concurrency_high_water, self.running())
            self._save()
        if fail_message is None:
            self.renderer.submit(self._render, task, parent)
        return task

    def _render(self, task: Task, parent: Task | None) -> None:
        spec = render.spec_for(self.resolution, task.aspect_ratio)
        out = self.path_of(task.video_id)
        try:
            start = self.start_path_of(task.video_id)
            if parent is None and start.exists():  # image2video of a given picture: it starts as that picture
                picture = render.start_picture(start.read_bytes(), spec)
                render.render_segments(out, task.segments, spec, render.far_segment(picture, spec), start=picture,
                                       sound=task.sound)
            elif parent is None:
                render.render_segments(out, task.segments, spec, sound=task.sound)
            else:
                render.extend_file(self.path_of(parent.video_id), out, parent.segments, task.segments[-1], spec)
        except Exception:
            log.exception("rendering task %s failed", task.task_id)
            with self.lock:
                task.fail_message = "internal render error"
            return
        with self.lock:
            task.rendered = True
            self._save()  # so a restart (--state-dir) knows the file is complete
            self._advance(task, time.time())

    def path_of(self, video_id: str) -> Path:
        return self.files / f"{video_id}.mp4"

    def start_path_of(self, video_id: str) -> Path:
        return self.files / f"{video_id}.start"

    def count(self, counter: str, key: str, amount: int = 1) -> None:
        """Add to one of the Stats counters (e.g. "downloads", "download_bytes")."""
        with self.lock:
            getattr(self.stats, counter)[key] += amount

    def answered(self, task: Task) -> None:
        """A single-task answer is going out: note when a client first saw the task ended."""
        with self.lock:
            self.stats.polls[task.task_id] += 1
            if task.status not in ACTIVE and task.task_id not in self.stats.final_seen_at:
                self.stats.final_seen_at[task.task_id] = int(time.time() * 1000)

    # --- lifecycle -------------------------------------------------------------------------------------------
    def tick(self) -> list[Task]:
        """Advance every active task; returns one snapshot per status change since the last tick, in order."""
        now = time.time()
        with self.lock:
            for task in self.tasks.values():
                if task.status in ACTIVE:
                    self._advance(task, now)
            changed, self.changes = self.changes, []
        return changed

    def _advance(self, task: Task, now: float) -> None:
        changed = False
        if task.status == "submitted" and now >= task.queued_until:
            self._change(task, "processing", now)
            changed = True
        if task.status == "processing" and now >= task.done_at:
            if task.fail_message is not None:
                task.status_msg = task.fail_message
                self._change(task, "failed", now)
                changed = True
            elif task.rendered:
                self._change(task, "succeed", now)
                changed = True
        if changed:
            self._save()

    def _change(self, task: Task, status: str, now: float) -> None:
        # A snapshot per transition: a task passing both in one step still announces `processing`, and each
        # callback carries the status it announces, not whatever the task has reached by the time it is sent.
        task.status, task.updated_at = status, int(now * 1000)
        self.changes.append(replace(task, segments=list(task.segments)))

    def expired(self, task: Task) -> bool:
        return time.time() >= task.expires_at

    def credits_charged(self) -> float:
        return sum(t.price for t in self.tasks.values() if t.status == "succeed")

    def reset(self) -> None:
        with self.lock:
            self.tasks.clear()
            self.changes.clear()  # no callbacks for tasks that no longer exist
            self.stats = Stats()
            self._save()

    # --- persistence (--state-dir) ---------------------------------------------------------------------------
    def _save(self) -> None:
        if self.state_file is None:
            return
        tmp = self.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps([asdict(t) for t in self.tasks.values()]))
        os.replace(tmp, self.state_file)

    def _load(self) -> None:
        if self.state_file is None or not self.state_file.exists():
            return
        for record in json.loads(self.state_file.read_text()):
            task = Task(**record)
            self.tasks[task.task_id] = task
        # A task whose file was not finished when the emulator stopped is rendered again (Kling's own tasks
        # don't fail because a client restarted); its timing is absolute, so it keeps its place in time.
        for task in self.tasks.values():
            if task.status in ACTIVE and not task.rendered and task.fail_message is None:
                parent = self.by_video(task.parent_video_id) if task.parent_video_id else None
                self.renderer.submit(self._render, task, parent)

    def snapshot_stats(self) -> dict[str, Any]:
        with self.lock:
            created: defaultdict[str, int] = defaultdict(int)
            for t in self.tasks.values():
                if t.external_task_id is not None:
                    created[t.external_task_id] += 1
            return {
                "requests": dict(self.stats.requests),
                "create_attempts": dict(self.stats.create_attempts),
                "tasks_created": dict(created),
                "tasks": {t.task_id: {"kind": t.kind, "status": t.status, "external_task_id": t.external_task_id,
                                      "created_at": t.created_at, "updated_at": t.updated_at,
                                      "video_id": t.video_id, "image_sha256": t.image_sha256}
                          for t in self.tasks.values()},
                "polls": dict(self.stats.polls),
                "concurrency_high_water": self.stats.concurrency_high_water,
                "credits_charged": self.credits_charged(),
                "downloads": dict(self.stats.downloads),
                "download_bytes": dict(self.stats.download_bytes),
                "faults_fired": dict(self.stats.faults_fired),
                "final_seen_at": dict(self.stats.final_seen_at),
            }
