"""Fault injection: under faults and bad input the loop keeps working, loses and duplicates nothing accepted,
and never leaves a device running a broken or unauthorised model.

Everything is real: Mosquitto processes killed with SIGKILL and restarted on the same port, ingest and
device processes killed by pid, an ``mlflow server`` killed in the middle of a registration, a lake
on a full filesystem. Each test records what it sent and where it ended in :mod:`tests.fault_ledger`;
the table is printed at the end of the pytest run.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import zlib
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import paho.mqtt.client as mqtt
import pytest
from prefect import flow
from typer.testing import CliRunner

from firmware.codec import VibrationWindow, encode
from firmware.device import DeviceConfig
from firmware.device_fleet import DeviceFleet
from firmware.ota import DeviceStatus, ScoreBatch
from firmware.sensor import MachineSimulator
from firmware.signing import KeyRing, ManifestSigner, generate_keypair
from firmware.tflm import measure_arena
from registry.errors import RegistryError
from registry.models import aliases_of, register_bundle, resolve
from registry.promotion import promote
from registry.store import configure_mlflow
from registry.tracking import log_training_run
from tasks.deploy import DeployableModel, DeploymentReport, DeploymentSession
from tasks.ingest import IngestConfig, IngestStats, ensure_subscription, run_ingest
from tasks.lake import read_keys, read_quarantine, read_windows
from tasks.ota_publisher import ModelPublisher
from tasks.registration import register_bundle_task
from tests.fault_ledger import FaultRecord, record, tally_lake, unreadable_files
from tests.int8_model import int8_autoencoder
from tests.test_registry import FINGERPRINT, catalog_target, make_bundle
from tinymlops.cli import app as cli_app
from tinymlops.contracts.dsp import DspSpec, raw_features
from tinymlops.contracts.topics import FleetTopics
from tinymlops.mqtt import BrokerAddress, MosquittoBroker, connect, free_port, make_client
from tinymlops.schemas import load_bundle, registered_model_name
from tinymlops.settings import REPO_ROOT, MqttSettings, SensorSettings, reset_settings
from tinymlops.targets import get_target

pytestmark = pytest.mark.faults

FLEET = "f1"
SENSOR = SensorSettings()
Payload = tuple[str, bytes]
Key = tuple[str, int]


# --- windows, publishers, ingest --------------------------------------------------------------------


def window(device: str, seq: int, **overrides: Any) -> VibrationWindow:
    """A valid window of ``device`` (samples seeded by seq), time-stamped now; fields may be overridden."""
    fields: dict[str, Any] = {
        "device_id": device,
        "seq": seq,
        "timestamp_us": time.time_ns() // 1000,
        "sample_rate_hz": SENSOR.sample_rate_hz,
        "scale": 16 / 32767,
        "samples": np.random.default_rng(seq).normal(0, 300, SENSOR.window_samples).astype(np.int16),
    }
    fields.update(overrides)
    return VibrationWindow(**fields)


def vibration_topic(device: str) -> str:
    return f"tinymlops/{FLEET}/{device}/vibration"


def good_payloads(n_devices: int, per_device: int, rpm: Sequence[float | None] = ()) -> tuple[list[Payload], list[Key]]:
    """Interleaved windows of several devices, and their (device, seq) keys; device ``d`` sends ``rpm[d]`` if given."""
    keys = [(f"node-{d:04d}", s) for s in range(per_device) for d in range(n_devices)]
    speed = dict(enumerate(rpm))
    return [(vibration_topic(d), encode(window(d, s, rpm=speed.get(int(d[-4:]))))) for d, s in keys], keys


def ingest_config(root: Path, client_id: str, *, lake: Path | None = None, batch: int = 200) -> IngestConfig:
    return IngestConfig(
        fleet=FLEET,
        lake_root=lake or root / "lake",
        quarantine_root=root / "quarantine",
        sensor=SENSOR,
        mqtt=MqttSettings(client_id=client_id),
        batch_windows=batch,
        flush_interval_s=0.2,
    )


def wait_until(condition: Callable[[], bool], timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout_s:.0f} s waiting for {what}")
        time.sleep(0.05)


def publish_all(address: BrokerAddress, payloads: list[Payload], *, retain: bool = False) -> None:
    """Publish at QoS 1 and wait for every PUBACK."""
    client = make_client(address, "fault-publish-all")
    connect(client, address)
    try:
        for info in [client.publish(t, p, qos=1, retain=retain) for t, p in payloads]:
            info.wait_for_publish(timeout=30)
    finally:
        client.disconnect()
        client.loop_stop()


def lake_rows(lake: Path) -> int:
    return len(read_windows(lake, fleet=FLEET))


class Publisher:
    """A QoS 1 publisher that knows which messages the broker acknowledged (PUBACK).

    paho keeps every unacknowledged QoS 1 message and sends it again (DUP) after it reconnects,
    and queues what is published while the broker is away.
    """

    def __init__(self, address: BrokerAddress, client_id: str = "fault-publisher") -> None:
        self._lock = threading.Lock()
        self._mids: set[int] = set()
        self._acked: set[int] = set()
        self.client = make_client(address, client_id)
        self.client.reconnect_delay_set(1, 2)
        self.client.on_publish = self._on_publish
        connect(self.client, address)

    def _on_publish(self, _c: mqtt.Client, _u: Any, mid: int, _reason: Any, _props: Any) -> None:
        with self._lock:
            self._acked.add(mid)

    def publish(self, payloads: list[Payload]) -> None:
        for t, p in payloads:
            info = self.client.publish(t, p, qos=1)
            with self._lock:
                self._mids.add(info.mid)

    @property
    def unacked(self) -> int:
        with self._lock:
            return len(self._mids - self._acked)

    def wait_acked(self, timeout_s: float) -> None:
        wait_until(lambda: self.unacked == 0, timeout_s, f"PUBACKs ({self.unacked} missing)")

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


class IngestThread:
    """``run_ingest`` in a thread of this process, stopped by an event."""

    def __init__(self, address: BrokerAddress, config: IngestConfig, idle_s: float | None = None) -> None:
        self.stop_event = threading.Event()
        self.stats: IngestStats | None = None
        self.error: BaseException | None = None
        self._thread = threading.Thread(target=self._run, args=(address, config, idle_s), daemon=True)
        self._thread.start()

    def _run(self, address: BrokerAddress, config: IngestConfig, idle_s: float | None) -> None:
        try:
            self.stats = run_ingest(address, config, seconds=120, idle_timeout_s=idle_s, stop=self.stop_event)
        except BaseException as exc:  # handed to the test
            self.error = exc

    def stop(self, *, wait_for_idle: bool = False) -> IngestStats:
        """Stop now, or let it end by itself after its idle timeout."""
        if not wait_for_idle:
            self.stop_event.set()
        self._thread.join(120)
        if self.error is not None:
            raise self.error
        assert self.stats is not None, "the ingest did not stop"
        return self.stats


def persistent_broker_config(directory: Path) -> str:
    """Mosquitto options keeping sessions, subscriptions and queued messages across a crash.

    Mosquitto persists by snapshot, not by a log: ``autosave_on_changes`` with an interval of 1
    writes the snapshot after every change, so a restart finds the ingest's session and
    subscription, and the messages it held for it.
    """
    run_as_root = "user root\n" if os.geteuid() == 0 else ""  # as root it would drop to a user that cannot write
    return (
        f"persistence true\npersistence_location {directory}/\nautosave_on_changes true\nautosave_interval 1\n"
        f"{run_as_root}"
    )


INGEST_PROCESS = """
import dataclasses, json, resource, signal, sys, threading
from pathlib import Path
from tasks.ingest import IngestConfig, run_ingest
from tinymlops.errors import TinyMLOpsError
from tinymlops.mqtt import parse_broker_url
from tinymlops.settings import MqttSettings, SensorSettings
args = json.loads(sys.argv[1])
if args.get("fsize_limit"):
    resource.setrlimit(resource.RLIMIT_FSIZE, (args["fsize_limit"], args["fsize_limit"]))
