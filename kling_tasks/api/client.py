"""Async Kling client: create / get / get_by_external_id / list / submit / wait, for Kling and CometAPI.

Retries live here and nowhere else in this layer (DESIGN §3): GETs retry transport errors, 5xx/5000-5002 and
1302/1303 with capped, jittered exponential backoff (>= 1 s start); a 1003/1004 re-mints the JWT once and
resends once. A create POST is sent once by ``create``; only ``submit`` (``kling_tasks.api.submit``) may send it
again: when it never left the machine, or after a *proven* lookup found nothing (DESIGN §2.3). 1302/1303 on a
POST are raised, not resent: the slot layer waits and resubmits. Request headers are never logged or put into
an error. Finding tasks by external id and proving lookup forms live in ``kling_tasks.api.lookup``.
"""

from __future__ import annotations

import builtins
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any, ClassVar, Self
from urllib.parse import quote

import anyio
import httpx
from pydantic import ValidationError

from kling_tasks.api.auth import Auth, auth_from_settings
from kling_tasks.api.errors import (
    AuthError,
    InvalidRequestError,
    KlingError,
    KlingProtocolError,
    LookupUnsupportedError,
    TransportError,
    error_for_code,
    error_for_status,
)
from kling_tasks.api.lookup import TaskFinder
from kling_tasks.api.models import TaskKind, TaskRequest, TaskSnapshot
from kling_tasks.api.polling import ExpectedLength, OnUpdate, PollPolicy, wait_for_task
from kling_tasks.api.submit import SubmitResult
from kling_tasks.api.submit import submit as submit_task
from kling_tasks.settings import KlingSettings

__all__ = ["KlingClient", "RetryPolicy", "SubmitResult"]

log = logging.getLogger("kling_tasks.api")

SUCCESS_CODES = (0, 200)  # Kling says 0; some proxies say 200 (reference §18.14)
# httpx errors raised before a single byte of the request left this machine.
_NOT_SENT = (
    httpx.ConnectError,
    httpx.ConnectTimeout,
    httpx.PoolTimeout,
    httpx.UnsupportedProtocol,
    httpx.LocalProtocolError,
)


@dataclass(frozen=True)
class RetryPolicy:
    """Backoff for transient failures: delay n = min(max_delay, base_delay·2ⁿ)·(1 + U(0, jitter))."""

    attempts: int = 4  # total tries of one GET
    base_delay: float = 1.0  # Kling's advice: start at >= 1 s
    max_delay: float = 20.0
    jitter: float = 0.25
    max_posts: int = 3  # total create POSTs one submit() may send
    rng: random.Random = field(default_factory=random.Random, compare=False, repr=False)

    def delay(self, attempt: int) -> float:
        return float(min(self.max_delay, self.base_delay * 2**attempt) * (1.0 + self.rng.uniform(0.0, self.jitter)))


