"""Deployment benchmark: over-the-air model updates to simulated devices beside bare MQTT delivery, in one run.

A real Mosquitto on loopback, real TFLite Micro devices (:class:`~firmware.device.DeviceRuntime`,
:class:`~firmware.device_fleet.DeviceFleet`) and the deploy flow's own
:class:`~tasks.deploy.DeploymentSession`: signed manifests, chunks pulled by the devices, sha256
check, TFLite Micro load, smoke inference, the ``active`` status back at the server.

* One device, repeated deployments of the same small int8 model under increasing manifest
  versions: deployment latency (server: manifest published -> ``active`` received), and the
  device's load and inference latency. The host device probes the tensor arena of new model
  bytes in a subprocess once per process, so the first deployment is reported on its own.
* Fleets of 1, 100 and 1,000 devices (50 per MQTT connection): the time until every device runs
  the new model, beside the time a bare paho publisher needs to deliver the same chunk messages
  to the same number of subscribers on the same number of connections.

Like the CLI, this module is part of the application layer on top of flows and tasks.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections import Counter
from typing import Any

import numpy as np

from firmware.device import DeviceConfig, DeviceRuntime
from firmware.device_fleet import DeviceFleet
from firmware.ota import DEFAULT_CHUNK_SIZE, build_manifest, device_audience, split_model
from firmware.sensor import MachineSimulator
from firmware.signing import KeyRing, ManifestSigner, generate_keypair
from firmware.tflm import measure_arena, tflite_predict
from tasks.compress import to_tflite_int8
from tasks.deploy import DeployableModel, DeploymentSession
from tasks.train import (
    TrainingConfig,
    calibrate_threshold,
    calibrated_false_alarm_rate,
    reconstruction_error,
    train_autoencoder,
)
from tinymlops.bench import machine_description
from tinymlops.contracts.dsp import DspSpec, extract_features, raw_features
from tinymlops.contracts.topics import FleetTopics
from tinymlops.errors import TinyMLOpsError
from tinymlops.mqtt import BrokerAddress, MosquittoBroker, connect, make_client
from tinymlops.settings import Settings
from tinymlops.targets import get_target, load_catalog

log = logging.getLogger(__name__)

PROFILE = "nrf52840"
PER_CONNECTION = 50
# Targets of the benchmark: p50 deployment to one device, a 1,000-device update, and the ratio to bare MQTT.
TARGET_P50_MS = 50.0
TARGET_FLEET_S = 30.0
TARGET_RATIO = 3.0
_EXPECTED_ANOMALY_RATE = 0.005


class BenchDeployError(TinyMLOpsError):
    """A deployment of the benchmark did not complete."""


def bench_model(settings: Settings, *, seed: int = 0) -> DeployableModel:
    """Train a small int8 autoencoder (35-16-8-16-35) on simulated healthy windows: < 32 KB, thresholded."""
    sim = MachineSimulator(seed=seed, sample_rate_hz=settings.sensor.sample_rate_hz,
                           window_samples=settings.sensor.window_samples)  # fmt: skip
    windows = np.stack([sim.next_window() for _ in range(400)])
    base = DspSpec(sample_rate_hz=settings.sensor.sample_rate_hz, window_samples=settings.sensor.window_samples)
    spec = base.fitted(raw_features(windows[:300], base))
    features = extract_features(windows, spec)
    config = TrainingConfig(hidden=[16, 8, 16], epochs=5, patience=5, seed=seed)
    trained = train_autoencoder(features[:240], features[240:300], config)
    model = to_tflite_int8(trained.model, features[:200])
    arena = measure_arena(model).smallest_working_bytes
    # The TFLite interpreter, not TFLite Micro, so as not to probe the arena here; the first deployment is still
    # reported apart (the server's signed reference outputs may probe it first, in this same process).
    errors = reconstruction_error(lambda x: tflite_predict(model, x), features[300:])
    percentile = 100 * (1 - _EXPECTED_ANOMALY_RATE)
    threshold = calibrate_threshold(errors, percentile)
    return DeployableModel("bench-ae", PROFILE, model, spec, threshold, arena,
                           expected_anomaly_rate=calibrated_false_alarm_rate(len(errors), percentile))  # fmt: skip


def _percentile(values: list[float], q: float) -> float:
    return round(float(np.percentile(values, q)), 3)


def _single_device(
    address: BrokerAddress, model: DeployableModel, signer: ManifestSigner, ring: KeyRing, repeats: int
) -> dict[str, Any]:
    """Deploy ``repeats + 1`` times to one device; the first deployment is reported apart."""
    topics = FleetTopics("bench-one")
    profile = get_target(PROFILE, load_catalog())
    with (
        DeviceRuntime("bench-0001", topics.fleet, profile, ring, address, config=DeviceConfig()),
        DeploymentSession(address, topics, signer) as session,
    ):
        targets = session.announcements()
        rows = []
        for _ in range(repeats + 1):
            (outcome,) = session.deploy(model, targets, timeout_s=60)
            if not outcome.active:
                raise BenchDeployError(f"deployment to one device failed: {outcome.status} {outcome.detail}")
            rows.append(outcome.latency_ms)
    first, rest = rows[0], rows[1:]
    return {
        "deployments": repeats,
        "deploy_latency_ms_first": round(first["deploy"], 3),
        "load_latency_ms_first": round(first["load"], 3),
        "deploy_latency_ms_p50": _percentile([r["deploy"] for r in rest], 50),
        "deploy_latency_ms_p95": _percentile([r["deploy"] for r in rest], 95),
        "device_deploy_latency_ms_p50": _percentile([r["device_deploy"] for r in rest], 50),
        "download_latency_ms_p50": _percentile([r["download"] for r in rest], 50),
        "load_latency_ms_p50": _percentile([r["load"] for r in rest], 50),
        "inference_latency_ms_p50": _percentile([r["inference"] for r in rest], 50),
    }


def _fleet_update(
    address: BrokerAddress, model: DeployableModel, signer: ManifestSigner, ring: KeyRing, n: int
) -> tuple[float, float]:
    """Seconds from the first manifest published until all ``n`` devices reported ``active``; p50 device time (ms).

    The device time (manifest received -> active, as each device reports it) shows how much of the
    update is the simulated devices' own work (sha256, TFLite Micro load, smoke inference), which
    shares this process and its cores with the server.
    """
    topics = FleetTopics(f"bench-fleet-{n}")
    profile = get_target(PROFILE, load_catalog())
    fleet = DeviceFleet(topics.fleet, n, profile, ring, address, devices_per_connection=PER_CONNECTION)
    with fleet, DeploymentSession(address, topics, signer) as session:
        targets = session.announcements()
        if len(targets) != n:
            raise BenchDeployError(f"{len(targets)} of {n} devices announced themselves")
        started = time.perf_counter()
        outcomes = session.deploy(model, targets, timeout_s=600)
        elapsed = time.perf_counter() - started
    failed = [o for o in outcomes if not o.active]
    if failed:
        raise BenchDeployError(f"{len(failed)} of {n} devices not updated, e.g. {failed[0].device}: {failed[0].status}")
    log.info("fleet of %d devices updated in %.2f s", n, elapsed)
    return elapsed, _percentile([o.latency_ms["device_deploy"] for o in outcomes], 50)


def _bare_delivery(address: BrokerAddress, chunks: list[bytes], n: int) -> float:
    """Seconds for a bare paho publisher to deliver the chunk messages to ``n`` subscribers, 50 per connection."""
    topics = FleetTopics(f"bench-bare-{n}")
    devices = [f"node-{i:04d}" for i in range(n)]
    received: Counter[str] = Counter()
    lock = threading.Lock()
    done = threading.Event()
    expected = n * len(chunks)

    def on_message(_client: Any, _userdata: Any, message: Any) -> None:
        with lock:
            received[message.topic] += 1
            if sum(received.values()) >= expected:
                done.set()

    subscribers = []
    for k in range(0, n, PER_CONNECTION):
        client = make_client(address, f"bench-bare-sub-{n}-{k // PER_CONNECTION}")
        client.on_message = on_message
        connect(client, address)
        subscribed = threading.Event()
        client.on_subscribe = lambda *_args, ev=subscribed: ev.set()
        client.subscribe([(topics.chunk(d), 1) for d in devices[k : k + PER_CONNECTION]])
        subscribed.wait(10)
        subscribers.append(client)
    publisher = make_client(address, f"bench-bare-pub-{n}")
    connect(publisher, address)
    try:
        started = time.perf_counter()
        for device in devices:
            topic = topics.chunk(device)
            for chunk in chunks:
                publisher.publish(topic, chunk, qos=1)
        finished = done.wait(600)
        elapsed = time.perf_counter() - started
    finally:
        for client in [publisher, *subscribers]:
            client.disconnect()
            client.loop_stop()
    if not finished:
        raise BenchDeployError(f"bare delivery: {sum(received.values())} of {expected} chunk messages arrived")
    return elapsed


def bench_deploy(settings: Settings, *, quick: bool = False) -> dict[str, Any]:
    """Measure OTA deployment latency to one device and fleet update times against bare MQTT delivery.

    Args:
        settings: Sensor format (the benchmark model's DSP front end).
        quick: A reduced run (CI): 5 deployments, fleets of 1, 50 and 200 devices.

    Returns:
        Figures (latencies in ms, times in s, ratios), the model and chunk sizes, and which targets are met.
    """
    repeats = 5 if quick else 20
    sizes = (1, 50, 200) if quick else (1, 100, 1000)
    model = bench_model(settings)
    signer = ManifestSigner(generate_keypair()[0], "bench")
    ring = KeyRing({signer.key_id: signer.public_key})
    manifest = build_manifest(
        model.tflite, name=model.name, version=1, target=model.target, audience=device_audience("node-0000"),
        dsp_spec=model.dsp_spec, threshold=model.threshold, arena_bytes=model.arena_bytes, signer=signer,
    )  # fmt: skip
    chunks = [c.encode() for c in split_model(model.tflite, manifest)]
    figures: dict[str, Any] = {
        "model_bytes": len(model.tflite),
        "chunk_bytes": DEFAULT_CHUNK_SIZE,
        "chunks": len(chunks),
        "arena_bytes": model.arena_bytes,
        "devices_per_connection": PER_CONNECTION,
    }
    broker = MosquittoBroker().start()
    try:
        figures.update(_single_device(broker.address, model, signer, ring, repeats))
        for n in sizes:
            update_s, device_ms = _fleet_update(broker.address, model, signer, ring, n)
            bare_s = _bare_delivery(broker.address, chunks, n)
            figures[f"fleet_{n}_update_s"] = round(update_s, 3)
            figures[f"fleet_{n}_device_deploy_ms_p50"] = device_ms
            figures[f"bare_broker_fleet_{n}_s"] = round(bare_s, 3)
            figures[f"fleet_{n}_to_bare_ratio"] = round(update_s / bare_s, 2)
    finally:
        broker.stop()
    largest = sizes[-1]
    figures["targets_met"] = {
        f"deploy_latency_p50_under_{TARGET_P50_MS:g}_ms": figures["deploy_latency_ms_p50"] < TARGET_P50_MS,
        f"fleet_{largest}_under_{TARGET_FLEET_S:g}_s": figures[f"fleet_{largest}_update_s"] < TARGET_FLEET_S,
        f"fleet_{largest}_within_{TARGET_RATIO:g}x_bare_broker": figures[f"fleet_{largest}_to_bare_ratio"]
        <= TARGET_RATIO,
    }
    figures["machine"] = machine_description()
    if not math.isfinite(figures["deploy_latency_ms_p50"]):
        raise BenchDeployError("no deployment latency measured")
    return figures