stop = threading.Event()
signal.signal(signal.SIGTERM, lambda *_: stop.set())
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * resource.getpagesize()
rss_before, rss_peak = rss(), [0]
def sample_rss():
    while not stop.wait(0.005):
        rss_peak[0] = max(rss_peak[0], rss())
threading.Thread(target=sample_rss, daemon=True).start()
known = {f.name for f in dataclasses.fields(IngestConfig)}
config = IngestConfig(fleet=args["fleet"], lake_root=Path(args["lake"]), quarantine_root=Path(args["quarantine"]),
                      sensor=SensorSettings(), mqtt=MqttSettings(client_id=args["client_id"], **args["mqtt"]),
                      **{k: v for k, v in args["config"].items() if k in known})
try:
    stats = run_ingest(parse_broker_url(args["broker"]), config, seconds=180, idle_timeout_s=args["idle_s"], stop=stop)
except TinyMLOpsError as exc:
    print(f"INGEST FAILED {type(exc).__name__}: {exc}", file=sys.stderr)
    sys.exit(3)
print(json.dumps({**stats.to_dict(), "peak_rss_growth_bytes": max(0, rss_peak[0] - rss_before)}))
"""


def ingest_process(
    address: BrokerAddress, config: IngestConfig, *, idle_s: float | None = None, fsize_limit: int | None = None
) -> subprocess.Popen[str]:
    """The ingest as its own process (as deployed), printing its stats as JSON when it ends.

    It runs until SIGTERM (:func:`stop_when`), a lake error, or ``idle_s`` without a message.
    """
    options = (
        "batch_windows",
        "flush_interval_s",
        "max_queued_bytes",
        "quarantine_prefix_bytes",
        "quarantine_max_bytes",
    )
    args = {"broker": address.url, "fleet": config.fleet, "lake": str(config.lake_root),
            "quarantine": str(config.quarantine_root), "client_id": config.mqtt.client_id,
            "mqtt": {"max_message_bytes": config.mqtt.max_message_bytes},
            "config": {name: getattr(config, name) for name in options},
            "idle_s": idle_s, "fsize_limit": fsize_limit}  # fmt: skip
    return subprocess.Popen(
        [sys.executable, "-c", INGEST_PROCESS, json.dumps(args)],
        cwd=REPO_ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def finish(process: subprocess.Popen[str], timeout_s: float = 180) -> tuple[int, dict[str, Any], str]:
    """Wait for an ingest process: exit code, its stats (empty if it failed) and its stderr."""
    out, err = process.communicate(timeout=timeout_s)
    lines = out.strip().splitlines()
    return process.returncode, json.loads(lines[-1]) if process.returncode == 0 and lines else {}, err


def stop_when(
    process: subprocess.Popen[str], condition: Callable[[], bool], what: str, timeout_s: float = 180
) -> tuple[int, dict[str, Any], str]:
    """Stop an ingest process (SIGTERM: it finishes its batch and exits 0) once ``condition`` holds.

    The condition is a count in the lake, so the run ends when the work is done however slow the
    machine is, not after an idle timeout that a loaded machine can trip mid-stream.
    """
    wait_until(lambda: condition() or process.poll() is not None, timeout_s, what)
    process.send_signal(signal.SIGTERM)
    return finish(process)


def holds(lake: Path, rows: int) -> Callable[[], bool]:
    return lambda: lake_rows(lake) >= rows


# --- 1. broker killed during ingestion ------------------------------------------------------------------


@pytest.mark.mqtt
def test_broker_killed_and_restarted_during_ingestion(tmp_path: Path) -> None:
    """SIGKILL Mosquitto mid-stream, restart it on the same port: every acknowledged window lands exactly once."""
    store = tmp_path / "mosquitto-db"
    store.mkdir()
    options = persistent_broker_config(store)
    broker = MosquittoBroker(extra_config=options).start()
    config = ingest_config(tmp_path, "fault-ingest-broker")
    ensure_subscription(broker.address, config)
    payloads, keys = good_payloads(6, 200)
    ingest = IngestThread(broker.address, config)
    publisher = Publisher(broker.address)
    restarted: MosquittoBroker | None = None
    try:
        publisher.publish(payloads[:400])
        wait_until(lambda: lake_rows(config.lake_root) > 0, 120, "the first batch in the lake")
        publisher.publish(payloads[400:800])
        unacked_at_kill = publisher.unacked
        in_lake_at_kill = lake_rows(config.lake_root)
        broker.kill()
        time.sleep(0.5)
        restarted = MosquittoBroker(port=broker.port, extra_config=options).start()
        publisher.publish(payloads[800:])
        publisher.wait_acked(120)
        wait_until(lambda: lake_rows(config.lake_root) >= len(keys), 180, "every window in the lake")
        time.sleep(0.5)  # anything redelivered late must be dropped, not written
        stats = ingest.stop()
    finally:
        publisher.stop()
        ingest.stop_event.set()
        if restarted is not None:
            restarted.stop()
    tally = tally_lake(config.lake_root, FLEET, keys)
    record(
        FaultRecord(
            "broker SIGKILL + restart during ingestion", len(keys), tally.rows, tally.duplicates, tally.lost,
            notes=f"persistent broker; {unacked_at_kill} windows un-PUBACKed at the kill (re-sent), "
            f"{in_lake_at_kill} already in the lake; {stats.duplicates} redeliveries dropped by the dedupe index",
        )
    )  # fmt: skip
    assert 0 < in_lake_at_kill < len(keys), "the kill must land mid-stream"
    assert (tally.rows, tally.duplicates, tally.lost, tally.unexpected) == (len(keys), 0, 0, 0)


def snapshot_on_disk(store: Path, quiet_s: float = 0.3) -> None:
    """Wait until Mosquitto's snapshot is written (no save in progress) and has not changed for ``quiet_s``."""
    db, tmp = store / "mosquitto.db", store / "mosquitto.db.new"
    seen: list[tuple[int, int] | None] = [None]
    since = [time.monotonic()]

    def settled() -> bool:
        state = None if tmp.exists() or not db.exists() else (db.stat().st_mtime_ns, db.stat().st_size)
        if state != seen[0]:
            seen[0], since[0] = state, time.monotonic()
        return state is not None and time.monotonic() - since[0] >= quiet_s

    wait_until(settled, 10, f"mosquitto's snapshot in {store}")


def queued_then_crash(root: Path, client_id: str, store: Path | None) -> tuple[int, list[Key], IngestStats]:
    """Windows acknowledged to the publisher while the ingest is offline, then the broker is SIGKILLed.

    With ``store``, the broker persists into it and is killed once its snapshot after the last
    acknowledgement is on disk; without, it keeps everything in memory. Returns the lake's window
    count after a new ingest run against the restarted broker, the keys sent, and that run's stats.
    """
    options = persistent_broker_config(store) if store is not None else ""
    broker = MosquittoBroker(extra_config=options).start()
    config = ingest_config(root / client_id, client_id)
    ensure_subscription(broker.address, config)  # the ingest's persistent session, offline between runs
    payloads, keys = good_payloads(4, 75)
    publisher = Publisher(broker.address)
    try:
        publisher.publish(payloads)
        publisher.wait_acked(60)
    finally:
        publisher.stop()
    if store is not None:
        snapshot_on_disk(store)
    broker.kill()  # every window acknowledged, none delivered yet
    restarted = MosquittoBroker(port=broker.port, extra_config=options).start()
    try:
        # With the snapshot every window comes (max_windows ends the run); without it none may, within 6 s.
        stats = run_ingest(restarted.address, config, seconds=120 if store else 6, max_windows=len(keys))
    finally:
        restarted.stop()
    return len(read_windows(config.lake_root, fleet=FLEET)), keys, stats


