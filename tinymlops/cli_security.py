"""``tinymlops security``: the MQTT secure profile's material (CA, certificates, passwords, ACL, provisioning).

Mounted by the main CLI with ``app.add_typer(security_app, name="security")``. Heavy imports
happen inside the commands; domain errors reach the main CLI, which prints them as one line.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from pathlib import Path
from typing import Annotated

import typer
from rich.table import Table

from tinymlops.errors import ConfigError
from tinymlops.settings import get_settings
from tinymlops.terminal import make_console

security_app = typer.Typer(
    help="MQTT secure profile: CA and certificates, per-device passwords and ACL, device provisioning files.",
    no_args_is_help=True,
)
console = make_console()

MaterialDir = Annotated[Path, typer.Argument(help="Material directory written by `security init`.")]


def _device_specs(devices: str, count: int, prefix: str, group: str | None) -> list[str]:
    specs = [s for s in devices.split(",") if s.strip()]
    specs += [f"{prefix}-{i:04d}" for i in range(count)]  # the ids `tinymlops simulate` gives its nodes
    if group:
        specs = [s if ":" in s else f"{s}:{group}" for s in specs]
    return specs


def _keyring_text(path: Path) -> str:
    """A key ring file's text, refused if the devices could not load it."""
    from firmware.signing import KeyRing

    KeyRing.load(path)
    return path.read_text()


def _default_keyring() -> str | None:
    """The key ring ``tinymlops keys init`` wrote under the data directory, if any."""
    from firmware.signing import default_keyring_path

    path = default_keyring_path(get_settings().data_dir)
    return _keyring_text(path) if path.exists() else None


def _summary(directory: Path) -> None:
    from tinymlops.mqtt_security import SecureBrokerMaterial

    material = SecureBrokerMaterial.load(directory)
    table = Table(title=f"Secure profile of fleet {material.access.fleet!r} in {directory}")
    for column in ("user", "role", "group", "files"):
        table.add_column(column)
    for user in material.access.server_users:
        table.add_row(user, "server flows", "", str(material.user_dir(user) / "server.env"))
    for device in material.access.devices:
        table.add_row(device.device_id, "device", device.group or "", str(material.provisioning_file(device.device_id)))
    console.print(table)
    console.print(f"broker configuration: {material.mosquitto_conf}")


@security_app.command("init")
def init(
    out: Annotated[Path, typer.Option(help="Directory to write the material to.")],
    devices: Annotated[str, typer.Option(help="Comma-separated device ids, each optionally id:group.")] = "",
    count: Annotated[int, typer.Option(min=0, help="Also provision <prefix>-0000 ... for this many devices.")] = 0,
    prefix: Annotated[str, typer.Option(help="Device id prefix for --count.")] = "node",
    group: Annotated[str | None, typer.Option(help="Group of devices listed without one.")] = None,
    fleet: Annotated[str | None, typer.Option(help="Fleet (default from settings).")] = None,
    server_user: Annotated[str, typer.Option(help="User name of the server-side flows.")] = "tinymlops-server",
    host: Annotated[
        list[str] | None, typer.Option(help="Host name or IP of the broker (repeatable; the first is the devices').")
    ] = None,
    port: Annotated[int, typer.Option(min=1, max=65535, help="TLS listener with passwords.")] = 8883,
    client_certs: Annotated[bool, typer.Option(help="Also issue client certificates (CN = user name).")] = False,
    cert_port: Annotated[int, typer.Option(min=1, max=65535, help="TLS listener with client certificates.")] = 8884,
    keyring: Annotated[
        Path | None, typer.Option(help="Model-signing key ring to provision (default: the one `keys init` wrote).")
    ] = None,
    force: Annotated[bool, typer.Option(help="Replace existing material: every credential changes.")] = False,
) -> None:
    """Write a CA, the broker's certificate and config, passwords, the ACL and one provisioning file per device."""
    from tinymlops.mqtt_security import DeviceEntry, FleetAccess, init_material

    settings = get_settings()
    access = FleetAccess(
        fleet=fleet or settings.fleet,
        devices=tuple(DeviceEntry.parse(s) for s in _device_specs(devices, count, prefix, group)),
        server_users=(server_user,),
        topic_root=settings.mqtt.topic_root,
    )
    keyring_json = _keyring_text(keyring) if keyring else _default_keyring()
    try:  # a path under a file (/dev/null/x) or without permission: say so before any key is generated
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"cannot create the material directory {out}: {exc.strerror or exc}") from None
    init_material(
        out,
        access,
        hosts=host or ["localhost", "127.0.0.1"],
        port=port,
        cert_port=cert_port if client_certs else None,
        keyring_json=keyring_json,
        force=force,
    )
    _summary(out)


