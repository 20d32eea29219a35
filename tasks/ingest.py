"""MQTT ingest: validate vibration windows, write them to the lake, acknowledge only after the write.

The subscriber keeps a persistent session (clean_session=False) at QoS 1 and acknowledges each
message manually once the batch holding it is durably in the lake (or in the quarantine). A crash
between receive and write therefore loses nothing: the broker redelivers every unacknowledged
message to the same client id, and the (device, seq) index drops what was already written.

Memory stays bounded under any flood: a payload over ``mqtt.max_message_bytes`` is reduced on
arrival to its quarantine record (size, sha256, first bytes), and received messages wait in an
inbox of at most ``ingest.max_queued_bytes``; while it is full the network thread stops reading,
so the broker keeps the rest of the stream, unacknowledged, until the ingest catches up.
"""

from __future__ import annotations

import datetime as dt
import functools
import logging
import threading
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
from prefect import task
from prefect.artifacts import create_markdown_artifact

from firmware.codec import VibrationWindow, decode
from tasks.lake import (
    CompactionReport,
    QuarantineRecord,
    Seen,
    WindowBatch,
    compact_lake,
    ingest_lease,
    load_dedupe_index,
    range_problem,
    rotate_quarantine,
    save_key_snapshot,
    window_digest,
    write_quarantine,
    write_windows,
)
from tinymlops.contracts.topics import DEVICE_SUFFIXES, FleetTopics
from tinymlops.errors import DecodeError, LakeError, TinyMLOpsError, ValidationError
from tinymlops.mqtt import BrokerAddress, connect, make_client, parse_broker_url
from tinymlops.settings import MqttSettings, SensorSettings, Settings

log = logging.getLogger(__name__)

FULL_SCALE = (np.int16(-32768), np.int16(32767))
# A continuous ingest saves its dedupe keys this often, so a restart after a kill reads few files.
_KEY_SNAPSHOT_INTERVAL_S = 600.0


@functools.lru_cache(maxsize=16)
def _fleet_topics(fleet: str, topic_root: str) -> FleetTopics:
    """The fleet's topics, built once per fleet: validation runs for every message."""
    return FleetTopics(fleet, topic_root)


def validate_message(
    topic: str, payload: bytes, *, topic_root: str, fleet: str, sensor: SensorSettings, now_s: float
) -> VibrationWindow:
    """Decode a vibration message and check it against the fleet's data-quality rules.

    Args:
        topic: Topic it arrived on.
        payload: Raw payload.
        topic_root: First topic level.
        fleet: Fleet the ingest serves.
        sensor: The fleet's sensor format and limits.
        now_s: Current UNIX time, for timestamp sanity.

    Returns:
        The decoded window.

    Raises:
        DecodeError: The payload is not a valid message (header, length, CRC).
        ValidationError: The message is valid but its content is not acceptable.
    """
    topics = _fleet_topics(fleet, topic_root)
    parsed = topics.parse(topic)
    if parsed is None or parsed[1] != "vibration":
        expected = f"{topics.prefix}/<device>/{DEVICE_SUFFIXES['vibration']}"
        raise ValidationError(f"unexpected topic {topic!r}, expected {expected}")
    window = decode(payload)
    if window.device_id != parsed[0]:
        raise ValidationError(f"device id {window.device_id!r} in payload does not match topic device {parsed[0]!r}")
    if window.sample_rate_hz != sensor.sample_rate_hz:
        raise ValidationError(f"sample rate {window.sample_rate_hz} Hz, fleet expects {sensor.sample_rate_hz} Hz")
    if window.samples.size != sensor.window_samples:
        raise ValidationError(f"window has {window.samples.size} samples, fleet expects {sensor.window_samples}")
    problem = range_problem(window.samples, window.scale, sensor.max_abs_g)
    if problem is not None:
        raise ValidationError(problem)
    clipped = int(np.count_nonzero((window.samples == FULL_SCALE[0]) | (window.samples == FULL_SCALE[1])))
    if clipped > sensor.max_clipped_fraction * window.samples.size:
        raise ValidationError(
            f"saturated: {clipped} of {window.samples.size} samples at full scale, "
            f"limit {sensor.max_clipped_fraction:.1%}"
        )
    ts_s = window.timestamp_us / 1e6
    if ts_s < sensor.min_timestamp_s:
        raise ValidationError(f"timestamp {ts_s:.0f} s is before the earliest accepted {sensor.min_timestamp_s:.0f} s")
    if ts_s > now_s + sensor.max_clock_skew_s:
        raise ValidationError(f"timestamp {ts_s - now_s:.0f} s in the future, limit {sensor.max_clock_skew_s:.0f} s")
    return window


