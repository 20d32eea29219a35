"""Retrain and redeploy: the flow a ``tinymlops.drift.detected`` event triggers.

Guard rails: one retraining per fleet per cooldown (claimed atomically), a deployment concurrency
limit of one (``prefect.yaml``), training on the recent drifted-but-normal windows of the devices
the monitor judged healthy, and the usual gates and promotion rule before anything is deployed.

The retraining accumulates: besides the new windows it trains on the windows its champion trained
on, per operating point, balanced and capped (``tasks.datasets.Accumulation``), so a fleet that
returns to a speed it ran at before needs nothing.
"""

from __future__ import annotations

import datetime as dt
from typing import Any

from prefect import flow

from flows.deploy import deploy_flow
from flows.train import train_flow
from tasks.datasets import champion_accumulation_task
from tasks.guards import claim_retraining_task
from tasks.train import load_training_config
from tinymlops.schemas import registered_model_name
from tinymlops.settings import get_settings


@flow(name="retrain-and-redeploy", persist_result=True)
def retrain_flow(
    fleet: str,
    devices: list[str] | None = None,
    since: dt.datetime | None = None,
    champion_version: str | None = None,
    reason: str = "drift detected",
    targets: list[str] | None = None,
    canary_fraction: float = 0.0,
    broker_url: str | None = None,
    config_path: str | None = None,
    model_name: str | None = None,
    drift_kind: str | None = None,
) -> dict[str, Any]:
    """Retrain a fleet's models on its recent normal data and its champion's, then deploy every new champion.

    Args:
        fleet: The drifting fleet.
        devices: Devices whose recent windows to train on (the monitor's healthy ones; None: all).
        since: Start of the drifted data (default: the drift settings' monitoring window).
        champion_version: The champion the drift was measured against (recorded).
        reason: Why (recorded in the report).
        targets: MCU targets (default: settings).
        canary_fraction: Canary share of each deployment.
        broker_url: Broker of the fleet (default: settings).
        config_path: Training configuration (default: the ``training_config`` setting,
            ``data/training.yaml``); checked before the fleet's retraining slot is claimed, so a bad
            path does not start a cooldown.
        model_name: Registered model the drift was measured against (with ``champion_version``,
            the champion whose training windows are kept; default: the first target's champion).
        drift_kind: What drifted (``new operating point`` or ``data drift``; recorded).
    """
    settings = get_settings().overridden(targets=targets, training_config=config_path)
    load_training_config(settings.training_config)
    claim = claim_retraining_task(settings.data_dir / "state", fleet, settings.drift.cooldown_minutes)
    if not claim.granted:
        return {"fleet": fleet, "retrained": False, "reason": claim.reason}
    since = since or dt.datetime.now(tz=dt.UTC) - dt.timedelta(minutes=settings.drift.window_minutes)
    default_model = registered_model_name(settings.targets.default[0])
    model_ref = f"{model_name}/{champion_version}" if model_name and champion_version else f"{default_model}@champion"
    accumulate = champion_accumulation_task(model_ref, settings.drift.retrain_max_windows)
    outcome = train_flow(
        fleet=fleet, targets=targets, devices=devices, start=since, config_path=config_path, accumulate=accumulate
    )
    deployments = [
        deploy_flow(f"{entry['model']}@champion", fleet=fleet, canary_fraction=canary_fraction, broker_url=broker_url)
        for entry in outcome["registered"]
        if entry["promoted"]
    ]
    return {
        "fleet": fleet,
        "retrained": True,
        "reason": reason,
        "drift_kind": drift_kind,
        "champion_before": champion_version,
        "accumulated_from": accumulate.to_dict() if accumulate else None,
        "train": {
            k: outcome[k]
            for k in ("run", "mlflow_run_id", "registered", "evaluation", "counts", "selection", "operating_points")
        },
        "deployments": deployments,
    }
