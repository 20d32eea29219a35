"""The device runtime end to end: a real Mosquitto, real TFLite Micro, signed manifests, chunked transfer.

Every scenario ends with the device running either the new verified model or its previous one,
and its status (seen on the broker, not only in memory) says which and why.
"""

from __future__ import annotations

import hashlib
import os
import subprocess
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import paho.mqtt.client as mqtt
import pytest
from pydantic import SecretStr
from typer.testing import CliRunner

from firmware import codec
from firmware.device import DeviceConfig, DeviceError, DeviceRuntime, MemoryBudget
from firmware.device_fleet import DeviceFleet
from firmware.ota import (
    Announcement,
    DeviceStatus,
    DriftSummary,
    Manifest,
    OtaError,
    ScoreBatch,
    build_manifest,
    compute_references,
    crc32,
    decode_dsp_block,
    device_audience,
    encode_dsp_block,
)
from firmware.sensor import DriftSpec, FaultSpec, MachineSimulator, OperatingPoint, quantize
from firmware.signing import KeyRing, ManifestSigner, generate_keypair, load_private_key
from firmware.tflm import TflmRunner, measure_arena
from tasks.ota_publisher import ModelPublisher
from tests.fault_ledger import FaultRecord, record
from tests.int8_model import int8_autoencoder, with_first_dense_zeroed
from tinymlops.contracts.dsp import DspSpec, extract_features, raw_features
from tinymlops.contracts.scoring import anomaly_scores
from tinymlops.contracts.topics import FleetTopics
from tinymlops.mqtt import AmqttBroker, BrokerAddress, MosquittoBroker, connect, make_client
from tinymlops.settings import REPO_ROOT, MqttSettings
from tinymlops.targets import McuTarget, load_catalog

pytestmark = pytest.mark.mqtt

FLEET = "plant"
TOPICS = FleetTopics(FLEET)
FAST = DeviceConfig(retry_timeout_s=0.3, max_retry_timeout_s=1.0, score_batch=4, summary_windows=1000)


# --- fixtures -----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def model() -> bytes:
    return int8_autoencoder()


@pytest.fixture(scope="module")
def arena(model: bytes) -> int:
    return measure_arena(model).smallest_working_bytes


@pytest.fixture(scope="module")
def spec() -> DspSpec:
    sim = MachineSimulator(seed=99)
    windows = np.stack([sim.next_window() for _ in range(32)])
    return DspSpec().fitted(raw_features(windows, DspSpec()))


@pytest.fixture(scope="module")
def signer() -> ManifestSigner:
    return ManifestSigner(generate_keypair()[0], "ops-2026")


@pytest.fixture(scope="module")
def old_signer() -> ManifestSigner:
    return ManifestSigner(generate_keypair()[0], "ops-2025")


@pytest.fixture(scope="module")
def keyring(signer: ManifestSigner, old_signer: ManifestSigner) -> KeyRing:
    return KeyRing({signer.key_id: signer.public_key, old_signer.key_id: old_signer.public_key}, revoked=["ops-2025"])


@pytest.fixture(scope="module")
def catalog() -> dict[str, McuTarget]:
    return load_catalog(REPO_ROOT / "data" / "mcu_targets.yaml")


@pytest.fixture(scope="module")
def nrf(catalog: dict[str, McuTarget]) -> McuTarget:
    return catalog["nrf52840"]


