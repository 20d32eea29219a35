"""The deployments ``tinymlops serve`` runs in one process, read from ``prefect.yaml``.

``prefect.yaml`` is their one definition: ``prefect deploy`` creates them for a work pool and
workers, and this module builds the same deployments from it to serve without one (entrypoints,
parameters, cron schedules, triggers, descriptions, tags, concurrency), so the two cannot disagree.
The drift trigger is checked against the drift event's contract (``tinymlops.contracts.events``)
when it is read: a trigger expecting another event, or filling a parameter from a payload field the
monitor does not send, is refused.
"""

from __future__ import annotations

import importlib
import inspect
from functools import cache
from pathlib import Path
from typing import Any, cast

import yaml
from prefect import Flow, serve
from prefect.client.schemas.objects import ConcurrencyLimitConfig
from prefect.client.schemas.schedules import CronSchedule
from prefect.deployments.runner import RunnerDeployment
from prefect.events import DeploymentTriggerTypes
from pydantic import TypeAdapter

from tinymlops.contracts.events import (
    DRIFT_EVENT,
    FLEET_RESOURCE_MATCH,
    RETRAIN_PARAMETERS_FROM_DRIFT,
    DriftPayload,
    payload_field,
)
from tinymlops.errors import ConfigError
from tinymlops.settings import REPO_ROOT

PREFECT_YAML = REPO_ROOT / "prefect.yaml"
# The step tag (the second of each deployment's tags) is the name `tinymlops serve --only` takes.
NAMES = ("ingest", "monitor", "retrain", "train", "deploy", "full-loop")
_TRIGGERS: TypeAdapter[DeploymentTriggerTypes] = TypeAdapter(DeploymentTriggerTypes)


@cache
def deployment_specs() -> dict[str, dict[str, Any]]:
    """``prefect.yaml``'s deployments by step name (anchors resolved), as ``prefect deploy`` reads them.

    Raises:
        ConfigError: The steps are not the ones :data:`NAMES` lists, or a trigger breaks the drift contract.
    """
    with open(PREFECT_YAML, encoding="utf-8") as file:
        specs = {spec["tags"][1]: spec for spec in yaml.safe_load(file)["deployments"]}
    if tuple(specs) != NAMES:
        raise ConfigError(f"{PREFECT_YAML.name}: deployment steps {', '.join(specs)}, expected {', '.join(NAMES)}")
    for spec in specs.values():
        for trigger in spec.get("triggers", []):
            _check_drift_trigger(spec["name"], trigger)
    return specs


def _check_drift_trigger(deployment: str, trigger: dict[str, Any]) -> None:
    """Refuse a trigger that expects another event than the drift event or misreads its payload."""
    where = f"{PREFECT_YAML.name}: trigger {trigger.get('name')!r} of {deployment}"
    if trigger.get("expect") != [DRIFT_EVENT] or trigger.get("match") != {"prefect.resource.id": FLEET_RESOURCE_MATCH}:
        raise ConfigError(f"{where} must expect {DRIFT_EVENT} of resources {FLEET_RESOURCE_MATCH}")
    filled = {name: payload_field(value) for name, value in trigger.get("parameters", {}).items()}
    from_payload = {name: field for name, field in filled.items() if field is not None}
    if from_payload != RETRAIN_PARAMETERS_FROM_DRIFT:
        raise ConfigError(
            f"{where} fills {from_payload} from the payload; the drift contract says {RETRAIN_PARAMETERS_FROM_DRIFT}"
        )
    unknown = sorted(set(from_payload.values()) - DriftPayload.__required_keys__)
    if unknown:
        raise ConfigError(f"{where} reads payload fields {', '.join(unknown)} the drift event does not carry")


def load_flow(entrypoint: str) -> Flow[..., Any]:
    """The flow object of a ``prefect.yaml`` entrypoint (``flows/retrain.py:retrain_flow``).

    Raises:
        ConfigError: The entrypoint names no flow of the repository.
    """
    path, _, attribute = entrypoint.partition(":")
    module = importlib.import_module(".".join(Path(path).with_suffix("").parts))
    flow = getattr(module, attribute, None)
    if not isinstance(flow, Flow):
        raise ConfigError(f"{PREFECT_YAML.name}: entrypoint {entrypoint} is not a flow")
    return flow


def _concurrency(spec: dict[str, Any]) -> int | ConcurrencyLimitConfig | None:
    limit = spec.get("concurrency_limit")
    return ConcurrencyLimitConfig(**limit) if isinstance(limit, dict) else limit


def _schedule(spec: dict[str, Any]) -> CronSchedule:
    if set(spec) - {"cron", "timezone"}:
        raise ConfigError(f"{PREFECT_YAML.name}: only cron schedules (cron, timezone) are served, got {spec}")
    return CronSchedule(**spec)


def runner_deployment(name: str) -> RunnerDeployment:
    """One deployment of ``prefect.yaml``, by step name, as ``prefect deploy`` would create it (no work pool)."""
    spec = deployment_specs()[name]
    flow = load_flow(spec["entrypoint"])
    parameters = dict(spec.get("parameters") or {})
    set_by_triggers = {p for trigger in spec.get("triggers", []) for p in trigger.get("parameters", {})}
    unknown = sorted((set(parameters) | set_by_triggers) - set(inspect.signature(flow.fn).parameters))
    if unknown:
        raise ConfigError(f"{PREFECT_YAML.name}: {spec['name']} sets parameters {', '.join(unknown)} its flow lacks")
    deployment = flow.to_deployment(
        name=spec["name"],
        description=spec["description"],
        tags=list(spec["tags"]),
        parameters=parameters,
        schedules=[_schedule(s) for s in spec.get("schedules", [])],
        triggers=[_TRIGGERS.validate_python(dict(t)) for t in spec.get("triggers", [])],
        concurrency_limit=_concurrency(spec),
    )
    return cast(RunnerDeployment, deployment)  # outside an event loop it is the deployment, not a coroutine


def runner_deployments(only: set[str] | None = None) -> list[RunnerDeployment]:
    """The deployments to serve (all, or those whose step is named in ``only``)."""
    return [runner_deployment(name) for name in deployment_specs() if only is None or name in only]


def serve_deployments(only: set[str] | None = None) -> None:
    """Serve the deployments until interrupted (needs a Prefect server: PREFECT_API_URL)."""
    serve(*runner_deployments(only))
