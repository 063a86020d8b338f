"""Finding a task by its ``external_task_id``, and proving that a "not found" can be believed (DESIGN §2.3).

Ways to find a task, in order: the lookup forms allowed by ``KLING_EXTERNAL_ID_LOOKUP`` (``auto`` = query then
path; ``query``; ``path``; ``off`` = none), then a scan of the first list pages of the kind. A listed task that
carries our external id counts as found, so the scan works even when both forms are broken or off.

"Not found" is evidence only from a form *proven* on this provider + base URL by a positive control (DESIGN
§2.3): the form found a task we know exists, and only it (a query answer must hold the control task and no
task with another external id, or a server that ignores the filter would pass). A form is one wire shape for
every kind, so a control of any kind proves it: a video-extend lookup is proven by the text2video task the
extension continues. Known tasks: those this process created or adopted and those registered with
``remember`` (this kind's first); when none is known, a task with an external id from list page 1. Proofs
and known tasks are class-level (in-process), keyed by provider and base URL. A list
scan that finds nothing is never evidence (pages are few and the sort order is undocumented).
"""

from __future__ import annotations

import builtins
import logging
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar, Literal

from kling_tasks.api.errors import InvalidRequestError, KlingError, KlingProtocolError, NotFoundError
from kling_tasks.api.models import TaskKind, TaskSnapshot

if TYPE_CHECKING:
    from kling_tasks.api.client import KlingClient

__all__ = ["LIST_PAGES", "LIST_PAGE_SIZE", "Form", "FormAnswer", "Search", "TaskFinder", "forms_for"]

log = logging.getLogger("kling_tasks.api")

Form = Literal["query", "path"]
FoundVia = Literal["query", "path", "list"]
Outcome = Literal["found", "absent", "unsupported", "error"]

LIST_PAGES = 3  # the list scan reads at most this many pages...
LIST_PAGE_SIZE = 100  # ...of this size, and stops at a short page
KNOWN_PER_KIND = 64  # known tasks kept per (provider, base URL, kind)
CONTROLS_TRIED = 2  # known tasks tried as positive controls before a form counts as unproven


def forms_for(mode: str) -> tuple[Form, ...]:
    """The lookup forms a ``KLING_EXTERNAL_ID_LOOKUP`` value allows, in the order they are tried."""
    if mode == "auto":
        return ("query", "path")
    if mode == "query":
        return ("query",)
    if mode == "path":
        return ("path",)
    return ()


@dataclass(frozen=True)
class FormAnswer:
    """What one lookup form said about one external id."""

    form: Form
    outcome: Outcome
    matches: tuple[TaskSnapshot, ...] = ()  # tasks carrying the external id asked for
    items: tuple[TaskSnapshot, ...] = ()  # every task in the answer (for the query form's control)
    problem: str | None = None


@dataclass
class Search:
    """The result of looking for one external id: the task (and how it was found), or why not."""

    external_task_id: str
    found: TaskSnapshot | None = None
    via: FoundVia | None = None
    answers: list[FormAnswer] = field(default_factory=list)
    proven_absent: Form | None = None  # a proven form said "not found": evidence that no task exists
    problems: list[str] = field(default_factory=list)
    pages: dict[int, tuple[builtins.list[TaskSnapshot], int]] = field(default_factory=dict, repr=False)

    @property
    def evidence(self) -> bool:
        return self.proven_absent is not None

    def summary(self) -> str:
        """Why nothing was found and nothing is proven, in one line (for AmbiguousSubmitError)."""
        parts = []
        for ans in self.answers:
            if ans.outcome == "absent":
                proven = "proven" if ans.form == self.proven_absent else "not proven on this provider"
                parts.append(f"{ans.form} lookup: not found ({proven})")
            else:
                parts.append(f"{ans.form} lookup: {ans.outcome}" + (f" ({ans.problem})" if ans.problem else ""))
        if not self.answers:
            parts.append("lookup by external_task_id is off")
        scanned = len(self.pages)
        parts.append(f"list scan of {scanned} page(s): not found" if scanned else "no list scan")
        parts.extend(p for p in self.problems if p not in parts)
        return "; ".join(parts)


