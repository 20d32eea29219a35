"""Device drift summaries collected from the broker into a durable store, for the monitor.

Nodes that score on board publish a :class:`~firmware.ota.DriftSummary` per period on their
``summary`` topic instead of streaming raw windows (the bandwidth-friendly path). The collector
keeps a persistent MQTT session (clean_session=False, QoS 1, one client id per fleet), so the
broker queues summaries published between two monitor runs, and acknowledges each one only once
it is in the store: a crash between receive and write loses nothing, the broker redelivers it.

The store is one SQLite file (``<data_dir>/summaries.sqlite``) with two tables:

* ``summaries``: one row per (fleet, device, model, version, start_ts, end_ts), the message as
  received; a redelivered or re-published summary is recognised by that key and not stored twice;
* ``devices``: each device's latest announcement (retained on ``announce``), which names its MCU
  profile: the monitor judges a device with the champion of that profile.
"""

from __future__ import annotations

import logging
import queue
import sqlite3
import threading
import time
from collections.abc import Iterator
from contextlib import closing, contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import paho.mqtt.client as mqtt
from prefect import task
from prefect.cache_policies import NO_CACHE

from firmware.ota import Announcement, DriftSummary, OtaDecodeError
from tinymlops.contracts.topics import FleetTopics
from tinymlops.mqtt import BrokerAddress, connect, make_client
from tinymlops.settings import MqttSettings

log = logging.getLogger(__name__)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS summaries (
    fleet TEXT NOT NULL, device TEXT NOT NULL, model TEXT NOT NULL, version INTEGER NOT NULL,
    start_ts REAL NOT NULL, end_ts REAL NOT NULL, received_ts REAL NOT NULL, payload BLOB NOT NULL,
    PRIMARY KEY (fleet, device, model, version, start_ts, end_ts)
);
CREATE INDEX IF NOT EXISTS summaries_by_end ON summaries (fleet, end_ts);
CREATE TABLE IF NOT EXISTS devices (
    fleet TEXT NOT NULL, device TEXT NOT NULL, profile TEXT NOT NULL, announced_ts REAL NOT NULL,
    payload BLOB NOT NULL, PRIMARY KEY (fleet, device)
);
"""


def summary_store_path(data_dir: Path) -> Path:
    """Where a data directory keeps its summary store."""
    return data_dir / "summaries.sqlite"


class SummaryStore:
    """Durable, deduplicated drift summaries and device profiles of every fleet (one SQLite file)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        path.parent.mkdir(parents=True, exist_ok=True)
        with self._connection() as db:
            db.executescript(_SCHEMA)

    @contextmanager
    def _connection(self) -> Iterator[sqlite3.Connection]:
        with closing(sqlite3.connect(self.path, timeout=30)) as db, db:  # commits on success
            yield db

    def add_summary(self, fleet: str, summary: DriftSummary, received_ts: float) -> bool:
        """Store a summary; False when it was already stored (a redelivery or a re-publish)."""
        with self._connection() as db:
            cursor = db.execute(
                "INSERT OR IGNORE INTO summaries VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
                (fleet, summary.device, summary.model, summary.version, summary.start_ts, summary.end_ts,
                 received_ts, summary.encode()),
            )  # fmt: skip
            return cursor.rowcount == 1

    def record_announcement(self, fleet: str, announcement: Announcement) -> None:
        """Keep a device's announcement unless a newer one is stored."""
        with self._connection() as db:
            db.execute(
                "INSERT INTO devices VALUES (?, ?, ?, ?, ?) ON CONFLICT (fleet, device) DO UPDATE SET "
                "profile = excluded.profile, announced_ts = excluded.announced_ts, payload = excluded.payload "
                "WHERE excluded.announced_ts >= devices.announced_ts",
                (fleet, announcement.device, announcement.profile, announcement.ts, announcement.encode()),
            )

    def summaries(self, fleet: str, since_ts: float, until_ts: float) -> list[DriftSummary]:
        """A fleet's summaries whose period ends in ``[since_ts, until_ts)``, by device and end."""
        with self._connection() as db:
            rows = db.execute(
                "SELECT device, payload FROM summaries WHERE fleet = ? AND end_ts >= ? AND end_ts < ? "
                "ORDER BY device, end_ts",
                (fleet, since_ts, until_ts),
            ).fetchall()
        return [DriftSummary.decode_from(device, payload) for device, payload in rows]

    def profiles(self, fleet: str) -> dict[str, str]:
        """Device id to the MCU profile of its latest announcement."""
        with self._connection() as db:
            rows = db.execute("SELECT device, profile FROM devices WHERE fleet = ?", (fleet,)).fetchall()
        return dict(rows)


