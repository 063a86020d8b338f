"""Fixtures for the storage and manifest tests: moto's real S3 server, a misbehaving HTTP source, sinks."""

from __future__ import annotations

import threading
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import boto3
import pytest
from moto.server import ThreadedMotoServer

from kling_tasks.storage import LocalSink, S3Sink, Sink

DUMMY_SECRET = "dummy-secret-SHOULD-NEVER-APPEAR"
CHUNK = 1024 * 1024  # the source writes (and can pause) at this granularity


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def aws_env(moto_endpoint: str, monkeypatch: pytest.MonkeyPatch, isolated_aws: None) -> str:
    """The standard chain pointed at moto: exactly what a user does for MinIO or R2."""
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", DUMMY_SECRET)
    return moto_endpoint


@pytest.fixture
def no_aws_credentials(moto_endpoint: str, monkeypatch: pytest.MonkeyPatch, isolated_aws: None) -> None:
    monkeypatch.setenv("AWS_ENDPOINT_URL", moto_endpoint)


@pytest.fixture
def s3(aws_env: str) -> Any:
    return boto3.client("s3")


@pytest.fixture
def bucket(s3: Any) -> str:
    name = f"kling-{uuid.uuid4().hex[:12]}"
    s3.create_bucket(Bucket=name)
    return name


@pytest.fixture(params=["local", "s3"])
def sink(request: pytest.FixtureRequest, tmp_path: Path) -> Sink:
    if request.param == "local":
        return LocalSink(tmp_path / "out")
    return S3Sink(request.getfixturevalue("bucket"), "videos")


@dataclass
class Route:
    body: bytes = b""
    status: int = 200
    mode: str = "ok"  # ok | cut (announce everything, send half, hang up) | nolength | redirect
    location: str = ""
    pause_after: int | None = None  # send this many bytes, then wait for Source.resume before the rest


class Source:
    """A local HTTP source that counts GETs per path and can misbehave on purpose."""

    def __init__(self) -> None:
        self.routes: dict[str, Route] = {}
        self.hits: Counter[str] = Counter()
        self.sent: Counter[str] = Counter()  # body bytes handed to the socket, per path
        self.resume = threading.Event()
        source = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def _send(self, data: bytes) -> None:
                for start in range(0, len(data), CHUNK):
                    self.wfile.write(data[start : start + CHUNK])
                    source.sent[self.path] += len(data[start : start + CHUNK])

            def do_GET(self) -> None:
                source.hits[self.path] += 1
                route = source.routes.get(self.path, Route(b"not found", 404))
                if route.mode == "redirect":
                    self.send_response(302)
                    self.send_header("Location", route.location)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                self.send_response(route.status)
                self.send_header("Content-Type", "video/mp4")
                if route.mode != "nolength":
                    self.send_header("Content-Length", str(len(route.body)))
                self.end_headers()
                body = route.body[: len(route.body) // 2] if route.mode == "cut" else route.body
                self.close_connection = True
                cut = len(body) if route.pause_after is None else route.pause_after
                try:
                    self._send(body[:cut])
                    if cut < len(body):
                        source.resume.wait(60)
                        self._send(body[cut:])
                except OSError:  # the client is gone (killed on purpose)
                    pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, args=(0.02,), daemon=True)
        self.thread.start()

    def add(self, path: str, body: bytes = b"", **kwargs: Any) -> str:
        self.routes[path] = Route(body, **kwargs)
        return self.url(path)

    def url(self, path: str) -> str:
        host, port = self.server.server_address[:2]
        return f"http://{host}:{port}{path}"

    def close(self) -> None:
        self.resume.set()
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture
def source() -> Iterator[Source]:
    src = Source()
    yield src
    src.close()
