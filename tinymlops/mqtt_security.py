"""The MQTT ``secure`` profile: per-user passwords, a per-device ACL and TLS material for Mosquitto.

The embedded default stays anonymous on loopback; this module writes what a real deployment
needs instead (``docs/SECURITY.md``). :func:`init_material` lays out one directory::

    inventory.json          fleet, topic root, devices and groups, hosts, ports (no secrets)
    ca/ca.crt, ca/ca.key    the CA; its key is needed only to issue certificates
    broker/                 server.crt, server.key, passwd, acl, crl.pem, mosquitto.conf
    server/<user>/          credentials.json, server.env (TINYMLOPS_MQTT__*), client.crt/.key
    devices/<id>/           provision.json (id, password, CA, topics, key ring), client.crt/.key

Authorization rests on the MQTT user name only: it is authenticated (password, or the client
certificate's CN with ``use_identity_as_username``), while Mosquitto does not authenticate
client ids. Passwords are random 192-bit tokens, so Mosquitto's default PBKDF2 cost (101
iterations) suffices: stretching protects guessable passwords, a higher cost only slows reconnects.
"""

from __future__ import annotations

import base64
import datetime as dt
import hashlib
import ipaddress
import json
import logging
import os
import re
import secrets
import shutil
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from pydantic import SecretStr

from tinymlops.contracts.topics import (
    DEVICE_PUBLISHES,
    DEVICE_READS,
    DEVICE_SUFFIXES,
    GROUP_READS,
    GROUPS_LEVEL,
    NAME_PATTERN,
    FleetTopics,
)
from tinymlops.errors import TinyMLOpsError
from tinymlops.files import write_file_atomic
from tinymlops.settings import MqttSettings

log = logging.getLogger(__name__)

SERVER_USER = "tinymlops-server"
_HOST_PATTERN = re.compile(r"^[A-Za-z0-9]([A-Za-z0-9.-]{0,251}[A-Za-z0-9])?$")
PBKDF2_ITERATIONS = 101
SALT_BYTES = 12
PROVISION_FORMAT = "tinymlops-device-provisioning/1"
INVENTORY_FILE = "inventory.json"
KEYRING_FILE = "ota_keyring.json"
CA_DAYS = 3650
LEAF_DAYS = 825


class SecurityError(TinyMLOpsError):
    """Credential, ACL or TLS material is invalid or missing."""


def check_name(name: str, what: str) -> str:
    """Return ``name`` if it can be a user name and one topic level (1-64 of ``A-Z a-z 0-9 _ -``).

    Raises:
        SecurityError: It cannot.
    """
    if not NAME_PATTERN.match(name):
        raise SecurityError(f"invalid {what} {name!r}: expected 1-64 characters of A-Z a-z 0-9 _ -")
    return name


# --- topics and the ACL ---------------------------------------------------------------------


@dataclass(frozen=True)
class TopicRules:
    """Topic suffixes the ACL grants, below ``<root>/<fleet>/<device>/`` and ``<root>/<fleet>/<groups>/<group>/``.

    Taken from ``tinymlops.contracts.topics``, where every topic of the fleet is named once.
    """

    device_publish: tuple[str, ...] = tuple(DEVICE_SUFFIXES[kind] for kind in DEVICE_PUBLISHES)
    device_read: tuple[str, ...] = tuple(DEVICE_SUFFIXES[kind] for kind in DEVICE_READS)
    group_read: tuple[str, ...] = tuple(DEVICE_SUFFIXES[kind] for kind in GROUP_READS)
    groups_level: str = GROUPS_LEVEL


@dataclass(frozen=True)
class DeviceEntry:
    """One device of the fleet: its id (the MQTT user name) and optional group."""

    device_id: str
    group: str | None = None

    @classmethod
    def parse(cls, spec: str, default_group: str | None = None) -> DeviceEntry:
        """Parse ``id`` or ``id:group``."""
        device_id, _, group = spec.strip().partition(":")
        return cls(device_id, group or default_group)


