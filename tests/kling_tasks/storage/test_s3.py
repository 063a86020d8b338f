"""S3 sink details the shared sink tests do not pin: how long a presigned link lives."""

from __future__ import annotations

from urllib.parse import parse_qs, urlsplit

import pytest

from kling_tasks.storage import S3Sink
from kling_tasks.storage.base import PRESIGN_MAX_SECONDS


@pytest.mark.parametrize(("asked", "lives"), [(600, 600), (PRESIGN_MAX_SECONDS, PRESIGN_MAX_SECONDS),
                                              (30 * 24 * 3600, PRESIGN_MAX_SECONDS)])
def test_a_link_lives_as_long_as_asked_within_sigv4s_week(bucket: str, asked: int, lives: int) -> None:
    link = S3Sink(bucket, "videos").link("job1/final.mp4", expires_seconds=asked)
    assert parse_qs(urlsplit(link).query)["X-Amz-Expires"] == [str(lives)]