@dataclass
class IngestStats:
    """What one ingest run did."""

    received: int = 0
    accepted: int = 0
    duplicates: int = 0
    rejected: int = 0
    batches: int = 0
    files_written: int = 0
    quarantine_files_removed: int = 0
    peak_queued_bytes: int = 0
    seconds: float = 0.0
    reject_reasons: Counter[str] = field(default_factory=Counter)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for reports."""
        return {
            "received": self.received,
            "accepted": self.accepted,
            "duplicates": self.duplicates,
            "rejected": self.rejected,
            "batches": self.batches,
            "files_written": self.files_written,
            "quarantine_files_removed": self.quarantine_files_removed,
            "peak_queued_bytes": self.peak_queued_bytes,
            "seconds": round(self.seconds, 3),
            "reject_reasons": dict(self.reject_reasons),
        }


# Bytes a queued message takes beyond its payload (the object, its topic string): counted against the inbox's bound.
_MESSAGE_OVERHEAD_BYTES = 256


@dataclass(frozen=True)
class _Received:
    """A message as received; an oversized one arrives already reduced to its quarantine record."""

    mid: int
    qos: int
    topic: str
    payload: bytes
    received_at_us: int
    oversized: QuarantineRecord | None = None

    @property
    def queued_bytes(self) -> int:
        """What it costs the inbox."""
        kept = self.oversized.payload_prefix if self.oversized is not None else self.payload
        return len(kept) + _MESSAGE_OVERHEAD_BYTES


class _Inbox:
    """Received messages waiting to be written: a FIFO bounded in bytes.

    ``put`` runs in paho's network thread and blocks while the inbox is full, so paho stops reading
    the socket and the broker holds the rest of the stream (unacknowledged, in the persistent
    session). An empty inbox always takes a message, so one message larger than the bound passes.
    """

    def __init__(self, max_bytes: int) -> None:
        self._max_bytes = max_bytes
        self._items: deque[_Received] = deque()
        self._bytes = 0
        self.peak_bytes = 0
        self._lock = threading.Lock()
        self._not_full = threading.Condition(self._lock)
        self._ready = threading.Condition(self._lock)
        self._wanted = 1
        self._producer_waiting = False
        self._closed = False
        self.last_put = time.monotonic()

    def __len__(self) -> int:
        return len(self._items)

    def put(self, message: _Received) -> bool:
        """Queue a message, waiting while the inbox is full; False once closed (the message stays unacknowledged)."""
        size = message.queued_bytes
        with self._lock:
            while self._items and self._bytes + size > self._max_bytes and not self._closed:
                self._producer_waiting = True
                self._ready.notify()  # a full inbox is a batch to write now
                self._not_full.wait()
            self._producer_waiting = False
            if self._closed:
                return False
            self._items.append(message)
            self._bytes += size
            self.peak_bytes = max(self.peak_bytes, self._bytes)
            self.last_put = time.monotonic()
            if len(self._items) >= self._wanted:
                self._ready.notify()
            return True

    def wait_ready(self, count: int, timeout_s: float) -> None:
        """Wait until ``count`` messages are queued, the inbox is full, or ``timeout_s`` passed."""
        with self._lock:
            self._wanted = count
            self._ready.wait_for(lambda: len(self._items) >= count or self._producer_waiting, timeout_s)

    def take(self, count: int) -> list[_Received]:
        """Remove and return up to ``count`` messages, oldest first."""
        with self._lock:
            taken = [self._items.popleft() for _ in range(min(count, len(self._items)))]
            self._bytes -= sum(message.queued_bytes for message in taken)
            self._not_full.notify_all()
            return taken

    def close(self) -> None:
        """Refuse further messages and release a waiting network thread."""
        with self._lock:
            self._closed = True
            self._not_full.notify_all()


@dataclass
class IngestConfig:
    """Everything one ingest run needs, resolved from settings by the caller."""

    fleet: str
    lake_root: Path
    quarantine_root: Path
    sensor: SensorSettings
    mqtt: MqttSettings
    batch_windows: int = 2000
    flush_interval_s: float = 1.0
    dedupe_horizon_days: float = 2
    dedupe_digests_per_stream: int = 8192
    max_queued_bytes: int = 64 * 1024 * 1024
    quarantine_prefix_bytes: int = 4096
    quarantine_max_bytes: int = 256 * 1024 * 1024


class Ingestor:
    """Turns batches of received messages into lake and quarantine files, remembering what it wrote."""

    def __init__(self, config: IngestConfig) -> None:
        self.config = config
        self.stats = IngestStats()
        self._seen = load_dedupe_index(
            config.lake_root,
            config.fleet,
            config.dedupe_horizon_days,
            # A crash leaves at most one batch unacknowledged: its redeliveries must all find their digest.
            digests_per_stream=max(config.dedupe_digests_per_stream, config.batch_windows),
        )

    def save_keys(self) -> None:
        """Persist the index's keys so the next start reads only the files written since (a failure only costs time)."""
        try:
            save_key_snapshot(self.config.lake_root, self.config.fleet, self._seen)
        except LakeError as exc:
            log.warning("%s; the next ingest start reads the lake's keys from the previous snapshot", exc)

    def _repeat_reason(self, seen: Seen, window: VibrationWindow) -> str | None:
        """The quarantine reason for a window whose key the lake may already hold (None: new or a redelivery)."""
        key = f"device {window.device_id} boot epoch {window.epoch} seq {window.seq}"
        if seen is Seen.CONFLICT:
            return f"seq reused with different content: {key} is already stored with other samples or metadata"
        if seen is Seen.UNVERIFIABLE:
            cfg = self.config
            return (
                f"cannot deduplicate: {key} may already be stored, and its content is beyond the dedupe index "
                f"(digests of the last {cfg.dedupe_horizon_days:g} days of arrivals, "
                f"{max(cfg.dedupe_digests_per_stream, cfg.batch_windows)} seqs per boot epoch)"
            )
        return None

    def process(self, messages: list[_Received]) -> None:
        """Validate, deduplicate and durably write one batch; raises if the lake cannot be written."""
        cfg = self.config
        batch = WindowBatch()
        rejected: list[QuarantineRecord] = []
        batch_keys: dict[tuple[str, int, int], int] = {}  # key -> content digest
        now_s = time.time()
        for msg in messages:
            if msg.oversized is not None:
                rejected.append(msg.oversized)
                self.stats.reject_reasons["message too large"] += 1
                continue
            try:
                window = validate_message(
                    msg.topic,
                    msg.payload,
                    topic_root=cfg.mqtt.topic_root,
                    fleet=cfg.fleet,
                    sensor=cfg.sensor,
                    now_s=now_s,
                )
            except (DecodeError, ValidationError) as exc:
                rejected.append(
                    QuarantineRecord.of(
                        msg.received_at_us, msg.topic, str(exc), msg.payload, cfg.quarantine_prefix_bytes
                    )
                )
                self.stats.reject_reasons[str(exc).split(":")[0]] += 1
                continue
            key = (window.device_id, window.epoch, window.seq)
            digest = window_digest(window)
            pending = batch_keys.get(key)
            if pending is not None:
                seen = Seen.DUPLICATE if pending == digest else Seen.CONFLICT
            else:
                seen = self._seen.check(*key, digest)
            if seen is Seen.DUPLICATE:
                self.stats.duplicates += 1
                continue
            reason = self._repeat_reason(seen, window)
            if reason is not None:
                rejected.append(
                    QuarantineRecord.of(msg.received_at_us, msg.topic, reason, msg.payload, cfg.quarantine_prefix_bytes)
                )
                self.stats.reject_reasons[reason.split(":")[0]] += 1
                continue
            batch_keys[key] = digest
            batch.append(cfg.fleet, window, digest=digest)
        files = write_windows(cfg.lake_root, batch) if len(batch) else []
        quarantined = write_quarantine(cfg.quarantine_root, rejected)
        if quarantined is not None:
            self.stats.quarantine_files_removed += len(rotate_quarantine(cfg.quarantine_root, cfg.quarantine_max_bytes))
        # Only now, with both written, is the batch safe to acknowledge.
        for key, digest in sorted(batch_keys.items()):  # in order: each extends its stream's last range
            self._seen.add(*key, digest)
        self.stats.received += len(messages)
        self.stats.accepted += len(batch)
        self.stats.rejected += len(rejected)
        self.stats.batches += 1
        self.stats.files_written += len(files) + (quarantined is not None)


