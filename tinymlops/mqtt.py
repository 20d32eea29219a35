"""MQTT plumbing: broker URLs, paho clients and the embedded brokers (Mosquitto or amqtt).

Only MQTT 3.1.1 features are used, so the pure-Python amqtt broker can stand in for Mosquitto.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

import paho.mqtt.client as mqtt

from tinymlops.errors import BrokerError
from tinymlops.settings import DEFAULT_MAX_MESSAGE_BYTES, MqttSettings

if TYPE_CHECKING:
    from tinymlops.mqtt_security import SecureBrokerMaterial

log = logging.getLogger(__name__)

DEFAULT_USERNAME = "tinymlops"
# The embedded default: anyone on loopback may connect.
ANONYMOUS_LISTENER = "allow_anonymous true\n"


@dataclass(frozen=True)
class BrokerAddress:
    """Where a broker listens."""

    host: str
    port: int
    tls: bool = False

    @property
    def url(self) -> str:
        """The broker as a URL."""
        return f"{'mqtts' if self.tls else 'mqtt'}://{self.host}:{self.port}"


def parse_broker_url(url: str) -> BrokerAddress:
    """Parse ``mqtt://host:port`` or ``mqtts://host:port``.

    Raises:
        BrokerError: The URL is not an MQTT URL.
    """
    parsed = urlparse(url)
    if parsed.scheme not in ("mqtt", "mqtts", "tcp", "ssl") or not parsed.hostname:
        raise BrokerError(f"invalid MQTT broker URL {url!r}: expected mqtt://host:port or mqtts://host:port")
    tls = parsed.scheme in ("mqtts", "ssl")
    return BrokerAddress(parsed.hostname, parsed.port or (8883 if tls else 1883), tls)


def free_port() -> int:
    """Return a free TCP port on loopback."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(host: str, port: int, timeout_s: float = 10.0) -> None:
    """Block until a TCP port accepts connections.

    Raises:
        BrokerError: Nothing listens there within the timeout.
    """
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise BrokerError(f"no MQTT broker answers on {host}:{port} after {timeout_s:.0f} s")


def _no_delay(_client: mqtt.Client, _userdata: Any, sock: Any) -> None:
    """Send small packets at once (TCP_NODELAY): a paho ``on_socket_open`` callback.

    A burst of chunks or a status right after another must not wait for the peer's delayed ACK
    (40 ms on Linux), which would dominate the latency of a small model's deployment.
    """
    with contextlib.suppress(OSError, AttributeError):
        sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)


def make_client(
    address: BrokerAddress,
    client_id: str = "",
    *,
    clean_session: bool = True,
    manual_ack: bool = False,
    settings: MqttSettings | None = None,
    username: str | None = None,
    password: str | None = None,
    ca_file: Path | None = None,
    client_cert: Path | None = None,
    client_key: Path | None = None,
) -> mqtt.Client:
    """Create a paho client (callback API v2, MQTT 3.1.1) configured for the broker; not yet connected.

    Explicit ``username``, ``password`` and ``ca_file`` win over ``settings``. ``client_cert`` and
    ``client_key`` (PEM) authenticate by certificate on an mqtts listener that requires one.
    """
    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2,
        client_id=client_id,
        clean_session=clean_session,
        protocol=mqtt.MQTTv311,
        manual_ack=manual_ack,
    )
    client.on_socket_open = _no_delay
    # Far more QoS 1 messages in flight than the default 20: the ingest acks a whole batch at once.
    client.max_inflight_messages_set(65_535)
    client.max_queued_messages_set(0)
    if settings is not None:
        username = username or settings.username
        password = password or (settings.password.get_secret_value() if settings.password else None)
        ca_file = ca_file or settings.ca_file
        client_cert = client_cert or settings.client_cert
        client_key = client_key or settings.client_key
    # Always send a user name: brokers (amqtt) keep offline QoS 1 messages only for non-anonymous sessions.
    client.username_pw_set(username or DEFAULT_USERNAME, password)
    if address.tls:
        # Without a CA file the system's CAs decide (a public broker); hostnames are always checked.
        client.tls_set(
            ca_certs=str(ca_file) if ca_file else None,
            certfile=str(client_cert) if client_cert else None,
            keyfile=str(client_key) if client_key else None,
        )
    elif client_cert is not None:
        raise BrokerError(f"a client certificate needs an mqtts:// broker, got {address.url}")
    return client


