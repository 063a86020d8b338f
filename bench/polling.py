"""Polling cost vs detection delay: the adaptive PollPolicy against the fixed intervals peer clients use.

Against the Kling emulator with time compressed by --time-scale, and every poll interval compressed by the
same factor, so all results are in "Kling seconds" and do not depend on the scale. Per task we record:
  polls   successful GETs of that task, counted by the emulator (the client's own count is cross-checked);
  delay   client clock when it got the terminal snapshot − the emulator's `updated_at` of that transition,
          divided by the time scale (both clocks are this machine's wall clock).
A second section models the same policies on synthetic tasks of other lengths (no server; the policy's
own code with a simulated clock), because the emulator only produces Kling's *typical* latencies.

    .venv/bin/python bench/polling.py            # ~50 s on 2 cores, writes bench/results/polling.json
    .venv/bin/python bench/polling.py --quick    # ~20 s, 2 tasks per kind and policy
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
from dataclasses import dataclass, field
from typing import Any

import common

from kling_tasks.api import KlingClient, PollPolicy, TaskSnapshot, Text2VideoRequest, VideoExtendRequest
from kling_tasks.settings import KlingSettings

KINDS = ("text2video", "video-extend")
DEFAULT_POLICIES = "adaptive:5:30,adaptive:5:15,fixed:1,fixed:5,fixed:10,fixed:15"
# The fixed-1 s baseline polls ~6x more than the others together; alone in its round it cannot queue them.
SOLO = ("fixed:1",)


def parse_policy(spec: str) -> tuple[float, float]:
    """'adaptive:MIN:MAX' or 'fixed:SECONDS' -> (min, max) in Kling seconds; a fixed policy is min == max."""
    kind, *nums = spec.split(":")
    if kind == "fixed" and len(nums) == 1:
        return float(nums[0]), float(nums[0])
    if kind == "adaptive" and len(nums) == 2:
        return float(nums[0]), float(nums[1])
    raise argparse.ArgumentTypeError(f"bad policy {spec!r}: use adaptive:MIN:MAX or fixed:SECONDS")


def make_policy(spec: str, scale: float, rng: random.Random) -> PollPolicy:
    lo, hi = parse_policy(spec)
    # Timeouts far away: a benchmark must never give up on a task because the machine is loaded.
    return PollPolicy(min_interval=lo * scale, max_interval=hi * scale, processing_timeout=1e6,
                      queue_timeout=1e6, rng=rng)


@dataclass
class Sample:
    policy: str
    kind: str
    task_id: str = ""
    client_polls: int = 0
    seen: dict[str, float] = field(default_factory=dict)  # status -> client wall clock when first seen
    changed: dict[str, float] = field(default_factory=dict)  # status -> emulator updated_at (s)
    rtts: list[float] = field(default_factory=list)


async def one_task(settings: KlingSettings, sample: Sample, policy: PollPolicy, parent_video: str | None,
                   stagger: float) -> None:
    await asyncio.sleep(stagger)  # spread the starts: tasks created together would poll in lock-step
    async with KlingClient(settings, poll_policy=policy) as client:
        request = (Text2VideoRequest(prompt="benchmark clip") if parent_video is None
                   else VideoExtendRequest(video_id=parent_video, prompt="and then"))
        snap = await client.create(request, None)
        sample.task_id = snap.task_id
        get = client.get

        async def timed_get(kind: Any, task_id: str) -> TaskSnapshot:
            start = time.monotonic()
            out = await get(kind, task_id)
            sample.rtts.append(time.monotonic() - start)
            sample.client_polls += 1
            return out

        client.get = timed_get  # type: ignore[method-assign]

        async def on_update(s: TaskSnapshot) -> None:
            sample.seen.setdefault(s.task_status, time.time())
            sample.changed.setdefault(s.task_status, s.updated_at / 1000)

        await client.wait(sample.kind, snap.task_id, on_update=on_update)  # type: ignore[arg-type]


async def make_parent(settings: KlingSettings, scale: float) -> str:
    policy = PollPolicy(min_interval=0.5 * scale, max_interval=0.5 * scale)
    async with KlingClient(settings, poll_policy=policy) as client:
        snap = await client.create(Text2VideoRequest(prompt="the parent of every extension"), None)
        done = await client.wait("text2video", snap.task_id)
    assert done.video is not None
    return done.video.id


async def run_round(settings: KlingSettings, policies: list[str], tasks: int, scale: float, parent: str,
                    seed: int) -> list[Sample]:
    rng = random.Random(seed)
    samples: list[Sample] = []
    jobs = []
    for spec in policies:
        for kind in KINDS:
            for _ in range(tasks):
                sample = Sample(spec, kind)
                samples.append(sample)
                policy = make_policy(spec, scale, random.Random(rng.random()))
                jobs.append(one_task(settings, sample, policy, parent if kind == "video-extend" else None,
                                     rng.uniform(0, 20 * scale)))
    await asyncio.gather(*jobs)
    return samples


def simulate(spec: str, duration: float, trials: int, seed: int) -> tuple[float, float]:
    """Mean (polls, detection delay) for a task of `duration` Kling seconds, 10 % of it queued; exact timing."""
    lo, hi = parse_policy(spec)
    rng = random.Random(seed)
    polls_sum = delay_sum = 0.0
    for _ in range(trials):
        policy = PollPolicy(min_interval=lo, max_interval=hi, rng=random.Random(rng.random()))
        d = duration * rng.uniform(0.9, 1.1)
        queued_until = 0.1 * d
        t, status, since, polls = rng.uniform(0, 1.0), "submitted", 0.0, 0  # first poll ~1 s after create
        while True:
            polls += 1
            now_status = "succeed" if t >= d else "processing" if t >= queued_until else "submitted"
            if now_status != status:
                status, since = now_status, t
            if status == "succeed":
                break
            t += policy.interval(t - since)
        polls_sum += polls
        delay_sum += t - d
    return polls_sum / trials, delay_sum / trials


def summarize(samples: list[Sample], stats: dict[str, Any], scale: float) -> list[dict[str, Any]]:
    rows = []
    keys = sorted({(s.policy, s.kind) for s in samples}, key=lambda k: (k[1], [x.policy for x in samples].index(k[0])))
    for policy, kind in keys:
        group = [s for s in samples if (s.policy, s.kind) == (policy, kind)]
        polls = [float(stats["polls"].get(s.task_id, 0)) for s in group]
        delay = [(s.seen["succeed"] - s.changed["succeed"]) / scale for s in group]
        start_delay = [(s.seen["processing"] - s.changed["processing"]) / scale
                       for s in group if "processing" in s.seen]
        length = [(s.changed["succeed"] - int(stats["tasks"][s.task_id]["created_at"]) / 1000) / scale for s in group]
        rtt = [r for s in group for r in s.rtts]
        rows.append({"policy": policy, "kind": kind, "tasks": len(group), "polls": common.stats(polls),
                     "client_polls_match": all(s.client_polls == stats["polls"].get(s.task_id) for s in group),
                     "detection_delay_kling_s": common.stats(delay),
                     "processing_detection_delay_kling_s": common.stats(start_delay),
                     "task_length_kling_s": common.stats(length),
                     "poll_rtt_ms": common.stats([r * 1000 for r in rtt])})
    return rows


def print_table(title: str, header: list[str], rows: list[list[str]]) -> None:
    widths = [max(len(str(x)) for x in col) for col in zip(header, *rows, strict=True)]
    print(f"\n{title}")
    for row in [header, ["-" * w for w in widths], *rows]:
        print("  ".join(str(x).rjust(w) for x, w in zip(row, widths, strict=True)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--time-scale", type=float, default=0.04, help="emulator latency factor (default 0.04)")
    parser.add_argument("--tasks", type=int, default=5, help="tasks per kind and policy (default 5)")
    parser.add_argument("--policies", default=DEFAULT_POLICIES, help=f"comma-separated (default {DEFAULT_POLICIES})")
    parser.add_argument("--sim-trials", type=int, default=400, help="trials per cell of the model (default 400)")
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--model-only", action="store_true", help="only the model section (no emulator, no file)")
    parser.add_argument("--quick", action="store_true", help="2 tasks per kind and policy at time scale 0.02")
    args = parser.parse_args()
    if args.quick:
        args.tasks, args.time_scale, args.sim_trials = 2, 0.02, 100
    policies = [p.strip() for p in args.policies.split(",") if p.strip()]
    for spec in policies:
        parse_policy(spec)
    scale = float(args.time_scale)
    started = time.monotonic()
    if args.model_only:
        print_model(policies, args.sim_trials, args.seed)
        return

    with common.scratch("bench-polling-") as logs, common.emulator(logs, time_scale=scale) as emu:
        settings = KlingSettings(api_base_url=emu.base_url, access_key=common.AK, secret_key=common.SK)
        parent = asyncio.run(make_parent(settings, scale))
        rounds = [[p for p in policies if p in SOLO], [p for p in policies if p not in SOLO]]
        samples: list[Sample] = []
        for i, group in enumerate(r for r in rounds if r):
            print(f"round {i + 1}: {', '.join(group)} x {args.tasks} tasks x {len(KINDS)} kinds ...", flush=True)
            samples += asyncio.run(run_round(settings, group, args.tasks, scale, parent, args.seed + i))
        stats = emu.stats()
    rows = summarize(samples, stats, scale)

    print_table(f"Measured on the emulator (time scale {scale:g}; Kling seconds)",
                ["kind", "policy", "tasks", "polls mean", "delay mean", "delay p90", "delay max", "length"],
                [[r["kind"], r["policy"], str(r["tasks"]), f"{r['polls']['mean']:.1f}",
                  f"{r['detection_delay_kling_s']['mean']:.1f}", f"{r['detection_delay_kling_s']['p90']:.1f}",
                  f"{r['detection_delay_kling_s']['max']:.1f}", f"{r['task_length_kling_s']['mean']:.0f}"]
                 for r in rows])

    model = print_model(policies, args.sim_trials, args.seed)
    elapsed = time.monotonic() - started
    print(f"\nwall time {elapsed:.0f} s; every client-side poll count matches the emulator's: "
          f"{all(r['client_polls_match'] for r in rows)}")
    path = common.write_result("polling-quick" if args.quick else "polling",
                               {"time_scale": scale, "tasks_per_kind_and_policy": args.tasks,
                                "wall_seconds": round(elapsed, 1), "measured": rows,
                                "model": model, "model_trials": args.sim_trials})
    print(f"wrote {path.relative_to(common.ROOT)}")


def print_model(policies: list[str], trials: int, seed: int) -> list[dict[str, Any]]:
    lengths = [60.0, 164.0, 320.0, 600.0, 1200.0]
    model = []
    for p in policies:
        for d in lengths:
            polls, delay = simulate(p, d, trials, seed)
            model.append({"policy": p, "length_kling_s": d, "polls": round(polls, 1),
                          "detection_delay_kling_s": round(delay, 1)})
    print_table("Model (policy code, simulated clock): polls / mean delay (Kling s) by task length",
                ["policy", *[f"{d:g} s" for d in lengths]],
                [[p, *[f"{m['polls']:.0f} / {m['detection_delay_kling_s']:.1f}" for m in model
                       if m["policy"] == p]] for p in policies])
    return model


if __name__ == "__main__":
    main()
