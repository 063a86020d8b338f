"""Polls per task and detection delay, task lengths 60 s to 1200 s: the learned schedule against today's adaptive
policy and the fixed intervals peer clients use (5 s, 10 s, and the seed's 15 s).

Measured: one Kling emulator per task length (child processes, all at once), each with its latency scaled so its
text2video tasks take about --wall-seconds (compress = wall / length); every poll interval is compressed by the
same factor, so results are in Kling seconds. One wall length for all keeps the machine's own latency (a loaded
event loop, the emulator's 20 ms ticker) the same small share of every task. Per length, --warm-up tasks polled
adaptively teach a TaskLengthBook (kling_tasks.task_lengths, on an in-memory store) what this account's tasks
take, then every policy waits on --tasks tasks at once. Per task:
  polls   successful GETs of the task counted by the emulator (cross-checked with the client's own count);
  delay   client clock at the terminal snapshot - the emulator's `updated_at` of `succeed`, / compress.
Model: the same policy code (kling_tasks.api.polling.wait_for_task) on a simulated clock, --sim-trials tasks
per cell shaped like the emulator's (length ±10 %, 10 % queued), 8 earlier tasks of history for `learned`.

    .venv/bin/python bench/polling.py            # ~1 min, writes bench/results/polling.json
    .venv/bin/python bench/polling.py --quick    # ~10 s: 60 s and 320 s, 2 tasks per policy
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
from contextlib import ExitStack
from dataclasses import dataclass, field
from typing import Any

import common

from kling_tasks.api import ExpectedLength, KlingClient, PollPolicy, TaskSnapshot, Text2VideoRequest
from kling_tasks.api.polling import wait_for_task
from kling_tasks.settings import KlingSettings
from kling_tasks.task_lengths import MemoryStore, TaskLengthBook, length_key

EMULATOR_T2V_LATENCY = 319.0  # kling_emulator.catalog.LATENCY["text2video"]
LENGTHS = (60.0, 164.0, 320.0, 600.0, 1200.0)
DEFAULT_POLICIES = "learned,adaptive:5:15,fixed:5,fixed:10,fixed:15"
KEY = length_key("text2video", "kling-v1", "std", "5")


def parse_policy(spec: str) -> tuple[str, float, float]:
    """'learned', 'adaptive:MIN:MAX' or 'fixed:SECONDS' -> (kind, min, max) in Kling seconds."""
    kind, *nums = spec.split(":")
    if kind == "learned" and not nums:
        return "learned", 5.0, 15.0  # the project's defaults; below them when there is no history
    if kind == "fixed" and len(nums) == 1:
        return "fixed", float(nums[0]), float(nums[0])
    if kind == "adaptive" and len(nums) == 2:
        return "adaptive", float(nums[0]), float(nums[1])
    raise argparse.ArgumentTypeError(f"bad policy {spec!r}: use learned, adaptive:MIN:MAX or fixed:SECONDS")


def make_policy(spec: str, scale: float, rng: random.Random) -> PollPolicy:
    _, lo, hi = parse_policy(spec)
    # Timeouts far away: a benchmark must never give up on a task because the machine is loaded. The learned
    # schedule's floor is what the client derives from KLING_POLL_MIN_SECONDS (40 %, 2 s by default).
    return PollPolicy(min_interval=lo * scale, max_interval=hi * scale, dense_min_interval=0.4 * lo * scale,
                      processing_timeout=1e6, queue_timeout=1e6, rng=rng)


@dataclass
class Sample:
    policy: str
    length: float
    task_id: str = ""
    client_polls: int = 0
    seen: dict[str, float] = field(default_factory=dict)  # status -> client wall clock when first seen
    changed: dict[str, float] = field(default_factory=dict)  # status -> emulator updated_at (s)
    queued_s: float = 0.0
    processing_s: float = 0.0


async def one_task(client: KlingClient, sample: Sample, policy: PollPolicy, expected: ExpectedLength | None,
                   stagger: float) -> None:
    """Create a task and wait for it with `policy`: the client's own wait loop (wait_for_task), one shared pool."""
    await asyncio.sleep(stagger)  # spread the starts: tasks created together would poll in lock-step
    snap = await client.create(Text2VideoRequest(prompt="benchmark clip"), None)
    sample.task_id = snap.task_id

    async def get() -> TaskSnapshot:
        sample.client_polls += 1
        return await client.get("text2video", snap.task_id)

    async def on_update(s: TaskSnapshot) -> None:
        sample.seen.setdefault(s.task_status, time.time())
        sample.changed.setdefault(s.task_status, s.updated_at / 1000)

    final = await wait_for_task(get, policy=policy, sleep=asyncio.sleep, on_update=on_update, task_id=snap.task_id,
                                expected=expected)
    started = sample.changed.get("processing", final.created_at / 1000)  # Kling's clock, not ours
    sample.queued_s = started - final.created_at / 1000
    sample.processing_s = final.updated_at / 1000 - started


