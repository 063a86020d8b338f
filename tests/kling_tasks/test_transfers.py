"""Transfers run in a pool of their own: a batch's long stores never make its short ledger writes wait."""

from __future__ import annotations

import asyncio
import threading

from kling_tasks.transfers import TRANSFER_THREADS, run_transfer


def test_the_loops_pool_stays_free_while_transfers_block() -> None:
    async def scenario() -> tuple[int, str]:
        release = threading.Event()
        started = threading.Semaphore(0)

        def long_transfer() -> str:
            started.release()
            release.wait(30)
            return threading.current_thread().name

        transfers = [asyncio.ensure_future(run_transfer(long_transfer)) for _ in range(TRANSFER_THREADS)]
        for _ in transfers:
            await asyncio.to_thread(started.acquire, True, 30)  # every transfer thread is busy now
        # The loop's default pool has min(32, cores + 4) threads: with the transfers in it this would wait 30 s.
        short = await asyncio.wait_for(asyncio.to_thread(lambda: 7), timeout=10)
        release.set()
        names = await asyncio.gather(*transfers)
        return short, names[0]

    short, name = asyncio.run(scenario())
    assert short == 7, "a short blocking call ran while every transfer thread was busy"
    assert name.startswith("kling-transfer")
