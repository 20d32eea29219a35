"""Monitor flow: a fleet's recent live vibration against the champion of each device's MCU profile.

Devices that stream raw windows are judged from the lake; devices that only publish drift
summaries are judged from the summaries the flow collects first (``tasks.summaries``). Data drift
emits ``tinymlops.drift.detected`` once per fleet (the retraining deployment's trigger); devices that
look faulty emit ``tinymlops.anomaly.alert`` (people, not retraining), one per champion's report.
"""

from __future__ import annotations

import datetime as dt
import logging
from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.events import emit_event
from prefect.runtime import flow_run

from tasks.monitor import (
    MonitorReport,
    ProfileChampion,
    alert_event,
    champions_by_profile,
    fleet_drift_event,
    fleet_verdict,
    judging_reasons,
    log_monitoring_task,
    monitor_fleet_task,
    resolve_champion_task,
)
from tasks.summaries import SummaryStore, collect_summaries_task, summary_store_path
from tinymlops.contracts.topics import FleetTopics
from tinymlops.errors import BrokerError
from tinymlops.mqtt import parse_broker_url
from tinymlops.settings import MqttSettings, get_settings

log = logging.getLogger(__name__)


@flow(name="monitor")
def monitor_flow(
    fleet: str | None = None,
    model_ref: str | None = None,
    window_minutes: float | None = None,
    until: dt.datetime | None = None,
    emit_events: bool = True,
    summary_seconds: float = 2.0,
    broker_url: str | None = None,
    fallback_target: str | None = None,
) -> dict[str, Any]:
    """Judge a fleet's last minutes of live data: ok, fault (alert) or data drift (retrain).

    Args:
        fleet: Fleet to watch (default: settings).
        model_ref: Judge every device with this model (default: the champion of each device's
            announced MCU profile; the first default target's for devices of unknown profile).
        window_minutes: How far back to look (default: settings.drift.window_minutes).
        until: End of the window (default: now).
        emit_events: Emit the drift and alert events.
        summary_seconds: Collect the devices' drift summaries and announcements from the broker
            for at most this long first (0: use the stored ones only).
        broker_url: Broker to collect from (default: settings.mqtt.url; none: no collection).
        fallback_target: The MCU profile whose champion judges devices of unknown profile or of a
            profile without a champion (default: the first default target).

    Returns:
        The fleet verdict (the worst of its reports), the alerted and faulty devices, the events
        emitted, one entry per champion under ``reports``, which champion judged each device and
        why (``judged_by``), and what the summary collection received (``summaries``).
    """
    settings = get_settings().overridden(fleet=fleet, broker_url=broker_url)
    fleet = settings.fleet
    until = until or dt.datetime.now(tz=dt.UTC)
    since = until - dt.timedelta(minutes=window_minutes or settings.drift.window_minutes)
    topics = FleetTopics(fleet, settings.mqtt.topic_root)
    store = SummaryStore(summary_store_path(settings.data_dir))
    collection = _collect(store, topics, settings.mqtt, summary_seconds)
    profiles = store.profiles(fleet)
    summaries = store.summaries(fleet, since.timestamp(), until.timestamp())
    first_target = fallback_target or settings.targets.default[0]
    if model_ref:
        chosen_by = f"model {model_ref} named for every device"
        groups = [ProfileChampion(first_target, resolve_champion_task(model_ref), None, chosen_by=chosen_by)]
    else:
        groups = champions_by_profile(profiles, first_target, resolve_champion_task)
    others = frozenset().union(*(g.devices for g in groups if g.devices is not None))
    results: list[dict[str, Any]] = []
    judged_by: dict[str, dict[str, str | None]] = {}
    judged: list[tuple[MonitorReport, str]] = []
    for group in groups:
        report = monitor_fleet_task(
            settings.lake_root, fleet, group.champion.bundle, since=since, until=until, settings=settings.drift,
            summaries=summaries, devices=group.devices, exclude=others if group.devices is None else (),
        )  # fmt: skip
        if not report.devices and (results or group is not groups[-1]):
            continue  # nothing of this profile in the window: no run to log
        results.append(_publish(report, group, emit_events))
        judged.append((report, group.champion.version.version))
        judged_by |= judging_reasons(group, report, profiles)
    drift_events = []
    if emit_events and any(report.drift_detected for report, _ in judged):
        event = emit_event(**fleet_drift_event(judged))
        drift_events = [event.event] if event is not None else []
    return {
        **(results[0] if len(results) == 1 else {}),
        "fleet": fleet,
        "verdict": fleet_verdict([report for report, _ in judged]),
        "fault_devices": sorted(d for r in results for d in r["fault_devices"]),
        "alert_devices": sorted(d for r in results for d in r["alert_devices"]),
        "model": ", ".join(r["model"] for r in results),
        "events": drift_events + [e for r in results for e in r["events"]],
        "reports": results,
        "judged_by": judged_by,
        "summaries": collection,
    }


def _collect(store: SummaryStore, topics: FleetTopics, mqtt: MqttSettings, seconds: float) -> dict[str, Any]:
    """Collect summaries into the store; a broker that cannot be reached leaves them queued there for the next run."""
    if seconds <= 0 or not mqtt.url:
        return {"skipped": "no broker configured" if seconds > 0 else "summary_seconds is 0"}
    try:
        stats = collect_summaries_task(parse_broker_url(mqtt.url), topics, store, seconds, settings=mqtt)
    except BrokerError as exc:
        log.warning("summary collection failed, judging with the stored summaries: %s", exc)
        return {"error": str(exc)}
    return stats.to_dict()


def _publish(report: MonitorReport, group: ProfileChampion, emit_events: bool) -> dict[str, Any]:
    """Artifacts, the MLflow run and the events of one report; the report as a dict."""
    champion, fleet = group.champion, report.fleet
    # the fallback champion's keep the fleet's keys; another profile's add the profile
    key = (fleet if group.devices is None else f"{fleet}-{group.profile}").lower().replace("_", "-")
    create_markdown_artifact(
        report.to_markdown(), key=f"monitor-{key}", description=f"Monitor {fleet} ({group.profile})"
    )
    create_table_artifact(
        report.device_table(),
        key=f"monitor-devices-{key}",
        description=f"Monitor {fleet} ({group.profile}): verdict {report.verdict}, one row per device",
    )
    mlflow_run_id = log_monitoring_task(report, champion, str(flow_run.id or ""))
    emitted = []
    if emit_events and report.alert_devices:
        emitted.append(emit_event(**alert_event(report, champion.version.version)))
    return {
        **report.to_dict(),
        "profile": group.profile,
        "verdict": report.verdict,
        "fault_devices": report.fault_devices,
        "model": f"{champion.version.name}/{champion.version.version}",
        "mlflow_run_id": mlflow_run_id,
        "events": [event.event for event in emitted if event is not None],
    }
