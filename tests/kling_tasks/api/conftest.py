"""A small in-memory Kling server on httpx.MockTransport, a fake clock, and client fixtures."""

from __future__ import annotations

import json
import random
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import httpx
import jwt
import pytest

from kling_tasks.api import KlingClient, PollPolicy, RetryPolicy, polling
from kling_tasks.api.lookup import TaskFinder
from kling_tasks.settings import KlingSettings

AK = "AKtestACCESSkey0001"
SK = "SKtestSECRETkey0002-padded-to-32-bytes"
COMET_KEY = "sk-cometTESTbearer0003"


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0
        self.sleeps: list[float] = []

    def __call__(self) -> float:
        return self.now

    async def sleep(self, seconds: float) -> None:
        self.sleeps.append(seconds)
        self.now += seconds


@dataclass
class Fault:
    method: str
    response: httpx.Response | Callable[[httpx.Request], httpx.Response] | None = None
    exc: type[Exception] | None = None
    after: bool = False  # True: handle the request first (e.g. create the task), then fail
    times: int = 1
    match: Callable[[httpx.Request], bool] | None = None


@dataclass
class FakeKling:
    provider: str = "kling"
    query_lookup: bool = True  # understands GET /{kind}?external_task_id= (False: ignores it, lists all)
    path_lookup: bool = True  # understands GET /{kind}/{external_task_id} (False: 1203 unless a task_id)
    unique_ext: bool = True  # refuses a second create with the same external_task_id (1201)
    tasks: dict[str, dict[str, Any]] = field(default_factory=dict)
    progress: dict[str, list[str]] = field(default_factory=dict)  # task_id -> statuses served on each GET
    faults: list[Fault] = field(default_factory=list)
    requests: list[httpx.Request] = field(default_factory=list)
    rejected_tokens: set[str] = field(default_factory=set)
    expire_first_token: bool = False
    tokens: list[str] = field(default_factory=list)
    next_id: int = 860000000000000001

    @property
    def prefix(self) -> str:
        return "/kling/v1/videos" if self.provider == "cometapi" else "/v1/videos"

    @property
    def transport(self) -> httpx.MockTransport:
        return httpx.MockTransport(self.handle)

    def posts(self) -> list[httpx.Request]:
        return [r for r in self.requests if r.method == "POST"]

    def gets(self) -> list[httpx.Request]:
        return [r for r in self.requests if r.method == "GET"]

    def fail(self, method: str, **kwargs: Any) -> None:
        self.faults.append(Fault(method, **kwargs))

    def gets_with(self, **params: str) -> list[httpx.Request]:
        return [r for r in self.gets() if all(r.url.params.get(k) == v for k, v in params.items())]

    def add_task(self, kind: str, ext: str | None = None, status: str = "submitted", **extra: Any) -> str:
        task_id = str(self.next_id)
        self.next_id += 1
        created = 1774805076166 + len(self.tasks)
        self.tasks[task_id] = {
            "task_id": task_id,
            "kind": kind,
            "task_status": status,
            "task_status_msg": "",
            "task_info": {"external_task_id": ext} if ext else {},
            "created_at": created,
            "updated_at": created,
            **extra,
        }
        return task_id

    @staticmethod
    def envelope(data: Any, code: int = 0, status: int = 200, message: str = "SUCCEED") -> httpx.Response:
        body: dict[str, Any] = {"code": code, "message": message, "request_id": f"req-{random.random()}"}
        if data is not None:
            body["data"] = data
        return httpx.Response(status, json=body)

    def public(self, task_id: str) -> dict[str, Any]:
        task = self.tasks[task_id]
        script = self.progress.get(task_id)
        if script:
            task["task_status"] = script.pop(0) if len(script) > 1 else script[0]
        out = {k: v for k, v in task.items() if k not in ("kind", "body")}
        if task["task_status"] == "succeed" and "task_result" not in task:
            out["task_result"] = {"videos": [{"id": f"v{task_id}", "url": f"https://cdn.test/{task_id}.mp4",
                                              "duration": "5.042"}]}  # fmt: skip
            out["final_unit_deduction"] = "1"
        return out

    def check_auth(self, request: httpx.Request) -> httpx.Response | None:
        header = request.headers.get("authorization", "")
        if not header.startswith("Bearer "):
            return self.envelope(None, 1001, 401, "Authorization header empty")
        token = header[len("Bearer ") :]
        if self.provider == "cometapi":
            return None if token == COMET_KEY else self.envelope(None, 1002, 401, "invalid key")
        self.tokens.append(token)
        try:
            claims = jwt.decode(token, SK, algorithms=["HS256"], issuer=AK)
        except jwt.ExpiredSignatureError:
            return self.envelope(None, 1004, 401, "token expired")
        except jwt.InvalidTokenError:
            return self.envelope(None, 1002, 401, "Authorization invalid")
        if self.expire_first_token and token == self.tokens[0]:
            self.rejected_tokens.add(token)
        if token in self.rejected_tokens:
            return self.envelope(None, 1004, 401, "token expired")
        assert claims["iss"] == AK
        return None

    def handle(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        fault = next((f for f in self.faults if f.method == request.method and (not f.match or f.match(request))),
                     None)  # fmt: skip
        if fault is not None:
            fault.times -= 1
            if fault.times <= 0:
                self.faults.remove(fault)
            if not fault.after:
                if fault.exc is not None:
                    raise fault.exc("injected", request=request)  # type: ignore[call-arg]
                return self.respond(fault, request)
        response = self.route(request)
        if fault is not None:
            if fault.exc is not None:
                raise fault.exc("injected after handling", request=request)  # type: ignore[call-arg]
            return self.respond(fault, request)
        return response

    @staticmethod
    def respond(fault: Fault, request: httpx.Request) -> httpx.Response:
        assert fault.response is not None
        return fault.response(request) if callable(fault.response) else fault.response

    def route(self, request: httpx.Request) -> httpx.Response:
        refusal = self.check_auth(request)
        if refusal is not None:
            return refusal
        path = request.url.path
        if not path.startswith(self.prefix + "/"):
            return httpx.Response(404, text="<html>not found</html>")
        parts = path[len(self.prefix) + 1 :].split("/")
        kind = parts[0]
        if request.method == "POST":
            body = json.loads(request.content)
            ext = body.get("external_task_id")
            taken = any(t["task_info"].get("external_task_id") == ext for t in self.tasks.values())
            if ext and taken and self.unique_ext:
                return self.envelope(None, 1201, 400, "external_task_id already exists")
            task_id = self.add_task(kind, ext, body=body)
            return self.envelope(self.public(task_id))
        if len(parts) == 2:
            key = parts[1]
            if key in self.tasks:
                return self.envelope(self.public(key))
            if self.path_lookup:
                for tid, t in self.tasks.items():
                    if t["task_info"].get("external_task_id") == key:
                        return self.envelope(self.public(tid))
            return self.envelope(None, 1203, 404, "task not found")
        ext = request.url.params.get("external_task_id")
        items = [tid for tid, t in self.tasks.items() if t["kind"] == kind]
        if ext is not None and self.query_lookup:
            items = [tid for tid in items if self.tasks[tid]["task_info"].get("external_task_id") == ext]
        page, size = int(request.url.params.get("pageNum", 1)), int(request.url.params.get("pageSize", 30))
        items = items[(page - 1) * size : page * size]
        return self.envelope([self.public(tid) for tid in items])


def make_settings(provider: str = "kling", **kw: Any) -> KlingSettings:
    if provider == "cometapi":
        return KlingSettings(provider="cometapi", api_base_url="https://comet.test", cometapi_key=COMET_KEY, **kw)
    return KlingSettings(provider="kling", api_base_url="https://kling.test", access_key=AK, secret_key=SK, **kw)


FAST_RETRY = RetryPolicy(attempts=4, base_delay=0.001, max_delay=0.004, max_posts=3)


@pytest.fixture(autouse=True)
def fresh_process_state() -> None:
    """Known tasks, lookup proofs and once-only warnings are class-level (in-process): start each test clean."""
    TaskFinder.forget_all()
    KlingClient._lookup_warned.clear()
    polling._unknown_warned.clear()


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def fake() -> FakeKling:
    return FakeKling()


@pytest.fixture
def make_client(clock: FakeClock) -> Callable[..., KlingClient]:
    def factory(fake: FakeKling, provider: str | None = None, poll: PollPolicy | None = None, **kw: Any) -> KlingClient:
        settings = make_settings(provider or fake.provider, **kw)
        return KlingClient(settings, transport=fake.transport, sleep=clock.sleep, clock=clock,
                           retry=FAST_RETRY, poll_policy=poll)  # fmt: skip

    return factory


@pytest.fixture
def comet_fake() -> FakeKling:
    return FakeKling(provider="cometapi")


@pytest.fixture
def creds() -> dict[str, str]:
    """The test credentials, for leak checks."""
    return {"ak": AK, "sk": SK, "comet": COMET_KEY}
