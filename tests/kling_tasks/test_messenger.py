"""The ledger's messenger: a coalescing observer with a min_interval is told the newest change at most that often
(stretched by the jobs open in the process), always ends on the ledger's last state, and hears a job's end at once;
other observers still hear everything; closing the ledger tells what is held and ends the thread."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from kling_tasks import messenger
from kling_tasks.jobs import ExtensionSpec, GenerationSpec, VideoJob, plan_job
from kling_tasks.manifest import Manifest
from kling_tasks.messenger import Messenger
from kling_tasks.recorder import JobRecorder
from kling_tasks.storage import LocalSink
from tests.kling_tasks.test_recorder import FakeObserver, make, rendered, run_steps, submission


class Throttled(FakeObserver):
    coalesce = True

    def __init__(self, interval: float) -> None:
        super().__init__()
        self.min_interval = interval
        self.told_at: list[float] = []

    def _record(self, hook: str, manifest: Manifest, extra: Any = None) -> None:
        self.told_at.append(time.monotonic())
        super()._record(hook, manifest, extra)


def statuses(observer: FakeObserver) -> list[Any]:
    return [extra for hook, _, extra in observer.calls if hook == "changed"]


def wait_for(condition: Any, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition() and time.monotonic() < deadline:
        time.sleep(0.02)


def test_a_burst_of_changes_is_one_write_that_ends_on_the_last_state(tmp_path: Path) -> None:
    throttled, every = Throttled(interval=30.0), FakeObserver()
    job = VideoJob(generate=GenerationSpec(prompt="a kite"), extensions=[ExtensionSpec(prompt="higher")],
                   dest=str(tmp_path), job_id="kite")
    plan, sink = plan_job(job), LocalSink(tmp_path)
    with JobRecorder(sink, job, plan, "kling", None, account="acc", observers=[throttled, every]) as recorder:
        run_steps(recorder, sink, plan)  # 10 ledger changes within milliseconds
        recorder.flush()
    assert [hook for hook, _, _ in throttled.calls] == ["started", "changed"], "held back, then told at the flush"
    assert statuses(throttled)[-1] == ["stored", "stored"], "the picture ends on the ledger's last state"
    assert len(every.transitions) == 10, "an observer without min_interval still hears every transition"


def test_a_held_change_goes_out_on_its_own_when_its_time_comes(tmp_path: Path) -> None:
    throttled = Throttled(interval=0.3)
    recorder, _, plan = make(tmp_path, throttled)  # `started` is told at once
    with recorder:
        recorder.submitting(plan.steps[0])  # within the interval: held
        wait_for(lambda: len(throttled.calls) >= 2)
    assert statuses(throttled) == [["submitting", "pending"]], "told without another change or a flush"
    assert throttled.told_at[1] - throttled.told_at[0] >= 0.29, "not before its interval"


def test_a_change_after_a_quiet_spell_waits_for_its_followers(tmp_path: Path) -> None:
    throttled = Throttled(interval=0.3)
    recorder, _, plan = make(tmp_path, throttled)
    with recorder:
        time.sleep(0.5)  # longer than the interval since `started`
        quiet_since = time.monotonic()
        recorder.submitting(plan.steps[0])
        time.sleep(0.05)
        recorder.submitted(plan.steps[0], submission(0))  # its follower, moments later
        wait_for(lambda: len(throttled.calls) >= 2)
        time.sleep(0.4)
    assert statuses(throttled) == [["submitted", "pending"]], "one write shows the change and its follower"
    assert throttled.told_at[1] - quiet_since >= 0.29, "held for the interval from the first of them"


def test_the_end_of_a_job_is_told_at_once_and_shows_the_whole_ledger(tmp_path: Path) -> None:
    throttled = Throttled(interval=30.0)
    recorder, sink, plan = make(tmp_path, throttled)
    with recorder:
        run_steps(recorder, sink, plan)
        started = time.monotonic()
        recorder.finish()  # tells `finished` and flushes
    assert time.monotonic() - started < 10, "the 30 s interval does not delay the job's end"
    assert [hook for hook, _, _ in throttled.calls] == ["started", "finished"], \
        "the held change is superseded by `finished`, which carries the newer ledger"
    assert throttled.calls[-1][1] == "succeeded"


def test_a_failure_is_told_at_once(tmp_path: Path) -> None:
    throttled = Throttled(interval=30.0)
    recorder, _, plan = make(tmp_path, throttled)
    with recorder:
        recorder.submitted(plan.steps[0], submission(0))
        recorder.failed(plan.steps[0], "content policy")
    assert [hook for hook, _, _ in throttled.calls] == ["started", "failed"]
    assert throttled.calls[-1][1] == "failed"


def test_closing_the_ledger_tells_what_is_held_and_ends_the_thread(tmp_path: Path) -> None:
    throttled = Throttled(interval=30.0)
    recorder, _, plan = make(tmp_path, throttled)
    open_before = Messenger.open_count()
    with pytest.raises(RuntimeError), recorder:
        recorder.submitting(plan.steps[0])  # held, then the run stops on an error: no failed hook
        raise RuntimeError("an ambiguous create")
    wait_for(lambda: not recorder._messenger._thread.is_alive())
    assert statuses(throttled) == [["submitting", "pending"]], "the last picture was told at the close"
    assert not recorder._messenger._thread.is_alive() and Messenger.open_count() == open_before - 1


def test_the_interval_stretches_with_the_jobs_open_in_the_process(tmp_path: Path,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(Messenger, "_open", 0)
    first = Messenger([Throttled(interval=1.0)], lambda *_: None)
    assert first.interval(first.observers[0]) == 1.0 and first.interval(FakeObserver()) == 0.0
    more = [Messenger([Throttled(interval=1.0)], lambda *_: None) for _ in range(19)]
    assert first.interval(first.observers[0]) == 20 / messenger.WRITES_PER_SECOND, "20 jobs share the budget"
    for m in [first, *more]:
        m.close()
    wait_for(lambda: Messenger.open_count() == 0)
    assert Messenger.open_count() == 0


def test_transitions_still_reach_a_throttled_observer_in_order(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(messenger, "WRITES_PER_SECOND", 1e9)  # other open jobs in this process: no stretch
    observer = Throttled(interval=0.05)
    recorder, _, plan = make(tmp_path, observer)
    with recorder:
        for step in plan.steps:
            recorder.submitting(step)
            time.sleep(0.15)  # each change after the interval: each is told
        recorder.flush()
    assert observer.transitions == [(0, "submitting"), (1, "submitting")]


class SlowAtTheEnd(FakeObserver):
    """Its `finished` waits until released: a job's last artifact writes to a busy server."""

    def __init__(self) -> None:
        super().__init__()
        self.release = threading.Event()

    def finished(self, manifest: Manifest, final: Any, sheet: Any) -> None:
        self.release.wait(30)
        super().finished(manifest, final, sheet)


