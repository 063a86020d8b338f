"""Fixtures for the emulator's own tests: real servers on free ports, driven with plain httpx + PyJWT.

Never the project's client: the emulator exists to check that client, so it is tested independently.
Module-scoped emulators are shared between tests; `kling` / `comet` reset them (tasks, stats, faults) first.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Callable, Iterator
from fractions import Fraction
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import av
import httpx
import jwt
import numpy as np
import pytest

from kling_emulator import EmulatorConfig, EmulatorHandle, start_emulator

AK = "emu-test-access-key-0123456789"
SK = "emu-test-secret-key-0123456789abcdefghij"  # >= 32 bytes: PyJWT warns about shorter HMAC keys
API_KEY = "emu-test-comet-api-key-0123456789abcdef"
SCALE = 0.001  # a T2V lives ~0.32 s, an extension ~0.32 s


def make_token(ak: str = AK, sk: str = SK, exp: float | None = 1800, nbf: float | None = -5) -> str:
    """A Kling JWT as the reference's sample builds it; exp/nbf are offsets from now, None leaves them out."""
    now = int(time.time())
    payload: dict[str, Any] = {"iss": ak, "exp": None if exp is None else now + exp,
                               "nbf": None if nbf is None else now + nbf}
    return jwt.encode({k: v for k, v in payload.items() if v is not None}, sk, headers={"typ": "JWT"})


