"""The whole Tiny-MLOps loop once, in order: ingest -> train -> register -> deploy -> monitor."""

from __future__ import annotations

from typing import Any

from prefect import flow

from flows.deploy import deploy_flow
from flows.ingest import ingest_flow
from flows.monitor import monitor_flow
from flows.train import train_flow
from tinymlops.schemas import registered_model_name
from tinymlops.settings import get_settings


@flow(name="full-loop")
def loop_flow(
    fleet: str | None = None,
    ingest_seconds: float = 60.0,
    monitor_seconds: float = 30.0,
    targets: list[str] | None = None,
    config_path: str | None = None,
    canary_fraction: float = 0.0,
    broker_url: str | None = None,
) -> dict[str, Any]:
    """Ingest a fleet, train and register its models, deploy each target's champion, then monitor.

    Args:
        fleet: Fleet (default: settings).
        ingest_seconds: How long to ingest before training.
        monitor_seconds: How long to ingest after deploying, for the monitor to judge.
        targets: MCU targets (default: settings).
        config_path: Training configuration (default: the ``training_config`` setting, ``data/training.yaml``).
        canary_fraction: Canary share of each deployment.
        broker_url: Broker of the fleet (default: settings).
    """
    settings = get_settings().overridden(fleet=fleet, targets=targets)
    fleet, targets = settings.fleet, settings.targets.default
    ingested = ingest_flow(fleet=fleet, seconds=ingest_seconds, idle_timeout_s=5.0, broker_url=broker_url)
    trained = train_flow(fleet=fleet, targets=targets, config_path=config_path)
    deployments = [
        deploy_flow(
            f"{registered_model_name(target)}@champion",
            fleet=fleet,
            canary_fraction=canary_fraction,
            broker_url=broker_url,
        )
        for target in targets
        if trained["budget_passed"].get(target)
    ]
    watched = ingest_flow(fleet=fleet, seconds=monitor_seconds, idle_timeout_s=5.0, broker_url=broker_url)
    monitored = monitor_flow(
        fleet=fleet, window_minutes=monitor_seconds / 60.0, broker_url=broker_url, fallback_target=targets[0]
    )
    return {
        "fleet": fleet,
        "ingest": ingested,
        "train": trained,
        "deployments": deployments,
        "monitor_ingest": watched,
        "monitor": monitored,
    }
