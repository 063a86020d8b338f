"""Lifecycle (submitted -> processing -> succeed|failed, scaled latencies), concurrency and callbacks."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from kling_emulator import EmulatorConfig, start_emulator

T2V_LATENCY = 319.0  # the reference's typical text2video seconds (§7), before the time scale


def statuses_until_done(api: Any, kind: str, task_id: str) -> tuple[list[str], float]:
    seen: list[str] = []
    start = time.monotonic()
    while not seen or seen[-1] not in ("succeed", "failed"):
        status = api.task(kind, task_id)["task_status"]
        if not seen or seen[-1] != status:
            seen.append(status)
        time.sleep(0.005)
    return seen, time.monotonic() - start


def test_statuses_progress_in_order_with_scaled_durations(kling: Any, tools: Any) -> None:
    created = kling.create()
    assert created["task_status"] == "submitted"
    seen, elapsed = statuses_until_done(kling, "text2video", created["task_id"])
    assert seen == ["submitted", "processing", "succeed"]
    expected = T2V_LATENCY * tools.SCALE
    assert 0.85 * expected <= elapsed <= expected + 2.0, (elapsed, expected)
    done = kling.task("text2video", created["task_id"])
    assert done["updated_at"] - done["created_at"] >= 0.85 * expected * 1000


def test_a_failed_task_reports_why_and_costs_nothing(kling: Any) -> None:
    kling.handle.set_faults({"rules": [{"match": "create:*", "kind": "task_fail", "params": {"message": "nope"}}]})
    created = kling.create()
    seen, _ = statuses_until_done(kling, "text2video", created["task_id"])
    assert seen[-1] == "failed" and "processing" in seen
    done = kling.task("text2video", created["task_id"])
    assert done["task_status_msg"] == "nope" and done["task_result"] == {}
    assert done["final_unit_deduction"] == "0"


def test_concurrency_limit_and_high_water(kling: Any) -> None:
    limit = kling.handle.config.concurrency
    ids = [kling.create(prompt=f"clip {i}")["task_id"] for i in range(limit)]
    over = kling.post("text2video", {"prompt": "one too many", "external_task_id": "over"})
    assert (over.status_code, over.json()["code"]) == (429, 1303)
    assert over.json()["message"] == "parallel task over resource pack limit"
    assert "over" not in kling.stats()["tasks_created"]
    # Queries don't take slots; a slot frees as soon as a task ends, without anyone polling it.
    kling.wait("text2video", ids[0])
    deadline = time.monotonic() + 10
    while kling.post("text2video", {"prompt": "now there is room"}).status_code != 200:
        assert time.monotonic() < deadline
        time.sleep(0.05)
    assert kling.stats()["concurrency_high_water"] == limit


def test_failed_tasks_release_their_slot(kling: Any) -> None:
    kling.handle.set_faults({"rules": [{"match": "create:*", "kind": "task_fail"}]})
    for _ in range(2):  # more than the limit in total, never more than the limit at once
        ids = [kling.create()["task_id"] for _ in range(kling.handle.config.concurrency)]
        for task_id in ids:
            assert kling.wait("text2video", task_id)["task_status"] == "failed"


@pytest.mark.parametrize("scale", ["normal", "tiny"])
def test_callbacks_post_the_bare_task_on_each_change(kling: Any, tools: Any, receiver: Any, scale: str,
                                                     quick_handle: Any) -> None:
    api = kling if scale == "normal" else tools.Api(quick_handle)
    created = api.create(callback_url=receiver.url, external_task_id=f"cb-{scale}")
    final = api.wait("text2video", created["task_id"])
    deadline = time.monotonic() + 5
    while len(receiver.bodies) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    time.sleep(0.1)
    bodies = receiver.bodies
    assert [b["task_status"] for b in bodies] == ["processing", "succeed"], "one call per change, in order"
    for body in bodies:
        assert "code" not in body and "data" not in body, "no envelope"
        assert body["task_id"] == created["task_id"]
        assert body["task_info"]["external_task_id"] == f"cb-{scale}"
    assert bodies[0]["task_result"] == {}
    assert bodies[-1]["task_result"] == final["task_result"]
    assert bodies[0]["updated_at"] <= bodies[1]["updated_at"] == final["updated_at"]


def test_callback_for_a_failed_task_and_a_dead_receiver(kling: Any, receiver: Any, tools: Any) -> None:
    kling.handle.set_faults({"rules": [{"match": "create:*", "kind": "task_fail", "times": 1,
                                        "params": {"message": "risk control"}}]})
    dead = f"http://127.0.0.1:{tools.free_port()}/nobody"
    first = kling.create(callback_url=dead)
    second = kling.create(callback_url=receiver.url)
    assert kling.wait("text2video", first["task_id"])["task_status"] == "failed"
    assert kling.wait("text2video", second["task_id"])["task_status"] == "succeed"
    deadline = time.monotonic() + 5
    while len(receiver.bodies) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    assert [b["task_status"] for b in receiver.bodies] == ["processing", "succeed"]


def test_a_slow_receiver_delays_nothing_else(kling: Any, receiver: Any, tools: Any) -> None:
    receiver.delay = 1.0
    slow = kling.create(callback_url=receiver.url, external_task_id="slow-hook")
    watched = kling.create(callback_url=receiver.url, external_task_id="watched")
    unpolled = kling.create()["task_id"]
    assert kling.wait("text2video", watched["task_id"])["task_status"] == "succeed"
    # Nobody polls this one: only the ticker can finish it, on time, whatever the receiver does.
    time.sleep(0.3)
    assert kling.stats()["tasks"][unpolled]["status"] == "succeed"
    deadline = time.monotonic() + 10
    while len(receiver.bodies) < 4 and time.monotonic() < deadline:
        time.sleep(0.05)
    for ext in ("slow-hook", "watched"):
        statuses = [b["task_status"] for b in receiver.bodies if b["task_info"]["external_task_id"] == ext]
        assert statuses == ["processing", "succeed"], (ext, statuses)
    assert slow["task_id"] != watched["task_id"]


@pytest.fixture(scope="module")
def quick_handle(tools: Any) -> Iterator[Any]:
    # Tiny time scale: `submitted` lasts ~3 ms, so a task can pass two statuses between two ticks.
    with start_emulator(EmulatorConfig(access_key=tools.AK, secret_key=tools.SK, time_scale=0.0001)) as handle:
        yield handle