def until(condition: Callable[[], Any], timeout: float = 10, what: str = "the condition") -> Any:
    """Poll `condition` until it returns something truthy (returned); AssertionError after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} did not hold within {timeout} s")
        time.sleep(0.01)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def port_is_free(port: int) -> bool:
    with socket.socket() as s:
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


class Api:
    """A thin httpx wrapper for one emulator: Kling paths and JWT, or CometAPI's /kling prefix and bearer."""

    def __init__(self, handle: EmulatorHandle):
        self.handle = handle
        self.provider = handle.config.provider
        self.prefix = "/kling" if self.provider == "cometapi" else ""
        self.http = httpx.Client(base_url=handle.base_url, timeout=30)

    def headers(self) -> dict[str, str]:
        key = API_KEY if self.provider == "cometapi" else make_token()
        return {"Authorization": f"Bearer {key}", "Content-Type": "application/json"}

    def post(self, kind: str, body: dict[str, Any]) -> httpx.Response:
        return self.http.post(f"{self.prefix}/v1/videos/{kind}", json=body, headers=self.headers())

    def get(self, path: str, **params: Any) -> httpx.Response:
        return self.http.get(path, params=params, headers=self.headers())

    def create(self, kind: str = "text2video", **body: Any) -> dict[str, Any]:
        if kind == "text2video":
            body = {"prompt": "a red kite over the sea", "model_name": "kling-v1", **body}
        response = self.post(kind, body)
        assert response.status_code == 200, response.text
        return response.json()["data"]  # type: ignore[no-any-return]

    def task(self, kind: str, task_id: str) -> dict[str, Any]:
        response = self.get(f"{self.prefix}/v1/videos/{kind}/{task_id}")
        assert response.status_code == 200, response.text
        return response.json()["data"]  # type: ignore[no-any-return]

    def wait(self, kind: str, task_id: str, timeout: float = 20) -> dict[str, Any]:
        """Poll until the task ends; returns the last task object."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            data = self.task(kind, task_id)
            if data["task_status"] in ("succeed", "failed"):
                return data
            time.sleep(0.02)
        raise AssertionError(f"task {task_id} did not finish in {timeout} s")

    def finished(self, kind: str = "text2video", **body: Any) -> dict[str, Any]:
        data = self.wait(kind, self.create(kind, **body)["task_id"])
        assert data["task_status"] == "succeed", data
        return data

    def extend(self, parent: dict[str, Any], **body: Any) -> dict[str, Any]:
        ids = {"video_id": parent["task_result"]["videos"][0]["id"]}
        if self.provider == "cometapi":
            ids["task_id"] = parent["task_id"]
        return self.finished("video-extend", **ids, **body)

    def stats(self) -> dict[str, Any]:
        return self.handle.stats()


def reset(handle: EmulatorHandle) -> None:
    handle.set_faults(None)
    handle.reset()


@pytest.fixture(scope="module")
def kling_handle() -> Iterator[EmulatorHandle]:
    with start_emulator(EmulatorConfig(access_key=AK, secret_key=SK, time_scale=SCALE)) as handle:
        yield handle


@pytest.fixture(scope="module")
def comet_handle() -> Iterator[EmulatorHandle]:
    with start_emulator(EmulatorConfig(provider="cometapi", api_key=API_KEY, time_scale=SCALE)) as handle:
        yield handle


@pytest.fixture
def kling(kling_handle: EmulatorHandle) -> Iterator[Api]:
    reset(kling_handle)
    api = Api(kling_handle)
    yield api
    api.http.close()


@pytest.fixture
def comet(comet_handle: EmulatorHandle) -> Iterator[Api]:
    reset(comet_handle)
    api = Api(comet_handle)
    yield api
    api.http.close()


def download(url: str, dest: Path) -> httpx.Response:
    response = httpx.get(url, timeout=30)
    assert response.status_code == 200, response.text
    dest.write_bytes(response.content)
    return response


def jpeg(rgb: tuple[int, int, int], size: tuple[int, int] = (534, 300)) -> bytes:
    """A plain-coloured JPEG (Kling's image rules: each side >= 300 px, aspect within 2.5:1 by default)."""
    width, height = size
    codec = av.CodecContext.create("mjpeg", "w")
    codec.width, codec.height, codec.pix_fmt = width, height, "yuvj420p"
    codec.time_base = Fraction(1, 25)
    picture = av.VideoFrame.from_ndarray(np.full((height, width, 3), rgb, dtype=np.uint8), format="rgb24")
    return b"".join(bytes(p) for p in [*codec.encode(picture.reformat(format="yuvj420p")), *codec.encode(None)])


def decode(path: Path) -> tuple[float, list[np.ndarray], tuple[int, int]]:
    """(decoded duration from the last frame's end, RGB frames, (width, height)) by decoding every frame."""
    frames: list[np.ndarray] = []
    end = 0.0
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        for frame in container.decode(stream):
            assert frame.pts is not None and frame.time_base is not None
            end = max(end, float((frame.pts + (frame.duration or 0)) * frame.time_base))
            frames.append(frame.to_ndarray(format="rgb24"))
        size = (stream.codec_context.width, stream.codec_context.height)
    return end, frames, size


class CallbackReceiver:
    """A local HTTP server on a free port collecting the JSON bodies POSTed to it."""

    def __init__(self) -> None:
        self.bodies: list[dict[str, Any]] = []
        self.paths: list[str] = []
        self._hold_next = False  # hold() : the next call is recorded, then not answered until release()
        self._released = threading.Event()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                length = int(self.headers.get("Content-Length", 0))
                receiver.bodies.append(json.loads(self.rfile.read(length)))
                receiver.paths.append(self.path)
                held, receiver._hold_next = receiver._hold_next, False
                if held:
                    receiver._released.wait(timeout=30)
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def hold(self) -> None:
        """A stuck receiver: the next call is recorded but not answered until release()."""
        self._released.clear()
        self._hold_next = True

    def release(self) -> None:
        self._released.set()

    def close(self) -> None:
        self.release()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def receiver() -> Iterator[CallbackReceiver]:
    hook = CallbackReceiver()
    yield hook
    hook.close()


class Tools:
    """Helpers for the test modules (with --import-mode=importlib they cannot import conftest)."""

    AK, SK, API_KEY, SCALE = AK, SK, API_KEY, SCALE
    make_token = staticmethod(make_token)
    free_port = staticmethod(free_port)
    until = staticmethod(until)
    port_is_free = staticmethod(port_is_free)
    download = staticmethod(download)
    decode = staticmethod(decode)
    Api = Api
    reset = staticmethod(reset)


@pytest.fixture(scope="session")
def tools() -> type[Tools]:
    return Tools