@dataclass(frozen=True)
class FleetAccess:
    """Who may do what on a fleet's topics; renders the Mosquitto ACL file.

    Raises:
        SecurityError: A name is invalid, repeated, or a device id collides with a server user or
            the groups topic level.
    """

    fleet: str
    devices: tuple[DeviceEntry, ...] = ()
    server_users: tuple[str, ...] = (SERVER_USER,)
    topic_root: str = "tinymlops"
    rules: TopicRules = field(default_factory=TopicRules)

    def __post_init__(self) -> None:
        check_name(self.fleet, "fleet")
        if not self.topic_root or any(c in self.topic_root for c in "+#") or self.topic_root.startswith("$"):
            raise SecurityError(f"invalid topic root {self.topic_root!r}: no wildcards, not starting with $")
        if not self.server_users:
            raise SecurityError("at least one server user is needed for the server-side flows")
        names = [check_name(u, "server user") for u in self.server_users]
        for device in self.devices:
            names.append(check_name(device.device_id, "device id"))
            if device.group is not None:
                check_name(device.group, "group")
            if device.device_id == self.rules.groups_level:
                raise SecurityError(f"device id {device.device_id!r} is reserved for group topics")
        repeated = sorted({n for n in names if names.count(n) > 1})
        if repeated:
            raise SecurityError(f"user names must be unique; repeated: {', '.join(repeated)}")

    @property
    def prefix(self) -> str:
        """``<root>/<fleet>``, the first two levels of every topic of the fleet."""
        return FleetTopics(self.fleet, self.topic_root).prefix

    def device(self, device_id: str) -> DeviceEntry:
        """The entry of one device.

        Raises:
            SecurityError: No such device.
        """
        for device in self.devices:
            if device.device_id == device_id:
                return device
        raise SecurityError(f"device {device_id!r} is not in fleet {self.fleet!r}")

    def group_topic(self, group: str, suffix: str) -> str:
        """A topic of a group, e.g. its manifest topic."""
        return f"{self.prefix}/{self.rules.groups_level}/{group}/{suffix}"

    def device_topics(self, device_id: str) -> dict[str, list[str]]:
        """Topics one device may publish to and read from (its own, and its group's)."""
        device = self.device(device_id)
        own = f"{self.prefix}/{device_id}"
        read = [f"{own}/{s}" for s in self.rules.device_read]
        if device.group is not None:
            read += [self.group_topic(device.group, s) for s in self.rules.group_read]
        return {"publish": [f"{own}/{s}" for s in self.rules.device_publish], "read": read}

    def acl_text(self) -> str:
        """The Mosquitto ACL file.

        ``pattern`` lines hold for every authenticated client with ``%u`` its user name, so each
        device gets exactly its own topics; server users read and write the whole fleet; group
        membership, which no pattern can express, is listed per device.
        """
        lines = [
            f"# tinymlops ACL of fleet {self.fleet!r} (generated; edit the inventory, not this file).",
            "# Mosquitto reads it at start and on SIGHUP. %u is the authenticated user name: the device id,",
            "# or the client certificate's CN on a use_identity_as_username listener.",
            "",
            "# Each device publishes only under its own topics ...",
            *(f"pattern write {self.prefix}/%u/{s}" for s in self.rules.device_publish),
            "# ... and reads only its own model topics.",
            *(f"pattern read {self.prefix}/%u/{s}" for s in self.rules.device_read),
        ]
        for user in self.server_users:
            lines += ["", "# Server-side flows: all telemetry in, all model topics out.", f"user {user}"]
            lines.append(f"topic readwrite {self.prefix}/#")
        grouped = [d for d in self.devices if d.group is not None]
        if grouped:
            lines += ["", "# Group membership: a device also reads its group's model topics."]
        for device in grouped:
            lines.append(f"user {device.device_id}")
            lines += [f"topic read {self.group_topic(device.group or '', s)}" for s in self.rules.group_read]
        return "\n".join(lines) + "\n"


# --- passwords ------------------------------------------------------------------------------


def new_password() -> str:
    """A random 192-bit password, URL-safe (32 characters)."""
    return secrets.token_urlsafe(24)


def hash_password(password: str, *, salt: bytes | None = None, iterations: int = PBKDF2_ITERATIONS) -> str:
    """Mosquitto 2's ``$7$`` hash (PBKDF2-HMAC-SHA512), the format ``mosquitto_passwd`` writes."""
    salt = salt if salt is not None else secrets.token_bytes(SALT_BYTES)
    digest = hashlib.pbkdf2_hmac("sha512", password.encode(), salt, iterations, 64)
    return f"$7${iterations}${base64.b64encode(salt).decode()}${base64.b64encode(digest).decode()}"


