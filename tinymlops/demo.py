"""``tinymlops demo``: the whole Tiny-MLOps loop on embedded defaults, from the same flows the deployments use.

Phases: services (MQTT broker, Prefect server, MLflow UI) -> a virtual fleet of devices on two MCU
profiles, streaming vibration -> the full-loop flow (ingest, train, register, deploy, monitor) ->
a bearing fault on one machine (the monitor raises an alert, no retraining) -> a sensor-gain drift on
every machine (the monitor emits a drift event; the served retraining deployment retrains,
registers, promotes and redeploys by itself) -> monitoring again -> a summary of what happened.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from rich.console import Console

from tinymlops.errors import TinyMLOpsError
from tinymlops.settings import REPO_ROOT, Settings, get_settings, reset_settings

log = logging.getLogger(__name__)

FAULT_DEVICE_INDEX = 2
DRIFT_GAIN = 0.3
RETRAIN_DEPLOYMENT = "retrain-and-redeploy/retrain-on-drift"
QUICK_TRAINING_CONFIG = REPO_ROOT / "data" / "training_quick.yaml"
# A loaded 2-core machine took over 90 s for `mlflow ui` to answer while the demo ran beside it.
MLFLOW_UI_DEADLINE_S = 900.0


class DemoError(TinyMLOpsError):
    """A demo phase did not produce what it should have."""


@dataclass(frozen=True)
class DemoConfig:
    """Size and pace of the demo.

    Attributes:
        devices_per_profile: Simulated devices of each MCU profile.
        profiles: MCU profiles of the fleet (catalog names).
        ingest_s: Seconds of normal vibration ingested before training.
        monitor_s: Seconds ingested before each monitor run.
        retrain_timeout_s: How long to wait for the event-triggered retraining.
        quick: Short training (CI), for the first model and the drift-triggered retraining alike.
        keep_running: Leave the services up at the end.
        real_data: Devices replay the real CWRU recordings (normal; a fault replays that fault's
            recording) and the fleet is evaluated on the imported CWRU fault files, instead of the
            physics simulator and its seeded-fault reference set.
    """

    devices_per_profile: int = 10
    profiles: tuple[str, ...] = ("nrf52840", "stm32l4r5")
    ingest_s: float = 40.0
    monitor_s: float = 25.0
    retrain_timeout_s: float = 300.0
    quick: bool = False
    keep_running: bool = False
    real_data: bool = False


@dataclass
class DemoSummary:
    """What the demo did, as the summary tables show it."""

    urls: dict[str, str] = field(default_factory=dict)
    models: list[dict[str, Any]] = field(default_factory=list)
    devices: list[dict[str, Any]] = field(default_factory=list)
    alerts: list[dict[str, Any]] = field(default_factory=list)
    drift: list[dict[str, Any]] = field(default_factory=list)
    retrainings: list[dict[str, Any]] = field(default_factory=list)
    data_dir: str = ""
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """Plain dict (``--json``)."""
        return dict(self.__dict__)


@contextmanager
def environment(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables for the block (settings and Prefect read them lazily)."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    reset_settings()
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        reset_settings()


def _phase(console: Console, text: str) -> None:
    console.rule(f"[bold]{text}")


def run_demo(config: DemoConfig, console: Console, report: Callable[[DemoSummary], None] | None = None) -> DemoSummary:
    """Run the demo; services are stopped at the end unless ``config.keep_running``.

    ``report`` gets the summary once the loop is done, before ``--keep-running`` waits for Ctrl-C.
    """
    from tinymlops.mqtt import announced, broker_for
    from tinymlops.services import mlflow_ui, prefect_server

    started = time.monotonic()
    base = get_settings()
    demo_dir = (base.data_dir / "demo").resolve()
    shutil.rmtree(demo_dir, ignore_errors=True)
    demo_dir.mkdir(parents=True)
    summary = DemoSummary(data_dir=str(demo_dir))
    stack = ExitStack()
    try:
        _phase(console, "1. Services")
        address = stack.enter_context(broker_for(base.mqtt))
        stack.enter_context(announced(address, base.data_dir))  # `tinymlops simulate` elsewhere publishes to it
        prefect = prefect_server(demo_dir / "prefect", demo_dir / "logs")
        env = {
            "TINYMLOPS_DATA_DIR": str(demo_dir),
            "TINYMLOPS_MQTT__URL": address.url,
            "TINYMLOPS_TARGETS__DEFAULT": f'["{config.profiles[0]}", "{config.profiles[1]}"]',
            "TINYMLOPS_DRIFT__WINDOW_MINUTES": str(config.monitor_s / 60.0),
            "PREFECT_API_URL": f"{prefect.url}/api",
            "PREFECT_HOME": str(demo_dir / "prefect"),
            # the served retraining trains with it too: its data are as small as the loop's (data/training_quick.yaml)
            **({"TINYMLOPS_TRAINING_CONFIG": str(QUICK_TRAINING_CONFIG)} if config.quick else {}),
        }
        stack.enter_context(environment(env))
        settings = get_settings()
        # The MLflow UI first, awaited in the background: on a loaded machine it takes minutes to answer.
        ui = mlflow_ui(settings.mlflow_tracking_uri, settings.mlflow_artifact_root, demo_dir / "logs").launch()
        stack.callback(ui.stop)
        threading.Thread(target=_await_quietly, args=(ui, MLFLOW_UI_DEADLINE_S), daemon=True).start()
        prefect.start()
        stack.callback(prefect.stop)
        summary.urls = {"MQTT broker": address.url, "Prefect UI": prefect.url}
        for name, url in summary.urls.items():
            console.print(f"  {name}: [bold]{url}[/]")
        console.print(f"  MLflow UI: starting (its URL is logged and summarised once it answers; log {ui.log_file})")

        _phase(
            console, f"2. Virtual fleet: {config.devices_per_profile} devices on each of {', '.join(config.profiles)}"
        )
        fleets = start_devices(settings, config, address, stack)
        from tasks.ota_service import start_ota_service

        # A device back after a deployment ended (or restarted) still gets the model: the OTA service serves it.
        stack.callback(start_ota_service(settings, address).stop)
        emulated = start_emulated_device(settings, config, address, stack)
        if emulated is not None:
            device = emulated.devices[0]
            console.print(
                f"  + {device.device_id}: the device firmware on QEMU {device.board.name} ({device.profile.name})"
            )
        add_evaluation_set(settings, config)
        server = serve_retraining(demo_dir)
        stack.callback(stop_process, server)

        _phase(console, "3. Full loop: ingest -> train -> register -> deploy -> monitor")
        from flows.loop import loop_flow

        loop = loop_flow(
            fleet=settings.fleet,
            ingest_seconds=config.ingest_s,
            monitor_seconds=config.monitor_s,
            targets=list(config.profiles),
        )
        console.print(f"  monitor verdict after the first deployment: [bold]{loop['monitor']['verdict']}[/]")

        _phase(console, "4. A bearing fault on one machine")
        faulty = _fleet_device(fleets, FAULT_DEVICE_INDEX)
        from firmware.sensor import DriftSpec, FaultSpec

        _sensors_of(fleets, faulty).inject_fault(FaultSpec(kind="inner_race", severity=0.6), [faulty])
        fault_report = ingest_and_monitor(settings, config)
        summary.alerts.append(
            {
                "phase": "fault",
                "injected on": faulty,
                "verdict": fault_report["verdict"],
                "alerted devices": ", ".join(fault_report.get("alert_devices", [])),
                "events": ", ".join(fault_report["events"]),
            }
        )
        console.print(f"  verdict: [bold]{fault_report['verdict']}[/], events: {fault_report['events']}")

        _phase(console, f"5. Sensor gain +{DRIFT_GAIN:.0%} on every machine")
        for fleet in fleets.values():
            fleet.sensors.add_drift(DriftSpec(kind="gain", amount=DRIFT_GAIN))
        for device in emulated.devices if emulated is not None else []:
            if device.simulator is not None:
                device.simulator.add_drift(DriftSpec(kind="gain", amount=DRIFT_GAIN))
        drift_report = ingest_and_monitor(settings, config)
        summary.drift.append(
            {"phase": "drift", "verdict": drift_report["verdict"], "events": ", ".join(drift_report["events"])}
        )
        console.print(f"  verdict: [bold]{drift_report['verdict']}[/], events: {drift_report['events']}")
        if "tinymlops.drift.detected" in drift_report["events"]:
            console.print("  waiting for the event-triggered retraining (Prefect automation -> served deployment)")
            summary.retrainings.append(
                await_retraining(config.retrain_timeout_s, lambda line: console.print(f"  {line}"))
            )

        _phase(console, "6. Monitoring after the retraining")
        after = ingest_and_monitor(settings, config)
        summary.drift.append(
            {"phase": "after retraining", "verdict": after["verdict"], "events": ", ".join(after["events"])}
        )
        summary.models = _model_table(config.profiles)
        summary.devices = _device_table(fleets, emulated)
        summary.seconds = round(time.monotonic() - started, 1)
        if ui.healthy:  # a URL that does not answer is not worth printing
            summary.urls["MLflow UI"] = ui.url
        if report is not None:
            report(summary)
        if config.keep_running:
            console.print("services left running (--keep-running); Ctrl-C stops them")
            _wait_for_interrupt()
        return summary
    finally:
        stack.close()


def _await_quietly(service: Any, timeout_s: float) -> None:
    """Wait for a launched service; log why when it exits or does not answer, and leave it running."""
    try:
        if not service.wait_healthy(timeout_s):
            log.warning("%s did not answer on %s in %.0f s; see %s", service.name, service.url, timeout_s,
                        service.log_file)  # fmt: skip
    except TinyMLOpsError as exc:
        log.warning("%s", exc)


def start_devices(
    settings: Settings, config: DemoConfig, address: Any, stack: ExitStack, score_interval_s: float = 0.1
) -> dict[str, Any]:
    """Start a device fleet per MCU profile, streaming and scoring in real time; stopped with ``stack``."""
    from firmware.device import DeviceConfig
    from firmware.device_fleet import DeviceFleet
    from tasks.deploy import KeyStore
    from tinymlops.targets import load_catalog

    # The machine's signing key (outside the repository), created on first use; devices trust its ring.
    store = KeyStore(settings.resolved_keys_dir)
    store.init()
    keyring = store.keyring()
    catalog = load_catalog(settings.targets.catalog)
    device_config = DeviceConfig(
        score_interval_s=score_interval_s,
        publish_windows=True,
        summary_windows=100,
        topic_root=settings.mqtt.topic_root,
    )
    recordings = None
    if config.real_data:
        from tasks.importers import CWRU_RPM, load_cwru_recordings

        recordings = load_cwru_recordings(settings.cwru_dir, target_rate_hz=settings.sensor.sample_rate_hz)
    fleets = {}
    for i, profile in enumerate(config.profiles):
        fleet = DeviceFleet(
            settings.fleet,
            config.devices_per_profile,
            catalog[profile],
            keyring,
            address,
            seed=100 * i,
            config=device_config,
            device_prefix=profile[:3],
            mqtt_settings=settings.mqtt,
        )
        if recordings is not None:
            from firmware.recorded import RecordedMachine

            for j, (node, device) in enumerate(zip(fleet.sensors.nodes, fleet.devices, strict=True)):
                node.simulator = device.simulator = RecordedMachine(
                    recordings, settings.sensor.sample_rate_hz, settings.sensor.window_samples, seed=100 * i + j,
                    rpm=CWRU_RPM,
                )  # fmt: skip
        fleet.start()
        stack.callback(fleet.stop)
        threading.Thread(target=fleet.run, daemon=True, name=f"devices-{profile}").start()
        fleets[profile] = fleet
    return fleets


def start_emulated_device(settings: Settings, config: DemoConfig, address: Any, stack: ExitStack) -> Any:
    """Start one emulated firmware device (the C firmware on QEMU) on the first profile, when it can run here.

    Its windows are not ingested (the simulated fleet's are), so the monitor's verdicts do not depend on
    QEMU's pace; it takes the same models over the air, scores and reports like the simulated devices.

    Returns:
        The :class:`~firmware.emulated.EmulatedFleet` (stopped with ``stack``), or None when the cross
        toolchain or QEMU is missing or the profile's core has no QEMU board (the reason is logged).
    """
    from firmware.emulated import EmulatedFleet
    from firmware.emulator import EmulatorError, build_images
    from firmware.gateway import GatewayConfig
    from firmware.sensor import MachineSimulator
    from tasks.deploy import KeyStore
    from tinymlops.targets import load_catalog

    profile = load_catalog(settings.targets.catalog)[config.profiles[0]]
    if profile.emulated_board is None:
        log.warning("no emulated device: QEMU has no board for the %s of %s", profile.core, profile.name)
        return None
    try:
        build_images(profile.emulated_board)
    except EmulatorError as exc:
        log.warning("no emulated device: %s", exc)
        return None
    gateway = GatewayConfig(topic_root=settings.mqtt.topic_root, window_interval_s=0.5, publish_windows=False)
    fleet = EmulatedFleet(settings.fleet, 1, profile, KeyStore(settings.resolved_keys_dir).keyring(), address,
                          state_root=settings.data_dir / "emulated", board=profile.emulated_board, config=gateway,
                          device_prefix=f"{profile.name[:3]}-fw", mqtt_settings=settings.mqtt)  # fmt: skip
    for device in fleet.devices:
        device.simulator = MachineSimulator(seed=900, sample_rate_hz=settings.sensor.sample_rate_hz,
                                            window_samples=settings.sensor.window_samples)  # fmt: skip
    fleet.start()
    stack.callback(fleet.stop)
    return fleet


def add_evaluation_set(settings: Settings, config: DemoConfig) -> None:
    """Labelled fault windows to evaluate the fleet's models on: simulated, or the real CWRU files."""
    if config.real_data:
        from tasks.importers import import_cwru

        import_cwru(
            settings.cwru_dir,
            lake_root=settings.lake_root,
            fleet=settings.fleet,
            target_rate_hz=settings.sensor.sample_rate_hz,
            window_samples=settings.sensor.window_samples,
        )
        return
    from tasks.datasets import write_reference_set

    write_reference_set(
        settings.lake_root,
        settings.fleet,
        sample_rate_hz=settings.sensor.sample_rate_hz,
        window_samples=settings.sensor.window_samples,
    )


def _fleet_device(fleets: dict[str, Any], index: int) -> str:
    first = next(iter(fleets.values()))
    return str(first.devices[index].device_id)


def _sensors_of(fleets: dict[str, Any], device_id: str) -> Any:
    return next(f.sensors for f in fleets.values() if device_id in f.sensors.device_ids)


def ingest_and_monitor(settings: Settings, config: DemoConfig) -> dict[str, Any]:
    """Ingest the fleet for the monitoring window, then run the monitor flow over it."""
    from flows.ingest import ingest_flow
    from flows.monitor import monitor_flow

    ingest_flow(fleet=settings.fleet, seconds=config.monitor_s, idle_timeout_s=5.0)
    return monitor_flow(fleet=settings.fleet, window_minutes=config.monitor_s / 60.0)


def serve_retraining(demo_dir: Path) -> subprocess.Popen[bytes]:
    """Serve the drift-triggered retraining deployment in a child process (Prefect's runner)."""
    out = open(demo_dir / "logs" / "serve.log", "wb")  # noqa: SIM115 - owned by the child
    return subprocess.Popen(
        [sys.executable, "-m", "tinymlops", "serve", "--only", "retrain"],
        stdout=out,
        stderr=subprocess.STDOUT,
        env=dict(os.environ),
        start_new_session=True,
    )


def stop_process(process: subprocess.Popen[bytes]) -> None:
    """Stop a served runner: SIGINT (it pauses its deployments), then SIGKILL."""
    if process.poll() is None:
        os.killpg(process.pid, 2)  # SIGINT: Prefect's runner stops on it
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, 9)


