"""``tinymlops deploy`` and ``tinymlops keys``: redeploy registered models over MQTT, manage the signing key.

:func:`deploy_command` is registered by the main CLI as ``deploy``; :data:`keys_app` is mounted as
``keys``. Domain errors propagate as :class:`~tinymlops.errors.TinyMLOpsError` subclasses, which
``tinymlops.cli.main`` prints as one line with exit code 1. Heavy modules (Prefect, MLflow, paho)
are imported inside the commands.
"""

from __future__ import annotations

import json
import os
import socket
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer
from rich.table import Table

from tinymlops.errors import BrokerError, ConfigError
from tinymlops.runtime import configure_prefect_env
from tinymlops.settings import Settings, get_settings
from tinymlops.terminal import make_console

if TYPE_CHECKING:
    from tasks.deploy import KeyStore

keys_app = typer.Typer(
    help="The OTA signing key (kept outside the repository) and the key ring devices are provisioned with.",
    no_args_is_help=True,
    add_completion=False,
)
console = make_console()
PROBE_TIMEOUT_S = 5.0


def require_broker(url: str | None, where: str = "--broker") -> None:
    """Fail fast, before any flow or service starts, when the broker at ``url`` takes no connections.

    Args:
        url: Broker URL; None or empty checks nothing (an embedded broker will be started).
        where: Where the URL came from, for the message (an option or an environment variable).

    Raises:
        BrokerError: The URL is invalid or nothing accepts TCP connections there.
    """
    if not url:
        return
    from tinymlops.mqtt import parse_broker_url

    address = parse_broker_url(url)
    try:
        with socket.create_connection((address.host, address.port), timeout=PROBE_TIMEOUT_S):
            pass
    except OSError as exc:
        raise BrokerError(
            f"cannot reach MQTT broker at {address.url}: {exc.strerror or exc}; start it or fix {where}"
        ) from None


def require_prefect_api(settings: Settings) -> None:
    """Fail fast when a configured Prefect API (``PREFECT_API_URL`` or the settings) does not answer.

    Raises:
        ConfigError: ``GET <api>/health`` fails or is not HTTP 200.
    """
    url = os.environ.get("PREFECT_API_URL") or settings.prefect.api_url
    if not url:
        return  # flows run on a temporary local server
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/health", timeout=PROBE_TIMEOUT_S) as response:
            problem = None if response.status == 200 else f"GET /health gave HTTP {response.status}"
    except urllib.error.HTTPError as exc:
        problem = f"GET /health gave HTTP {exc.code}"
    except (urllib.error.URLError, OSError, ValueError) as exc:
        problem = str(getattr(exc, "reason", exc))
    if problem:
        raise ConfigError(
            f"Prefect API {url} does not answer ({problem}): start the server (prefect server start) "
            "or unset TINYMLOPS_PREFECT__API_URL and PREFECT_API_URL"
        )


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def _ms(latency: dict[str, float], key: str) -> str:
    return f"{latency[key]:.1f}" if key in latency else "-"


def _print_report(report: dict[str, Any]) -> None:
    counts = report["counts"]
    title = (
        f"{report['model']}/{report['registry_version']} -> fleet {report['fleet']}: {report['outcome']} "
        f"({counts['active']} of {counts['selected']} active, {counts['skipped']} skipped)"
    )
    table = Table(title=title, title_justify="left")
    columns = ("device", "role", "manifest", "delivered", "verified", "loaded", "active", "deploy ms", "load ms",
               "inference ms", "status", "running now")  # fmt: skip
    for column in columns:
        table.add_column(column, overflow="fold")
    for row in report["devices"]:
        latency = row["latency_ms"]
        version = f"v{row['manifest_version']}" if row["manifest_version"] is not None else "-"
        status = row["status"] + (f" ({row['detail']})" if row["detail"] and not row["active"] else "")
        table.add_row(
            row["device"], row["role"], version, _yes(row["delivered"]), _yes(row["verified"]), _yes(row["loaded"]),
            _yes(row["active"]), _ms(latency, "deploy"), _ms(latency, "load"), _ms(latency, "inference"), status,
            row["running"],
        )  # fmt: skip
    console.print(table)
    for skipped in report["skipped"]:
        console.print(
            f"skipped {skipped['device']} ({skipped['profile'] or '?'}): {skipped['reason']}", highlight=False
        )
    if report["canary"]:
        console.print(f"canary: {report['canary']['reason']}", highlight=False)
    for line in [report["registry_rollback"], *report["notes"]]:
        if line:
            console.print(line, highlight=False)
    latency = ", ".join(f"{k} {v:.1f}" for k, v in report["latency"].items())
    if latency:
        console.print(f"latency (ms): {latency}", highlight=False)


