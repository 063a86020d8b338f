"""Fault injection: every kind happens as configured, from a profile file and at run time, by probability,
sequence or times."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from kling_emulator import EmulatorConfig, start_emulator


def rules(api: Any, *items: dict[str, Any]) -> None:
    response = api.http.post("/_emulator/faults", json={"rules": list(items)})  # the run-time endpoint
    assert response.status_code == 200 and response.json()["rules"] == len(items)


def code_of(response: httpx.Response) -> tuple[int, int]:
    return response.status_code, response.json()["code"]


@pytest.mark.parametrize(
    ("params", "expected"),
    [
        ({"status": 429, "code": 1302}, (429, 1302)),
        ({"status": 429, "code": 1303}, (429, 1303)),
        ({"code": 1303}, (429, 1303)),  # the status follows from the code
        ({"code": 5000}, (500, 5000)),
        ({"code": 5001}, (503, 5001)),
        ({"code": 5002}, (504, 5002)),
        ({}, (500, 5000)),
    ],
)
def test_http_error(kling: Any, params: dict[str, Any], expected: tuple[int, int]) -> None:
    rules(kling, {"match": "create:text2video", "kind": "http_error", "params": params})
    response = kling.post("text2video", {"prompt": "x", "external_task_id": "e1"})
    assert code_of(response) == expected
    assert set(response.json()) == {"code", "message", "request_id"}
    stats = kling.stats()
    assert stats["create_attempts"] == {"e1": 1} and stats["tasks"] == {}
    assert kling.post("image2video", {"image": "https://example.invalid/a.png"}).status_code == 200, "by endpoint"


def test_http_error_on_queries(kling: Any) -> None:
    task_id = kling.create()["task_id"]
    rules(kling, {"match": "get:text2video", "kind": "http_error", "times": 1, "params": {"code": 5001}},
          {"match": "list:*", "kind": "http_error", "times": 1, "params": {"code": 1302}})
    assert code_of(kling.get(f"/v1/videos/text2video/{task_id}")) == (503, 5001)
    assert kling.get(f"/v1/videos/text2video/{task_id}").status_code == 200
    assert code_of(kling.get("/v1/videos/text2video")) == (429, 1302)
    assert kling.get("/v1/videos/text2video").status_code == 200


def test_pack_exhausted(kling: Any) -> None:
    rules(kling, {"match": "create:*", "kind": "pack_exhausted"})
    for kind, body in (("text2video", {"prompt": "x"}), ("image2video", {"image": "https://e.invalid/a.png"})):
        assert code_of(kling.post(kind, body)) == (429, 1102)
    assert kling.stats()["tasks"] == {}


def test_drop_before_creates_nothing(kling: Any) -> None:
    rules(kling, {"match": "create:text2video", "kind": "drop_before", "times": 1})
    with pytest.raises(httpx.TransportError):
        kling.post("text2video", {"prompt": "x", "external_task_id": "lost"})
    stats = kling.stats()
    assert stats["create_attempts"] == {"lost": 1}
    assert stats["tasks"] == {} and stats["tasks_created"] == {}
    assert kling.post("text2video", {"prompt": "x", "external_task_id": "lost"}).status_code == 200, "retry works"


def test_drop_before_on_a_query_and_a_download(kling: Any) -> None:
    video = kling.finished()
    rules(kling, {"match": "get:*", "kind": "drop_before", "times": 1},
          {"match": "download", "kind": "drop_before", "times": 1})
    with pytest.raises(httpx.TransportError):
        kling.get(f"/v1/videos/text2video/{video['task_id']}")
    with pytest.raises(httpx.TransportError):
        httpx.get(video["task_result"]["videos"][0]["url"])


def test_drop_after_commit_creates_the_task(kling: Any) -> None:
    rules(kling, {"match": "create:video-extend", "kind": "drop_after_commit", "times": 1})
    parent = kling.finished()
    with pytest.raises(httpx.TransportError):
        kling.post("video-extend", {"video_id": parent["task_result"]["videos"][0]["id"],
                                    "external_task_id": "ambiguous"})
    stats = kling.stats()
    assert stats["create_attempts"] == {"ambiguous": 1} and stats["tasks_created"] == {"ambiguous": 1}
    # The ambiguous case: the client can find the task it did not hear about, and it finishes normally.
    found = kling.get("/v1/videos/video-extend", external_task_id="ambiguous").json()["data"]
    assert kling.wait("video-extend", found["task_id"])["task_status"] == "succeed"


def test_slow(kling: Any) -> None:
    rules(kling, {"match": "create:text2video", "kind": "slow", "times": 1, "params": {"seconds": 0.6}},
          {"match": "download", "kind": "slow", "times": 1, "params": {"seconds": 0.6}})
    sent_at = time.time()
    created = kling.create()
    # The delay comes before the request is handled: the emulator's own clock stamps the task after it.
    assert created["created_at"] >= (sent_at + 0.6) * 1000 - 5, (created["created_at"], sent_at)
    kling.create()
    assert kling.stats()["faults_fired"] == {"slow": 1}, "times: 1"
    video = kling.wait("text2video", created["task_id"])
    start = time.monotonic()
    assert httpx.get(video["task_result"]["videos"][0]["url"]).status_code == 200
    # A lower bound only (a sleep never ends early; a loaded machine can only make it longer).
    assert time.monotonic() - start >= 0.6 - 0.01
    assert kling.stats()["faults_fired"] == {"slow": 2}


def test_task_fail(kling: Any) -> None:
    rules(kling, {"match": "create:text2video", "kind": "task_fail", "times": 1,
                  "params": {"message": "content policy: unsafe content detected"}})
    failed = kling.wait("text2video", kling.create(external_task_id="bad")["task_id"])
    good = kling.wait("text2video", kling.create(external_task_id="good")["task_id"])
    assert failed["task_status"] == "failed"
    assert failed["task_status_msg"] == "content policy: unsafe content detected"
    assert failed["final_unit_deduction"] == "0" and good["final_unit_deduction"] == "1"
    assert kling.stats()["credits_charged"] == 1, "the failed task is not charged"


def test_download_cut(kling: Any) -> None:
    video = kling.finished()
    url = video["task_result"]["videos"][0]["url"]
    full = httpx.get(url).content
    rules(kling, {"match": "download", "kind": "download_cut", "times": 1})
    with httpx.stream("GET", url) as response:
        assert int(response.headers["content-length"]) == len(full), "the full length is announced"
        received = bytearray()
        with pytest.raises(httpx.TransportError):
            for chunk in response.iter_bytes():
                received += chunk
    assert 0 < len(received) < len(full)
    assert httpx.get(url).content == full, "the next download is whole"


def test_url_expired(kling: Any) -> None:
    video = kling.finished()
    url = video["task_result"]["videos"][0]["url"]
    rules(kling, {"match": "download", "kind": "url_expired", "sequence": [True, False]})
    assert httpx.get(url).status_code == 403
    assert httpx.get(url).status_code == 200


def test_probability_one_and_zero(kling: Any) -> None:
    rules(kling, {"match": "create:text2video", "kind": "http_error", "probability": 1.0, "params": {"code": 5000}})
    assert [kling.post("text2video", {"prompt": "x"}).status_code for _ in range(5)] == [500] * 5
    rules(kling, {"match": "create:text2video", "kind": "http_error", "probability": 0.0, "params": {"code": 5000}})
    assert [kling.post("text2video", {"prompt": "x"}).status_code for _ in range(5)] == [200] * 5


def test_sequence_and_times(kling: Any) -> None:
    rules(kling, {"match": "get:text2video", "kind": "http_error", "sequence": [True, False, True],
                  "params": {"code": 5002}})
    task_id = kling.create()["task_id"]
    path = f"/v1/videos/text2video/{task_id}"
    assert [kling.get(path).status_code for _ in range(5)] == [504, 200, 504, 200, 200]
    rules(kling, {"match": "create:*", "kind": "http_error", "times": 2, "params": {"code": 1303}})
    answers = [kling.post("text2video", {"prompt": "x"}) for _ in range(3)]
    assert [a.status_code for a in answers] == [429, 429, 200]
    assert answers[0].json()["message"] == "parallel task over resource pack limit", "Kling's own text by default"


def test_task_status_singles_out_reads_of_a_task_in_that_status(kling: Any, tools: Any) -> None:
    """A get rule with `task_status` fires only on reads of a task in one of those statuses (`absent`: no
    task carries the id), and a read it does not concern spends none of its trigger."""
    rules(kling, {"match": "get:text2video", "kind": "http_error", "times": 1, "task_status": ["succeed"],
                  "params": {"code": 5001}},
          {"match": "get:text2video", "kind": "http_error", "times": 1, "task_status": ["absent"],
           "params": {"code": 5000}})
    assert code_of(kling.get("/v1/videos/text2video/no-such-external-id")) == (500, 5000)
    assert kling.get("/v1/videos/text2video/no-such-external-id").status_code == 404, "times: 1"
    created = kling.create(external_task_id="staged")
    path = f"/v1/videos/text2video/{created['task_id']}"
    assert kling.get(path).status_code == 200, "a running task is not concerned"
    tools.until(lambda: kling.stats()["tasks"][created["task_id"]]["status"] == "succeed", what="the task succeeded")
    assert code_of(kling.get(path)) == (503, 5001), "the first read of the succeeded task"
    assert kling.get(path).status_code == 200
    assert kling.stats()["faults_fired"] == {"http_error": 2}


@pytest.mark.parametrize("bad", [
    {"match": "create:*", "kind": "slow", "task_status": ["succeed"]},  # a create reads no task
    {"match": "get:*", "kind": "slow", "task_status": ["done"]},
    {"match": "get:*", "kind": "slow", "task_status": []},
    {"match": "get:*", "kind": "slow", "task_status": "succeed"},
])
def test_bad_task_status_conditions_are_refused(kling: Any, bad: dict[str, Any]) -> None:
    assert kling.http.post("/_emulator/faults", json={"rules": [bad]}).status_code == 400


def test_rules_apply_in_order_and_are_cleared(kling: Any) -> None:
    rules(kling, {"match": "create:text2video", "kind": "http_error", "times": 1, "params": {"code": 1302}},
          {"match": "create:*", "kind": "pack_exhausted", "times": 1})
    assert code_of(kling.post("text2video", {"prompt": "x"})) == (429, 1302)
    assert code_of(kling.post("text2video", {"prompt": "x"})) == (429, 1102)
    rules(kling, {"match": "any", "kind": "pack_exhausted"})
    assert kling.http.post("/_emulator/faults").json()["rules"] == 0, "an empty body clears the rules"
    assert kling.post("text2video", {"prompt": "x"}).status_code == 200


@pytest.mark.parametrize(
    "bad",
    [
        {"rules": [{"match": "create:*", "kind": "explode"}]},
        {"rules": [{"match": "create:text2vdeo", "kind": "slow"}]},  # a typo never fires silently
        {"rules": [{"match": "any", "kind": "slow", "probability": 2}]},
        {"rules": [{"match": "any", "kind": "slow", "times": 1, "sequence": [True]}]},
        {"rules": [{"match": "any", "kind": "slow", "colour": "red"}]},
        {"rules": "slow"},
        {"rules": [], "behavior": {"lookup_path": "off"}},  # the spelling is "behaviour"; a typo is refused
        {"rules": [{"match": "download", "kind": "slow_stream", "params": {"after_bytes": -1}}]},
    ],
)
def test_bad_profiles_are_refused(kling: Any, bad: dict[str, Any]) -> None:
    response = kling.http.post("/_emulator/faults", json=bad)
    assert response.status_code == 400


@pytest.fixture(scope="module", params=["yaml", "json"])
def from_file(request: pytest.FixtureRequest, tools: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    profile = {"rules": [
        {"match": "create:text2video", "kind": "http_error", "sequence": [True, False], "params": {"code": 1303}},
        {"match": "create:image2video", "kind": "task_fail", "params": {"message": "from the file"}},
    ]}
    path: Path = tmp_path_factory.mktemp("faults") / f"profile.{request.param}"
    path.write_text(yaml.safe_dump(profile) if request.param == "yaml" else json.dumps(profile))
    config = EmulatorConfig(access_key=tools.AK, secret_key=tools.SK, time_scale=tools.SCALE, faults=path)
    with start_emulator(config) as handle:
        yield handle


def test_profile_from_a_file(from_file: Any, tools: Any) -> None:
    api = tools.Api(from_file)
    assert code_of(api.post("text2video", {"prompt": "x"})) == (429, 1303)
    assert api.post("text2video", {"prompt": "x"}).status_code == 200
    failed = api.wait("image2video", api.create("image2video", image="https://e.invalid/a.png")["task_id"])
    assert (failed["task_status"], failed["task_status_msg"]) == ("failed", "from the file")
    api.http.close()
