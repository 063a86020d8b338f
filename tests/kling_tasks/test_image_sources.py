"""Start images: what identifies them, what of a signed URL may be stored, s3:// objects read from moto."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import boto3
import pytest

from kling_tasks.image_sources import (
    image_digest,
    is_signed,
    is_withheld,
    read_image,
    unsigned,
    withheld,
)
from kling_tasks.jobs import GenerationSpec, VideoJob, check_capabilities, plan_job

SIGNATURE = "c0ffee5eedfacade0123456789abcdef0123456789abcdef0123456789abcdef"
TOKEN = "IQoJb3JpZ2luX2VjEXAMPLEsessiontoken"


def aws_signed(signature: str = SIGNATURE, date: str = "20261202T010203Z") -> str:
    return ("https://bucket.s3.amazonaws.com/kite.png?v=2&X-Amz-Algorithm=AWS4-HMAC-SHA256"
            f"&X-Amz-Credential=AKIAEXAMPLE%2F20261202%2Fus-east-1%2Fs3%2Faws4_request&X-Amz-Date={date}"
            f"&X-Amz-Expires=3600&X-Amz-SignedHeaders=host&X-Amz-Security-Token={TOKEN}"
            f"&X-Amz-Signature={signature}")


SIGNED = [
    aws_signed(),
    f"https://d111.cloudfront.net/kite.png?Expires=1767225600&Signature={SIGNATURE}&Key-Pair-Id=K2JCJMDEHXQW5F",
    f"https://storage.googleapis.com/b/kite.png?X-Goog-Algorithm=GOOG4-RSA-SHA256&X-Goog-Signature={SIGNATURE}",
    f"https://acct.blob.core.windows.net/c/kite.png?sv=2022-11-02&se=2026-12-03&sr=b&sp=r&sig={SIGNATURE}",
]


def sha(data: str | bytes) -> str:
    return hashlib.sha256(data.encode() if isinstance(data, str) else data).hexdigest()


@pytest.mark.parametrize("url", SIGNED)
def test_a_signed_url_is_stored_withheld_and_identified_without_its_signing(url: str) -> None:
    assert is_signed(url)
    stored = withheld(url)
    assert SIGNATURE not in stored and TOKEN not in stored and "AKIAEXAMPLE" not in stored
    assert is_withheld(stored) and not is_withheld(url)
    assert unsigned(stored) == unsigned(url) and SIGNATURE not in unsigned(url)
    assert image_digest(stored) == image_digest(url)


def test_a_freshly_signed_url_of_the_same_object_is_the_same_input() -> None:
    again = aws_signed(signature="f" * 64, date="20261203T000000Z")
    assert image_digest(again) == image_digest(aws_signed())
    assert unsigned(aws_signed()) == "https://bucket.s3.amazonaws.com/kite.png?v=2"  # other parameters stay
    assert image_digest(aws_signed().replace("kite.png", "hawk.png")) != image_digest(aws_signed())


@pytest.mark.parametrize("url", ["http://cdn.test/kite.png", "https://cdn.test/kite.png?sig=1",
                                 "https://cdn.test/kite.png?Signature=1"])
def test_an_unsigned_url_is_identified_by_itself_never_read_as_a_file(url: str) -> None:
    assert not is_signed(url) and withheld(url) == url and unsigned(url) == url
    assert image_digest(url) == "url:" + sha(url)
    assert image_digest(url + "&v=2") != image_digest(url)


def test_a_local_image_is_identified_by_its_bytes_not_its_name(tmp_path: Path) -> None:
    one, renamed, edited = tmp_path / "a.png", tmp_path / "b.png", tmp_path / "c.png"
    one.write_bytes(b"pixels")
    renamed.write_bytes(b"pixels")
    edited.write_bytes(b"pixels, retouched")
    assert image_digest(str(one)) == image_digest(str(renamed)) == "sha256:" + sha(b"pixels")
    assert image_digest(str(edited)) != image_digest(str(one))


def test_the_job_json_withholds_the_signature_and_the_object_keeps_it() -> None:
    job = VideoJob(generate=GenerationSpec(prompt="a kite", image=aws_signed()))
    as_json = json.dumps(job.model_dump(mode="json"))
    assert SIGNATURE not in as_json and TOKEN not in as_json and SIGNATURE not in job.model_dump_json()
    assert SIGNATURE not in repr(job) and SIGNATURE not in str(job.public_spec())
    assert job.generate.image == aws_signed(), "the run in this process sends the whole URL"
    check_capabilities(job)
    assert plan_job(job).steps[0].external_task_id == plan_job(VideoJob(generate=GenerationSpec(
        prompt="a kite", image=aws_signed(signature="e" * 64)))).steps[0].external_task_id
    with pytest.raises(ValueError, match=r"withheld from Prefect.*s3://bucket/key"):
        VideoJob.model_validate_json(job.model_dump_json())  # what a UI retry or another worker gets


@pytest.fixture
def image_bucket(aws_env: str) -> Any:
    s3 = boto3.client("s3")
    s3.create_bucket(Bucket="pictures")
    return s3


def test_an_s3_image_is_read_with_the_standard_chain_and_identified_by_its_bytes(
        image_bucket: Any, tmp_path: Path) -> None:
    image_bucket.put_object(Bucket="pictures", Key="cats/kite.png", Body=b"\x89PNG pixels")
    local = tmp_path / "kite.png"
    local.write_bytes(b"\x89PNG pixels")
    assert read_image("s3://pictures/cats/kite.png") == b"\x89PNG pixels"
    assert image_digest("s3://pictures/cats/kite.png") == image_digest(str(local)) == "sha256:" + sha(
        b"\x89PNG pixels")
    job = VideoJob(generate=GenerationSpec(prompt="a kite", image="s3://pictures/cats/kite.png"))
    check_capabilities(job)
    assert job.model_dump(mode="json")["generate"]["image"] == "s3://pictures/cats/kite.png"


@pytest.mark.parametrize(("ref", "message"), [
    ("s3://pictures/missing.png", "does not exist"),
    ("s3://pictures/notes.txt", r"must be a \.jpg, \.jpeg or \.png"),
    ("s3://pictures/", "expected s3://bucket/key"),
    ("s3://nobucket-here/kite.png", r"does not exist|cannot be read"),
    ("s3://pictures/huge.jpg", r"MB; Kling accepts at most 10 MB"),
])
def test_a_bad_s3_image_is_one_plan_error(image_bucket: Any, ref: str, message: str) -> None:
    image_bucket.put_object(Bucket="pictures", Key="notes.txt", Body=b"text")
    image_bucket.put_object(Bucket="pictures", Key="huge.jpg", Body=b"\0" * (10 * 1024 * 1024 + 1))
    with pytest.raises(ValueError, match=message):  # PlanError, inside pydantic's error for the job
        VideoJob(generate=GenerationSpec(prompt="a kite", image=ref))
