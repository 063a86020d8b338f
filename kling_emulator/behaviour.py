"""Weak-provider switches: the emulator can answer like a provider that is not quite Kling.

Real providers (Kling itself, proxies such as CometAPI that pool many upstream accounts) may not support one of
the two external-id lookup forms (reference §3.6), may not enforce unique external ids, or may use status words
the documentation does not list (ComfyUI's client knows `queued`, `queueing`, `created`, §15). A client that
is only ever tested against a perfect server never learns to cope; these switches make the server imperfect
on purpose. Defaults are today's faithful behaviour.

Set from `EmulatorConfig` fields and `kling-emulator serve` flags (the configured defaults), from a
`behaviour:` mapping in a fault profile next to `rules:`, or at run time (`POST /_emulator/behaviour`,
`POST /_emulator/faults`); `POST /_emulator/reset` restores the configured defaults.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields, replace
from typing import Any

LOOKUP_QUERY = ("filter", "ignored", "empty")  # GET /v1/videos/{kind}?external_task_id=X
LOOKUP_PATH = ("on", "off")  # GET /v1/videos/{kind}/{external_task_id}


@dataclass(frozen=True)
class Behaviour:
    lookup_query: str = "filter"  # filter: answers that task; ignored: the plain list page; empty: data []
    lookup_path: str = "on"  # on: /{id} finds by task_id, then external_task_id; off: by task_id only
    unique_external_ids: bool = True  # False: a reused external_task_id makes another task
    queued_status_word: str | None = None  # e.g. "queueing": reported instead of `submitted`

    def __post_init__(self) -> None:
        if self.lookup_query not in LOOKUP_QUERY:
            raise ValueError(f"lookup_query must be one of {', '.join(LOOKUP_QUERY)}, not {self.lookup_query!r}")
        if self.lookup_path not in LOOKUP_PATH:
            raise ValueError(f"lookup_path must be one of {', '.join(LOOKUP_PATH)}, not {self.lookup_path!r}")
        if not isinstance(self.unique_external_ids, bool):
            raise ValueError("unique_external_ids must be true or false")
        word = self.queued_status_word
        if word is not None and (not isinstance(word, str) or not word.strip()):
            raise ValueError("queued_status_word must be a non-empty string or null")

    def updated(self, changes: Any) -> Behaviour:
        """A copy with the fields in `changes` (a mapping; None = no change) set; ValueError if any is wrong."""
        if changes is None:
            return self
        if not isinstance(changes, dict):
            raise ValueError("behaviour must be a mapping of switches")
        unknown = set(changes) - {f.name for f in fields(self)}
        if unknown:
            raise ValueError(f"unknown behaviour switch {', '.join(sorted(map(str, unknown)))}; "
                             f"known: {', '.join(f.name for f in fields(self))}")
        return replace(self, **changes)

    def status_word(self, status: str) -> str:
        """The word this provider uses for a status (only `submitted` is ever renamed)."""
        if status == "submitted" and self.queued_status_word is not None:
            return self.queued_status_word
        return status

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)
