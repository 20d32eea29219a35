"""Ingest: validation rules, dedupe, and the real MQTT path (Mosquitto, amqtt, a crash mid-stream)."""

from __future__ import annotations

import hashlib
import os
import signal
import subprocess
import sys
import time
import zlib
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from firmware.boot import next_boot_epoch
from firmware.codec import VibrationWindow, encode
from firmware.fleet import VirtualFleet
from tasks.ingest import IngestConfig, Ingestor, _Received, ensure_subscription, run_ingest, validate_message
from tasks.lake import ingest_lease, read_keys, read_quarantine, read_windows
from tests.conftest import cli_env
from tinymlops.errors import DecodeError, ValidationError
from tinymlops.mqtt import AmqttBroker, BrokerAddress, MosquittoBroker, connect, make_client
from tinymlops.settings import MqttSettings, SensorSettings

SENSOR = SensorSettings()
NOW_US = int(time.time() * 1e6)


def make_window(device: str = "node-0001", seq: int = 0, **overrides: object) -> VibrationWindow:
    rng = np.random.default_rng(seq)
    fields: dict[str, object] = {
        "device_id": device,
        "seq": seq,
        "timestamp_us": NOW_US + seq * 40_000,
        "sample_rate_hz": SENSOR.sample_rate_hz,
        "scale": 16 / 32767,
        "samples": rng.normal(0, 300, SENSOR.window_samples).astype(np.int16),
    }
    fields.update(overrides)
    return VibrationWindow(**fields)  # type: ignore[arg-type]


def topic(device: str = "node-0001", fleet: str = "f1") -> str:
    return f"tinymlops/{fleet}/{device}/vibration"


def check(t: str, payload: bytes) -> VibrationWindow:
    return validate_message(t, payload, topic_root="tinymlops", fleet="f1", sensor=SENSOR, now_s=NOW_US / 1e6)


def test_valid_message_passes() -> None:
    window = check(topic(), encode(make_window()))
    assert window.device_id == "node-0001"
    assert window.samples.size == SENSOR.window_samples


def test_operating_condition_travels_in_version_3_and_older_versions_decode_without_it() -> None:
    window = check(topic(), encode(make_window(rpm=1234.5, load=0.75)))
    assert (window.rpm, window.load) == (1234.5, 0.75)
    unknown = check(topic(), encode(make_window()))  # a device without a tachometer: 0.0 rpm, NaN load
    assert (unknown.rpm, unknown.load) == (None, None)
    v3 = encode(make_window(seq=5, epoch=9, rpm=900.0))
    # the same window as version 2 (no rpm, load) and version 1 (no boot epoch either), CRC recomputed
    for version, body in (
        (2, v3[:2] + b"\x02" + v3[3:28] + v3[36:-4]),
        (1, v3[:2] + b"\x01" + v3[3:4] + v3[8:28] + v3[36:-4]),
    ):
        old = check(topic(), body + zlib.crc32(body).to_bytes(4, "little"))
        assert (old.seq, old.epoch, old.rpm, old.load) == (5, 9 if version == 2 else 0, None, None)
        assert np.array_equal(old.samples, make_window(seq=5).samples)


@pytest.mark.parametrize("rpm", [float("nan"), float("inf"), -1500.0, 1e9])
def test_an_unusable_rpm_is_data_not_a_decode_error(rpm: float) -> None:
    # a broken tachometer leaves the samples good: the window is accepted with the rpm as sent, for the scorer
    window = check(topic(), encode(make_window(rpm=rpm, load=-2.0)))
    assert window.rpm is not None and np.array_equal([window.rpm], [rpm], equal_nan=True)
    assert window.load == -2.0


@pytest.mark.parametrize(
    ("t", "window", "error", "reason"),
    [
        (topic(fleet="other"), make_window(), ValidationError, "unexpected topic"),
        (topic("node-0002"), make_window(), ValidationError, "does not match topic device"),
        (topic(), make_window(sample_rate_hz=48_000), ValidationError, "sample rate 48000 Hz"),
        (topic(), make_window(samples=np.zeros(512, np.int16)), ValidationError, "512 samples"),
        (topic(), make_window(samples=np.full(1024, 32767, np.int16)), ValidationError, "saturated"),
        (topic(), make_window(timestamp_us=NOW_US + 3_600_000_000), ValidationError, "in the future"),
        (topic(), make_window(timestamp_us=1_000_000), ValidationError, "before the earliest"),
        (topic(), make_window(scale=float("nan")), DecodeError, "invalid scale nan"),
        (topic(), make_window(scale=float("inf")), DecodeError, "invalid scale inf"),
    ],
)
def test_invalid_content_is_rejected_with_reason(t: str, window: VibrationWindow, error: type, reason: str) -> None:
    with pytest.raises(error, match=reason):
        check(t, encode(window))


