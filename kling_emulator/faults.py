"""Fault injection: rules matched per request, firing by probability, a scripted sequence, or the first N times.

Profile (YAML or JSON, from --faults FILE or POST /_emulator/faults):

    rules:
      - match: create:video-extend     # create:KIND | create:* | get:KIND | get:* | list:* | download | any
        kind: drop_after_commit        # see KINDS
        probability: 0.5               # or: sequence: [true, false, true]   or: times: 2
        params: {}                     # seconds (slow), status/code (http_error), message (task_fail)
"""

from __future__ import annotations

import random
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

KINDS = {
    "http_error",  # an error envelope: params status (429/500/503/504) and code (1302/1303/5000/5001/5002)
    "pack_exhausted",  # 429 with 1102
    "drop_before",  # the connection is closed before the request is handled: nothing happens server-side
    "drop_after_commit",  # a create is committed, then the connection is closed without an answer
    "slow",  # the answer is delayed by params.seconds
    "task_fail",  # the created task ends `failed` with params.message
    "download_cut",  # the download announces its full length, sends half, then closes
    "url_expired",  # the result URL answers 403 as if expired
}
APPLIES_TO = {
    "create": {"http_error", "pack_exhausted", "drop_before", "drop_after_commit", "slow", "task_fail"},
    "get": {"http_error", "drop_before", "slow"},
    "list": {"http_error", "drop_before", "slow"},
    "download": {"download_cut", "url_expired", "slow", "drop_before"},
}


@dataclass
class Rule:
    match: str
    kind: str
    probability: float | None = None
    sequence: list[bool] | None = None
    times: int | None = None
    params: dict[str, Any] = field(default_factory=dict)

    def matches(self, event: str) -> bool:
        if self.match in ("any", "*", event):
            return True
        prefix, _, rest = self.match.partition(":")
        return rest == "*" and event.startswith(prefix + ":")

    def fires(self) -> bool:
        if self.sequence is not None:
            return bool(self.sequence.pop(0)) if self.sequence else False
        if self.times is not None:
            if self.times <= 0:
                return False
            self.times -= 1
            return True
        return random.random() < (1.0 if self.probability is None else self.probability)


class Faults:
    def __init__(self, profile: dict[str, Any] | list[Any] | None = None):
        self._lock = threading.Lock()
        self.rules: list[Rule] = []
        self.replace(profile)

    def replace(self, profile: dict[str, Any] | list[Any] | None) -> None:
        raw = profile.get("rules", []) if isinstance(profile, dict) else (profile or [])
        rules = [Rule(**item) for item in raw]
        for rule in rules:
            if rule.kind not in KINDS:
                raise ValueError(f"unknown fault kind {rule.kind!r}; known: {', '.join(sorted(KINDS))}")
        with self._lock:
            self.rules = rules

    def pick(self, event: str) -> Rule | None:
        """The first rule for this event (e.g. "create:text2video", "download") that fires now."""
        applicable = APPLIES_TO[event.partition(":")[0]]
        with self._lock:
            for rule in self.rules:
                if rule.kind in applicable and rule.matches(event) and rule.fires():
                    return rule
        return None


def load_profile(path: Path) -> dict[str, Any]:
    data = yaml.safe_load(path.read_text())
    return data if isinstance(data, dict) else {"rules": data or []}
