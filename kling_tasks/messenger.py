"""Delivers the ledger's news to its observers on a thread of its own, in order.

A paid step must never wait for an observer: publishing an artifact is two calls to the Prefect API, and a busy
server answers in hundreds of milliseconds. The ledger hands each notification over and goes on; this thread
tells the observers. An observer whose `coalesce` is true (the artifacts: they show the whole ledger) gets only
the newest of several `changed` waiting in a row (and none just before `failed` or `finished`, which show the
ledger themselves); every other observer (events: one per transition) gets all.

An observer may also set `min_interval` (seconds): its `changed` is then held that long from the first change
that finds none held, and the newest change is told when that time comes, so it is told at most that often (a
change's followers, like a create's task id or a store right after a video succeeded, come within moments: one
write shows them all, where telling the first at once cost a second write for the rest). An observer with a
`quiet_interval` and an `is_quiet(*args)` holds a group of quiet changes only (a status word that moves no
progress) that long instead: they wait for the next change that matters, or go out on their own later.

A job's end or failure is told at once, and a `flush()` returns only once what was held has been told: a job's
last picture is complete. The interval also grows with the jobs open in this process, so that all of them
together are told at most WRITES_PER_SECOND changes a second: each artifact write costs the worker and the
Prefect server CPU, and 500 jobs in one process must not cost 10x what 50 do.

`close()` (the job's ledger is closed) tells what is held and ends the thread. `flushed()` is `flush()` for
the event loop.
"""

from __future__ import annotations

import asyncio
import contextvars
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)


FLUSH_TIMEOUT = 120.0  # seconds a job's end waits for its observers before it warns and goes on
WRITES_PER_SECOND = 5.0  # all open jobs' throttled observers together, at most (their interval stretches)

# Hooks that hand a coalescing observer the whole ledger: each supersedes a `changed` waiting before it.
_WHOLE_LEDGER = ("changed", "failed", "finished")


@dataclass
class _Note:
    hook: str
    args: tuple[Any, ...]
    done: Future[None] | None = field(default=None)  # done once every note before it was delivered