def pick_oldest(matches: builtins.list[TaskSnapshot] | tuple[TaskSnapshot, ...], ext: str) -> TaskSnapshot:
    """One task for ``ext``: the oldest when a provider that does not enforce uniqueness holds several."""
    unique = {m.task_id: m for m in matches}
    chosen = min(unique.values(), key=lambda s: (s.created_at, s.task_id))
    if len(unique) > 1:
        log.warning(
            "%d tasks carry external_task_id %s (%s): adopting the oldest, %s",
            len(unique),
            ext,
            ", ".join(sorted(unique)),
            chosen.task_id,
        )
    return chosen


class TaskFinder:
    """Lookups, list scans and positive controls for one client; the caches below are shared in-process."""

    _known: ClassVar[dict[tuple[str, str, str], OrderedDict[str, str]]] = {}  # (prov, url, kind) -> ext -> id
    _proofs: ClassVar[set[tuple[str, str, str]]] = set()  # (provider, base_url, form)
    _tried: ClassVar[set[tuple[str, str, str]]] = set()  # forms put to a control before a first create (believed)
    _lock: ClassVar[threading.Lock] = threading.Lock()

    def __init__(self, client: KlingClient) -> None:
        self._client = client
        self._account = (client.settings.provider, client.settings.base_url)

    @classmethod
    def forget_all(cls) -> None:
        """Drop every known task and proof (tests; a process that switched accounts)."""
        with cls._lock:
            cls._known.clear()
            cls._proofs.clear()
            cls._tried.clear()

    # ---- known tasks and proofs -----------------------------------------------------------------------------

    def remember(self, kind: TaskKind, external_task_id: str, task_id: str) -> None:
        if not external_task_id or not task_id:
            return
        with self._lock:
            known = self._known.setdefault((*self._account, kind), OrderedDict())
            known[external_task_id] = task_id
            known.move_to_end(external_task_id)
            while len(known) > KNOWN_PER_KIND:
                known.popitem(last=False)

    def known(self, kind: TaskKind) -> builtins.list[tuple[str, str]]:
        """Known (external_task_id, task_id) of ``kind`` on this account, most recent first."""
        with self._lock:
            return list(reversed(self._known.get((*self._account, kind), OrderedDict()).items()))

    def owner(self, kind: TaskKind, task_id: str) -> str | None:
        """The external id this process knows ``task_id`` by, if any."""
        return next((e for e, t in self.known(kind) if t == task_id), None)

    def controls(self, kind: TaskKind) -> builtins.list[tuple[TaskKind, str, str]]:
        """Known (kind, external_task_id, task_id) to test a form with: this kind's first, most recent first."""
        kinds: tuple[TaskKind, ...] = (kind, *(k for k in ("text2video", "image2video", "video-extend") if k != kind))
        return [(k, e, t) for k in kinds for e, t in self.known(k)]

    def is_proven(self, form: Form) -> bool:
        with self._lock:
            return (*self._account, form) in self._proofs

    def _mark_proven(self, form: Form) -> None:
        with self._lock:
            self._proofs.add((*self._account, form))

    # ---- the lookup forms -----------------------------------------------------------------------------------

    def _parse(self, data: Any, request_id: str | None, what: str) -> builtins.list[TaskSnapshot]:
        items = data if isinstance(data, builtins.list) else [] if data is None else [data]
        snaps = []
        for item in items:
            try:
                snaps.append(self._client._snapshot(item, request_id, what))
            except KlingProtocolError:
                continue  # a server that ignored a filter may list odd tasks; only ours matters
        return snaps

    async def ask(self, form: Form, kind: TaskKind, ext: str) -> FormAnswer:
        """One lookup form for ``ext``. Non-retryable errors other than "bad request" propagate (auth...)."""
        client = self._client
        path = client._path(kind) if form == "query" else client._path(kind, ext)
        params = {"external_task_id": ext} if form == "query" else None
        try:
            data, request_id = await client._request("GET", path, params=params, retry=True, external_task_id=ext)
        except NotFoundError:
            return FormAnswer(form, "absent")
        except (InvalidRequestError, KlingProtocolError) as exc:  # this server does not speak this form
            return FormAnswer(form, "unsupported", problem=str(exc)[:200])
        except KlingError as exc:
            if not exc.retryable:
                raise
            return FormAnswer(form, "error", problem=str(exc)[:200])
        snaps = self._parse(data, request_id, f"{form} lookup {kind}")
        matches = [s for s in snaps if s.external_task_id == ext]
        if form == "path" and not matches and len(snaps) == 1 and snaps[0].external_task_id is None:
            # The path form resolved the id itself; accept a lone task that just doesn't echo task_info,
            # unless this process knows that task under another external id.
            owner = self.owner(kind, snaps[0].task_id)
            if owner not in (None, ext):
                return FormAnswer(form, "unsupported", items=tuple(snaps),
                                  problem=f"answered with task {snaps[0].task_id}, known as {owner}")  # fmt: skip
            matches = [snaps[0].model_copy(update={"external_task_id": ext})]
        if matches:
            return FormAnswer(form, "found", tuple(matches), tuple(snaps))
        if form == "path" and snaps:  # answered with someone else's task: this form cannot be trusted
            others = ", ".join(s.task_id for s in snaps[:3])
            return FormAnswer(form, "unsupported", items=tuple(snaps), problem=f"answered with task(s) {others}")
        return FormAnswer(form, "absent", items=tuple(snaps))

    async def lookup(self, kind: TaskKind, ext: str) -> TaskSnapshot | None:
        """The allowed lookup forms only (no list scan, no proof): the task or None (which proves nothing)."""
        for form in forms_for(self._client.settings.external_id_lookup):
            answer = await self.ask(form, kind, ext)
            if answer.outcome == "found":
                return pick_oldest(answer.matches, ext)
            if answer.outcome in ("unsupported", "error"):
                log.info("%s lookup of external_task_id %s: %s (%s)", form, ext, answer.outcome, answer.problem)
        return None

    # ---- the list scan --------------------------------------------------------------------------------------

    async def page(self, search: Search, kind: TaskKind, number: int) -> builtins.list[TaskSnapshot] | None:
        """List page ``number`` (cached in ``search``); None when it could not be read."""
        if number not in search.pages:
            params = {"pageNum": number, "pageSize": LIST_PAGE_SIZE}
            try:
                data, request_id = await self._client._request("GET", self._client._path(kind), params=params,
                                                               retry=True)  # fmt: skip
            except KlingError as exc:
                if not exc.retryable and not isinstance(exc, InvalidRequestError | KlingProtocolError):
                    raise
                search.problems.append(f"list page {number}: {str(exc)[:200]}")
                return None
            raw = len(data) if isinstance(data, builtins.list) else 0 if data is None else 1
            search.pages[number] = (self._parse(data, request_id, f"list {kind}"), raw)
        return search.pages[number][0]

    async def scan(self, search: Search, kind: TaskKind) -> TaskSnapshot | None:
        ext = search.external_task_id
        for number in range(1, LIST_PAGES + 1):
            snaps = await self.page(search, kind, number)
            if snaps is None:
                return None
            matches = [s for s in snaps if s.external_task_id == ext]
            if matches:
                return pick_oldest(matches, ext)
            if search.pages[number][1] < LIST_PAGE_SIZE:
                return None
        return None

    # ---- positive controls ----------------------------------------------------------------------------------

    async def believed(self, search: Search, kind: TaskKind, form: Form) -> bool:
        """Is ``form``'s "not found" before a first create final? Yes once the form is proven. A form not yet
        proven is put to one control of a task this process knows, once per form and account: the proof costs
        one GET, and spares every later create the other form and the list scan. A form that fails it (or a
        process that knows no task yet) keeps them."""
        if self.is_proven(form):
            return True
        if not any(e != search.external_task_id for _, e, _ in self.controls(kind)):
            return False
        attempt = (*self._account, form)
        with self._lock:
            if attempt in self._tried:
                return False
            self._tried.add(attempt)
        return await self.prove(search, kind, form)

    async def prove(self, search: Search, kind: TaskKind, form: Form) -> bool:
        """Is a "not found" from ``form`` evidence here? Runs a positive control unless one is cached."""
        if self.is_proven(form):
            return True
        ext = search.external_task_id
        controls = [(k, e, t) for k, e, t in self.controls(kind) if e != ext][:CONTROLS_TRIED]
        source = "a task this process knows"
        if not controls:
            snaps = await self.page(search, kind, 1) or []
            controls = [(kind, s.external_task_id, s.task_id) for s in snaps
                        if s.external_task_id not in (None, ext)][:1]
            source = "a task from list page 1"
        for control_kind, control_ext, control_id in controls:
            try:
                answer = await self.ask(form, control_kind, control_ext)
            except KlingError as exc:
                log.warning("positive control of the %s lookup failed: %s", form, exc)
                return False
            if self._passes(answer, control_ext, control_id):
                self._mark_proven(form)
                log.info(
                    "%s lookup proven on %s %s with %s: it found %s task %s and nothing else",
                    form, *self._account, source, control_kind, control_id,
                )  # fmt: skip
                return True
        if controls:
            log.warning(
                "%s lookup not proven on %s %s: it did not find known task(s) %s alone",
                form, *self._account, ", ".join(t for _, _, t in controls),
            )  # fmt: skip
        else:
            log.warning("%s lookup cannot be proven on %s %s: no known task to test it with",
                        form, *self._account)  # fmt: skip
        return False

    @staticmethod
    def _passes(answer: FormAnswer, control_ext: str, control_id: str) -> bool:
        if answer.outcome != "found" or not any(m.task_id == control_id for m in answer.matches):
            return False
        # A query answer holding other tasks means the server ignored the filter: its "not found" is noise.
        return answer.form == "path" or all(i.external_task_id == control_ext for i in answer.items)

    # ---- the whole search -----------------------------------------------------------------------------------

    async def search(self, kind: TaskKind, ext: str, *, need_evidence: bool) -> Search:
        """Forms, then the list scan; with ``need_evidence`` a "not found" form is put to a positive control.

        Retryable failures (after the client's GET retries) are recorded, never raised: a search that could
        not look simply has no evidence. Non-retryable ones other than "bad request" (auth, account) raise.
        """
        search = Search(ext)
        for form in forms_for(self._client.settings.external_id_lookup):
            answer = await self.ask(form, kind, ext)
            search.answers.append(answer)
            if answer.outcome == "found":
                search.found, search.via = pick_oldest(answer.matches, ext), form
                return search
            if answer.outcome == "absent" and not need_evidence and await self.believed(search, kind, form):
                search.proven_absent = form  # a proven form said no: the other forms and the scan add nothing
                return search
            if answer.outcome in ("unsupported", "error"):
                log.info("%s lookup of external_task_id %s: %s (%s)", form, ext, answer.outcome, answer.problem)
        absent = [a.form for a in search.answers if a.outcome == "absent"]
        cached = next((f for f in absent if self.is_proven(f)), None)  # (only when evidence is needed)
        found = await self.scan(search, kind)
        if found is not None:
            search.found, search.via = found, "list"
            return search
        if cached is not None:
            search.proven_absent = cached
        elif need_evidence:
            for form in absent:
                if await self.prove(search, kind, form):
                    search.proven_absent = form
                    break
        return search