def await_retraining(
    timeout_s: float, progress: Callable[[str], None] | None = None, every_s: float = 30.0
) -> dict[str, Any]:
    """Wait for the retraining flow run the drift event triggered, and return its outcome.

    ``progress`` gets a line every ``every_s`` seconds: how long it has waited, and the run's state.
    """
    import asyncio

    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import DeploymentFilter, DeploymentFilterName

    async def latest() -> Any:
        async with get_client() as client:
            runs = await client.read_flow_runs(
                deployment_filter=DeploymentFilter(name=DeploymentFilterName(any_=["retrain-on-drift"])), limit=5
            )
            return runs

    started = time.monotonic()
    deadline, next_line = started + timeout_s, started + every_s
    while time.monotonic() < deadline:
        runs = asyncio.run(latest())
        if progress is not None and time.monotonic() >= next_line:
            waited = f"{time.monotonic() - started:.0f} s"
            if runs and runs[0].state is not None:
                progress(f"{waited}: retraining run {runs[0].name} is {runs[0].state.name}")
            else:
                progress(f"{waited}: the served deployment has not picked up the drift event yet")
            next_line += every_s
        final = [r for r in runs if r.state is not None and r.state.is_final()]
        if final:
            run = final[0]
            if not run.state.is_completed():
                raise DemoError(f"the retraining flow run {run.name} ended {run.state.name}: see the Prefect UI")
            outcome = run.state.result(raise_on_failure=True)
            return {
                "flow run": run.name,
                "state": run.state.name,
                "retrained": outcome.get("retrained"),
                "promoted": ", ".join(
                    f"{e['model']} v{e['version']}" for e in outcome["train"]["registered"] if e["promoted"]
                )
                if outcome.get("retrained")
                else "",
            }
        time.sleep(3)
    raise DemoError(f"no retraining finished within {timeout_s:.0f} s of the drift event: see the Prefect UI")