def run_ingest(
    address: BrokerAddress,
    config: IngestConfig,
    *,
    seconds: float | None = None,
    max_windows: int | None = None,
    idle_timeout_s: float | None = None,
    stop: threading.Event | None = None,
) -> IngestStats:
    """Subscribe to a fleet's vibration topics and ingest until a bound is reached.

    Args:
        address: Broker to subscribe to.
        config: Fleet, lake paths, sensor format, batching.
        seconds: Stop after this many seconds (None: no time bound).
        max_windows: Stop once this many windows were accepted; later messages stay unacknowledged
            on the broker for the next run.
        idle_timeout_s: Stop when nothing arrived for this long (after at least one message).
        stop: Stop when this event is set (continuous mode).

    Returns:
        What was received, accepted, deduplicated and rejected.

    Raises:
        LeaseError: Another live process ingests this fleet into this lake, or another fleet under
            the same client id (see :func:`tasks.lake.ingest_lease`); refused before connecting, so
            the running ingest's session is untouched.
        LakeError: The lake cannot be read or written.
    """
    with ingest_lease(config.lake_root, config.fleet, config.mqtt.client_id):
        return _ingest_holding_lease(
            address, config, seconds=seconds, max_windows=max_windows, idle_timeout_s=idle_timeout_s, stop=stop
        )


