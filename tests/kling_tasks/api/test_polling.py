"""wait(): adaptive polling, deadlines (queue time apart), transient errors, terminal outcomes. Fake clock."""

from __future__ import annotations

import logging
import random

import pytest

from kling_tasks.api import (
    KlingProtocolError,
    NotFoundError,
    PollPolicy,
    TaskFailedError,
    TaskSnapshot,
    WaitTimeoutError,
)

from .conftest import FAST_RETRY

pytestmark = pytest.mark.anyio


def test_interval_grows_with_time_in_status_within_bounds() -> None:
    policy = PollPolicy(min_interval=5, max_interval=30, jitter=0.0)
    assert policy.interval(0) == 5
    assert policy.interval(100) == pytest.approx(10)
    assert policy.interval(10_000) == 30
    jittery = PollPolicy(min_interval=5, max_interval=30, rng=random.Random(1))
    values = [jittery.interval(150) for _ in range(200)]
    assert all(12 <= v <= 18 for v in values) and len(set(values)) > 100  # ±20 % around 15 s
    assert all(5 <= jittery.interval(t) <= 30 for t in (0, 1, 49, 51, 299, 301, 1e6))


async def test_progression_calls_on_update_on_each_change(make_client, fake, clock) -> None:
    task_id = fake.add_task("text2video", "job-s0-w")
    fake.progress[task_id] = ["submitted", "submitted", "processing", "processing", "processing", "succeed"]
    seen: list[TaskSnapshot] = []

    async def on_update(snap: TaskSnapshot) -> None:
        seen.append(snap)

    async with make_client(fake) as client:
        final = await client.wait("text2video", task_id, on_update=on_update)
    assert [s.task_status for s in seen] == ["submitted", "processing", "succeed"]
    assert final.task_status == "succeed" and final.video and final.video.duration == pytest.approx(5.042)
    assert final.credits == 1.0 and final.external_task_id == "job-s0-w"
    assert len(fake.gets()) == 6 and len(clock.sleeps) == 5
    assert all(4 <= s <= 36 for s in clock.sleeps)  # never hammering, never sleepy


async def test_failed_raises_with_status_msg(make_client, fake) -> None:
    task_id = fake.add_task("text2video", "job-s0-f", task_status_msg="Failure to pass the risk control system")
    fake.progress[task_id] = ["processing", "failed"]
    async with make_client(fake) as client:
        with pytest.raises(TaskFailedError) as info:
            await client.wait("text2video", task_id)
    err = info.value
    assert err.task_status_msg == "Failure to pass the risk control system"
    assert err.snapshot.task_status == "failed" and err.task_id == task_id and err.external_task_id == "job-s0-f"


async def test_queue_time_not_counted_against_processing_deadline(make_client, fake, clock) -> None:
    task_id = fake.add_task("text2video")
    fake.progress[task_id] = ["submitted"] * 30 + ["processing"] * 5 + ["succeed"]
    poll = PollPolicy(min_interval=5, max_interval=30, processing_timeout=60, queue_timeout=10_000)
    start = clock.now
    async with make_client(fake, poll=poll) as client:
        final = await client.wait("text2video", task_id)
    assert final.task_status == "succeed"
    assert clock.now - start > 200  # far longer than the processing deadline, nearly all of it queued


async def test_processing_deadline_raises_with_last_snapshot(make_client, fake, clock) -> None:
    task_id = fake.add_task("text2video", "job-s0-t")
    fake.progress[task_id] = ["submitted", "submitted", "processing"]  # stuck processing
    poll = PollPolicy(min_interval=5, max_interval=30, processing_timeout=120, queue_timeout=10_000)
    async with make_client(fake, poll=poll) as client:
        with pytest.raises(WaitTimeoutError) as info:
            await client.wait("text2video", task_id)
    err = info.value
    assert err.snapshot is not None and err.snapshot.task_status == "processing"
    assert err.task_id == task_id and err.external_task_id == "job-s0-t" and "processing" in str(err)
    assert clock.now - 1000 < 120 + 30  # gave up at the deadline, not long after


async def test_queue_deadline(make_client, fake) -> None:
    task_id = fake.add_task("text2video")
    fake.progress[task_id] = ["submitted"]
    poll = PollPolicy(min_interval=5, max_interval=30, processing_timeout=10_000, queue_timeout=100)
    async with make_client(fake, poll=poll) as client:
        with pytest.raises(WaitTimeoutError, match="queued") as info:
            await client.wait("text2video", task_id)
    assert info.value.snapshot is not None and info.value.snapshot.task_status == "submitted"


async def test_transient_poll_errors_are_tolerated(make_client, fake, caplog) -> None:
    task_id = fake.add_task("text2video")
    fake.progress[task_id] = ["processing", "processing", "succeed"]
    fake.fail("GET", response=fake.envelope(None, 5001, 503, "maintenance"), times=9)  # > one GET's retries
    async with make_client(fake) as client:
        final = await client.wait("text2video", task_id)
    assert final.task_status == "succeed"
    assert any("transient error polling" in r.getMessage() for r in caplog.records)