@security_app.command("add-device")
def add_device(
    directory: MaterialDir,
    device: Annotated[str, typer.Argument(help="Device id (id:group also works).")],
    group: Annotated[str | None, typer.Option(help="Group of the device.")] = None,
) -> None:
    """Provision one more device (password, certificate if issued, ACL); SIGHUP the broker to apply."""
    from tinymlops.mqtt_security import DeviceEntry, SecureBrokerMaterial, add_device

    material = add_device(SecureBrokerMaterial.load(directory), DeviceEntry.parse(device, group))
    console.print(f"provisioning file: {material.provisioning_file(DeviceEntry.parse(device).device_id)}")


@security_app.command("remove-device")
def remove_device(directory: MaterialDir, device: Annotated[str, typer.Argument(help="Device id.")]) -> None:
    """Withdraw a device: password and ACL entries dropped (SIGHUP), client certificate revoked (restart)."""
    from tinymlops.mqtt_security import SecureBrokerMaterial, remove_device

    remove_device(SecureBrokerMaterial.load(directory), device)
    console.print(f"removed {device}; send SIGHUP to the broker (and restart it if it uses client certificates)")


@security_app.command("rotate")
def rotate(directory: MaterialDir, user: Annotated[str, typer.Argument(help="Device id or server user.")]) -> None:
    """Give a user a new password (and client certificate); SIGHUP the broker, then re-provision the device."""
    from tinymlops.mqtt_security import SecureBrokerMaterial, rotate_credentials

    material = rotate_credentials(SecureBrokerMaterial.load(directory), user)
    console.print(f"new credentials of {user} in {material.user_dir(user)}")


@security_app.command("renew-server-cert")
def renew_server_cert(
    directory: MaterialDir,
    host: Annotated[
        list[str] | None, typer.Option(help="New host names or IPs (repeatable; default: the same).")
    ] = None,
) -> None:
    """Issue the broker a new certificate from the same CA; restart the broker to load it."""
    from tinymlops.mqtt_security import SecureBrokerMaterial, renew_server_certificate

    material = renew_server_certificate(SecureBrokerMaterial.load(directory), host or ())
    console.print(f"new broker certificate for {', '.join(material.hosts)}: {material.server_cert_file}")


@security_app.command("keyring")
def keyring(
    directory: MaterialDir, path: Annotated[Path, typer.Argument(help="Model-signing key ring (JSON).")]
) -> None:
    """Replace the model-signing key ring in every device's provisioning file."""
    from tinymlops.mqtt_security import SecureBrokerMaterial, set_keyring

    set_keyring(SecureBrokerMaterial.load(directory), _keyring_text(path))
    console.print(f"key ring {path} written into every provisioning file of {directory}")


@security_app.command("mosquitto-conf")
def mosquitto_conf(
    directory: MaterialDir,
    install_dir: Annotated[
        Path | None, typer.Option(help="Where the broker's files are copied on its host (default: where they are).")
    ] = None,
) -> None:
    """Print the Mosquitto configuration; with --install-dir, for the broker files copied there."""
    from tinymlops.mqtt_security import SecureBrokerMaterial

    material = SecureBrokerMaterial.load(directory)
    typer.echo(material.mosquitto_conf_text(install_dir), nl=False)
    if install_dir is not None:
        files = " ".join(str(p) for p in material.broker_files())
        typer.echo(f"copy to {install_dir} (readable by the broker's user): {files}", err=True)


@security_app.command("show")
def show(directory: MaterialDir) -> None:
    """List the users of a material directory and where their files are."""
    _summary(directory)


@security_app.command("broker")
def broker(
    directory: MaterialDir,
    port: Annotated[int | None, typer.Option(help="Port (default: a free one).")] = None,
    tls: Annotated[bool, typer.Option(help="Serve mqtts:// with the material's certificate.")] = True,
    client_certs: Annotated[bool, typer.Option(help="Authenticate by client certificate instead.")] = False,
) -> None:
    """Start a local Mosquitto in the secure profile on loopback and keep it up until Ctrl-C."""
    from tinymlops.mqtt import MosquittoBroker
    from tinymlops.mqtt_security import SecureBrokerMaterial

    material = SecureBrokerMaterial.load(directory)
    server = MosquittoBroker.secure(material, port, tls=tls, require_certificate=client_certs).start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_args: stop.set())  # stop the broker on SIGTERM too, not only Ctrl-C
    try:
        console.print(f"secure MQTT broker on [bold]{server.address.url}[/] (pid {server.pid}); Ctrl-C stops it")
        with contextlib.suppress(KeyboardInterrupt):
            stop.wait()
    finally:
        server.stop()
