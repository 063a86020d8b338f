"""Fixtures for flow tests: the Kling emulator on a free port and the environment that points at it.

A test that needs another emulator (padded files, the CometAPI provider, weak-provider switches from the start)
says so with `@pytest.mark.emulator(**EmulatorConfig fields)`; `kling_env` follows the emulator's provider.
"""

from __future__ import annotations

from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import pytest

EMULATOR_AK = "test-ak-0123456789"
EMULATOR_SK = "test-sk-abcdefghijklmnop-0123456789"
EMULATOR_API_KEY = "test-cometapi-key-0123456789abcdef"


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "emulator(**fields): EmulatorConfig fields for this test's `emulator`")


@pytest.fixture
def emulator(request: pytest.FixtureRequest) -> Iterator[Any]:
    from kling_emulator import EmulatorConfig, start_emulator
    from kling_tasks.api.lookup import TaskFinder

    fields: dict[str, Any] = {"access_key": EMULATOR_AK, "secret_key": EMULATOR_SK, "api_key": EMULATOR_API_KEY,
                              "time_scale": 0.004}
    marker = request.node.get_closest_marker("emulator")
    if marker is not None:
        fields.update(marker.kwargs)
    # Lookup proofs and known tasks are kept per (provider, base URL) in this process; a new emulator may get
    # an earlier one's port, and must not inherit what was proven about that one.
    TaskFinder.forget_all()
    with start_emulator(EmulatorConfig(**fields)) as handle:
        yield handle
    TaskFinder.forget_all()


@pytest.fixture
def kling_env(monkeypatch: pytest.MonkeyPatch, emulator: Any) -> dict[str, str]:
    config = emulator.config
    env = {
        "KLING_PROVIDER": config.provider,
        "KLING_API_BASE_URL": emulator.base_url,
        "KLING_ALLOW_PRIVATE_URLS": "1",
        "KLING_POLL_MIN_SECONDS": "0.05",
        "KLING_POLL_MAX_SECONDS": "0.3",
    }
    if config.provider == "cometapi":
        env["COMETAPI_KEY"] = config.api_key
        for name in ("KLING_ACCESS_KEY", "KLING_SECRET_KEY"):
            monkeypatch.delenv(name, raising=False)
    else:
        env.update({"KLING_ACCESS_KEY": config.access_key, "KLING_SECRET_KEY": config.secret_key})
        monkeypatch.delenv("COMETAPI_KEY", raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return env


def decoded_seconds(path: Path | str) -> float:
    """Duration of an MP4 by decoding every frame (not trusting the container's header)."""
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        last_end = Fraction(0)
        for frame in container.decode(stream):
            assert frame.pts is not None and frame.time_base is not None
            end = (frame.pts + (frame.duration or 0)) * frame.time_base
            last_end = max(last_end, Fraction(end))
        return float(last_end)


@pytest.fixture
def decode_seconds() -> Any:
    return decoded_seconds
