"""wait(): adaptive polling, the learned schedule (simulated clock),
deadlines (queue time apart), transient errors, terminal outcomes. Fake clock."""

from __future__ import annotations

import logging
import random

import pytest

from kling_tasks.api import (
    ExpectedLength,
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


# ---- the learned schedule, against a simulated clock ---------------------------------------------------------


class SimulatedTask:
    """A Kling task on a simulated clock: `submitted` for `queued` s, `processing` for `processing` s, then
    `succeed` (or `failed` at `fail_at`); its snapshots carry Kling's epoch-ms timestamps of each change."""

    def __init__(self, queued: float, processing: float, *, created: float = 1_000_000.0,
                 first_poll_after: float = 1.0, fail_at: float | None = None) -> None:
        self.created, self.now = created, created + first_poll_after
        self.started, self.done, self.fail_at = created + queued, created + queued + processing, fail_at
        self.polls = 0
        self.sleeps: list[float] = []

    def clock(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds

    async def get(self) -> TaskSnapshot:
        self.polls += 1
        if self.fail_at is not None and self.now >= self.created + self.fail_at:
            status, changed = "failed", self.created + self.fail_at
        elif self.now >= self.done:
            status, changed = "succeed", self.done
        elif self.now >= self.started:
            status, changed = "processing", self.started
        else:
            status, changed = "submitted", self.created
        videos = [{"id": "v", "url": "https://cdn.example/v.mp4", "duration": "5.0"}] if status == "succeed" else []
        return TaskSnapshot.model_validate({"task_id": "1", "task_status": status, "task_result": {"videos": videos},
                                            "created_at": int(self.created * 1000), "updated_at": int(changed * 1000)})

    async def wait(self, policy: PollPolicy, expected: ExpectedLength | None) -> TaskSnapshot:
        from kling_tasks.api.polling import wait_for_task

        return await wait_for_task(self.get, policy=policy, sleep=self.sleep, clock=self.clock, expected=expected,
                                   wall_clock=self.clock)


def like_emulator(length: float, rng: random.Random) -> tuple[float, float]:
    """The emulator's tasks: the typical length ±10 %, 10 % of it queued."""
    total = length * rng.uniform(0.9, 1.1)
    return 0.1 * total, 0.9 * total


def history(length: float, samples: int, rng: random.Random) -> ExpectedLength:
    pairs = [like_emulator(length, rng) for _ in range(samples)]
    return ExpectedLength(queued=tuple(q for q, _ in pairs), processing=tuple(p for _, p in pairs))


NO_DEADLINES = {"processing_timeout": 1e9, "queue_timeout": 1e9}


@pytest.mark.parametrize("length", [60.0, 164.0, 320.0, 600.0, 1200.0])
async def test_learned_schedule_meets_the_poll_and_delay_goals(length: float) -> None:
    # The goal: <= 8 polls per task, mean detection delay <= 3 % of its length, 60 s to 1200 s.
    rng = random.Random(int(length))
    polls, delays = [], []
    for _ in range(100):
        expected = history(length, 8, rng)
        task = SimulatedTask(*like_emulator(length, rng))
        final = await task.wait(PollPolicy(rng=random.Random(rng.random()), **NO_DEADLINES), expected)
        assert final.task_status == "succeed" and task.now >= task.done
        polls.append(task.polls)
        delays.append((task.now - task.done) / length)
        assert min(task.sleeps) >= PollPolicy().dense_min_interval  # never hammering
    assert sum(polls) / len(polls) <= 8 and sum(delays) / len(delays) <= 0.03


async def test_learned_schedule_beats_the_adaptive_policy_on_polls() -> None:
    rng = random.Random(3)
    task, adaptive = SimulatedTask(32.0, 288.0), SimulatedTask(32.0, 288.0)
    await task.wait(PollPolicy(rng=random.Random(1)), history(320.0, 8, rng))
    await adaptive.wait(PollPolicy(rng=random.Random(1)), None)
    assert task.polls <= 8 < adaptive.polls


async def test_without_history_the_schedule_is_the_adaptive_one() -> None:
    task = SimulatedTask(32.0, 288.0)
    await task.wait(PollPolicy(rng=random.Random(5)), None)
    rng, sleeps, since, status = random.Random(5), [], 1_000_001.0, "submitted"
    adaptive = PollPolicy(rng=rng)
    for s in task.sleeps:  # replay: every interval is the adaptive policy's for the time in the current status
        now = task.created + 1 + sum(sleeps)  # the poll this sleep follows
        new = "processing" if now >= task.started else "submitted"
        if new != status:
            status, since = new, now
        assert s == pytest.approx(adaptive.interval(now - since), rel=1e-9)
        sleeps.append(s)
    assert len(sleeps) > 20


async def test_a_task_slower_than_ever_seen_is_still_caught_without_hammering() -> None:
    expected = ExpectedLength(queued=(30.0, 31.0, 29.0), processing=(290.0, 285.0, 295.0))
    task = SimulatedTask(30.0, 600.0)  # twice as long as any earlier one
    final = await task.wait(PollPolicy(rng=random.Random(2)), expected)
    assert final.task_status == "succeed"
    assert task.now - task.done <= PollPolicy().max_interval  # past the window: at most max_interval late
    assert min(task.sleeps) >= 2.0


async def test_a_long_queue_moves_the_window_with_the_processing_start() -> None:
    # Earlier tasks queued 30 s; this one waits 500 s for a slot. Once `processing` is seen, its updated_at
    # places the window exactly, so the queue costs a few rare polls, not a late detection or dense polling.
    rng = random.Random(4)
    expected = history(320.0, 8, rng)
    task = SimulatedTask(500.0, 288.0)
    await task.wait(PollPolicy(rng=random.Random(4)), expected)
    assert task.now - task.done <= 0.05 * 320 and task.polls <= 12


async def test_an_early_failure_is_noticed_within_the_rare_interval() -> None:
    expected = history(600.0, 8, random.Random(6))
    task = SimulatedTask(60.0, 540.0, fail_at=20.0)  # content policy: failed after 20 s
    with pytest.raises(TaskFailedError):
        await task.wait(PollPolicy(rng=random.Random(6)), expected)
    assert task.now - (task.created + 20.0) <= 0.5 * 600


async def test_a_resumed_wait_on_an_old_task_polls_by_its_created_at() -> None:
    # A rerun attaches to a task created 280 s ago (Kling's created_at): the window is already near.
    expected = history(320.0, 8, random.Random(7))
    task = SimulatedTask(32.0, 288.0, first_poll_after=280.0)
    await task.wait(PollPolicy(rng=random.Random(7)), expected)
    assert task.polls <= 6 and task.now - task.done <= 0.05 * 320


async def test_learned_schedule_keeps_the_processing_deadline() -> None:
    expected = ExpectedLength(queued=(30.0,), processing=(290.0,))
    task = SimulatedTask(30.0, 10_000.0)
    with pytest.raises(WaitTimeoutError, match="processing"):
        await task.wait(PollPolicy(processing_timeout=900, queue_timeout=3600, rng=random.Random(8)), expected)
    assert task.now - task.started <= 900 + 0.5 * 320 + 1  # from when processing was seen (a rare poll)


def test_expected_length_window_narrows_with_more_samples_and_refuses_nonsense() -> None:
    one = ExpectedLength(queued=(30.0,), processing=(300.0,))
    many = ExpectedLength(queued=(30.0,) * 10, processing=(300.0,) * 10)
    (one_lo, one_hi), (many_lo, many_hi) = one.processing_window, many.processing_window
    assert one_lo < many_lo < 300 < many_hi < one_hi
    assert many.typical_total == 330.0
    with pytest.raises(ValueError):
        ExpectedLength(queued=(), processing=())
    with pytest.raises(ValueError):
        ExpectedLength(queued=(1.0,), processing=(0.0,))
    with pytest.raises(ValueError):
        ExpectedLength(queued=(1.0, 2.0), processing=(3.0,))
