"""The Prefect step tasks' contracts: versioned cache keys of ids and the account, one retry layer, proofs."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from prefect.states import Failed

from kling_tasks.api import AccountError, BackPressureError, ServerError, TaskFailedError, TransportError
from kling_tasks.jobs import ExtensionSpec, GenerationSpec, VideoJob, plan_job
from kling_tasks.steps import (
    is_this_tasks,
    retry_if_storage_transient,
    store_cache_key,
    store_step,
    submit_cache_key,
    submit_step,
    wait_cache_key,
    wait_step,
)
from kling_tasks.storage import DestinationError, DownloadError, StoredObject

SECRET_PROMPT = "a very private storyline"
JOB = VideoJob(generate=GenerationSpec(prompt=SECRET_PROMPT), extensions=[ExtensionSpec(prompt="x")], job_id="j")
STEP = plan_job(JOB).steps[1]
ACCOUNT = "a1b2c3d4e5f6"


def store_key(dest: str, *, task_id: str = "1", job_id: str = "j", account: str = ACCOUNT) -> str:
    return store_cache_key(None, {"task_id": task_id, "dest": dest, "job_id": job_id,  # type: ignore[arg-type]
                                  "step": STEP, "account": account})


def test_cache_keys_are_versioned_ids_of_this_account_and_never_prompt_text() -> None:
    keys = [
        submit_cache_key(None, {"step": STEP, "account": ACCOUNT}),  # type: ignore[arg-type]
        wait_cache_key(None, {"task_id": "867283741759111202", "account": ACCOUNT}),  # type: ignore[arg-type]
        store_key("s3://b/p", task_id="867283741759111202"),
    ]
    assert keys[0] == f"kling/v2/{ACCOUNT}/submit/{STEP.external_task_id}"
    assert keys[1] == f"kling/v2/{ACCOUNT}/wait/867283741759111202"
    assert keys[2].startswith(f"kling/v2/{ACCOUNT}/store/867283741759111202/")
    assert all("private" not in key for key in keys)


def test_another_account_never_shares_a_key() -> None:
    other = "ffffffffffff"
    assert submit_cache_key(None, {"step": STEP, "account": other}) != keys_of(ACCOUNT)[0]  # type: ignore[arg-type]
    assert wait_cache_key(None, {"task_id": "1", "account": other}) != keys_of(ACCOUNT)[1]  # type: ignore[arg-type]
    assert store_key("s3://b/p", account=other) != store_key("s3://b/p")


def keys_of(account: str) -> tuple[str, str]:
    return (submit_cache_key(None, {"step": STEP, "account": account}),  # type: ignore[arg-type]
            wait_cache_key(None, {"task_id": "1", "account": account}))  # type: ignore[arg-type]


def test_the_store_key_is_the_resolved_destination_and_the_object(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    from_a = store_key("./out")
    monkeypatch.chdir(tmp_path / "b")
    assert store_key("./out") != from_a, "./out from another folder is another destination"
    assert store_key(str(tmp_path / "b" / "out")) == store_key("./out")
    assert store_key("s3://b/p") == store_key("s3://b/p/")
    assert store_key("s3://b/p") != store_key("s3://b/q")
    assert store_key("s3://b/p", job_id="other-job") != store_key("s3://b/p"), "one task adopted by two jobs"


@pytest.mark.parametrize(("paid_task", "key_fn"), [(submit_step, submit_cache_key), (wait_step, wait_cache_key),
                                                    (store_step, store_cache_key)])
def test_steps_persist_json_results_under_their_own_key(paid_task: Any, key_fn: Any) -> None:
    assert paid_task.cache_key_fn is key_fn, "never Prefect's default policy (it contains the run id)"
    assert paid_task.persist_result is True
    assert paid_task.result_serializer == "json"
    assert paid_task.refresh_cache is False, "a global refresh setting must never re-pay a step"


@pytest.mark.parametrize("kling_task", [submit_step, wait_step])
def test_kling_tasks_are_not_retried_by_prefect(kling_task: Any) -> None:
    """The client retries GETs and unsent POSTs, the submit waits out back-pressure: a second layer would
    multiply them (4 GETs x 6 tries) or resend creates."""
    assert kling_task.retries == 0
    assert kling_task.retry_condition_fn is None


def test_only_the_store_is_retried_and_only_for_storage_failures() -> None:
    assert store_step.retries == 4
    assert store_step.retry_condition_fn is retry_if_storage_transient


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("error", "retry"),
    [
        (DownloadError("cut off halfway", retryable=True), True),
        (DestinationError("S3 refused: InternalError", retryable=True), True),
        (DownloadError("URL expired", retryable=False, status=403), False),
        (DestinationError("access denied"), False),
        (ServerError("internal error", code=5000), False),  # the client already retried its GETs
        (TransportError("reset", may_have_been_sent=True), False),
        (BackPressureError("parallel task over resource pack limit", code=1303), False),
        (AccountError("resource pack used up", code=1102), False),
        (ValueError("a bug"), False),
    ],
)
async def test_store_retries_only_transient_storage_failures(error: Exception, retry: bool) -> None:
    assert await retry_if_storage_transient(None, None, Failed(data=error)) is retry


@pytest.mark.anyio
async def test_a_failed_kling_task_is_never_retried() -> None:
    from kling_tasks.api import TaskSnapshot

    snapshot = TaskSnapshot.model_validate({"task_id": "1", "task_status": "failed", "task_status_msg": "policy"})
    assert await retry_if_storage_transient(None, None, Failed(data=TaskFailedError(snapshot))) is False


def obj(task_id: str | None, sha256: str = "aa") -> StoredObject:
    return StoredObject(uri="u", size=1, sha256=sha256, key="j/step-00.mp4", task_id=task_id)


@pytest.mark.parametrize(
    ("stored", "proven", "reuse"),
    [
        (None, None, False),
        (obj("T1"), None, True),  # S3: the object's metadata names this task
        (obj("T2"), "aa", False),  # another task's video, whatever the ledger says
        (obj(None, "aa"), "aa", True),  # local: the ledger recorded this task with these bytes
        (obj(None, "aa"), None, False),  # local, no proof: a file from another job or a stale run
        (obj(None, "aa"), "bb", False),
    ],
)
def test_an_object_is_reused_only_with_proof(stored: StoredObject | None, proven: str | None, reuse: bool) -> None:
    assert is_this_tasks(stored, "T1", proven) is reuse
