"""Deploy flow: registered model -> devices of its MCU profile over MQTT, with an optional canary and rollback."""

from __future__ import annotations

import re
import time
from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.runtime import flow_run

from tasks.deploy import (
    DeployError,
    DeploymentReport,
    DeploymentSession,
    DeviceOutcome,
    deploy_wave_task,
    held_outcomes,
    judge_canary_task,
    load_signer,
    log_deployment_task,
    plan_canary,
    report_started_at,
    resolve_deployable_task,
    rollback_canaries_task,
    select_targets_task,
)
from tinymlops.contracts.topics import FleetTopics
from tinymlops.mqtt import parse_broker_url
from tinymlops.settings import get_settings


@flow(name="deploy")
def deploy_flow(
    model_ref: str = "vibration-ae-nrf52840@champion",
    fleet: str | None = None,
    devices: list[str] | None = None,
    group: str | None = None,
    canary_fraction: float = 0.0,
    watch_s: float = 30.0,
    timeout_s: float = 60.0,
    broker_url: str | None = None,
) -> dict[str, Any]:
    """Deploy a registered model to the fleet's devices of its MCU profile and report per device.

    Args:
        model_ref: ``NAME@alias`` or ``NAME/version`` in the registry.
        fleet: Fleet name (default: settings).
        devices: Only these devices.
        group: Only this group's members (one group manifest when there is no canary phase).
        canary_fraction: Deploy to this fraction first, watch, then the rest or roll back.
        watch_s: How long the canaries' anomaly rate is watched.
        timeout_s: How long each wave waits for the devices' final statuses.
        broker_url: Broker of the fleet (default: settings; one is required).

    Returns:
        The :class:`~tasks.deploy.DeploymentReport` as a dict, with the MLflow run id.
    """
    settings = get_settings().overridden(fleet=fleet, broker_url=broker_url)
    fleet = settings.fleet
    if not settings.mqtt.url:
        raise DeployError("no broker to reach the fleet: pass broker_url or set TINYMLOPS_MQTT__URL")
    address = parse_broker_url(settings.mqtt.url)
    started_at, started = report_started_at(), time.monotonic()
    model = resolve_deployable_task(model_ref)
    topics = FleetTopics(fleet, settings.mqtt.topic_root)
    signer = load_signer(settings.resolved_keys_dir)
    with DeploymentSession(address, topics, signer, mqtt_settings=settings.mqtt) as session:
        selection = select_targets_task(session, model, devices, group)
        canary, rest = plan_canary(selection.targets, canary_fraction)
        outcomes = deploy_wave_task(session, model, canary, "canary", None, timeout_s) if canary else []
        verdict = judge_canary_task(session, model, outcomes, rest, watch_s, settings.drift) if canary else None
        registry_rollback, notes = None, []
        if verdict is None or verdict.healthy:
            outcomes += deploy_wave_task(session, model, rest, "fleet", None if canary else group, timeout_s)
        else:
            rolled = rollback_canaries_task(session, model, canary, verdict.reason, timeout_s)
            outcomes += rolled.outcomes + held_outcomes(model, rest, "canary unhealthy")
            registry_rollback, notes = rolled.registry, rolled.notes
    report = DeploymentReport(
        model_ref=model_ref, model=model.name, registry_version=model.registry_version, sha256=model.sha256,
        target=model.target, fleet=fleet, broker=address.url, canary_fraction=canary_fraction, outcomes=outcomes,
        skipped=selection.skipped, canary=verdict, rolled_back=verdict is not None and not verdict.healthy,
        registry_rollback=registry_rollback, notes=notes, started_at=started_at,
        duration_s=time.monotonic() - started,
    )  # fmt: skip
    run_id = log_deployment_task(report, str(flow_run.id or "") or None)
    key = re.sub(r"[^a-z0-9-]", "-", f"deployment-{fleet}-{model.target}".lower())
    description = f"Deployment of {model.label} to fleet {fleet}: {report.outcome}"
    create_markdown_artifact(report.to_markdown(), key=key, description=description)
    create_table_artifact(device_rows(outcomes), key=f"{key}-devices", description=f"{description}; one row per device")
    return {**report.to_dict(), "mlflow_run_id": run_id}


def device_rows(outcomes: list[DeviceOutcome]) -> list[dict[str, Any]]:
    """One row per device of a deployment: what it did and how long it took (the table artifact)."""
    return [
        {
            "device": o.device,
            "profile": o.profile,
            "role": o.role,
            "model": o.model,
            "manifest": o.manifest_version,
            "state": o.state,
            "running now": o.running,
            "chunks": o.chunks,
            **{
                f"{name} ms": round(o.latency_ms[name], 1) if name in o.latency_ms else None
                for name in ("deploy", "load")
            },
            "detail": o.detail,
        }
        for o in outcomes
    ]
