"""The MQTT secure profile against a real Mosquitto: passwords, the per-device ACL, TLS, client certificates.

Mosquitto 2.0's ``acl_file`` never refuses a SUBSCRIBE (its check returns success for subscriptions
and enforces read rights when each message, retained ones included, is delivered), so read rules
are proved by what a client receives, not by its SUBACK.
"""

from __future__ import annotations

import base64
import json
import os
import queue
import shutil
import ssl
import stat
import subprocess
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from typer.testing import CliRunner

from firmware.codec import VibrationWindow, encode
from firmware.signing import KeyRing, generate_keypair
from tasks.ingest import IngestConfig, ensure_subscription, run_ingest
from tasks.lake import read_windows
from tinymlops.cli_security import security_app
from tinymlops.contracts.topics import FleetTopics
from tinymlops.errors import BrokerError
from tinymlops.mqtt import BrokerAddress, MosquittoBroker, connect, free_port, make_client, wait_for_port
from tinymlops.mqtt_security import (
    ClientCredentials,
    DeviceEntry,
    FleetAccess,
    SecureBrokerMaterial,
    SecurityError,
    generate_ca,
    hash_password,
    init_material,
    issue_certificate,
    read_password_file,
    remove_device,
    renew_server_certificate,
    rotate_credentials,
)
from tinymlops.settings import SensorSettings, Settings

FLEET = "f1"
P = f"tinymlops/{FLEET}"
SERVER = "tinymlops-server"
DEVICES = (DeviceEntry("node-0000", "line-1"), DeviceEntry("node-0001", "line-2"), DeviceEntry("node-0002", "line-1"))
WAIT_S = 5.0


def make_material(directory: Path, **kwargs: Any) -> SecureBrokerMaterial:
    return init_material(directory, FleetAccess(FLEET, DEVICES), cert_port=free_port(), **kwargs)


@pytest.fixture(scope="module")
def material(tmp_path_factory: pytest.TempPathFactory) -> SecureBrokerMaterial:
    return make_material(tmp_path_factory.mktemp("secure") / "material")


def start(material: SecureBrokerMaterial, **kwargs: Any) -> MosquittoBroker:
    if MosquittoBroker.executable() is None:
        pytest.fail("mosquitto is not installed: run the README's set-up (apt-get install mosquitto)")
    return MosquittoBroker.secure(material, **kwargs).start()


@pytest.fixture
def broker(material: SecureBrokerMaterial) -> Iterator[MosquittoBroker]:
    """A fresh TLS broker (no retained messages from other tests) with the module's material."""
    server = start(material)
    yield server
    server.stop()


@dataclass
class Session:
    """A connected client that records what it receives."""

    client: mqtt.Client
    inbox: queue.Queue[tuple[str, bytes]] = field(default_factory=queue.Queue)

    def subscribe(self, topic: str) -> int:
        """Subscribe at QoS 1 and return the SUBACK's code (granted QoS, or 0x80)."""
        done = threading.Event()
        codes: list[int] = []

        def on_subscribe(_c: mqtt.Client, _u: Any, _mid: int, reasons: list[Any], _p: Any) -> None:
            codes.extend(int(r.value) for r in reasons)
            done.set()

        self.client.on_subscribe = on_subscribe
        self.client.subscribe(topic, qos=1)
        assert done.wait(WAIT_S), f"no SUBACK for {topic}"
        return codes[0]

    def publish(self, topic: str, payload: bytes, retain: bool = False) -> None:
        self.client.publish(topic, payload, qos=1, retain=retain).wait_for_publish(WAIT_S)

    def until(self, marker: tuple[str, bytes]) -> set[tuple[str, bytes]]:
        """Everything received up to and including ``marker`` (a later message on the same path)."""
        got: set[tuple[str, bytes]] = set()
        deadline = time.monotonic() + WAIT_S
        while marker not in got:
            got.add(self.inbox.get(timeout=max(0.01, deadline - time.monotonic())))
        return got

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def login(
    address: BrokerAddress,
    creds: ClientCredentials,
    *,
    certificate: bool = False,
    client_id: str = "",
    clean_session: bool = True,
) -> Session:
    """Connect with a password, or with the client certificate only."""
    client = make_client(
        address,
        client_id,
        clean_session=clean_session,
        username=None if certificate else creds.username,
        password=None if certificate else creds.password,
        ca_file=creds.ca_file,
        client_cert=creds.client_cert if certificate else None,
        client_key=creds.client_key if certificate else None,
    )
    session = Session(client)
    client.on_message = lambda _c, _u, msg: session.inbox.put((msg.topic, bytes(msg.payload)))
    connect(client, address, timeout_s=WAIT_S)
    return session


