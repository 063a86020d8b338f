"""Test-wide isolation: every pytest session gets its own PREFECT_HOME (results, cache, SQLite DB).

Prefect reads its settings when first imported, so this runs before any test module imports it.
"""

from __future__ import annotations

import atexit
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, HTTPServer
from pathlib import Path
from typing import Any

import httpx
import pytest

_PREFECT_HOME = tempfile.mkdtemp(prefix="kling-tests-prefect-home-")
os.environ["PREFECT_HOME"] = _PREFECT_HOME
atexit.register(shutil.rmtree, _PREFECT_HOME, True)
os.environ["PREFECT_SERVER_ANALYTICS_ENABLED"] = "false"
os.environ.setdefault("PREFECT_LOGGING_LEVEL", "INFO")
# The project's own credentials must never leak in from the developer's shell into tests.
for _name in ("KLING_ACCESS_KEY", "KLING_SECRET_KEY", "COMETAPI_KEY", "KLING_API_BASE_URL", "KLING_PROVIDER"):
    os.environ.pop(_name, None)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


class ServerExitedError(RuntimeError):
    """The server process ended before serving: typically its port was taken between pick and bind."""


class PrefectServer:
    """One real `prefect server start` per pytest session, in its own process group.

    `free_port()` only picks a port that was free a moment ago: another process can bind it before the
    server does. Then the server exits (ServerExitedError) and `start()` tries again on a new port. A
    port answered by some other server (another session's Prefect) is not mistaken for this one: the
    server is ours only if it reports our own PREFECT_HOME.
    """

    def __init__(self, home: Path, port: int):
        self.home = home
        self.port = port
        self.api_url = f"http://127.0.0.1:{self.port}/api"
        self.ui_url = f"http://127.0.0.1:{self.port}"
        self.env = {**os.environ, "PREFECT_HOME": str(home), "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
                    "PREFECT_UI_API_URL": self.api_url}
        self.log = open(home / "server.log", "w")  # noqa: SIM115 - closed in stop()
        prefect = str(Path(sys.executable).with_name("prefect"))
        self.process = subprocess.Popen(
            [prefect, "server", "start", "--host", "127.0.0.1", "--port", str(self.port)],
            env=self.env, stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True,
        )

    @classmethod
    def start(cls, make_home: Callable[[], Path], attempts: int = 4) -> PrefectServer:
        """A healthy server of ours; a fresh home and a fresh port for each attempt."""
        for attempt in range(1, attempts + 1):
            server = cls(make_home(), free_port())
            try:
                server.wait_healthy()
                return server
            except ServerExitedError:
                server.stop()
                if attempt == attempts:
                    raise
            except BaseException:
                server.stop()
                raise
        raise AssertionError("unreachable")

    def _is_ours(self) -> bool:
        try:
            if httpx.get(f"{self.api_url}/health", timeout=1).status_code != 200:
                return False
            settings = httpx.get(f"{self.api_url}/admin/settings", timeout=5).json()
        except (httpx.HTTPError, ValueError):
            return False
        return isinstance(settings, dict) and Path(str(settings.get("home"))).resolve() == self.home.resolve()

    def wait_healthy(self, timeout: float = 180) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise ServerExitedError(f"prefect server on port {self.port} exited: see {self.log.name}")
            if self._is_ours():
                return
            time.sleep(0.3)
        raise TimeoutError(f"prefect server did not become healthy: see {self.log.name}")

    def stop(self) -> None:
        try:
            os.killpg(self.process.pid, signal.SIGTERM)
            self.process.wait(timeout=10)
        except ProcessLookupError:  # the whole group is gone already
            self.process.wait()
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        self.log.close()


@pytest.fixture(scope="session")
def prefect_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[PrefectServer]:
    """A real Prefect server; this process's Prefect client points at it for the whole session."""
    from prefect.settings import (
        PREFECT_API_URL,
        PREFECT_FLOWS_HEARTBEAT_FREQUENCY,
        PREFECT_RESULTS_LOCAL_STORAGE_PATH,
        temporary_settings,
    )

    server = PrefectServer.start(lambda: tmp_path_factory.mktemp("prefect-server"))
    try:
        results = tmp_path_factory.mktemp("prefect-results")
        server.env["PREFECT_API_URL"] = server.api_url
        with temporary_settings(updates={PREFECT_API_URL: server.api_url,
                                         PREFECT_RESULTS_LOCAL_STORAGE_PATH: results,
                                         PREFECT_FLOWS_HEARTBEAT_FREQUENCY: None}):
            yield server
            # Ship the logs still queued in this process before their server goes away.
            from prefect.logging.handlers import APILogWorker

            APILogWorker.drain_all(timeout=10)
    finally:
        server.stop()


@pytest.fixture
def isolated_aws(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Nothing from the developer's shell or ~/.aws reaches the code under test (or its child processes).

    Every AWS_* variable goes (profiles, session/security tokens, endpoint overrides such as
    AWS_ENDPOINT_URL_S3, role and container credentials, CA bundles); config and credential files point
    at paths that do not exist; no instance-metadata probe; one fixed region.
    """
    for name in [n for n in os.environ if n.startswith("AWS_")]:
        monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws" / "config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws" / "credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")  # no 2 s wait on the instance-metadata probe
    monkeypatch.setenv("AWS_DEFAULT_REGION", "us-east-1")


def quiet_werkzeug() -> None:
    """moto's server logs every request through werkzeug, which adds a stream handler on sys.stderr the first
    time it logs: inside a CliRunner call that stream is the runner's capture, closed afterwards ("I/O
    operation on closed file" in later CLI output). A handler of our own and WARNING keep it silent."""
    werkzeug = logging.getLogger("werkzeug")
    werkzeug.setLevel(logging.WARNING)
    if not werkzeug.handlers:
        werkzeug.addHandler(logging.NullHandler())


@pytest.fixture
def s3_endpoint(monkeypatch: pytest.MonkeyPatch, isolated_aws: None) -> Iterator[str]:
    """moto's real S3 HTTP server on a free port, reached through boto3's standard environment."""
    from moto.server import ThreadedMotoServer

    quiet_werkzeug()
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    monkeypatch.setenv("AWS_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "testing-access-key")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "testing-secret-key")
    try:
        yield endpoint
    finally:
        server.stop()


class JsonReceiver:
    """A local HTTP endpoint that records the JSON bodies POSTed to it (webhooks, callbacks)."""

    def __init__(self) -> None:
        received: list[dict[str, Any]] = []

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                received.append(json.loads(self.rfile.read(int(self.headers["Content-Length"]))))
                self.send_response(204)
                self.end_headers()

            def log_message(self, *_: Any) -> None:
                return None

        self.received = received
        self.server = HTTPServer(("127.0.0.1", 0), Handler)
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def url(self, path: str = "/") -> str:
        return f"http://127.0.0.1:{self.server.server_port}{path}"

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


@pytest.fixture(scope="session")
def json_receiver() -> Iterator[Callable[[], JsonReceiver]]:
    """Makes JsonReceivers (usable from fixtures of any scope); all are closed when the session ends."""
    made: list[JsonReceiver] = []

    def make() -> JsonReceiver:
        made.append(JsonReceiver())
        return made[-1]

    yield make
    for receiver in made:
        receiver.close()


def has_chromium() -> bool:
    return shutil.which("chromium") is not None
