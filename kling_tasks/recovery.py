"""Automations that recover from a dead worker (docs/deploying.md), created by `kling-pipeline setup`.

A worker (or its machine) that dies mid-job leaves its flow run `Running` with nobody to report it. Two
automations on the Prefect server close the loop; rerunning a job is free (its steps come back from the
cache, the job's ledger and the Kling-side lookup), so resuming it automatically costs nothing:

1. **silent runs are Crashed**: a `produce-video` / `produce-batch` deployment run whose heartbeats
   (`prefect.flow-run.heartbeat`, every `PREFECT_FLOWS_HEARTBEAT_FREQUENCY` seconds) stop for `silent_after`
   seconds without a terminal state is set to Crashed (Prefect's documented zombie-run automation, scoped to
   these flows). A worker whose run's process exits abnormally marks the run Crashed itself, at once.
2. **a crashed video is rescheduled once**: a run of the `produce-video` deployment that stays Crashed for
   `settle` seconds (no other state change) goes back to Scheduled, and any worker of the pool picks it up.
   "Once" is the run count: state-change events carry the run's `prefect.run-count` label, 1 for a run's
   first execution and more each time it enters Running again, so the trigger only considers events with
   `prefect.run-count: "1"`; a rescheduled run that crashes again stays Crashed for a person to look at.
   The settle time matters: a process worker can report one crash twice, seconds apart (its process
   watcher, then its submission task). Rescheduled at once, the second report lands on the new attempt
   while its process starts (a Pending run accepts Crashed), the run is rescheduled a second time and
   Prefect runs it in two processes at once (seen with Prefect 3.9.1). After the settle time the late
   report meets a Crashed run and is refused.
"""

from __future__ import annotations

from datetime import timedelta

from prefect.automations import AutomationCore
from prefect.client.schemas.objects import StateType
from prefect.events.actions import ChangeFlowRunState
from prefect.events.schemas.automations import EventTrigger, Posture

VIDEO_FLOW = "produce-video"
BATCH_FLOW = "produce-batch"
VIDEO_DEPLOYMENT = "produce-video"
RESCHEDULE_CRASHED = "kling-reschedule-crashed-video-once"
CRASH_SILENT = "kling-crash-silent-runs"
RESCHEDULED_MESSAGE = "Rescheduled once after a crash (automation kling-reschedule-crashed-video-once)"
DEFAULT_SETTLE = timedelta(seconds=30)
TERMINAL_EVENTS = {f"prefect.flow-run.{name}" for name in ("Completed", "Failed", "Cancelled", "Crashed")}


def reschedule_crashed_video_once(settle: timedelta = DEFAULT_SETTLE,
                                  deployment: str = VIDEO_DEPLOYMENT) -> AutomationCore:
    """A first run of the `produce-video` deployment Crashed for `settle` seconds goes back to Scheduled."""
    return AutomationCore(
        name=RESCHEDULE_CRASHED,
        description=(f"Reschedule a run of the {VIDEO_FLOW}/{deployment} deployment once, {settle.total_seconds():g}"
                     " s after it crashed: it resumes where it stopped and pays nothing twice. A run that crashes "
                     "again stays Crashed."),
        enabled=True,
        trigger=EventTrigger(
            after={"prefect.flow-run.Crashed"},
            expect={"prefect.flow-run.*"},  # any other state change of the run in the meantime: not ours to act
            match={"prefect.resource.id": "prefect.flow-run.*", "prefect.run-count": "1"},
            match_related=[{"prefect.resource.role": "flow", "prefect.resource.name": VIDEO_FLOW},
                           {"prefect.resource.role": "deployment", "prefect.resource.name": deployment}],
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=settle,
        ),
        actions=[ChangeFlowRunState(state=StateType.SCHEDULED, name="Scheduled", message=RESCHEDULED_MESSAGE)],
    )


def crash_silent_runs(silent_after: timedelta) -> AutomationCore:
    """A produce-video / produce-batch run that stops heartbeating for `silent_after` is set to Crashed."""
    return AutomationCore(
        name=CRASH_SILENT,
        description=(f"Mark a {VIDEO_FLOW} or {BATCH_FLOW} run Crashed when it sends no heartbeat for "
                     f"{silent_after.total_seconds():g} s: its process or machine is gone."),
        enabled=True,
        trigger=EventTrigger(
            after={"prefect.flow-run.heartbeat"},
            expect={"prefect.flow-run.heartbeat", *TERMINAL_EVENTS},
            match={"prefect.resource.id": "prefect.flow-run.*"},
            # Deployment runs only: they are the ones a worker (or `serve`) runs and Prefect can reschedule.
            match_related=[{"prefect.resource.role": "flow", "prefect.resource.name": [VIDEO_FLOW, BATCH_FLOW]},
                           {"prefect.resource.role": "deployment"}],
            for_each={"prefect.resource.id"},
            posture=Posture.Proactive,
            threshold=1,
            within=silent_after,
        ),
        actions=[ChangeFlowRunState(
            state=StateType.CRASHED,
            message=f"No heartbeat for {silent_after.total_seconds():g} s: the run's worker or machine is gone")],
    )
