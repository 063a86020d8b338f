"""In-process progress notices, so a front end (the CLI's live view) can follow a run without Prefect's API.

Tasks publish; listeners subscribe. Nothing here is required for a run: with no listener, notices vanish.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Notice:
    job_id: str
    step_index: int
    step_name: str
    stage: str  # planned | submitted | submitted-adopted | submitted/processing/succeed/failed (Kling) | stored | done
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