@pytest.mark.mqtt
def test_broker_killed_holding_windows_for_the_offline_ingest(tmp_path: Path) -> None:
    """Windows queued for the ingest's offline session survive a broker SIGKILL only with persistence on.

    Mosquitto snapshots after acknowledging, so the crash comes once the snapshot is on disk; a
    crash within milliseconds of the last PUBACK can lose what the snapshot in progress held
    (docs/RELIABILITY.md).
    """
    store = tmp_path / "mosquitto-db"
    store.mkdir()
    kept, keys, stats = queued_then_crash(tmp_path, "fault-ingest-offline", store)
    without, _, _ = queued_then_crash(tmp_path, "fault-ingest-no-persistence", None)
    record(
        FaultRecord(
            "broker SIGKILL holding windows for the offline ingest", len(keys), kept, stats.duplicates,
            len(keys) - kept,
            notes=f"persistent broker (snapshot on every change), killed after its snapshot; the same crash "
            f"without persistence lost {len(keys) - without} of {len(keys)}",
        )
    )  # fmt: skip
    assert (kept, stats.accepted, stats.duplicates) == (len(keys), len(keys), 0)
    assert without == 0  # why the zero-loss promise needs a persistent broker


# --- 3. ingest process killed mid-batch ---------------------------------------------------------------------


def grew_past(lake: Path, rows: int) -> Callable[[], bool]:
    return lambda: lake_rows(lake) > rows


