"""What a Prefect server needs before kling-pipeline's deployments run on it (`kling-pipeline setup`).

Idempotent, so it can run on every release: the process work pool the deployments name, the Kling account's
global concurrency limit (sized by KLING_MAX_CONCURRENCY) and the two recovery automations
(kling_tasks.recovery), created or brought up to date.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import timedelta

from prefect import get_client
from prefect.automations import AutomationCore
from prefect.client.orchestration import PrefectClient
from prefect.client.schemas.actions import WorkPoolCreate
from prefect.exceptions import ObjectNotFound
from prefect.settings import get_current_settings

from kling_tasks.identity import account_fingerprint
from kling_tasks.recovery import DEFAULT_SETTLE, crash_silent_runs, reschedule_crashed_video_once
from kling_tasks.settings import KlingSettings
from kling_tasks.slots import ensure_account_limit, limit_name

DEFAULT_POOL = "kling"
POOL_TYPE = "process"
# A run is silent after this many missed heartbeats (Prefect's zombie-run guide uses 3 x 30 s).
MISSED_HEARTBEATS = 3


class SetupError(RuntimeError):
    """The server holds something that cannot be used as asked (e.g. a work pool of another type)."""


@dataclass
class SetupReport:
    pool: str
    pool_created: bool
    limit: str
    slots: int
    silent_after: timedelta
    settle: timedelta
    automations: dict[str, str] = field(default_factory=dict)  # name -> "created" | "updated"

    def lines(self) -> list[str]:
        return [
            f"work pool {self.pool} ({POOL_TYPE}): {'created' if self.pool_created else 'exists'}",
            f"global concurrency limit {self.limit}: {self.slots} slot(s)",
            *(f"automation {name}: {outcome}" for name, outcome in self.automations.items()),
            f"a run with no heartbeat for {self.silent_after.total_seconds():g} s is marked Crashed",
            f"a crashed produce-video run is rescheduled once, {self.settle.total_seconds():g} s after its crash",
        ]


def default_silent_after() -> timedelta:
    """MISSED_HEARTBEATS x PREFECT_FLOWS_HEARTBEAT_FREQUENCY (as set here: set it alike on the workers)."""
    frequency = get_current_settings().flows.heartbeat_frequency or 180
    return timedelta(seconds=MISSED_HEARTBEATS * frequency)


async def ensure_process_pool(client: PrefectClient, name: str) -> bool:
    """Create the process work pool `name` with the process worker's default job template; True if created."""
    from prefect.workers.process import ProcessWorker

    try:
        existing = await client.read_work_pool(name)
    except ObjectNotFound:
        await client.create_work_pool(WorkPoolCreate(
            name=name, type=POOL_TYPE, description="kling-pipeline: produce-video and produce-batch runs",
            base_job_template=ProcessWorker.get_default_base_job_template()))
        return True
    if existing.type != POOL_TYPE:
        raise SetupError(f"work pool {name!r} exists with type {existing.type!r}; kling-pipeline's deployments "
                         f"need a {POOL_TYPE!r} pool: pass --pool with another name")
    return False


async def ensure_automation(client: PrefectClient, automation: AutomationCore) -> str:
    """Create the automation, or replace the one of the same name; 'created' or 'updated'."""
    existing = await client.read_automations_by_name(automation.name)
    if not existing:
        await client.create_automation(automation)
        return "created"
    await client.update_automation(existing[0].id, automation)
    for duplicate in existing[1:]:
        await client.delete_automation(duplicate.id)
    return "updated"


async def set_up(settings: KlingSettings, pool: str = DEFAULT_POOL, silent_after: timedelta | None = None,
                 settle: timedelta = DEFAULT_SETTLE) -> SetupReport:
    silent_after = silent_after or default_silent_after()
    account = account_fingerprint(settings)
    await ensure_account_limit(account, settings.max_concurrency)
    async with get_client() as client:
        report = SetupReport(pool=pool, pool_created=await ensure_process_pool(client, pool),
                             limit=limit_name(account), slots=settings.max_concurrency, silent_after=silent_after,
                             settle=settle)
        for automation in (crash_silent_runs(silent_after), reschedule_crashed_video_once(settle)):
            report.automations[automation.name] = await ensure_automation(client, automation)
    return report
