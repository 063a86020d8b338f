"""Planning continuations: which way each model extends, what it costs, how long it may grow, what its ids are."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from kling_tasks.jobs import ExtensionSpec, GenerationSpec, VideoJob, plan_job
from kling_tasks.kling_requests import build_request, check_requests


def job(model: str, *extensions: str, continuation: str = "auto", **fields: object) -> VideoJob:
    return VideoJob(generate=GenerationSpec(prompt="a kite", model_name=model, **fields),  # type: ignore[arg-type]
                    extensions=[ExtensionSpec(prompt=p) for p in extensions], continuation=continuation,
                    job_id="kite")


@pytest.mark.parametrize(("model", "kinds", "names"), [
    ("kling-v1-6", ["text2video", "video-extend", "video-extend"], ["generate", "extend-1-of-2", "extend-2-of-2"]),
    ("kling-v2-6", ["text2video", "image2video", "image2video"], ["generate", "continue-1-of-2", "continue-2-of-2"]),
])
def test_auto_extends_where_the_model_can_and_continues_from_last_frames_elsewhere(
        model: str, kinds: list[str], names: list[str]) -> None:
    plan = plan_job(job(model, "up", "down"))
    assert [step.kind for step in plan.steps] == kinds and [step.name for step in plan.steps] == names
    assert plan.stitched == (model == "kling-v2-6")


def test_extend_on_a_model_without_video_extend_is_refused() -> None:
    with pytest.raises(ValidationError, match=r"cannot be extended with video-extend.*last-frame"):
        job("kling-v2-6", "up", continuation="extend")


def test_last_frame_can_be_chosen_on_an_extendable_model_and_is_another_task() -> None:
    extend = plan_job(job("kling-v1-6", "up"))
    last_frame = plan_job(job("kling-v1-6", "up", continuation="last-frame"))
    assert last_frame.steps[1].kind == "image2video" and last_frame.steps[1].from_last_frame
    assert extend.steps[0] == last_frame.steps[0], "the generation is the same paid work either way"
    assert extend.steps[1].external_task_id != last_frame.steps[1].external_task_id


def test_spelling_out_auto_keeps_the_ids() -> None:
    assert plan_job(job("kling-v1-6", "up")) == plan_job(job("kling-v1-6", "up", continuation="extend"))
    assert plan_job(job("kling-v2-6", "up")) == plan_job(job("kling-v2-6", "up", continuation="last-frame"))


@pytest.mark.parametrize(("mode", "duration", "each"), [("std", "5", 1.5), ("pro", "10", 5.0)])
def test_a_continuation_costs_an_image2video_clip(mode: str, duration: str, each: float) -> None:
    plan = plan_job(job("kling-v2-6", "a", "b", "c", mode=mode, duration=duration))
    assert [step.estimated_credits for step in plan.steps] == [each] * 4


def test_last_frame_chains_have_a_configurable_length_limit() -> None:
    assert len(plan_job(job("kling-v2-6", *["on"] * 35)).steps) == 36, "36 x 5 s = 180 s, the default"
    with pytest.raises(ValidationError, match="over max_seconds 180"):
        job("kling-v2-6", *["on"] * 36)
    longer = VideoJob(generate=GenerationSpec(prompt="a kite", model_name="kling-v2-6"), max_seconds=300,
                      extensions=[ExtensionSpec(prompt="on")] * 59)
    assert len(plan_job(longer).steps) == 60
    with pytest.raises(ValidationError, match="use at most 1 extensions"):
        VideoJob(generate=GenerationSpec(prompt="a kite", model_name="kling-v2-6", duration="10"), max_seconds=20,
                 extensions=[ExtensionSpec(prompt="a"), ExtensionSpec(prompt="b")])


def test_the_continuation_request_sends_the_frame_and_the_jobs_settings() -> None:
    plan_ = plan_job(job("kling-v2-6", "up", mode="pro", duration="10", cfg_scale=0.4))
    request = build_request(plan_.steps[1], job("kling-v2-6", "up", mode="pro", duration="10").generate, None,
                            b"\xff\xd8jpeg\xff\xd9")
    body = request.to_body("kling")
    assert (body["model_name"], body["mode"], body["duration"], body["prompt"]) == ("kling-v2-6", "pro", "10", "up")
    assert body["image"] == "/9hqcGVn/9k=", "raw base64, no data: prefix"
    with pytest.raises(ValueError, match="last frame"):
        build_request(plan_.steps[1], job("kling-v2-6").generate, None)
    check_requests(job("kling-v2-6", "up"), plan_job(job("kling-v2-6", "up")), "cometapi")  # planned: passes


def test_sound_is_asked_of_models_that_make_it_and_sent_with_every_clip() -> None:
    with pytest.raises(ValidationError, match="makes no sound"):
        job("kling-v2-6", "up", sound="on")  # std
    loud = job("kling-v2-6", "up", sound="on", mode="pro")
    plan = plan_job(loud)
    for step in plan.steps:
        body = build_request(step, loud.generate, None, b"\xff\xd8jpeg\xff\xd9").to_body("kling")
        assert body["sound"] == "on"
    quiet = plan_job(job("kling-v2-6", "up", mode="pro"))
    assert quiet.steps[0].external_task_id != plan.steps[0].external_task_id, "sound is part of the paid work"
    assert "sound" not in build_request(quiet.steps[0], job("kling-v2-6", mode="pro").generate, None).to_body("kling")
