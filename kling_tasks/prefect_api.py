"""What the jobs a batch runs in this process share: one Prefect API client with a short queue in front of its
pool, and subflow runs without heartbeat threads (`jobs_in_this_process`).

httpcore's connection pool (httpx's, under Prefect's client) re-examines every waiting request whenever a
connection frees, and offers the free connection to all of them (encode/httpcore#1035): with hundreds of
requests waiting on Prefect's 16 connections, that bookkeeping grows with the square of the queue (a profile
of 500 jobs started at once put most of the worker's samples there). `GatedTransport` lets only as many
requests into the pool as it has connections; the others wait their turn in a semaphore, which wakes one
waiter per free place. Measured (bench/overhead.py, 500-job burst): worker CPU per step 0.31-0.33 s without,
0.28 s with; no change at 200 jobs, where the queue is short.
"""

from __future__ import annotations

import asyncio
import ssl
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager

import httpx
from prefect import get_client
from prefect.context import AsyncClientContext
from prefect.settings import (
    PREFECT_API_ENABLE_HTTP2,
    PREFECT_API_SSL_CERT_FILE,
    PREFECT_API_TLS_INSECURE_SKIP_VERIFY,
    PREFECT_FLOWS_HEARTBEAT_FREQUENCY,
    temporary_settings,
)

# Prefect's own pool for an API URL (prefect.client.orchestration.PrefectClient), kept as it is.
CONNECTIONS = 16
POOL_LIMITS = httpx.Limits(max_connections=CONNECTIONS, max_keepalive_connections=8, keepalive_expiry=25)
RETRIES = 3  # connection retries, as Prefect sets on its pool


class _ReleasingStream(httpx.AsyncByteStream):
    """A response body that gives its request's place back when it is closed (its connection is busy until then)."""

    def __init__(self, stream: httpx.AsyncByteStream, release: Callable[[], None]) -> None:
        self._stream = stream
        self._release: Callable[[], None] | None = release

    async def __aiter__(self) -> AsyncIterator[bytes]:
        async for chunk in self._stream:
            yield chunk

    async def aclose(self) -> None:
        try:
            await self._stream.aclose()
        finally:
            if self._release is not None:
                release, self._release = self._release, None
                release()


class GatedTransport(httpx.AsyncBaseTransport):
    """At most `at_once` requests inside `inner` at a time; a request keeps its place until its body is closed."""

    def __init__(self, inner: httpx.AsyncBaseTransport, at_once: int = CONNECTIONS) -> None:
        self._inner = inner
        self._gate = asyncio.Semaphore(at_once)

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        await self._gate.acquire()
        try:
            response = await self._inner.handle_async_request(request)
        except BaseException:
            self._gate.release()
            raise
        assert isinstance(response.stream, httpx.AsyncByteStream)
        return httpx.Response(status_code=response.status_code, headers=response.headers,
                              stream=_ReleasingStream(response.stream, self._gate.release),
                              extensions=response.extensions)

    async def aclose(self) -> None:
        await self._inner.aclose()


def _tls_context() -> ssl.SSLContext:
    """What Prefect's client verifies the API with (a custom transport does not get the client's `verify`)."""
    if PREFECT_API_TLS_INSECURE_SKIP_VERIFY.value():
        context = ssl.create_default_context()
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
        return context
    cert_file = PREFECT_API_SSL_CERT_FILE.value()
    return ssl.create_default_context(cafile=cert_file) if cert_file else httpx.create_ssl_context()


@asynccontextmanager
async def gated_prefect_client() -> AsyncIterator[None]:
    """Inside the block, `get_client()` and the flow and task runs it starts (subflows of this event loop) share
    one client whose requests queue in a `GatedTransport`."""
    inner = httpx.AsyncHTTPTransport(verify=_tls_context(), limits=POOL_LIMITS, retries=RETRIES,
                                     http2=bool(PREFECT_API_ENABLE_HTTP2.value()))
    client = get_client(httpx_settings={"transport": GatedTransport(inner)})
    # Built with model_construct so that its httpx settings read as the defaults: get_client() (ours, Prefect's
    # engines') then hands this client back instead of making one per call.
    context = AsyncClientContext.model_construct(client=client)
    async with context:
        # Prefect's client fetches a CSRF token before its first change request, without a lock: hundreds of
        # jobs starting together would each fetch one. One change request first (a one-run filter) fetches it.
        await client.read_flow_runs(limit=1)
        yield


@asynccontextmanager
async def jobs_in_this_process() -> AsyncIterator[None]:
    """The block a batch runs its jobs' subflows in: the gated client above, and no heartbeats for the subflows.

    Prefect 3.9 heartbeats every flow run (PREFECT_FLOWS_HEARTBEAT_FREQUENCY, 180 s by default) from a thread
    of its own that wakes every second: 500 jobs in one process ran 500 of them, and sent an event per job
    every 3 minutes. A job's subflow run belongs to no deployment, so nothing watches those heartbeats (the
    crash automation, kling_tasks.recovery, watches deployment runs): the batch's own run, started before
    this block, keeps its heartbeat, and a lost worker is found by it.
    """
    with temporary_settings(updates={PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
        async with gated_prefect_client():
            yield