def _ingest_holding_lease(
    address: BrokerAddress,
    config: IngestConfig,
    *,
    seconds: float | None,
    max_windows: int | None,
    idle_timeout_s: float | None,
    stop: threading.Event | None,
) -> IngestStats:
    """:func:`run_ingest` once the fleet's lease is held."""
    ingestor = Ingestor(config)
    inbox = _Inbox(config.max_queued_bytes)
    max_bytes = config.mqtt.max_message_bytes

    def batch_target() -> int:
        """Windows that make a full batch: fewer when max_windows is nearly reached."""
        if max_windows is None:
            return config.batch_windows
        return max(1, min(config.batch_windows, max_windows - ingestor.stats.accepted))

    def on_message(_client: mqtt.Client, _userdata: Any, msg: mqtt.MQTTMessage) -> None:
        received_at_us = time.time_ns() // 1000
        if len(msg.payload) > max_bytes:
            # Keep only its record: a flood of large payloads must not fill memory or the quarantine.
            reason = f"message too large: {len(msg.payload):,} bytes, limit {max_bytes:,}"
            record = QuarantineRecord.of(received_at_us, msg.topic, reason, msg.payload, config.quarantine_prefix_bytes)
            inbox.put(_Received(msg.mid, msg.qos, msg.topic, b"", received_at_us, record))
            return
        inbox.put(_Received(msg.mid, msg.qos, msg.topic, bytes(msg.payload), received_at_us))

    topic = FleetTopics(config.fleet, config.mqtt.topic_root).all_devices("vibration")

    def on_connect(client: mqtt.Client, _u: Any, _flags: Any, reason: Any, _props: Any) -> None:
        if not reason.is_failure:
            client.subscribe(topic, qos=1)

    client = make_client(address, config.mqtt.client_id, clean_session=False, manual_ack=True, settings=config.mqtt)
    client.on_message = on_message
    connect(client, address, config.mqtt.keepalive_s)
    client.on_connect = on_connect
    client.subscribe(topic, qos=1)
    log.info("ingesting %s from %s into %s", topic, address.url, config.lake_root)
    start = last_written = last_snapshot = time.monotonic()
    try:
        while True:
            inbox.wait_ready(batch_target(), config.flush_interval_s)
            messages = inbox.take(batch_target())
            if messages:
                ingestor.process(messages)
                for msg in messages:
                    client.ack(msg.mid, msg.qos)
                last_written = time.monotonic()
                if last_written - last_snapshot > _KEY_SNAPSHOT_INTERVAL_S:
                    ingestor.save_keys()
                    last_snapshot = last_written
            elapsed = time.monotonic() - start
            if max_windows is not None and ingestor.stats.accepted >= max_windows:
                break
            if seconds is not None and elapsed >= seconds:
                break
            if stop is not None and stop.is_set():
                break
            # Idle means nothing arrived for a while and nothing waits to be written, however slow the machine.
            if (
                idle_timeout_s is not None
                and ingestor.stats.received
                and not len(inbox)
                and time.monotonic() - max(inbox.last_put, last_written) > idle_timeout_s
            ):
                break
    except TinyMLOpsError:
        log.exception("ingest stopped; unacknowledged messages stay on the broker for the next run")
        raise
    finally:
        ingestor.stats.seconds = time.monotonic() - start
        ingestor.stats.peak_queued_bytes = inbox.peak_bytes
        inbox.close()  # a network thread waiting for room drops its message: the broker keeps it
        client.disconnect()
        client.loop_stop()
        ingestor.save_keys()
    log.info("ingest done: %s", ingestor.stats.to_dict())
    return ingestor.stats


