"""Ingest flow: a fleet's vibration from MQTT into the Parquet lake."""

from __future__ import annotations

from prefect import flow

from tasks.ingest import compact_lake_partitions, ingest_config, ingest_vibration
from tinymlops.mqtt import broker_for
from tinymlops.settings import get_settings


@flow(name="ingest")
def ingest_flow(
    fleet: str | None = None,
    seconds: float | None = 60.0,
    max_windows: int | None = None,
    idle_timeout_s: float | None = None,
    broker_url: str | None = None,
) -> dict[str, object]:
    """Ingest a fleet's windows for a bounded time (scheduled runs) or until stopped, then compact closed hours.

    Args:
        fleet: Fleet to ingest (default: settings).
        seconds: Stop after this long; None runs until another bound or forever.
        max_windows: Stop after this many accepted windows.
        idle_timeout_s: Stop when the fleet has been silent this long.
        broker_url: Broker to use; default from settings, else an embedded broker is started.
    """
    settings = get_settings().overridden(fleet=fleet, broker_url=broker_url)
    with broker_for(settings.mqtt) as address:
        config = ingest_config(settings, settings.fleet)
        stats = ingest_vibration(config, address.url, seconds, max_windows, idle_timeout_s)
    compaction = compact_lake_partitions(settings.lake_root, settings.fleet, settings.lake.compact_after_minutes)
    return {**stats.to_dict(), "compaction": compaction.to_dict()}
