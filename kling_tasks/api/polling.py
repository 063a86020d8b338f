"""The wait policy: how often to poll a task and when to give up (DESIGN §3, reference §7, §15).

Learned schedule (when the caller passes an ``ExpectedLength``: what this account's earlier tasks of the same
kind, model, mode and duration took, on Kling's own clock). Kling's task lengths are predictable per kind, so
the wait polls rarely while the task cannot be done yet and densely when it is about to be: the *window* is
[shortest, longest] of the earlier lengths widened by the spread one more sample may add (range / (n - 1)),
measured from the task's ``created_at`` (or, once ``processing`` was seen, from its ``updated_at``: the
moment processing began, exact whenever it is observed). Before the window a poll every
``rare_share × expected length`` at most (a failed task is still noticed); inside it, one every
``2 × delay_share × expected length`` (mean detection delay ≈ ``delay_share`` of the length, floored at
``dense_min_interval``); past it (a slower task than ever seen) every ``min(dense, max_interval)``. A
server/client clock skew shifts the window by the skew: seconds against minutes-long tasks. bench/run.py
measures it against fixed intervals and the adaptive policy below.

Adaptive policy (no history: the first tasks of a kind, or no store). The interval is proportional to the
time the task has spent in its *current* status,
``interval = growth × time_in_status`` clamped to ``[min, max]`` (defaults 10 %, 5 s, 15 s), then jittered by
±20 % (clamped again) so many waiters do not poll in lock-step. A status change resets the clock, so the
first polls after ``submitted → processing`` are quick again. Why: Kling tasks take minutes (T2V ~5 min); a
fixed fast poll hammers the API, a fixed slow one detects late, and durations vary ~10× (1–10 min), so short
tasks are caught within seconds while long ones settle at ``max``. The cap is 15 s, not 30 s, because
bench/polling.py measured the 30 s cap detecting ~320 s tasks 9–19 s late for ~35 polls, while a 15 s cap
detects them 4–6 s late for about the same number (see bench/README.md for the current figures). Lower
``max``/``growth`` (KLING_POLL_MAX_SECONDS, ``PollPolicy.growth``) to trade polls for quicker detection.

Deadlines. Time in ``submitted`` (queued for an account slot) counts only against ``queue_timeout``; time
from the first ``processing`` observation counts against ``processing_timeout``. Transient poll errors
(retryable ones, after the client's own GET retries) are logged and polling continues until a deadline.

Unknown status words (a provider's ``queueing``, ``running``...) mean "in progress": only ``succeed`` and
``failed`` end a wait. Such a word is logged once per (task, word) at WARNING; before any ``processing`` was
seen it counts as queued (like ``submitted``), after it as processing.
"""

from __future__ import annotations

import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Literal

from kling_tasks.api.errors import KlingError, KlingProtocolError, TaskFailedError, WaitTimeoutError
from kling_tasks.api.models import TaskSnapshot

__all__ = ["ExpectedLength", "PollPolicy", "wait_for_task", "warn_unknown_status"]

log = logging.getLogger("kling_tasks.api.polling")

Sleep = Callable[[float], Awaitable[None]]
Clock = Callable[[], float]
OnUpdate = Callable[[TaskSnapshot], Awaitable[None]]
Phase = Literal["queued", "processing"]

_unknown_warned: set[tuple[str, str]] = set()  # (task_id, word) already logged, process-wide
_UNKNOWN_WARNED_MAX = 10_000


def warn_unknown_status(snap: TaskSnapshot) -> None:
    """Log a status word outside ``KNOWN_STATUSES`` once per (task, word), at WARNING."""
    if snap.is_known_status:
        return
    key = (snap.task_id, snap.task_status)
    if key in _unknown_warned:
        return
    if len(_unknown_warned) >= _UNKNOWN_WARNED_MAX:
        _unknown_warned.clear()
    _unknown_warned.add(key)
    log.warning(
        "task %s reports unknown status %r: treated as still in progress (external_task_id=%s)",
        snap.task_id,
        snap.task_status,
        snap.external_task_id,
    )