def test_corrupt_bytes_are_rejected_with_reason() -> None:
    good = encode(make_window())
    flipped = bytearray(good)
    flipped[100] ^= 0xFF
    wrong_version = bytearray(good)
    wrong_version[2] = 4
    cases = {
        b"": "truncated message: 0 bytes",
        good[:-10]: "truncated message",
        good + b"\x00" * 8: "oversized message",
        b"\x00" * 80_000: "oversized message: 80000 bytes",
        bytes(flipped): "bad CRC",
        bytes(wrong_version): "unsupported header version 4",
        b"XX" + good[2:]: "bad magic",
    }
    for payload, reason in cases.items():
        with pytest.raises(DecodeError, match=reason):
            check(topic(), payload)


def config_for(tmp_path: Path, client_id: str = "ingest-test", **overrides: object) -> IngestConfig:
    fields: dict[str, object] = {
        "fleet": "f1",
        "lake_root": tmp_path / "lake",
        "quarantine_root": tmp_path / "quarantine",
        "sensor": SENSOR,
        "mqtt": MqttSettings(client_id=client_id),
        "batch_windows": 200,
        "flush_interval_s": 0.2,
    }
    fields.update(overrides)
    return IngestConfig(**fields)  # type: ignore[arg-type]


def received(windows: list[VibrationWindow]) -> list[_Received]:
    return [_Received(i, 1, topic(w.device_id), encode(w), NOW_US) for i, w in enumerate(windows)]


def test_written_batch_redelivered_after_crash_is_not_duplicated(tmp_path: Path) -> None:
    """A crash after the write but before the ack makes the broker redeliver: the new process drops it."""
    batch = received([make_window(seq=s) for s in range(10)])
    first = Ingestor(config_for(tmp_path))
    first.process(batch)
    restarted = Ingestor(config_for(tmp_path))
    restarted.process(batch + received([make_window(seq=10)]))
    assert restarted.stats.duplicates == 10
    assert restarted.stats.accepted == 1
    lake = read_windows(tmp_path / "lake", fleet="f1")
    assert sorted(lake.seq.tolist()) == list(range(11))


def test_duplicates_inside_one_batch_are_dropped(tmp_path: Path) -> None:
    ingestor = Ingestor(config_for(tmp_path))
    ingestor.process(received([make_window(seq=1), make_window(seq=1), make_window(seq=2)]))
    assert (ingestor.stats.accepted, ingestor.stats.duplicates) == (2, 1)


def test_a_redelivered_window_dated_years_ago_is_stored_once(tmp_path: Path) -> None:
    """The dedupe index does not follow the sender's clock: a 2021 window redelivered on the next run is dropped."""
    dated_2021 = received([make_window(seq=s, timestamp_us=1_620_000_000_000_000 + s) for s in range(3)])
    Ingestor(config_for(tmp_path)).process(dated_2021)
    restarted = Ingestor(config_for(tmp_path))
    restarted.process(dated_2021)
    assert (restarted.stats.accepted, restarted.stats.duplicates, restarted.stats.rejected) == (0, 3, 0)
    assert sorted(read_windows(tmp_path / "lake", fleet="f1").seq.tolist()) == [0, 1, 2]


