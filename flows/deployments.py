"""The deployments ``tinymlops serve`` runs in one process: schedules, the drift trigger, concurrency.

They mirror ``prefect.yaml`` (which creates the same deployments for a work pool and workers) and take
their descriptions, tags and the drift trigger's name and description from it, so the UI describes both
alike; serving needs only a Prefect server.
"""

from __future__ import annotations

from functools import cache
from typing import Any

import yaml
from prefect import serve
from prefect.client.schemas.objects import ConcurrencyLimitConfig, ConcurrencyLimitStrategy
from prefect.events import DeploymentEventTrigger

from flows.deploy import deploy_flow
from flows.ingest import ingest_flow
from flows.loop import loop_flow
from flows.monitor import monitor_flow
from flows.retrain import retrain_flow
from flows.train import train_flow
from tasks.monitor import DRIFT_EVENT
from tinymlops.settings import REPO_ROOT

PREFECT_YAML = REPO_ROOT / "prefect.yaml"

# Single-expression templates keep their JSON type (lists stay lists) when Prefect fills them in.
DRIFT_TRIGGER_PARAMETERS = {
    "fleet": "{{ event.payload.fleet }}",
    "devices": "{{ event.payload.devices }}",
    "since": "{{ event.payload.since }}",
    "champion_version": "{{ event.payload.champion_version }}",
    "model_name": "{{ event.payload.model_name }}",
    "drift_kind": "{{ event.payload.kind }}",
    "reason": "drift detected by the monitor",
}
SCHEDULE_EVERY_10_MIN = "*/10 * * * *"
NAMES = ("ingest", "monitor", "retrain", "train", "deploy", "full-loop")


@cache
def deployment_texts() -> dict[str, dict[str, Any]]:
    """``prefect.yaml``'s deployments by name: what the UI shows of them (description, tags, triggers)."""
    with open(PREFECT_YAML, encoding="utf-8") as file:
        return {d["name"]: d for d in yaml.safe_load(file)["deployments"]}


def _described(name: str) -> dict[str, Any]:
    text = deployment_texts()[name]
    return {"name": name, "description": text["description"], "tags": list(text["tags"])}


def drift_trigger() -> DeploymentEventTrigger:
    """Run the retraining deployment for any fleet whose monitor emits a drift event."""
    (trigger,) = deployment_texts()["retrain-on-drift"]["triggers"]
    return DeploymentEventTrigger(
        name=trigger["name"],
        description=trigger["description"],
        expect={DRIFT_EVENT},
        match={"prefect.resource.id": "tinymlops.fleet.*"},
        parameters=DRIFT_TRIGGER_PARAMETERS,
    )


def runner_deployments(only: set[str] | None = None) -> list[Any]:
    """The deployments to serve (all, or those named in ``only``)."""
    one_at_a_time = ConcurrencyLimitConfig(limit=1, collision_strategy=ConcurrencyLimitStrategy.CANCEL_NEW)
    factories = {
        "ingest": lambda: ingest_flow.to_deployment(
            **_described("ingest-scheduled"),
            cron=SCHEDULE_EVERY_10_MIN,
            parameters={"seconds": 540.0},
            concurrency_limit=one_at_a_time,
        ),
        "monitor": lambda: monitor_flow.to_deployment(**_described("monitor-scheduled"), cron=SCHEDULE_EVERY_10_MIN),
        "retrain": lambda: retrain_flow.to_deployment(
            **_described("retrain-on-drift"), triggers=[drift_trigger()], concurrency_limit=one_at_a_time
        ),
        "train": lambda: train_flow.to_deployment(**_described("train-manual")),
        "deploy": lambda: deploy_flow.to_deployment(**_described("deploy-manual")),
        "full-loop": lambda: loop_flow.to_deployment(**_described("full-loop-manual")),
    }
    return [factory() for name, factory in factories.items() if only is None or name in only]


def serve_deployments(only: set[str] | None = None) -> None:
    """Serve the deployments until interrupted (needs a Prefect server: PREFECT_API_URL)."""
    serve(*runner_deployments(only))
