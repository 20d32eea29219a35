"""MQTT plumbing: broker URLs, paho clients and the embedded brokers (Mosquitto or amqtt).

Only MQTT 3.1.1 features are used, so the pure-Python amqtt broker can stand in for Mosquitto.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import socket
import subprocess
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import paho.mqtt.client as mqtt

from tinymlops.errors import BrokerError
from tinymlops.settings import MqttSettings

log = logging.getLogger(__name__)

DEFAULT_USERNAME = "tinymlops"


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


def make_client(
    address: BrokerAddress,
    client_id: str = "",
    *,
    clean_session: bool = True,
    manual_ack: bool = False,
    settings: MqttSettings | None = None,
) -> mqtt.Client:
    """Create a paho client (callback API v2, MQTT 3.1.1) configured for the broker; not yet connected."""
    client = mqtt.Client(
        mqtt.CallbackAPIVersion.VERSION2,
        client_id=client_id,
        clean_session=clean_session,
        protocol=mqtt.MQTTv311,
        manual_ack=manual_ack,
    )
    # Far more QoS 1 messages in flight than the default 20: the ingest acks a whole batch at once.
    client.max_inflight_messages_set(65_535)
    client.max_queued_messages_set(0)
    # Always send a user name: brokers (amqtt) keep offline QoS 1 messages only for non-anonymous sessions.
    username = settings.username if settings is not None and settings.username else DEFAULT_USERNAME
    password = settings.password.get_secret_value() if settings is not None and settings.password else None
    client.username_pw_set(username, password)
    if address.tls:
        client.tls_set(ca_certs=str(settings.ca_file) if settings and settings.ca_file else None)
    return client


def connect(client: mqtt.Client, address: BrokerAddress, keepalive_s: int = 30, timeout_s: float = 10.0) -> None:
    """Connect and start the network loop thread; wait until the broker accepted the connection.

    Raises:
        BrokerError: The broker cannot be reached or refused the connection.
    """
    connected = threading.Event()
    outcome: dict[str, Any] = {}

    def on_connect(_c: mqtt.Client, _u: Any, _flags: Any, reason: Any, _props: Any) -> None:
        outcome["reason"] = reason
        connected.set()

    previous = client.on_connect
    client.on_connect = on_connect
    try:
        client.connect(address.host, address.port, keepalive=keepalive_s)
    except OSError as exc:
        raise BrokerError(f"cannot reach MQTT broker at {address.url}: {exc.strerror or exc}") from exc
    client.loop_start()
    if not connected.wait(timeout_s):
        client.loop_stop()
        raise BrokerError(f"MQTT broker at {address.url} did not accept the connection within {timeout_s:.0f} s")
    client.on_connect = previous
    reason = outcome["reason"]
    if reason.is_failure:
        client.loop_stop()
        raise BrokerError(f"MQTT broker at {address.url} refused the connection: {reason}")


class MosquittoBroker:
    """A Mosquitto process on loopback, configured for the ingest's batched acknowledgements."""

    def __init__(self, port: int | None = None, extra_config: str = "") -> None:
        self.port = port or free_port()
        self._extra = extra_config
        self._dir = Path(tempfile.mkdtemp(prefix="tinymlops-mosquitto-"))
        self._process: subprocess.Popen[bytes] | None = None

    @staticmethod
    def executable() -> str | None:
        """Path of the mosquitto binary, or None when it is not installed."""
        return shutil.which("mosquitto") or next(
            (p for p in ("/usr/sbin/mosquitto", "/usr/local/sbin/mosquitto") if Path(p).exists()), None
        )

    @property
    def address(self) -> BrokerAddress:
        """Where it listens."""
        return BrokerAddress("127.0.0.1", self.port)

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
            "allow_anonymous true\n"
            "persistence false\n"
            # QoS 1 messages held unacked while the ingest writes a batch; queue generously.
            "max_inflight_messages 0\n"
            "max_queued_messages 1000000\n"
            "max_queued_bytes 0\n"
            f"{self._extra}\n"
        )
        log_file = open(self._dir / "mosquitto.log", "wb")  # noqa: SIM115 - owned by the process
        self._process = subprocess.Popen([binary, "-c", str(config)], stdout=log_file, stderr=subprocess.STDOUT)
        try:
            wait_for_port("127.0.0.1", self.port)
        except BrokerError:
            self.stop()
            raise BrokerError(
                f"mosquitto did not start on port {self.port}; see {self._dir / 'mosquitto.log'}"
            ) from None
        log.info("started mosquitto (pid %d) on %s", self._process.pid, self.address.url)
        return self

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
    broker: MosquittoBroker | AmqttBroker = MosquittoBroker() if choice == "mosquitto" else AmqttBroker()
    broker.start()
    log.info("no broker configured: started embedded %s on %s", choice, broker.address.url)
    try:
        yield broker.address
    finally:
        broker.stop()