def connect(client: mqtt.Client, address: BrokerAddress, keepalive_s: int = 30, timeout_s: float = 10.0) -> None:
    """Connect and start the network loop thread; wait until the broker accepted the connection.

    Raises:
        BrokerError: The broker cannot be reached, the TLS handshake failed, or the broker refused
            or closed the connection.
    """
    connected = threading.Event()
    outcome: dict[str, Any] = {}

    def on_connect(_c: mqtt.Client, _u: Any, _flags: Any, reason: Any, _props: Any) -> None:
        outcome["reason"] = reason
        connected.set()

    def on_disconnect(_c: mqtt.Client, _u: Any, _flags: Any, reason: Any, _props: Any) -> None:
        # A broker that rejects a client certificate after a TLS 1.3 handshake just closes the socket.
        outcome.setdefault("closed", reason)
        connected.set()

    previous = client.on_connect, client.on_disconnect
    client.on_connect, client.on_disconnect = on_connect, on_disconnect
    try:
        client.connect(address.host, address.port, keepalive=keepalive_s)
    except ssl.SSLError as exc:
        client.on_connect, client.on_disconnect = previous
        detail = getattr(exc, "verify_message", None)  # why a certificate was refused: unknown CA, wrong host
        why = f"{exc.reason}: {detail}" if detail else exc.reason or str(exc)
        raise BrokerError(f"TLS handshake with MQTT broker at {address.url} failed: {why}") from exc
    except OSError as exc:
        client.on_connect, client.on_disconnect = previous
        raise BrokerError(f"cannot reach MQTT broker at {address.url}: {exc.strerror or exc}") from exc
    client.loop_start()
    accepted = connected.wait(timeout_s)
    client.on_connect, client.on_disconnect = previous
    if not accepted:
        client.loop_stop()
        raise BrokerError(f"MQTT broker at {address.url} did not accept the connection within {timeout_s:.0f} s")
    reason = outcome.get("reason")
    if reason is None:
        client.loop_stop()
        raise BrokerError(f"MQTT broker at {address.url} closed the connection before accepting it")
    if reason.is_failure:
        client.loop_stop()
        raise BrokerError(f"MQTT broker at {address.url} refused the connection: {reason}")


