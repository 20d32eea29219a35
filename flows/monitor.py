"""Monitor flow: a fleet's recent live vibration against its champion's training reference.

Data drift emits ``tinymlops.drift.detected`` (the retraining deployment's trigger); devices that
look faulty emit ``tinymlops.anomaly.alert`` (people, not retraining).
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.events import emit_event
from prefect.runtime import flow_run

from tasks.monitor import (
    alert_event,
    drift_event,
    log_monitoring_task,
    monitor_fleet_task,
    resolve_champion_task,
)
from tinymlops.schemas import registered_model_name
from tinymlops.settings import get_settings


@flow(name="monitor")
def monitor_flow(
    fleet: str | None = None,
    model_ref: str | None = None,
    window_minutes: float | None = None,
    until: dt.datetime | None = None,
    emit_events: bool = True,
) -> dict[str, Any]:
    """Judge a fleet's last minutes of live data: ok, fault (alert) or data drift (retrain).

    Args:
        fleet: Fleet to watch (default: settings).
        model_ref: The model its devices run (default: champion of the first default target).
        window_minutes: How far back to look (default: settings.drift.window_minutes).
        until: End of the window (default: now).
        emit_events: Emit the drift and alert events.

    Returns:
        The report as a dict, with the events emitted.
    """
    settings = get_settings()
    fleet = fleet or settings.fleet
    model_ref = model_ref or f"{registered_model_name(settings.targets.default[0])}@champion"
    until = until or dt.datetime.now(tz=dt.UTC)
    since = until - dt.timedelta(minutes=window_minutes or settings.drift.window_minutes)
    champion = resolve_champion_task(model_ref)
    report = monitor_fleet_task(
        settings.lake_root, fleet, champion.bundle, since=since, until=until, settings=settings.drift
    )
    create_markdown_artifact(report.to_markdown(), key=f"monitor-{fleet}".lower(), description=f"Monitor {fleet}")
    create_table_artifact(
        report.device_table(),
        key=f"monitor-devices-{fleet}".lower(),
        description=f"Monitor {fleet}: verdict {report.verdict}, one row per device",
    )
    mlflow_run_id = log_monitoring_task(report, champion, str(flow_run.id or ""))
    emitted = []
    if emit_events and report.drift_detected:
        emitted.append(emit_event(**drift_event(report, champion.version.version)))
    if emit_events and report.alert_devices:
        emitted.append(emit_event(**alert_event(report, champion.version.version)))
    return {
        **report.to_dict(),
        "verdict": report.verdict,
        "fault_devices": report.fault_devices,
        "model": f"{champion.version.name}/{champion.version.version}",
        "mlflow_run_id": mlflow_run_id,
        "events": [event.event for event in emitted if event is not None],
    }
