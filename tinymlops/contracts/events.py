"""The Prefect events the monitor emits: their names, resources and payload shapes, defined once.

The monitor builds its events from these types; the retraining deployment's trigger in
``prefect.yaml`` expects :data:`DRIFT_EVENT`, matches :data:`FLEET_RESOURCE_MATCH` and fills the
retraining flow's parameters from the payload fields named in :data:`RETRAIN_PARAMETERS_FROM_DRIFT`
(``flows/deployments.py`` refuses a trigger that names anything else).
"""

from __future__ import annotations

import re
from typing import Any, Literal, TypedDict

DRIFT_EVENT = "tinymlops.drift.detected"
"""A fleet's data drifted: the retraining deployment's trigger."""
ALERT_EVENT = "tinymlops.anomaly.alert"
"""Devices look faulty: for people, never a retraining."""

FLEET_RESOURCE_PREFIX = "tinymlops.fleet."
FLEET_RESOURCE_MATCH = FLEET_RESOURCE_PREFIX + "*"
"""The ``prefect.resource.id`` pattern a trigger matches to act on any fleet's events."""

DriftKind = Literal["new operating point", "data drift"]


def fleet_resource_id(fleet: str) -> str:
    """Prefect resource id of a fleet, the ``match`` of the retraining and alert triggers."""
    return FLEET_RESOURCE_PREFIX + fleet


def model_resource_id(model_name: str, version: str | None) -> str:
    """Prefect resource id of a registered model (of one version when given), a related resource."""
    return f"tinymlops.model.{model_name}" + (f".{version}" if version else "")


def device_resource_id(fleet: str, device: str) -> str:
    """Prefect resource id of one device of a fleet, a related resource of an alert."""
    return f"tinymlops.device.{fleet}.{device}"


class MonitorPayload(TypedDict):
    """Fields both events carry: which fleet, when, judged by which champion, and why."""

    fleet: str
    verdict: str
    since: str  # ISO 8601, with its UTC offset
    until: str
    model_name: str
    model_sha256: str
    champion_version: str | None
    reasons: list[str]


class DriftPayload(MonitorPayload):
    """The payload of :data:`DRIFT_EVENT`.

    ``devices`` are the judged devices a retraining may learn from (alerted ones left out, named in
    ``exclude_devices``); ``new_operating_point_devices`` run where the champion was not trained.
    """

    kind: DriftKind | None  # set whenever the monitor emits the event
    devices: list[str]
    drift_devices: list[str]
    new_operating_point_devices: list[str]
    exclude_devices: list[str]
    metrics: dict[str, float]
    pooled_drifted_features: list[str]


class AlertPayload(MonitorPayload):
    """The payload of :data:`ALERT_EVENT`: the abnormal devices and what was found on each."""

    devices: list[str]
    device_details: dict[str, dict[str, Any]]
    metrics: dict[str, float]


RETRAIN_PARAMETERS_FROM_DRIFT: dict[str, str] = {
    "fleet": "fleet",
    "devices": "devices",
    "since": "since",
    "champion_version": "champion_version",
    "model_name": "model_name",
    "drift_kind": "kind",
}
"""The retraining flow's parameters the drift trigger fills, each from its :class:`DriftPayload` field."""

_PAYLOAD_TEMPLATE = re.compile(r"^\{\{ *event\.payload\.([A-Za-z_][A-Za-z0-9_]*) *\}\}$")


def payload_field(template: Any) -> str | None:
    """The payload field a trigger parameter's template names (``{{ event.payload.kind }}``: ``kind``), or None.

    Only single-expression templates are recognised: Prefect fills those with the field's JSON value
    (a list stays a list).
    """
    match = _PAYLOAD_TEMPLATE.match(template) if isinstance(template, str) else None
    return match.group(1) if match else None
