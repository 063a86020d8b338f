"""Fault injection: rules matched per request, firing by probability, a scripted sequence, or the first N times.

Profile (YAML or JSON, from --faults FILE or POST /_emulator/faults):

    rules:
      - match: create:video-extend     # create:KIND | create:* | get:KIND | get:* | list:KIND | list:* | download | any
        kind: drop_after_commit        # see KINDS
        probability: 0.5               # or: sequence: [true, false, true]   or: times: 2   (none: always)
        params: {}                     # seconds (slow), code/status/message (http_error), message (task_fail),
                                       # after_bytes/seconds (slow_stream)
        task_status: [processing]      # get rules only: fire only on reads of a task in one of these statuses
                                       # (absent | submitted | processing | succeed | failed)
    behaviour:                         # optional: weak-provider switches (see behaviour.py)
      lookup_query: ignored

KIND is text2video, image2video or video-extend. Rules are tried in order; the first that applies to the
event and fires wins (a rule whose sequence is used up, or whose times are spent, no longer fires).
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
    "slow_stream",  # the download pauses params.seconds after params.after_bytes, then sends the rest
}
SLOW_STREAM_AFTER = 5 * 1024 * 1024 + 64 * 1024  # just past one 5 MiB S3 part
SLOW_STREAM_SECONDS = 5.0
# The HTTP status of each business code (reference §11), so an http_error rule may give only the code.
STATUS_OF_CODE = {1000: 401, 1001: 401, 1002: 401, 1003: 401, 1004: 401, 1100: 429, 1101: 429, 1102: 429,
                  1103: 403, 1200: 400, 1201: 400, 1202: 404, 1203: 404, 1300: 400, 1301: 400, 1302: 429,
                  1303: 429, 1304: 429, 5000: 500, 5001: 503, 5002: 504}
# Default texts for injected errors (reference §11), so a client logs what Kling would have said.
MESSAGE_OF_CODE = {1102: "resource pack used up or expired", 1302: "requests too fast, please slow down",
                   1303: "parallel task over resource pack limit", 5000: "internal server error",
                   5001: "service temporarily unavailable", 5002: "server internal timeout"}
EVENT_KINDS = ("text2video", "image2video", "video-extend", "*")
APPLIES_TO = {
    "create": {"http_error", "pack_exhausted", "drop_before", "drop_after_commit", "slow", "task_fail"},
    "get": {"http_error", "drop_before", "slow"},
    "list": {"http_error", "drop_before", "slow"},
    "download": {"download_cut", "url_expired", "slow", "drop_before", "slow_stream"},
}
# What a `task_status` condition may name: the emulator's own words, and `absent` for an id no task carries
# (a lookup before the create). It singles out a stage of a client's job: lookups, polling, the last reads.
TASK_STATUSES = ("absent", "submitted", "processing", "succeed", "failed")


@dataclass
class Rule:
    match: str
    kind: str
    probability: float | None = None
    sequence: list[bool] | None = None
    times: int | None = None
    params: dict[str, Any] = field(default_factory=dict)
    task_status: list[str] | None = None

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown fault kind {self.kind!r}; known: {', '.join(sorted(KINDS))}")
        prefix, colon, rest = self.match.partition(":")
        known = self.match in ("any", "*", "download") or (
            colon and prefix in ("create", "get", "list") and rest in EVENT_KINDS)
        if not known:
            raise ValueError(f"unknown fault match {self.match!r} (create:KIND, get:KIND, list:KIND, download, any)")
        if sum(x is not None for x in (self.probability, self.sequence, self.times)) > 1:
            raise ValueError("give at most one of probability, sequence, times")
        if self.probability is not None and not 0 <= self.probability <= 1:
            raise ValueError("probability must be in [0, 1]")
        if not isinstance(self.params, dict):
            raise ValueError("params must be a mapping")
        if self.kind == "slow_stream":
            after, seconds = self.params.get("after_bytes", 0), self.params.get("seconds", 0)
            if isinstance(after, bool) or not isinstance(after, int) or after < 0:
                raise ValueError("slow_stream params.after_bytes must be a whole number of bytes >= 0")
            if isinstance(seconds, bool) or not isinstance(seconds, int | float) or seconds < 0:
                raise ValueError("slow_stream params.seconds must be a number >= 0")
        if self.task_status is not None:
            if not self.match.startswith("get:"):
                raise ValueError("task_status applies to get:KIND rules only")
            if (not isinstance(self.task_status, list) or not self.task_status
                    or any(s not in TASK_STATUSES for s in self.task_status)):
                raise ValueError(f"task_status must be a non-empty list of {', '.join(TASK_STATUSES)}")
        self.sequence = None if self.sequence is None else [bool(x) for x in self.sequence]

    def matches(self, event: str) -> bool:
        if self.match in ("any", "*", event):
            return True
        prefix, _, rest = self.match.partition(":")
        return rest == "*" and event.startswith(prefix + ":")

    def concerns(self, task_status: str | None) -> bool:
        """Does the rule's `task_status` condition (if any) hold for a read of a task in this status?"""
        return self.task_status is None or task_status in self.task_status

    def fires(self) -> bool:
        if self.sequence is not None:
            return bool(self.sequence.pop(0)) if self.sequence else False
        if self.times is not None:
            if self.times <= 0:
                return False
            self.times -= 1
            return True
        return random.random() < (1.0 if self.probability is None else self.probability)


def parse_profile(profile: dict[str, Any] | list[Any] | None) -> tuple[list[Rule], dict[str, Any] | None]:
    """(the rules, the `behaviour` mapping or None) of a profile; ValueError if it is malformed."""
    behaviour = None
    if isinstance(profile, dict):
        unknown = set(profile) - {"rules", "behaviour"}
        if unknown:
            raise ValueError(f"unknown profile key {', '.join(sorted(map(str, unknown)))} (known: rules, behaviour)")
        raw, behaviour = profile.get("rules"), profile.get("behaviour")
        if behaviour is not None and not isinstance(behaviour, dict):
            raise ValueError("behaviour must be a mapping of switches")
    else:
        raw = profile
    raw = raw or []
    if not isinstance(raw, list) or not all(isinstance(item, dict) for item in raw):
        raise ValueError("a fault profile is {rules: [...], behaviour: {...}} or a list of rules")
    try:
        return [Rule(**item) for item in raw], behaviour
    except TypeError as exc:  # an unknown rule field
        raise ValueError(str(exc)) from None


class Faults:
    def __init__(self, profile: dict[str, Any] | list[Any] | None = None):
        self._lock = threading.Lock()
        self.rules: list[Rule] = []
        self.replace(profile)

    def replace(self, profile: dict[str, Any] | list[Any] | None) -> None:
        """Replace the rules by the profile's (its `behaviour` is the caller's business)."""
        self.set_rules(parse_profile(profile)[0])

    def set_rules(self, rules: list[Rule]) -> None:
        with self._lock:
            self.rules = rules

    def pick(self, event: str, task_status: str | None = None) -> Rule | None:
        """The first rule for this event (e.g. "create:text2video", "download") that fires now; `task_status`
        is the status of the task a get reads ("absent" if none), checked before a rule's trigger is spent."""
        applicable = APPLIES_TO[event.partition(":")[0]]
        with self._lock:
            for rule in self.rules:
                if rule.kind in applicable and rule.matches(event) and rule.concerns(task_status) and rule.fires():
                    return rule
        return None


def load_profile(path: Path | str) -> dict[str, Any]:
    """A profile file: YAML, or JSON (which YAML reads too)."""
    data = yaml.safe_load(Path(path).read_text())
    return data if isinstance(data, dict) else {"rules": data or []}
