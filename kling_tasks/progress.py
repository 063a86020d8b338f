"""In-process progress notices, so a front end (the CLI's live view) can follow a run without Prefect's API.

`ProgressFeed` observes the job's ledger and publishes a notice per step change; listeners subscribe.
Nothing here is required for a run: with no listener, notices vanish.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kling_tasks.manifest import Manifest

if TYPE_CHECKING:
    from kling_tasks.recorder import Transition
    from kling_tasks.storage import StoredObject

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Notice:
    job_id: str
    step_index: int
    step_name: str
    stage: str  # the step's ledger status, or Kling's own status word while it renders; "done" at the end
    detail: dict[str, Any] = field(default_factory=dict)


Listener = Callable[[Notice], None]
_listeners: list[Listener] = []


def subscribe(listener: Listener) -> Callable[[], None]:
    _listeners.append(listener)
    return lambda: _listeners.remove(listener)


def publish(notice: Notice) -> None:
    for listener in list(_listeners):
        try:
            listener(notice)
        except Exception:  # a broken display must never break a paid run
            logger.exception("progress listener failed")


class ProgressFeed:
    """Publishes the ledger: every step's state at the start (a rerun shows its Cached steps), then changes."""

    def __init__(self, job_id: str) -> None:
        self.job_id = job_id

    def started(self, manifest: Manifest) -> None:
        for record in manifest.steps:
            if record.status != "pending":
                publish(Notice(self.job_id, record.index, record.name, record.status,
                               {"task_id": record.task_id, "uri": record.uri}))

    def changed(self, manifest: Manifest, transition: Transition) -> None:
        record = transition.record
        stage = transition.detail.get("status", record.status) if transition.stage == "status" else record.status
        publish(Notice(self.job_id, record.index, record.name, str(stage),
                       {"task_id": record.task_id, "adopted": transition.detail.get("adopted"), "uri": record.uri}))

    def failed(self, manifest: Manifest) -> None:
        return None

    def finished(self, manifest: Manifest, final: StoredObject, sheet: StoredObject | None) -> None:
        last = manifest.steps[-1]
        publish(Notice(self.job_id, last.index, "final", "done", {"uri": final.uri}))
