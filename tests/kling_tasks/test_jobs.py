"""VideoJob: validation before anything is paid, credit estimates, deterministic external ids."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from pydantic import ValidationError

from kling_tasks.jobs import ExtensionSpec, GenerationSpec, PlanError, VideoJob, check_budget, plan_job


def job(*extensions: str, **generate: object) -> VideoJob:
    return VideoJob(generate=GenerationSpec(prompt="a fox in the snow", **generate),  # type: ignore[arg-type]
                    extensions=[ExtensionSpec(prompt=p) for p in extensions])


def test_external_ids_are_deterministic_short_and_safe() -> None:
    first, again = plan_job(job("runs", "jumps")), plan_job(job("runs", "jumps"))
    assert [s.external_task_id for s in first.steps] == [s.external_task_id for s in again.steps]
    for step in first.steps:
        assert re.fullmatch(r"kp-s[0-9]+-[0-9a-f]{16}", step.external_task_id), "derived jobs share the kp namespace"
    named = plan_job(job("runs").model_copy(update={"job_id": "x" * 40}))
    for step in named.steps:
        assert re.fullmatch(r"[A-Za-z0-9-]{1,64}", step.external_task_id)
        assert step.external_task_id.startswith(f"{'x' * 40}-s{step.index}-")
    assert [s.name for s in first.steps] == ["generate", "extend-1-of-2", "extend-2-of-2"]


def test_a_changed_prompt_changes_its_id_and_every_later_one() -> None:
    same_job = plan_job(VideoJob(generate=GenerationSpec(prompt="a fox in the snow"), job_id="fixed",
                                 extensions=[ExtensionSpec(prompt=p) for p in ("runs", "jumps", "sleeps")])).steps
    changed = plan_job(VideoJob(generate=GenerationSpec(prompt="a fox in the snow"), job_id="fixed",
                                extensions=[ExtensionSpec(prompt=p) for p in ("runs", "leaps", "sleeps")])).steps
    assert same_job[:2] == changed[:2]
    assert all(a.external_task_id != b.external_task_id for a, b in zip(same_job[2:], changed[2:], strict=True))


def test_prompts_never_appear_in_ids() -> None:
    plan = plan_job(job("the-secret-plot-twist"))
    assert all("secret" not in step.external_task_id for step in plan.steps)


def test_resubmitting_a_step_gives_it_and_later_steps_new_ids() -> None:
    base = plan_job(job("a", "b")).steps
    bumped = plan_job(job("a", "b"), attempts={1: 1}).steps
    assert bumped[0] == base[0]
    assert bumped[1].external_task_id != base[1].external_task_id and bumped[1].attempt == 1
    assert bumped[2].external_task_id != base[2].external_task_id
    assert [s.content_digest for s in bumped] == [s.content_digest for s in base], "the same spec, a new attempt"


@pytest.mark.parametrize("job_id", [None, "kite"])
def test_appending_an_extension_keeps_every_earlier_id(job_id: str | None) -> None:
    """The same content on the same account is the same task: only the new step is paid for."""
    shorter = plan_job(job("runs").model_copy(update={"job_id": job_id})).steps
    longer = plan_job(job("runs", "jumps").model_copy(update={"job_id": job_id})).steps
    assert [s.external_task_id for s in longer[:2]] == [s.external_task_id for s in shorter]
    assert longer[2].external_task_id not in {s.external_task_id for s in shorter}


def test_a_job_id_is_a_namespace() -> None:
    ids = {plan_job(job("runs").model_copy(update={"job_id": name})).steps[0].external_task_id
           for name in (None, "teaser-20261121", "teaser-20261122")}
    assert len(ids) == 3


def test_a_take_is_a_deliberate_second_video_of_the_same_spec() -> None:
    first, second = plan_job(job("runs")), plan_job(job("runs").model_copy(update={"take": 2}))
    assert all(a.external_task_id != b.external_task_id for a, b in zip(first.steps, second.steps, strict=True))
    assert first.job_id != second.job_id, "a derived job id names the take too"
    assert plan_job(job("runs").model_copy(update={"take": 1})) == first


@pytest.mark.parametrize(("duration", "extensions", "accepted"),
                         [("5", 35, True), ("5", 36, False), ("10", 34, True), ("10", 35, False)])
def test_the_180_s_cap_is_inclusive(duration: str, extensions: int, accepted: bool) -> None:
    """5 + 35 x 5 = 180 s exactly is allowed; one more worst-case extension is not."""
    spec = {"generate": {"prompt": "a fox", "duration": duration}, "extensions": [{"prompt": "more"}] * extensions}
    if accepted:
        assert len(plan_job(VideoJob.model_validate(spec)).steps) == extensions + 1
    else:
        with pytest.raises(ValidationError, match="over Kling's 180 s cap"):
            VideoJob.model_validate(spec)


def test_an_oversized_or_unreadable_image_is_refused_before_anything_is_sent(tmp_path: Path) -> None:
    big = tmp_path / "big.png"
    big.write_bytes(b"\x89PNG" + b"0" * (10 * 1024 * 1024))
    with pytest.raises(ValidationError, match="Kling accepts at most 10 MB"):
        job(image=str(big))
    with pytest.raises(ValidationError, match="does not exist"):
        job(image=str(tmp_path / "missing.png"))
    (tmp_path / "folder.png").mkdir()
    with pytest.raises(ValidationError, match=r"folder\.png"):
        job(image=str(tmp_path / "folder.png"))


def test_default_job_id_ignores_destination_and_budget() -> None:
    one = job("a").model_copy(update={"dest": "s3://bucket/x", "max_credits": 9})
    assert one.effective_job_id() == job("a").effective_job_id()


@pytest.mark.parametrize(
    ("mode", "duration", "extensions", "credits"),
    [("std", "5", 0, 1), ("std", "10", 2, 4), ("pro", "5", 2, 10.5), ("pro", "10", 1, 10.5)],
)
def test_credit_estimate_from_the_price_table(mode: str, duration: str, extensions: int, credits: float) -> None:
    plan = plan_job(job(*["more"] * extensions, mode=mode, duration=duration))
    assert plan.estimated_credits == credits


def test_budget_refusal() -> None:
    plan_it = job("a", "b").model_copy(update={"max_credits": 2})
    with pytest.raises(PlanError, match="estimated at 3 credits, over max_credits 2"):
        check_budget(plan_it, plan_job(plan_it))


@pytest.mark.parametrize(
    ("kwargs", "extensions", "message"),
    [
        ({"model_name": "kling-v1-5"}, 0, "cannot do text2video"),
        ({"model_name": "kling-v9"}, 0, "cannot do text2video"),
        ({}, 36, "use at most 35 extensions"),
        ({"duration": "10"}, 35, "use at most 34 extensions"),
        ({"prompt": "x" * 2501}, 0, "at most 2500 characters"),
        ({"cfg_scale": 1.5}, 0, "less than or equal to 1"),
        ({"image": "photo.webp"}, 0, ".jpg, .jpeg or .png"),
    ],
)
def test_impossible_plans_are_refused(kwargs: dict[str, object], extensions: int, message: str) -> None:
    generate = {"prompt": "a fox", **kwargs}
    with pytest.raises(ValidationError, match=re.escape(message)):
        VideoJob(generate=GenerationSpec.model_validate(generate),
                 extensions=[ExtensionSpec(prompt="more")] * extensions)


def test_job_id_must_be_a_safe_name() -> None:
    with pytest.raises(ValidationError, match="job_id"):
        VideoJob(generate=GenerationSpec(prompt="x"), job_id="Bad Name/..")


def test_a_local_image_is_identified_by_its_bytes(tmp_path: Path) -> None:
    a, b = tmp_path / "a.png", tmp_path / "b.png"
    a.write_bytes(b"same-bytes")
    b.write_bytes(b"same-bytes")
    assert job(image=str(a)).effective_job_id() == job(image=str(b)).effective_job_id()
    b.write_bytes(b"other-bytes")
    assert job(image=str(a)).effective_job_id() != job(image=str(b)).effective_job_id()
    assert plan_job(job(image=str(a))).steps[0].kind == "image2video"


def test_a_dated_job_id_gives_a_new_job_per_day_and_the_same_within_one() -> None:
    from datetime import date

    nightly = VideoJob(generate=GenerationSpec(prompt="x"), job_id="teaser-{date}")
    monday, tuesday = nightly.for_date(date(2026, 11, 23)), nightly.for_date(date(2026, 11, 24))
    assert monday.effective_job_id() == "teaser-20261123"
    assert plan_job(monday).steps[0].external_task_id != plan_job(tuesday).steps[0].external_task_id
    assert nightly.for_date(date(2026, 11, 23)) == monday


def test_ids_are_pinned_so_an_upgrade_never_re_pays_in_flight_jobs() -> None:
    """Golden values: if this fails, the change would give running jobs new ids and pay for their steps again.
    Change the derivation only deliberately, together with the cache version in kling_tasks.identity."""
    spec = VideoJob(generate=GenerationSpec(prompt="a fox in the snow"), job_id="golden",
                    extensions=[ExtensionSpec(prompt="it runs"), ExtensionSpec(prompt="it sleeps", cfg_scale=0.3)])
    assert [s.external_task_id for s in plan_job(spec).steps] == GOLDEN_IDS
    derived = VideoJob(generate=GenerationSpec(prompt="a fox in the snow"))
    assert (derived.effective_job_id(), plan_job(derived).steps[0].external_task_id) == GOLDEN_DERIVED


def test_spelling_out_a_default_is_the_same_plan() -> None:
    implicit = VideoJob(generate=GenerationSpec(prompt="a fox"), extensions=[ExtensionSpec(prompt="runs")])
    explicit = VideoJob(generate=GenerationSpec(prompt="a fox", model_name="kling-v1", mode="std", duration="5"),
                        extensions=[ExtensionSpec(prompt="runs", negative_prompt=None)])
    assert explicit.effective_job_id() == implicit.effective_job_id()
    assert plan_job(explicit) == plan_job(implicit)


GOLDEN_IDS = ["golden-s0-47e82793e5168df3", "golden-s1-e89732222906964e", "golden-s2-7fb666224e4cd89b"]
GOLDEN_DERIVED = ("job-ffefdfc24263", "kp-s0-47e82793e5168df3")


def test_each_planned_step_carries_its_own_request_fields() -> None:
    """The id is the content's, but the request is built from the step: a shifted prompt pays for the wrong video."""
    spec = VideoJob(generate=GenerationSpec(prompt="a fox", negative_prompt="blur", cfg_scale=0.7),
                    extensions=[ExtensionSpec(prompt="it runs", negative_prompt="rain", cfg_scale=0.2),
                                ExtensionSpec(prompt="it jumps"), ExtensionSpec(prompt="it sleeps", cfg_scale=0.9)])
    steps = plan_job(spec).steps
    assert [(s.prompt, s.negative_prompt, s.cfg_scale) for s in steps] == [
        ("a fox", "blur", 0.7), ("it runs", "rain", 0.2), ("it jumps", None, None), ("it sleeps", None, 0.9)]
    assert [s.kind for s in steps] == ["text2video", "video-extend", "video-extend", "video-extend"]


