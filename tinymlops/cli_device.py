"""``tinymlops device ...``: simulated far-edge devices that take models over MQTT and score their machines.

A Typer sub-app, mounted by the main CLI (``app.add_typer(device_app, name="device")``). Heavy
modules (TFLite Micro, paho, the simulators) are imported inside the commands.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from tinymlops.errors import ConfigError
from tinymlops.settings import get_settings
from tinymlops.terminal import make_console

device_app = typer.Typer(
    help="Simulated MCU devices: signed OTA model updates over MQTT, TFLite Micro scoring.", no_args_is_help=True
)
console = make_console()
# Commands that only publish never start a private broker (see tinymlops.mqtt.broker_to_publish_to).
PublishBrokerOption = Annotated[
    str | None, typer.Option(help="Broker URL (default: settings, else the one `tinymlops broker` announced).")
]
log = logging.getLogger(__name__)


@device_app.command("run")
def run(
    devices: Annotated[
        int | None, typer.Option(min=0, max=5000, help="Number of simulated devices (default 10, 0 with --emulated).")
    ] = None,
    fleet: Annotated[str | None, typer.Option(help="Fleet name (default from settings).")] = None,
    profile: Annotated[str, typer.Option(help="MCU profile of the devices (catalog key).")] = "nrf52840",
    group: Annotated[str | None, typer.Option(help="Group whose manifests the devices also follow.")] = None,
    seconds: Annotated[float | None, typer.Option(min=0, help="Run this long (default: until Ctrl-C).")] = None,
    broker: PublishBrokerOption = None,
    interval: Annotated[float, typer.Option(min=0.01, help="Seconds between two scored windows of a device.")] = 1.0,
    keyring: Annotated[Path | None, typer.Option(help="Key ring JSON (default <data_dir>/keys/).")] = None,
    seed: Annotated[int, typer.Option(help="Base seed of the machines.")] = 0,
    per_connection: Annotated[int, typer.Option(min=1, help="Devices sharing one MQTT connection.")] = 50,
    publish_windows: Annotated[bool, typer.Option(help="Also stream raw windows for the ingest.")] = False,
    emulated: Annotated[
        int, typer.Option(min=0, max=64, help="Also run this many emulated devices: the real firmware in QEMU.")
    ] = 0,
    board: Annotated[str, typer.Option(help="QEMU board of the emulated devices.")] = "mps2-an386",
) -> None:
    """Run simulated (and emulated) devices: announce, take signed models over MQTT, score windows, report drift."""
    settings = get_settings()
    from firmware.device import DeviceConfig
    from firmware.device_fleet import DeviceFleet
    from firmware.signing import KeyRing, default_keyring_path
    from tinymlops.contracts.topics import check_name
    from tinymlops.mqtt import broker_to_publish_to
    from tinymlops.targets import get_target

    n_simulated = devices if devices is not None else (0 if emulated else 10)
    if n_simulated == 0 and emulated == 0:
        raise ConfigError("nothing to run: give --devices >= 1 or --emulated >= 1")
    check_name(fleet or settings.fleet, "fleet")  # before a broker is started
    keyring_path = keyring or default_keyring_path(settings.data_dir)
    if not keyring_path.exists():
        raise ConfigError(f"no device key ring at {keyring_path}; create one with `tinymlops device keygen`")
    ring = KeyRing.load(keyring_path)
    target = get_target(profile)
    name = fleet or settings.fleet
    if emulated:
        _check_emulation(board)  # before a broker is started: qemu, the toolchain, the image
    config = DeviceConfig(
        topic_root=settings.mqtt.topic_root, score_interval_s=interval, publish_windows=publish_windows
    )
    mqtt_settings = settings.mqtt.model_copy(update={"url": broker or settings.mqtt.url})
    rows: list[tuple[str, str, str, str, int, int]] = []
    with broker_to_publish_to(mqtt_settings, settings.data_dir) as address, contextlib.ExitStack() as running:
        started = time.monotonic()
        if n_simulated:
            sim = DeviceFleet(name, n_simulated, target, ring, address, group=group, seed=seed,
                              devices_per_connection=per_connection, config=config, mqtt_settings=mqtt_settings,
                              sample_rate_hz=settings.sensor.sample_rate_hz,
                              window_samples=settings.sensor.window_samples)  # fmt: skip
            running.enter_context(sim)
            console.print(
                f"fleet {name!r}: {n_simulated} {profile} devices on {sim.connections} connections at {address.url}; "
                f"key ids {', '.join(ring.key_ids) or '(none)'}"
            )
        emu = None
        if emulated:
            from firmware.emulated import EmulatedFleet
            from firmware.gateway import GatewayConfig

            gateway_config = GatewayConfig(topic_root=settings.mqtt.topic_root, window_interval_s=interval,
                                           publish_windows=publish_windows)  # fmt: skip
            emu = EmulatedFleet(name, emulated, target, ring, address, state_root=settings.data_dir / "emulated",
                                board=board, group=group, config=gateway_config,
                                mqtt_settings=mqtt_settings)  # fmt: skip
            running.enter_context(emu)
            console.print(f"fleet {name!r}: {emulated} emulated {profile} devices on {board} at {address.url}")
        with contextlib.suppress(KeyboardInterrupt):
            threading.Event().wait(seconds)
        if n_simulated:
            sim.publish_summaries()
            for device in sim.devices:
                active = device.active
                model = f"{active.manifest.model_name} v{active.manifest.model_version}" if active else "-"
                rows.append((device.device_id, device.group or "-", device.status.status if device.status else "-",
                             model, device.windows_scored, device.anomalies))  # fmt: skip
        for emulated_device in emu.devices if emu else []:
            gateway = emulated_device.gateway
            if gateway is None:
                continue
            gateway.request_summary()
            ref = gateway.active
            rows.append((emulated_device.device_id, emulated_device.group or "-",
                         gateway.status.status if gateway.status else "-",
                         f"{ref.name} v{ref.version}" if ref else "-", gateway.windows_scored,
                         gateway.anomalies))  # fmt: skip
        if emu is not None:
            time.sleep(0.5)  # the summaries reach the broker before the gateways leave
    elapsed = time.monotonic() - started
    table = Table(title=f"Devices after {elapsed:.1f} s")
    for column in ("device", "group", "status", "model", "windows", "anomalies"):
        table.add_column(column)
    for row in rows:
        table.add_row(*(str(v) for v in row))
    console.print(table)


def _check_emulation(board: str) -> None:
    """Fail with one line when the board is unknown or QEMU, the toolchain or the device image is missing.

    Raises:
        EmulatorError: The board is unknown or cannot run the device image, or the image does not build.
        ToolchainMissingError: QEMU or the cross toolchain is not installed.
    """
    from firmware.emulator import EmulatorError, build_images, get_board

    spec = get_board(board)
    if "device" not in spec.images or spec.flash_base is None:
        raise EmulatorError(f"board {board!r} cannot run the device image; use --board mps2-an386")
    if build_images(spec).device is None:
        raise EmulatorError(f"no device image for {board}: firmware/c/device_main.c is missing")


@device_app.command("keygen")
def keygen(
    key_id: Annotated[str, typer.Option(help="Id of the new key, written into every manifest it signs.")],
    force: Annotated[bool, typer.Option(help="Replace an existing private key.")] = False,
) -> None:
    """Create the server's OTA signing key (mode 0600) and add its public key to the devices' key ring."""
    settings = get_settings()
    from firmware.signing import (
        KeyRing,
        check_key_id,
        default_keyring_path,
        default_private_key_path,
        generate_keypair,
        save_private_key,
    )

    check_key_id(key_id)
    private_path = default_private_key_path(settings.data_dir)
    if private_path.exists() and not force:
        raise ConfigError(f"signing key {private_path} exists; pass --force to replace it")
    private, public = generate_keypair()
    ring_path = default_keyring_path(settings.data_dir)
    ring = KeyRing.load(ring_path) if ring_path.exists() else KeyRing()
    ring.add(key_id, public)
    save_private_key(private_path, private)
    ring.save(ring_path)
    console.print(f"signing key {key_id!r}: {private_path} (0600); key ring: {ring_path}")


@device_app.command("status")
def status(
    broker: Annotated[str, typer.Option(help="Broker URL of the running fleet.")],
    fleet: Annotated[str | None, typer.Option(help="Fleet name (default from settings).")] = None,
    wait: Annotated[float, typer.Option(min=0.1, help="Seconds to collect the retained statuses.")] = 1.0,
    as_json: Annotated[bool, typer.Option("--json", help="Print the statuses as JSON lines.")] = False,
) -> None:
    """Show every device's latest deployment status (the retained status topics)."""
    settings = get_settings()
    from firmware.ota import DeviceStatus, OtaDecodeError
    from tinymlops.contracts.topics import FleetTopics
    from tinymlops.mqtt import connect, make_client, parse_broker_url

    address = parse_broker_url(broker)
    topics = FleetTopics(fleet or settings.fleet, settings.mqtt.topic_root)
    found: dict[str, DeviceStatus] = {}
    lock = threading.Lock()

    def on_message(_client: Any, _userdata: Any, message: Any) -> None:
        topic = topics.parse(message.topic)
        if topic is None:
            return
        try:
            parsed = DeviceStatus.decode_from(topic[0], message.payload)
        except OtaDecodeError as exc:  # a device is who its topic says
            log.warning("ignoring the status on the topic of %s: %s", topic[0], exc)
            return
        with lock:
            found[topic[0]] = parsed

    client = make_client(address, settings=settings.mqtt)
    client.on_message = on_message
    connect(client, address)
    client.subscribe(topics.all_devices("status"), qos=1)
    time.sleep(wait)
    client.disconnect()
    client.loop_stop()
    rows = [found[d] for d in sorted(found)]
    if as_json:
        for row in rows:
            typer.echo(json.dumps(row.model_dump()))
        return
    table = Table(title=f"{len(rows)} devices in fleet {topics.fleet!r}")
    for column in ("device", "status", "manifest", "active", "deploy ms", "detail"):
        table.add_column(column)
    for row in rows:
        manifest = f"{row.model} v{row.version}" if row.model else "-"
        active = f"{row.active.name} v{row.active.version}" if row.active else "-"
        deploy = f"{row.latency_ms['deploy_ms']:.0f}" if "deploy_ms" in row.latency_ms else "-"
        table.add_row(row.device, row.status, manifest, active, deploy, row.detail)
    console.print(table)