def read_password_file(path: Path) -> dict[str, str]:
    """User name -> hash of a Mosquitto password file.

    Raises:
        SecurityError: The file cannot be read or a line is not ``user:hash``.
    """
    try:
        text = path.read_text()
    except OSError as exc:
        raise SecurityError(f"cannot read password file {path}: {exc.strerror or exc}") from None
    entries: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip() or line.startswith("#"):
            continue
        user, sep, hashed = line.partition(":")
        if not sep or not hashed.startswith("$"):
            raise SecurityError(f"{path} line {number} is not user:hash")
        entries[user] = hashed
    return entries


def password_file_text(hashes: Mapping[str, str]) -> str:
    """A Mosquitto password file from user name -> hash."""
    return "".join(f"{user}:{hashed}\n" for user, hashed in hashes.items())


# --- TLS ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CertifiedKey:
    """A certificate and its private key (EC P-256, which mbedTLS-class TLS stacks support)."""

    certificate: x509.Certificate
    key: ec.EllipticCurvePrivateKey

    @property
    def cert_pem(self) -> bytes:
        """The certificate, PEM."""
        return self.certificate.public_bytes(serialization.Encoding.PEM)

    @property
    def key_pem(self) -> bytes:
        """The private key, unencrypted PKCS#8 PEM."""
        return self.key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )

    def save(self, cert_path: Path, key_path: Path) -> None:
        """Write the certificate (0644) and the key (0600)."""
        write_file_atomic(cert_path, self.cert_pem, 0o644)
        write_file_atomic(key_path, self.key_pem, 0o600)

    @classmethod
    def load(cls, cert_path: Path, key_path: Path) -> CertifiedKey:
        """Read what :meth:`save` wrote.

        Raises:
            SecurityError: A file is missing or not an EC certificate and key.
        """
        try:
            certificate = x509.load_pem_x509_certificate(cert_path.read_bytes())
            key = serialization.load_pem_private_key(key_path.read_bytes(), password=None)
        except (OSError, ValueError) as exc:
            raise SecurityError(f"cannot load {cert_path} with {key_path}: {exc}") from None
        if not isinstance(key, ec.EllipticCurvePrivateKey):
            raise SecurityError(f"{key_path} holds a {type(key).__name__}, expected an EC private key")
        return cls(certificate, key)


def _name(common_name: str) -> x509.Name:
    return x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "tinymlops"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )


def _san(host: str) -> x509.GeneralName:
    try:
        return x509.IPAddress(ipaddress.ip_address(host))
    except ValueError:
        if not _HOST_PATTERN.match(host):
            raise SecurityError(f"invalid host name {host!r} for the server certificate") from None
        return x509.DNSName(host)


