"""The Prefect step tasks' contracts: explicit, versioned cache keys made of ids, and retries only when useful."""

from __future__ import annotations

from typing import Any

import pytest
from prefect.states import Failed

from kling_tasks.api import AccountError, BackPressureError, ContentPolicyError, ServerError, TaskFailedError
from kling_tasks.jobs import ExtensionSpec, GenerationSpec, VideoJob, plan_job
from kling_tasks.steps import (
    retry_if_transient,
    store_cache_key,
    store_step,
    submit_cache_key,
    submit_step,
    wait_cache_key,
    wait_step,
)
from kling_tasks.storage import DownloadError

SECRET_PROMPT = "a very private storyline"
JOB = VideoJob(generate=GenerationSpec(prompt=SECRET_PROMPT), extensions=[ExtensionSpec(prompt="x")])
STEP = plan_job(JOB).steps[1]


def test_cache_keys_are_versioned_ids_and_never_prompt_text() -> None:
    keys = [
        submit_cache_key(None, {"step": STEP, "generation": None, "parent": None}),  # type: ignore[arg-type]
        wait_cache_key(None, {"task_id": "867283741759111202"}),  # type: ignore[arg-type]
        store_cache_key(None, {"task_id": "867283741759111202", "dest": "s3://b/p"}),  # type: ignore[arg-type]
    ]
    assert keys[0] == f"kling/v1/submit/{STEP.external_task_id}"
    assert keys[1] == "kling/v1/wait/867283741759111202"
    assert keys[2].startswith("kling/v1/store/867283741759111202/")
    assert all("private" not in key for key in keys)


def test_a_destination_is_one_key_with_or_without_a_trailing_slash() -> None:
    def key(dest: str) -> str:
        return store_cache_key(None, {"task_id": "1", "dest": dest})  # type: ignore[arg-type]

    assert key("s3://b/p") == key("s3://b/p/")
    assert key("s3://b/p") != key("s3://b/q")


@pytest.mark.parametrize("paid_task", [submit_step, wait_step, store_step])
def test_paid_steps_persist_json_results_under_their_own_key(paid_task: Any) -> None:
    assert paid_task.cache_key_fn is not None, "never Prefect's default policy (it contains the run id)"
    assert paid_task.persist_result is True
    assert paid_task.result_serializer == "json"
    assert paid_task.refresh_cache is False, "a global refresh setting must never re-pay a step"
    assert paid_task.retry_condition_fn is retry_if_transient


@pytest.mark.anyio
@pytest.mark.parametrize(
    ("error", "retry"),
    [
        (BackPressureError("parallel task over resource pack limit", code=1303), True),
        (ServerError("internal error", code=5000), True),
        (DownloadError("cut off halfway", retryable=True), True),
        (AccountError("resource pack used up", code=1102), False),
        (ContentPolicyError("content policy", code=1301), False),
        (DownloadError("URL expired", retryable=False, status=403), False),
        (ValueError("a bug"), False),
    ],
)
async def test_only_transient_failures_are_retried(error: Exception, retry: bool) -> None:
    assert await retry_if_transient(None, None, Failed(data=error)) is retry


@pytest.mark.anyio
async def test_a_failed_kling_task_is_never_retried() -> None:
    from kling_tasks.api import TaskSnapshot

    snapshot = TaskSnapshot.model_validate({"task_id": "1", "task_status": "failed", "task_status_msg": "policy"})
    assert await retry_if_transient(None, None, Failed(data=TaskFailedError(snapshot))) is False
