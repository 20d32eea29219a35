"""The gateway of an emulated device: its UART frames <-> the fleet's MQTT topics.

A real far-edge node often reaches the broker through something else (an MQTT-SN gateway, a
cellular modem); an emulated Cortex-M device reaches it through :class:`UartGateway`, one per
device: it owns the TCP socket QEMU bridges UART0 to, forwards the device's manifest, group
manifest and chunk topics as MANIFEST/CHUNK frames, publishes REQUEST frames on ``ota/req`` and
turns the device's binary HELLO/STATUS/SCORES/SUMMARY frames into the same JSON messages a
simulated :class:`~firmware.device.DeviceRuntime` publishes (``firmware.ota``). It also feeds
the device its sensor: windows of a :class:`~firmware.sensor.VibrationSource`, quantised as the
ADC would, as WINDOW frames at a set interval (and on the vibration topic when configured).

:class:`DeviceTransport` is the interface an MQTT connection drives (what reaches the device, its
(re)connection events; the device's messages go back through the publish function it is given);
:class:`MqttUplink` is that connection for one transport.

Threads: a reader (UART bytes -> frames -> MQTT) and a writer (queued frames and due windows ->
UART); paho's network thread only queues frames. Instruction counts from the device become
milliseconds with the profile's clock and ``cycles_per_instruction``; the raw counts are kept
under ``*_instructions`` keys. ``download_ms`` and ``deploy_ms`` are wall-clock times measured
here from forwarding the manifest (the device's own virtual clock does not track real time).
The firmware reports the largest inference count of a summary period, not a percentile, so a
drift summary carries ``inference_max`` where a simulated device has ``inference_p95``.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import queue
import socket
import threading
import time
import zlib
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Protocol, Self

import paho.mqtt.client as mqtt

from firmware.boot import next_boot_epoch
from firmware.codec import VibrationWindow, encode
from firmware.frames import (
    COUNTER_NAMES,
    FRAME_ERROR_NAMES,
    FRAME_MAX_PAYLOAD,
    ChunkFrame,
    DeviceStateCode,
    Frame,
    FrameDecodeError,
    FrameErrorFrame,
    FrameFault,
    FrameParser,
    FrameType,
    HelloFrame,
    LogFrame,
    ManifestFrame,
    ModelInfo,
    Payload,
    PingFrame,
    PongFrame,
    RequestFrame,
    ScoresFrame,
    StatusDomain,
    StatusFrame,
    SummaryFrame,
    SummaryNowFrame,
    WindowFrame,
    decode_payload,
    encode_frame,
)
from firmware.ota import (
    SCORE_EDGES_REL,
    Announcement,
    DeviceState,
    DeviceStatus,
    DriftSummary,
    ModelRef,
    OtaDecodeError,
    RxStatus,
    ScoreBatch,
    decode_manifest,
    reason_for,
)
from firmware.sensor import MachineSimulator, VibrationSource, quantize
from tinymlops.contracts.topics import FleetTopics, check_name
from tinymlops.errors import TinyMLOpsError
from tinymlops.mqtt import BrokerAddress, connect, make_client
from tinymlops.settings import MqttSettings
from tinymlops.targets import McuTarget

log = logging.getLogger(__name__)

PublishFn = Callable[[str, bytes, int, bool], None]
_STATUS_HISTORY = 512
_DOMAIN_REASONS = {
    StatusDomain.RUNTIME: "load failed",
    StatusDomain.SMOKE: "smoke test failed",
    StatusDomain.FLASH: "slot write failed",
    StatusDomain.CORRUPT_CHUNKS: "corrupt chunks",
}


class GatewayError(TinyMLOpsError):
    """The gateway cannot reach its device's UART or the device does not answer."""