@pytest.mark.parametrize("url", ["http://cdn.test/fox.png", "https://cdn.test/fox.png?sig=abc"])
def test_an_image_url_is_not_checked_as_a_local_file(url: str) -> None:
    plan = plan_job(job(image=url))
    assert plan.steps[0].kind == "image2video"


def test_image2video_has_its_own_model_list() -> None:
    """kling-v1-5 renders image2video only: accepted with an image, refused without one."""
    assert plan_job(job(image="https://cdn.test/fox.png", model_name="kling-v1-5")).steps[0].kind == "image2video"
    with pytest.raises(ValidationError, match="cannot do text2video"):
        job(model_name="kling-v1-5")


def test_an_image_of_exactly_10_mib_is_accepted(tmp_path: Path) -> None:
    edge = tmp_path / "edge.png"
    with edge.open("wb") as fh:
        fh.truncate(10 * 1024 * 1024)
    assert plan_job(job(image=str(edge))).steps[0].kind == "image2video"
    with edge.open("ab") as fh:
        fh.write(b"1")
    with pytest.raises(ValidationError, match="at most 10 MB"):
        job(image=str(edge))


def test_a_plan_that_costs_exactly_the_budget_is_allowed() -> None:
    plan_it = job("a", "b").model_copy(update={"max_credits": 3})
    assert plan_job(plan_it).estimated_credits == 3
    check_budget(plan_it, plan_job(plan_it))


def test_for_date_leaves_jobs_without_a_date_alone() -> None:
    from datetime import date

    derived, named = job("a"), job("a").model_copy(update={"job_id": "kite"})
    assert derived.for_date(date(2026, 1, 2)) is derived
    assert named.for_date(date(2026, 1, 2)).job_id == "kite"


def test_the_public_spec_names_the_job_and_drops_a_signed_url_query() -> None:
    signed = "https://cdn.test/fox.png?X-Amz-Signature=SECRETSIG&X-Amz-Credential=AKIA#frag"
    spec = job("it runs", image=signed).public_spec()
    assert spec["generate"]["image"] == "https://cdn.test/fox.png"
    assert "SECRETSIG" not in str(spec) and "AKIA" not in str(spec)
    assert spec["job_id"] == job("it runs", image=signed).effective_job_id()
    assert spec["extensions"] == [{"prompt": "it runs", "negative_prompt": None, "cfg_scale": None}]
    plain = job(image="http://cdn.test/fox.png?token=SECRET#x").public_spec()
    assert plain["generate"]["image"] == "http://cdn.test/fox.png"
    named = job().model_copy(update={"job_id": "kite"}).public_spec()
    assert named["job_id"] == "kite" and named["generate"]["image"] is None