@dataclass
class CollectionStats:
    """What one collection run received.

    Attributes:
        fleet: Fleet collected.
        summaries_received: Summary messages received (duplicates included).
        summaries_stored: New summaries stored.
        duplicates: Summaries already in the store (QoS 1 redelivery, a re-publish).
        announcements: Announcements received (device profiles); the retained ones come again
            on every run's subscription, the store keeps the latest of each device.
        invalid: Messages dropped as invalid, by reason.
        speed_fallback: Per device, windows of its new summaries scored at the fallback speed.
        seconds: How long it listened.
    """

    fleet: str
    summaries_received: int = 0
    summaries_stored: int = 0
    duplicates: int = 0
    announcements: int = 0
    invalid: dict[str, int] = field(default_factory=dict)
    speed_fallback: dict[str, int] = field(default_factory=dict)
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        """As a JSON-ready dict."""
        return asdict(self)


def collector_client_id(fleet: str) -> str:
    """The persistent session's client id: one per fleet, so the broker queues its summaries between runs."""
    return f"tinymlops-summaries-{fleet}"


def collect_summaries(
    address: BrokerAddress,
    topics: FleetTopics,
    store: SummaryStore,
    *,
    seconds: float,
    max_summaries: int | None = None,
    quiet_s: float = 1.0,
    settings: MqttSettings | None = None,
) -> CollectionStats:
    """Receive a fleet's drift summaries and announcements into the store, for a bounded time.

    Stops after ``seconds``, after ``max_summaries`` summary messages, or once nothing arrived for
    ``quiet_s`` (the queued and retained messages come in a burst on connect).

    Raises:
        BrokerError: The broker cannot be reached.
    """
    stats = CollectionStats(topics.fleet)
    inbox: queue.Queue[mqtt.MQTTMessage] = queue.Queue()
    subscribed = threading.Event()
    subscriptions = [(topics.all_devices("summary"), 1), (topics.all_devices("announce"), 1)]
    client = make_client(
        address, collector_client_id(topics.fleet), clean_session=False, manual_ack=True, settings=settings
    )
    client.on_message = lambda _c, _u, message: inbox.put(message)
    client.on_subscribe = lambda *_args: subscribed.set()
    start = time.monotonic()
    connect(client, address)
    client.on_connect = lambda c, _u, _f, reason, _p: None if reason.is_failure else c.subscribe(subscriptions)
    client.subscribe(subscriptions)
    try:
        subscribed.wait(min(seconds, 10.0))
        last = time.monotonic()
        while (now := time.monotonic()) - start < seconds and now - last < quiet_s:
            if max_summaries is not None and stats.summaries_received >= max_summaries:
                break
            try:
                message = inbox.get(timeout=min(quiet_s, seconds) / 4)
            except queue.Empty:
                continue
            last = time.monotonic()
            _store_message(message, topics, store, stats)
            client.ack(message.mid, message.qos)  # only once it is in the store
    finally:
        client.disconnect()
        client.loop_stop()
        stats.seconds = time.monotonic() - start
    log.info(
        "collected %d summaries of fleet %s (%d new, %d duplicates), %d announcements, %d invalid",
        stats.summaries_received, topics.fleet, stats.summaries_stored, stats.duplicates, stats.announcements,
        sum(stats.invalid.values()),
    )  # fmt: skip
    return stats


def _store_message(message: mqtt.MQTTMessage, topics: FleetTopics, store: SummaryStore, stats: CollectionStats) -> None:
    parsed = topics.parse(message.topic)
    payload = bytes(message.payload)
    if parsed is None or not payload:  # a cleared retained announcement
        return
    device, kind = parsed
    try:
        if kind == "announce":
            announcement = Announcement.decode_from(device, payload)
            if announcement.fleet != topics.fleet:
                raise ValueError(f"announcement names fleet {announcement.fleet} on a topic of {topics.fleet}")
            store.record_announcement(topics.fleet, announcement)
            stats.announcements += 1
            return
        summary = DriftSummary.decode_from(device, payload)
    except (OtaDecodeError, ValueError) as exc:
        log.warning("dropping an invalid %s message of %s: %s", kind, device, exc)
        stats.invalid[kind] = stats.invalid.get(kind, 0) + 1
        return
    stats.summaries_received += 1
    if store.add_summary(topics.fleet, summary, time.time()):
        stats.summaries_stored += 1
        stats.speed_fallback[device] = stats.speed_fallback.get(device, 0) + summary.speed_fallback
    else:
        stats.duplicates += 1


@task(name="collect-summaries", retries=1, retry_delay_seconds=3, cache_policy=NO_CACHE)
def collect_summaries_task(
    address: BrokerAddress,
    topics: FleetTopics,
    store: SummaryStore,
    seconds: float,
    max_summaries: int | None = None,
    settings: MqttSettings | None = None,
) -> CollectionStats:
    """Prefect task: :func:`collect_summaries`."""
    return collect_summaries(address, topics, store, seconds=seconds, max_summaries=max_summaries, settings=settings)