def window(device: str, seq: int) -> VibrationWindow:
    sensor = SensorSettings()
    samples = np.random.default_rng(seq).normal(0, 300, sensor.window_samples).astype(np.int16)
    return VibrationWindow(device, seq, time.time_ns() // 1000, sensor.sample_rate_hz, 16 / 32767, samples)


def keep(creds: ClientCredentials, folder: Path) -> ClientCredentials:
    """A copy of a user's certificate and key, which rotation or removal replace or delete."""
    assert creds.client_cert is not None and creds.client_key is not None
    folder.mkdir()
    cert, key = Path(shutil.copy(creds.client_cert, folder)), Path(shutil.copy(creds.client_key, folder))
    return ClientCredentials(creds.username, creds.password, creds.client_id, creds.ca_file, cert, key)


# --- material, no broker ----------------------------------------------------------------------


def test_password_hash_is_what_mosquitto_passwd_writes(tmp_path: Path) -> None:
    tool = shutil.which("mosquitto_passwd")
    if tool is None:
        pytest.fail("mosquitto_passwd is not installed (Debian package mosquitto)")
    subprocess.run([tool, "-b", "-c", str(tmp_path / "pw"), "node-0000", "s3cret pass"], check=True)
    written = read_password_file(tmp_path / "pw")["node-0000"]
    _, kind, iterations, salt, _digest = written.split("$")
    ours = hash_password("s3cret pass", salt=base64.b64decode(salt), iterations=int(iterations))
    assert kind == "7"
    assert ours == written
    assert hash_password("s3cret pass") != written  # a fresh salt each time


def test_acl_topics_are_the_ota_protocol_topics(material: SecureBrokerMaterial) -> None:
    """The ACL grants exactly the topics firmware/ota.py uses, so a renamed topic fails here first."""
    ota = FleetTopics(FLEET)
    device, group = "node-0000", "line-1"
    granted = material.access.device_topics(device)
    published_by_device = [ota.vibration, ota.announce, ota.request, ota.status, ota.scores, ota.summary]
    assert sorted(granted["publish"]) == sorted(topic(device) for topic in published_by_device)
    assert sorted(granted["read"]) == sorted([ota.manifest(device), ota.chunk(device), ota.group_manifest(group)])


@pytest.mark.parametrize(
    ("devices", "message"),
    [
        ((DeviceEntry("node/1"),), "invalid device id"),
        ((DeviceEntry("node+"),), "invalid device id"),
        ((DeviceEntry("groups"),), "reserved for group topics"),
        ((DeviceEntry("a"), DeviceEntry("a")), "repeated: a"),
        ((DeviceEntry(SERVER),), f"repeated: {SERVER}"),
        ((DeviceEntry("a", "line#1"),), "invalid group"),
    ],
)
def test_names_that_would_break_the_acl_are_refused(devices: tuple[DeviceEntry, ...], message: str) -> None:
    with pytest.raises(SecurityError, match=message):
        FleetAccess(FLEET, devices)


def test_material_files_and_permissions(material: SecureBrokerMaterial) -> None:
    loaded = SecureBrokerMaterial.load(material.directory)
    assert loaded == material
    secret = [material.ca_key_file, material.server_key_file, material.password_file]
    secret += [material.provisioning_file(d.device_id) for d in DEVICES]
    secret += [material.user_dir(SERVER) / name for name in ("server.env", "credentials.json", "client.key")]
    assert {oct(stat.S_IMODE(p.stat().st_mode)) for p in secret} == {"0o600"}
    assert set(read_password_file(material.password_file)) == {SERVER, *(d.device_id for d in DEVICES)}
    inventory = (material.directory / "inventory.json").read_text()
    for user in (SERVER, *(d.device_id for d in DEVICES)):
        assert material.credentials(user).password not in inventory
    env = dict(line.split("=", 1) for line in (material.user_dir(SERVER) / "server.env").read_text().splitlines())
    assert env["TINYMLOPS_MQTT__USERNAME"] == SERVER
    assert env["TINYMLOPS_MQTT__CLIENT_ID"].startswith("tinymlops-ingest-")
    with pytest.raises(SecurityError, match="already holds"):
        make_material(material.directory)


# --- the broker -------------------------------------------------------------------------------


@pytest.mark.mqtt
@pytest.mark.parametrize("tls", [True, False], ids=["mqtts", "mqtt"])
def test_anonymous_unknown_and_wrong_password_are_refused(material: SecureBrokerMaterial, tls: bool) -> None:
    broker = start(material, tls=tls)
    try:
        anonymous = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
        if tls:
            anonymous.tls_set(ca_certs=str(material.ca_file))
        with pytest.raises(BrokerError, match="refused the connection: Not authorized"):
            connect(anonymous, broker.address, timeout_s=WAIT_S)
        good = material.credentials("node-0000")
        for username, password in [("node-0000", good.password + "!"), ("intruder", good.password)]:
            client = make_client(broker.address, username=username, password=password, ca_file=material.ca_file)
            with pytest.raises(BrokerError, match="Not authorized"):
                connect(client, broker.address, timeout_s=WAIT_S)
        login(broker.address, good).close()
    finally:
        broker.stop()


@pytest.mark.mqtt
def test_device_publishes_only_under_its_own_topics(broker: MosquittoBroker, material: SecureBrokerMaterial) -> None:
    server = login(broker.address, material.credentials(SERVER))
    assert server.subscribe(f"{P}/#") == 1
    device = login(broker.address, material.credentials("node-0000"))
    allowed = [(f"{P}/node-0000/vibration", b"w0"), (f"{P}/node-0000/scores", b"s"), (f"{P}/node-0000/ota/req", b"r")]
    denied = [
        (f"{P}/node-0001/vibration", b"forged window"),  # another device's telemetry
        (f"{P}/node-0000/ota/manifest", b"forged manifest"),  # its own model topics are read-only
        (f"{P}/groups/line-1/ota/manifest", b"forged group manifest"),  # would reach the whole group
    ]
    for topic, payload in denied[:2] + allowed + denied[2:]:
        device.publish(topic, payload)
    marker = (f"{P}/node-0000/vibration", b"marker")
    device.publish(*marker)

    # QoS 1 from one client arrives in order: once the marker is in, everything before it would be.
    assert server.until(marker) == {*allowed, marker}
    device.close()
    server.close()


@pytest.mark.mqtt
def test_device_reads_only_its_own_and_its_groups_model_topics(
    broker: MosquittoBroker, material: SecureBrokerMaterial
) -> None:
    server = login(broker.address, material.credentials(SERVER))
    model_topics = [f"{P}/{d.device_id}/ota/{kind}" for d in DEVICES for kind in ("manifest", "chunk")]
    model_topics += [f"{P}/groups/{g}/ota/manifest" for g in ("line-1", "line-2")]
    for topic in model_topics:
        server.publish(topic, b"retained " + topic.encode(), retain=True)

    device = login(broker.address, material.credentials("node-0000"))
    own_and_group = [f"{P}/node-0000/ota/manifest", f"{P}/node-0000/ota/chunk", f"{P}/groups/line-1/ota/manifest"]
    assert [device.subscribe(t) for t in own_and_group] == [1, 1, 1]
    for topic in [t for t in model_topics if t not in own_and_group] + [f"{P}/#", f"{P}/+/ota/manifest"]:
        device.subscribe(topic)  # granted by Mosquitto 2.0's acl_file, but nothing may come through
    server.publish(f"{P}/node-0001/ota/chunk", b"live chunk for node-0001")
    marker = (f"{P}/node-0000/ota/chunk", b"marker")
    server.publish(*marker)

    received = device.until(marker)
    assert received == {(t, b"retained " + t.encode()) for t in own_and_group} | {marker}
    device.close()
    server.close()


@pytest.mark.mqtt
def test_stolen_ingest_client_id_yields_no_telemetry(broker: MosquittoBroker, material: SecureBrokerMaterial) -> None:
    """Client ids are not authenticated: a device taking over the ingest's session still reads nothing."""
    creds = material.credentials(SERVER)
    ingest = login(broker.address, creds, client_id=creds.client_id, clean_session=False)
    ingest.subscribe(f"{P}/+/vibration")
    ingest.close()
    device = login(broker.address, material.credentials("node-0001"))
    device.publish(f"{P}/node-0001/vibration", b"queued for the ingest")
    thief = login(broker.address, material.credentials("node-0002"), client_id=creds.client_id, clean_session=False)
    device.publish(f"{P}/node-0001/vibration", b"sent while the thief holds the session")
    marker = (f"{P}/node-0002/ota/chunk", b"marker")
    thief.subscribe(marker[0])
    server = login(broker.address, creds)
    server.publish(*marker)
    assert thief.until(marker) == {marker}
    for session in (thief, device, server):
        session.close()


@pytest.mark.mqtt
def test_ingest_over_tls_with_the_server_credentials(
    broker: MosquittoBroker, material: SecureBrokerMaterial, tmp_path: Path
) -> None:
    """The real ingest with the server's settings; a device's forged window for another device never arrives."""
    creds = material.credentials(SERVER)
    config = IngestConfig(
        fleet=FLEET,
        lake_root=tmp_path / "lake",
        quarantine_root=tmp_path / "quarantine",
        sensor=SensorSettings(),
        mqtt=creds.mqtt_settings(broker.address.url),
        flush_interval_s=0.2,
    )
    ensure_subscription(broker.address, config)
    device = login(broker.address, material.credentials("node-0000"))
    for seq in range(5):
        device.publish(f"{P}/node-0000/vibration", encode(window("node-0000", seq)))
    device.publish(f"{P}/node-0001/vibration", encode(window("node-0001", 99)))
    device.close()

    stats = run_ingest(broker.address, config, seconds=20, idle_timeout_s=0.5)

    assert (stats.received, stats.accepted, stats.rejected) == (5, 5, 0)
    lake = read_windows(tmp_path / "lake", fleet=FLEET)
    assert sorted(zip(lake.device.tolist(), lake.seq.tolist(), strict=True)) == [("node-0000", s) for s in range(5)]


@pytest.mark.mqtt
def test_tls_needs_the_right_ca_and_host_name(
    broker: MosquittoBroker, material: SecureBrokerMaterial, tmp_path: Path
) -> None:
    creds = material.credentials("node-0000")
    by_name = BrokerAddress("localhost", broker.port, tls=True)  # the certificate names localhost too
    login(by_name, creds).close()
    tls12 = ssl.create_default_context(cafile=str(creds.ca_file))
    tls12.maximum_version = ssl.TLSVersion.TLSv1_2  # what mbedTLS-class MCU stacks speak
    client = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, protocol=mqtt.MQTTv311)
    client.username_pw_set(creds.username, creds.password)
    client.tls_set_context(tls12)
    connect(client, broker.address, timeout_s=WAIT_S)
    assert client.socket().version() == "TLSv1.2"  # type: ignore[union-attr]
    client.disconnect()
    client.loop_stop()
    generate_ca("some other CA").save(tmp_path / "other.crt", tmp_path / "other.key")
    for ca_file in (None, tmp_path / "other.crt"):  # system CAs only; a CA that did not sign the broker
        client = make_client(broker.address, username=creds.username, password=creds.password, ca_file=ca_file)
        with pytest.raises(BrokerError, match=r"TLS handshake .* failed: CERTIFICATE_VERIFY_FAILED"):
            connect(client, broker.address, timeout_s=WAIT_S)
    plain = BrokerAddress("127.0.0.1", broker.port, tls=False)
    with pytest.raises(BrokerError, match="closed the connection before accepting it"):
        connect(make_client(plain, username=creds.username, password=creds.password), plain, timeout_s=2)

    elsewhere = init_material(tmp_path / "elsewhere", FleetAccess(FLEET, DEVICES), hosts=["broker.example"])
    other = start(elsewhere)
    try:
        with pytest.raises(BrokerError, match="IP address mismatch"):
            login(other.address, elsewhere.credentials(SERVER))
    finally:
        other.stop()