def test_a_reused_seq_with_other_content_is_quarantined_with_its_reason(tmp_path: Path) -> None:
    """A device restarting at seq 0 without a new boot epoch: the second window 0 is quarantined, not dropped."""
    first_boot = make_window(seq=0)
    second_boot = make_window(seq=0, samples=make_window(seq=1).samples)
    Ingestor(config_for(tmp_path)).process(received([first_boot]))
    restarted = Ingestor(config_for(tmp_path))
    restarted.process(received([second_boot, second_boot]))  # its redelivery too
    assert (restarted.stats.accepted, restarted.stats.duplicates, restarted.stats.rejected) == (0, 0, 2)
    in_one_batch = Ingestor(config_for(tmp_path, quarantine_root=tmp_path / "q2"))
    in_one_batch.process(received([make_window(seq=7), make_window(seq=7, scale=8 / 32767)]))
    assert (in_one_batch.stats.accepted, in_one_batch.stats.rejected) == (1, 1)
    # the speed is content too: the same samples at another speed are not a redelivery
    in_one_batch.process(received([make_window(seq=9, rpm=900.0)] * 2 + [make_window(seq=9, rpm=1200.0)]))
    assert (in_one_batch.stats.accepted, in_one_batch.stats.duplicates, in_one_batch.stats.rejected) == (2, 1, 2)
    reasons = read_quarantine(tmp_path / "quarantine")["reason"].to_pylist()
    reasons += read_quarantine(tmp_path / "q2")["reason"].to_pylist()
    assert reasons == [
        "seq reused with different content: device node-0001 boot epoch 0 seq 0 is already stored with other "
        "samples or metadata",
    ] * 2 + [
        f"seq reused with different content: device node-0001 boot epoch 0 seq {seq} is already stored with other "
        "samples or metadata"
        for seq in (7, 9)
    ]
    lake = read_windows(tmp_path / "lake", fleet="f1")
    assert sorted(lake.seq.tolist()) == [0, 7, 9] and lake.rpm[lake.seq == 9].tolist() == [900.0]
    assert np.array_equal(lake.samples[lake.seq == 0][0], first_boot.physical())


def test_a_restarted_device_in_a_new_boot_epoch_keeps_every_window(tmp_path: Path) -> None:
    """seq 0..4 in boot epoch 1, then 0..4 again in epoch 2: ten windows, each once, redeliveries dropped."""
    boots = [make_window(seq=s, epoch=e, samples=make_window(seq=10 * e + s).samples) for e in (1, 2) for s in range(5)]
    Ingestor(config_for(tmp_path)).process(received(boots[:5]))
    restarted = Ingestor(config_for(tmp_path))
    restarted.process(received(boots[5:] + boots))
    assert (restarted.stats.accepted, restarted.stats.duplicates, restarted.stats.rejected) == (5, 10, 0)
    keys = read_keys(tmp_path / "lake", "f1")
    assert sorted(zip(keys["epoch"].to_pylist(), keys["seq"].to_pylist(), strict=True)) == [
        (e, s) for e in (1, 2) for s in range(5)
    ]


def test_boot_epochs_grow_on_every_start_in_a_process_and_across_processes(tmp_path: Path) -> None:
    counter = tmp_path / "simulate" / "f1.boot-epoch"
    counter.parent.mkdir()
    counter.write_text(f"{2**31}\n")  # a previous start far ahead of the clock: the counter file wins
    assert [next_boot_epoch(counter) for _ in range(3)] == [2**31 + 1, 2**31 + 2, 2**31 + 3]
    assert counter.read_text() == f"{2**31 + 3}\n"
    fleets = [VirtualFleet("f1", 1), VirtualFleet("f1", 1)]  # two starts within one second still differ
    assert fleets[0].boot_epoch < fleets[1].boot_epoch
    windows = [fleet.nodes[0].next_window(NOW_US) for fleet in fleets]
    assert [(w.epoch, w.seq) for w in windows] == [(fleets[0].boot_epoch, 0), (fleets[1].boot_epoch, 0)]
    assert [w.rpm for w in windows] == [1797 * 0.98] * 2  # node 0's machine speed, sent as the tachometer value


def test_a_key_whose_content_the_index_no_longer_holds_is_quarantined_not_stored_twice(tmp_path: Path) -> None:
    """Stored before the digest horizon: the redelivery cannot be compared, so it goes to the quarantine."""
    window = received([make_window(seq=3)])
    Ingestor(config_for(tmp_path)).process(window)
    time.sleep(0.01)  # the horizon below ends after the first write (a sleep as a clock step, not as a wait)
    later = Ingestor(config_for(tmp_path, dedupe_horizon_days=0.001 / 86_400))
    later.process(window)
    assert (later.stats.accepted, later.stats.duplicates, later.stats.rejected) == (0, 0, 1)
    (reason,) = read_quarantine(tmp_path / "quarantine")["reason"].to_pylist()
    assert reason.startswith("cannot deduplicate: device node-0001 boot epoch 0 seq 3 may already be stored")
    assert len(read_windows(tmp_path / "lake", fleet="f1")) == 1