async def one_length(emu: common.Emulator, length: float, policies: list[str], tasks: int, warm_up: int,
                     compress: float, seed: int) -> tuple[list[Sample], dict[str, Any]]:
    # Generous connect/read timeouts: on a loaded machine a burst of creates can wait seconds for the emulator.
    settings = KlingSettings(api_base_url=emu.base_url, access_key=common.AK, secret_key=common.SK,
                             connect_timeout=60, read_timeout=120)
    async with KlingClient(settings) as client:
        return await _one_length(client, emu, length, policies, tasks, warm_up, compress, seed)


async def _one_length(client: KlingClient, emu: common.Emulator, length: float, policies: list[str], tasks: int,
                      warm_up: int, compress: float, seed: int) -> tuple[list[Sample], dict[str, Any]]:
    rng = random.Random(seed)
    book = TaskLengthBook(MemoryStore(), flush_delay=0)
    # What this account's earlier tasks took: polled like today, their lengths learned.
    learning = [Sample("warm-up", length) for _ in range(warm_up)]
    await asyncio.gather(*(one_task(client, s, make_policy("adaptive:5:15", compress, random.Random(rng.random())),
                                    None, rng.uniform(0, 5 * compress)) for s in learning))
    for s in learning:
        book.record(KEY, s.queued_s, s.processing_s)
    expected = await book.expected(KEY)
    samples, jobs = [], []
    for spec in policies:
        for _ in range(tasks):
            sample = Sample(spec, length)
            samples.append(sample)
            jobs.append(one_task(client, sample, make_policy(spec, compress, random.Random(rng.random())),
                                 expected if spec == "learned" else None, rng.uniform(0, 10 * compress)))
    await asyncio.gather(*jobs)
    return samples, emu.stats()


def summarize(samples: list[Sample], stats: dict[str, Any], compress: float) -> list[dict[str, Any]]:
    rows = []
    for policy in dict.fromkeys(s.policy for s in samples):
        group = [s for s in samples if s.policy == policy]
        polls = [float(stats["polls"].get(s.task_id, 0)) for s in group]
        delay = [(s.seen["succeed"] - s.changed["succeed"]) / compress for s in group]
        length = [(s.changed["succeed"] - int(stats["tasks"][s.task_id]["created_at"]) / 1000) / compress
                  for s in group]
        share = [d / n for d, n in zip(delay, length, strict=True)]
        rows.append({"policy": policy, "length_kling_s": group[0].length, "tasks": len(group),
                     "polls": common.stats(polls),
                     "client_polls_match": all(s.client_polls == stats["polls"].get(s.task_id) for s in group),
                     "detection_delay_kling_s": common.stats(delay),
                     "detection_delay_share": common.stats(share),
                     "task_length_kling_s": common.stats(length)})
    return rows


class SimulatedTask:
    """A task on a simulated clock, shaped like the emulator's: `submitted` for 10 %, then `processing`."""

    def __init__(self, length: float, rng: random.Random) -> None:
        total = length * rng.uniform(0.9, 1.1)
        self.created = self.now = 1_000_000.0
        self.started, self.done = self.created + 0.1 * total, self.created + total
        self.now += rng.uniform(0.5, 1.5)  # the first poll, just after the create
        self.polls = 0

    async def sleep(self, seconds: float) -> None:
        self.now += seconds

    async def get(self) -> TaskSnapshot:
        self.polls += 1
        status, changed = (("succeed", self.done) if self.now >= self.done else
                           ("processing", self.started) if self.now >= self.started else ("submitted", self.created))
        videos = [{"id": "v", "url": "https://cdn.example/v.mp4", "duration": "5.0"}] if status == "succeed" else []
        return TaskSnapshot.model_validate({"task_id": "1", "task_status": status, "task_result": {"videos": videos},
                                            "created_at": int(self.created * 1000), "updated_at": int(changed * 1000)})


def simulate(spec: str, length: float, trials: int, seed: int) -> tuple[float, float, float]:
    """Mean polls, mean detection delay (Kling s) and max polls over `trials` simulated tasks."""
    rng = random.Random(seed)

    async def one() -> tuple[int, float]:
        history = [length * rng.uniform(0.9, 1.1) for _ in range(8)]
        expected = ExpectedLength(tuple(0.1 * h for h in history), tuple(0.9 * h for h in history))
        task = SimulatedTask(length, rng)
        await wait_for_task(task.get, policy=make_policy(spec, 1.0, random.Random(rng.random())), sleep=task.sleep,
                            clock=lambda: task.now, wall_clock=lambda: task.now,
                            expected=expected if spec == "learned" else None)
        return task.polls, task.now - task.done

    async def all_trials() -> list[tuple[int, float]]:
        return [await one() for _ in range(trials)]

    results = asyncio.run(all_trials())
    return (sum(p for p, _ in results) / trials, sum(d for _, d in results) / trials, max(p for p, _ in results))