@pytest.mark.mqtt
def test_client_certificate_login_uses_the_cn_as_user_name(material: SecureBrokerMaterial, tmp_path: Path) -> None:
    certs = start(material, require_certificate=True)
    try:
        server = login(certs.address, material.credentials(SERVER), certificate=True)
        server.subscribe(f"{P}/+/vibration")
        device = login(certs.address, material.credentials("node-0001"), certificate=True)
        device.publish(f"{P}/node-0000/vibration", b"forged")
        marker = (f"{P}/node-0001/vibration", b"mine")
        device.publish(*marker)
        assert server.until(marker) == {marker}  # the ACL's %u is the certificate's CN

        creds = material.credentials("node-0000")
        with pytest.raises(BrokerError, match="closed the connection before accepting it"):
            login(certs.address, creds)  # a password alone is not enough here
        foreign = generate_ca("foreign CA")
        issue_certificate(foreign, "node-0000").save(tmp_path / "f.crt", tmp_path / "f.key")
        forged = ClientCredentials("node-0000", "", "", material.ca_file, tmp_path / "f.crt", tmp_path / "f.key")
        with pytest.raises(BrokerError, match="closed the connection before accepting it"):
            login(certs.address, forged, certificate=True)
        device.close()
        server.close()
    finally:
        certs.stop()


