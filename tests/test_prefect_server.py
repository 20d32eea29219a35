"""prefect.yaml deploys as written to a real Prefect server, and the drift event triggers retraining."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
from collections.abc import Iterator

import pytest

from tinymlops.services import LocalService, prefect_server
from tinymlops.settings import REPO_ROOT

pytestmark = [pytest.mark.prefect, pytest.mark.slow]


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalService]:
    home = tmp_path_factory.mktemp("prefect-server")
    service = prefect_server(home, home / "logs").start()
    yield service
    service.stop()


def prefect_cli(args: list[str], server: LocalService) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "PREFECT_API_URL": f"{server.url}/api",
        "PWD": str(REPO_ROOT),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    }
    return subprocess.run(
        [sys.executable, "-m", "prefect", *args], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=300
    )


def test_prefect_yaml_deploys_every_deployment_and_the_trigger_runs_retraining(server: LocalService) -> None:
    assert prefect_cli(["work-pool", "create", "tinymlops", "--type", "process"], server).returncode == 0
    deployed = prefect_cli(["--no-prompt", "deploy", "--all"], server)
    assert deployed.returncode == 0, deployed.stdout[-3000:] + deployed.stderr[-3000:]

    from prefect.settings import PREFECT_API_URL, temporary_settings

    # Prefect may already be imported and configured by earlier tests: settings, not the environment.
    with temporary_settings(updates={PREFECT_API_URL: f"{server.url}/api"}):
        from prefect.client.orchestration import get_client

        async def deployments() -> dict[str, object]:
            async with get_client() as client:
                return {d.name: d for d in await client.read_deployments()}

        found = asyncio.run(deployments())
        assert set(found) >= {
            "ingest-scheduled",
            "monitor-scheduled",
            "retrain-on-drift",
            "train-manual",
            "deploy-manual",
            "full-loop-manual",
        }
        ingest = found["ingest-scheduled"]
        assert [s.schedule.cron for s in ingest.schedules] == ["*/10 * * * *"]
        retrain = found["retrain-on-drift"]
        assert retrain.global_concurrency_limit is not None and retrain.global_concurrency_limit.limit == 1
        assert retrain.concurrency_options.collision_strategy == "CANCEL_NEW"
        assert retrain.entrypoint == "flows/retrain.py:retrain_flow"
        # what the UI shows: each described and tagged by its step and how it runs; the trigger named and described
        assert all(d.description for d in found.values())
        assert set(ingest.tags) == {"tinymlops", "ingest", "scheduled"}
        assert set(retrain.tags) == {"tinymlops", "retrain", "event-triggered"}

        async def drift_automation() -> list[object]:
            async with get_client() as client:
                return list(await client.read_automations_by_name("retrain-on-drift"))

        (automation,) = asyncio.run(drift_automation())
        assert "retrain that fleet on its drifted devices" in automation.description  # type: ignore[attr-defined]

        time.sleep(2)  # the automation is loaded by the server's triggers service
        # From its own process, as the monitor flow does: Prefect's events worker is a per-process
        # singleton, already bound to another API in a test session.
        emitter = (
            "from prefect.events import emit_event\n"
            "emit_event(event='tinymlops.drift.detected', resource={'prefect.resource.id': 'tinymlops.fleet.plant-7'},"
            " payload={'fleet': 'plant-7', 'devices': ['nrf-0001', 'nrf-0004'],"
            " 'since': '2026-11-23T06:00:00+00:00', 'champion_version': '3',"
            " 'model_name': 'vibration-ae-nrf52840', 'kind': 'new operating point'})\n"
        )
        emitted = subprocess.run(
            [sys.executable, "-c", emitter],
            env={**os.environ, "PREFECT_API_URL": f"{server.url}/api"},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert emitted.returncode == 0, emitted.stderr[-2000:]

        async def triggered_runs() -> list[object]:
            async with get_client() as client:
                from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterId

                return await client.read_flow_runs(
                    deployment_filter=DeploymentFilter(id=DeploymentFilterId(any_=[retrain.id]))
                )

        deadline = time.monotonic() + 60
        runs: list[object] = []
        while time.monotonic() < deadline and not runs:
            time.sleep(1)
            runs = asyncio.run(triggered_runs())
        assert len(runs) == 1, "the drift event did not create a retraining run"
        parameters = runs[0].parameters  # type: ignore[attr-defined]
        assert parameters["fleet"] == "plant-7"
        assert parameters["devices"] == ["nrf-0001", "nrf-0004"]
        assert parameters["champion_version"] == "3"
        assert parameters["model_name"] == "vibration-ae-nrf52840"  # the champion whose windows it keeps
        assert parameters["drift_kind"] == "new operating point"