def print_table(title: str, header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
    print(f"\n{title}")
    for row in [header, ["-" * w for w in widths], *rows]:
        print("  ".join(str(x).rjust(w) for x, w in zip(row, widths, strict=True)))


def model(policies: list[str], lengths: list[float], trials: int, seed: int) -> list[dict[str, Any]]:
    out = []
    for p in policies:
        for d in lengths:
            polls, delay, most = simulate(p, d, trials, seed)
            out.append({"policy": p, "length_kling_s": d, "polls": round(polls, 2), "polls_max": most,
                        "detection_delay_kling_s": round(delay, 2), "detection_delay_share": round(delay / d, 4)})
    print_table("Model (policy code, simulated clock): polls / mean delay as % of the length",
                ["policy", *[f"{d:g} s" for d in lengths]],
                [[p, *[f"{m['polls']:.1f} / {100 * m['detection_delay_share']:.1f}%" for m in out
                       if m["policy"] == p]] for p in policies])
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--wall-seconds", type=float, default=20.0, help="wall seconds per task (default 20)")
    parser.add_argument("--lengths", default=",".join(f"{x:g}" for x in LENGTHS), help="task lengths, Kling s")
    parser.add_argument("--tasks", type=int, default=5, help="tasks per length and policy (default 5)")
    parser.add_argument("--warm-up", type=int, default=5, help="earlier tasks per length that teach it (default 5)")
    parser.add_argument("--policies", default=DEFAULT_POLICIES, help=f"comma-separated (default {DEFAULT_POLICIES})")
    parser.add_argument("--sim-trials", type=int, default=400, help="trials per cell of the model (default 400)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--model-only", action="store_true", help="only the model section (no emulator, no file)")
    parser.add_argument("--quick", action="store_true", help="60 s and 320 s, 3 s tasks, 2 tasks, 3 warm-up")
    args = parser.parse_args()
    if args.quick:
        args.lengths, args.wall_seconds, args.tasks, args.warm_up, args.sim_trials = "60,320", 3.0, 2, 3, 50
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    for spec in policies:
        parse_policy(spec)
    lengths = [float(x) for x in args.lengths.split(",") if x.strip()]
    started = time.monotonic()
    if args.model_only:
        model(policies, lengths, args.sim_trials, args.seed)
        return
    with ExitStack() as stack:
        logs = stack.enter_context(common.scratch("bench-polling-"))
        emus = {}
        for length in lengths:  # one emulator per length, each logging in a folder of its own
            (logs / f"{length:g}").mkdir()
            emus[length] = stack.enter_context(common.emulator(
                logs / f"{length:g}", time_scale=args.wall_seconds / EMULATOR_T2V_LATENCY, concurrency=200))
        print(f"{len(lengths)} task lengths at once ({', '.join(f'{x:g}' for x in lengths)} Kling s): "
              f"{args.warm_up} warm-up tasks, then {', '.join(policies)} x {args.tasks} tasks ...", flush=True)

        async def every_length() -> list[tuple[list[Sample], dict[str, Any]]]:
            return await asyncio.gather(*(one_length(emus[n], n, policies, args.tasks, args.warm_up,
                                                     args.wall_seconds / n, args.seed + i)
                                          for i, n in enumerate(lengths)))

        measured = asyncio.run(every_length())
        rows = [row for (samples, stats), n in zip(measured, lengths, strict=True)
                for row in summarize(samples, stats, args.wall_seconds / n)]
    print_table(f"Measured on the emulator (~{args.wall_seconds:g} s of wall time per task; Kling seconds)",
                ["length", "policy", "tasks", "polls mean", "polls max", "delay mean", "delay %", "delay p90"],
                [[f"{r['length_kling_s']:g}", r["policy"], str(r["tasks"]), f"{r['polls']['mean']:.1f}",
                  f"{r['polls']['max']:.0f}", f"{r['detection_delay_kling_s']['mean']:.1f}",
                  f"{100 * r['detection_delay_share']['mean']:.1f}", f"{r['detection_delay_kling_s']['p90']:.1f}"]
                 for r in rows])
    modelled = model(policies, lengths if not args.quick else [60.0, 320.0, 1200.0], args.sim_trials, args.seed)
    elapsed = time.monotonic() - started
    print(f"\nwall time {elapsed:.0f} s; every client-side poll count matches the emulator's: "
          f"{all(r['client_polls_match'] for r in rows)}")
    path = common.write_result("polling-quick" if args.quick else "polling",
                               {"wall_seconds_per_task": args.wall_seconds, "tasks_per_length_and_policy": args.tasks,
                                "warm_up_tasks": args.warm_up, "wall_seconds": round(elapsed, 1), "measured": rows,
                                "model": modelled, "model_trials": args.sim_trials})
    print(f"wrote {path.relative_to(common.ROOT)}")


if __name__ == "__main__":
    main()