class KlingClient:
    """One pooled ``httpx.AsyncClient``; use ``async with KlingClient(settings) as client``."""

    _lookup_warned: ClassVar[set[str]] = set()

    def __init__(
        self,
        settings: KlingSettings,
        *,
        transport: httpx.AsyncBaseTransport | None = None,
        sleep: Callable[[float], Awaitable[None]] | None = None,
        clock: Callable[[], float] | None = None,
        wall_clock: Callable[[], float] | None = None,
        retry: RetryPolicy | None = None,
        poll_policy: PollPolicy | None = None,
        auth: Auth | None = None,
    ) -> None:
        self.settings = settings
        self._auth = auth or auth_from_settings(settings)  # ConfigError before any request
        self._sleep = sleep or anyio.sleep
        self._clock = clock or time.monotonic
        # Kling's timestamps are epoch times: with a fake `clock`, the same fake clock maps them unless told.
        self._wall_clock = wall_clock or (clock if clock is not None else time.time)
        self._retry = retry or RetryPolicy()
        self._poll = poll_policy or PollPolicy(
            min_interval=settings.poll_min_seconds,
            max_interval=settings.poll_max_seconds,
            processing_timeout=settings.wait_timeout_seconds,
            queue_timeout=settings.queue_timeout_seconds,
            dense_min_interval=0.4 * settings.poll_min_seconds,  # the learned schedule's floor: 2 s by default
        )
        self._prefix = ("/kling" if settings.provider == "cometapi" else "") + "/v1/videos"
        timeout = httpx.Timeout(settings.read_timeout, connect=settings.connect_timeout)
        self._finder = TaskFinder(self)
        self._http = httpx.AsyncClient(
            base_url=settings.base_url,
            transport=transport,
            timeout=timeout,
            follow_redirects=False,
            headers={"Content-Type": "application/json"},  # reference §2: on every call
        )

    def __repr__(self) -> str:
        return f"KlingClient(provider={self.settings.provider!r}, base_url={self.settings.base_url!r})"

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    # ---- HTTP ---------------------------------------------------------------------------------------------

    def _path(self, kind: TaskKind, tail: str | None = None) -> str:
        return f"{self._prefix}/{kind}" + (f"/{quote(tail, safe='')}" if tail is not None else "")

    def _redact(self, text: str) -> str:
        for secret in self._auth.secrets():
            text = text.replace(secret, "***")
        return text

    async def _send_once(
        self,
        method: str,
        path: str,
        json: dict[str, Any] | None,
        params: dict[str, Any] | None,
        external_task_id: str | None,
    ) -> tuple[Any, str | None]:
        headers = {"Authorization": self._auth.authorization(), "Accept": "application/json"}
        try:
            resp = await self._http.request(method, path, json=json, params=params, headers=headers)
        except httpx.RequestError as exc:
            # `from None`: httpx exceptions hold the request (and its Authorization header); don't chain them.
            raise TransportError(
                f"{method} {path} failed: {type(exc).__name__}: {self._redact(str(exc))}",
                may_have_been_sent=not isinstance(exc, _NOT_SENT),
                external_task_id=external_task_id,
            ) from None
        status = resp.status_code
        try:
            body = resp.json()
        except ValueError:
            body = None
        code = body.get("code") if isinstance(body, dict) else None
        if isinstance(body, dict) and isinstance(code, int) and not isinstance(code, bool):
            request_id = body.get("request_id")
            request_id = str(request_id) if request_id is not None else None
            if code in SUCCESS_CODES and resp.is_success:
                return body.get("data"), request_id
            cls = error_for_status(status) if code in SUCCESS_CODES else error_for_code(code, status)
            message = str(body.get("message") or f"HTTP {status}")
            raise cls(
                self._redact(message)[:500],
                request_id=request_id,
                http_status=status,
                code=None if code in SUCCESS_CODES else code,
                external_task_id=external_task_id,
            )
        # Not Kling JSON (a proxy, a load balancer, an HTML error page): fall back on the HTTP status.
        snippet = self._redact(resp.text[:200]).replace("\n", " ")
        if resp.is_success:
            raise KlingProtocolError(
                f"{method} {path}: HTTP {status} body is not a Kling envelope: {snippet!r}",
                http_status=status,
                external_task_id=external_task_id,
            )
        raise error_for_status(status)(
            f"{method} {path}: HTTP {status} without a Kling error body: {snippet!r}",
            http_status=status,
            external_task_id=external_task_id,
        )

    async def _request(
        self,
        method: str,
        path: str,
        *,
        json: dict[str, Any] | None = None,
        params: dict[str, Any] | None = None,
        retry: bool,
        external_task_id: str | None = None,
    ) -> tuple[Any, str | None]:
        reminted = False
        attempt = 0
        while True:
            try:
                return await self._send_once(method, path, json, params, external_task_id)
            except AuthError as exc:
                # 1003/1004: the token was refused, so nothing was created: re-mint once and resend once.
                if exc.code in (1003, 1004) and not reminted and self._auth.force_refresh():
                    reminted = True
                    log.info("%s %s: token refused (code %s), re-minting once", method, path, exc.code)
                    continue
                raise
            except KlingError as exc:
                if not retry or not exc.retryable or attempt + 1 >= self._retry.attempts:
                    raise
                delay = self._retry.delay(attempt)
                attempt += 1
                log.warning("%s %s: %s; retry %d in %.1f s", method, path, exc, attempt, delay)
                await self._sleep(delay)

    def _snapshot(self, data: Any, request_id: str | None, what: str) -> TaskSnapshot:
        if not isinstance(data, dict) or not data.get("task_id"):
            raise KlingProtocolError(f"{what}: success envelope without data.task_id", request_id=request_id)
        try:
            return TaskSnapshot.model_validate({**data, "request_id": request_id})
        except ValidationError as exc:
            problems = "; ".join(f"{'.'.join(map(str, e['loc']))}: {e['msg']}" for e in exc.errors()[:3])
            raise KlingProtocolError(
                f"{what}: unexpected task object ({problems})",
                request_id=request_id,
                task_id=str(data["task_id"]),
            ) from None

    # ---- operations ---------------------------------------------------------------------------------------

    async def create(self, request: TaskRequest, external_task_id: str | None) -> TaskSnapshot:
        """Exactly one create POST (never retried here; only the JWT re-mint may resend it)."""
        body = request.to_body(self.settings.provider)
        if external_task_id is not None:
            body["external_task_id"] = external_task_id
        data, request_id = await self._request(
            "POST", self._path(request.kind), json=body, retry=False, external_task_id=external_task_id
        )
        snap = self._snapshot(data, request_id, f"create {request.kind}")
        if snap.external_task_id is None and external_task_id is not None:
            snap = snap.model_copy(update={"external_task_id": external_task_id})
        log.info(
            "created %s task %s (external_task_id=%s, request_id=%s)",
            request.kind,
            snap.task_id,
            external_task_id,
            request_id,
        )
        return snap

    async def get(self, kind: TaskKind, task_id: str) -> TaskSnapshot:
        if not task_id:
            raise InvalidRequestError("task_id is empty")
        data, request_id = await self._request("GET", self._path(kind, task_id), retry=True)
        if isinstance(data, builtins.list):  # tolerate a one-element list
            data = next((d for d in data if isinstance(d, dict) and str(d.get("task_id")) == task_id), None)
        return self._snapshot(data, request_id, f"get {kind}/{task_id}")

    async def list(self, kind: TaskKind, page_num: int = 1, page_size: int = 30) -> builtins.list[TaskSnapshot]:
        if not (1 <= page_num <= 1000 and 1 <= page_size <= 500):
            raise InvalidRequestError("page_num must be in [1, 1000] and page_size in [1, 500]")
        params = {"pageNum": page_num, "pageSize": page_size}
        data, request_id = await self._request("GET", self._path(kind), params=params, retry=True)
        items = data if isinstance(data, builtins.list) else [] if data is None else [data]
        return [self._snapshot(item, request_id, f"list {kind}") for item in items]

    async def get_by_external_id(self, kind: TaskKind, external_task_id: str) -> TaskSnapshot | None:
        """The task created with ``external_task_id`` per the ``external_id_lookup`` forms, or None.

        Best effort: None proves nothing (the form may not work here; ``submit`` proves forms before
        believing them and also scans the list). LookupUnsupportedError when lookups are ``off``.
        """
        if self.settings.external_id_lookup == "off":
            raise LookupUnsupportedError(
                "looking tasks up by external_task_id is switched off (KLING_EXTERNAL_ID_LOOKUP=off)",
                external_task_id=external_task_id,
            )
        return await self._finder.lookup(kind, external_task_id)

    def remember(self, kind: TaskKind, external_task_id: str, task_id: str) -> None:
        """Register a task known to exist on this provider + base URL (e.g. from the ledger).

        Known tasks are the positive controls that prove a lookup form (DESIGN §2.3); this process's own
        creates and adoptions are remembered automatically. Kept in-process, shared by all clients.
        """
        self._finder.remember(kind, external_task_id, task_id)

    async def submit(
        self,
        request: TaskRequest,
        external_task_id: str,
        *,
        may_exist: bool = False,
        before_post: Callable[[], Awaitable[None]] | None = None,
        adopt_task_id: str | None = None,
        assume_not_created: bool = False,
    ) -> SubmitResult:
        """Create the task for ``external_task_id`` at most once, or adopt it (``kling_tasks.api.submit``).

        ``before_post`` is awaited immediately before every create POST (write the intent there).
        ``may_exist``: an earlier run may have sent this create, so "not found" needs evidence.
        ``adopt_task_id``: GET this task (never POST) and adopt it unless it carries another external id.
        ``assume_not_created``: the user says the earlier ambiguous create made nothing (one POST allowed).
        Raises AmbiguousSubmitError (not retryable) when a create may exist and no lookup can tell.
        """
        return await submit_task(
            self,
            request,
            external_task_id,
            may_exist=may_exist,
            before_post=before_post,
            adopt_task_id=adopt_task_id,
            assume_not_created=assume_not_created,
        )

    def _warn_no_lookup(self) -> None:
        key = f"{self.settings.provider}:{self.settings.base_url}"
        if key not in self._lookup_warned:
            self._lookup_warned.add(key)
            log.warning(
                "provider %s cannot look tasks up by external_task_id (KLING_EXTERNAL_ID_LOOKUP=off): only a "
                "list scan can find an existing task, and an ambiguous create failure will stop with "
                "AmbiguousSubmitError instead of being resent",
                self.settings.provider,
            )

    async def wait(
        self, kind: TaskKind, task_id: str, *, on_update: OnUpdate | None = None, expected: ExpectedLength | None = None
    ) -> TaskSnapshot:
        """Poll until terminal (policy: ``kling_tasks.api.polling``); return the ``succeed`` snapshot.

        ``expected``: what earlier tasks like this one took (the learned schedule); None polls adaptively.
        """

        async def get() -> TaskSnapshot:
            return await self.get(kind, task_id)

        return await wait_for_task(
            get, policy=self._poll, sleep=self._sleep, clock=self._clock, on_update=on_update, task_id=task_id,
            expected=expected, wall_clock=self._wall_clock,
        )