class MosquittoBroker:
    """A Mosquitto process on loopback, configured for the ingest's batched acknowledgements.

    Args:
        port: Port to listen on (default: a free one).
        extra_config: Further configuration lines.
        listener_config: Options of the listener: authentication, ACL, TLS (default: anonymous).
        tls: Whether the listener speaks TLS (its address is then mqtts://).
        max_message_bytes: Largest payload the broker accepts (``message_size_limit``); None for no limit.
    """

    def __init__(
        self,
        port: int | None = None,
        extra_config: str = "",
        *,
        listener_config: str = ANONYMOUS_LISTENER,
        tls: bool = False,
        max_message_bytes: int | None = DEFAULT_MAX_MESSAGE_BYTES,
    ) -> None:
        self.port = port or free_port()
        self._extra = extra_config
        self._max_message_bytes = max_message_bytes
        self._listener = listener_config
        self._tls = tls
        self._dir = Path(tempfile.mkdtemp(prefix="tinymlops-mosquitto-"))
        self._process: subprocess.Popen[bytes] | None = None

    @classmethod
    def secure(
        cls,
        material: SecureBrokerMaterial,
        port: int | None = None,
        *,
        tls: bool = True,
        require_certificate: bool = False,
        extra_config: str = "",
    ) -> MosquittoBroker:
        """A broker in the secure profile: no anonymous clients, the material's passwords and ACL, TLS.

        Args:
            material: Written by :func:`tinymlops.mqtt_security.init_material`.
            port: Port to listen on (default: a free one).
            tls: Serve mqtts:// with the material's server certificate.
            require_certificate: Authenticate by client certificate (its CN is the user name) instead of password.
            extra_config: Further configuration lines.
        """
        config = material.listener_config(tls=tls, require_certificate=require_certificate)
        if hasattr(os, "geteuid") and os.geteuid() == 0:
            # As root, Mosquitto drops to the mosquitto user before reading the password file (0600, ours).
            config += "user root\n"
        return cls(port, extra_config, listener_config=config, tls=tls)

    @staticmethod
    def executable() -> str | None:
        """Path of the mosquitto binary, or None when it is not installed."""
        return shutil.which("mosquitto") or next(
            (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if Path(p).exists()), None
        )

    @property
    def address(self) -> BrokerAddress:
        """Where it listens."""
        return BrokerAddress("127.0.0.1", self.port, self._tls)

    @property
    def log_file(self) -> Path:
        """The broker's log."""
        return self._dir / "mosquitto.log"

    @property
    def pid(self) -> int:
        """Process id of the running broker."""
        if self._process is None:
            raise BrokerError("mosquitto is not running")
        return self._process.pid

    def start(self) -> MosquittoBroker:
        """Start the broker and wait until it listens."""
        binary = self.executable()
        if binary is None:
            raise BrokerError("mosquitto is not installed (Debian: apt-get install mosquitto)")
        config = self._dir / "mosquitto.conf"
        config.write_text(
            f"listener {self.port} 127.0.0.1\n"
            f"{self._listener}"
            "persistence false\n"
            # Small packets (chunks, statuses, acks) must not wait for a delayed ACK: 40 ms each otherwise.
            "set_tcp_nodelay true\n"
            # QoS 1 messages held unacked while the ingest writes a batch; queue generously.
            "max_inflight_messages 0\n"
            "max_queued_messages 1000000\n"
            "max_queued_bytes 0\n"
            # A larger publish is acknowledged and dropped, so its publisher goes on with its next message;
            # max_packet_size would disconnect it instead, and paho would send the same packet again forever.
            f"message_size_limit {self._max_message_bytes or 0}\n"
            f"{self._extra}\n"
        )
        log_file = open(self.log_file, "wb")  # noqa: SIM115 - owned by the process
        self._process = subprocess.Popen([binary, "-c", str(config)], stdout=log_file, stderr=subprocess.STDOUT)
        try:
            wait_for_port("127.0.0.1", self.port)
        except BrokerError:
            self.stop()
            raise BrokerError(f"mosquitto did not start on port {self.port}; see {self.log_file}") from None
        except BaseException:  # a stop signal while waiting: broker_for's cleanup does not cover a start
            self.stop()
            raise
        log.info("started mosquitto (pid %d) on %s", self._process.pid, self.address.url)
        return self

    def reload(self) -> None:
        """Make the broker re-read its password file and ACL (SIGHUP)."""
        os.kill(self.pid, signal.SIGHUP)

    def stop(self) -> None:
        """Stop the broker by its pid."""
        if self._process is not None and self._process.poll() is None:
            self._process.terminate()
            try:
                self._process.wait(5)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._process = None

    def kill(self) -> None:
        """Kill the broker abruptly (fault injection)."""
        if self._process is not None:
            self._process.kill()
            self._process.wait()
            self._process = None


