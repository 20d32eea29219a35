"""``tinymlops bench loop``: drift onset -> drift event -> retrained model active on every device.

Runs the same flows and services as the demo on embedded defaults (Mosquitto, a local Prefect
server serving the drift-triggered retraining deployment, MLflow on SQLite), with one MCU profile.
"""

from __future__ import annotations

import datetime as dt
import tempfile
import time
from contextlib import ExitStack
from pathlib import Path
from typing import Any

from tinymlops.contracts.events import DRIFT_EVENT
from tinymlops.demo import (
    QUICK_TRAINING_CONFIG,
    DemoConfig,
    DemoError,
    environment,
    ingest_and_monitor,
    serve_retraining,
    start_devices,
    stop_process,
)
from tinymlops.settings import Settings, get_settings

MAX_MONITOR_ROUNDS = 4


def bench_loop(settings: Settings, *, quick: bool) -> dict[str, Any]:
    """Measure the closed loop's two delays on a simulated fleet.

    Args:
        settings: Base settings (the broker choice; everything else runs in a temporary directory).
        quick: 20 devices and the quick training configuration instead of 100 and the committed one.

    Returns:
        ``drift_onset_to_event_s``, ``drift_event_to_active_s`` and the run's size.
    """
    from firmware.sensor import DriftSpec
    from tinymlops.mqtt import broker_for
    from tinymlops.services import prefect_server

    devices = 20 if quick else 100
    profile = "nrf52840"
    config = DemoConfig(devices_per_profile=devices, profiles=(profile,), ingest_s=30.0, monitor_s=25.0, quick=quick)
    with tempfile.TemporaryDirectory(prefix="tinymlops-bench-loop-") as tmp, ExitStack() as stack:
        root = Path(tmp)
        address = stack.enter_context(broker_for(settings.mqtt.model_copy(update={"embedded_broker": "mosquitto"})))
        prefect = prefect_server(root / "prefect", root / "logs").start()
        stack.callback(prefect.stop)
        stack.enter_context(
            environment(
                {
                    "TINYMLOPS_DATA_DIR": str(root / "data"),
                    "TINYMLOPS_MQTT__URL": address.url,
                    "TINYMLOPS_TARGETS__DEFAULT": f'["{profile}"]',
                    "TINYMLOPS_DRIFT__WINDOW_MINUTES": str(config.monitor_s / 60.0),
                    "PREFECT_API_URL": f"{prefect.url}/api",
                    "PREFECT_HOME": str(root / "prefect"),
                    # the served retraining trains with the same configuration as the first model
                    **({"TINYMLOPS_TRAINING_CONFIG": str(QUICK_TRAINING_CONFIG)} if quick else {}),
                }
            )
        )
        run_settings = get_settings()
        # Only now, with PREFECT_API_URL pointing at this server: Prefect binds its settings on first import.
        from flows.loop import loop_flow

        (root / "logs").mkdir(exist_ok=True)
        # 100 devices scoring twice a second: enough windows per monitor round on 2 cores.
        fleets = start_devices(run_settings, config, address, stack, score_interval_s=0.5)
        fleet = fleets[profile]
        from tasks.datasets import write_reference_set

        write_reference_set(run_settings.lake_root, run_settings.fleet)
        server = serve_retraining(root)
        stack.callback(stop_process, server)
        loop_flow(
            fleet=run_settings.fleet,
            ingest_seconds=config.ingest_s,
            monitor_seconds=config.monitor_s,
            targets=[profile],
        )
        before = {d: s.active.version for d, s in fleet.statuses().items() if s is not None and s.active}
        if len(before) != devices:
            raise DemoError(f"only {len(before)} of {devices} devices run the first model")

        onset = time.monotonic()
        fleet.sensors.add_drift(DriftSpec(kind="gain", amount=0.3))
        event_at = None
        for _ in range(MAX_MONITOR_ROUNDS):
            report = ingest_and_monitor(run_settings, config)
            if DRIFT_EVENT in report["events"]:
                event_at = time.monotonic()
                break
        if event_at is None:
            raise DemoError(f"no drift event within {MAX_MONITOR_ROUNDS} monitor rounds of the drift onset")
        deadline = event_at + 600
        while time.monotonic() < deadline:
            statuses = fleet.statuses()
            updated = [d for d, s in statuses.items() if s and s.active and s.active.version > before.get(d, 0)]
            if len(updated) == devices:
                active_at = time.monotonic()
                break
            time.sleep(0.5)
        else:
            raise DemoError(f"the retrained model reached {len(updated)} of {devices} devices in 600 s")
    return {
        "drift_onset_to_event_s": round(event_at - onset, 1),
        "drift_event_to_active_s": round(active_at - event_at, 1),
        "loop_devices": devices,
        "loop_monitor_window_s": config.monitor_s,
        "loop_measured_at": dt.datetime.now(tz=dt.UTC).isoformat(timespec="seconds"),
    }
