"""The Prefect step tasks' contracts: versioned cache keys of ids and the account, one retry layer, proofs."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, ClassVar

import pytest
from prefect.states import Completed, Failed

from kling_tasks import steps
from kling_tasks.api import AccountError, BackPressureError, ServerError, TaskFailedError, TaskSnapshot, TransportError
from kling_tasks.jobs import ExtensionSpec, GenerationSpec, VideoJob, plan_job
from kling_tasks.recorder import JobRecorder
from kling_tasks.settings import KlingSettings
from kling_tasks.step_results import Rendered, Submission
from kling_tasks.steps import (
    is_this_tasks,
    retry_if_storage_transient,
    store_cache_key,
    store_step,
    submit_cache_key,
    submit_step,
    summarize,
    wait_cache_key,
    wait_step,
)
from kling_tasks.storage import DestinationError, DownloadError, LocalSink, StorageError, StoredObject

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


@pytest.mark.anyio
async def test_a_completed_store_is_never_retried() -> None:
    assert await retry_if_storage_transient(None, None, Completed(data=obj("T1"))) is False


# ---- the wait's cached result: what the ledger records for the step -----------------------------------------


def succeeded(**fields: Any) -> TaskSnapshot:
    return TaskSnapshot.model_validate({
        "task_id": "8601", "task_status": "succeed", "task_info": {"external_task_id": "j-s1-abc"},
        "task_result": {"videos": [{"id": "v-8601", "url": "https://cdn.test/8601.mp4", "duration": "5.042"}]},
        "final_unit_deduction": "1.5", "created_at": 1_000_000, "updated_at": 1_061_000, "request_id": "req-9",
        **fields})


def test_summarize_keeps_the_ids_the_video_the_credits_and_the_times() -> None:
    rendered = summarize("video-extend", succeeded(), processing_since_ms=1_011_000)
    assert rendered == Rendered(kind="video-extend", task_id="8601", external_task_id="j-s1-abc", video_id="v-8601",
                                url="https://cdn.test/8601.mp4", duration=5.042, credits=1.5, request_id="req-9",
                                queued_seconds=11.0, processing_seconds=50.0)


def test_summarize_without_a_processing_observation_counts_it_all_as_processing() -> None:
    rendered = summarize("text2video", succeeded(), processing_since_ms=None)
    assert (rendered.queued_seconds, rendered.processing_seconds) == (0.0, 61.0)
    skewed = summarize("text2video", succeeded(), processing_since_ms=900_000)  # a clock before created_at
    assert (skewed.queued_seconds, skewed.processing_seconds) == (0.0, 161.0)
    late = summarize("text2video", succeeded(), processing_since_ms=1_070_000)  # seen after updated_at
    assert (late.queued_seconds, late.processing_seconds) == (70.0, 0.0)


# ---- the store: proofs of a cached store, the metadata that proves an S3 object -----------------------------


class FakeSink:
    def __init__(self, objects: dict[str, StoredObject] | None = None) -> None:
        self.objects = objects or {}
        self.heads: list[str] = []
        self.stores: list[dict[str, Any]] = []
        self.dest = "s3://bucket/videos"

    def head(self, key: str) -> StoredObject | None:
        self.heads.append(key)
        return self.objects.get(key)

    def store_from_url(self, url: str, key: str, **kwargs: Any) -> StoredObject:
        self.stores.append({"url": url, "key": key, **kwargs})
        return StoredObject(uri=f"s3://bucket/videos/{key}", size=3, sha256="fresh", key=key,
                            task_id=kwargs["metadata"]["task_id"])


class FakeStoreTask:
    """Stands in for the Prefect store task: records each call, and the options of a re-run."""

    def __init__(self, *results: StoredObject) -> None:
        self.results = list(results)
        self.calls: list[tuple[dict[str, Any], tuple[Any, ...]]] = []

    async def __call__(self, *args: Any) -> StoredObject:
        self.calls.append(({}, args))
        return self.results.pop(0)

    def with_options(self, **options: Any) -> Any:
        async def run(*args: Any) -> StoredObject:
            self.calls.append((options, args))
            return self.results.pop(0)
        return run


KEY = "j/step-01.mp4"
CACHED = StoredObject(uri=f"s3://bucket/videos/{KEY}", size=3, sha256="aa", key=KEY, task_id="T1")
AGAIN = StoredObject(uri=f"s3://bucket/videos/{KEY}", size=4, sha256="bb", key=KEY, task_id="T1")


def patch_store(monkeypatch: pytest.MonkeyPatch, sink: FakeSink, store: FakeStoreTask) -> None:
    monkeypatch.setattr(steps, "store_step", store)
    monkeypatch.setattr(steps, "open_sink", lambda dest: {"s3://bucket/videos": sink}[dest])
    monkeypatch.setattr(steps, "get_run_logger", lambda: logging.getLogger("test-steps"))


@pytest.mark.anyio
@pytest.mark.parametrize("current", [CACHED, CACHED.model_copy(update={"task_id": None})])
async def test_a_cached_store_whose_object_is_still_there_is_kept(monkeypatch: pytest.MonkeyPatch,
                                                                  current: StoredObject) -> None:
    sink, store = FakeSink({KEY: current}), FakeStoreTask(CACHED)
    patch_store(monkeypatch, sink, store)
    assert await steps.store_proven("j", STEP, "video-extend", "T1", "s3://bucket/videos", ACCOUNT, "aa") == CACHED
    assert store.calls == [({}, ("j", STEP, "video-extend", "T1", "s3://bucket/videos", ACCOUNT, "aa", False))]
    assert sink.heads == [KEY]


@pytest.mark.anyio
@pytest.mark.parametrize("current", [
    None,  # deleted since the cached store
    CACHED.model_copy(update={"sha256": "changed"}),  # overwritten with other bytes
    CACHED.model_copy(update={"task_id": "T2"}),  # another task's video now sits there
])
async def test_a_cached_store_whose_object_is_gone_or_changed_stores_again(monkeypatch: pytest.MonkeyPatch,
                                                                           current: StoredObject | None) -> None:
    sink, store = FakeSink({KEY: current} if current else {}), FakeStoreTask(CACHED, AGAIN)
    patch_store(monkeypatch, sink, store)
    assert await steps.store_proven("j", STEP, "video-extend", "T1", "s3://bucket/videos", ACCOUNT, "aa") == AGAIN
    assert [options for options, _ in store.calls] == [{}, {"refresh_cache": True}]
    assert store.calls[1][1] == ("j", STEP, "video-extend", "T1", "s3://bucket/videos", ACCOUNT, None, False), \
        "stored again without the stale proof"


class FakeClient:
    """Stands in for KlingClient in `_download`: answers every GET with `snapshot` and records it."""

    snapshot: ClassVar[TaskSnapshot]
    gets: ClassVar[list[tuple[str, str]]] = []

    def __init__(self, settings: KlingSettings) -> None:
        assert isinstance(settings, KlingSettings)

    async def __aenter__(self) -> FakeClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        return None

    async def get(self, kind: str, task_id: str) -> TaskSnapshot:
        self.gets.append((kind, task_id))
        return self.snapshot


@pytest.mark.anyio
async def test_the_download_asks_kling_for_a_fresh_url_and_tags_the_object_with_the_task(
        monkeypatch: pytest.MonkeyPatch) -> None:
    FakeClient.snapshot, FakeClient.gets = succeeded(), []
    monkeypatch.setattr(steps, "KlingClient", FakeClient)
    sink = FakeSink()
    settings = KlingSettings(access_key="ak", secret_key="sk", allow_private_urls=True)
    stored = await steps._download(settings, sink, "video-extend", "8601", KEY, "j", STEP)  # type: ignore[arg-type]
    assert FakeClient.gets == [("video-extend", "8601")]
    assert sink.stores == [{"url": "https://cdn.test/8601.mp4", "key": KEY, "allow_private": True, "metadata": {
        "job_id": "j", "task_id": "8601", "step": "1", "external_task_id": STEP.external_task_id}}]
    assert stored.task_id == "8601"


@pytest.mark.anyio
async def test_a_task_without_a_video_is_never_stored(monkeypatch: pytest.MonkeyPatch) -> None:
    FakeClient.snapshot = TaskSnapshot.model_validate({"task_id": "8601", "task_status": "failed"})
    monkeypatch.setattr(steps, "KlingClient", FakeClient)
    sink = FakeSink()
    with pytest.raises(RuntimeError, match="Kling task 8601 has no video to store"):
        await steps._download(KlingSettings(), sink, "text2video", "8601", KEY, "j", STEP)  # type: ignore[arg-type]
    assert sink.stores == []


def test_the_steps_find_their_jobs_ledger(tmp_path: Path) -> None:
    plan = plan_job(JOB)
    with JobRecorder(LocalSink(tmp_path), JOB, plan, "kling", None, account=ACCOUNT) as ledger:
        assert steps._ledger("j") is ledger
        assert steps._ledger("another-job") is None
    assert steps._ledger("j") is None


@pytest.mark.anyio
@pytest.mark.parametrize(("task_id", "proof"), [("T1", "aa"), ("T9", None)])
async def test_the_ledger_proves_a_store_only_for_the_task_it_recorded(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                       task_id: str, proof: str | None) -> None:
    plan = plan_job(JOB)
    ledger = JobRecorder(LocalSink(tmp_path), JOB, plan, "kling", None, account=ACCOUNT)
    ledger.submitted(STEP, Submission(task_id="T1", external_task_id=STEP.external_task_id, adopted=False))
    ledger.stored(STEP, CACHED)  # an earlier run stored task T1's video, sha256 "aa"
    fresh = CACHED.model_copy(update={"task_id": task_id, "sha256": "cc", "size": 9})
    sink, store = FakeSink({KEY: fresh}), FakeStoreTask(fresh)
    patch_store(monkeypatch, sink, store)
    await steps.store_into_ledger(ledger, STEP, task_id, "s3://bucket/videos", ACCOUNT)
    assert store.calls == [({}, ("j", STEP, "video-extend", task_id, "s3://bucket/videos", ACCOUNT, proof, False))]
    record = ledger.record(STEP)
    assert (record.status, record.uri, record.size, record.sha256) == ("stored", fresh.uri, 9, "cc")


def test_the_submit_sends_the_image_only_if_it_is_still_the_planned_picture(tmp_path: Path) -> None:
    image = tmp_path / "kite.png"
    image.write_bytes(b"\x89PNG the planned picture")
    step = plan_job(VideoJob(generate=GenerationSpec(prompt="p", image=str(image)))).steps[0]
    assert steps.read_planned_image(step, str(image)) == b"\x89PNG the planned picture"
    image.write_bytes(b"\x89PNG another picture")  # edited between the plan and the submit
    with pytest.raises(StorageError, match="changed since the job was planned") as raised:
        steps.read_planned_image(step, str(image))
    assert raised.value.retryable is False