class DeviceTransport(Protocol):
    """How server-side messages reach one device and its messages come back.

    An MQTT connection (:class:`MqttUplink`) subscribes to :meth:`subscriptions`, hands every
    message on them to :meth:`handle`, reports (re)connections, and gives the transport the
    function through which the device's own messages are published (:meth:`attach`).
    """

    device_id: str

    def attach(self, publish: PublishFn) -> None:
        """Take the function that publishes ``(topic, payload, qos, retain)`` for the device."""
        ...

    def subscriptions(self) -> list[str]:
        """Topics whose messages the device needs."""
        ...

    def handle(self, topic: str, payload: bytes) -> None:
        """One server-side message for the device (called from the network thread: must not block)."""
        ...

    def on_connected(self) -> None:
        """The connection is (back) up: announce, re-publish the status."""
        ...

    def on_disconnected(self) -> None:
        """The connection dropped."""
        ...


class MqttUplink:
    """One MQTT connection serving one :class:`DeviceTransport`.

    Args:
        address: Broker.
        transport: The device side.
        client_id: MQTT client id.
        settings: MQTT credentials and TLS.
    """

    def __init__(
        self,
        address: BrokerAddress,
        transport: DeviceTransport,
        *,
        client_id: str,
        settings: MqttSettings | None = None,
    ) -> None:
        self.address = address
        self.transport = transport
        self._client = make_client(address, client_id, settings=settings)
        self._client.reconnect_delay_set(1, 2)
        self._client.on_message = self._on_message
        self._client.on_disconnect = lambda *_args: transport.on_disconnected()
        transport.attach(self.publish)

    def start(self) -> None:
        """Connect, subscribe, let the transport announce itself.

        Raises:
            BrokerError: The broker cannot be reached.
        """
        connect(self._client, self.address)
        self._on_connect()
        self._client.on_connect = lambda _c, _u, _f, reason, _p: None if reason.is_failure else self._on_connect()

    def stop(self) -> None:
        """Disconnect."""
        self._client.disconnect()
        self._client.loop_stop()

    def publish(self, topic: str, payload: bytes, qos: int, retain: bool) -> None:
        """Publish for the device."""
        self._client.publish(topic, payload, qos=qos, retain=retain)

    def _on_connect(self) -> None:
        self._client.subscribe([(topic, 1) for topic in self.transport.subscriptions()])
        self.transport.on_connected()

    def _on_message(self, _client: mqtt.Client, _userdata: Any, message: mqtt.MQTTMessage) -> None:
        self.transport.handle(message.topic, bytes(message.payload))


@dataclass(frozen=True)
class GatewayConfig:
    """Behaviour of a gateway.

    Attributes:
        topic_root: First topic level.
        window_interval_s: Feed one sensor window per interval; None: only on :meth:`UartGateway.send_windows`.
        publish_windows: Also publish each window on the vibration topic (for the ingest).
        full_scale_g: Sensor full scale (int16 quantisation).
        connect_timeout_s: Keep trying to reach the UART socket this long.
        hello_timeout_s: Wait this long for the device's HELLO after connecting.
        frame_timeout_s: A partial frame with no byte for this long is dropped (truncated).
    """

    topic_root: str = "tinymlops"
    window_interval_s: float | None = 1.0
    publish_windows: bool = False
    full_scale_g: float = 16.0
    connect_timeout_s: float = 30.0
    hello_timeout_s: float = 60.0
    frame_timeout_s: float = 0.2


def status_reason(state: DeviceStateCode, domain: StatusDomain, code: int) -> str:
    """The ``reason`` a simulated device gives for the same outcome ("" unless failed or ignored)."""
    if state not in (DeviceStateCode.FAILED, DeviceStateCode.IGNORED):
        return ""
    if domain == StatusDomain.OTA:
        try:
            return reason_for(RxStatus(code))
        except ValueError:
            return "bad manifest"
    return _DOMAIN_REASONS.get(domain, "failed")


def _model_ref(model: ModelInfo | None) -> ModelRef | None:
    if model is None or model.version < 1:
        return None
    return ModelRef(name=model.name, version=model.version, sha256=model.sha256.hex())