def publish_all(address: BrokerAddress, payloads: list[tuple[str, bytes]]) -> None:
    client = make_client(address, "test-publisher")
    connect(client, address)
    infos = [client.publish(t, p, qos=1) for t, p in payloads]
    for info in infos:
        info.wait_for_publish(timeout=30)
    client.disconnect()
    client.loop_stop()


def fleet_payloads(
    n_devices: int, per_device: int, rpm: Callable[[int], float | None] = lambda d: None
) -> list[tuple[str, bytes]]:
    """``per_device`` windows of each of ``n_devices`` devices, interleaved; device ``d`` sends ``rpm(d)``."""
    return [
        (topic(f"node-{d:04d}"), encode(make_window(f"node-{d:04d}", s, rpm=rpm(d))))
        for s in range(per_device)
        for d in range(n_devices)
    ]


@pytest.mark.mqtt
def test_ingest_writes_exactly_the_windows_sent(tmp_path: Path, mosquitto: MosquittoBroker) -> None:
    config = config_for(tmp_path)
    ensure_subscription(mosquitto.address, config)
    speeds = [900.0, None, 1500.5, float("nan"), 1200.0, None, 3000.0, None]  # with a tachometer, without, broken
    good = fleet_payloads(8, 25, rpm=speeds.__getitem__)
    redelivered = good[:30]
    malformed = [(topic(), b"garbage"), (topic(), encode(make_window(sample_rate_hz=1000, seq=999)))]
    publish_all(mosquitto.address, good + redelivered + malformed)

    stats = run_ingest(mosquitto.address, config, seconds=30, idle_timeout_s=1.0)

    assert stats.accepted == len(good)
    assert stats.duplicates == len(redelivered)
    assert stats.rejected == len(malformed)
    lake = read_windows(tmp_path / "lake", fleet="f1")
    keys = list(zip(lake.device.tolist(), lake.seq.tolist(), strict=True))
    assert len(keys) == len(set(keys)) == 8 * 25
    expected_rpm = np.asarray([speeds[int(d[-4:])] or np.nan for d in lake.device], np.float32)  # NaN: not known
    np.testing.assert_array_equal(lake.rpm, expected_rpm)
    quarantine = read_quarantine(tmp_path / "quarantine").to_pydict()
    assert sorted(r.split(":")[0] for r in quarantine["reason"]) == [
        "sample rate 1000 Hz, fleet expects 25600 Hz",
        "truncated message",
    ]
    assert b"garbage" in quarantine["payload_prefix"]
    assert hashlib.sha256(b"garbage").hexdigest() in quarantine["payload_sha256"]


@pytest.mark.mqtt
def test_max_windows_leaves_the_rest_on_the_broker(tmp_path: Path, mosquitto: MosquittoBroker) -> None:
    config = config_for(tmp_path)
    ensure_subscription(mosquitto.address, config)
    publish_all(mosquitto.address, fleet_payloads(4, 25))
    first = run_ingest(mosquitto.address, config, seconds=20, max_windows=60)
    second = run_ingest(mosquitto.address, config, seconds=20, idle_timeout_s=1.0)
    assert first.accepted == 60
    assert first.accepted + second.accepted == 100
    assert len(read_windows(tmp_path / "lake", fleet="f1")) == 100


INGEST_PROCESS = """
import sys
from pathlib import Path
from tasks.ingest import IngestConfig, run_ingest
from tinymlops.mqtt import parse_broker_url
from tinymlops.settings import MqttSettings, SensorSettings
root = Path(sys.argv[2])
config = IngestConfig(fleet="f1", lake_root=root / "lake", quarantine_root=root / "quarantine", sensor=SensorSettings(),
                      mqtt=MqttSettings(client_id="crash-test"), batch_windows=int(sys.argv[3]),
                      flush_interval_s=float(sys.argv[4]))
run_ingest(parse_broker_url(sys.argv[1]), config, seconds=60, idle_timeout_s=2.0)
"""