def _phase(status: str, processing_seen: bool) -> Phase:
    """Whose deadline runs: ``submitted`` is queued, ``processing`` is processing, an unknown word follows
    what came before it (queued until a ``processing`` was seen)."""
    if status == "submitted":
        return "queued"
    if status == "processing" or processing_seen:
        return "processing"
    return "queued"


@dataclass(frozen=True)
class PollPolicy:
    min_interval: float = 5.0
    max_interval: float = 15.0
    growth: float = 0.10  # interval = growth × time spent in the current status
    jitter: float = 0.20  # ± fraction
    processing_timeout: float = 1800.0
    queue_timeout: float = 3600.0
    # The learned schedule (see the module docstring); used only when the wait is given an ExpectedLength.
    delay_share: float = 0.02  # target mean detection delay, as a share of the expected length
    rare_share: float = 0.5  # at most this share of the expected length between polls before the window
    dense_min_interval: float = 2.0  # never denser than this, however short the task
    rng: random.Random = field(default_factory=random.Random, compare=False, repr=False)

    def interval(self, time_in_status: float) -> float:
        base = min(self.max_interval, max(self.min_interval, self.growth * time_in_status))
        jittered = base * (1.0 + self.rng.uniform(-self.jitter, self.jitter))
        return min(self.max_interval, max(self.min_interval, jittered))