async def test_non_retryable_poll_error_is_raised(make_client, fake) -> None:
    async with make_client(fake) as client:
        with pytest.raises(NotFoundError):
            await client.wait("text2video", "999")
    assert len(fake.gets()) == 1


async def test_succeed_without_video_is_protocol_error(make_client, fake) -> None:
    task_id = fake.add_task("text2video", task_result={"videos": []})
    fake.progress[task_id] = ["succeed"]
    async with make_client(fake) as client:
        with pytest.raises(KlingProtocolError, match="without any video"):
            await client.wait("text2video", task_id)


async def test_status_change_resets_interval(make_client, fake, clock) -> None:
    task_id = fake.add_task("text2video")
    fake.progress[task_id] = ["submitted"] * 40 + ["processing", "processing", "succeed"]
    poll = PollPolicy(min_interval=5, max_interval=30, jitter=0.0)
    async with make_client(fake, poll=poll) as client:
        await client.wait("text2video", task_id)
    assert max(clock.sleeps[:39]) == 30  # long queue: slowed down to the cap
    assert clock.sleeps[40] == 5  # just started processing: fast again


@pytest.mark.parametrize("seed", range(20))
async def test_deadline_terminates_despite_float_rounding(seed: int) -> None:
    # Regression: `now + tiny remaining` rounding back to `now` once made the loop spin forever.
    from kling_tasks.api.polling import wait_for_task

    state = {"now": 1e15 + seed, "polls": 0}  # ulp at 1e15 is 0.125 s

    async def sleep(seconds: float) -> None:
        state["now"] += seconds

    async def get() -> TaskSnapshot:
        state["polls"] += 1
        assert state["polls"] < 100
        return TaskSnapshot.model_validate({"task_id": "1", "task_status": "processing"})

    policy = PollPolicy(processing_timeout=120.3, rng=random.Random(seed))
    with pytest.raises(WaitTimeoutError):
        await wait_for_task(get, policy=policy, sleep=sleep, clock=lambda: state["now"])


async def test_unknown_status_is_in_progress_and_counts_as_queued(make_client, fake, clock, caplog) -> None:
    # `queueing` for far longer than one GET's retry budget and than the processing deadline: still a wait.
    task_id = fake.add_task("text2video", "job-s0-q")
    polls = FAST_RETRY.attempts * 5
    fake.progress[task_id] = ["queueing"] * polls + ["processing", "succeed"]
    poll = PollPolicy(min_interval=5, max_interval=15, processing_timeout=60, queue_timeout=10_000)
    caplog.set_level(logging.WARNING, logger="kling_tasks.api")
    start = clock.now
    async with make_client(fake, poll=poll) as client:
        final = await client.wait("text2video", task_id)
    assert final.task_status == "succeed" and final.video is not None
    assert clock.now - start > 60 and len(fake.gets()) == polls + 2
    warnings = [r.getMessage() for r in caplog.records if "unknown status" in r.getMessage()]
    assert len(warnings) == 1 and "'queueing'" in warnings[0] and task_id in warnings[0]


async def test_unknown_status_before_processing_runs_the_queue_deadline(make_client, fake) -> None:
    task_id = fake.add_task("text2video")
    fake.progress[task_id] = ["submitted", "queueing"]
    poll = PollPolicy(min_interval=5, max_interval=30, processing_timeout=10_000, queue_timeout=100)
    async with make_client(fake, poll=poll) as client:
        with pytest.raises(WaitTimeoutError, match="queued") as info:
            await client.wait("text2video", task_id)
    assert info.value.snapshot is not None and info.value.snapshot.task_status == "queueing"


async def test_unknown_status_after_processing_runs_the_processing_deadline(make_client, fake, clock) -> None:
    task_id = fake.add_task("text2video")
    fake.progress[task_id] = ["submitted", "processing", "rendering"]
    poll = PollPolicy(min_interval=5, max_interval=30, processing_timeout=120, queue_timeout=10_000)
    async with make_client(fake, poll=poll) as client:
        with pytest.raises(WaitTimeoutError, match=r"still rendering .* processing") as info:
            await client.wait("text2video", task_id)
    assert info.value.snapshot is not None and info.value.snapshot.task_status == "rendering"
    assert clock.now - 1000 < 120 + 30


async def test_unknown_status_is_warned_once_per_task_and_word(caplog) -> None:
    from kling_tasks.api.polling import warn_unknown_status

    caplog.set_level(logging.WARNING, logger="kling_tasks.api")
    for task_id, word in [("1", "queueing"), ("1", "queueing"), ("1", "running"), ("2", "queueing")]:
        warn_unknown_status(TaskSnapshot.model_validate({"task_id": task_id, "task_status": word}))
    warn_unknown_status(TaskSnapshot.model_validate({"task_id": "3", "task_status": "processing"}))
    assert len([r for r in caplog.records if "unknown status" in r.getMessage()]) == 3
