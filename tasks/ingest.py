"""MQTT ingest: validate vibration windows, write them to the lake, acknowledge only after the write.

The subscriber keeps a persistent session (clean_session=False) at QoS 1 and acknowledges each
message manually once the batch holding it is durably in the lake (or in the quarantine). A crash
between receive and write therefore loses nothing: the broker redelivers every unacknowledged
message to the same client id, and the (device, seq) index drops what was already written.
"""

from __future__ import annotations

import datetime as dt
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
    save_key_snapshot,
    window_digest,
    write_quarantine,
    write_windows,
)
from tinymlops.errors import DecodeError, LakeError, TinyMLOpsError, ValidationError
from tinymlops.mqtt import BrokerAddress, connect, make_client, parse_broker_url
from tinymlops.settings import MqttSettings, SensorSettings, Settings, get_settings

log = logging.getLogger(__name__)

FULL_SCALE = (np.int16(-32768), np.int16(32767))
# A continuous ingest saves its dedupe keys this often, so a restart after a kill reads few files.
_KEY_SNAPSHOT_INTERVAL_S = 600.0


def vibration_topic(topic_root: str, fleet: str, device: str) -> str:
    """Topic a sensor node publishes its windows to."""
    return f"{topic_root}/{fleet}/{device}/vibration"


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
    parts = topic.split("/")
    if len(parts) != 4 or parts[0] != topic_root or parts[1] != fleet or parts[3] != "vibration":
        raise ValidationError(f"unexpected topic {topic!r}, expected {vibration_topic(topic_root, fleet, '<device>')}")
    window = decode(payload)
    if window.device_id != parts[2]:
        raise ValidationError(f"device id {window.device_id!r} in payload does not match topic device {parts[2]!r}")
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
    seconds: float = 0.0
    reject_reasons: Counter[str] = field(default_factory=Counter)

    @property
    def samples_per_s(self) -> float:
        """Accepted samples per second of wall time (filled by the caller that knows the window size)."""
        return 0.0 if self.seconds <= 0 else self.accepted / self.seconds

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for reports."""
        return {
            "received": self.received,
            "accepted": self.accepted,
            "duplicates": self.duplicates,
            "rejected": self.rejected,
            "batches": self.batches,
            "files_written": self.files_written,
            "seconds": round(self.seconds, 3),
            "reject_reasons": dict(self.reject_reasons),
        }


@dataclass(frozen=True)
class _Received:
    mid: int
    qos: int
    topic: str
    payload: bytes
    received_at_us: int


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
                rejected.append(QuarantineRecord(msg.received_at_us, msg.topic, str(exc), msg.payload))
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
                rejected.append(QuarantineRecord(msg.received_at_us, msg.topic, reason, msg.payload))
                self.stats.reject_reasons[reason.split(":")[0]] += 1
                continue
            batch_keys[key] = digest
            batch.append(cfg.fleet, window, digest=digest)
        files = write_windows(cfg.lake_root, batch) if len(batch) else []
        quarantined = write_quarantine(cfg.quarantine_root, rejected)
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
    inbox: deque[_Received] = deque()
    arrived = threading.Event()

    def batch_target() -> int:
        """Windows that make a full batch: fewer when max_windows is nearly reached."""
        if max_windows is None:
            return config.batch_windows
        return max(1, min(config.batch_windows, max_windows - ingestor.stats.accepted))

    def on_message(_client: mqtt.Client, _userdata: Any, msg: mqtt.MQTTMessage) -> None:
        inbox.append(_Received(msg.mid, msg.qos, msg.topic, bytes(msg.payload), time.time_ns() // 1000))
        if len(inbox) >= batch_target():
            arrived.set()

    topic = vibration_topic(config.mqtt.topic_root, config.fleet, "+")

    def on_connect(client: mqtt.Client, _u: Any, _flags: Any, reason: Any, _props: Any) -> None:
        if not reason.is_failure:
            client.subscribe(topic, qos=1)

    client = make_client(address, config.mqtt.client_id, clean_session=False, manual_ack=True, settings=config.mqtt)
    client.on_message = on_message
    connect(client, address, config.mqtt.keepalive_s)
    client.on_connect = on_connect
    client.subscribe(topic, qos=1)
    log.info("ingesting %s from %s into %s", topic, address.url, config.lake_root)
    start = time.monotonic()
    last_arrival = last_snapshot = start
    try:
        while True:
            if len(inbox) < batch_target():
                # Clear first, then look again, so a batch completed in between still wakes us.
                arrived.clear()
                if len(inbox) < batch_target():
                    arrived.wait(config.flush_interval_s)
            take = min(len(inbox), batch_target())
            if take:
                messages = [inbox.popleft() for _ in range(take)]
                ingestor.process(messages)
                for msg in messages:
                    client.ack(msg.mid, msg.qos)
                last_arrival = time.monotonic()
                if last_arrival - last_snapshot > _KEY_SNAPSHOT_INTERVAL_S:
                    ingestor.save_keys()
                    last_snapshot = last_arrival
            elapsed = time.monotonic() - start
            if max_windows is not None and ingestor.stats.accepted >= max_windows:
                break
            if seconds is not None and elapsed >= seconds:
                break
            if stop is not None and stop.is_set():
                break
            if (
                idle_timeout_s is not None
                and ingestor.stats.received
                and time.monotonic() - last_arrival > idle_timeout_s
            ):
                break
    except TinyMLOpsError:
        log.exception("ingest stopped; unacknowledged messages stay on the broker for the next run")
        raise
    finally:
        ingestor.stats.seconds = time.monotonic() - start
        client.disconnect()
        client.loop_stop()
        ingestor.save_keys()
    log.info("ingest done: %s", ingestor.stats.to_dict())
    return ingestor.stats


def ingest_config(settings: Settings, fleet: str | None = None) -> IngestConfig:
    """Resolve an :class:`IngestConfig` from the settings."""
    return IngestConfig(
        fleet=fleet or settings.fleet,
        lake_root=settings.lake_root,
        quarantine_root=settings.quarantine_root,
        sensor=settings.sensor,
        mqtt=settings.mqtt,
        batch_windows=settings.ingest.batch_windows,
        flush_interval_s=settings.ingest.flush_interval_s,
        dedupe_horizon_days=settings.lake.dedupe_horizon_days,
        dedupe_digests_per_stream=settings.lake.dedupe_digests_per_stream,
    )


def ingest_report_markdown(fleet: str, stats: IngestStats, window_samples: int) -> str:
    """Markdown table of one ingest run, for the Prefect UI."""
    rate = stats.accepted * window_samples / stats.seconds if stats.seconds else 0.0
    rows = [
        ("windows received", stats.received),
        ("windows accepted", stats.accepted),
        ("duplicates dropped", stats.duplicates),
        ("rejected to quarantine", stats.rejected),
        ("files written", stats.files_written),
        ("seconds", f"{stats.seconds:.1f}"),
        ("samples/s into the lake", f"{rate:,.0f}"),
    ]
    rows += [(f"rejected: {reason}", count) for reason, count in sorted(stats.reject_reasons.items())]
    body = "\n".join(f"| {name} | {value} |" for name, value in rows)
    return f"# Ingest of fleet `{fleet}`\n\n| measure | value |\n|---|---|\n{body}\n"


@task(name="ingest-vibration", task_run_name="ingest-{fleet}")
def ingest_vibration(
    fleet: str,
    broker_url: str,
    seconds: float | None = None,
    max_windows: int | None = None,
    idle_timeout_s: float | None = None,
) -> IngestStats:
    """Prefect task: ingest a fleet's windows from a broker into the lake."""
    settings = get_settings()
    stats = run_ingest(
        parse_broker_url(broker_url),
        ingest_config(settings, fleet),
        seconds=seconds,
        max_windows=max_windows,
        idle_timeout_s=idle_timeout_s,
    )
    create_markdown_artifact(
        ingest_report_markdown(fleet, stats, settings.sensor.window_samples),
        key=f"ingest-{fleet}".lower(),
        description=f"Ingest of fleet {fleet}",
    )
    return stats


@task(name="compact-lake", task_run_name="compact-{fleet}")
def compact_lake_partitions(fleet: str) -> CompactionReport:
    """Prefect task: merge the files of a fleet's closed hour partitions (``lake.compact_after_minutes``)."""
    settings = get_settings()
    closed_before = dt.datetime.now(tz=dt.UTC) - dt.timedelta(minutes=settings.lake.compact_after_minutes)
    return compact_lake(settings.lake_root, fleet=fleet, closed_before=closed_before)


def ensure_subscription(address: BrokerAddress, config: IngestConfig) -> None:
    """Create the ingest's persistent session on the broker so windows published before it runs are kept."""
    client = make_client(address, config.mqtt.client_id, clean_session=False, settings=config.mqtt)
    connect(client, address, config.mqtt.keepalive_s)
    try:
        done = threading.Event()
        client.on_subscribe = lambda *_args: done.set()
        client.subscribe(vibration_topic(config.mqtt.topic_root, config.fleet, "+"), qos=1)
        done.wait(5)
    finally:
        client.disconnect()
        client.loop_stop()