@pytest.mark.mqtt
def test_rotation_and_removal_take_effect(tmp_path: Path) -> None:
    """SIGHUP applies new passwords (dropping old sessions) and removals; a restart applies the CRL."""
    material = make_material(tmp_path / "material")
    broker = start(material)
    try:
        old = keep(material.credentials("node-0000"), tmp_path / "old")
        session = login(broker.address, old)
        dropped = threading.Event()
        session.client.on_disconnect = lambda *_args: dropped.set()
        material = rotate_credentials(material, "node-0000")
        removed = keep(material.credentials("node-0001"), tmp_path / "removed")
        material = remove_device(material, "node-0001")
        broker.reload()

        assert dropped.wait(WAIT_S), "the session logged in with the old password survived the reload"
        session.client.loop_stop()
        with pytest.raises(BrokerError, match="Not authorized"):
            login(broker.address, old)
        with pytest.raises(BrokerError, match="Not authorized"):
            login(broker.address, removed)
        login(broker.address, material.credentials("node-0000")).close()
    finally:
        broker.stop()
    assert not (tmp_path / "material" / "devices" / "node-0001").exists()
    old_server_cert = material.server_cert_file.read_bytes()
    renew_server_certificate(material)
    assert material.server_cert_file.read_bytes() != old_server_cert

    # Restarted: the CRL and the renewed broker certificate (same CA, so devices keep trusting it) apply.
    certs = start(SecureBrokerMaterial.load(tmp_path / "material"), require_certificate=True)
    try:
        for revoked in (removed, old):  # old: node-0000's certificate before the rotation
            with pytest.raises(BrokerError, match="closed the connection before accepting it"):
                login(certs.address, revoked, certificate=True)
        login(certs.address, material.credentials("node-0000"), certificate=True).close()
        login(certs.address, material.credentials("node-0002"), certificate=True).close()
    finally:
        certs.stop()


