"""Fixtures for flow tests: the Kling emulator on a free port and the environment that points at it."""

from __future__ import annotations

from collections.abc import Iterator
from fractions import Fraction
from pathlib import Path
from typing import Any

import av
import pytest

EMULATOR_AK = "test-ak-0123456789"
EMULATOR_SK = "test-sk-abcdefghijklmnop-0123456789"


@pytest.fixture
def emulator() -> Iterator[Any]:
    from kling_emulator import EmulatorConfig, start_emulator

    with start_emulator(EmulatorConfig(access_key=EMULATOR_AK, secret_key=EMULATOR_SK,
                                       time_scale=0.004)) as handle:
        yield handle


@pytest.fixture
def kling_env(monkeypatch: pytest.MonkeyPatch, emulator: Any) -> dict[str, str]:
    env = {
        "KLING_PROVIDER": "kling",
        "KLING_API_BASE_URL": emulator.base_url,
        "KLING_ACCESS_KEY": EMULATOR_AK,
        "KLING_SECRET_KEY": EMULATOR_SK,
        "KLING_ALLOW_PRIVATE_URLS": "1",
        "KLING_POLL_MIN_SECONDS": "0.05",
        "KLING_POLL_MAX_SECONDS": "0.3",
    }
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