class Messenger:
    _open = 0  # open messengers with a throttled observer (a job's artifacts), in this process
    _open_lock = threading.Lock()

    def __init__(self, observers: Sequence[object], on_error: Callable[[str, Exception], None],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.observers = list(observers)
        self.on_error = on_error
        self.clock = clock
        # Per observer with a min_interval: the newest `changed` held back, and when the first of its group came.
        self._held: dict[int, _Note] = {}
        self._held_since: dict[int, float] = {}
        self._held_urgent: set[int] = set()  # held groups with a change that is not quiet
        self._notes: queue.SimpleQueue[_Note] = queue.SimpleQueue()
        self._closed = False
        self._throttled = any(float(getattr(o, "min_interval", 0.0) or 0.0) > 0 for o in self.observers)
        if self._throttled:
            with Messenger._open_lock:
                Messenger._open += 1
        # The thread runs in a copy of the creator's context: Prefect's run context (events relate to the
        # flow run, logs go to it) follows the notifications.
        context = contextvars.copy_context()
        self._thread = threading.Thread(target=context.run, args=(self._deliver,), name="ledger-observers",
                                        daemon=True)
        self._thread.start()

    @classmethod
    def open_count(cls) -> int:
        return cls._open

    def interval(self, observer: object) -> float:
        """How long `observer`'s changes are held: its min_interval, stretched to the process's write budget."""
        base = float(getattr(observer, "min_interval", 0.0) or 0.0)
        return max(base, Messenger._open / WRITES_PER_SECOND) if base > 0 else 0.0  # 500 jobs: 100 s

    def due(self, index: int) -> float:
        """When observer `index`'s held group is told: its interval from the first of it (longer if all quiet)."""
        observer = self.observers[index]
        interval = self.interval(observer)
        if index not in self._held_urgent:
            interval = max(interval, float(getattr(observer, "quiet_interval", 0.0) or 0.0))
        return self._held_since.get(index, 0.0) + interval

    def tell(self, hook: str, *args: Any) -> None:
        if not self._closed:
            self._notes.put(_Note(hook, args))

    def close(self) -> None:
        """No more news: what is held is told, then the thread ends (it does not wait for that)."""
        if not self._closed:
            self._closed = True
            self._notes.put(_Note("close", ()))

    def caught_up(self) -> Future[None]:
        """Done once everything told so far has been delivered (at once if the messenger is closed)."""
        done: Future[None] = Future()
        if self._closed:
            done.set_result(None)
        else:
            self._notes.put(_Note("", (), done))
        return done

    def flush(self, timeout: float = FLUSH_TIMEOUT) -> None:
        """Wait until everything told so far has been delivered (the end of a job: artifacts are complete)."""
        try:
            self.caught_up().result(timeout)
        except TimeoutError:
            logger.warning("observers of the ledger did not catch up within %.0f s", timeout)

    async def flushed(self, timeout: float = FLUSH_TIMEOUT) -> None:
        """flush() for the event loop: it waits without holding a thread of the loop's pool, which has few
        (a job's last artifact writes are round trips to a server that may be busy)."""
        try:
            await asyncio.wait_for(asyncio.wrap_future(self.caught_up()), timeout)
        except TimeoutError:
            logger.warning("observers of the ledger did not catch up within %.0f s", timeout)

    def _deliver(self) -> None:
        try:
            while self._deliver_batch():
                pass
        finally:
            if self._throttled:
                with Messenger._open_lock:
                    Messenger._open -= 1

    def _deliver_batch(self) -> bool:
        """Tell one batch of notes; False once the messenger was closed."""
        batch = self._next_batch()
        closing = any(note.hook == "close" for note in batch)
        for index, observer in enumerate(self.observers):
            interval = self.interval(observer)
            for position, note in enumerate(batch):
                if note.done is not None or note.hook == "close":
                    self._tell_held(index, observer)
                elif self._superseded(observer, batch, position):
                    continue
                elif note.hook == "changed" and interval > 0:
                    self._held_since.setdefault(index, self.clock())
                    self._held[index] = note
                    if index not in self._held_urgent and not self._quiet(observer, note):
                        # The group's first change that matters waits its interval for its followers (a
                        # success's store), however long quiet changes were held before it.
                        self._held_since[index] = self.clock()
                        self._held_urgent.add(index)
                else:
                    if getattr(observer, "coalesce", False) and note.hook in _WHOLE_LEDGER:
                        self._drop_held(index)  # this hook shows the newer ledger itself
                    self._tell_held(index, observer)
                    self._tell(observer, note)
            if index in self._held and self.clock() >= self.due(index):
                self._tell_held(index, observer)
        for note in batch:
            if note.done is not None:
                note.done.set_result(None)
        return not closing

    def _next_batch(self) -> list[_Note]:
        """Everything waiting; blocks until a note comes or a held change falls due (then maybe nothing)."""
        due = [self.due(index) for index in self._held]
        timeout = max(0.0, min(due) - self.clock()) if due else None
        try:
            batch = [self._notes.get(timeout=timeout)]
        except queue.Empty:
            return []
        while True:
            try:
                batch.append(self._notes.get_nowait())
            except queue.Empty:
                return batch

    def _drop_held(self, index: int) -> _Note | None:
        self._held_since.pop(index, None)
        self._held_urgent.discard(index)
        return self._held.pop(index, None)

    def _tell_held(self, index: int, observer: object) -> None:
        held = self._drop_held(index)
        if held is not None:
            self._tell(observer, held)

    def _tell(self, observer: object, note: _Note) -> None:
        try:
            getattr(observer, note.hook)(*note.args)
        except Exception as exc:  # observability must never fail (and so re-pay) a step
            self.on_error(f"publishing the job's {note.hook} state ({type(observer).__name__})", exc)

    @staticmethod
    def _quiet(observer: object, note: _Note) -> bool:
        is_quiet = getattr(observer, "is_quiet", None)
        return bool(is_quiet(*note.args)) if is_quiet is not None else False

    @staticmethod
    def _superseded(observer: object, batch: list[_Note], position: int) -> bool:
        following = batch[position + 1] if position + 1 < len(batch) else None
        return (getattr(observer, "coalesce", False) and batch[position].hook == "changed"
                and following is not None and following.hook in _WHOLE_LEDGER)
