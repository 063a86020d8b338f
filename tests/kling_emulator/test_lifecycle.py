"""Lifecycle (submitted -> processing -> succeed|failed, scaled latencies), concurrency and callbacks.

Timing is read off the emulator's own clock (created_at / updated_at in its answers), never off how long the
test happened to take: on a loaded machine the test can be slow, the emulator's record still holds.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import pytest

from kling_emulator import EmulatorConfig, start_emulator

T2V_LATENCY = 319.0  # the reference's typical text2video seconds (§7), before the time scale


def changes_until_done(api: Any, kind: str, task_id: str, timeout: float = 20) -> list[dict[str, Any]]:
    """The first answer seen in each status, polling until the task ends."""
    seen: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    while not seen or seen[-1]["task_status"] not in ("succeed", "failed"):
        assert time.monotonic() < deadline, f"task {task_id} did not finish in {timeout} s"
        data = api.task(kind, task_id)
        if not seen or seen[-1]["task_status"] != data["task_status"]:
            seen.append(data)
        time.sleep(0.005)
    return seen


def statuses_until_done(api: Any, kind: str, task_id: str) -> list[str]:
    return [data["task_status"] for data in changes_until_done(api, kind, task_id)]


def test_statuses_progress_in_order_with_scaled_durations(kling: Any, tools: Any) -> None:
    created = kling.create()
    assert created["task_status"] == "submitted"
    changes = changes_until_done(kling, "text2video", created["task_id"])
    if changes[0]["task_status"] == "processing":  # a busy machine's first poll can come after the 10 % mark
        changes.insert(0, created)
    assert [c["task_status"] for c in changes] == ["submitted", "processing", "succeed"]
    # On the emulator's clock: each task's latency is the scaled typical one x U(0.9, 1.1), the first 10 % of
    # it `submitted`. Only lower bounds: a late ticker on a busy machine may stamp a change later, never earlier.
    expected_ms = T2V_LATENCY * tools.SCALE * 1000
    processing, done = changes[1], changes[2]
    assert processing["created_at"] == done["created_at"] == created["created_at"]
    assert processing["updated_at"] - created["created_at"] >= 0.9 * 0.1 * expected_ms - 1, processing
    assert done["updated_at"] - created["created_at"] >= 0.9 * expected_ms - 1, done
    assert done["updated_at"] > processing["updated_at"]


def test_a_failed_task_reports_why_and_costs_nothing(kling: Any) -> None:
    kling.handle.set_faults({"rules": [{"match": "create:*", "kind": "task_fail", "params": {"message": "nope"}}]})
    created = kling.create()
    seen = statuses_until_done(kling, "text2video", created["task_id"])
    assert seen[-1] == "failed" and "processing" in seen
    done = kling.task("text2video", created["task_id"])
    assert done["task_status_msg"] == "nope" and done["task_result"] == {}
    assert done["final_unit_deduction"] == "0"


def test_concurrency_limit_and_high_water(tools: Any, two_slots: Any) -> None:
    api = tools.Api(two_slots)
    limit = two_slots.config.concurrency
    ids = [api.create(prompt=f"clip {i}")["task_id"] for i in range(limit)]
    over = api.post("text2video", {"prompt": "one too many", "external_task_id": "over"})
    assert (over.status_code, over.json()["code"]) == (429, 1303)
    assert over.json()["message"] == "parallel task over resource pack limit"
    assert "over" not in api.stats()["tasks_created"]
    # Queries don't take slots; a slot frees as soon as a task ends, without anyone polling it.
    api.wait("text2video", ids[0])
    tools.until(lambda: api.post("text2video", {"prompt": "now there is room"}).status_code == 200,
                what="a free slot")
    assert api.stats()["concurrency_high_water"] == limit
    api.http.close()


@pytest.fixture(scope="module")
def two_slots(tools: Any) -> Iterator[Any]:
    # Tasks of ~1.6 s: the first one cannot end (and free its slot) before the test has asked for one too many.
    config = EmulatorConfig(access_key=tools.AK, secret_key=tools.SK, time_scale=0.005, concurrency=2)
    with start_emulator(config) as handle:
        yield handle


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
    bodies = all_callbacks_so_far(api, receiver, tools)
    assert [b["task_status"] for b in bodies] == ["processing", "succeed"], "one call per change, in order"
    for body in bodies:
        assert "code" not in body and "data" not in body, "no envelope"
        assert body["task_id"] == created["task_id"]
        assert body["task_info"]["external_task_id"] == f"cb-{scale}"
    assert bodies[0]["task_result"] == {}
    assert bodies[-1]["task_result"] == final["task_result"]
    assert bodies[0]["updated_at"] <= bodies[1]["updated_at"] == final["updated_at"]


def all_callbacks_so_far(api: Any, receiver: Any, tools: Any) -> list[dict[str, Any]]:
    """Every callback of the changes that have happened, and nothing more to come: callbacks go out one at a
    time in the order of the changes, so once a later task's last callback has arrived, all earlier ones have."""
    marker = f"marker-{len(receiver.bodies)}-{time.monotonic_ns()}"
    api.wait("text2video", api.create(callback_url=receiver.url, external_task_id=marker)["task_id"])
    tools.until(lambda: any(b["task_info"].get("external_task_id") == marker and b["task_status"] == "succeed"
                            for b in receiver.bodies), what="the marker's last callback")
    return [b for b in receiver.bodies if b["task_info"].get("external_task_id") != marker]