@pytest.mark.mqtt
@pytest.mark.faults
def test_killed_ingest_loses_nothing_after_restart(tmp_path: Path, mosquitto: MosquittoBroker) -> None:
    """kill -9 the ingest process while it holds received but unwritten windows; the restart gets them all."""
    config = config_for(tmp_path, client_id="crash-test")
    ensure_subscription(mosquitto.address, config)
    payloads = fleet_payloads(10, 60)
    publish_all(mosquitto.address, payloads[:300])

    # Small batches with a long flush interval: part is written, the rest is held in memory unacked.
    victim = subprocess.Popen([sys.executable, "-c", INGEST_PROCESS, mosquitto.address.url, str(tmp_path), "70", "30"])
    lake = tmp_path / "lake"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline and not any(lake.rglob("*.parquet")):
        time.sleep(0.05)
    publish_all(mosquitto.address, payloads[300:])
    time.sleep(1.0)
    os.kill(victim.pid, signal.SIGKILL)
    victim.wait()
    before_restart = len(read_windows(lake, fleet="f1"))
    assert 0 < before_restart < len(payloads), "the kill must land mid-stream"

    restarted = subprocess.run(
        [sys.executable, "-c", INGEST_PROCESS, mosquitto.address.url, str(tmp_path), "500", "0.2"], timeout=120
    )
    assert restarted.returncode == 0
    windows = read_windows(lake, fleet="f1")
    keys = list(zip(windows.device.tolist(), windows.seq.tolist(), strict=True))
    assert len(keys) == len(set(keys)) == len(payloads)


def test_ingest_through_embedded_amqtt_broker(tmp_path: Path) -> None:
    broker = AmqttBroker().start()
    try:
        config = config_for(tmp_path, client_id="amqtt-ingest")
        ensure_subscription(broker.address, config)
        publish_all(broker.address, fleet_payloads(3, 20))
        stats = run_ingest(broker.address, config, seconds=30, max_windows=60)
    finally:
        broker.stop()
    assert stats.accepted == 60
    assert len(read_windows(tmp_path / "lake", fleet="f1")) == 60


@pytest.mark.mqtt
def test_window_beyond_the_physical_full_scale_is_quarantined_not_stored(
    tmp_path: Path, mosquitto: MosquittoBroker
) -> None:
    """Scale 3e38 is finite, so the codec accepts it, but samples x scale overflow float32 (issue 13)."""
    config = config_for(tmp_path)
    ensure_subscription(mosquitto.address, config)
    good = [(topic(), encode(make_window(seq=s))) for s in range(3)]
    poisoned = (topic(), encode(make_window(seq=3, scale=3e38)))
    publish_all(mosquitto.address, [*good, poisoned])

    stats = run_ingest(mosquitto.address, config, seconds=30, idle_timeout_s=1.0)

    assert (stats.accepted, stats.rejected) == (3, 1)
    assert stats.reject_reasons == {"out of range": 1}
    lake = read_windows(tmp_path / "lake", fleet="f1")
    assert sorted(lake.seq.tolist()) == [0, 1, 2]
    assert np.isfinite(lake.samples).all()
    (reason,) = read_quarantine(tmp_path / "quarantine").to_pydict()["reason"]
    assert reason.startswith("out of range: peak |sample x scale|") and "full scale 2000 g" in reason


LEASE_PROCESS = """
import signal, sys, threading
from pathlib import Path
from tasks.ingest import IngestConfig, run_ingest
from tinymlops.errors import TinyMLOpsError
from tinymlops.mqtt import parse_broker_url
from tinymlops.settings import MqttSettings, SensorSettings
url, root, fleet, seconds, idle = sys.argv[1], Path(sys.argv[2]), sys.argv[3], float(sys.argv[4]), float(sys.argv[5])
config = IngestConfig(fleet=fleet, lake_root=root / "lake", quarantine_root=root / "quarantine",
                      sensor=SensorSettings(), mqtt=MqttSettings(client_id=sys.argv[6]), batch_windows=50,
                      flush_interval_s=0.2)
stop = threading.Event()
signal.signal(signal.SIGTERM, lambda *_: stop.set())
try:
    run_ingest(parse_broker_url(url), config, seconds=seconds, idle_timeout_s=idle or None, stop=stop)
except TinyMLOpsError as exc:
    sys.exit(str(exc))
"""


