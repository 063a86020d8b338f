"""A pool of threads of its own for the long blocking calls: a video's download and upload, copies, stitching.

Everything blocking runs off the event loop (many jobs share it). `asyncio.to_thread` uses the loop's default
pool, which has min(32, cores + 4) threads: 6 on 2 cores. A batch's stores of large videos into S3 take
seconds to minutes each; in that pool six of them made every other job's ledger writes wait, and among those
is the write-ahead intent a create's POST waits for. Transfers run here instead, so the default pool stays free
for the short calls (ledger writes, heads, reads of a manifest).
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import ParamSpec, TypeVar

# Transfers at once in one process: each holds a connection and a part buffer (S3: 4 parts of 5 MiB at once,
# kling_tasks.storage), so this bounds the process's transfer memory as well as its threads.
TRANSFER_THREADS = 16

P = ParamSpec("P")
R = TypeVar("R")

_POOL = ThreadPoolExecutor(max_workers=TRANSFER_THREADS, thread_name_prefix="kling-transfer")


async def run_transfer(fn: Callable[P, R], *args: P.args, **kwargs: P.kwargs) -> R:
    """`fn(*args, **kwargs)` in a transfer thread, in this task's context (the run's logger), as to_thread does."""
    call = functools.partial(contextvars.copy_context().run, fn, *args, **kwargs)
    return await asyncio.get_running_loop().run_in_executor(_POOL, call)
