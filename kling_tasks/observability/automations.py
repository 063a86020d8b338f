"""A ready-made automation: call a webhook whenever a Kling task ends `failed` (docs/observability.md).

It reacts to the `kling.task.failed` events emitted from the job's ledger (kling_tasks.events), so it works for
every job and deployment without touching the flow. The webhook receives a small JSON body naming the job,
the Kling task and the flow run; point it at Slack, a pager or your own service.
"""

from __future__ import annotations

from datetime import timedelta
from uuid import UUID

from prefect import get_client
from prefect.automations import AutomationCore
from prefect.blocks.webhook import Webhook
from prefect.events.actions import CallWebhook
from prefect.events.schemas.automations import EventTrigger, Posture

FAILED_EVENT = "kling.task.failed"

# Jinja, rendered by the server per event; tojson keeps Kling's free-text message valid JSON.
FAILURE_PAYLOAD = (
    '{"event": {{ event.event | tojson }}, '
    '"job_id": {{ event.payload.job_id | tojson }}, '
    '"kling_task_id": {{ event.payload.task_id | tojson }}, '
    '"external_task_id": {{ event.payload.external_task_id | tojson }}, '
    '"step": {{ event.resource.get("prefect.resource.name") | tojson }}, '
    '"message": {{ event.payload.task_status_msg | tojson }}, '
    '"flow_run_id": {{ (event.resource_in_role["flow-run"].id.removeprefix("prefect.flow-run.") '
    'if "flow-run" in event.resource_in_role else none) | tojson }}}'
)


def failure_webhook_automation(webhook_block_id: UUID, name: str = "kling-task-failed-webhook") -> AutomationCore:
    """Every `kling.task.failed` event, one webhook call each (reactive, threshold 1)."""
    return AutomationCore(
        name=name,
        description="Call a webhook when a Kling task ends failed (event kling.task.failed).",
        enabled=True,
        trigger=EventTrigger(
            expect={FAILED_EVENT},
            match={"prefect.resource.id": "kling.task.*"},
            posture=Posture.Reactive,
            threshold=1,
            within=timedelta(0),
        ),
        actions=[CallWebhook(block_document_id=webhook_block_id, payload=FAILURE_PAYLOAD)],
    )


def create_failure_webhook(url: str, name: str = "kling-task-failed-webhook") -> UUID:
    """Save a Webhook block for `url` and create the automation on the current Prefect API; returns its id."""
    # save() is async-dispatched: without _sync it would return a coroutine when called under an event loop.
    saved = Webhook(method="POST", url=url, headers={"Content-Type": "application/json"}).save(
        name, overwrite=True, _sync=True)  # type: ignore[call-arg]
    block_id = UUID(str(saved))
    with get_client(sync_client=True) as client:
        return client.create_automation(failure_webhook_automation(block_id, name))