@pytest.mark.mqtt
@pytest.mark.slow
def test_ingest_process_killed_repeatedly_while_windows_stream(tmp_path: Path, mosquitto: MosquittoBroker) -> None:
    """kill -9 the ingest twice at random moments of a live stream (receiving, writing or acknowledging)."""
    config = ingest_config(tmp_path, "fault-ingest-kill", batch=120)
    ensure_subscription(mosquitto.address, config)
    payloads, keys = good_payloads(8, 150)
    publisher = Publisher(mosquitto.address)

    thirds = [payloads[i * len(payloads) // 3 : (i + 1) * len(payloads) // 3] for i in range(3)]
    killed = [threading.Event(), threading.Event()]

    def stream() -> None:
        """Bursts of 30 windows every 0.25 s; each third after the next kill, so both land mid-stream however slow."""
        for third, gate in zip(thirds, [None, *killed], strict=True):
            if gate is not None:
                gate.wait(300)
            for i in range(0, len(third), 30):
                publisher.publish(third[i : i + 30])
                time.sleep(0.25)

    streamer = threading.Thread(target=stream)
    rng = random.Random(7)
    kills: list[int] = []
    victim = ingest_process(mosquitto.address, config)
    try:
        streamer.start()
        for gate in killed:
            wait_until(
                grew_past(config.lake_root, kills[-1] if kills else 0), 180, "a batch written since the last kill"
            )
            time.sleep(rng.uniform(0.0, 0.4))
            os.kill(victim.pid, signal.SIGKILL)
            victim.wait()
            kills.append(lake_rows(config.lake_root))
            gate.set()
            victim = ingest_process(mosquitto.address, config)
        streamer.join(300)
        publisher.wait_acked(120)
        code, stats, err = stop_when(victim, holds(config.lake_root, len(keys)), "every window in the lake")
    finally:
        publisher.stop()
        with contextlib.suppress(ProcessLookupError):
            victim.kill()
    tally = tally_lake(config.lake_root, FLEET, keys)
    torn = unreadable_files(config.lake_root)
    record(
        FaultRecord(
            "ingest process SIGKILL x2 mid-stream", len(keys), tally.rows, tally.duplicates, tally.lost,
            notes=f"killed with {kills[0]:,} and {kills[1]:,} windows in the lake; the restarted ingest dropped "
            f"{stats.get('duplicates', '?')} redeliveries; {len(torn)} unreadable files",
        )
    )  # fmt: skip
    assert code == 0, err[-2000:]
    assert all(0 < k < len(keys) for k in kills), kills
    assert (tally.rows, tally.duplicates, tally.lost, tally.unexpected) == (len(keys), 0, 0, 0)
    assert torn == []


@pytest.mark.mqtt
@pytest.mark.slow
def test_second_ingest_of_the_fleet_started_mid_stream(tmp_path: Path, mosquitto: MosquittoBroker) -> None:
    """A second ingest of a fleet being ingested (same lake, same session): it must refuse, not share the stream."""
    config = ingest_config(tmp_path, "fault-ingest-twice", batch=120)
    ensure_subscription(mosquitto.address, config)
    payloads, keys = good_payloads(8, 100)
    publisher = Publisher(mosquitto.address)

    def stream() -> None:  # about 6 s of windows, so the second ingest starts while they arrive
        for i in range(0, len(payloads), 30):
            publisher.publish(payloads[i : i + 30])
            time.sleep(0.2)

    streamer = threading.Thread(target=stream)
    first = ingest_process(mosquitto.address, config)
    second: subprocess.Popen[str] | None = None
    try:
        streamer.start()
        wait_until(grew_past(config.lake_root, 0), 180, "the first ingest's first batch")
        started = time.monotonic()
        second = ingest_process(mosquitto.address, config)
        second_code, _, second_err = finish(second)
        second_s = time.monotonic() - started
        streamer.join(60)
        publisher.wait_acked(60)
        code, stats, err = stop_when(first, holds(config.lake_root, len(keys)), "every window in the lake")
    finally:
        publisher.stop()
        for process in (first, second):
            with contextlib.suppress(ProcessLookupError, AttributeError):
                process.kill()  # type: ignore[union-attr]
    tally = tally_lake(config.lake_root, FLEET, keys)
    refusal = second_err.strip().splitlines()[-1] if second_err.strip() else "none"
    record(
        FaultRecord(
            "second ingest of the same fleet mid-stream", len(keys), tally.rows, tally.duplicates, tally.lost,
            notes=f"the second exited {second_code} after {second_s:.1f} s: {refusal.split(':')[0]}; "
            f"the first accepted {stats.get('accepted', '?')}",
        )
    )  # fmt: skip
    assert code == 0, err[-2000:]
    assert second_code == 3, second_err[-2000:]
    assert refusal.startswith(f"INGEST FAILED LeaseError: fleet {FLEET} is already being ingested"), refusal
    assert f"by pid {first.pid} on " in refusal
    assert (tally.rows, tally.duplicates, tally.lost, tally.unexpected) == (len(keys), 0, 0, 0)


# --- 6. disk full under the lake ----------------------------------------------------------------------------


@contextlib.contextmanager
def small_filesystem(path: Path, size_bytes: int) -> Iterator[bool]:
    """A tmpfs of ``size_bytes`` mounted at ``path``; yields False (a plain directory) where mounting is not allowed."""
    path.mkdir()
    mounted = (
        os.geteuid() == 0
        and shutil.which("mount") is not None
        and subprocess.run(
            ["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(path)], capture_output=True
        ).returncode
        == 0
    )
    try:
        yield mounted
    finally:
        if mounted:
            subprocess.run(["umount", "-l", str(path)], check=False)


@pytest.mark.mqtt
def test_disk_full_under_the_lake_loses_nothing_acknowledged(tmp_path: Path, mosquitto: MosquittoBroker) -> None:
    """The lake's filesystem fills up mid-ingest: a clear LakeError, no torn file; after freeing space, all arrive once.

    The lake lives on an 8 MiB tmpfs, mostly taken by another file. Where the test may not mount
    (not root), the ingest runs with a file-size limit (RLIMIT_FSIZE) instead, which fails its
    writes the same way (EFBIG instead of ENOSPC).
    """
    lake = tmp_path / "small-fs"
    with small_filesystem(lake, 8 * 1024 * 1024) as mounted:
        filler = lake / "other-data.bin"
        if mounted:  # leave about 170 kB: room for roughly half the windows (900 take 344 kB)
            filler.write_bytes(b"\0" * (shutil.disk_usage(lake).free - 170_000))
        config = ingest_config(tmp_path, "fault-ingest-disk", lake=lake / "lake", batch=100)
        ensure_subscription(mosquitto.address, config)
        payloads, keys = good_payloads(6, 150)
        publisher = Publisher(mosquitto.address)
        publisher.publish(payloads)
        publisher.wait_acked(60)
        publisher.stop()

        code, _, err = finish(ingest_process(mosquitto.address, config, fsize_limit=None if mounted else 16_000))
        at_failure = tally_lake(config.lake_root, FLEET, keys)
        torn = unreadable_files(lake)
        leftovers = [p for p in lake.rglob(".tmp-*")]
        filler.unlink(missing_ok=True)  # free the space
        code_after, stats_after, err_after = stop_when(
            ingest_process(mosquitto.address, config), holds(config.lake_root, len(keys)), "every window in the lake"
        )
        final = tally_lake(config.lake_root, FLEET, keys)
    how = "8 MiB tmpfs, ENOSPC" if mounted else "RLIMIT_FSIZE 16 kB, EFBIG (tmpfs not mountable)"
    record(
        FaultRecord(
            "disk full under the lake", len(keys), final.rows, final.duplicates, final.lost,
            notes=f"{how}; ingest stopped with LakeError at {at_failure.rows:,} windows, {len(torn)} unreadable "
            f"and {len(leftovers)} temporary files left; after freeing space the restart wrote "
            f"{stats_after.get('accepted', 0):,} more",
        )
    )  # fmt: skip
    failure = [line for line in err.splitlines() if line.startswith("INGEST FAILED")]
    assert code == 3 and failure, err[-2000:]
    assert "LakeError: cannot write" in failure[0] and ("No space left" in failure[0] or "File too large" in failure[0])
    assert at_failure.rows < len(keys) and at_failure.duplicates == 0
    assert torn == [] and leftovers == []
    assert code_after == 0, err_after[-2000:]
    assert (final.rows, final.duplicates, final.lost, final.unexpected) == (len(keys), 0, 0, 0)


# --- 7. a flood of malformed messages ------------------------------------------------------------------------

MALFORMED_REASONS = {
    "garbage": ("bad magic", "truncated message", "unsupported header version", "bad CRC"),
    "bit flip": ("bad CRC",),
    "truncated": ("truncated message",),
    "wrong rate": ("sample rate 48000 Hz, fleet expects 25600 Hz",),
    "wrong length": ("window has 512 samples",),
    "saturated": ("saturated",),
    "future timestamp": ("in the future",),
    "wrong device": ("does not match topic device",),
}


def malformed(kind: str, i: int, rng: np.random.Generator) -> Payload:
    """One bad message of a kind; every payload is unique (its seq is in it, or it is random)."""
    device, seq = f"node-{i % 4:04d}", 1_000_000 + i
    topic = vibration_topic(device)
    if kind == "garbage":
        return topic, rng.bytes(int(rng.integers(8, 3000)))
    good = encode(window(device, seq))
    if kind == "bit flip":
        flipped = bytearray(good)
        flipped[int(rng.integers(48, len(good) - 8))] ^= 0xFF  # a sample byte: only the CRC can tell
        return topic, bytes(flipped)
    if kind == "truncated":
        return topic, good[: int(rng.integers(30, len(good) - 1))]
    changes: dict[str, dict[str, Any]] = {
        "wrong rate": {"sample_rate_hz": 48_000},
        "wrong length": {"samples": np.ones(512, np.int16)},
        "saturated": {"samples": np.full(SENSOR.window_samples, 32767, np.int16)},
        "future timestamp": {"timestamp_us": time.time_ns() // 1000 + 3_600_000_000},
        "wrong device": {"device_id": "node-9999"},
    }
    return topic, encode(window(device, seq, **changes[kind]))


def sha256_of(payload: bytes) -> str:
    return hashlib.sha256(payload).hexdigest()


@pytest.mark.mqtt
def test_flood_of_malformed_messages_among_good_ones(tmp_path: Path, mosquitto: MosquittoBroker) -> None:
    """5,000 bad messages of 8 kinds interleaved with 2,000 good windows and 200 redelivered ones.

    One good window is held back and published after the broker acknowledged all the rest: the
    broker delivers one session's messages in order, so once the lake holds all 2,000 windows the
    ingest has handled every message. No idle timeout decides when it is done.
    """
    rng = np.random.default_rng(11)
    # good windows: with a tachometer, without one, and two broken ones (NaN, negative): data, never quarantined
    speeds = [1797.0, None, float("nan"), -1797.0]
    good, keys = good_payloads(4, 500, rpm=speeds)
    kinds = [kind for kind in MALFORMED_REASONS for _ in range(625)]
    bad = [malformed(kind, i, rng) for i, kind in enumerate(kinds)]
    resent_at = rng.choice(len(good) - 1, 200, replace=False)  # never the last window, which is sent last
    flood = good[:-1] + bad + [good[int(i)] for i in resent_at]
    order = rng.permutation(len(flood))
    config = ingest_config(tmp_path, "fault-ingest-flood", batch=2000)
    ensure_subscription(mosquitto.address, config)
    ingest = IngestThread(mosquitto.address, config)
    publisher = Publisher(mosquitto.address)
    try:
        publisher.publish([flood[int(i)] for i in order])
        publisher.wait_acked(180)
        publisher.publish(good[-1:])
        publisher.wait_acked(60)
        wait_until(lambda: lake_rows(config.lake_root) >= len(keys), 180, "every good window in the lake")
    finally:
        publisher.stop()
        stats = ingest.stop()
    tally = tally_lake(config.lake_root, FLEET, keys)
    stored = read_windows(config.lake_root, fleet=FLEET)
    expected_rpm = np.asarray([speeds[int(d[-4:])] or np.nan for d in stored.device], np.float32)
    broken = int(
        np.count_nonzero(np.isnan(stored.rpm[stored.device == "node-0002"])) + np.count_nonzero(stored.rpm < 0)
    )
    quarantine = read_quarantine(config.quarantine_root).to_pydict()
    sent_bad = {sha256_of(payload): (kind, payload) for kind, (_, payload) in zip(kinds, bad, strict=True)}
    kind_of = {digest: kind for digest, (kind, _) in sent_bad.items()}
    quarantined = Counter(kind_of.get(digest, "not sent as bad") for digest in quarantine["payload_sha256"])
    wrong_reason = [
        (kind_of.get(digest), reason)
        for digest, reason in zip(quarantine["payload_sha256"], quarantine["reason"], strict=True)
        if not any(expected in reason for expected in MALFORMED_REASONS.get(kind_of.get(digest, ""), ()))
    ]
    wrong_record = [
        digest
        for digest, size, prefix in zip(
            quarantine["payload_sha256"], quarantine["payload_bytes"], quarantine["payload_prefix"], strict=True
        )
        if digest in sent_bad and (size, prefix) != (len(sent_bad[digest][1]), sent_bad[digest][1][:4096])
    ]
    record(
        FaultRecord(
            "flood: 5,000 malformed among 2,000 good", len(keys), tally.rows, tally.duplicates, tally.lost,
            notes=f"{len(quarantine['reason']):,} quarantined with reasons ({len(kinds):,} bad sent, 8 kinds); "
            f"200 redelivered good windows dropped as duplicates: {stats.duplicates}; of the good, {broken:,} from a "
            "broken tachometer (rpm NaN or negative) stored with the rpm as sent, for the scorer's fallback",
        )
    )  # fmt: skip
    assert (tally.rows, tally.duplicates, tally.lost, tally.unexpected) == (len(keys), 0, 0, 0)
    assert (stats.received, stats.accepted, stats.rejected, stats.duplicates) == (len(flood) + 1, 2000, 5000, 200)
    assert quarantined == Counter(kinds)
    np.testing.assert_array_equal(stored.rpm, expected_rpm)
    assert broken == 1000
    assert wrong_reason == [], wrong_reason[:5]
    assert wrong_record == [], wrong_record[:5]


# --- 8. a flood of oversized payloads ---------------------------------------------------------------------------

MiB = 1024 * 1024


@pytest.mark.mqtt
def test_flood_of_oversized_payloads_keeps_memory_and_quarantine_bounded(tmp_path: Path) -> None:
    """Payloads of 4 and 10 MiB among good windows: memory, inbox and quarantine stay bounded, no window lost.

    The broker here drops publishes over 8 MiB (``message_size_limit``), as a deployment's broker
    with a looser limit than the ingest's would; the 4 MiB ones reach the ingest, which keeps of
    each only a record (reason, size, sha256, 256 bytes) in a quarantine capped at 12 KiB, and holds
    at most 64 KiB of received messages (the rest wait, unacknowledged, on the broker).
    """
    rng = np.random.default_rng(13)
    good, keys = good_payloads(4, 100)
    large = [(vibration_topic(f"node-{i % 4:04d}"), rng.bytes(4 * MiB)) for i in range(10)]
    huge = [(vibration_topic(f"node-{i % 4:04d}"), rng.bytes(10 * MiB)) for i in range(3)]
    stream: list[Payload] = []
    for i, payload in enumerate(good[:-1]):  # a large payload every 40 windows, a huge one every 130
        stream += [payload, *([large[i // 40]] if i % 40 == 20 else []), *([huge[i // 130]] if i % 130 == 60 else [])]
    config = dataclasses.replace(
        ingest_config(tmp_path, "fault-ingest-oversized", batch=50),
        max_queued_bytes=64 * 1024,
        quarantine_prefix_bytes=256,
        quarantine_max_bytes=12 * 1024,
    )
    broker = MosquittoBroker(max_message_bytes=8 * MiB).start()
    publisher: Publisher | None = None
    ingest: subprocess.Popen[str] | None = None
    try:
        ensure_subscription(broker.address, config)
        publisher = Publisher(broker.address)
        publisher.publish(stream)
        publisher.wait_acked(120)  # the broker acknowledges the huge ones too, and drops them
        publisher.publish(good[-1:])  # the broker keeps one session's order: when it is in the lake, all came
        publisher.wait_acked(60)
        ingest = ingest_process(broker.address, config)
        code, stats, err = stop_when(ingest, holds(config.lake_root, len(keys)), "every good window in the lake")
    finally:
        if publisher is not None:
            publisher.stop()
        if ingest is not None:
            with contextlib.suppress(ProcessLookupError):
                ingest.kill()
        broker.stop()
    assert code == 0, err[-2000:]
    tally = tally_lake(config.lake_root, FLEET, keys)
    quarantine = read_quarantine(config.quarantine_root).to_pydict()
    quarantine_bytes = sum(path.stat().st_size for path in config.quarantine_root.rglob("*.parquet"))
    order = [sha256_of(payload) for _, payload in large]
    kept = quarantine["payload_sha256"]
    growth = stats["peak_rss_growth_bytes"]
    record(
        FaultRecord(
            "flood of oversized payloads", len(keys), tally.rows, tally.duplicates, tally.lost,
            notes=f"10 x 4 MiB and 3 x 10 MiB payloads among the windows; the broker (limit 8 MiB) acknowledged "
            f"and dropped the 10 MiB ones; the ingest (limit 256 KiB) quarantined {stats['rejected']} records of "
            f"256 bytes + sha256; quarantine {quarantine_bytes:,} bytes (cap 12 KiB, {len(kept)} records left, "
            f"{stats['quarantine_files_removed']} oldest files deleted); inbox peak {stats['peak_queued_bytes']:,} "
            f"bytes (cap 64 KiB); ingest peak RSS +{growth / MiB:.1f} MiB for 40 MiB received",
        )
    )  # fmt: skip
    assert (tally.rows, tally.duplicates, tally.lost, tally.unexpected) == (len(keys), 0, 0, 0)
    assert (stats["received"], stats["accepted"], stats["rejected"]) == (len(keys) + len(large), len(keys), len(large))
    assert stats["reject_reasons"] == {"message too large": len(large)}
    assert all(reason.startswith("message too large: 4,194,304 bytes") for reason in quarantine["reason"])
    assert set(quarantine["payload_bytes"]) == {4 * MiB}
    assert [prefix for prefix in quarantine["payload_prefix"]] == [
        large[order.index(digest)][1][:256] for digest in kept
    ]
    assert quarantine_bytes <= 12 * 1024 and stats["quarantine_files_removed"] > 0
    assert kept == order[len(order) - len(kept) :], "rotation deletes the oldest records first"
    assert stats["peak_queued_bytes"] <= 64 * 1024
    # Holding what it received would take more than the 40 MiB of payloads (main: +235 MiB, 73 MB quarantine).
    assert growth < 40 * MiB, f"ingest peak RSS grew {growth / MiB:.1f} MiB"


def as_version_1(payload: bytes) -> bytes:
    """A version-3 message as a device without a boot counter sends it: the v1 header, no epoch, no rpm or load."""
    body = payload[:2] + b"\x01" + payload[3:4] + payload[8:28] + payload[36:-4]
    return body + zlib.crc32(body).to_bytes(4, "little")


@pytest.mark.mqtt
def test_device_restart_reusing_seqs_from_zero(
    tmp_path: Path, mosquitto: MosquittoBroker, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``tinymlops simulate --windows 5`` twice: every node starts again at seq 0, the second run with a fault."""
    data = tmp_path / "data"
    config = ingest_config(tmp_path, "fault-restart", lake=data / "lake")
    ensure_subscription(mosquitto.address, config)
    monkeypatch.setenv("TINYMLOPS_DATA_DIR", str(data))
    reset_settings()
    simulate = ["simulate", "--fleet", FLEET, "--devices", "2", "--windows", "5", "--broker", mosquitto.address.url]
    try:
        for extra in ([], ["--fault", "inner_race:0.8:node-0001"]):  # the CLI in this process: no start-up cost
            run = CliRunner().invoke(cli_app, [*simulate, *extra])
            assert run.exit_code == 0, run.output
    finally:
        reset_settings()
    # A device without a boot counter (version-1 header) restarting at seq 0 with other samples.
    legacy = [(vibration_topic("legacy-01"), as_version_1(encode(window("legacy-01", s % 5, samples=np.full(
        SENSOR.window_samples, s, np.int16))))) for s in range(10)]  # fmt: skip
    publish_all(mosquitto.address, legacy)
    stats = run_ingest(mosquitto.address, config, seconds=60, idle_timeout_s=1.0)
    keys = read_keys(config.lake_root, FLEET).to_pylist()
    simulated = Counter((k["device"], k["epoch"], k["seq"]) for k in keys if k["device"] != "legacy-01")
    epochs = sorted({epoch for _, epoch, _ in simulated})
    reasons = Counter(r.split(":")[0] for r in read_quarantine(config.quarantine_root)["reason"].to_pylist())
    expected = {(f"node-{d:04d}", e, s) for d in range(2) for e in epochs for s in range(5)}
    per_epoch = " + ".join(str(sum(n for (_, e, _), n in simulated.items() if e == epoch)) for epoch in epochs)
    record(
        FaultRecord(
            "device restart reusing seq 0-4 (`simulate --windows 5` x2)", 20, sum(simulated.values()),
            sum(simulated.values()) - len(simulated), len(expected - simulated.keys()),
            notes=f"`tinymlops simulate --devices 2 --windows 5` twice (the second with a fault): {len(epochs)} boot "
            f"epochs from the counter file, {per_epoch} in the lake; a version-1 device (no epoch) restarting at "
            f"seq 0: {len(keys) - sum(simulated.values())} of 10 in the lake, "
            f"{reasons['seq reused with different content']} quarantined as `seq reused with different content`. "
            "Before: 10 of 20 in the lake, the second run dropped silently as duplicates",
        )
    )  # fmt: skip
    assert len(epochs) == 2 and simulated.keys() == expected and set(simulated.values()) == {1}
    assert (data / "simulate" / f"{FLEET}.boot-epoch").read_text().strip() == str(epochs[-1])
    assert (stats.accepted, stats.duplicates, stats.rejected) == (25, 0, 5)
    assert reasons == Counter({"seq reused with different content": 5})


@pytest.mark.mqtt
def test_retained_window_dated_2021_redelivered_to_the_next_ingest(tmp_path: Path, mosquitto: MosquittoBroker) -> None:
    """A retained window with a 2021 timestamp reaches every ingest run that subscribes; it is stored once."""
    config = ingest_config(tmp_path, "fault-retained")
    ensure_subscription(mosquitto.address, config)
    dated_2021 = window("node-0007", 0, timestamp_us=1_620_000_000_000_000)
    fresh = [(vibration_topic("node-0007"), encode(window("node-0007", s))) for s in range(1, 10)]
    publish_all(mosquitto.address, [(vibration_topic("node-0007"), encode(dated_2021))], retain=True)
    publish_all(mosquitto.address, fresh)
    runs = [run_ingest(mosquitto.address, config, seconds=30, idle_timeout_s=1.5) for _ in range(2)]
    tally = tally_lake(config.lake_root, FLEET, [("node-0007", s) for s in range(10)])
    record(
        FaultRecord(
            "retained window dated 2021, redelivered to the next ingest run", 10, tally.rows, tally.duplicates,
            tally.lost, notes=f"the second run received the retained copy again ({runs[1].received} message) and "
            f"dropped it as a duplicate ({runs[1].duplicates}); the index holds the keys of the whole lake, "
            "whatever date the sender gave. Before: 11 rows, the 2021 window stored twice (its partition was "
            "outside the 2-day index)",
        )
    )  # fmt: skip
    assert runs[1].received >= 1, "the second run must see the retained window again"
    assert (tally.rows, tally.duplicates, tally.lost, tally.unexpected) == (10, 0, 0, 0)
    assert (runs[1].accepted, runs[1].rejected) == (0, 0)


# --- OTA: signed models, devices, the deployment session -----------------------------------------------------

FAST = DeviceConfig(retry_timeout_s=0.3, max_retry_timeout_s=1.0, score_batch=4, summary_windows=1000)
MODEL_NAME = "vibration-ae-nrf52840"


class OtaAssets:
    """A real int8 model, a DSP spec fitted on simulated machines, its measured arena, a signing key."""

    def __init__(self) -> None:
        self.model = int8_autoencoder()
        self.sha256 = hashlib.sha256(self.model).hexdigest()
        sim = MachineSimulator(seed=99)
        self.spec = DspSpec().fitted(raw_features(np.stack([sim.next_window() for _ in range(32)]), DspSpec()))
        self.arena = measure_arena(self.model).smallest_working_bytes
        self.signer = ManifestSigner(generate_keypair()[0], "faults-key")
        self.keyring = KeyRing({self.signer.key_id: self.signer.public_key})

    def deployable(self, threshold: float) -> DeployableModel:
        return DeployableModel(MODEL_NAME, "nrf52840", self.model, self.spec, threshold, self.arena)


@pytest.fixture(scope="module")
def ota() -> OtaAssets:
    return OtaAssets()


class HoldingPublisher(ModelPublisher):
    """Serves chunks, except those from ``hold_from`` on to the devices in ``hold``: a transfer stalled mid-way."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.hold: set[str] = set()
        self.hold_from = 2

    def chunk_payloads(self, device: str, index: int, encoded: bytes) -> list[bytes]:
        return [] if device in self.hold and index >= self.hold_from else [encoded]


# --- 2. broker killed during a fleet deployment ------------------------------------------------------------------


def runs_a_sound_model(device: Any, sha256: str, versions: set[int]) -> bool:
    """The device runs one of the deployed manifests, with the verified bytes, and it scores."""
    active = device.active
    if active is None or active.manifest.sha256_hex != sha256 or active.manifest.model_version not in versions:
        return False
    scores = device.score_windows(2)
    return len(scores) == 2 and all(np.isfinite(s.score) for s in scores)


@pytest.mark.mqtt
@pytest.mark.slow
def test_broker_killed_during_a_fleet_deployment(ota: OtaAssets) -> None:
    """8 devices on 2 shared links: half finished, half mid-transfer, one offline when Mosquitto is SIGKILLed."""
    broker = MosquittoBroker().start()
    topics = FleetTopics(FLEET)
    fleet = DeviceFleet(FLEET, 8, get_target("nrf52840"), ota.keyring, broker.address, seed=5,
                        devices_per_connection=4, config=FAST)  # fmt: skip
    session = DeploymentSession(broker.address, topics, ota.signer)
    publisher = HoldingPublisher(broker.address, topics, ota.signer, client_id="fault-deploy-publisher")
    session.publisher = publisher  # the same server side, with chunks that can be held back
    restarted: MosquittoBroker | None = None
    outcomes: list[Any] = []
    try:
        fleet.start()
        session.start()
        first = session.deploy(ota.deployable(1.0), session.announcements(), timeout_s=30)
        assert all(o.active for o in first), [o.status for o in first]
        old = first[0].manifest_version
        assert old is not None
        ids = [d.device_id for d in fleet.devices]
        finished, held = ids[0::2], ids[1::2]
        publisher.hold = set(held)
        wave = threading.Thread(
            target=lambda: outcomes.extend(session.deploy(ota.deployable(2.0), session.announcements(), timeout_s=12))
        )
        wave.start()

        def mid_transfer() -> bool:
            done = [fleet.device(d).active for d in finished]
            return all(a is not None and a.manifest.model_version > old for a in done) and all(
                fleet.device(d).receiver.received_count == publisher.hold_from for d in held
            )

        wait_until(mid_transfer, 30, "half the fleet done, half holding 2 chunks")
        away = fleet.device(held[0])
        away.go_offline()  # and stays away past the deployment's timeout
        broker.kill()
        time.sleep(0.5)
        publisher.hold.clear()
        restarted = MosquittoBroker(port=broker.port).start()
        wave.join(60)
    finally:
        session.stop()
        if restarted is not None:  # the session's manifests are gone with it; the device returns to nobody serving
            fleet.device(held[0]).go_online()
            time.sleep(0.5)
        fleet.stop()
        if restarted is not None:
            restarted.stop()
    new = outcomes[0].manifest_version if outcomes else None
    report = DeploymentReport(model_ref="faults", model=MODEL_NAME, registry_version=None, sha256=ota.sha256,
                              target="nrf52840", fleet=FLEET, broker=broker.address.url, canary_fraction=0.0,
                              outcomes=outcomes, skipped=[])  # fmt: skip
    rows = report.final()
    said_right = [
        d.device_id
        for d in fleet.devices
        if d.device_id in rows
        and d.active is not None
        and rows[d.device_id].active == (d.active.manifest.model_version == new)
        and rows[d.device_id].running == f"{MODEL_NAME} v{d.active.manifest.model_version}"
    ]
    broken = [d.device_id for d in fleet.devices if not runs_a_sound_model(d, ota.sha256, {old, new or old})]
    on_new = sum(o.active for o in rows.values())
    record(
        FaultRecord(
            "broker SIGKILL + restart during a fleet deployment", broken_devices=len(broken),
            notes=f"{len(ids)} devices: {on_new} active on the new model ({len(finished)} done before the kill, "
            f"{on_new - len(finished)} resumed after), {len(ids) - on_new} kept the previous one "
            f"({rows[held[0]].state if held[0] in rows else '?'}, offline past the timeout); the report matched "
            f"{len(said_right)} of {len(ids)} devices",
        )
    )  # fmt: skip
    assert broken == []
    assert len(said_right) == len(ids), report.to_markdown()
    assert on_new == len(ids) - 1 and not rows[held[0]].active and rows[held[0]].state == "timeout"
    assert away.active is not None and away.active.manifest.model_version == old


# --- 4. device process killed mid-transfer --------------------------------------------------------------------

DEVICE_PROCESS = """
import json, sys, threading
from firmware.device import DeviceConfig, DeviceRuntime
from firmware.signing import KeyRing
from tinymlops.mqtt import parse_broker_url
from tinymlops.targets import get_target
args = json.loads(sys.argv[1])
config = DeviceConfig(retry_timeout_s=0.3, max_retry_timeout_s=1.0, score_interval_s=0.1, score_batch=5)
DeviceRuntime(args["device"], args["fleet"], get_target("nrf52840"), KeyRing.from_json(args["keyring"]),
              parse_broker_url(args["broker"]), config=config).start()
threading.Event().wait()
"""


class DeviceWatch:
    """The server's view of one device: every status and score batch it publishes (retained ones included)."""

    def __init__(self, address: BrokerAddress, topics: FleetTopics, device: str) -> None:
        self.statuses: list[DeviceStatus] = []
        self.scores: list[ScoreBatch] = []
        self._status_topic = topics.status(device)
        self.client = make_client(address, f"fault-watch-{device}")
        self.client.on_message = self._on_message
        connect(self.client, address)
        self.client.subscribe([(self._status_topic, 1), (topics.scores(device), 1)])

    def _on_message(self, _c: mqtt.Client, _u: Any, message: mqtt.MQTTMessage) -> None:
        if not message.payload:
            return
        if message.topic == self._status_topic:
            self.statuses.append(DeviceStatus.decode(bytes(message.payload)))
        else:
            self.scores.append(ScoreBatch.decode(bytes(message.payload)))

    def wait_status(
        self, predicate: Callable[[DeviceStatus], bool], timeout_s: float, what: str, since: int = 0
    ) -> DeviceStatus:
        """The first status (from index ``since``) satisfying ``predicate``, waiting for it."""
        wait_until(lambda: any(predicate(s) for s in self.statuses[since:]), timeout_s, what)
        return next(s for s in self.statuses[since:] if predicate(s))

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def device_process(address: BrokerAddress, device: str, keyring: KeyRing) -> subprocess.Popen[bytes]:
    args = {"broker": address.url, "device": device, "fleet": FLEET, "keyring": keyring.to_json()}
    return subprocess.Popen([sys.executable, "-c", DEVICE_PROCESS, json.dumps(args)], cwd=REPO_ROOT)


@pytest.mark.mqtt
def test_device_process_killed_mid_transfer(ota: OtaAssets, mosquitto: MosquittoBroker) -> None:
    """kill -9 a device's process while it downloads v2 over v1, restart it: it verifies v2 or keeps a whole model."""
    device = "node-0042"
    topics = FleetTopics(FLEET)
    watch = DeviceWatch(mosquitto.address, topics, device)
    publisher = HoldingPublisher(mosquitto.address, topics, ota.signer, client_id="fault-device-publisher").start()
    common: dict[str, Any] = {"name": MODEL_NAME, "target": "nrf52840", "dsp_spec": ota.spec,
                              "threshold": 1.0, "arena_bytes": ota.arena, "device": device}  # fmt: skip
    victim = device_process(mosquitto.address, device, ota.keyring)
    revived: subprocess.Popen[bytes] | None = None
    try:
        watch.wait_status(lambda s: s.state == "idle", 60, "the device to start")
        publisher.deploy(ota.model, version=1, **common)
        watch.wait_status(lambda s: s.state == "active" and s.version == 1, 30, "v1 active")
        publisher.hold = {device}
        before_v2 = len(publisher.log)
        v2 = publisher.deploy(ota.model, version=2, **common)
        assert v2.chunk_count > publisher.hold_from
        # stalled: it holds chunks 0..hold_from-1 and has asked for the next one again after its retry timeout
        wait_until(
            lambda: Counter(list(publisher.log)[before_v2:])[(device, publisher.hold_from)] >= 2,
            30,
            "the stalled transfer",
        )
        last_word = watch.wait_status(lambda s: s.state == "downloading" and s.version == 2, 10, "v2 downloading")
        os.kill(victim.pid, signal.SIGKILL)
        victim.wait()
        killed_at = len(watch.statuses)
        publisher.hold.clear()
        served_before = len(publisher.log)
        revived = device_process(mosquitto.address, device, ota.keyring)
        final = watch.wait_status(
            lambda s: s.state in ("active", "failed") and s.version == 2,
            60,
            "the restarted device to end v2",
            killed_at,
        )
        wait_until(lambda: any(b.version == 2 for b in watch.scores), 30, "scores from v2")
    finally:
        for process in (victim, revived):
            if process is not None and process.poll() is None:
                process.kill()
                process.wait()
        publisher.stop()
        watch.stop()
    after = [index for d, index in list(publisher.log)[served_before:] if d == device]
    claimed = [s.active for s in watch.statuses if s.active is not None]
    sound = final.active is not None and final.active.sha256 == ota.sha256 and final.active.version == 2
    scores_v2 = [x for b in watch.scores if b.version == 2 for x in b.scores]
    states_after = [s.state for s in watch.statuses[killed_at:] if s.version == 2]
    record(
        FaultRecord(
            "device process SIGKILL mid-transfer", broken_devices=0 if sound else 1,
            notes=f"killed after {publisher.hold_from} of {v2.chunk_count} chunks were served (last status: "
            f"{last_word.status}, running v{last_word.active.version if last_word.active else '-'}); restarted, it "
            f"{'resumed at chunk ' + str(min(after)) if after and min(after) > 0 else 'downloaded again from chunk 0'}"
            f" and ended {final.status} v{final.version} (RAM-only simulated device: no model until then)",
        )
    )  # fmt: skip
    assert last_word.state == "downloading" and last_word.active is not None and last_word.active.version == 1
    assert sound, final
    assert [s for s in states_after if s in ("verified", "loaded", "active")] == ["verified", "loaded", "active"]
    assert all(ref.sha256 == ota.sha256 for ref in claimed)  # no status ever named a model other than the whole one
    assert scores_v2 and all(np.isfinite(scores_v2))


# --- 5. the MLflow store unavailable during registration ----------------------------------------------------------


class MlflowServer:
    """A real ``mlflow server`` (SQLite backend, proxied artifact store) that a test kills and restarts on its port."""

    def __init__(self, root: Path, port: int | None = None) -> None:
        self.root = root
        self.port = port or free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 120) -> MlflowServer:
        self.root.mkdir(parents=True, exist_ok=True)
        command = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
                   "--backend-store-uri", f"sqlite:///{self.root / 'server.db'}",
                   "--artifacts-destination", str(self.root / "artifacts"), "--workers", "1"]  # fmt: skip
        with (self.root / "server.log").open("ab") as log:
            # its own session: the server's workers die with it, by process group
            self.process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
                                            env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"})  # fmt: skip

        def healthy() -> bool:
            assert self.process is not None and self.process.poll() is None, "mlflow server exited"
            with contextlib.suppress(OSError), urllib.request.urlopen(f"{self.url}/health", timeout=2) as response:
                return bool(response.status == 200)
            return False

        wait_until(healthy, timeout_s, f"mlflow server on {self.url}")
        return self

    def kill(self) -> None:
        """SIGKILL the server and its workers."""
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()

    def stop(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(30)
            except subprocess.TimeoutExpired:
                self.kill()


@flow(name="fault-registration")
def registration_flow(bundle_dir: str, run_id: str) -> str:
    """The train flow's registration step alone: the registration task (retries=2) on one bundle."""
    return register_bundle_task(load_bundle(Path(bundle_dir)), run_id, True).version


@pytest.mark.mlflow
@pytest.mark.prefect
@pytest.mark.slow
def test_mlflow_server_killed_during_registration(
    tmp_path: Path, prefect_harness: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The tracking server dies between artifact upload and version: a clean failure, nothing half-registered."""
    from mlflow import MlflowClient

    import registry.models
    import tasks.registration

    # MLflow's own HTTP retries off: what retries is the Prefect task, and the test stays fast.
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    server = MlflowServer(tmp_path / "mlflow").start()
    restarted: MlflowServer | None = None
    previous = mlflow.get_tracking_uri()
    target = catalog_target("nrf52840", "nrf_faults")
    name = registered_model_name(target.name)
    try:
        experiment = configure_mlflow(server.url, None, "faults")
        run_id = log_training_run(experiment, params={}, metrics={}, dataset_fingerprint=FINGERPRINT,
                                  lake_selection={"fleet": FLEET})  # fmt: skip
        v1 = register_bundle(make_bundle(tmp_path / "bundles", target, label="v1"), run_id, gates_passed=True)
        promote(name, v1.version, candidate_eval=None, champion_eval=None, actor="faults")
        aliases_before = aliases_of(name)
        bundle = make_bundle(tmp_path / "bundles", target, label="v2")

        attempts: list[float] = []
        register, log_pyfunc = tasks.registration.register_bundle, registry.models._log_pyfunc

        def counted(*args: Any, **kwargs: Any) -> Any:
            attempts.append(time.monotonic())
            return register(*args, **kwargs)

        def upload_then_crash(*args: Any, **kwargs: Any) -> None:
            log_pyfunc(*args, **kwargs)  # the bundle's artifacts are on the server, no version yet
            server.kill()

        monkeypatch.setattr(tasks.registration, "register_bundle", counted)
        monkeypatch.setattr(registry.models, "_log_pyfunc", upload_then_crash)
        with pytest.raises(RegistryError) as failure:
            registration_flow(str(bundle.directory), run_id)
        tries = len(attempts)
        monkeypatch.setattr(registry.models, "_log_pyfunc", log_pyfunc)
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "2")

        restarted = MlflowServer(server.root, server.port).start()
        client = MlflowClient()
        versions = sorted(str(v.version) for v in client.search_model_versions(f"name='{name}'"))
        aliases_after = aliases_of(name)
        whole = [v for v in versions if resolve(f"{name}/{v}", tmp_path / f"check-{v}").bundle is not None]
        logged = client.search_logged_models([experiment])
        used = {client.get_model_version(name, v).tags.get("lineage.logged_model_id") for v in versions}
        orphans = [m.model_id for m in logged if m.model_id not in used]
        recovered = registration_flow(str(bundle.directory), run_id)
        registered_ids = {v.tags.get("lineage.logged_model_id") for v in client.search_model_versions(f"name='{name}'")}
        orphans_after = [
            m.model_id for m in client.search_logged_models([experiment]) if m.model_id not in registered_ids
        ]
        recovered_ok = resolve(f"{name}/{recovered}", tmp_path / "recovered").bundle.metadata.lineage["label"]
        aliases_recovered = aliases_of(name)
    finally:
        for running in (server, restarted):
            if running is not None:
                running.stop()
        mlflow.set_tracking_uri(previous)
        mlflow.set_registry_uri(previous)
    message = str(failure.value)
    record(
        FaultRecord(
            "MLflow server SIGKILL mid-registration",
            notes=f"{tries} attempts (task retries=2), then a one-line RegistryError; versions {versions} "
            f"(all with their artifacts), aliases unchanged {aliases_after}; after a restart the retry removed the "
            f"{len(orphans)} logged model the failed attempt left unregistered ({len(orphans_after)} left) and "
            f"registered v{recovered}",
        )
    )  # fmt: skip
    assert tries == 3 and attempts[2] - attempts[0] >= 6  # two retries, 3 s apart
    assert "\n" not in message and ("cannot read training run" in message or "nothing registered" in message)
    assert versions == [v1.version] == whole
    assert aliases_after == aliases_before and set(aliases_after.values()) <= set(versions)
    assert recovered == str(int(v1.version) + 1) and recovered_ok == "v2"
    assert len(orphans) == 1 and orphans_after == []
    assert aliases_recovered.get("candidate") == recovered and aliases_recovered.get("champion") == v1.version


@pytest.mark.mqtt
def test_summary_collector_failing_mid_run_loses_and_duplicates_no_summary(
    tmp_path: Path, mosquitto: MosquittoBroker
) -> None:
    """The store fails at the 8th of 21 summaries (one a re-publish); the next run stores the rest, each once."""
    import sqlite3

    from firmware.ota import SCORE_EDGES_REL, DriftSummary
    from tasks.summaries import SummaryStore, collect_summaries

    class FailingStore(SummaryStore):
        """A store whose disk fails at its ``fail_at``-th summary write."""

        fail_at = 8
        writes = 0

        def add_summary(self, fleet: str, summary: DriftSummary, received_ts: float) -> bool:
            self.writes += 1
            if self.writes == self.fail_at:
                raise sqlite3.OperationalError("disk I/O error")
            return super().add_summary(fleet, summary, received_ts)

    topics = FleetTopics(FLEET)
    path = tmp_path / "summaries.sqlite"
    assert collect_summaries(mosquitto.address, topics, SummaryStore(path), seconds=5, quiet_s=0.2).seconds < 5
    healthy: dict[str, Any] = {
        "model": "m", "version": 1, "threshold": 1.0, "windows": 10, "anomalies": 0, "score_mean": 0.2,
        "score_edges": list(SCORE_EDGES_REL), "score_counts": [10] + [0] * 8, "feature_mean": [0.0] * 4,
        "feature_var": [1.0] * 4,
    }  # fmt: skip
    summaries = [
        DriftSummary(device=f"node-{d}", start_ts=60.0 * k, end_ts=60.0 * (k + 1), speed_fallback=k % 3, **healthy)
        for d in range(2)
        for k in range(10)
    ]
    sent = [*summaries, summaries[3]]  # a device re-publishing a period
    publisher = make_client(mosquitto.address, "fault-summaries")
    connect(publisher, mosquitto.address)
    for info in [publisher.publish(topics.summary(s.device), s.encode(), qos=1) for s in sent]:
        info.wait_for_publish(30)
    publisher.disconnect()
    publisher.loop_stop()

    failing = FailingStore(path)
    with pytest.raises(sqlite3.OperationalError, match="disk I/O error"):
        collect_summaries(mosquitto.address, topics, failing, seconds=60, quiet_s=1.0)
    stored_before = len(SummaryStore(path).summaries(FLEET, 0, 1e9))
    second = collect_summaries(mosquitto.address, topics, SummaryStore(path), seconds=60, quiet_s=1.0)
    stored = SummaryStore(path).summaries(FLEET, 0, 1e9)
    keys = Counter((s.device, s.start_ts) for s in stored)
    duplicates = sum(n - 1 for n in keys.values())
    lost = len({(s.device, s.start_ts) for s in summaries} - set(keys))
    record(
        FaultRecord(
            "summary collector's store fails mid-run (monitor's summary path)", duplicates=duplicates, lost=lost,
            notes=f"{len(sent)} summaries sent (1 a re-publish of a period); the store failed at the 8th write, "
            f"{stored_before} stored, the rest left un-acknowledged; the next run received {second.summaries_received} "
            f"(redelivered and queued), stored {second.summaries_stored}, dropped {second.duplicates} as already "
            f"stored: {len(stored)} in the store",
        )
    )  # fmt: skip
    assert stored_before == failing.fail_at - 1
    assert (len(stored), duplicates, lost) == (len(summaries), 0, 0)
    assert sum(s.speed_fallback for s in stored) == sum(s.speed_fallback for s in summaries)