def ingest_config(settings: Settings, fleet: str) -> IngestConfig:
    """Resolve an :class:`IngestConfig` of a fleet from the settings."""
    return IngestConfig(
        fleet=fleet,
        lake_root=settings.lake_root,
        quarantine_root=settings.quarantine_root,
        sensor=settings.sensor,
        mqtt=settings.mqtt,
        batch_windows=settings.ingest.batch_windows,
        flush_interval_s=settings.ingest.flush_interval_s,
        dedupe_horizon_days=settings.lake.dedupe_horizon_days,
        dedupe_digests_per_stream=settings.lake.dedupe_digests_per_stream,
        max_queued_bytes=settings.ingest.max_queued_bytes,
        quarantine_prefix_bytes=settings.lake.quarantine_prefix_bytes,
        quarantine_max_bytes=settings.lake.quarantine_max_bytes,
    )


def ingest_report_markdown(fleet: str, stats: IngestStats, window_samples: int) -> str:
    """Markdown table of one ingest run, for the Prefect UI."""
    rate = stats.accepted * window_samples / stats.seconds if stats.seconds else 0.0
    rows = [
        ("windows received", stats.received),
        ("windows accepted", stats.accepted),
        ("duplicates dropped", stats.duplicates),
        ("rejected to quarantine", stats.rejected),
        ("oldest quarantine files deleted (over its cap)", stats.quarantine_files_removed),
        ("peak bytes received and not yet written", f"{stats.peak_queued_bytes:,}"),
        ("files written", stats.files_written),
        ("seconds", f"{stats.seconds:.1f}"),
        ("samples/s into the lake", f"{rate:,.0f}"),
    ]
    rows += [(f"rejected: {reason}", count) for reason, count in sorted(stats.reject_reasons.items())]
    body = "\n".join(f"| {name} | {value} |" for name, value in rows)
    return f"# Ingest of fleet `{fleet}`\n\n| measure | value |\n|---|---|\n{body}\n"


@task(name="ingest-vibration", task_run_name="ingest-{config.fleet}")
def ingest_vibration(
    config: IngestConfig,
    broker_url: str,
    seconds: float | None = None,
    max_windows: int | None = None,
    idle_timeout_s: float | None = None,
) -> IngestStats:
    """Prefect task: ingest a fleet's windows from a broker into the lake."""
    stats = run_ingest(
        parse_broker_url(broker_url),
        config,
        seconds=seconds,
        max_windows=max_windows,
        idle_timeout_s=idle_timeout_s,
    )
    create_markdown_artifact(
        ingest_report_markdown(config.fleet, stats, config.sensor.window_samples),
        key=f"ingest-{config.fleet}".lower(),
        description=f"Ingest of fleet {config.fleet}",
    )
    return stats


@task(name="compact-lake", task_run_name="compact-{fleet}")
def compact_lake_partitions(lake_root: Path, fleet: str, compact_after_minutes: float) -> CompactionReport:
    """Prefect task: merge the files of a fleet's hour partitions closed ``compact_after_minutes`` ago or more."""
    closed_before = dt.datetime.now(tz=dt.UTC) - dt.timedelta(minutes=compact_after_minutes)
    return compact_lake(lake_root, fleet=fleet, closed_before=closed_before)


def ensure_subscription(address: BrokerAddress, config: IngestConfig) -> None:
    """Create the ingest's persistent session on the broker so windows published before it runs are kept."""
    client = make_client(address, config.mqtt.client_id, clean_session=False, settings=config.mqtt)
    connect(client, address, config.mqtt.keepalive_s)
    try:
        done = threading.Event()
        client.on_subscribe = lambda *_args: done.set()
        client.subscribe(FleetTopics(config.fleet, config.mqtt.topic_root).all_devices("vibration"), qos=1)
        done.wait(5)
    finally:
        client.disconnect()
        client.loop_stop()
