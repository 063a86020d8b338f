"""The gated Prefect client against a real Prefect server: the pool sees a short queue, every place comes back, and
the runs of a batch's block share the one client."""

from __future__ import annotations

import asyncio
import socket
import threading
from typing import Any

import httpx
import pytest
from prefect import flow, get_client
from prefect.context import get_run_context

from kling_tasks import prefect_api
from kling_tasks.prefect_api import GatedTransport, gated_prefect_client, jobs_in_this_process

pytestmark = pytest.mark.anyio


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


class InsideCounter(httpx.AsyncBaseTransport):
    """The pool's view: how many requests are inside at once (from entry until their body is closed)."""

    def __init__(self) -> None:
        self.inner = httpx.AsyncHTTPTransport(limits=prefect_api.POOL_LIMITS)
        self.inside = self.most = 0

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.inside += 1
        self.most = max(self.most, self.inside)
        try:
            response = await self.inner.handle_async_request(request)
        except BaseException:
            self.inside -= 1
            raise
        assert isinstance(response.stream, httpx.AsyncByteStream)
        return httpx.Response(response.status_code, headers=response.headers, extensions=response.extensions,
                              stream=prefect_api._ReleasingStream(response.stream, self.left))

    def left(self) -> None:
        self.inside -= 1

    async def aclose(self) -> None:
        await self.inner.aclose()


async def health_checks(transport: httpx.AsyncBaseTransport, api_url: str, count: int) -> list[int]:
    # httpx's 5 s default would count a loaded machine's queue for the pool as a failure (PoolTimeout)
    async with httpx.AsyncClient(transport=transport, base_url=api_url, timeout=60) as client:
        answers = await asyncio.gather(*(client.get("/health") for _ in range(count)))
    return [answer.status_code for answer in answers]


async def test_the_pool_holds_at_most_its_connections_worth_of_requests(prefect_server: Any) -> None:
    ungated = InsideCounter()
    assert await health_checks(ungated, prefect_server.api_url, 200) == [200] * 200
    assert ungated.most > 50, "without the gate every request waits inside the pool"

    counted = InsideCounter()
    assert await health_checks(GatedTransport(counted, at_once=4), prefect_server.api_url, 200) == [200] * 200
    assert 1 <= counted.most <= 4, counted.most
    assert counted.inside == 0, "every body was closed and its place given back"


async def test_a_request_that_fails_gives_its_place_back() -> None:
    with socket.socket() as probe:  # a port with nobody listening
        probe.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{probe.getsockname()[1]}"
    transport = GatedTransport(httpx.AsyncHTTPTransport(), at_once=1)
    async with httpx.AsyncClient(transport=transport, base_url=url) as client:
        for _ in range(3):  # with a leaked place the second would wait forever
            with pytest.raises(httpx.ConnectError):
                await asyncio.wait_for(client.get("/"), timeout=10)


async def test_runs_in_the_block_share_its_client(prefect_server: Any) -> None:
    @flow
    async def job_run() -> int:
        return id(get_run_context().client)

    async with gated_prefect_client():
        shared = get_client()
        assert get_client() is shared, "get_client() hands back the block's client, not a new one per call"
        assert isinstance(shared._client._transport, GatedTransport)  # private: what the client sends through
        assert await job_run() == id(shared), "a flow run started in the block uses the block's client"
        assert (await shared.hello()).status_code == 200
    assert get_client() is not shared


async def test_subflows_in_the_jobs_block_start_no_heartbeat_thread(prefect_server: Any) -> None:
    """Prefect heartbeats every flow run from a thread of its own; a batch's job subflows start none (nothing
    watches a subflow's heartbeats), while the batch's own run, started before the block, keeps its thread."""
    from prefect.settings import PREFECT_FLOWS_HEARTBEAT_FREQUENCY, temporary_settings

    def heartbeat_threads() -> int:
        # Prefect's heartbeat thread has no name: it is the one running its `heartbeat_loop` (Thread._args)
        return sum(any(getattr(arg, "__name__", "") == "heartbeat_loop" for arg in getattr(thread, "_args", ()))
                   for thread in threading.enumerate())

    @flow
    async def job_run() -> int:
        return heartbeat_threads()

    @flow
    async def batch_run() -> tuple[int, int, int]:
        batch_only = heartbeat_threads()
        async with jobs_in_this_process():
            inside = await job_run()
        alone = await job_run()  # after: a finished subflow's thread may outlive it by a second
        return batch_only, alone, inside

    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: 30}):
        batch_only, alone, inside = await batch_run()
    assert batch_only >= 1, "the batch's own run heartbeats"
    assert alone == batch_only + 1, "a subflow outside the block starts its own heartbeat thread"
    assert inside == batch_only, "a job's subflow in the block starts none"