def start_ingest(
    address: BrokerAddress, root: Path, fleet: str, seconds: float, idle: float, client_id: str | None = None
) -> subprocess.Popen[str]:
    """An ingest of ``fleet`` in its own process (client id ``lease-<fleet>`` unless given); SIGTERM ends it cleanly."""
    client = client_id or f"lease-{fleet}"
    args = [sys.executable, "-c", LEASE_PROCESS, address.url, str(root), fleet, str(seconds), str(idle), client]
    return subprocess.Popen(args, stderr=subprocess.PIPE, text=True)


def wait_for_lease(root: Path, fleet: str, pid: int, timeout_s: float = 90.0) -> str:
    """Wait until ``pid`` holds the fleet's ingest lease; returns the lock file's text."""
    lock = root / "lake" / "vibration" / f"fleet={fleet}" / ".ingest.lock"
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        text = lock.read_text() if lock.exists() else ""
        if f'"pid": {pid}' in text:
            return text
        time.sleep(0.05)
    raise AssertionError(f"process {pid} did not take the ingest lease of fleet {fleet} within {timeout_s} s")


def lake_keys(root: Path, fleet: str) -> list[tuple[str, int]]:
    windows = read_windows(root / "lake", fleet=fleet)
    return list(zip(windows.device.tolist(), windows.seq.tolist(), strict=True))


def stop_with(process: subprocess.Popen[str], root: Path, fleet: str, windows: int, timeout_s: float = 120) -> str:
    """Stop an ingest process (SIGTERM) once the lake holds ``windows`` of its fleet; returns its stderr.

    A count, not an idle timeout, ends the run: on a loaded machine a second process can take
    longer to start than any idle timeout short enough for a test.
    """
    deadline = time.monotonic() + timeout_s
    while len(lake_keys(root, fleet)) < windows and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    process.send_signal(signal.SIGTERM)
    return process.communicate(timeout=60)[1]


@pytest.mark.mqtt
def test_second_ingest_of_a_fleet_refuses_and_nothing_is_duplicated(tmp_path: Path, mosquitto: MosquittoBroker) -> None:
    """Two ingests of one fleet shared (and stole) one MQTT session and wrote most windows twice."""
    ensure_subscription(mosquitto.address, config_for(tmp_path, client_id="lease-f1"))
    payloads = fleet_payloads(10, 40)
    publish_all(mosquitto.address, payloads[:200])
    holder = start_ingest(mosquitto.address, tmp_path, "f1", 180, 0)
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not any((tmp_path / "lake").rglob("*.parquet")):
            time.sleep(0.05)  # the holder is ingesting
        second = start_ingest(mosquitto.address, tmp_path, "f1", 20, 3.0)
        publish_all(mosquitto.address, payloads[200:])
        _, refusal = second.communicate(timeout=60)
        stop_with(holder, tmp_path, "f1", len(payloads))
        holder_status = holder.returncode
    finally:
        holder.kill()
    keys = lake_keys(tmp_path, "f1")
    assert len(keys) - len(set(keys)) == 0, "duplicates in the lake"
    assert len(set(keys)) == len(payloads)
    assert holder_status == 0
    assert second.returncode == 1
    lines = refusal.strip().splitlines()
    assert len(lines) == 1, refusal
    assert lines[0].startswith(f"fleet f1 is already being ingested into {tmp_path / 'lake'} by pid {holder.pid} on ")


@pytest.mark.mqtt
@pytest.mark.faults
def test_killed_lease_holder_does_not_block_the_next_ingest(tmp_path: Path, mosquitto: MosquittoBroker) -> None:
    """The lease dies with its holder: after a SIGKILL the next ingest takes it at once and gets every window."""
    ensure_subscription(mosquitto.address, config_for(tmp_path, client_id="lease-f1"))
    holder = start_ingest(mosquitto.address, tmp_path, "f1", 60, 0)
    wait_for_lease(tmp_path, "f1", holder.pid)
    os.kill(holder.pid, signal.SIGKILL)
    holder.wait()
    payloads = fleet_payloads(5, 20)
    publish_all(mosquitto.address, payloads)
    successor = start_ingest(mosquitto.address, tmp_path, "f1", 180, 0)
    assert f'"pid": {successor.pid}' in wait_for_lease(tmp_path, "f1", successor.pid)
    errors = stop_with(successor, tmp_path, "f1", len(payloads))
    assert successor.returncode == 0, errors
    keys = lake_keys(tmp_path, "f1")
    assert len(keys) == len(set(keys)) == len(payloads)


