"""Flows run in real Prefect (the test harness: a temporary API server and database)."""

from __future__ import annotations

import pytest

from firmware.fleet import VirtualFleet
from tasks.ingest import ensure_subscription, ingest_config
from tasks.lake import read_windows
from tinymlops.mqtt import MosquittoBroker
from tinymlops.settings import Settings


@pytest.mark.prefect
@pytest.mark.mqtt
def test_ingest_flow_writes_the_fleet_and_reports_an_artifact(
    prefect_harness: None, settings: Settings, mosquitto: MosquittoBroker
) -> None:
    from prefect.client.orchestration import get_client

    from flows.ingest import ingest_flow

    ensure_subscription(mosquitto.address, ingest_config(settings, "plant-a"))
    fleet = VirtualFleet("plant-a", 5, seed=3)
    fleet.run(mosquitto.address, windows_per_device=4)

    state = ingest_flow(
        fleet="plant-a", seconds=60, max_windows=20, broker_url=mosquitto.address.url, return_state=True
    )
    assert state.is_completed()
    stats = state.result()
    assert stats["accepted"] == 20
    assert len(read_windows(settings.lake_root, fleet="plant-a")) == 20

    async def artifact_markdown() -> str:
        async with get_client() as client:
            artifact = await client.read_latest_artifacts()
            return next(a.data for a in artifact if a.key == "ingest-plant-a")

    import asyncio

    markdown = asyncio.run(artifact_markdown())
    assert "| windows accepted | 20 |" in markdown
