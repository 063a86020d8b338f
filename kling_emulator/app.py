"""The HTTP surface: Kling's paths (and CometAPI's /kling-prefixed ones), result files, inspection."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
from collections.abc import AsyncIterator
from typing import Any

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response

from kling_emulator import catalog, render
from kling_emulator.auth import check_bearer, check_kling_jwt
from kling_emulator.behaviour import Behaviour
from kling_emulator.drops import DroppedConnection, expose_cycle
from kling_emulator.engine import Engine, Task
from kling_emulator.errors import ApiError, bad_param, envelope, error_response
from kling_emulator.faults import MESSAGE_OF_CODE, STATUS_OF_CODE, Faults, Rule, parse_profile
from kling_emulator.files import Served, file_response
from kling_emulator.validation import validate_extension, validate_generation, watermark

log = logging.getLogger(__name__)


class Emulator:
    def __init__(self, engine: Engine, faults: Faults, *, provider: str, access_key: str, secret_key: str,
                 api_key: str, behaviour: Behaviour | None = None, pad_bytes: int = 0):
        self.engine, self.faults, self.provider = engine, faults, provider
        self.access_key, self.secret_key, self.api_key = access_key, secret_key, api_key
        self.prefix = "/kling" if provider == "cometapi" else ""
        self.base_url = ""  # set by the server once bound; requests fall back to their own base URL
        self.default_behaviour = behaviour or Behaviour()  # what POST /_emulator/reset restores
        self.behaviour = self.default_behaviour  # frozen: replaced whole, so readers never see half a change
        self.pad_bytes = pad_bytes

    def base(self, request: Request) -> str:
        return self.base_url or str(request.base_url).rstrip("/")

    def view(self, task: Task, base_url: str) -> dict[str, Any]:
        """The task object as this provider reports it (its word for `submitted`, if it has one)."""
        data = task.to_api(base_url)
        data["task_status"] = self.behaviour.status_word(data["task_status"])
        return data

    # --- run-time configuration ------------------------------------------------------------------------------
    def configure(self, profile: dict[str, Any] | list[Any] | None) -> dict[str, Any]:
        """A fault profile: its rules replace the rules, its `behaviour` switches are set (the others stay).
        All or nothing: a bad rule or switch changes nothing (ValueError)."""
        rules, switches = parse_profile(profile)
        behaviour = self.behaviour.updated(switches)
        self.faults.set_rules(rules)
        self.behaviour = behaviour
        return {"rules": len(rules), "behaviour": behaviour.as_dict()}

    def set_behaviour(self, switches: Any) -> dict[str, Any]:
        self.behaviour = self.behaviour.updated(switches)
        return self.behaviour.as_dict()

    def reset(self) -> None:
        """Forget tasks, counters and pending callbacks; back to the configured behaviour (rules stay)."""
        self.engine.reset()
        self.behaviour = self.default_behaviour

    def pick(self, event: str, task_status: str | None = None) -> Rule | None:
        rule = self.faults.pick(event, task_status)
        if rule is not None:
            self.engine.count("faults_fired", rule.kind)
        return rule

    def authenticate(self, request: Request) -> None:
        header = request.headers.get("authorization")
        if self.provider == "cometapi":
            check_bearer(header, self.api_key)
        else:
            check_kling_jwt(header, self.access_key, self.secret_key)

    def count(self, key: str) -> None:
        self.engine.count("requests", key)

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
        if isinstance(ext, str):  # every POST carrying one, whatever becomes of it
            self.engine.count("create_attempts", ext)
        if kind not in catalog.KINDS:
            return error_response(ApiError(404, 1202, f"unknown endpoint {kind}"))
        rule = self.pick(f"create:{kind}")
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
        return JSONResponse(envelope(self.view(task, self.base(request))))

    def _create(self, kind: str, body: dict[str, Any], rule: Rule | None) -> Task:
        fail = str(rule.params.get("message", "Failure to pass the risk control system")) \
            if rule is not None and rule.kind == "task_fail" else None
        common: dict[str, Any] = {
            "external_task_id": body.get("external_task_id"), "callback_url": body.get("callback_url"),
            "fail_message": fail, "watermark": watermark(body),
            "unique_external_id": self.behaviour.unique_external_ids,
        }
        if kind != "video-extend":
            spec = validate_generation(kind, body)
            frames = render.frames_for(float(spec["duration"]))
            image = body.get("image")
            start = base64.b64decode(image) if kind == "image2video" and isinstance(image, str) \
                and not image.startswith(("http://", "https://")) else None
            return self.engine.create(kind, model=spec["model"], mode=spec["mode"],
                                      aspect_ratio=spec["aspect_ratio"], frames=[frames],
                                      price=catalog.generation_price(spec["model"], spec["mode"], spec["duration"]),
                                      start_image=start, sound=spec["sound"], **common)
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
        by_external = self.behaviour.lookup_path == "on"
        task = self.engine.find(kind, ident, by_external) if kind in catalog.KINDS else None
        early = await self.apply(self.pick(f"get:{kind}", task.status if task is not None else "absent"))
        if early is not None:
            return early
        return self._one(kind, ident, request, by_external=by_external)

    def _one(self, kind: str, ident: str, request: Request, by_external: bool = True) -> Response:
        try:
            self.authenticate(request)
        except ApiError as error:
            return error_response(error)
        task = self.engine.find(kind, ident, by_external) if kind in catalog.KINDS else None
        if task is None:
            return error_response(ApiError(404, 1203, f"task {ident} does not exist"))
        self.engine.answered(task)
        return JSONResponse(envelope(self.view(task, self.base(request))))

    async def list(self, kind: str, request: Request) -> Response:
        self.count(f"GET {self.prefix}/v1/videos/{kind}")
        early = await self.apply(self.pick(f"list:{kind}"))
        if early is not None:
            return early
        ext = request.query_params.get("external_task_id")
        lookup = self.behaviour.lookup_query
        if ext is not None and lookup == "filter":  # the query-string form of the lookup (reference §3.6)
            return self._one(kind, ext, request)
        try:
            self.authenticate(request)
            if ext is not None and lookup == "empty":
                return JSONResponse(envelope([]))
            # lookup "ignored": the filter is not understood, so this is the plain list page
            page, size = (_int_param(request, name, default, top)
                          for name, default, top in (("pageNum", 1, 1000), ("pageSize", 30, 500)))
        except ApiError as error:
            return error_response(error)
        with self.engine.lock:
            tasks = sorted((t for t in self.engine.tasks.values() if t.kind == kind),
                           key=lambda t: t.created_at, reverse=True)
            data = [self.view(t, self.base(request)) for t in tasks[(page - 1) * size: page * size]]
        return JSONResponse(envelope(data))

    # --- files -----------------------------------------------------------------------------------------------
    async def download(self, video_id: str, request: Request) -> Response:
        task = self.engine.by_video(video_id)
        self.engine.count("downloads", video_id)
        if task is None or not task.rendered:
            return JSONResponse({"message": "not found"}, status_code=404)
        if self.engine.expired(task):  # past --result-ttl: gone for good
            return JSONResponse({"message": "URL expired"}, status_code=410)
        rule = self.pick("download")
        if rule is not None and rule.kind == "url_expired":  # what an expired signed CDN link answers
            return JSONResponse({"message": "URL expired"}, status_code=int(rule.params.get("status", 403)))
        early = await self.apply(rule)
        if early is not None:
            return early
        served = Served(self.engine.path_of(video_id), self.pad_bytes)
        return file_response(served, request.headers.get("range"), rule,
                             lambda sent: self.engine.count("download_bytes", video_id, sent))


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
            await client.post(snapshot.callback_url or "", json=emulator.view(snapshot, emulator.base_url), timeout=5)
        except httpx.HTTPError as exc:
            log.info("callback to %s failed: %s", snapshot.callback_url, exc)


def asgi_app(emulator: Emulator) -> Any:
    """What uvicorn serves: the FastAPI app behind the layer that lets faults drop connections quietly."""
    return expose_cycle(create_app(emulator))


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
    async def download(video_id: str, request: Request) -> Response:
        return await emulator.download(video_id, request)

    @app.get("/_emulator/stats")
    async def stats() -> dict[str, Any]:
        return {**emulator.engine.snapshot_stats(), "behaviour": emulator.behaviour.as_dict()}

    @app.post("/_emulator/reset")
    async def reset() -> dict[str, str]:
        emulator.reset()
        return {"status": "reset"}

    @app.post("/_emulator/faults")
    async def faults(request: Request) -> Response:
        return await _configure(request, emulator.configure)  # an empty body (or null) clears the rules

    @app.get("/_emulator/behaviour")
    async def behaviour() -> dict[str, Any]:
        return emulator.behaviour.as_dict()

    @app.post("/_emulator/behaviour")
    async def set_behaviour(request: Request) -> Response:
        return await _configure(request, emulator.set_behaviour)  # sets only the switches given

    return app


async def _configure(request: Request, apply: Any) -> Response:
    """Run `apply` on the JSON body (empty = None); 400 with the reason if the body or its content is wrong."""
    try:
        raw = await request.body()
        return JSONResponse(apply(json.loads(raw) if raw.strip() else None))
    except (ValueError, TypeError) as exc:
        return JSONResponse({"message": str(exc)}, status_code=400)