class ShapingPublisher(ModelPublisher):
    """A publisher whose chunk traffic a test can shape: hold, drop, duplicate, reorder, corrupt."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.hold_from: int | None = None
        self.shape: Callable[[int, bytes, int], list[bytes]] | None = None
        self.times: Counter[tuple[str, int]] = Counter()
        self.batches: list[list[bytes]] = []

    def chunk_payloads(self, device: str, index: int, encoded: bytes) -> list[bytes]:
        if self.hold_from is not None and index >= self.hold_from:
            return []
        if self.shape is None:
            return [encoded]
        self.times[(device, index)] += 1  # counted from the moment a shape is set
        return self.shape(index, encoded, self.times[(device, index)])


@pytest.fixture
def publisher(mosquitto: MosquittoBroker, signer: ManifestSigner) -> Iterator[ShapingPublisher]:
    pub = ShapingPublisher(mosquitto.address, TOPICS, signer).start()
    yield pub
    pub.stop()


class Watcher:
    """A server-side observer: every message on the fleet's device topics, decoded by kind."""

    def __init__(self, address: BrokerAddress) -> None:
        self.messages: dict[str, list[bytes]] = defaultdict(list)
        self.lock = threading.Lock()
        self.client = make_client(address, "watcher")
        self.client.on_message = self._on_message
        connect(self.client, address)
        self.client.subscribe(f"{TOPICS.root}/{FLEET}/#", qos=1)

    def _on_message(self, _c: mqtt.Client, _u: Any, message: mqtt.MQTTMessage) -> None:
        with self.lock:
            self.messages[message.topic].append(bytes(message.payload))

    def decoded(self, topic: str, kind: Any) -> list[Any]:
        with self.lock:
            return [kind.decode(p) for p in self.messages[topic] if p]

    def wait(self, topic: str, kind: Any, predicate: Callable[[Any], bool], timeout_s: float = 10.0) -> Any:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            found = [m for m in self.decoded(topic, kind) if predicate(m)]
            if found:
                return found[-1]
            time.sleep(0.02)
        raise AssertionError(f"no matching message on {topic}: {self.decoded(topic, kind)[-3:]}")

    def stop(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


@pytest.fixture
def watcher(mosquitto: MosquittoBroker) -> Iterator[Watcher]:
    w = Watcher(mosquitto.address)
    yield w
    w.stop()


@pytest.fixture
def make_device(mosquitto: MosquittoBroker, nrf: McuTarget, keyring: KeyRing) -> Iterator[Callable[..., DeviceRuntime]]:
    started: list[DeviceRuntime] = []

    def make(device_id: str = "node-0001", **kwargs: Any) -> DeviceRuntime:
        kwargs.setdefault("config", FAST)
        kwargs.setdefault("simulator", MachineSimulator(seed=5))
        device = DeviceRuntime(device_id, FLEET, kwargs.pop("profile", nrf), keyring, mosquitto.address, **kwargs)
        started.append(device.start())
        return device

    yield make
    for device in started:
        device.stop()


def wait_until(condition: Callable[[], bool], timeout_s: float = 10.0) -> None:
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not met in time")
        time.sleep(0.01)


def deploy(
    publisher: ModelPublisher, model: bytes, spec: DspSpec, arena: int, version: int, **overrides: Any
) -> Manifest:
    kwargs: dict[str, Any] = {"name": "vibration-ae-nrf52840", "target": "nrf52840", "dsp_spec": spec,
                              "threshold": 1.5, "arena_bytes": arena, "device": "node-0001"}  # fmt: skip
    return publisher.deploy(model, version=version, **{**kwargs, **overrides})


def settle(device: DeviceRuntime, version: int, timeout_s: float = 20.0, after_seq: int = 0) -> DeviceStatus:
    """Wait for the final status of the deployment of ``version``."""
    return device.wait_for(
        lambda s: s.version == version and s.state in ("active", "failed", "ignored", "cancelled"), timeout_s, after_seq
    )


def rollout(
    device: DeviceRuntime, publisher: ModelPublisher, model: bytes, spec: DspSpec, arena: int, version: int, **kw: Any
) -> DeviceStatus:
    """Deploy and wait for the device's final status of this deployment."""
    seq = device.status.seq if device.status else 0
    deploy(publisher, model, spec, arena, version, **kw)
    return settle(device, version, after_seq=seq)


@pytest.fixture
def running_v1(
    make_device: Callable[..., DeviceRuntime], publisher: ShapingPublisher, model: bytes, spec: DspSpec, arena: int
) -> DeviceRuntime:
    """A device that runs version 1 of the model, deployed over the air."""
    device = make_device()
    assert settle(device, deploy(publisher, model, spec, arena, 1).model_version).state == "active"
    return device


def assert_still_runs_v1(device: DeviceRuntime, status: DeviceStatus) -> None:
    assert device.active is not None and device.active.manifest.model_version == 1
    assert status.active is not None and status.active.version == 1
    scores = device.score_windows(3)
    assert len(scores) == 3 and all(np.isfinite(s.score) for s in scores)


def test_published_windows_carry_the_machines_speed_as_the_tachometer_value(
    make_device: Callable[..., DeviceRuntime], watcher: Watcher
) -> None:
    machine = MachineSimulator(seed=5, operating_point=OperatingPoint(rpm=1500.0, load=0.5))
    machine.add_drift(DriftSpec("speed", amount=0.1, onset_s=2 * 1024 / 25_600))  # a step from the third window
    device = make_device(config=replace(FAST, publish_windows=True), simulator=machine)
    device.score_windows(4)  # no model yet: sampled and published all the same
    topic = TOPICS.vibration(device.device_id)
    watcher.wait(topic, codec, lambda w: w.seq == 3)
    assert [w.rpm for w in watcher.decoded(topic, codec)] == pytest.approx([1500.0, 1500.0, 1650.0, 1650.0])


# --- the happy path -------------------------------------------------------------------------


def test_announce_deploy_verify_load_activate_and_score(
    make_device: Callable[..., DeviceRuntime],
    publisher: ShapingPublisher,
    watcher: Watcher,
    model: bytes,
    spec: DspSpec,
    arena: int,
    nrf: McuTarget,
) -> None:
    device = make_device(simulator=MachineSimulator(seed=5))
    announce = watcher.wait(TOPICS.announce("node-0001"), Announcement, lambda a: True)
    budget = MemoryBudget.of(nrf)
    assert (announce.profile, announce.slot_bytes, announce.ram_free) == ("nrf52840", budget.slot_bytes, 131_072)
    assert announce.flash_free == 1_048_576 - 458_752 - 65_536 and announce.model is None
    assert announce.key_ids == ["ops-2026"] and announce.dsp_versions == [1, 2]

    manifest = deploy(publisher, model, spec, arena, 1, threshold=2.0)
    final = settle(device, 1)
    assert final.state == "active", final.detail
    assert [s.state for s in device.statuses] == ["idle", "downloading", "verified", "loaded", "active"]
    lat = final.latency_ms
    assert 0 < lat["download_ms"] <= lat["deploy_ms"] and lat["load_ms"] > 0 and lat["inference_ms"] > 0
    assert lat["deploy_ms"] >= lat["download_ms"] + lat["load_ms"]
    assert final.active is not None and final.active.sha256 == hashlib.sha256(model).hexdigest()
    assert publisher.served["node-0001"] == manifest.chunk_count

    # the server sees the same story on the broker: retained status and the updated announcement
    seen = watcher.wait(TOPICS.status("node-0001"), DeviceStatus, lambda s: s.state == "active")
    assert seen.active == final.active and seen.latency_ms == final.latency_ms
    assert watcher.wait(TOPICS.announce("node-0001"), Announcement, lambda a: a.model is not None).model.version == 1

    # scores: the smoke test took window 0, so windows 1..6 are scored; recompute them offline
    scores = device.score_windows(6)
    twin = MachineSimulator(seed=5)
    twin.next_window()
    runner = TflmRunner(model, arena)
    expected = []
    for _ in range(6):
        samples, scale = quantize(twin.next_window(), 16.0)
        features = extract_features(samples.astype(np.float32) * np.float32(scale), spec)
        expected.append(float(anomaly_scores(features, runner.predict(features))[0]))
    np.testing.assert_allclose([s.score for s in scores], expected, rtol=1e-6)
    assert [s.seq for s in scores] == list(range(1, 7))
    assert [s.anomaly for s in scores] == [v > manifest.threshold for v in expected]
    wait_until(lambda: sum(len(b.scores) for b in watcher.decoded(TOPICS.scores("node-0001"), ScoreBatch)) == 6)
    batches = watcher.decoded(TOPICS.scores("node-0001"), ScoreBatch)
    assert [len(b.scores) for b in batches] == [4, 2] and batches[1].first_seq == 5
    assert [v for b in batches for v in b.scores] == [s.score for s in scores]

    summary = device.publish_summary()
    assert summary is not None and summary.windows == 6 and sum(summary.score_counts) == 6
    assert len(summary.feature_mean) == spec.n_features and min(summary.feature_var) >= 0
    assert summary.anomalies == sum(s.anomaly for s in scores)
    published = watcher.wait(TOPICS.summary("node-0001"), DriftSummary, lambda s: True)
    assert published == summary


class BrokenTachometer(MachineSimulator):
    """A machine whose tachometer reads what the test sets (0, NaN, out of range: a broken or missing sensor)."""

    reading = 1797.0

    @property
    def current_rpm(self) -> float:
        return self.reading


def test_each_window_is_scored_at_its_speed_and_an_unusable_speed_falls_back_counted(
    make_device: Callable[..., DeviceRuntime], publisher: ShapingPublisher, model: bytes, arena: int
) -> None:
    sim, speeds = MachineSimulator(seed=99), np.repeat([900.0, 1100.0, 1300.0, 1500.0], 8)
    windows = []
    for rpm in speeds:
        sim.set_operating_point(OperatingPoint(rpm, 0.5))
        windows.append(sim.next_window())
    trained = DspSpec().fitted(raw_features(np.stack(windows), DspSpec()), speeds)
    assert trained.speed_slope
    device = make_device(simulator=BrokenTachometer(seed=5))
    assert settle(device, deploy(publisher, model, trained, arena, 1).model_version).state == "active"
    readings = [900.0, 1500.0, 1200.0, float("nan"), 0.0, 70_000.0, -1.0]
    scores = []
    for rpm in readings:
        device.simulator.reading = rpm  # type: ignore[attr-defined]
        scores += device.score_windows(1)

    held = decode_dsp_block(encode_dsp_block(trained))  # float32 statistics, as the device holds them
    twin, runner = MachineSimulator(seed=5), TflmRunner(model, arena)
    twin.next_window()  # the smoke test's window
    expected = []
    for rpm in readings:
        samples, scale = quantize(twin.next_window(), 16.0)
        features = extract_features(samples.astype(np.float32) * np.float32(scale), held, rpm)
        expected.append(float(anomaly_scores(features, runner.predict(features))[0]))
    np.testing.assert_allclose([s.score for s in scores], expected, rtol=1e-6)
    assert [s.speed_fallback for s in scores] == [False, False, False, True, True, True, True]
    at_reference = extract_features(samples.astype(np.float32) * np.float32(scale), held)
    assert expected[-1] == float(anomaly_scores(at_reference, runner.predict(at_reference))[0])
    summary = device.publish_summary()
    assert summary is not None
    worst = float(np.max(np.abs(np.array([s.score for s in scores]) / np.array(expected) - 1)))
    record(
        FaultRecord(
            "window without a usable speed (simulated device)", broken_devices=int(device.active is None),
            notes=f"{len(scores)} of {len(readings)} windows scored (tachometer 900, 1500, 1200 rpm, then NaN, 0, "
            f"70,000 and -1 rpm); {summary.speed_fallback} normalised at the reference speed and counted "
            f"(speed_fallback {summary.speed_fallback} in the drift summary); scores against the offline normalise at "
            f"each window's speed: largest relative difference {worst:.1g}; the device kept scoring",
        )
    )  # fmt: skip
    assert (summary.windows, summary.speed_fallback, device.speed_fallbacks) == (7, 4, 4)
    after = settle(device, deploy(publisher, model, trained, arena, 2).model_version)  # any status carries the count
    assert after.state == "active" and after.counters["speed_fallback"] == 4


def test_fault_raises_the_scores(
    make_device: Callable[..., DeviceRuntime], publisher: ShapingPublisher, model: bytes, spec: DspSpec, arena: int
) -> None:
    simulator = MachineSimulator(seed=8)
    device = make_device(simulator=simulator)
    assert settle(device, deploy(publisher, model, spec, arena, 1).model_version).state == "active"
    healthy = np.median([s.score for s in device.score_windows(10)])
    simulator.inject_fault(FaultSpec("outer_race", 1.0, onset_s=simulator.time_s))
    faulty = np.median([s.score for s in device.score_windows(10)])
    assert faulty > 2 * healthy


# --- transfer faults --------------------------------------------------------------------------


def test_duplicate_out_of_order_and_missing_chunks(
    running_v1: DeviceRuntime, publisher: ShapingPublisher, model: bytes, spec: DspSpec, arena: int
) -> None:
    device = running_v1
    pending: list[bytes] = []

    def shape(index: int, encoded: bytes, nth: int) -> list[bytes]:
        if index == 2 and nth == 1:
            return []  # lost once: only a re-request brings it
        pending.append(encoded)
        # flush in reverse order, every chunk twice, when the request's last chunk is reached
        if index == 6 or (index == 2 and nth > 1):
            out = [p for p in reversed(pending) for _ in range(2)]
            pending.clear()
            return out
        return []

    publisher.shape = shape
    final = settle(device, deploy(publisher, model, spec, arena, 2).model_version)
    assert final.state == "active", final.detail
    assert final.counters["duplicates"] >= 6 and final.counters["retries"] >= 1 and final.counters["requests"] >= 2
    assert device.active is not None and device.active.manifest.model_version == 2


def test_chunk_corrupted_once_is_fetched_again(
    running_v1: DeviceRuntime, publisher: ShapingPublisher, model: bytes, spec: DspSpec, arena: int
) -> None:
    publisher.shape = lambda i, enc, nth: [enc[:30] + bytes([enc[30] ^ 1]) + enc[31:]] if i == 3 and nth == 1 else [enc]
    final = settle(running_v1, deploy(publisher, model, spec, arena, 2).model_version)
    assert final.state == "active" and final.counters["corrupt"] == 1


def test_chunk_always_corrupted_fails_and_keeps_the_old_model(
    running_v1: DeviceRuntime, publisher: ShapingPublisher, model: bytes, spec: DspSpec, arena: int
) -> None:
    publisher.shape = lambda i, enc, nth: [enc[:30] + bytes([enc[30] ^ 1]) + enc[31:]] if i == 3 else [enc]
    final = settle(running_v1, deploy(publisher, model, spec, arena, 2).model_version, timeout_s=30)
    assert (final.state, final.status) == ("failed", "failed: corrupt chunks")
    assert final.counters["corrupt"] == FAST.max_corrupt_chunks + 1
    assert_still_runs_v1(running_v1, final)


def test_tampered_chunk_with_valid_crc_fails_the_sha256(
    running_v1: DeviceRuntime, publisher: ShapingPublisher, model: bytes, spec: DspSpec, arena: int
) -> None:
    def tamper(index: int, encoded: bytes, _nth: int) -> list[bytes]:
        if index != 1:
            return [encoded]
        body = bytearray(encoded[:-4])
        body[100] ^= 0xFF
        return [bytes(body) + crc32(bytes(body)).to_bytes(4, "little")]

    publisher.shape = tamper
    final = settle(running_v1, deploy(publisher, model, spec, arena, 2).model_version)
    assert (final.state, final.reason) == ("failed", "sha256 mismatch")
    assert_still_runs_v1(running_v1, final)


@pytest.mark.faults
def test_broker_restart_mid_transfer_resumes(
    running_v1: DeviceRuntime,
    publisher: ShapingPublisher,
    mosquitto: MosquittoBroker,
    model: bytes,
    spec: DspSpec,
    arena: int,
) -> None:
    device = running_v1
    publisher.hold_from = 3
    manifest = deploy(publisher, model, spec, arena, 2)
    wait_until(lambda: device.receiver.received_count == 3)
    port = mosquitto.port
    mosquitto.kill()
    wait_until(lambda: not device.connected)
    publisher.hold_from = None
    mark = len(publisher.log)
    restarted = MosquittoBroker(port=port).start()
    try:
        final = settle(device, manifest.model_version, timeout_s=30)
        assert final.state == "active", final.detail
        after = [index for _, index in list(publisher.log)[mark:]]
        assert after and min(after) == 3, after  # resumed at the first missing chunk, not from 0
        device.stop()  # before the broker: a client left behind would wait in its reconnect delay
        publisher.stop()
    finally:
        restarted.stop()


def test_device_offline_and_back_resumes_from_its_last_chunk(
    running_v1: DeviceRuntime, publisher: ShapingPublisher, model: bytes, spec: DspSpec, arena: int
) -> None:
    device = running_v1
    publisher.hold_from = 4
    manifest = deploy(publisher, model, spec, arena, 2)
    wait_until(lambda: device.receiver.received_count == 4)
    device.go_offline()
    wait_until(lambda: not device.connected)
    publisher.hold_from = None
    time.sleep(0.5)  # no request goes out while offline
    mark = len(publisher.log)
    device.go_online()
    final = settle(device, manifest.model_version)
    assert final.state == "active", final.detail
    assert min(index for _, index in list(publisher.log)[mark:]) == 4


def test_withdrawn_manifest_cancels_the_download(
    running_v1: DeviceRuntime, publisher: ShapingPublisher, model: bytes, spec: DspSpec, arena: int
) -> None:
    publisher.hold_from = 2
    manifest = deploy(publisher, model, spec, arena, 2)
    wait_until(lambda: running_v1.receiver.received_count == 2)
    publisher.withdraw(manifest.audience)
    final = settle(running_v1, 2)
    assert final.state == "cancelled"
    assert_still_runs_v1(running_v1, final)


# --- refused manifests ----------------------------------------------------------------------


@pytest.mark.parametrize("case", ["unknown key", "revoked key", "bad signature", "wrong audience"])
def test_unauthentic_manifests_are_refused_before_any_download(
    case: str,
    running_v1: DeviceRuntime,
    publisher: ShapingPublisher,
    watcher: Watcher,
    old_signer: ManifestSigner,
    model: bytes,
    spec: DspSpec,
    arena: int,
) -> None:
    common: dict[str, Any] = {"name": "m", "version": 2, "target": "nrf52840", "dsp_spec": spec, "threshold": 1.0,
                              "arena_bytes": arena, "audience": device_audience("node-0001")}  # fmt: skip
    if case == "unknown key":
        manifest = build_manifest(model, signer=ManifestSigner(generate_keypair()[0], "intruder"), **common)
        payload = manifest.encode()
    elif case == "revoked key":
        manifest = build_manifest(model, signer=old_signer, **common)
        payload = manifest.encode()
    elif case == "bad signature":
        manifest = build_manifest(model, signer=publisher.signer, **common)
        forged = replace(manifest, threshold=100.0)  # raise the threshold, keep the signature
        payload = forged.encode()
    else:
        manifest = build_manifest(model, signer=publisher.signer, **{**common, "audience": "device:node-0099"})
        payload = manifest.encode()
    before = publisher.served["node-0001"]
    publisher.add_model(manifest, model)  # the chunks would be there: only the device's checks stop it
    watcher.client.publish(TOPICS.manifest("node-0001"), payload, qos=1, retain=True).wait_for_publish(5)
    final = settle(running_v1, 2)
    assert (final.state, final.reason) == ("failed", case)
    assert publisher.served["node-0001"] == before
    assert_still_runs_v1(running_v1, final)


def test_wrong_profile_too_large_and_arena_over_ram_are_refused(
    running_v1: DeviceRuntime, publisher: ShapingPublisher, model: bytes, spec: DspSpec, arena: int
) -> None:
    before = publisher.served["node-0001"]
    final = rollout(running_v1, publisher, model, spec, arena, 2, target="stm32l4r5")
    assert final.status == "failed: wrong profile" and "stm32l4r5" in final.detail
    huge = bytes(300_000)  # larger than the nRF52840's 256 KiB staging slot
    final = rollout(running_v1, publisher, huge, spec, arena, 3, references=compute_references(model, arena))
    assert final.status == "failed: too large" and "262144" in final.detail
    final = rollout(running_v1, publisher, model, spec, 200_000, 4)
    assert final.status == "failed: arena too large" and "131072" in final.detail
    assert publisher.served["node-0001"] == before  # nothing was downloaded
    assert_still_runs_v1(running_v1, final)


@pytest.mark.parametrize("case", ["not a model", "arena far too small", "features mismatch"])
def test_model_that_fails_to_load_keeps_the_old_one(
    case: str, running_v1: DeviceRuntime, publisher: ShapingPublisher, model: bytes, spec: DspSpec, arena: int
) -> None:
    references = compute_references(model, arena)  # the server cannot compute them for these
    if case == "not a model":
        manifest = deploy(publisher, hashlib.shake_256(b"noise").digest(5000), spec, arena, 2, references=references)
    elif case == "arena far too small":  # crashes TFLM in-process; the probe keeps this process alive
        manifest = deploy(publisher, model, spec, 64, 2, references=references)
    else:
        small = DspSpec(n_bands=16).fitted(np.random.default_rng(0).standard_normal((8, 19)).astype(np.float32))
        manifest = deploy(publisher, model, small, arena, 2)
    final = settle(running_v1, manifest.model_version)
    assert (final.state, final.reason) == ("failed", "load failed"), final.detail
    assert "verified" in [s.state for s in running_v1.statuses if s.version == 2]
    assert_still_runs_v1(running_v1, final)


def test_dead_model_that_misses_its_reference_outputs_is_refused_and_a_good_one_passes(
    running_v1: DeviceRuntime, publisher: ShapingPublisher, model: bytes, spec: DspSpec, arena: int
) -> None:
    dead = with_first_dense_zeroed(model)  # loads and scores finitely: the same output for every input
    with pytest.raises(OtaError, match="same output for all 3 reference inputs"):
        deploy(publisher, dead, spec, arena, 2)  # the server does not sign a dead model's own references
    manifest = deploy(publisher, dead, spec, arena, 2, references=compute_references(model, arena))
    final = settle(running_v1, manifest.model_version)
    assert (final.state, final.reason) == ("failed", "smoke test failed"), final.detail
    loaded = "loaded" in [s.state for s in running_v1.statuses if s.version == 2]
    assert_still_runs_v1(running_v1, final)
    good = rollout(running_v1, publisher, model, spec, arena, 3)  # the good model reproduces its references
    record(
        FaultRecord(
            "signed model with its first layer zeroed (simulated device)", broken_devices=int(good.state != "active"),
            notes=f"the server refused to sign the dead model's own references (same output for all 3 inputs); "
            f"signed with the good model's: loaded, then {final.status} ({final.detail}), v1 kept running; "
            f"the good model then {good.status}. Before: the dead model passed the smoke test and ran",
        )
    )  # fmt: skip
    assert "reference 2 of 3" in final.detail and "LSB > 2" in final.detail and loaded
    assert good.state == "active"


def test_older_and_same_versions_are_ignored(
    running_v1: DeviceRuntime,
    publisher: ShapingPublisher,
    watcher: Watcher,
    model: bytes,
    spec: DspSpec,
    arena: int,
) -> None:
    device = running_v1
    assert rollout(device, publisher, model, spec, arena, 3).state == "active"
    served = publisher.served["node-0001"]
    final = rollout(device, publisher, model, spec, arena, 2)
    assert final.status == "ignored: not newer" and "2 is not newer than 3" in final.detail
    final = rollout(device, publisher, model, spec, arena, 3, threshold=9.0)
    assert final.status == "ignored: not newer" and final.active is not None and final.active.version == 3
    # the byte-identical active manifest again (as a broker redelivers a retained one): nothing to do, no new
    # status; the current one is published again as the answer
    seq = device.status.seq if device.status else 0
    topic = TOPICS.status("node-0001")
    wait_until(lambda: watcher.decoded(topic, DeviceStatus)[-1].seq == seq)
    heard = len(watcher.decoded(topic, DeviceStatus))
    same = deploy(publisher, model, spec, arena, 3)
    wait_until(lambda: len(watcher.decoded(topic, DeviceStatus)) == heard + 1)
    assert watcher.decoded(topic, DeviceStatus)[-1] == device.status
    assert device.status is not None and device.status.seq == seq and same.model_version == 3
    assert publisher.served["node-0001"] == served
    assert device.active is not None and device.active.manifest.model_version == 3


def test_group_manifest_reaches_members_only(
    make_device: Callable[..., DeviceRuntime], publisher: ShapingPublisher, model: bytes, spec: DspSpec, arena: int
) -> None:
    member = make_device("node-0001", group="canary")
    other = make_device("node-0002", simulator=MachineSimulator(seed=6))
    deploy(publisher, model, spec, arena, 1, device=None, group="canary")
    assert settle(member, 1).state == "active"
    time.sleep(0.3)
    assert other.active is None and other.status is not None and other.status.state == "idle"


def test_protocol_works_through_the_embedded_amqtt_broker(
    nrf: McuTarget, keyring: KeyRing, signer: ManifestSigner, model: bytes, spec: DspSpec, arena: int
) -> None:
    broker = AmqttBroker().start()  # MQTT 3.1.1 only: retained manifests, QoS 1, empty retained = withdrawn
    try:
        with ShapingPublisher(broker.address, TOPICS, signer) as publisher:
            with DeviceRuntime("node-0001", FLEET, nrf, keyring, broker.address, config=FAST) as device:
                assert rollout(device, publisher, model, spec, arena, 1).state == "active"
                publisher.hold_from = 1
                manifest = deploy(publisher, model, spec, arena, 2)
                wait_until(lambda: device.receiver.received_count == 1)
                publisher.withdraw(manifest.audience)
                assert settle(device, 2).state == "cancelled"
            # a device that starts later gets the retained manifest of its group
            publisher.hold_from = None
            deploy(publisher, model, spec, arena, 3, device=None, group="late")
            with DeviceRuntime("node-0002", FLEET, nrf, keyring, broker.address, group="late", config=FAST) as late:
                assert settle(late, 3).state == "active"
    finally:
        broker.stop()


# --- many devices -----------------------------------------------------------------------------


def test_fleet_of_devices_on_shared_connections(
    mosquitto: MosquittoBroker,
    publisher: ShapingPublisher,
    watcher: Watcher,
    nrf: McuTarget,
    keyring: KeyRing,
    model: bytes,
    spec: DspSpec,
    arena: int,
) -> None:
    n = 12
    groups = {f"edge-{i:04d}": "canary" for i in range(3)}
    with DeviceFleet(FLEET, n, nrf, keyring, mosquitto.address, group="line-1", groups=groups, seed=3,
                     devices_per_connection=5, config=FAST, device_prefix="edge") as fleet:  # fmt: skip
        assert fleet.connections == 3
        canary = list(groups)
        deploy(publisher, model, spec, arena, 1, device=None, group="canary")
        fleet.wait_for_all(lambda s: s.state == "active", 30, device_ids=canary)
        start = time.perf_counter()
        deploy(publisher, model, spec, arena, 1, device=None, group="line-1")
        rest = [d.device_id for d in fleet.devices if d.device_id not in groups]
        done = fleet.wait_for_all(lambda s: s.state == "active" and s.version == 1, 60, device_ids=rest)
        elapsed = time.perf_counter() - start
        assert len(done) == n - 3 and elapsed < 60
        for device_id in [*canary, rest[0], rest[-1]]:  # identity stays per device on shared connections
            seen = watcher.wait(TOPICS.status(device_id), DeviceStatus, lambda s: s.state == "active")
            assert seen.device == device_id
        fleet.sensors.inject_fault(FaultSpec("inner_race", 1.0), ["edge-0005"])
        scores = fleet.score_windows(8)
        assert all(len(v) == 8 for v in scores.values())
        medians = {k: np.median([s.score for s in v]) for k, v in scores.items()}
        assert max(medians, key=lambda k: medians[k]) == "edge-0005"
        summaries = fleet.publish_summaries()
        assert all(s is not None and s.windows == 8 for s in summaries.values())


def test_fleet_under_a_per_device_acl(
    tmp_path: Path, nrf: McuTarget, keyring: KeyRing, signer: ManifestSigner, model: bytes, spec: DspSpec, arena: int
) -> None:
    """With a broker ACL that gives each user only its own topics, each device needs its own connection."""
    passwd = tmp_path / "passwd"
    passwd.touch()
    users = {"server": "s3cret", "node-0000": "pw-0", "node-0001": "pw-1"}
    for user, password in users.items():
        subprocess.run(["mosquitto_passwd", "-b", str(passwd), user, password], check=True, capture_output=True)
    prefix = f"{TOPICS.root}/{FLEET}"
    acl = tmp_path / "acl"
    acl.write_text(
        "".join(f"pattern write {prefix}/%u/{s}\n" for s in ("announce", "ota/req", "ota/status", "scores", "summary"))
        + "".join(f"pattern read {prefix}/%u/{s}\n" for s in ("ota/manifest", "ota/chunk"))
        + "".join(f"user {u}\ntopic read {prefix}/groups/line/ota/manifest\n" for u in ("node-0000", "node-0001"))
        + f"user server\ntopic readwrite {prefix}/#\n"
    )
    config = f"allow_anonymous false\npassword_file {passwd}\nacl_file {acl}\n"
    broker = MosquittoBroker(extra_config=config + ("user root\n" if os.geteuid() == 0 else "")).start()

    def login(user: str) -> MqttSettings:
        return MqttSettings(username=user, password=SecretStr(users[user]))

    try:
        with ModelPublisher(broker.address, TOPICS, signer, settings=login("server")) as publisher:
            with DeviceFleet(FLEET, 2, nrf, keyring, broker.address, group="line", devices_per_connection=1,
                             config=FAST, credentials=login) as fleet:  # fmt: skip
                deploy(publisher, model, spec, arena, 1, device=None, group="line")
                assert len(fleet.wait_for_all(lambda s: s.state == "active", 30)) == 2
            # sharing one connection, both devices act as node-0000: node-0001's topics are denied
            with DeviceFleet(FLEET, 2, nrf, keyring, broker.address, group="line", devices_per_connection=2,
                             config=FAST, mqtt_settings=login("node-0000")) as shared:  # fmt: skip
                assert shared.wait_for_all(lambda s: s.state == "active", 20, device_ids=["node-0000"])
                time.sleep(0.5)
                assert shared.device("node-0001").active is None
    finally:
        broker.stop()
    with pytest.raises(DeviceError, match="devices_per_connection=1"):
        DeviceFleet(FLEET, 2, nrf, keyring, broker.address, devices_per_connection=2, credentials=login)


# --- the CLI ----------------------------------------------------------------------------------


def test_cli_keygen_then_run_devices_that_take_a_group_deploy(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mosquitto: MosquittoBroker, model: bytes, spec: DspSpec,
    arena: int,
) -> None:  # fmt: skip
    from tinymlops.cli_device import device_app
    from tinymlops.settings import reset_settings

    monkeypatch.setenv("TINYMLOPS_DATA_DIR", str(tmp_path))
    monkeypatch.setenv("TINYMLOPS_FLEET", FLEET)
    reset_settings()
    runner = CliRunner()
    result = runner.invoke(device_app, ["keygen", "--key-id", "cli-key"])
    assert result.exit_code == 0, result.output
    key_file = tmp_path / "keys" / "ota_signing_key.pem"
    assert key_file.stat().st_mode & 0o777 == 0o600
    signer = ManifestSigner(load_private_key(key_file), "cli-key")
    assert runner.invoke(device_app, ["keygen", "--key-id", "cli-key"]).exit_code != 0  # no silent overwrite

    def deploy_later() -> None:
        time.sleep(1.0)
        with ModelPublisher(mosquitto.address, TOPICS, signer) as pub:
            deploy(pub, model, spec, arena, 1, device=None, group="north")
            time.sleep(2.0)

    thread = threading.Thread(target=deploy_later)
    thread.start()
    args = ["run", "--devices", "3", "--group", "north", "--seconds", "5", "--interval", "0.2",
            "--broker", mosquitto.address.url]  # fmt: skip
    result = runner.invoke(device_app, args)
    thread.join()
    reset_settings()
    assert result.exit_code == 0, result.output
    rows = [line for line in result.output.splitlines() if "node-000" in line]
    assert len(rows) == 3 and all("active" in row and "v1" in row for row in rows), result.output
    windows = [int(row.split("│")[5]) for row in rows]  # scored in real time, every 0.2 s once active
    assert all(w > 0 for w in windows), result.output
    status = runner.invoke(device_app, ["status", "--broker", mosquitto.address.url, "--json"])
    assert status.exit_code == 0
    assert sorted(DeviceStatus.model_validate_json(line).device for line in status.output.splitlines()) == [
        "node-0000", "node-0001", "node-0002",
    ]  # fmt: skip


def test_cli_status_takes_the_device_from_the_topic(settings: Any, mosquitto: MosquittoBroker) -> None:
    from tinymlops.cli_device import device_app

    real = DeviceStatus(device="node-0000", seq=1, ts=1.0, state="idle", status="idle")
    spoof = real.model_copy(update={"state": "failed", "status": "failed: spoofed"})
    client = make_client(mosquitto.address, "hostile")
    connect(client, mosquitto.address)
    for topic, message in ((TOPICS.status("node-0000"), real), (TOPICS.status("node-0009"), spoof)):
        client.publish(topic, message.encode(), qos=1, retain=True).wait_for_publish(5)
    client.disconnect()
    client.loop_stop()
    args = ["status", "--broker", mosquitto.address.url, "--fleet", FLEET, "--wait", "0.5", "--json"]
    result = CliRunner().invoke(device_app, args)
    assert result.exit_code == 0, result.output
    assert [DeviceStatus.model_validate_json(line) for line in result.output.splitlines()] == [real]
