"""The documented automation, run for real: a `kling.task.failed` event makes the server call a webhook."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from prefect import get_client

from kling_tasks import events
from kling_tasks.manifest import StepRecord
from kling_tasks.observability.automations import create_failure_webhook


def test_failed_kling_task_calls_the_webhook(prefect_server: Any, json_receiver: Callable[[], Any]) -> None:
    hook = json_receiver()
    url, received = hook.url("/kling-failed"), hook.received
    automation_id = create_failure_webhook(url, name="test-kling-task-failed")
    with get_client(sync_client=True) as client:
        assert client.read_automation(automation_id) is not None
    record = StepRecord(index=1, kind="video-extend", name="extend-1-of-2", external_task_id="auto-job-s1-abc",
                        task_id="kt-123", status="failed", status_msg='refused: "unsafe" prompt')
    events.emit_step_event("kling.task.failed", "auto-job", record, {"task_status_msg": record.status_msg})

    deadline = time.monotonic() + 30  # the triggers service evaluates, then the actions service calls out
    mine: list[dict[str, Any]] = []
    try:
        while not mine and time.monotonic() < deadline:
            time.sleep(0.2)
            mine = [call for call in received if call["job_id"] == "auto-job"]  # other tests' jobs fail too
    finally:
        with get_client(sync_client=True) as client:
            client.delete_automation(automation_id)
    # flow_run_id: the run that emitted the event (tests/flows/test_observability.py checks it from a real
    # failing job); a bare emit like this one may or may not carry a run, depending on the context.
    assert [{k: v for k, v in call.items() if k != "flow_run_id"} for call in mine] == [{
        "event": "kling.task.failed", "job_id": "auto-job", "kling_task_id": "kt-123",
        "external_task_id": "auto-job-s1-abc", "step": "extend-1-of-2", "message": 'refused: "unsafe" prompt',
    }]