class AmqttBroker:
    """The pure-Python amqtt broker running in a daemon thread with its own event loop."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._broker: Any = None
        self._thread: threading.Thread | None = None

    @property
    def address(self) -> BrokerAddress:
        """Where it listens."""
        return BrokerAddress("127.0.0.1", self.port)

    def start(self) -> AmqttBroker:
        """Start the broker and wait until it listens."""
        from amqtt.broker import Broker

        config = {
            "listeners": {"default": {"type": "tcp", "bind": f"127.0.0.1:{self.port}", "max_connections": 0}},
            "sys_interval": 0,
            # Clients always send a user name; anonymous sessions would lose offline QoS 1 messages.
            "auth": {"allow-anonymous": False, "plugins": ["auth_anonymous"]},
            "topic-check": {"enabled": False},
        }
        started = threading.Event()
        errors: list[BaseException] = []

        def run() -> None:
            loop = asyncio.new_event_loop()
            asyncio.set_event_loop(loop)
            self._loop = loop
            try:
                self._broker = Broker(config, loop=loop)
                loop.run_until_complete(self._broker.start())
            except BaseException as exc:  # reported to the starting thread
                errors.append(exc)
                started.set()
                return
            started.set()
            loop.run_forever()

        self._thread = threading.Thread(target=run, name="amqtt-broker", daemon=True)
        self._thread.start()
        started.wait(15)
        if errors:
            raise BrokerError(f"amqtt broker failed to start: {errors[0]}")
        if not started.is_set():
            raise BrokerError(f"amqtt broker did not start on port {self.port} within 15 s")
        log.info("started embedded amqtt broker on %s", self.address.url)
        return self

    def stop(self) -> None:
        """Shut the broker down and end its thread."""
        if self._loop is None or self._broker is None:
            return
        future = asyncio.run_coroutine_threadsafe(self._broker.shutdown(), self._loop)
        try:
            future.result(10)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            if self._thread is not None:
                self._thread.join(10)
            self._loop = None
            self._broker = None


@contextmanager
def broker_for(settings: MqttSettings) -> Iterator[BrokerAddress]:
    """Yield the configured broker, or start an embedded one for the duration of the block.

    With ``settings.url`` set, nothing is started. Otherwise Mosquitto is started if installed
    (or amqtt, per ``settings.embedded_broker``), and stopped on exit.
    """
    if settings.url:
        yield parse_broker_url(settings.url)
        return
    choice = settings.embedded_broker
    if choice == "auto":
        choice = "mosquitto" if MosquittoBroker.executable() else "amqtt"
    # amqtt has no payload limit: there the ingest's own limit (settings.max_message_bytes) bounds what it keeps.
    broker: MosquittoBroker | AmqttBroker = (
        MosquittoBroker(max_message_bytes=settings.max_message_bytes) if choice == "mosquitto" else AmqttBroker()
    )
    broker.start()
    log.info("no broker configured: started embedded %s on %s", choice, broker.address.url)
    try:
        yield broker.address
    finally:
        broker.stop()


BROKER_FILE = "broker.json"


@contextmanager
def announced(address: BrokerAddress, data_dir: Path) -> Iterator[Path]:
    """Announce a running broker in ``data_dir/broker.json`` for the block, so clients started later find it.

    The file names the URL and this process; it is removed on exit if it is still this process's.
    """
    from tinymlops.files import write_file_atomic

    path = data_dir / BROKER_FILE
    data_dir.mkdir(parents=True, exist_ok=True)
    record = {"url": address.url, "pid": os.getpid(), "started": time.time()}
    write_file_atomic(path, json.dumps(record).encode(), 0o644)
    try:
        yield path
    finally:
        with contextlib.suppress(OSError, ValueError):
            if json.loads(path.read_text()).get("pid") == os.getpid():
                path.unlink()


def find_announced_broker(data_dir: Path) -> BrokerAddress | None:
    """The broker a running ``tinymlops broker`` or demo announced in ``data_dir``, if it still answers."""
    path = data_dir / BROKER_FILE
    try:
        record = json.loads(path.read_text())
        address = parse_broker_url(str(record["url"]))
        os.kill(int(record["pid"]), 0)  # its process is alive (ProcessLookupError otherwise)
        with socket.create_connection((address.host, address.port), timeout=2.0):
            return address
    except (OSError, ValueError, KeyError, TypeError, BrokerError):
        return None


@contextmanager
def broker_to_publish_to(settings: MqttSettings, data_dir: Path) -> Iterator[BrokerAddress]:
    """The broker a client that publishes must reach: the configured one, else the one announced in ``data_dir``.

    A private broker would take the messages and hand them to nobody, so none is started.

    Raises:
        BrokerError: No broker is configured and none is announced; the message says what to start.
    """
    if settings.url:
        yield parse_broker_url(settings.url)
        return
    address = find_announced_broker(data_dir)
    if address is None:
        raise BrokerError(
            f"no MQTT broker to publish to: none configured and none announced in {data_dir / BROKER_FILE}; "
            "start `tinymlops broker` (or `tinymlops demo --keep-running`) first, or give --broker"
        )
    log.info("publishing to the broker announced in %s: %s", data_dir / BROKER_FILE, address.url)
    yield address