def _key_usage(*, ca: bool) -> x509.KeyUsage:
    """A CA signs certificates and CRLs; a leaf signs handshakes (ECDHE-ECDSA needs nothing else)."""
    return x509.KeyUsage(
        digital_signature=not ca,
        content_commitment=False,
        key_encipherment=False,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


def generate_ca(common_name: str = "tinymlops MQTT CA", *, days: int = CA_DAYS) -> CertifiedKey:
    """A self-signed CA that may sign leaf certificates only (path length 0)."""
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(_name(common_name))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(now + dt.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(_key_usage(ca=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .sign(key, hashes.SHA256())
    )
    return CertifiedKey(certificate, key)


def issue_certificate(
    ca: CertifiedKey, common_name: str, *, hosts: Sequence[str] = (), days: int = LEAF_DAYS
) -> CertifiedKey:
    """Issue a leaf certificate signed by ``ca``: a server certificate for ``hosts`` if given, else a client one.

    Raises:
        SecurityError: A host is neither an IP address nor a DNS name.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    now = dt.datetime.now(dt.UTC)
    usage = ExtendedKeyUsageOID.SERVER_AUTH if hosts else ExtendedKeyUsageOID.CLIENT_AUTH
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(common_name))
        .issuer_name(ca.certificate.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(minutes=5))
        .not_valid_after(min(now + dt.timedelta(days=days), ca.certificate.not_valid_after_utc))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(_key_usage(ca=False), critical=True)
        .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False)
    )
    if hosts:
        builder = builder.add_extension(x509.SubjectAlternativeName([_san(h) for h in hosts]), critical=False)
    return CertifiedKey(builder.sign(ca.key, hashes.SHA256()), key)


def certificate_revocation_list(ca: CertifiedKey, serials: Iterable[int], *, days: int = 365) -> bytes:
    """A CRL (PEM) signed by ``ca`` that revokes the certificates with these serial numbers."""
    now = dt.datetime.now(dt.UTC)
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.certificate.subject)
        .last_update(now - dt.timedelta(minutes=5))
        .next_update(now + dt.timedelta(days=days))
        .add_extension(x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key()), critical=False)
        .add_extension(x509.CRLNumber(int(now.timestamp())), critical=False)
    )
    for serial in sorted(set(serials)):
        builder = builder.add_revoked_certificate(
            x509.RevokedCertificateBuilder().serial_number(serial).revocation_date(now).build()
        )
    return builder.sign(ca.key, hashes.SHA256()).public_bytes(serialization.Encoding.PEM)


# --- files ----------------------------------------------------------------------------------


def _write_json(path: Path, content: Mapping[str, Any], mode: int) -> None:
    write_file_atomic(path, (json.dumps(content, indent=2) + "\n").encode(), mode)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        content = json.loads(path.read_text())
    except OSError as exc:
        raise SecurityError(f"cannot read {path}: {exc.strerror or exc}") from None
    except json.JSONDecodeError as exc:
        raise SecurityError(f"{path} is not JSON: {exc}") from None
    if not isinstance(content, dict):
        raise SecurityError(f"{path} holds a JSON {type(content).__name__}, expected an object")
    return content


def parse_keyring(text: str) -> dict[str, Any]:
    """Parse a model-signing key ring (``firmware.signing.KeyRing`` JSON) far enough to embed it.

    Raises:
        SecurityError: Not a JSON object with a ``keys`` object.
    """
    try:
        content = json.loads(text)
    except json.JSONDecodeError as exc:
        raise SecurityError(f"model-signing key ring is not JSON: {exc}") from None
    if not isinstance(content, dict) or not isinstance(content.get("keys"), dict):
        raise SecurityError('model-signing key ring must be a JSON object with a "keys" object')
    return content


# --- the material directory -----------------------------------------------------------------


@dataclass(frozen=True)
class ClientCredentials:
    """What one MQTT client (device or server flow) needs to connect in the secure profile."""

    username: str
    password: str
    client_id: str
    ca_file: Path
    client_cert: Path | None = None
    client_key: Path | None = None

    def mqtt_settings(self, url: str, topic_root: str = "tinymlops") -> MqttSettings:
        """Settings for what takes :class:`MqttSettings` (ingest, OTA publisher, simulated devices): password login."""
        return MqttSettings(
            url=url,
            username=self.username,
            password=SecretStr(self.password),
            ca_file=self.ca_file,
            client_id=self.client_id,
            topic_root=topic_root,
        )


@dataclass(frozen=True)
class SecureBrokerMaterial:
    """A material directory written by :func:`init_material`: paths, inventory and broker configuration.

    Attributes:
        directory: Root of the material.
        access: Fleet, devices, groups and server users (the ACL's source).
        hosts: Names and addresses in the broker's certificate; the first is the devices' broker host.
        port: The TLS listener with user name and password.
        cert_port: The TLS listener with client certificates, or None when none were issued.
        revoked_serials: Serial numbers of withdrawn client certificates (listed in the CRL).
    """

    directory: Path
    access: FleetAccess
    hosts: tuple[str, ...] = ("localhost", "127.0.0.1")
    port: int = 8883
    cert_port: int | None = None
    revoked_serials: tuple[int, ...] = ()

    @property
    def ca_file(self) -> Path:
        """The CA certificate every client trusts."""
        return self.directory / "ca" / "ca.crt"

    @property
    def ca_key_file(self) -> Path:
        """The CA's private key (keep offline in production)."""
        return self.directory / "ca" / "ca.key"

    @property
    def server_cert_file(self) -> Path:
        """The broker's certificate."""
        return self.directory / "broker" / "server.crt"

    @property
    def server_key_file(self) -> Path:
        """The broker's private key."""
        return self.directory / "broker" / "server.key"

    @property
    def password_file(self) -> Path:
        """Mosquitto ``password_file``."""
        return self.directory / "broker" / "passwd"

    @property
    def acl_file(self) -> Path:
        """Mosquitto ``acl_file``."""
        return self.directory / "broker" / "acl"

    @property
    def crl_file(self) -> Path:
        """Mosquitto ``crlfile``: revoked client certificates."""
        return self.directory / "broker" / "crl.pem"

    @property
    def mosquitto_conf(self) -> Path:
        """The Mosquitto configuration snippet for a deployment."""
        return self.directory / "broker" / "mosquitto.conf"

    @property
    def keyring_file(self) -> Path:
        """The model-signing key ring copied into every provisioning file, if one was given."""
        return self.directory / KEYRING_FILE

    @property
    def client_certs(self) -> bool:
        """Whether client certificates are issued (and the certificate listener configured)."""
        return self.cert_port is not None

    def user_dir(self, user: str) -> Path:
        """The directory of one device's or server user's files."""
        if user in self.access.server_users:
            return self.directory / "server" / user
        return self.directory / "devices" / self.access.device(user).device_id

    def provisioning_file(self, device_id: str) -> Path:
        """The provisioning file of one device."""
        return self.user_dir(device_id) / "provision.json"

    def url(self, port: int | None = None) -> str:
        """The broker's mqtts URL on its first host name."""
        return f"mqtts://{self.hosts[0]}:{port or self.port}"

    def credentials(self, user: str) -> ClientCredentials:
        """Read the credentials of one device or server user.

        Raises:
            SecurityError: No such user, or its files are missing.
        """
        folder = self.user_dir(user)
        server = user in self.access.server_users
        source = folder / ("credentials.json" if server else "provision.json")
        content = _read_json(source)
        fields = content if server else content.get("mqtt", {})
        password, client_id = fields.get("password"), fields.get("client_id")
        if not isinstance(password, str) or not isinstance(client_id, str):
            raise SecurityError(f"{source} lacks the password or client id")
        cert, key = folder / "client.crt", folder / "client.key"
        if self.client_certs and cert.exists():
            return ClientCredentials(user, password, client_id, self.ca_file, cert, key)
        return ClientCredentials(user, password, client_id, self.ca_file)

    def _path(self, path: Path, install_dir: Path | None) -> Path:
        """Where the broker finds one of its files: here, or under the directory it was installed to."""
        return install_dir / path.name if install_dir is not None else path.resolve()

    def auth_config(self, install_dir: Path | None = None) -> str:
        """Mosquitto's global options of the profile: no anonymous clients, the password file, the ACL."""
        return (
            "allow_anonymous false\n"
            f"password_file {self._path(self.password_file, install_dir)}\n"
            f"acl_file {self._path(self.acl_file, install_dir)}\n"
        )

    def tls_config(self, *, require_certificate: bool = False, install_dir: Path | None = None) -> str:
        """Options to follow one ``listener`` line: the broker's certificate and, if asked, client certificates.

        Raises:
            SecurityError: Client certificates asked for, but none were issued.
        """
        lines = [
            f"cafile {self._path(self.ca_file, install_dir)}",
            f"certfile {self._path(self.server_cert_file, install_dir)}",
            f"keyfile {self._path(self.server_key_file, install_dir)}",
            "tls_version tlsv1.2",
        ]
        if require_certificate:
            if not self.client_certs:
                raise SecurityError(f"no client certificates were issued in {self.directory}")
            # The certificate's CN becomes the user name: the ACL's %u patterns apply unchanged.
            lines += ["require_certificate true", "use_identity_as_username true"]
            if self.crl_file.exists():
                lines.append(f"crlfile {self._path(self.crl_file, install_dir)}")
        return "\n".join(lines) + "\n"

    def broker_files(self) -> list[Path]:
        """The files the broker reads, to install next to each other (see ``install_dir``)."""
        files = [self.password_file, self.acl_file, self.ca_file, self.server_cert_file, self.server_key_file]
        return files + ([self.crl_file] if self.crl_file.exists() else [])

    def listener_config(self, *, tls: bool = True, require_certificate: bool = False) -> str:
        """The configuration of a one-listener broker, to follow its ``listener`` line.

        Raises:
            SecurityError: Client certificates asked for without TLS, or none were issued.
        """
        if require_certificate and not tls:
            raise SecurityError("client-certificate authentication needs TLS")
        return self.auth_config() + (self.tls_config(require_certificate=require_certificate) if tls else "")

    def mosquitto_conf_text(self, install_dir: Path | None = None) -> str:
        """A Mosquitto configuration for a deployment: TLS listeners with passwords and, if issued, certificates.

        Args:
            install_dir: Directory the :meth:`broker_files` are copied to on the broker's host;
                None names them where they are.
        """
        text = (
            f"# tinymlops secure profile of fleet {self.access.fleet!r} (generated by `tinymlops security`).\n"
            "# Include it from /etc/mosquitto/conf.d/; the broker's user (mosquitto) must be able to read the\n"
            "# files it names. SIGHUP reloads the password file and the ACL; TLS changes need a restart.\n"
            "per_listener_settings false\n"
            f"{self.auth_config(install_dir)}"
            "\n# Devices and server flows: user name and password over TLS.\n"
            f"listener {self.port}\n"
            f"{self.tls_config(install_dir=install_dir)}"
        )
        if self.cert_port is not None:
            text += (
                "\n# Devices with a client certificate: its CN is the user name, no password.\n"
                f"listener {self.cert_port}\n"
                f"{self.tls_config(require_certificate=True, install_dir=install_dir)}"
            )
        return text

    def inventory(self) -> dict[str, Any]:
        """The non-secret description of this material, as stored in ``inventory.json``."""
        return {
            "fleet": self.access.fleet,
            "topic_root": self.access.topic_root,
            "server_users": list(self.access.server_users),
            "devices": [{"id": d.device_id, "group": d.group} for d in self.access.devices],
            "hosts": list(self.hosts),
            "port": self.port,
            "cert_port": self.cert_port,
            # Strings: serials are 159-bit numbers, beyond what many JSON readers hold exactly.
            "revoked_serials": [str(s) for s in self.revoked_serials],
        }

    @classmethod
    def load(cls, directory: Path) -> SecureBrokerMaterial:
        """Read a material directory.

        Raises:
            SecurityError: It holds no valid ``inventory.json``.
        """
        content = _read_json(directory / INVENTORY_FILE)
        try:
            access = FleetAccess(
                fleet=content["fleet"],
                devices=tuple(DeviceEntry(d["id"], d.get("group")) for d in content["devices"]),
                server_users=tuple(content["server_users"]),
                topic_root=content["topic_root"],
            )
            revoked = tuple(int(s) for s in content.get("revoked_serials", []))
            return cls(
                directory, access, tuple(content["hosts"]), int(content["port"]), content.get("cert_port"), revoked
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise SecurityError(f"{directory / INVENTORY_FILE} is incomplete: missing or invalid {exc}") from None


def _keyring(material: SecureBrokerMaterial) -> dict[str, Any] | None:
    return parse_keyring(material.keyring_file.read_text()) if material.keyring_file.exists() else None


def _load_ca(material: SecureBrokerMaterial) -> CertifiedKey:
    return CertifiedKey.load(material.ca_file, material.ca_key_file)


def _issue_client_cert(material: SecureBrokerMaterial, ca: CertifiedKey, user: str) -> None:
    folder = material.user_dir(user)
    issue_certificate(ca, user).save(folder / "client.crt", folder / "client.key")


def _write_device(material: SecureBrokerMaterial, device_id: str, password: str) -> None:
    """Write a device's provisioning file: everything to flash into it, secrets included (0600)."""
    access = material.access
    device = access.device(device_id)
    folder = material.user_dir(device_id)
    cert, key = folder / "client.crt", folder / "client.key"
    with_cert = material.client_certs and cert.exists()
    content = {
        "format": PROVISION_FORMAT,
        "device_id": device_id,
        "fleet": access.fleet,
        "group": device.group,
        "topic_root": access.topic_root,
        "mqtt": {
            "url": material.url(),
            "certificate_url": material.url(material.cert_port) if material.cert_port else None,
            "client_id": device_id,
            "username": device_id,
            "password": password,
        },
        "tls": {
            "ca_certificate": material.ca_file.read_text(),
            "client_certificate": cert.read_text() if with_cert else None,
            "client_key": key.read_text() if with_cert else None,
        },
        "topics": access.device_topics(device_id),
        "model_signing_keyring": _keyring(material),
    }
    _write_json(material.provisioning_file(device_id), content, 0o600)


def _write_server_user(material: SecureBrokerMaterial, user: str, password: str, client_id: str) -> None:
    """Write a server user's credentials, and ``server.env`` for the flows' settings (0600)."""
    folder = material.user_dir(user)
    env = {
        "TINYMLOPS_MQTT__URL": material.url(),
        "TINYMLOPS_MQTT__USERNAME": user,
        "TINYMLOPS_MQTT__PASSWORD": password,
        "TINYMLOPS_MQTT__CA_FILE": str(material.ca_file.resolve()),
        "TINYMLOPS_MQTT__CLIENT_ID": client_id,
        "TINYMLOPS_MQTT__TOPIC_ROOT": material.access.topic_root,
        "TINYMLOPS_FLEET": material.access.fleet,
    }
    write_file_atomic(folder / "server.env", "".join(f"{k}={v}\n" for k, v in env.items()).encode(), 0o600)
    credentials = {"username": user, "password": password, "client_id": client_id, "url": material.url()}
    _write_json(folder / "credentials.json", credentials, 0o600)


def new_ingest_client_id() -> str:
    """An unguessable client id for the ingest's persistent session.

    Mosquitto does not tie client ids to users: a device connecting with the ingest's id would
    take its session over, and the ACL would then drop the queued windows. Kept secret, the id
    cannot be guessed.
    """
    return f"tinymlops-ingest-{secrets.token_hex(8)}"


def _write_broker_files(material: SecureBrokerMaterial, hashes: Mapping[str, str]) -> None:
    write_file_atomic(material.password_file, password_file_text(hashes).encode(), 0o600)
    write_file_atomic(material.acl_file, material.access.acl_text().encode(), 0o644)
    write_file_atomic(material.mosquitto_conf, material.mosquitto_conf_text().encode(), 0o644)
    _write_json(material.directory / INVENTORY_FILE, material.inventory(), 0o644)


def init_material(
    directory: Path,
    access: FleetAccess,
    *,
    hosts: Sequence[str] = ("localhost", "127.0.0.1"),
    port: int = 8883,
    cert_port: int | None = None,
    keyring_json: str | None = None,
    force: bool = False,
) -> SecureBrokerMaterial:
    """Generate the CA, the broker's certificate, every user's password (and client certificate), the ACL.

    Args:
        directory: Where to write; created if missing.
        access: Fleet, devices, groups, server users.
        hosts: Host names and IP addresses the broker's certificate is valid for.
        port: Port of the TLS listener with passwords.
        cert_port: Port of the TLS listener with client certificates; None issues none.
        keyring_json: The model-signing key ring (``firmware.signing.KeyRing`` JSON) to provision.
        force: Overwrite existing material (every credential changes).

    Raises:
        SecurityError: Material exists already (without ``force``), or an argument is invalid.
    """
    if not hosts:
        raise SecurityError("the broker certificate needs at least one host name or address")
    if (directory / INVENTORY_FILE).exists() and not force:
        raise SecurityError(f"{directory} already holds secure-profile material; use --force to replace it")
    material = SecureBrokerMaterial(directory, access, tuple(hosts), port, cert_port)
    for owned in ("ca", "broker", "server", "devices"):  # only what this module writes, never the whole directory
        shutil.rmtree(directory / owned, ignore_errors=True)
    material.keyring_file.unlink(missing_ok=True)
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)  # the CA key and every password live below
    if keyring_json is not None:
        write_file_atomic(
            material.keyring_file, (json.dumps(parse_keyring(keyring_json), indent=2) + "\n").encode(), 0o644
        )
    ca = generate_ca(f"tinymlops MQTT CA {access.fleet}")
    ca.save(material.ca_file, material.ca_key_file)
    issue_certificate(ca, hosts[0], hosts=hosts).save(material.server_cert_file, material.server_key_file)
    hashes: dict[str, str] = {}
    for user in access.server_users:
        password = new_password()
        hashes[user] = hash_password(password)
        if material.client_certs:
            _issue_client_cert(material, ca, user)
        _write_server_user(material, user, password, new_ingest_client_id())
    for device in access.devices:
        password = new_password()
        hashes[device.device_id] = hash_password(password)
        if material.client_certs:
            _issue_client_cert(material, ca, device.device_id)
        _write_device(material, device.device_id, password)
    _write_broker_files(material, hashes)
    log.info(
        "wrote secure-profile material for fleet %s (%d devices) to %s", access.fleet, len(access.devices), directory
    )
    return material


def add_device(material: SecureBrokerMaterial, device: DeviceEntry) -> SecureBrokerMaterial:
    """Provision one more device: password, client certificate if issued, ACL; returns the updated material.

    Raises:
        SecurityError: The id is taken or invalid.
    """
    updated = replace(material, access=replace(material.access, devices=(*material.access.devices, device)))
    hashes = read_password_file(material.password_file)
    password = new_password()
    hashes[device.device_id] = hash_password(password)
    if updated.client_certs:
        _issue_client_cert(updated, _load_ca(updated), device.device_id)
    _write_device(updated, device.device_id, password)
    _write_broker_files(updated, hashes)
    return updated


def _revoke_client_cert(material: SecureBrokerMaterial, user: str) -> SecureBrokerMaterial:
    """Add a user's client certificate, if it has one, to the CRL; returns the material that lists it."""
    cert = material.user_dir(user) / "client.crt"
    if not cert.exists():
        return material
    serial = x509.load_pem_x509_certificate(cert.read_bytes()).serial_number
    updated = replace(material, revoked_serials=(*material.revoked_serials, serial))
    write_file_atomic(
        material.crl_file, certificate_revocation_list(_load_ca(material), updated.revoked_serials), 0o644
    )
    return updated


def remove_device(material: SecureBrokerMaterial, device_id: str) -> SecureBrokerMaterial:
    """Withdraw a device: drop its password and ACL entries, revoke its client certificate, delete its files.

    Mosquitto applies the password file and ACL on SIGHUP, the CRL (certificate listener) on restart.

    Raises:
        SecurityError: No such device.
    """
    folder = material.user_dir(device_id)
    updated = _revoke_client_cert(material, device_id)
    remaining = tuple(d for d in material.access.devices if d.device_id != device_id)
    updated = replace(updated, access=replace(material.access, devices=remaining))
    hashes = read_password_file(material.password_file)
    hashes.pop(device_id, None)
    _write_broker_files(updated, hashes)
    shutil.rmtree(folder)
    return updated


def rotate_credentials(material: SecureBrokerMaterial, user: str) -> SecureBrokerMaterial:
    """Give a device or server user a new password and, if it has one, a new client certificate (the old one revoked).

    The user's files are rewritten; Mosquitto applies the password on SIGHUP (and disconnects
    clients logged in with the old one), the CRL on restart.

    Raises:
        SecurityError: No such user.
    """
    updated = _revoke_client_cert(material, user)
    if (material.user_dir(user) / "client.crt").exists():
        _issue_client_cert(updated, _load_ca(updated), user)
    hashes = read_password_file(material.password_file)
    password = new_password()
    hashes[user] = hash_password(password)
    if user in material.access.server_users:
        _write_server_user(updated, user, password, material.credentials(user).client_id)
    else:
        _write_device(updated, user, password)
    _write_broker_files(updated, hashes)
    return updated


def renew_server_certificate(material: SecureBrokerMaterial, hosts: Sequence[str] = ()) -> SecureBrokerMaterial:
    """Issue the broker a new certificate from the same CA, for ``hosts`` if given (devices keep trusting it).

    Mosquitto loads it on restart.
    """
    updated = replace(material, hosts=tuple(hosts)) if hosts else material
    ca = _load_ca(material)
    issue_certificate(ca, updated.hosts[0], hosts=updated.hosts).save(
        material.server_cert_file, material.server_key_file
    )
    _write_json(material.directory / INVENTORY_FILE, updated.inventory(), 0o644)
    return updated


def set_keyring(material: SecureBrokerMaterial, keyring_json: str) -> None:
    """Replace the model-signing key ring and rewrite every device's provisioning file with it."""
    write_file_atomic(material.keyring_file, (json.dumps(parse_keyring(keyring_json), indent=2) + "\n").encode(), 0o644)
    for device in material.access.devices:
        _write_device(material, device.device_id, material.credentials(device.device_id).password)