def deploy_command(
    model: Annotated[str, typer.Argument(help="NAME (its champion), NAME@ALIAS or NAME/VERSION in the registry.")],
    fleet: Annotated[str | None, typer.Option(help="Fleet name (default from settings).")] = None,
    devices: Annotated[str | None, typer.Option(help="Only these devices, comma-separated.")] = None,
    group: Annotated[str | None, typer.Option(help="Only this group's members.")] = None,
    canary: Annotated[str, typer.Option(help="Canary fraction first, e.g. 10% or 0.1; 0: all at once.")] = "0",
    watch: Annotated[float, typer.Option(min=0, help="Seconds the canaries' anomaly rate is watched.")] = 30.0,
    timeout: Annotated[float, typer.Option(min=1, help="Seconds each wave waits for the devices.")] = 60.0,
    broker: Annotated[str | None, typer.Option(help="Broker URL of the fleet (default from settings).")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="Print the report as JSON.")] = False,
) -> None:
    """Redeploy a registered model over MQTT to the fleet's devices of its MCU profile (the deploy flow).

    Prints per device: delivered, verified, loaded, active, latencies, or the failure and the model
    still running. Exits 1 unless every selected device runs the new model.
    """
    settings = get_settings()
    configure_prefect_env(settings)
    from flows.deploy import deploy_flow
    from registry.models import describe
    from registry.store import configure_from_settings
    from tasks.deploy import DeployError, as_fraction

    fraction = as_fraction(canary)
    # Fail before any flow machinery starts: broker, Prefect API and the model must all be there.
    url = broker or settings.mqtt.url
    if not url:
        raise DeployError("no broker to reach the fleet: pass --broker or set TINYMLOPS_MQTT__URL")
    require_broker(url, "--broker" if broker else "TINYMLOPS_MQTT__URL")
    require_prefect_api(settings)
    ref = model if "@" in model or "/" in model.removeprefix("models:/") else f"{model}@champion"
    configure_from_settings(settings)
    describe(ref)
    wanted = [d.strip() for d in devices.split(",") if d.strip()] if devices else None
    report = deploy_flow(
        model_ref=ref, fleet=fleet, devices=wanted, group=group, canary_fraction=fraction, watch_s=watch,
        timeout_s=timeout, broker_url=broker,
    )  # fmt: skip
    if as_json:
        typer.echo(json.dumps(report))
    else:
        _print_report(report)
    if report["outcome"] != "deployed":
        raise typer.Exit(1)


def _store() -> KeyStore:
    from tasks.deploy import KeyStore

    return KeyStore(get_settings().resolved_keys_dir)


@keys_app.command("init")
def init_command(
    key_id: Annotated[str | None, typer.Option(help="Id of the key (default ota-<date>-<fingerprint>).")] = None,
) -> None:
    """Create the signing key (0600) and the public key ring, once; an existing key is left as it is."""
    store = _store()
    info, created = store.init(key_id)
    if created:
        console.print(f"created signing key {info.key_id} ({info.fingerprint}) in {store.directory}", highlight=False)
    else:
        console.print(
            f"signing key {info.key_id} already exists in {store.directory}; not overwritten", highlight=False
        )
    console.print(f"key ring for devices: {store.keyring_path}", highlight=False)


@keys_app.command("show")
def show_command(as_json: Annotated[bool, typer.Option("--json", help="Print JSON.")] = False) -> None:
    """List the keys: the signing key, keys still trusted, revoked keys."""
    store = _store()
    keys = store.list_keys()
    if as_json:
        typer.echo(json.dumps({"directory": str(store.directory), "keys": [vars(k) for k in keys]}))
        return
    table = Table(title=f"Signing keys in {store.directory}", title_justify="left")
    for column in ("key id", "fingerprint", "state"):
        table.add_column(column)
    for key in keys:
        table.add_row(key.key_id, key.fingerprint, key.state)
    console.print(table)


@keys_app.command("rotate")
def rotate_command(
    key_id: Annotated[str | None, typer.Option(help="Id of the new key (default ota-<date>-<fingerprint>).")] = None,
) -> None:
    """Make a new key the signing key; the old one stays trusted until revoked (provision the new ring first)."""
    store = _store()
    previous = store.signing_key()
    info = store.rotate(key_id)
    console.print(
        f"signing key is now {info.key_id} ({info.fingerprint}); {previous.key_id} stays trusted until revoked. "
        f"Provision devices with {store.keyring_path} before deploying.",
        highlight=False,
    )


@keys_app.command("revoke")
def revoke_command(key_id: Annotated[str, typer.Argument(help="The key id to revoke.")]) -> None:
    """Revoke a key: devices with the updated key ring refuse every manifest it signs."""
    store = _store()
    store.revoke(key_id)
    console.print(f"revoked {key_id}; provision devices with {store.keyring_path}", highlight=False)


@keys_app.command("export-public")
def export_public_command(
    output: Annotated[
        Path | None, typer.Option(help="Write the key ring here (default: <data_dir>/keys/, where devices read it).")
    ] = None,
) -> None:
    """Write the public key ring (trusted and revoked key ids) for `tinymlops device run --keyring`."""
    from firmware.signing import default_keyring_path

    target = output or default_keyring_path(get_settings().data_dir)
    try:
        path = _store().export_keyring(target)
    except OSError as exc:
        raise ConfigError(f"cannot write the key ring to {target}: {exc.strerror or exc}") from None
    console.print(f"key ring written to {path}", highlight=False)


ota_app = typer.Typer(
    help="The fleet's OTA service: serves the deployed model to any device that asks, at any time.",
    no_args_is_help=True,
    add_completion=False,
)


@ota_app.command("serve")
def ota_serve_command(
    fleet: Annotated[str | None, typer.Option(help="Fleet name (default from settings).")] = None,
    broker: Annotated[str | None, typer.Option(help="Broker URL of the fleet (default from settings).")] = None,
) -> None:
    """Serve the chunks of what the retained signed manifests name, until Ctrl-C (one service per fleet)."""
    from tasks.ota_service import start_ota_service
    from tinymlops.mqtt import parse_broker_url

    settings = get_settings()
    url = broker or settings.mqtt.url
    if not url:
        raise ConfigError("the OTA service needs a broker: pass --broker or set TINYMLOPS_MQTT__URL")
    require_broker(url, "--broker" if broker else "TINYMLOPS_MQTT__URL")
    service = start_ota_service(settings.overridden(fleet=fleet), parse_broker_url(url))
    console.print(f"OTA service of fleet {service.topics.fleet} on {url}; Ctrl-C stops it", highlight=False)
    try:
        service.wait_stopped()
    except KeyboardInterrupt:
        pass
    finally:
        service.stop()