def test_callback_for_a_failed_task_and_a_dead_receiver(kling: Any, receiver: Any, tools: Any) -> None:
    kling.handle.set_faults({"rules": [{"match": "create:*", "kind": "task_fail", "times": 1,
                                        "params": {"message": "risk control"}}]})
    dead = f"http://127.0.0.1:{tools.free_port()}/nobody"
    first = kling.create(callback_url=dead)
    second = kling.create(callback_url=receiver.url)
    assert kling.wait("text2video", first["task_id"])["task_status"] == "failed"
    assert kling.wait("text2video", second["task_id"])["task_status"] == "succeed"
    assert [b["task_status"] for b in all_callbacks_so_far(kling, receiver, tools)] == ["processing", "succeed"]


def test_a_slow_receiver_delays_nothing_else(kling: Any, receiver: Any, tools: Any) -> None:
    receiver.hold()  # the first callback is received and then left unanswered: a stuck receiver
    slow = kling.create(callback_url=receiver.url, external_task_id="slow-hook")
    watched = kling.create(callback_url=receiver.url, external_task_id="watched")
    unpolled = kling.create()["task_id"]
    assert kling.wait("text2video", watched["task_id"])["task_status"] == "succeed"
    # Nobody polls this one: only the ticker can finish it, and it does while the receiver is still stuck.
    tools.until(lambda: kling.stats()["tasks"][unpolled]["status"] == "succeed", what="the unpolled task's end")
    assert len(receiver.bodies) == 1, "the receiver was stuck on the first callback all along"
    receiver.release()
    tools.until(lambda: len(receiver.bodies) >= 4, what="the remaining callbacks")
    for ext in ("slow-hook", "watched"):
        statuses = [b["task_status"] for b in receiver.bodies if b["task_info"]["external_task_id"] == ext]
        assert statuses == ["processing", "succeed"], (ext, statuses)
    assert slow["task_id"] != watched["task_id"]


@pytest.fixture(scope="module")
def quick_handle(tools: Any) -> Iterator[Any]:
    # Tiny time scale: `submitted` lasts ~3 ms, so a task can pass two statuses between two ticks.
    with start_emulator(EmulatorConfig(access_key=tools.AK, secret_key=tools.SK, time_scale=0.0001)) as handle:
        yield handle