def _model_table(profiles: tuple[str, ...]) -> list[dict[str, Any]]:
    from registry.models import aliases_of, resolve
    from registry.store import configure_from_settings
    from tinymlops.schemas import registered_model_name

    configure_from_settings(get_settings())
    rows = []
    for profile in profiles:
        name = registered_model_name(profile)
        champion = resolve(f"{name}@champion")
        meta = champion.bundle.metadata
        aliases = aliases_of(name)
        rows.append(
            {
                "target": profile,
                "champion": f"v{champion.version.version}",
                "previous": f"v{aliases['previous']}" if "previous" in aliases else "-",
                "bytes": meta.tflite_bytes,
                "arena B": meta.arena_bytes,
                "MACs": meta.macs,
                "est. ms": round(meta.metrics.get("budget_latency", float("nan")), 2),
                "AUC": round(meta.metrics.get("auc_int8_tflm", float("nan")), 3),
            }
        )
    return rows


def _device_table(fleets: dict[str, Any], emulated: Any = None) -> list[dict[str, Any]]:
    from firmware.device import FIRMWARE_VERSION

    statuses = [
        (profile, device_id, status, FIRMWARE_VERSION)
        for profile, fleet in fleets.items()
        for device_id, status in sorted(fleet.statuses().items())
    ]
    for device in emulated.devices if emulated is not None else []:
        gateway = device.gateway
        announcement = gateway.announcement() if gateway is not None else None
        firmware = announcement.firmware if announcement is not None else device.board.name
        statuses.append((device.profile.name, device.device_id, gateway.status if gateway else None, firmware))
    rows = []
    for profile, device_id, status, firmware in statuses:
        latency = status.latency_ms if status else {}
        rows.append(
            {
                "device": device_id,
                "profile": profile,
                "firmware": firmware,
                "state": status.status if status else "none",
                "manifest": f"v{status.active.version}" if status and status.active else "-",
                "deploy ms": round(latency.get("deploy_ms", float("nan")), 1),
                "load ms": round(latency.get("load_ms", float("nan")), 1),
                "inference ms": round(latency.get("inference_ms", float("nan")), 3),
                "inference instr": int(latency.get("inference_instructions", 0)) or "-",
            }
        )
    return rows


def _wait_for_interrupt() -> None:
    with suppress(KeyboardInterrupt):
        threading.Event().wait()
