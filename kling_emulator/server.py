"""Running the emulator: in-process on a background thread (tests, demo, benchmarks) or in the foreground."""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import TracebackType
from typing import Any

import httpx
import uvicorn

from kling_emulator.app import Emulator, asgi_app
from kling_emulator.behaviour import Behaviour
from kling_emulator.engine import Engine
from kling_emulator.faults import Faults, load_profile, parse_profile
from kling_emulator.files import check_pad

THIRTY_DAYS = 30 * 24 * 3600.0


@dataclass
class EmulatorConfig:
    provider: str = "kling"  # or "cometapi"
    access_key: str = "emulator-ak"
    secret_key: str = "emulator-secret-key-0123456789abcdef"
    api_key: str = "emulator-key"
    time_scale: float = 1.0  # 1.0 = Kling's typical latencies; tests use ~0.005
    concurrency: int = 5
    faults: dict[str, Any] | list[Any] | Path | str | None = None  # a profile, or the path of a YAML/JSON file
    state_dir: Path | None = None
    result_ttl_seconds: float = THIRTY_DAYS
    resolution: str = "small"  # or "720p"
    host: str = "127.0.0.1"
    port: int = 0  # 0 = a free port
    # Served MP4s end with an MP4 `free` box of this many bytes (0 = none): large files, same frames.
    pad_bytes: int = 0
    # Weak-provider switches (behaviour.py); a `behaviour:` mapping in `faults` overrides them.
    lookup_query: str = "filter"  # filter | ignored | empty
    lookup_path: str = "on"  # on | off
    unique_external_ids: bool = True
    queued_status_word: str | None = None  # e.g. "queueing" instead of "submitted"
    extra: dict[str, Any] = field(default_factory=dict)

    def behaviour(self) -> Behaviour:
        """The configured defaults: the fields above, then the fault profile's `behaviour:` on top."""
        base = Behaviour(lookup_query=self.lookup_query, lookup_path=self.lookup_path,
                         unique_external_ids=self.unique_external_ids, queued_status_word=self.queued_status_word)
        return base.updated(parse_profile(self.profile())[1])

    def profile(self) -> dict[str, Any] | list[Any] | None:
        return load_profile(self.faults) if isinstance(self.faults, Path | str) else self.faults


def build(config: EmulatorConfig) -> tuple[Emulator, Path | None]:
    """The emulator and, when it made one, the temporary folder holding its files."""
    scratch = None if config.state_dir else Path(tempfile.mkdtemp(prefix="kling-emulator-"))
    files = (config.state_dir / "files") if config.state_dir else scratch
    assert files is not None
    if config.state_dir:
        config.state_dir.mkdir(parents=True, exist_ok=True)
    profile, behaviour, pad = config.profile(), config.behaviour(), check_pad(config.pad_bytes)  # fail early
    engine = Engine(time_scale=config.time_scale, concurrency=config.concurrency, resolution=config.resolution,
                    result_ttl_seconds=config.result_ttl_seconds, state_dir=config.state_dir, files_dir=files)
    emulator = Emulator(engine, Faults(profile), provider=config.provider, access_key=config.access_key,
                        secret_key=config.secret_key, api_key=config.api_key, behaviour=behaviour, pad_bytes=pad)
    return emulator, scratch


class EmulatorHandle:
    """A running emulator on a background thread. Use as a context manager, or call stop()."""

    def __init__(self, config: EmulatorConfig):
        self.config = config
        self.emulator, self._scratch = build(config)
        app = asgi_app(self.emulator)
        self._server = uvicorn.Server(uvicorn.Config(app, host=config.host, port=config.port, log_level="warning",
                                                     lifespan="on"))
        self._thread = threading.Thread(target=self._server.run, name="kling-emulator", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 20
        while not self._server.started:
            if not self._thread.is_alive() or time.monotonic() > deadline:
                raise RuntimeError("kling-emulator did not start")
            time.sleep(0.01)
        port = self._server.servers[0].sockets[0].getsockname()[1]
        self.base_url = f"http://{config.host}:{port}"
        self.emulator.base_url = self.base_url

    def stats(self) -> dict[str, Any]:
        return httpx.get(f"{self.base_url}/_emulator/stats", timeout=10).json()  # type: ignore[no-any-return]

    def reset(self) -> None:
        """Forget tasks and counters; the behaviour goes back to the configured one (fault rules stay)."""
        httpx.post(f"{self.base_url}/_emulator/reset", timeout=10).raise_for_status()

    def set_faults(self, profile: dict[str, Any] | list[Any] | None) -> dict[str, Any]:
        """Replace the fault rules (None clears them) and set the profile's `behaviour:` switches, if any.
        Returns {"rules": N, "behaviour": {...}}."""
        body = {"rules": []} if profile is None else profile
        return _ok(httpx.post(f"{self.base_url}/_emulator/faults", json=body, timeout=10))

    def set_behaviour(self, **switches: Any) -> dict[str, Any]:
        """Set weak-provider switches now, e.g. set_behaviour(lookup_query="ignored"); the others stay.
        Returns the whole behaviour. reset() goes back to the configured one."""
        return _ok(httpx.post(f"{self.base_url}/_emulator/behaviour", json=switches, timeout=10))

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=10)
        self.emulator.engine.renderer.shutdown(wait=True, cancel_futures=True)
        if self._scratch is not None:
            shutil.rmtree(self._scratch, ignore_errors=True)

    def __enter__(self) -> EmulatorHandle:
        return self

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 tb: TracebackType | None) -> None:
        self.stop()


def _ok(response: httpx.Response) -> dict[str, Any]:
    if response.status_code != 200:  # an HTTPStatusError, as raise_for_status() gives, but saying why
        raise httpx.HTTPStatusError(f"kling-emulator refused it: {response.text}", request=response.request,
                                    response=response)
    return response.json()  # type: ignore[no-any-return]


def start_emulator(config: EmulatorConfig | None = None) -> EmulatorHandle:
    return EmulatorHandle(config or EmulatorConfig())


def running_emulator(**fields: Any) -> EmulatorHandle:
    """`with running_emulator(time_scale=0.01) as emu: ...`"""
    return EmulatorHandle(EmulatorConfig(**fields))


def serve_forever(config: EmulatorConfig) -> None:
    emulator, scratch = build(config)
    if config.port and config.host not in ("0.0.0.0", "::", ""):
        emulator.base_url = f"http://{config.host}:{config.port}"
    # Otherwise (a wildcard host, or port 0) result URLs follow each request's own Host header.
    try:
        uvicorn.run(asgi_app(emulator), host=config.host, port=config.port, log_level="info")
    finally:
        emulator.engine.renderer.shutdown(wait=False, cancel_futures=True)
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