# --- the CLI and the deployment configuration -------------------------------------------------


@pytest.mark.mqtt
def test_cli_provisions_devices_for_the_generated_broker_config(tmp_path: Path, settings: Settings) -> None:
    """`security init` output runs a real Mosquitto from its own mosquitto.conf; a device connects from its file."""
    _private, public = generate_keypair()
    KeyRing({"ota-1": public}).save(tmp_path / "keyring.json")
    out = tmp_path / "material"
    port, cert_port = free_port(), free_port()
    args = ["init", "--out", str(out), "--fleet", FLEET, "--count", "2", "--group", "line-1", "--devices", "gw-7:yard"]
    args += [
        "--client-certs",
        "--port",
        str(port),
        "--cert-port",
        str(cert_port),
        "--keyring",
        str(tmp_path / "keyring.json"),
    ]
    runner = CliRunner()
    result = runner.invoke(security_app, args)
    assert result.exit_code == 0, result.output
    again = runner.invoke(security_app, args)
    assert isinstance(again.exception, SecurityError)
    added = runner.invoke(security_app, ["add-device", str(out), "node-0002", "--group", "line-2"])
    assert added.exit_code == 0, added.output
    installed = runner.invoke(security_app, ["mosquitto-conf", str(out), "--install-dir", "/etc/mosquitto/t"])
    assert "password_file /etc/mosquitto/t/passwd\n" in installed.stdout
    assert "keyfile /etc/mosquitto/t/server.key\n" in installed.stdout
    shown = runner.invoke(security_app, ["show", str(out)])
    assert all(user in shown.output for user in ("tinymlops-server", "gw-7", "node-0000", "node-0001", "node-0002"))

    provision = json.loads((out / "devices" / "node-0001" / "provision.json").read_text())
    assert provision["group"] == "line-1"
    assert provision["mqtt"]["url"] == f"mqtts://localhost:{port}"
    assert provision["model_signing_keyring"] == json.loads((tmp_path / "keyring.json").read_text())
    assert f"{P}/groups/line-1/ota/manifest" in provision["topics"]["read"]
    ca_pem = tmp_path / "ca-from-provision.pem"
    ca_pem.write_text(provision["tls"]["ca_certificate"])
    (tmp_path / "cert.pem").write_text(provision["tls"]["client_certificate"])
    (tmp_path / "key.pem").write_text(provision["tls"]["client_key"])

    password = provision["mqtt"]["password"]
    _private, rotated_key = generate_keypair()
    KeyRing({"ota-1": public, "ota-2": rotated_key}, revoked=["ota-1"]).save(tmp_path / "keyring2.json")
    assert runner.invoke(security_app, ["keyring", str(out), str(tmp_path / "keyring2.json")]).exit_code == 0
    reprovisioned = json.loads((out / "devices" / "node-0001" / "provision.json").read_text())
    assert reprovisioned["model_signing_keyring"] == json.loads((tmp_path / "keyring2.json").read_text())
    assert reprovisioned["mqtt"]["password"] == password

    conf = tmp_path / "run.conf"
    extra = "user root\n" if os.geteuid() == 0 else ""  # see MosquittoBroker.secure
    conf.write_text((out / "broker" / "mosquitto.conf").read_text() + "persistence false\n" + extra)
    binary = MosquittoBroker.executable()
    assert binary is not None, "mosquitto is not installed"
    process = subprocess.Popen([binary, "-c", str(conf)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_for_port("127.0.0.1", port)
        wait_for_port("127.0.0.1", cert_port)
        by_password = ClientCredentials("node-0001", provision["mqtt"]["password"], "node-0001", ca_pem)
        login(BrokerAddress("localhost", port, tls=True), by_password).close()
        by_cert = ClientCredentials("node-0001", "", "node-0001", ca_pem, tmp_path / "cert.pem", tmp_path / "key.pem")
        login(BrokerAddress("localhost", cert_port, tls=True), by_cert, certificate=True).close()
        newcomer = SecureBrokerMaterial.load(out).credentials("node-0002")
        login(BrokerAddress("localhost", port, tls=True), newcomer).close()
    finally:
        process.terminate()
        process.wait(5)