def test_the_async_flush_waits_for_the_end_without_holding_a_pool_thread(tmp_path: Path) -> None:
    slow = SlowAtTheEnd()
    recorder, sink, plan = make(tmp_path, slow)

    async def end_of_job() -> list[str]:
        asyncio.get_running_loop().set_default_executor(ThreadPoolExecutor(max_workers=1))
        with recorder:
            run_steps(recorder, sink, plan)
            recorder.finish(flush=False)
            flushing = asyncio.ensure_future(recorder.flushed())
            # the loop's only pool thread is free while the flush waits: a ledger write would not queue
            assert await asyncio.wait_for(asyncio.to_thread(lambda: "free"), timeout=10) == "free"
            assert not flushing.done(), "the observer has not been told the end yet"
            slow.release.set()
            await asyncio.wait_for(flushing, timeout=10)
        return [hook for hook, _, _ in slow.calls]

    assert asyncio.run(end_of_job())[-1] == "finished", "flushed() returned once the end was told"


class QuietStatus(Throttled):
    """Holds a change that only shows a status word for `quiet` seconds (as the artifacts do)."""

    def __init__(self, interval: float, quiet: float) -> None:
        super().__init__(interval)
        self.quiet_interval = quiet

    @staticmethod
    def is_quiet(manifest: Manifest, transition: Any = None) -> bool:
        return getattr(transition, "stage", None) == "status"


def test_a_status_word_alone_waits_for_a_change_that_matters(tmp_path: Path) -> None:
    """`processing` moves no progress: held past the interval, it goes out with the success that follows."""
    throttled = QuietStatus(interval=0.2, quiet=30.0)
    recorder, _, plan = make(tmp_path, throttled)
    with recorder:
        recorder.submitting(plan.steps[0])
        recorder.submitted(plan.steps[0], submission(0))
        wait_for(lambda: len(throttled.calls) >= 2)  # the create's picture, after the interval
        recorder.status(plan.steps[0], "processing")
        time.sleep(0.6)  # three intervals: a change that mattered would have gone out
        assert len(throttled.calls) == 2, "the status word alone is still held"
        recorder.status(plan.steps[0], "queued-again")  # a status word the ledger does not keep: quiet too
        time.sleep(0.3)
        assert len(throttled.calls) == 2, "still held"
        recorder.succeeded(plan.steps[0], rendered(0))
        wait_for(lambda: len(throttled.calls) >= 3)
        time.sleep(0.3)
    assert statuses(throttled) == [["submitted", "pending"], ["succeed", "pending"]], \
        "one write after the create, one with the success; the processing picture was never written alone"


def test_a_status_word_alone_goes_out_after_its_quiet_interval(tmp_path: Path) -> None:
    throttled = QuietStatus(interval=0.1, quiet=0.5)
    recorder, _, plan = make(tmp_path, throttled)
    with recorder:
        recorder.submitted(plan.steps[0], submission(0))
        wait_for(lambda: len(throttled.calls) >= 2)
        held_from = time.monotonic()
        recorder.status(plan.steps[0], "processing")
        wait_for(lambda: len(throttled.calls) >= 3)
        told = time.monotonic()
    assert statuses(throttled)[-1] == ["processing", "pending"]
    assert told - held_from >= 0.45, "held for the quiet interval, not the interval"


def test_a_change_that_matters_after_a_held_status_word_still_waits_for_its_followers(tmp_path: Path) -> None:
    """A success that comes after `processing` was held for a while is not told at once: its store follows
    within moments, and one write shows both."""
    throttled = QuietStatus(interval=0.3, quiet=30.0)
    recorder, sink, plan = make(tmp_path, throttled)
    step = plan.steps[0]
    with recorder:
        recorder.submitted(step, submission(0))
        wait_for(lambda: len(throttled.calls) >= 2)
        recorder.status(step, "processing")
        time.sleep(0.5)  # held longer than the interval
        recorder.succeeded(step, rendered(0))
        time.sleep(0.05)
        recorder.stored(step, sink.write_bytes("job/step-00.mp4", b"not really a video", "video/mp4"))
        wait_for(lambda: len(throttled.calls) >= 3)
        time.sleep(0.5)
    assert statuses(throttled) == [["submitted", "pending"], ["stored", "pending"]], \
        "one write for the success and its store"
