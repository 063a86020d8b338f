"""Weak-provider switches: lookups a provider does not support, external ids it does not keep unique, a status
word it made up; set from the config, a profile (file or run time), set_behaviour(); reset restores them."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import yaml

from kling_emulator import EmulatorConfig, start_emulator

DEFAULTS = {"lookup_query": "filter", "lookup_path": "on", "unique_external_ids": True, "queued_status_word": None}


def ids(response: httpx.Response) -> list[str]:
    assert response.status_code == 200, response.text
    return [t["task_id"] for t in response.json()["data"]]


def test_defaults_are_the_faithful_behaviour(kling: Any) -> None:
    assert kling.stats()["behaviour"] == DEFAULTS
    assert kling.http.get("/_emulator/behaviour").json() == DEFAULTS


def test_lookup_query_ignored_answers_the_plain_list_page(kling: Any) -> None:
    first = kling.create(external_task_id="q-a")["task_id"]
    second = kling.create(external_task_id="q-b")["task_id"]
    assert kling.handle.set_behaviour(lookup_query="ignored")["lookup_query"] == "ignored"
    path = "/v1/videos/text2video"
    assert ids(kling.get(path, external_task_id="q-a")) == ids(kling.get(path)) == [second, first]
    assert ids(kling.get(path, external_task_id="q-a", pageSize=1)) == ids(kling.get(path, pageSize=1)) == [second]
    assert ids(kling.get(path, external_task_id="nobody")) == [second, first], "no 404 either"
    assert kling.get(path, external_task_id="q-a", pageSize=0).json()["code"] == 1201, "the page is validated"
    # The path form is a separate switch and still works.
    assert kling.get(f"{path}/q-a").json()["data"]["task_id"] == first


def test_lookup_query_empty_answers_an_empty_success(kling: Any) -> None:
    kling.create(external_task_id="e-a")
    kling.handle.set_behaviour(lookup_query="empty")
    response = kling.get("/v1/videos/text2video", external_task_id="e-a")
    body = response.json()
    assert response.status_code == 200 and body["code"] == 0 and body["message"] == "SUCCEED"
    assert body["data"] == []
    assert len(ids(kling.get("/v1/videos/text2video"))) == 1, "the plain list is unchanged"
    unauthenticated = kling.http.get("/v1/videos/text2video", params={"external_task_id": "e-a"})
    assert unauthenticated.json()["code"] == 1001, "still authenticated"


def test_lookup_path_off_finds_by_task_id_only(kling: Any, comet: Any) -> None:
    for api in (kling, comet):
        task_id = api.create(external_task_id="p-a")["task_id"]
        api.handle.set_behaviour(lookup_path="off")
        base = f"{api.prefix}/v1/videos/text2video"
        assert api.get(f"{base}/{task_id}").json()["data"]["task_id"] == task_id
        by_ext = api.get(f"{base}/p-a")
        assert (by_ext.status_code, by_ext.json()["code"]) == (404, 1203), "as for an unknown id"
        assert api.get(base, external_task_id="p-a").json()["data"]["task_id"] == task_id, "the query form works"


def test_external_ids_not_unique_every_create_makes_a_task(kling: Any) -> None:
    kling.handle.set_behaviour(unique_external_ids=False)
    first = kling.create(external_task_id="dup")
    second = kling.create(external_task_id="dup")
    assert first["task_id"] != second["task_id"]
    assert second["task_info"] == {"external_task_id": "dup"}
    stats = kling.stats()
    assert stats["create_attempts"] == {"dup": 2} and stats["tasks_created"] == {"dup": 2}
    # A lookup by the shared id answers one of them: the newest.
    assert kling.get("/v1/videos/text2video/dup").json()["data"]["task_id"] == second["task_id"]
    assert kling.get("/v1/videos/text2video", external_task_id="dup").json()["data"]["task_id"] == second["task_id"]
    for created in (first, second):
        assert kling.wait("text2video", created["task_id"])["task_status"] == "succeed"
    assert kling.stats()["credits_charged"] == 2, "both are paid for"


def test_unique_external_ids_by_default(kling: Any) -> None:
    kling.create(external_task_id="once")
    refused = kling.post("text2video", {"prompt": "x", "external_task_id": "once"})
    assert (refused.status_code, refused.json()["code"]) == (400, 1201)
    stats = kling.stats()
    assert stats["create_attempts"] == {"once": 2} and stats["tasks_created"] == {"once": 1}


@pytest.fixture(scope="module")
def queueing(tools: Any) -> Iterator[Any]:
    # Tasks that stay `submitted` for ~15 s: every answer below comes while they are still queued.
    config = EmulatorConfig(access_key=tools.AK, secret_key=tools.SK, time_scale=0.5,
                            queued_status_word="queueing")
    with start_emulator(config) as handle:
        yield handle


def test_queued_status_word_in_every_answer(queueing: Any, tools: Any) -> None:
    api = tools.Api(queueing)
    created = api.create(external_task_id="slow-queue")
    assert created["task_status"] == "queueing"
    base = "/v1/videos/text2video"
    assert api.task("text2video", created["task_id"])["task_status"] == "queueing"
    assert api.get(f"{base}/slow-queue").json()["data"]["task_status"] == "queueing"
    assert api.get(base, external_task_id="slow-queue").json()["data"]["task_status"] == "queueing"
    assert [t["task_status"] for t in api.get(base).json()["data"]] == ["queueing"]
    assert api.stats()["tasks"][created["task_id"]]["status"] == "submitted", "stats tell the truth"
    api.http.close()


def test_queued_status_word_leaves_other_statuses_alone(kling: Any, receiver: Any, tools: Any) -> None:
    kling.handle.set_behaviour(queued_status_word="queueing")
    created = kling.create(callback_url=receiver.url, external_task_id="word")
    assert created["task_status"] == "queueing"
    final = kling.wait("text2video", created["task_id"])
    assert final["task_status"] == "succeed"
    tools.until(lambda: len(receiver.bodies) >= 2, what="the callbacks")
    assert [b["task_status"] for b in receiver.bodies] == ["processing", "succeed"]
    kling.handle.set_faults({"rules": [{"match": "create:*", "kind": "task_fail", "times": 1}]})
    assert kling.wait("text2video", kling.create()["task_id"])["task_status"] == "failed"


def test_behaviour_from_a_profile_at_run_time_and_reset(kling: Any) -> None:
    task_id = kling.create(external_task_id="rt")["task_id"]
    answer = kling.handle.set_faults({"rules": [{"match": "download", "kind": "slow"}],
                                      "behaviour": {"lookup_path": "off", "queued_status_word": "queued"}})
    assert answer == {"rules": 1, "behaviour": {**DEFAULTS, "lookup_path": "off", "queued_status_word": "queued"}}
    assert kling.get("/v1/videos/text2video/rt").status_code == 404
    # A profile without `behaviour` replaces the rules and leaves the switches as they are.
    assert kling.handle.set_faults({"rules": []})["behaviour"]["lookup_path"] == "off"
    assert kling.handle.set_behaviour(lookup_query="empty")["lookup_path"] == "off", "only the switch given"
    kling.handle.reset()
    assert kling.stats()["behaviour"] == DEFAULTS, "reset restores the configured behaviour"
    assert kling.get(f"/v1/videos/text2video/{task_id}").status_code == 404, "(and forgets the tasks)"


@pytest.mark.parametrize(
    "bad",
    [
        {"lookup_query": "sometimes"},
        {"lookup_path": True},
        {"unique_external_ids": "no"},
        {"queued_status_word": ""},
        {"queued_status_word": 3},
        {"lookup_colour": "red"},
    ],
)
def test_bad_switches_are_refused_and_change_nothing(kling: Any, bad: dict[str, Any]) -> None:
    kling.handle.set_faults({"rules": [{"match": "download", "kind": "slow"}]})
    refused = kling.http.post("/_emulator/faults", json={"rules": [], "behaviour": bad})
    assert refused.status_code == 400 and refused.json()["message"]
    assert kling.http.post("/_emulator/behaviour", json=bad).status_code == 400
    with pytest.raises(httpx.HTTPStatusError, match="kling-emulator refused"):
        kling.handle.set_behaviour(**bad)
    assert kling.stats()["behaviour"] == DEFAULTS
    assert kling.handle.set_faults({"rules": []})["rules"] == 0
    assert kling.http.post("/_emulator/behaviour").json() == DEFAULTS, "an empty body changes nothing"


def test_bad_switches_in_the_config_fail_at_start(tools: Any) -> None:
    for fields in ({"lookup_query": "maybe"}, {"faults": {"behaviour": {"lookup_path": "sideways"}}}):
        with pytest.raises(ValueError, match="lookup"):
            start_emulator(EmulatorConfig(access_key=tools.AK, secret_key=tools.SK, **fields))


@pytest.fixture(scope="module", params=["fields", "yaml", "json"])
def configured(request: pytest.FixtureRequest, tools: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """The same weak provider three ways: config fields, or a profile file's `behaviour:` over the fields."""
    weak = {"lookup_query": "ignored", "lookup_path": "off", "unique_external_ids": False,
            "queued_status_word": "queueing"}
    if request.param == "fields":
        config = EmulatorConfig(access_key=tools.AK, secret_key=tools.SK, time_scale=tools.SCALE, **weak)
    else:
        profile = {"rules": [{"match": "create:image2video", "kind": "pack_exhausted"}], "behaviour": weak}
        path: Path = tmp_path_factory.mktemp("weak") / f"profile.{request.param}"
        path.write_text(yaml.safe_dump(profile) if request.param == "yaml" else json.dumps(profile))
        config = EmulatorConfig(access_key=tools.AK, secret_key=tools.SK, time_scale=tools.SCALE, faults=path,
                                lookup_query="empty")  # the profile's switch wins over the field
    with start_emulator(config) as handle:
        yield handle


def test_configured_behaviour_survives_reset(configured: Any, tools: Any) -> None:
    api = tools.Api(configured)
    expected = {"lookup_query": "ignored", "lookup_path": "off", "unique_external_ids": False,
                "queued_status_word": "queueing"}
    assert api.stats()["behaviour"] == expected
    configured.set_behaviour(lookup_query="filter", unique_external_ids=True)
    configured.reset()
    assert api.stats()["behaviour"] == expected, "the configured defaults, not the faithful ones"
    first, second = (api.create(external_task_id="same")["task_id"] for _ in range(2))
    assert first != second
    assert api.get("/v1/videos/text2video/same").status_code == 404
    assert len(ids(api.get("/v1/videos/text2video", external_task_id="same"))) == 2
    api.http.close()
