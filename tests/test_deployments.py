"""prefect.yaml is the deployments' one definition: `tinymlops serve` serves what `prefect deploy` creates.

The served side is ``flows/deployments.py``; the other side is Prefect's own reading of the file
(the schedule and trigger parsing of ``prefect deploy``), so a field the serve path drops, adds or
reads differently fails here, without a server.
"""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import pytest
import yaml
from prefect.cli.deploy._schedules import _schedule_config_to_deployment_schedule
from prefect.cli.deploy._triggers import _initialize_deployment_triggers
from prefect.events import DeploymentEventTrigger

import flows.deployments as deployments
from flows.retrain import retrain_flow
from tests.fault_ledger import FaultRecord, record
from tinymlops.contracts.events import DRIFT_EVENT, RETRAIN_PARAMETERS_FROM_DRIFT, DriftPayload, payload_field
from tinymlops.errors import ConfigError


def _prefect_yaml() -> list[dict[str, Any]]:
    with open(deployments.PREFECT_YAML, encoding="utf-8") as file:
        return list(yaml.safe_load(file)["deployments"])


def test_served_deployments_are_the_ones_prefect_deploy_creates_from_prefect_yaml() -> None:
    written = {spec["name"]: spec for spec in _prefect_yaml()}
    served = {d.name: d for d in deployments.runner_deployments()}
    assert sorted(served) == sorted(written)
    for name, spec in written.items():
        deployment = served[name]
        assert deployment.entrypoint == spec["entrypoint"], name
        assert (deployment.description, deployment.tags) == (spec["description"], spec["tags"]), name
        assert deployment.parameters == spec.get("parameters", {}), name
        schedules = [_schedule_config_to_deployment_schedule(s)["schedule"] for s in spec.get("schedules", [])]
        assert [s.schedule for s in deployment.schedules or []] == schedules, name
        triggers = _initialize_deployment_triggers(name, [dict(t) for t in spec.get("triggers", [])])
        assert [t.model_dump() for t in deployment.triggers] == [t.model_dump() for t in triggers], name
        limit = spec.get("concurrency_limit")
        assert deployment.concurrency_limit == (limit["limit"] if limit else None), name
        strategy = deployment.concurrency_options.collision_strategy if deployment.concurrency_options else None
        assert strategy == (limit["collision_strategy"] if limit else None), name
    assert [d.name for d in deployments.runner_deployments({"ingest", "retrain"})] == [
        "ingest-scheduled",
        "retrain-on-drift",
    ]


def test_the_drift_trigger_fills_the_retraining_flow_from_the_drift_events_payload() -> None:
    (trigger,) = deployments.runner_deployment("retrain").triggers
    assert isinstance(trigger, DeploymentEventTrigger) and trigger.expect == {DRIFT_EVENT}
    retrain_parameters = inspect.signature(retrain_flow.fn).parameters
    fields = {name: payload_field(value) for name, value in (trigger.parameters or {}).items()}
    assert {n: f for n, f in fields.items() if f} == RETRAIN_PARAMETERS_FROM_DRIFT
    assert set(RETRAIN_PARAMETERS_FROM_DRIFT.values()) <= DriftPayload.__required_keys__
    assert set(fields) <= set(retrain_parameters)


EDITS = [  # (as written, edited, the refusal expected)
    ("- tinymlops.drift.detected", "- tinymlops.drift.found", "must expect tinymlops.drift.detected"),
    ("{{ event.payload.kind }}", "{{ event.payload.drift_kind }}", "the drift contract says"),
    ("reason: drift detected by the monitor", "cause: drift", "sets parameters cause its flow lacks"),
    ("seconds: 540", "duration: 540", "sets parameters duration its flow lacks"),
    ('cron: "*/10 * * * *"', "interval: 600", "only cron schedules"),
]


def test_a_prefect_yaml_serve_cannot_honour_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    text = deployments.PREFECT_YAML.read_text(encoding="utf-8")
    monkeypatch.setattr(deployments, "PREFECT_YAML", tmp_path / "prefect.yaml")
    refusals: list[str] = []
    for written, edited, _ in EDITS:
        assert written in text
        (tmp_path / "prefect.yaml").write_text(text.replace(written, edited), encoding="utf-8")
        deployments.deployment_specs.cache_clear()
        try:
            deployments.runner_deployments()
        except ConfigError as exc:
            refusals.append(str(exc))
        finally:
            deployments.deployment_specs.cache_clear()
    record(
        FaultRecord(
            "prefect.yaml edited so that the served deployments would differ from the deployed ones",
            notes=f"{len(refusals)} of {len(EDITS)} edits (another event, a misnamed payload field, an unknown "
            f"trigger or flow parameter, an interval schedule) refused by `tinymlops serve` with one ConfigError "
            f"line; the served deployments equal Prefect's own reading of prefect.yaml. Before: flows/deployments.py "
            f"repeated the deployments and served its schedules without the file's UTC timezone",
        )
    )
    assert len(refusals) == len(EDITS)
    for refusal, (_, _, expected) in zip(refusals, EDITS, strict=True):
        assert expected in refusal and "\n" not in refusal
