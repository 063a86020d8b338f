"""submit(): create the task for an external id at most once, or adopt the one that exists (DESIGN §2.3).

1. ``adopt_task_id`` (the user found the task in the console): GET it by task id, never POST; refuse a task
   whose echoed external id is another one.
2. Look for the task (lookup forms, then the list scan: ``kling_tasks.api.lookup``); adopt it if found.
   Not found: POST, unless an earlier run may have sent the create (``may_exist``) and no proven form says
   "not found" (``assume_not_created`` is the user saying so instead).
3. ``before_post`` is awaited immediately before every create POST (the caller's write-ahead intent).
4. POST. A create that never left the machine is resent (bounded). 1302/1303 are raised unchanged (nothing
   was created; the caller waits for a slot). 1201 (duplicate external id): look up and adopt. An ambiguous
   failure (dropped after sending, read timeout, 5xx, an unreadable answer): look up again; adopt if found;
   resend only if a proven form said "not found" twice, the second time after the server has had twice the
   read timeout more to finish a create it was still making, at most ``RetryPolicy.max_posts`` POSTs in all; otherwise
   stop with AmbiguousSubmitError, which says how to settle it from the CLI.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from kling_tasks.api.errors import (
    AmbiguousSubmitError,
    BackPressureError,
    InvalidRequestError,
    KlingError,
    KlingProtocolError,
    NotFoundError,
    ServerError,
    TransportError,
)
from kling_tasks.api.lookup import Search
from kling_tasks.api.models import TaskKind, TaskRequest, TaskSnapshot
from kling_tasks.api.polling import warn_unknown_status

if TYPE_CHECKING:
    from kling_tasks.api.client import KlingClient

__all__ = ["EXTERNAL_ID_RE", "BeforePost", "FoundBy", "SubmitResult", "submit"]

log = logging.getLogger("kling_tasks.api")

EXTERNAL_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
AMBIGUOUS_SETTLE_TIMEOUTS = 2  # read timeouts to wait before a second lookup may license a resend
FoundBy = Literal["created", "lookup", "list", "adopt_task_id", "1201"]
BeforePost = Callable[[], Awaitable[None]]


@dataclass(frozen=True)
class SubmitResult:
    snapshot: TaskSnapshot
    adopted: bool  # True: the task already existed at Kling (this call sent no successful POST)
    via: FoundBy = "created"  # how the task was obtained: created, found by a lookup form / the list, ...


def way_out(ext: str) -> str:
    return (
        f"Check the provider's console for a task with external_task_id {ext}; if it exists, rerun with "
        f"`--adopt {ext}=TASK_ID`; if it does not, rerun with `--assume-not-created {ext}` (this pays for it)."
    )


def ambiguous(ext: str, what: str, search: Search) -> AmbiguousSubmitError:
    return AmbiguousSubmitError(
        f"{what}, and no lookup can prove that no task exists for external_task_id {ext} "
        f"({search.summary()}). {way_out(ext)}",
        external_task_id=ext,
    )


def _adopted(client: KlingClient, kind: TaskKind, snap: TaskSnapshot, ext: str, via: FoundBy, why: str) -> SubmitResult:
    if snap.external_task_id is None:
        snap = snap.model_copy(update={"external_task_id": ext})
    client.remember(kind, ext, snap.task_id)
    log.info(
        "adopted %s task %s (external_task_id=%s, request_id=%s, via %s): %s",
        snap.task_status, snap.task_id, ext, snap.request_id, via, why,
    )  # fmt: skip
    warn_unknown_status(snap)
    return SubmitResult(snapshot=snap, adopted=True, via=via)


def _from_search(
    client: KlingClient, kind: TaskKind, search: Search, why: str, via: FoundBy | None = None
) -> SubmitResult:
    assert search.found is not None and search.via is not None
    how: FoundBy = via or ("list" if search.via == "list" else "lookup")
    return _adopted(client, kind, search.found, search.external_task_id, how, f"{why} (by {search.via})")


async def adopt_by_task_id(client: KlingClient, request: TaskRequest, ext: str, task_id: str) -> SubmitResult:
    try:
        snap = await client.get(request.kind, task_id)
    except NotFoundError as exc:
        raise NotFoundError(
            f"cannot adopt task {task_id} for external_task_id {ext}: no {request.kind} task with that id "
            f"({exc.message})",
            task_id=task_id,
            external_task_id=ext,
            code=exc.code,
            http_status=exc.http_status,
            request_id=exc.request_id,
        ) from None
    if snap.external_task_id is not None and snap.external_task_id != ext:
        raise InvalidRequestError(
            f"refusing to adopt task {task_id} for external_task_id {ext}: the provider says it was created "
            f"with external_task_id {snap.external_task_id}",
            task_id=task_id,
            external_task_id=ext,
        )
    return _adopted(client, request.kind, snap, ext, "adopt_task_id", "task id given by the user")


async def submit(
    client: KlingClient,
    request: TaskRequest,
    external_task_id: str,
    *,
    may_exist: bool = False,
    before_post: BeforePost | None = None,
    adopt_task_id: str | None = None,
    assume_not_created: bool = False,
) -> SubmitResult:
    ext = external_task_id
    if not EXTERNAL_ID_RE.match(ext):
        raise InvalidRequestError(f"external_task_id {ext!r} must match {EXTERNAL_ID_RE.pattern}")
    if adopt_task_id is not None and assume_not_created:
        raise InvalidRequestError(
            f"external_task_id {ext}: adopt_task_id and assume_not_created contradict each other",
            external_task_id=ext,
        )
    kind = request.kind
    if adopt_task_id is not None:
        return await adopt_by_task_id(client, request, ext, adopt_task_id)
    finder = client._finder
    policy = client._retry
    if client.settings.external_id_lookup == "off":
        client._warn_no_lookup()

    # An earlier run may have sent this create: its "not found" needs evidence, as after an ambiguous POST.
    doubtful = may_exist and not assume_not_created
    search = await finder.search(kind, ext, need_evidence=doubtful)
    if search.found is not None:
        return _from_search(client, kind, search, "found before POST")
    if doubtful and not search.evidence:
        raise ambiguous(ext, "An earlier run may have sent the create POST (its intent was recorded, no answer)",
                        search)  # fmt: skip
    if assume_not_created:
        log.warning("external_task_id %s: assuming, as told, that no earlier create made a task; posting", ext)

    posts = 0
    while True:
        if before_post is not None:
            await before_post()
        posts += 1
        failure: KlingError
        try:
            snap = await client.create(request, ext)
        except BackPressureError:
            raise  # a definite refusal that created nothing: the caller waits for a slot and resubmits
        except TransportError as exc:
            if exc.may_have_been_sent:
                failure = exc
            elif posts < policy.max_posts:  # never left this machine: safe to resend
                log.warning("create POST for external_task_id %s was not sent (%s); resending", ext, exc)
                await client._sleep(policy.delay(posts - 1))
                continue
            else:
                raise
        except (ServerError, KlingProtocolError) as exc:
            failure = exc
        except InvalidRequestError as exc:
            # 1201 may mean "duplicate external_task_id" (UNCONFIRMED, ref §3.6): look up and adopt.
            if exc.code != 1201:
                raise
            search = await finder.search(kind, ext, need_evidence=False)
            if search.found is not None:
                return _from_search(client, kind, search, "1201 answer, task exists", via="1201")
            raise
        else:
            client.remember(kind, ext, snap.task_id)
            return SubmitResult(snapshot=snap, adopted=False, via="created")

        # Ambiguous: the POST may have created the task. Find out before anything else.
        log.warning("create POST for external_task_id %s ambiguous (%s); looking it up", ext, failure)
        await client._sleep(policy.delay(posts - 1))  # give the server time to commit a task it took
        can_resend = posts < policy.max_posts
        search = await finder.search(kind, ext, need_evidence=can_resend)
        if search.found is None and search.evidence and can_resend:
            # The server (or a gateway's upstream) may still be making the task it had not answered for: a
            # "not found" now is not "never". It counts once the server has had twice as long as we waited.
            settle = AMBIGUOUS_SETTLE_TIMEOUTS * client.settings.read_timeout
            log.warning("external_task_id %s: no task yet after an ambiguous POST; looking again in %.0f s before "
                        "any resend", ext, settle)  # fmt: skip
            await client._sleep(settle)
            search = await finder.search(kind, ext, need_evidence=True)
        if search.found is not None:
            return _from_search(client, kind, search, "found after an ambiguous POST")
        what = f"The create POST for external_task_id {ext} failed ambiguously ({failure})"
        if not search.evidence:
            raise ambiguous(ext, what, search) from None
        if not can_resend:
            raise failure  # proven: nothing was created, but the POST budget is spent
        log.warning("external_task_id %s: a proven %s lookup found no task after an ambiguous POST; resending",
                    ext, search.proven_absent)  # fmt: skip