@dataclass(frozen=True)
class ExpectedLength:
    """Seconds earlier tasks of this kind/model/mode/duration spent queued and processing (Kling's clock),
    oldest first, one pair per task. Plain data: the store that learns it lives outside the client layer."""

    queued: tuple[float, ...]
    processing: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.queued) != len(self.processing) or not self.processing:
            raise ValueError("ExpectedLength needs one (queued, processing) pair per earlier task, at least one")
        if min(self.queued) < 0 or min(self.processing) <= 0:
            raise ValueError("ExpectedLength needs queued >= 0 and processing > 0 seconds")

    def _window(self, values: tuple[float, ...]) -> tuple[float, float]:
        """[shortest, longest] widened both ways by the spread one more sample may add beyond them (the range
        over n - 1: the gap between order statistics), at least 2 % of the value; ±20 % for a single sample."""
        lo, hi = min(values), max(values)
        if len(values) == 1:
            return lo * 0.8, hi * 1.2
        margin = max((hi - lo) / (len(values) - 1), 0.02 * hi)
        return max(0.0, lo - margin), hi + margin

    @property
    def total_window(self) -> tuple[float, float]:
        return self._window(tuple(q + p for q, p in zip(self.queued, self.processing, strict=True)))

    @property
    def processing_window(self) -> tuple[float, float]:
        return self._window(self.processing)

    @property
    def typical_total(self) -> float:
        totals = sorted(q + p for q, p in zip(self.queued, self.processing, strict=True))
        return totals[len(totals) // 2]


@dataclass
class _Schedule:
    """When to poll next under the learned schedule; times on the caller's (monotonic) clock."""

    policy: PollPolicy
    expected: ExpectedLength
    created: float | None = None  # the task's created_at mapped onto the caller's clock
    processing_started: float | None = None  # its updated_at when `processing` was first seen

    def observe(self, snap: TaskSnapshot, now: float, wall_now: float) -> None:
        def mapped(ms: int) -> float:
            return now - max(0.0, wall_now - ms / 1000) if ms > 0 else now

        if self.created is None:
            self.created = mapped(snap.created_at)
        if snap.task_status == "processing" and self.processing_started is None:
            self.processing_started = mapped(snap.updated_at)

    def interval(self, now: float) -> float:
        typical = self.expected.typical_total
        dense = max(self.policy.dense_min_interval, 2 * self.policy.delay_share * typical)
        rare = max(self.policy.max_interval, self.policy.rare_share * typical)
        p_lo, p_hi = self.expected.processing_window
        if self.processing_started is not None:
            lo, hi = self.processing_started + p_lo, self.processing_started + p_hi
        else:  # still queued (or never seen): processing takes at least p_lo from now on
            t_lo, t_hi = self.expected.total_window
            created = self.created if self.created is not None else now
            lo, hi = max(created + t_lo, now + p_lo), max(created + t_hi, now + p_hi)
        if now < lo:
            early = (lo - now) * (1.0 - self.policy.rng.uniform(0.0, 0.05))  # never past the window's start
            return max(self.policy.dense_min_interval, min(early, rare * (1.0 + self.policy.rng.uniform(-0.1, 0.0))))
        if now <= hi:
            return dense
        return min(dense, self.policy.max_interval)


async def wait_for_task(
    get: Callable[[], Awaitable[TaskSnapshot]],
    *,
    policy: PollPolicy,
    sleep: Sleep,
    clock: Clock = time.monotonic,
    on_update: OnUpdate | None = None,
    task_id: str | None = None,
    expected: ExpectedLength | None = None,
    wall_clock: Clock = time.time,
) -> TaskSnapshot:
    """Poll ``get`` until the task is terminal; return the ``succeed`` snapshot (with at least one video).

    ``expected``: earlier lengths of such tasks (the learned schedule); None polls adaptively. ``wall_clock``
    maps Kling's epoch timestamps onto ``clock``.

    Raises TaskFailedError on ``failed``, WaitTimeoutError (with the last snapshot) past a deadline,
    KlingProtocolError on ``succeed`` without videos, and any non-retryable error from ``get`` at once.
    """
    last: TaskSnapshot | None = None
    status = "submitted"  # assumed until the first snapshot says otherwise
    phase: Phase = "queued"
    status_since = clock()
    queued = 0.0  # seconds spent in queued phases (`submitted`, or an unknown word before `processing`)
    processing_since: float | None = None
    last_call: Phase | None = None  # the phase whose deadline the current sleep runs up to
    schedule = _Schedule(policy, expected) if expected is not None else None

    while True:
        now = clock()
        try:
            snap = await get()
        except KlingError as exc:
            if not exc.retryable:
                raise
            log.warning("transient error polling task %s, will keep polling: %s", task_id, exc)
        else:
            now = clock()
            if schedule is not None:
                schedule.observe(snap, now, wall_clock())
            if last is None or snap.task_status != last.task_status:
                if phase == "queued":
                    queued += now - status_since
                if snap.task_status == "processing" and processing_since is None:
                    processing_since = now
                status, status_since = snap.task_status, now
                phase = _phase(status, processing_since is not None)
                log.info("task %s is %s", snap.task_id, snap.task_status)
                warn_unknown_status(snap)
                if on_update is not None:
                    await on_update(snap)
            last = snap
            if snap.task_status == "succeed":
                if not snap.videos:
                    raise KlingProtocolError(
                        "task succeeded without any video in task_result",
                        request_id=snap.request_id,
                        task_id=snap.task_id,
                        external_task_id=snap.external_task_id,
                    )
                return snap
            if snap.task_status == "failed":
                raise TaskFailedError(snap)

        # Deadlines: only the clock of the current phase runs.
        if phase == "queued":
            spent, limit = queued + (now - status_since), policy.queue_timeout
        else:
            assert processing_since is not None
            spent, limit = now - processing_since, policy.processing_timeout
        remaining = limit - spent
        if remaining <= 0 or last_call == phase:
            raise WaitTimeoutError(
                f"task still {status} after {spent:.0f} s {phase} (limit {limit:.0f} s)",
                snapshot=last,
                task_id=task_id,
            )
        # Never sleep past the deadline: one last poll right at it, then give up. (A flag, not a float
        # comparison: `now + tiny remaining` can round back to `now` and never reach the deadline.)
        interval = schedule.interval(now) if schedule is not None else policy.interval(now - status_since)
        if interval >= remaining:
            interval, last_call = remaining, phase
        await sleep(interval)