@pytest.mark.mqtt
def test_ingests_of_different_fleets_run_side_by_side(tmp_path: Path, mosquitto: MosquittoBroker) -> None:
    """The lease is per fleet: two fleets, each with its own client id, ingest concurrently into one lake."""
    fleets = ("f1", "f2")
    for fleet in fleets:
        ensure_subscription(mosquitto.address, config_for(tmp_path, client_id=f"lease-{fleet}", fleet=fleet))
    processes = {fleet: start_ingest(mosquitto.address, tmp_path, fleet, 180, 0) for fleet in fleets}
    try:
        for fleet, process in processes.items():
            wait_for_lease(tmp_path, fleet, process.pid)  # both hold their fleet's lease at once
        payloads = [
            (topic(f"node-{d:04d}", fleet), encode(make_window(f"node-{d:04d}", s)))
            for fleet in fleets
            for s in range(30)
            for d in range(4)
        ]
        publish_all(mosquitto.address, payloads)
        for fleet, process in processes.items():
            errors = stop_with(process, tmp_path, fleet, 4 * 30)
            assert process.returncode == 0, errors
    finally:
        for process in processes.values():
            process.kill()
    for fleet in fleets:
        keys = lake_keys(tmp_path, fleet)
        assert len(keys) == len(set(keys)) == 4 * 30


@pytest.mark.mqtt
def test_ingests_of_two_fleets_under_one_client_id_refuse(tmp_path: Path, mosquitto: MosquittoBroker) -> None:
    """One client id is one MQTT session: the second fleet's ingest would take it and quarantine the first's windows."""
    ensure_subscription(mosquitto.address, config_for(tmp_path, client_id="shared"))
    payloads = fleet_payloads(4, 25)
    publish_all(mosquitto.address, payloads[:40])
    holder = start_ingest(mosquitto.address, tmp_path, "f1", 180, 0, client_id="shared")
    try:
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline and not any((tmp_path / "lake").rglob("*.parquet")):
            time.sleep(0.05)  # the holder is ingesting
        second = start_ingest(mosquitto.address, tmp_path, "f2", 20, 2.0, client_id="shared")
        time.sleep(3.0)  # the second is connected or has refused
        publish_all(mosquitto.address, payloads[40:])
        _, refusal = second.communicate(timeout=60)
        stop_with(holder, tmp_path, "f1", len(payloads))
        holder_status = holder.returncode
    finally:
        holder.kill()
    assert len(read_quarantine(tmp_path / "quarantine")) == 0, "f1 windows quarantined by the f2 ingest"
    assert holder_status == 0
    assert second.returncode == 1
    assert refusal.strip().startswith(
        f"MQTT client id 'shared' is already used by the ingest of another fleet into {tmp_path / 'lake'} "
        f"(pid {holder.pid} on "
    ), refusal
    keys = lake_keys(tmp_path, "f1")
    assert len(keys) == len(set(keys)) == len(payloads)


@pytest.mark.mqtt
def test_cli_ingest_refuses_a_fleet_being_ingested(tmp_path: Path, mosquitto: MosquittoBroker) -> None:
    """``tinymlops ingest`` of a fleet whose lease is held: one line naming the fleet and the holder, exit 1."""
    with ingest_lease(tmp_path / "data" / "lake", "f1", "tinymlops-ingest"):
        result = subprocess.run(
            [sys.executable, "-m", "tinymlops", "ingest", "--fleet", "f1", "--seconds", "3", "--broker",
             mosquitto.address.url],
            env=cli_env(tmp_path / "data"), capture_output=True, text=True, timeout=120,
        )  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [result.stderr.strip()]
    assert result.stderr.startswith(
        f"error: fleet f1 is already being ingested into {tmp_path / 'data' / 'lake'} by pid {os.getpid()} on "
    )
    assert not any((tmp_path / "data" / "lake").rglob("*.parquet"))
