"""The HTTP surface: Kling's paths (and CometAPI's /kling-prefixed ones), result files, inspection."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, Response
from starlette.types import Receive, Scope, Send

from kling_emulator import catalog, render
from kling_emulator.auth import check_bearer, check_kling_jwt
from kling_emulator.engine import Engine, Task
from kling_emulator.errors import ApiError, bad_param, envelope, error_response
from kling_emulator.faults import MESSAGE_OF_CODE, STATUS_OF_CODE, Faults, Rule
from kling_emulator.validation import validate_extension, validate_generation, watermark

log = logging.getLogger(__name__)


_CYCLE = "kling_emulator.cycle"  # scope key: uvicorn's per-request cycle, which owns the transport


class DroppedConnection(Response):
    """Sends `partial` (if any) and then closes the connection: the client sees it die (httpx raises
    RemoteProtocolError), with or without a status line.

    Closing the transport ourselves, and waiting until uvicorn has seen the disconnect, keeps uvicorn from
    answering 500 or logging an error for an injected fault. Without uvicorn's cycle (another server) it falls
    back to starting a response and raising, which also kills the connection, only noisily.
    """

    def __init__(self, partial: bytes | None = None, total: int = 0, content_type: str = "application/json"):
        super().__init__()
        self.partial, self.total, self.kind = partial, total, content_type

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        cycle = scope.get(_CYCLE)
        if self.partial is not None or cycle is None:
            headers = [(b"content-length", str(max(self.total, 1000)).encode()),
                       (b"content-type", self.kind.encode())]
            await send({"type": "http.response.start", "status": 200, "headers": headers})
            await send({"type": "http.response.body", "body": self.partial or b"{", "more_body": True})
        if cycle is None:
            raise ConnectionAbortedError("kling-emulator: connection dropped on purpose (fault injection)")
        cycle.transport.close()  # flushes what was sent, then FIN
        for _ in range(200):
            if getattr(cycle, "disconnected", True):
                return
            await asyncio.sleep(0.005)


def _expose_cycle(app: Any) -> Any:
    """Outermost ASGI layer: remember uvicorn's request cycle (the owner of its bound `send`)."""

    async def wrapped(scope: Scope, receive: Receive, send: Send) -> None:
        owner = getattr(send, "__self__", None)
        if scope["type"] == "http" and hasattr(owner, "transport"):
            scope[_CYCLE] = owner
        await app(scope, receive, send)

    return wrapped