@dataclass(frozen=True)
class _ModelFacts:
    """What the gateway learnt of a model version from its manifest."""

    name: str
    threshold: float


class UartGateway:
    """Bridge between one emulated device's UART (QEMU's TCP socket) and the fleet's MQTT topics.

    Attributes:
        statuses: The latest statuses published, oldest first.
        device_frame_errors: FRAME_ERROR reports of the device, by code.
        line_faults: Frames from the device this side dropped, by kind.
        logs: The latest LOG lines of the firmware.
        windows_scored: Windows the device reported scores for.
        anomalies: Of which above the threshold.

    Args:
        device_id: Device id (as provisioned).
        fleet: Fleet name.
        profile: The MCU profile it emulates (clock and cycles per instruction for the latencies).
        uart: ``(host, port)`` of the UART socket (QEMU listens there).
        broker: Broker; None: no MQTT (:meth:`attach` a publish function yourself).
        group: Group whose manifests it also follows.
        simulator: Its machine; default one seeded from the device id, as a simulated device's.
        config: Behaviour.
        mqtt_settings: MQTT credentials and TLS.
        first_status_seq: Status seq to continue from (a restarted device keeps its order).
        boot_epoch: Boot epoch of the windows it publishes for the device (default
            :func:`firmware.boot.next_boot_epoch`): every gateway is a new boot, window seqs restart at 0.
    """

    def __init__(
        self,
        device_id: str,
        fleet: str,
        profile: McuTarget,
        uart: tuple[str, int],
        broker: BrokerAddress | None = None,
        *,
        group: str | None = None,
        simulator: VibrationSource | None = None,
        config: GatewayConfig | None = None,
        mqtt_settings: MqttSettings | None = None,
        first_status_seq: int = 0,
        boot_epoch: int | None = None,
    ) -> None:
        self.device_id = check_name(device_id, "device id")
        self.group = check_name(group, "group") if group is not None else None
        self.fleet = fleet
        self.profile = profile
        self.uart = uart
        self.broker = broker
        self.config = config or GatewayConfig()
        self.topics = FleetTopics(fleet, self.config.topic_root)
        self.simulator: VibrationSource = simulator or MachineSimulator(seed=zlib.crc32(self.device_id.encode()))
        self.mqtt_settings = mqtt_settings
        self.statuses: deque[DeviceStatus] = deque(maxlen=_STATUS_HISTORY)
        self.device_frame_errors: Counter[int] = Counter()
        self.line_faults: Counter[int] = Counter()
        self.logs: deque[str] = deque(maxlen=200)
        self.windows_scored = 0
        self.anomalies = 0
        self._publish_fn: PublishFn | None = None
        self._uplink: MqttUplink | None = None
        self._sock: socket.socket | None = None
        self._outbox: queue.Queue[tuple[int, bytes] | bytes | None] = queue.Queue()
        self._tx_seq = itertools.count(1)
        self._last_tx = b""
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._stopping = threading.Event()
        self._threads: list[threading.Thread] = []
        self._uart_open = False
        self._connected = False
        self._hello: HelloFrame | None = None
        self._active: ModelRef | None = None
        self._status: DeviceStatus | None = None
        self._last_status_frame: StatusFrame | None = None
        self._status_seq = first_status_seq
        self._models: dict[int, _ModelFacts] = {}
        self._manifest_at: dict[int, float] = {}
        self._download_ms: dict[int, float] = {}
        self._retained: dict[str, bytes] = {}
        self._pongs: dict[int, float] = {}
        self.boot_epoch = next_boot_epoch(sender=self.device_id) if boot_epoch is None else boot_epoch
        self._window_seq = 0
        self._next_window_at: float | None = None
        self._summary_start = time.time()
        self._instruction_ms = 1e3 * float(getattr(profile, "cycles_per_instruction", 1.0) or 1.0) / profile.clock_hz

    # --- lifecycle ------------------------------------------------------------------------

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    def start(self) -> Self:
        """Connect to the UART (with retries), wait for the device's HELLO, then join the broker.

        Raises:
            GatewayError: The UART socket cannot be reached or the device sends no HELLO in time.
            BrokerError: The broker cannot be reached.
        """
        self._sock = self._connect_uart()
        self._uart_open = True
        for target, name in ((self._read_loop, "reader"), (self._write_loop, "writer")):
            thread = threading.Thread(target=target, name=f"uart-{name}-{self.device_id}", daemon=True)
            thread.start()
            self._threads.append(thread)
        with self._changed:
            if not self._changed.wait_for(lambda: self._hello is not None or not self._uart_open,
                                          self.config.hello_timeout_s):  # fmt: skip
                self.stop()
                raise GatewayError(f"device {self.device_id} sent no HELLO within {self.config.hello_timeout_s:.0f} s")
        if self._hello is None:
            self.stop()
            raise GatewayError(f"device {self.device_id} closed its UART before saying HELLO")
        if self.broker is not None:
            self._uplink = MqttUplink(self.broker, self, client_id=f"tinymlops-emu-{self.fleet}-{self.device_id}",
                                      settings=self.mqtt_settings)  # fmt: skip
            self._uplink.start()
        return self

    def stop(self) -> None:
        """Leave the broker, close the UART socket, end the threads."""
        self._stopping.set()
        if self._uplink is not None:
            self._uplink.stop()
            self._uplink = None
        self._outbox.put(None)
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)
            self._sock.close()
        for thread in self._threads:
            if thread is not threading.current_thread():
                thread.join(5)
        self._threads.clear()

    def _connect_uart(self) -> socket.socket:
        host, port = self.uart
        deadline = time.monotonic() + self.config.connect_timeout_s
        while True:
            try:
                sock = socket.create_connection((host, port), timeout=1.0)
            except OSError as exc:
                if time.monotonic() > deadline:
                    raise GatewayError(
                        f"cannot reach the UART of device {self.device_id} at {host}:{port}: {exc.strerror or exc}"
                    ) from None
                time.sleep(0.05)
                continue
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            sock.settimeout(self.config.frame_timeout_s)
            return sock

    # --- state ----------------------------------------------------------------------------

    @property
    def hello(self) -> HelloFrame | None:
        """The device's latest HELLO."""
        return self._hello

    @property
    def status(self) -> DeviceStatus | None:
        """The latest status published."""
        return self._status

    @property
    def active(self) -> ModelRef | None:
        """The model the device runs, as it last reported."""
        return self._active

    @property
    def uart_open(self) -> bool:
        """Whether the UART socket is still connected (false once QEMU is gone)."""
        return self._uart_open

    @property
    def connected(self) -> bool:
        """Whether the MQTT connection is up."""
        return self._connected

    def wait_for(
        self, predicate: Callable[[DeviceStatus], bool], timeout_s: float = 10.0, after_seq: int = 0
    ) -> DeviceStatus:
        """Wait until a status with ``seq > after_seq`` satisfies ``predicate``; return it.

        Raises:
            GatewayError: None did within the timeout (the message names the latest status).
        """
        found: list[DeviceStatus] = []

        def match() -> bool:
            found[:] = [s for s in self.statuses if s.seq > after_seq and predicate(s)][:1]
            return bool(found)

        with self._changed:
            if not self._changed.wait_for(match, timeout_s):
                latest = self._status.status if self._status else "no status"
                raise GatewayError(f"device {self.device_id}: no matching status within {timeout_s:.0f} s; {latest}")
        return found[0]

    def announcement(self) -> Announcement | None:
        """The announcement of the device's latest HELLO (None before one)."""
        hello = self._hello
        if hello is None:
            return None
        firmware = hello.firmware if "(" in hello.firmware else f"{hello.firmware} ({hello.board})"
        return Announcement(
            device=self.device_id, fleet=self.fleet, group=self.group, firmware=firmware, profile=hello.profile,
            flash_free=hello.flash_free, slot_bytes=hello.slot_bytes, ram_free=hello.ram_free,
            max_chunk=hello.max_chunk, dsp_versions=hello.dsp_version_list, key_ids=list(hello.key_ids),
            model=self._active, ts=time.time(),
        )  # fmt: skip

    # --- DeviceTransport --------------------------------------------------------------------

    def attach(self, publish: PublishFn) -> None:
        """Take the function that publishes for the device."""
        self._publish_fn = publish

    def subscriptions(self) -> list[str]:
        """The device's manifest and chunk topics, and its group's manifest topic."""
        topics = [self.topics.manifest(self.device_id), self.topics.chunk(self.device_id)]
        if self.group is not None:
            topics.append(self.topics.group_manifest(self.group))
        return topics

    def handle(self, topic: str, payload: bytes) -> None:
        """Forward a manifest or a chunk to the device."""
        if topic == self.topics.chunk(self.device_id):
            self._send(FrameType.CHUNK, ChunkFrame(payload).encode())
            return
        source = ManifestFrame.GROUP if self.group and topic == self.topics.group_manifest(self.group) else 0
        with self._lock:
            self._retained[topic] = payload
            self._learn_manifest(payload)
        self._send(FrameType.MANIFEST, ManifestFrame(source, payload).encode())

    def on_connected(self) -> None:
        """Announce and re-publish the latest status (a restarted broker lost both)."""
        with self._lock:
            self._connected = True
            announcement = self.announcement()
            if announcement is not None:
                self._publish(self.topics.announce(self.device_id), announcement.encode(), 1, True)
            if self._status is not None:
                self._publish(self.topics.status(self.device_id), self._status.encode(), 1, True)

    def on_disconnected(self) -> None:
        """The broker connection dropped; paho reconnects."""
        self._connected = False

    def _publish(self, topic: str, payload: bytes, qos: int, retain: bool = False) -> None:
        # as a simulated device: nothing is queued while offline; announce and status go out again on reconnect
        if self._publish_fn is not None and self._connected:
            self._publish_fn(topic, payload, qos, retain)

    def _learn_manifest(self, payload: bytes) -> None:
        if not payload:
            return
        try:
            manifest = decode_manifest(payload)
        except OtaDecodeError:
            return  # the device refuses it and says why
        self._models[manifest.model_version] = _ModelFacts(manifest.model_name, manifest.threshold)
        self._manifest_at.setdefault(manifest.model_version, time.monotonic())

    # --- to the device --------------------------------------------------------------------

    def _send(self, frame_type: int, payload: bytes) -> None:
        if len(payload) > FRAME_MAX_PAYLOAD:  # no valid manifest or chunk is this large
            log.warning("%s: dropped a %d-byte %s for the device: frames carry at most %d", self.device_id,
                        len(payload), FrameType(frame_type).name, FRAME_MAX_PAYLOAD)  # fmt: skip
            return
        self._outbox.put((frame_type, payload))

    def inject(self, raw: bytes) -> None:
        """Write raw bytes to the UART in order with the frames (fault injection: garbage, replays)."""
        self._outbox.put(raw)

    @property
    def last_frame_sent(self) -> bytes:
        """The last whole frame written (to replay it)."""
        return self._last_tx

    def send_windows(self, n: int) -> None:
        """Queue ``n`` sensor windows now."""
        for _ in range(n):
            self._send(FrameType.WINDOW, self._next_window().encode())

    def request_summary(self) -> None:
        """Ask the device to publish its drift summary now."""
        self._send(FrameType.SUMMARY_NOW, SummaryNowFrame().encode())

    def ping(self, timeout_s: float = 5.0) -> float:
        """Round trip of a PING through the firmware, in seconds.

        Raises:
            GatewayError: No PONG within the timeout.
        """
        nonce = zlib.crc32(f"{time.monotonic_ns()}".encode())
        sent = time.monotonic()
        self._send(FrameType.PING, PingFrame(nonce).encode())
        with self._changed:
            if not self._changed.wait_for(lambda: nonce in self._pongs, timeout_s):
                raise GatewayError(f"device {self.device_id} did not answer a PING within {timeout_s:.0f} s")
            return self._pongs.pop(nonce) - sent

    def _next_window(self) -> WindowFrame:
        rpm = self.simulator.current_rpm  # the tachometer's speed of the window about to be produced
        samples, scale = quantize(self.simulator.next_window(), self.config.full_scale_g)
        seq = self._window_seq
        self._window_seq += 1
        rate = self.simulator.sample_rate_hz
        if self.config.publish_windows:
            window = VibrationWindow(self.device_id, seq, time.time_ns() // 1000, rate, scale, samples, self.boot_epoch,
                                     rpm)  # fmt: skip
            self._publish(self.topics.vibration(self.device_id), encode(window), 1)
        return WindowFrame(seq, scale, rate, tuple(samples.tolist()), self._window_rpm(rpm))

    def _window_rpm(self, rpm: float | None) -> float | None:
        """The WINDOW frame's rpm field: the speed, 0.0 when not known.

        None (the field left out) for a device that does not announce DSP version 2: its firmware predates
        the field and would drop the longer frame as malformed.
        """
        hello = self._hello
        if hello is None or 2 not in hello.dsp_version_list:
            return None
        return 0.0 if rpm is None else rpm

    def _write_loop(self) -> None:
        sock = self._sock
        assert sock is not None
        while not self._stopping.is_set():
            try:
                item = self._outbox.get(timeout=0.05)
            except queue.Empty:
                item = self._due_window()
                if item is None:
                    continue
            if item is None:
                return
            if isinstance(item, bytes):
                data = item
            else:
                data = encode_frame(item[0], next(self._tx_seq) & 0xFFFF, item[1])
                self._last_tx = data
            try:
                sock.sendall(data)
            except OSError as exc:
                if not self._stopping.is_set():
                    log.warning("%s: UART write failed: %s", self.device_id, exc)
                return

    def _due_window(self) -> tuple[int, bytes] | None:
        """A window when one is due and nothing else waits (OTA traffic goes first)."""
        interval = self.config.window_interval_s
        if interval is None or self._hello is None:
            return None
        now = time.monotonic()
        if self._next_window_at is None:
            self._next_window_at = now + interval * (zlib.crc32(self.device_id.encode()) % 1000) / 1000
        if now < self._next_window_at:
            return None
        self._next_window_at = max(self._next_window_at + interval, now)
        return FrameType.WINDOW, self._next_window().encode()

    # --- from the device ------------------------------------------------------------------

    def _read_loop(self) -> None:
        sock = self._sock
        assert sock is not None
        parser = FrameParser()
        while not self._stopping.is_set():
            try:
                data = sock.recv(65536)
            except TimeoutError:
                if parser.pending:
                    self._dispatch_all(parser.expire())
                continue
            except OSError:
                data = b""
            if not data:
                break
            self._dispatch_all(parser.feed(data))
        with self._changed:
            self._uart_open = False
            self._changed.notify_all()
        if not self._stopping.is_set():
            log.warning("%s: the device closed its UART", self.device_id)

    def _dispatch_all(self, items: list[Frame | FrameFault]) -> None:
        for item in items:
            if isinstance(item, FrameFault):
                self.line_faults[item.code] += 1
                log.warning("%s: dropped a frame from the device: %s (seq %d)", self.device_id, item.code.name,
                            item.seq)  # fmt: skip
                continue
            try:
                payload = decode_payload(item)
            except FrameDecodeError as exc:
                log.warning("%s: bad frame from the device: %s", self.device_id, exc)
                continue
            try:
                self._dispatch(payload)
            except Exception:  # one bad message must not stop the bridge
                log.exception("%s: handling a %s frame failed", self.device_id, type(payload).__name__)

    def _dispatch(self, payload: Payload) -> None:
        if isinstance(payload, HelloFrame):
            self._on_hello(payload)
        elif isinstance(payload, StatusFrame):
            self._on_status(payload)
        elif isinstance(payload, RequestFrame):
            self._publish(self.topics.request(self.device_id), payload.request, 1)
        elif isinstance(payload, ScoresFrame):
            self._on_scores(payload)
        elif isinstance(payload, SummaryFrame):
            self._on_summary(payload)
        elif isinstance(payload, LogFrame):
            self.logs.append(payload.text)
            log.debug("%s firmware: %s", self.device_id, payload.text.rstrip())
        elif isinstance(payload, PongFrame):
            with self._changed:
                self._pongs[payload.nonce] = time.monotonic()
                self._changed.notify_all()
        elif isinstance(payload, FrameErrorFrame):
            self.device_frame_errors[payload.code] += 1
            log.warning("%s: the device dropped frame seq %d: %s", self.device_id, payload.seq, payload.code.name)
        else:
            log.warning("%s: the device sent a host-side frame %s", self.device_id, type(payload).__name__)

    def _on_hello(self, hello: HelloFrame) -> None:
        if hello.device != self.device_id or hello.fleet != self.fleet:
            log.warning("%s: the device says it is %s of fleet %s", self.device_id, hello.device, hello.fleet)
        with self._changed:
            rebooted = self._hello is not None
            self._hello = hello
            self._active = _model_ref(hello.model)
            self._changed.notify_all()
            announcement = self.announcement()
            retained = list(self._retained.items()) if rebooted else []
        assert announcement is not None
        self._publish(self.topics.announce(self.device_id), announcement.encode(), 1, True)
        for topic, manifest in retained:  # a rebooted device needs its manifests again
            self.handle(topic, manifest)

    def _ms(self, instructions: float) -> float:
        return instructions * self._instruction_ms

    def _on_status(self, frame: StatusFrame) -> None:
        now = time.monotonic()
        with self._changed:
            previous = self._last_status_frame
            self._last_status_frame = frame
            if previous is not None and previous == frame and self._status is not None:
                status = self._status  # the same status again (the answer to a SAME manifest)
            else:
                status = self._status_from(frame, now)
                self._status = status
                self.statuses.append(status)
            if frame.active is not None or frame.state == DeviceStateCode.ACTIVE:
                changed = _model_ref(frame.active) != self._active
                self._active = _model_ref(frame.active)
            else:
                changed = False
            if frame.state == DeviceStateCode.ACTIVE and changed:
                self._summary_start = time.time()
            self._changed.notify_all()
        level = logging.WARNING if status.state == "failed" else logging.DEBUG  # the deploy report sums them up
        if status.state != "downloading" or status.received in (0, status.total):
            log.log(level, "%s: %s %s", self.device_id, status.status, status.detail)
        self._publish(self.topics.status(self.device_id), status.encode(), 1, True)
        announcement = self.announcement() if changed else None
        if announcement is not None:  # the model changed: re-announce, as a simulated device does
            self._publish(self.topics.announce(self.device_id), announcement.encode(), 1, True)

    def _status_from(self, frame: StatusFrame, now: float) -> DeviceStatus:
        state: DeviceState = frame.state.name.lower()  # type: ignore[assignment]
        reason = status_reason(frame.state, frame.domain, frame.code)
        text = {"downloading": f"downloading {frame.received}/{frame.total}", "failed": f"failed: {reason}",
                "ignored": f"ignored: {reason}"}.get(state, state)  # fmt: skip
        version = frame.manifest_version or None
        latency: dict[str, float] = {}
        started = self._manifest_at.get(frame.manifest_version)
        if version is not None and frame.total and frame.received == frame.total and started is not None:
            self._download_ms.setdefault(frame.manifest_version, (now - started) * 1e3)
        if version is not None and version in self._download_ms:
            latency["download_ms"] = self._download_ms[frame.manifest_version]
        elif frame.download_ms:
            latency["download_ms"] = float(frame.download_ms)
        for key in ("verify", "load", "smoke", "dsp", "inference"):
            count = getattr(frame, f"{key}_instructions")
            if count:
                latency[f"{key}_instructions"] = float(count)
                latency[f"{key}_ms"] = self._ms(count)
        if frame.state == DeviceStateCode.ACTIVE:
            if started is not None:
                latency["deploy_ms"] = (now - started) * 1e3
            elif frame.deploy_ms:
                latency["deploy_ms"] = float(frame.deploy_ms)
        counters = dict(zip(COUNTER_NAMES, frame.counters, strict=True))
        counters.update({f"frame_{n}": c for n, c in zip(FRAME_ERROR_NAMES, frame.frame_errors, strict=True) if c})
        if frame.speed_fallback:
            counters["speed_fallback"] = frame.speed_fallback
        self._status_seq += 1
        return DeviceStatus(
            device=self.device_id, seq=self._status_seq, ts=time.time(), state=state, status=text, reason=reason,
            detail=frame.detail, model=frame.manifest_name or None, version=version, received=frame.received,
            total=frame.total, active=_model_ref(frame.active), latency_ms=latency, counters=counters,
        )  # fmt: skip

    def _facts(self, version: int) -> _ModelFacts | None:
        facts = self._models.get(version)
        if facts is None and self._active is not None and self._active.version == version:
            return _ModelFacts(self._active.name, float("nan"))
        return facts

    def _on_scores(self, frame: ScoresFrame) -> None:
        self.windows_scored += len(frame.items)
        self.anomalies += sum(i.anomaly for i in frame.items)
        facts = self._facts(frame.model_version)
        if facts is None or not frame.items:
            log.warning("%s: scores of model v%d, whose manifest this gateway has not seen", self.device_id,
                        frame.model_version)  # fmt: skip
            return
        try:
            batch = ScoreBatch(
                device=self.device_id, model=facts.name, version=frame.model_version, threshold=facts.threshold,
                first_seq=frame.first_seq, ts=time.time(), scores=[i.score for i in frame.items],
                anomalies=[i.anomaly for i in frame.items],
            )  # fmt: skip
            payload = ScoreBatch.decode(batch.encode()).encode()  # refuses NaN/inf as a server would
        except OtaDecodeError as exc:
            log.warning("%s: scores not publishable: %s", self.device_id, exc)
            return
        self._publish(self.topics.scores(self.device_id), payload, 0)

    def _on_summary(self, frame: SummaryFrame) -> None:
        facts = self._facts(frame.model_version)
        name = facts.name if facts is not None else (self._active.name if self._active else "unknown")
        with self._lock:
            start, self._summary_start = self._summary_start, time.time()
        latency = {
            "dsp_mean": self._ms(frame.dsp_instructions_mean),
            "inference_mean": self._ms(frame.inference_instructions_mean),
            "inference_max": self._ms(frame.inference_instructions_max),
            "dsp_instructions_mean": frame.dsp_instructions_mean,
            "inference_instructions_mean": frame.inference_instructions_mean,
            "inference_instructions_max": float(frame.inference_instructions_max),
        }
        try:
            summary = DriftSummary(
                device=self.device_id, model=name, version=frame.model_version, threshold=frame.threshold,
                start_ts=start, end_ts=self._summary_start, windows=frame.windows, anomalies=frame.anomalies,
                score_mean=frame.score_mean, score_edges=[e * frame.threshold for e in SCORE_EDGES_REL],
                score_counts=list(frame.score_counts), feature_mean=list(frame.feature_mean),
                feature_var=list(frame.feature_var), latency_ms=latency, speed_fallback=frame.speed_fallback,
            )  # fmt: skip
            payload = DriftSummary.decode(summary.encode()).encode()
        except (OtaDecodeError, ValueError) as exc:
            log.warning("%s: drift summary not publishable: %s", self.device_id, exc)
            return
        self._publish(self.topics.summary(self.device_id), payload, 1)
