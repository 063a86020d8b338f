"""Delivers the ledger's news to its observers on a thread of its own, in order.

A paid step must never wait for an observer: publishing an artifact is two calls to the Prefect API, and a busy
server answers in hundreds of milliseconds. The ledger hands each notification over and goes on; this thread
tells the observers. An observer whose `coalesce` is true (the artifacts: they show the whole ledger) gets only
the newest of several `changed` waiting in a row (and none just before `failed` or `finished`, which show the
ledger themselves); every other observer (events: one per transition) gets all.

An observer may also set `min_interval` (seconds): its `changed` is then told at most that often, the newest one
held back until its time comes (a job's end or failure is told at once, and a `flush()` returns only once what
was held has been told: a job's last picture is complete). Each artifact write costs the worker and the Prefect
server CPU; a step makes ~5 ledger changes within about a second, and a progress bar needs one picture a second.
"""

from __future__ import annotations

import contextvars
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)


# Hooks that hand a coalescing observer the whole ledger: each supersedes a `changed` waiting before it.
_WHOLE_LEDGER = ("changed", "failed", "finished")


@dataclass
class _Note:
    hook: str
    args: tuple[Any, ...]
    done: threading.Event | None = field(default=None)  # set once every note before it was delivered


class Messenger:
    def __init__(self, observers: Sequence[object], on_error: Callable[[str, Exception], None],
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.observers = list(observers)
        self.on_error = on_error
        self.clock = clock
        # Per observer with a min_interval: the newest `changed` held back, when it may go, when the last went.
        self._held: dict[int, _Note] = {}
        self._told_at: dict[int, float] = {}
        self._notes: queue.SimpleQueue[_Note] = queue.SimpleQueue()
        # The thread runs in a copy of the creator's context: Prefect's run context (events relate to the
        # flow run, logs go to it) follows the notifications.
        context = contextvars.copy_context()
        self._thread = threading.Thread(target=context.run, args=(self._deliver,), name="ledger-observers",
                                        daemon=True)
        self._thread.start()

    def tell(self, hook: str, *args: Any) -> None:
        self._notes.put(_Note(hook, args))

    def flush(self, timeout: float = 120.0) -> None:
        """Wait until everything told so far has been delivered (the end of a job: artifacts are complete)."""
        done = threading.Event()
        self._notes.put(_Note("", (), done))
        if not done.wait(timeout):
            logger.warning("observers of the ledger did not catch up within %.0f s", timeout)

    def _deliver(self) -> None:
        while True:
            batch = self._next_batch()
            for index, observer in enumerate(self.observers):
                interval = float(getattr(observer, "min_interval", 0.0) or 0.0)
                for position, note in enumerate(batch):
                    if note.done is not None:
                        self._tell_held(index, observer)
                    elif self._superseded(observer, batch, position):
                        continue
                    elif note.hook == "changed" and interval > 0:
                        self._held[index] = note
                        if self.clock() - self._told_at.get(index, -float("inf")) >= interval:
                            self._tell_held(index, observer)
                    else:
                        if getattr(observer, "coalesce", False) and note.hook in _WHOLE_LEDGER:
                            self._held.pop(index, None)  # this hook shows the newer ledger itself
                        self._tell_held(index, observer)
                        self._tell(index, observer, note)
                if index in self._held and self.clock() >= self._told_at.get(index, 0.0) + interval:
                    self._tell_held(index, observer)
            for note in batch:
                if note.done is not None:
                    note.done.set()

    def _next_batch(self) -> list[_Note]:
        """Everything waiting; blocks until a note comes or a held change falls due (then maybe nothing)."""
        due = [self._told_at.get(index, 0.0) + float(getattr(self.observers[index], "min_interval", 0.0) or 0.0)
               for index in self._held]
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

    def _tell_held(self, index: int, observer: object) -> None:
        held = self._held.pop(index, None)
        if held is not None:
            self._tell(index, observer, held)

    def _tell(self, index: int, observer: object, note: _Note) -> None:
        self._told_at[index] = self.clock()
        try:
            getattr(observer, note.hook)(*note.args)
        except Exception as exc:  # observability must never fail (and so re-pay) a step
            self.on_error(f"publishing the job's {note.hook} state ({type(observer).__name__})", exc)

    @staticmethod
    def _superseded(observer: object, batch: list[_Note], position: int) -> bool:
        following = batch[position + 1] if position + 1 < len(batch) else None
        return (getattr(observer, "coalesce", False) and batch[position].hook == "changed"
                and following is not None and following.hook in _WHOLE_LEDGER)
