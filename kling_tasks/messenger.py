"""Delivers the ledger's news to its observers on a thread of its own, in order.

A paid step must never wait for an observer: publishing an artifact is two calls to the Prefect API, and a busy
server answers in hundreds of milliseconds. The ledger hands each notification over and goes on; this thread
tells the observers. An observer whose `coalesce` is true (the artifacts: they show the whole ledger) gets only
the newest of several `changed` waiting in a row; every other observer (events: one per transition) gets all.
"""

from __future__ import annotations

import contextvars
import logging
import queue
import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)


@dataclass
class _Note:
    hook: str
    args: tuple[Any, ...]
    done: threading.Event | None = field(default=None)  # set once every note before it was delivered


class Messenger:
    def __init__(self, observers: Sequence[object], on_error: Callable[[str, Exception], None]) -> None:
        self.observers = list(observers)
        self.on_error = on_error
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
            batch = [self._notes.get()]
            while True:
                try:
                    batch.append(self._notes.get_nowait())
                except queue.Empty:
                    break
            for observer in self.observers:
                for position, note in enumerate(batch):
                    if note.done is not None or self._superseded(observer, batch, position):
                        continue
                    try:
                        getattr(observer, note.hook)(*note.args)
                    except Exception as exc:  # observability must never fail (and so re-pay) a step
                        self.on_error(f"publishing the job's {note.hook} state ({type(observer).__name__})", exc)
            for note in batch:
                if note.done is not None:
                    note.done.set()

    @staticmethod
    def _superseded(observer: object, batch: list[_Note], position: int) -> bool:
        following = batch[position + 1] if position + 1 < len(batch) else None
        return (getattr(observer, "coalesce", False) and batch[position].hook == "changed"
                and following is not None and following.hook == "changed")