class Emulator:
    def __init__(self, engine: Engine, faults: Faults, *, provider: str, access_key: str, secret_key: str,
                 api_key: str):
        self.engine, self.faults, self.provider = engine, faults, provider
        self.access_key, self.secret_key, self.api_key = access_key, secret_key, api_key
        self.prefix = "/kling" if provider == "cometapi" else ""
        self.base_url = ""  # set by the server once bound; requests fall back to their own base URL

    def base(self, request: Request) -> str:
        return self.base_url or str(request.base_url).rstrip("/")

    def authenticate(self, request: Request) -> None:
        header = request.headers.get("authorization")
        if self.provider == "cometapi":
            check_bearer(header, self.api_key)
        else:
            check_kling_jwt(header, self.access_key, self.secret_key)

    def count(self, key: str) -> None:
        with self.engine.lock:
            self.engine.stats.requests[key] += 1

    async def apply(self, rule: Rule | None) -> Response | None:
        """Faults that act before the request is handled."""
        if rule is None:
            return None
        if rule.kind == "slow":
            await asyncio.sleep(float(rule.params.get("seconds", 1)))
        elif rule.kind == "drop_before":
            return DroppedConnection()
        elif rule.kind == "http_error":
            code = int(rule.params.get("code", 5000))
            status = int(rule.params.get("status", STATUS_OF_CODE.get(code, 500)))
            message = rule.params.get("message", MESSAGE_OF_CODE.get(code, "injected fault"))
            return error_response(ApiError(status, code, str(message)))
        elif rule.kind == "pack_exhausted":
            return error_response(ApiError(429, 1102, MESSAGE_OF_CODE[1102]))
        return None

    # --- create ----------------------------------------------------------------------------------------------
    async def create(self, kind: str, request: Request) -> Response:
        self.count(f"POST {self.prefix}/v1/videos/{kind}")
        try:
            body = json.loads(await request.body() or b"{}")
        except json.JSONDecodeError:
            return error_response(ApiError(400, 1200, "request body is not valid JSON"))
        if not isinstance(body, dict):
            return error_response(ApiError(400, 1200, "request body must be a JSON object"))
        ext = body.get("external_task_id")
        if isinstance(ext, str):
            with self.engine.lock:
                self.engine.stats.create_attempts[ext] += 1
        rule = self.faults.pick(f"create:{kind}")
        early = await self.apply(rule)
        if early is not None:
            return early
        try:
            self.authenticate(request)
            task = self._create(kind, body, rule)
        except ApiError as error:
            return error_response(error)
        if rule is not None and rule.kind == "drop_after_commit":
            return DroppedConnection()
        return JSONResponse(envelope(task.to_api(self.base(request))))

    def _create(self, kind: str, body: dict[str, Any], rule: Rule | None) -> Task:
        fail = str(rule.params.get("message", "Failure to pass the risk control system")) \
            if rule is not None and rule.kind == "task_fail" else None
        common = {"external_task_id": body.get("external_task_id"), "callback_url": body.get("callback_url"),
                  "fail_message": fail, "watermark": watermark(body)}
        if kind != "video-extend":
            spec = validate_generation(kind, body)
            frames = render.frames_for(float(spec["duration"]))
            return self.engine.create(kind, model=spec["model"], mode=spec["mode"],
                                      aspect_ratio=spec["aspect_ratio"], frames=[frames],
                                      price=catalog.generation_price(spec["model"], spec["mode"], spec["duration"]),
                                      **common)
        video_id, parent_task_id = validate_extension(body, needs_task_id=self.provider == "cometapi")
        parent = self.engine.by_video(video_id)
        if parent is None or parent.status != "succeed":
            raise bad_param(f"video_id {video_id} is not a succeeded video")
        if parent_task_id is not None and parent.task_id != parent_task_id:
            raise bad_param(f"task_id {parent_task_id} does not own video_id {video_id}")
        if self.engine.expired(parent):
            raise bad_param(f"video_id {video_id} has expired")
        if parent.model not in catalog.EXTENDABLE_MODELS:
            raise bad_param(f"video_id {video_id} comes from {parent.model}, which cannot be extended")
        new = render.frames_for(4.0) + int.from_bytes(video_id.encode()[-2:], "big") % (render.FPS + 1)
        if (sum(parent.segments) + new) / render.FPS > catalog.MAX_TOTAL_SECONDS:
            raise bad_param(f"video_id {video_id}: the extended video would exceed {catalog.MAX_TOTAL_SECONDS:g} s")
        return self.engine.create(kind, model=parent.model, mode=parent.mode, aspect_ratio=parent.aspect_ratio,
                                  frames=[*parent.segments, new],
                                  price=catalog.extension_price(parent.model, parent.mode), parent=parent, **common)

    # --- queries ---------------------------------------------------------------------------------------------
    async def get_one(self, kind: str, ident: str, request: Request) -> Response:
        self.count(f"GET {self.prefix}/v1/videos/{kind}/{{id}}")
        early = await self.apply(self.faults.pick(f"get:{kind}"))
        if early is not None:
            return early
        return self._one(kind, ident, request)

    def _one(self, kind: str, ident: str, request: Request) -> Response:
        try:
            self.authenticate(request)
        except ApiError as error:
            return error_response(error)
        task = self.engine.find(kind, ident) if kind in catalog.KINDS else None
        if task is None:
            return error_response(ApiError(404, 1203, f"task {ident} does not exist"))
        with self.engine.lock:
            self.engine.stats.polls[task.task_id] += 1
        return JSONResponse(envelope(task.to_api(self.base(request))))

    async def list(self, kind: str, request: Request) -> Response:
        self.count(f"GET {self.prefix}/v1/videos/{kind}")
        early = await self.apply(self.faults.pick(f"list:{kind}"))
        if early is not None:
            return early
        ext = request.query_params.get("external_task_id")
        if ext is not None:  # the query-string form of the lookup (reference §3.6)
            return self._one(kind, ext, request)
        try:
            self.authenticate(request)
            page, size = (_int_param(request, name, default, top)
                          for name, default, top in (("pageNum", 1, 1000), ("pageSize", 30, 500)))
        except ApiError as error:
            return error_response(error)
        with self.engine.lock:
            tasks = sorted((t for t in self.engine.tasks.values() if t.kind == kind),
                           key=lambda t: t.created_at, reverse=True)
            data = [t.to_api(self.base(request)) for t in tasks[(page - 1) * size: page * size]]
        return JSONResponse(envelope(data))

    # --- files -----------------------------------------------------------------------------------------------
    async def download(self, video_id: str) -> Response:
        task = self.engine.by_video(video_id)
        with self.engine.lock:
            self.engine.stats.downloads[video_id] += 1
        if task is None or not task.rendered:
            return JSONResponse({"message": "not found"}, status_code=404)
        if self.engine.expired(task):  # past --result-ttl: gone for good
            return JSONResponse({"message": "URL expired"}, status_code=410)
        rule = self.faults.pick("download")
        if rule is not None and rule.kind == "url_expired":  # what an expired signed CDN link answers
            return JSONResponse({"message": "URL expired"}, status_code=int(rule.params.get("status", 403)))
        early = await self.apply(rule)
        if early is not None:
            return early
        path = self.engine.path_of(video_id)
        if rule is not None and rule.kind == "download_cut":
            data = path.read_bytes()
            return DroppedConnection(data[: len(data) // 2], len(data), "video/mp4")
        return FileResponse(path, media_type="video/mp4")


def _int_param(request: Request, name: str, default: int, top: int) -> int:
    raw = request.query_params.get(name)
    try:
        value = default if raw is None else int(raw)
    except ValueError:
        raise bad_param(f"{name} must be an integer") from None
    if not 1 <= value <= top:
        raise bad_param(f"{name} must be in [1, {top}]")
    return value


async def _tick(emulator: Emulator, outbox: asyncio.Queue[Task]) -> None:
    """The ticker: advance tasks; each status change of a task with a callback_url goes to the outbox."""
    while True:
        for snapshot in emulator.engine.tick():
            if snapshot.callback_url:
                outbox.put_nowait(snapshot)
        await asyncio.sleep(0.02)


async def _announce(emulator: Emulator, outbox: asyncio.Queue[Task], client: httpx.AsyncClient) -> None:
    """POST the bare task object (no envelope) to callback_url, in order, once (no retry).

    Separate from the ticker so a slow or dead receiver delays callbacks, never the lifecycle.
    """
    while True:
        snapshot = await outbox.get()
        try:
            await client.post(snapshot.callback_url or "", json=snapshot.to_api(emulator.base_url), timeout=5)
        except httpx.HTTPError as exc:
            log.info("callback to %s failed: %s", snapshot.callback_url, exc)


def asgi_app(emulator: Emulator) -> Any:
    """What uvicorn serves: the FastAPI app behind the layer that lets faults drop connections quietly."""
    return _expose_cycle(create_app(emulator))


def create_app(emulator: Emulator) -> FastAPI:
    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        outbox: asyncio.Queue[Task] = asyncio.Queue()
        async with httpx.AsyncClient() as client:
            workers = [asyncio.create_task(_tick(emulator, outbox)),
                       asyncio.create_task(_announce(emulator, outbox, client))]
            yield
            for worker in workers:
                worker.cancel()

    app = FastAPI(title="kling-emulator", lifespan=lifespan)
    p = emulator.prefix

    @app.post(p + "/v1/videos/{kind}")
    async def create(kind: str, request: Request) -> Response:
        if kind not in catalog.KINDS:
            return error_response(ApiError(404, 1202, f"unknown endpoint {kind}"))
        return await emulator.create(kind, request)

    @app.get(p + "/v1/videos/{kind}")
    async def list_tasks(kind: str, request: Request) -> Response:
        return await emulator.list(kind, request)

    @app.get(p + "/v1/videos/{kind}/{ident}")
    async def get_task(kind: str, ident: str, request: Request) -> Response:
        return await emulator.get_one(kind, ident, request)

    if emulator.provider == "cometapi":
        @app.get("/kling/v1/{action}/{action2}/{task_id}")
        async def get_any(action: str, action2: str, task_id: str, request: Request) -> Response:
            if action != "videos":
                return error_response(ApiError(404, 1203, f"{action}/{action2} is not emulated"))
            return await emulator.get_one(action2, task_id, request)

    @app.get("/_files/{video_id}.mp4")
    async def download(video_id: str) -> Response:
        return await emulator.download(video_id)

    @app.get("/_emulator/stats")
    async def stats() -> dict[str, Any]:
        return emulator.engine.snapshot_stats()

    @app.post("/_emulator/reset")
    async def reset() -> dict[str, str]:
        emulator.engine.reset()
        return {"status": "reset"}

    @app.post("/_emulator/faults")
    async def faults(request: Request) -> Response:
        try:  # an empty body (or null) clears the rules
            raw = await request.body()
            emulator.faults.replace(json.loads(raw) if raw.strip() else None)
        except (ValueError, TypeError) as exc:
            return JSONResponse({"message": str(exc)}, status_code=400)
        return JSONResponse({"rules": len(emulator.faults.rules)})

    return app
