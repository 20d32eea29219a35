"""Redeploying registered models to simulated devices: real Mosquitto, real TFLite Micro, real MLflow in tmp.

Bundles are real and small: the int8 autoencoder of ``tests/int8_model.py``, a DSP spec and a
threshold calibrated on the very machines the simulated fleet runs (so a healthy model raises
no alarm there), the arena measured, the budget validated, C arrays rendered. Each test uses its
own MCU profile name (a copy of a catalog target), hence its own registered model and aliases.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import threading
import time
import urllib.parse
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
import typer
from mlflow import MlflowClient
from typer.testing import CliRunner

from firmware.carray import model_to_c
from firmware.device import DeviceConfig, DeviceRuntime
from firmware.device_fleet import DeviceFleet
from firmware.fleet import VirtualFleet
from firmware.ota import Announcement, ChunkRequest
from firmware.sensor import quantize
from firmware.signing import KeyRing, ManifestSigner, generate_keypair
from firmware.tflm import count_macs, measure_arena, tflite_predict
from registry.errors import ModelIntegrityError, ModelNotFoundError
from registry.models import CHAMPION, PREVIOUS, aliases_of, describe, register_bundle
from registry.promotion import promote, promotion_history
from registry.pyfunc_model import bundle_dir_of
from registry.store import configure_from_settings
from registry.tracking import log_training_run
from tasks.budget import validate_budget
from tasks.deploy import (
    DEPLOY_EXPERIMENT,
    KEYS_DIR_ENV,
    DeployableModel,
    DeployError,
    DeploymentReport,
    DeploymentSession,
    DeviceOutcome,
    FleetWatcher,
    KeyStore,
    SkippedDevice,
    as_fraction,
    judge_canary,
    plan_canary,
    rate_lower_bound,
    select_targets,
    select_targets_task,
)
from tasks.ota_service import OtaService, OtaServiceError
from tests.fault_ledger import FaultRecord, record
from tests.int8_model import int8_autoencoder
from tinymlops.cli_deploy import deploy_command
from tinymlops.contracts.dsp import DspSpec, extract_features, raw_features
from tinymlops.contracts.scoring import anomaly_scores
from tinymlops.contracts.topics import FleetTopics
from tinymlops.errors import TinyMLOpsError
from tinymlops.mqtt import BrokerAddress, MosquittoBroker, connect, make_client
from tinymlops.schemas import BundleMetadata, DriftReference, registered_model_name, sha256_hex, write_bundle
from tinymlops.settings import get_settings, reset_settings
from tinymlops.targets import McuTarget, get_target, load_catalog

pytestmark = [pytest.mark.mqtt, pytest.mark.mlflow]

FLEET = "plant"
SEED = 40
N_MACHINES = 8
FAST = DeviceConfig(retry_timeout_s=0.3, max_retry_timeout_s=1.0, summary_windows=1_000_000)
SCORING = replace(FAST, score_interval_s=0.05, score_batch=5)  # 20 windows/s per device


# --- real bundles calibrated on the fleet's machines ------------------------------------------


@dataclass(frozen=True)
class Assets:
    model: bytes
    spec: DspSpec
    arena: int
    threshold: float
    drift: DriftReference


def fleet_windows(prefix: str, per_machine: int) -> npt.NDArray[np.float32]:
    """Windows of the machines a DeviceFleet with this prefix runs, quantised as the devices' ADC does."""
    nodes = VirtualFleet(FLEET, N_MACHINES, seed=SEED, device_prefix=prefix).nodes
    rows = []
    for node in nodes:
        for _ in range(per_machine):
            counts, scale = quantize(node.simulator.next_window())
            rows.append(counts.astype(np.float32) * np.float32(scale))
    return np.asarray(rows)


@functools.cache
def assets() -> Assets:
    model = int8_autoencoder()
    windows = fleet_windows("nrf", 30)
    spec = DspSpec().fitted(raw_features(windows, DspSpec()))
    features = extract_features(windows, spec)
    errors = anomaly_scores(features, tflite_predict(model, features))
    threshold = float(3 * errors.max())  # a healthy model raises no alarm on these machines
    drift = DriftReference(features, errors.astype(np.float32), expected_anomaly_rate=0.005)
    return Assets(model, spec, measure_arena(model).smallest_working_bytes, threshold, drift)


def profile(name: str, base: str = "nrf52840") -> McuTarget:
    return get_target(base, load_catalog()).model_copy(update={"name": name})


def make_bundle(root: Path, target: McuTarget, label: str, threshold: float | None = None) -> Any:
    a = assets()
    report = validate_budget(a.model, target, a.spec, arena=measure_arena(a.model))
    c_name = f"vibration_ae_{target.name}"
    c_source, c_header = model_to_c(a.model, c_name)
    metadata = BundleMetadata(
        model_name=registered_model_name(target.name), target=target.name, fleet=FLEET,
        threshold=threshold if threshold is not None else a.threshold, threshold_percentile=99.5,
        dsp_spec_version=a.spec.version, tflite_sha256=sha256_hex(a.model), tflite_bytes=len(a.model),
        arena_bytes=a.arena, macs=count_macs(a.model), n_features=a.spec.n_features, c_name=c_name,
        quantization="ptq", sparsity=0.0, budget_passed=report.passed, dataset_fingerprint="f" * 64,
        lineage={"label": label},
    )  # fmt: skip
    return write_bundle(
        root / f"{target.name}-{label}", tflite=a.model, dsp_spec_json=a.spec.to_json(), metadata=metadata,
        c_source=c_source, c_header=c_header, budget_json=report.to_json(), budget_markdown=report.to_markdown(),
        evaluation={}, drift_reference=a.drift,
    )  # fmt: skip


# --- module environment: settings, MLflow, keys -------------------------------------------------


@dataclass(frozen=True)
class Env:
    root: Path
    run_id: str
    store: KeyStore

    @property
    def keyring(self) -> KeyRing:
        return self.store.keyring()

    def register(self, target: McuTarget, label: str, *, threshold: float | None = None, champion: bool = True) -> str:
        bundle = make_bundle(self.root / "bundles", target, label, threshold)
        version = register_bundle(bundle, self.run_id, gates_passed=True)
        if champion:
            promote(version.name, version.version, candidate_eval=None, champion_eval=None, actor="test",
                    reason="test", force=aliases_of(version.name).get(CHAMPION) is not None)  # fmt: skip
        return version.version


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Env]:
    root = tmp_path_factory.mktemp("deploy")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("TINYMLOPS_DATA_DIR", str(root / "data"))
        mp.setenv(KEYS_DIR_ENV, str(root / "keys"))
        mp.setenv("TINYMLOPS_FLEET", FLEET)
        reset_settings()
        experiment = configure_from_settings(get_settings())
        run_id = log_training_run(experiment, params={}, metrics={}, dataset_fingerprint="f" * 64,
                                  lake_selection={"fleet": FLEET}, run_name="deploy-test")  # fmt: skip
        store = KeyStore(root / "keys")
        store.init("test-key")
        yield Env(root, run_id, store)
    reset_settings()


@contextmanager
def fleet_of(
    broker: MosquittoBroker, target: McuTarget, n: int, prefix: str, keyring: KeyRing, **kwargs: Any
) -> Iterator[DeviceFleet]:
    kwargs.setdefault("config", FAST)
    fleet = DeviceFleet(FLEET, n, target, keyring, broker.address, seed=SEED, device_prefix=prefix,
                        devices_per_connection=4, **kwargs)  # fmt: skip
    with fleet:
        # A started device has queued its retained announcement, not necessarily delivered it: wait until the
        # broker holds them all, so a flow's device discovery sees what the test started.
        expected = set(ids(fleet))
        announced = announcements(broker.address, FleetTopics(FLEET), until=lambda found: expected <= found.keys())
        assert expected <= announced.keys(), f"devices {sorted(expected)} did not all announce within 15 s"
        yield fleet


def announcements(
    address: BrokerAddress,
    topics: FleetTopics,
    until: Callable[[dict[str, Announcement]], bool] = lambda _found: True,
    timeout_s: float = 15.0,
) -> dict[str, Announcement]:
    """The fleet's announcements as a deployment's FleetWatcher sees them: the retained ones, then until ``until``."""
    watcher = FleetWatcher(address, topics, ("announce",)).start()
    try:
        with watcher.changed:
            watcher.changed.wait_for(lambda: until(watcher.announcements), timeout_s)
        return dict(watcher.announcements)
    finally:
        watcher.stop()


def ids(fleet: DeviceFleet) -> list[str]:
    return [d.device_id for d in fleet.devices]


def runs_model(device: DeviceRuntime, model: bytes) -> bool:
    return device.active is not None and device.active.manifest.sha256 == hashlib.sha256(model).digest()


def versions_seen(device: DeviceRuntime) -> set[int]:
    return {s.version for s in device.statuses if s.version is not None}


def retained_manifests(broker: MosquittoBroker, devices: list[str]) -> dict[str, bytes]:
    """What a device subscribing now would get on its manifest topic (retained messages)."""
    topics = FleetTopics(FLEET)
    found: dict[str, bytes] = {}
    client = make_client(broker.address, "manifest-probe")
    client.on_message = lambda _c, _u, m: found.__setitem__(m.topic.split("/")[2], bytes(m.payload))
    connect(client, broker.address)
    client.subscribe([(topics.manifest(d), 1) for d in devices])
    time.sleep(0.4)
    client.disconnect()
    client.loop_stop()
    return found


def announcement(device: str, profile_name: str = "nrf52840", **kw: Any) -> Announcement:
    fields: dict[str, Any] = {"device": device, "fleet": FLEET, "firmware": "sim", "profile": profile_name,
                              "flash_free": 500_000, "slot_bytes": 250_000, "ram_free": 100_000, "max_chunk": 4096,
                              "dsp_versions": [1], "key_ids": ["k1"], "ts": 0.0}  # fmt: skip
    return Announcement(**{**fields, **kw})


# --- targeting, planning, parsing (no broker) ------------------------------------------------------


def test_select_targets_keeps_the_bundle_profile_and_says_why_others_are_skipped() -> None:
    found = [
        announcement("a-1"),
        announcement("a-2", group="line"),
        announcement("b-1", "stm32l4r5", group="line"),
        announcement("a-3", key_ids=["k0"]),
    ]
    selection = select_targets(found, "nrf52840", key_id="k1")
    assert [a.device for a in selection.targets] == ["a-1", "a-2"]
    assert selection.skipped == [
        SkippedDevice("a-3", "nrf52840", "does not trust signing key k1 (trusts k0)"),
        SkippedDevice("b-1", "stm32l4r5", "profile stm32l4r5, model is for nrf52840"),
    ]
    grouped = select_targets(found, "nrf52840", group="line")
    assert [a.device for a in grouped.targets] == ["a-2"] and [s.device for s in grouped.skipped] == ["b-1"]
    picked = select_targets(found, "nrf52840", devices=["a-3", "zz-9"])
    assert [a.device for a in picked.targets] == ["a-3"]
    assert picked.skipped == [SkippedDevice("zz-9", None, "no announcement in this fleet")]
    with pytest.raises(DeployError, match=r"no device of the fleet can take a rp2040 model: 4 announced") as info:
        select_targets(found, "rp2040")
    assert "\n" not in str(info.value)
    with pytest.raises(DeployError, match="no device announced"):
        select_targets([], "nrf52840")
    with pytest.raises(DeployError, match="not both"):
        select_targets(found, "nrf52840", devices=["a-1"], group="line")


def test_plan_canary_fraction() -> None:
    devices = [announcement(f"n-{i:04d}") for i in range(20)]
    canary, rest = plan_canary(devices, 0.1)
    assert len(canary) == 2 and len(rest) == 18
    assert {a.device for a in canary}.isdisjoint(a.device for a in rest)
    assert [a.device for a in canary] == [a.device for a in plan_canary(list(reversed(devices)), 0.1)[0]][::-1]
    assert len(plan_canary(devices, 0.01)[0]) == 1  # at least one canary
    assert plan_canary(devices, 0.0) == ([], devices)
    assert len(plan_canary(devices, 1.0)[1]) == 0
    with pytest.raises(DeployError, match=r"outside 0\.\.1"):
        plan_canary(devices, 1.5)
    assert [as_fraction(v) for v in ("10%", "0.25", "0", "100%")] == [0.1, 0.25, 0.0, 1.0]
    for bad in ("ten", "150%", "-0.1"):
        with pytest.raises(DeployError, match="canary fraction"):
            as_fraction(bad)


def test_canary_rate_bound_needs_evidence() -> None:
    assert rate_lower_bound(0, 50) == 0.0
    assert rate_lower_bound(1, 30) < 0.01  # one false alarm in 30 windows proves nothing
    assert rate_lower_bound(30, 30) > 0.9
    assert rate_lower_bound(5, 100) < 5 / 100 < rate_lower_bound(50, 100) + 0.5


def outcome(device: str, *, active: bool, role: str = "fleet", **kw: Any) -> DeviceOutcome:
    fields: dict[str, Any] = {"device": device, "profile": "nrf52840", "role": role, "model": "m/1",
                              "manifest_version": 7, "audience": f"device:{device}", "delivered": True,
                              "verified": active, "loaded": active, "active": active,
                              "state": "active" if active else "failed",
                              "status": "active" if active else "failed: load failed", "detail": "",
                              "running": "m v7" if active else "m v6", "chunks": "7/7"}  # fmt: skip
    return DeviceOutcome(**{**fields, **kw})


def test_canary_verdict_without_scores_or_with_a_failed_canary_is_unhealthy() -> None:
    session = DeploymentSession(
        BrokerAddress("127.0.0.1", 1), FleetTopics(FLEET), ManifestSigner(generate_keypair()[0], "k")
    )
    failed = judge_canary(session, deployable(), [outcome("a", active=False)], [], watch_s=60, factor=5, min_windows=30)
    assert not failed.healthy and failed.reason == "unhealthy: 1 of 1 canaries not active: a failed: load failed"
    silent = judge_canary(session, deployable(), [outcome("a", active=True)], [], watch_s=0, factor=5, min_windows=30)
    assert not silent.healthy and silent.reason.startswith("unhealthy: too few canary windows to judge: 0 < 30")


def test_report_outcome_counts_and_markdown() -> None:
    def report(outcomes: list[DeviceOutcome], **kw: Any) -> DeploymentReport:
        return DeploymentReport(model_ref="m@champion", model="m", registry_version="1", sha256="ab" * 32,
                                target="nrf52840", fleet=FLEET, broker="mqtt://x:1", canary_fraction=0.0,
                                outcomes=outcomes, skipped=[SkippedDevice("s", "rp2040", "profile rp2040")],
                                **kw)  # fmt: skip

    fast = {"deploy": 12.0, "load": 2.0, "inference": 0.1}
    slow = {"deploy": 40.0, "load": 3.0, "inference": 0.3}
    done = report([outcome("a", active=True, latency_ms=fast), outcome("b", active=True, latency_ms=slow)])
    assert done.outcome == "deployed" and done.counts()["active"] == 2 and done.counts()["skipped"] == 1
    assert done.latency_summary()["deploy_ms_p50"] == 26.0 and done.latency_summary()["load_ms_p50"] == 2.5
    partial = report([outcome("a", active=True), outcome("b", active=False)])
    assert partial.outcome == "partial" and partial.counts()["failed"] == 1
    assert report([outcome("b", active=False)]).outcome == "failed"
    no_version = report([outcome("a", active=True), outcome("b", active=False, state="skipped")])
    assert no_version.outcome == "partial" and no_version.counts()["skipped"] == 2
    markdown = partial.to_markdown()
    assert "| b | fleet | m/1 v7 | yes | no | no | no | failed: load failed | m v6 | 7/7 |" in markdown
    assert "| s | rp2040 | profile rp2040 |" in markdown and markdown.startswith("# Deployment of m/1")


# --- deployment sessions against real devices -------------------------------------------------------


def deployable(threshold: float | None = None, name: str = "vibration-ae-nrf52840") -> DeployableModel:
    a = assets()
    return DeployableModel(name, "nrf52840", a.model, a.spec, threshold or a.threshold, a.arena,
                           expected_anomaly_rate=0.005)  # fmt: skip


def test_session_reaches_the_profile_reports_latencies_and_a_late_device_resumes(
    env: Env, mosquitto: MosquittoBroker
) -> None:
    nrf = get_target("nrf52840")
    with (
        fleet_of(mosquitto, nrf, 2, "nrf", env.keyring) as fleet,
        DeviceRuntime("late-0001", FLEET, nrf, env.keyring, mosquitto.address, config=FAST) as late,
        DeviceRuntime("gone-0001", FLEET, nrf, env.keyring, mosquitto.address, config=FAST) as gone,
    ):
        late.go_offline()
        gone.go_offline()
        found = announcements(mosquitto.address, FleetTopics(FLEET))
        assert sorted(found) == ["gone-0001", "late-0001", "nrf-0000", "nrf-0001"]
        assert all(a.profile == "nrf52840" and a.key_ids == ["test-key"] for a in found.values())
        with DeploymentSession(mosquitto.address, FleetTopics(FLEET), env.store.signer()) as session:
            model, started = deployable(), time.time()
            assert model.references  # computed once per model, as resolve_deployable does before a session
            threading.Timer(1.0, late.go_online).start()
            outcomes = session.deploy(model, session.announcements(), timeout_s=4)
        by_device = {o.device: o for o in outcomes}
        for device in ("nrf-0000", "nrf-0001", "late-0001"):
            o = by_device[device]
            assert (o.delivered, o.verified, o.loaded, o.active, o.state) == (True, True, True, True, "active")
            received, total = o.chunks.split("/")
            assert o.running == f"vibration-ae-nrf52840 v{o.manifest_version}" and received == total != "0"
            assert {"deploy", "device_deploy", "download", "verify", "load", "inference"} <= set(o.latency_ms)
            assert 0 < o.latency_ms["device_deploy"] <= o.latency_ms["deploy"] + 1  # server adds the transport
        assert by_device["late-0001"].latency_ms["deploy"] > 900  # it came online after one second
        lost = by_device["gone-0001"]
        assert (lost.delivered, lost.active, lost.state, lost.running) == (False, False, "not delivered", "none")
        version = outcomes[0].manifest_version
        assert version is not None and version >= int(started)
        assert all(o.manifest_version == version and o.audience == f"device:{o.device}" for o in outcomes)
        assert runs_model(late, assets().model) and all(runs_model(d, assets().model) for d in fleet.devices)
        # the unanswered manifest was withdrawn: back online, the device does not start a download nobody serves
        assert retained_manifests(mosquitto, ["gone-0001", "nrf-0000"]).keys() == {"nrf-0000"}
        gone.go_online()
        time.sleep(0.5)
        assert gone.active is None and versions_seen(gone) == set()


def test_revoked_key_is_refused_by_devices_end_to_end(tmp_path: Path, mosquitto: MosquittoBroker) -> None:
    store = KeyStore(tmp_path / "keys")
    store.init("ops-1")
    old = store.signer()
    ring = store.keyring()  # the devices' key ring object: "provisioning" updates it in place
    topics = FleetTopics(FLEET)
    with fleet_of(mosquitto, get_target("nrf52840"), 2, "nrf", ring) as fleet:
        with DeploymentSession(mosquitto.address, topics, old) as session:
            first = session.deploy(deployable(), session.announcements(), timeout_s=10)
        assert all(o.active for o in first)
        store.rotate("ops-2")
        store.revoke("ops-1")
        assert store.keyring().revoked == ["ops-1"]
        ring.add("ops-2", store.signer().public_key)  # provision the devices with the new ring
        ring.revoke("ops-1")
        # a server still holding the revoked key: the devices refuse it before any download
        with DeploymentSession(mosquitto.address, topics, old) as session:
            refused = session.deploy(deployable(threshold=0.5), session.announcements(), timeout_s=10)
        for o in refused:
            assert (o.state, o.status, o.active, o.verified) == ("failed", "failed: revoked key", False, False)
            assert o.running == f"vibration-ae-nrf52840 v{first[0].manifest_version}"
            assert "revoked" in o.detail
        assert all(d.active is not None and d.active.threshold == pytest.approx(assets().threshold, rel=1e-6)
                   for d in fleet.devices)  # fmt: skip
        with DeploymentSession(mosquitto.address, topics, store.signer()) as session:
            assert session.signer.key_id == "ops-2"
            again = session.deploy(deployable(threshold=0.5), session.announcements(), timeout_s=10)
        assert all(o.active for o in again)
        versions = [o[0].manifest_version or 0 for o in (first, refused, again)]
        assert versions == sorted(versions) and len(set(versions)) == 3


# --- hostile announcements: identity from the topic, every field checked, one device affected -----------

U32_MAX = 2**32 - 1
Publish = Callable[[str, bytes], None]


@contextmanager
def hostile_client(broker: MosquittoBroker) -> Iterator[Publish]:
    """A hand-made MQTT client that publishes retained announcements on any device's topic."""
    topics = FleetTopics(FLEET)
    client = make_client(broker.address, "hostile")
    connect(client, broker.address)

    def publish(topic_device: str, payload: bytes) -> None:
        client.publish(topics.announce(topic_device), payload, qos=1, retain=True).wait_for_publish(5)

    try:
        yield publish
    finally:
        client.disconnect()
        client.loop_stop()


def hostile_announcement(device: str, profile_name: str = "nrf52840", **changes: Any) -> bytes:
    """A well-formed announcement trusting the test key, with raw JSON fields changed (unchecked)."""
    fields = json.loads(announcement(device, profile_name, key_ids=["test-key"]).encode())
    return json.dumps(fields | changes).encode()


def test_a_spoofed_device_id_on_another_topic_is_rejected_for_that_topic_and_reported(
    env: Env, mosquitto: MosquittoBroker
) -> None:
    nrf = get_target("nrf52840")
    with (
        fleet_of(mosquitto, nrf, 2, "dev", env.keyring) as fleet,
        hostile_client(mosquitto) as publish,
        DeploymentSession(mosquitto.address, FleetTopics(FLEET), env.store.signer()) as session,
    ):
        # dev-9 claims to be dev-0000 on another profile, after the session saw the real one
        publish("dev-9", hostile_announcement("dev-0000", "stm32l4r5"))
        session.watcher.settle(0.3, 5.0)
        assert session.watcher.announcements["dev-0000"].profile == "nrf52840"
        assert "dev-9" not in session.watcher.announcements
        reason = "announcement names device dev-0000 on the topic of dev-9"
        picked = select_targets_task.fn(session, deployable(), ["dev-0000"], None)
        assert [a.device for a in picked.targets] == ["dev-0000"] and picked.skipped == []
        outcomes = session.deploy(deployable(), picked.targets, timeout_s=10)
        assert [(o.device, o.active) for o in outcomes] == [("dev-0000", True)]
        assert runs_model(fleet.devices[0], assets().model)
        everyone = select_targets_task.fn(session, deployable(), None, None)
        assert [a.device for a in everyone.targets] == ids(fleet)
        assert everyone.skipped == [SkippedDevice("dev-9", None, reason)]
        named = select_targets_task.fn(session, deployable(), ["dev-0001", "dev-9"], None)
        assert named.skipped == [SkippedDevice("dev-9", None, reason)]


@pytest.mark.parametrize("group", [None, "line-1"])
def test_an_announced_version_at_the_u32_limit_affects_only_its_own_device(
    env: Env, mosquitto: MosquittoBroker, group: str | None
) -> None:
    nrf = get_target("nrf52840")
    ref = {"name": "vibration-ae-nrf52840", "sha256": "ab" * 32}
    with (
        fleet_of(mosquitto, nrf, 2, "dev", env.keyring, group="line-1") as fleet,
        hostile_client(mosquitto) as publish,
    ):
        publish("evil-1", hostile_announcement("evil-1", group="line-1", model={**ref, "version": U32_MAX}))
        publish("evil-2", hostile_announcement("evil-2", group="line-1", model={**ref, "version": U32_MAX - 1}))
        with DeploymentSession(mosquitto.address, FleetTopics(FLEET), env.store.signer()) as session:
            selection = select_targets_task.fn(session, deployable(), None, group)
            assert [a.device for a in selection.targets] == ["dev-0000", "dev-0001", "evil-2"]
            assert selection.skipped == [SkippedDevice(
                "evil-1", "nrf52840", f"manifest version {U32_MAX} already seen: no higher version fits in u32"
            )]  # fmt: skip
            started = int(time.time())
            wave = session.deploy(deployable(), session.announcements(), group=group, timeout_s=3)
        outcomes = {o.device: o for o in wave}
        for device in ("dev-0000", "dev-0001"):  # the hostile versions did not push theirs up
            o = outcomes[device]
            assert o.active and o.manifest_version is not None and started <= o.manifest_version < started + 60
            assert o.audience == (f"group:{group}" if group else f"device:{device}")
        assert outcomes["evil-2"].manifest_version == U32_MAX and not outcomes["evil-2"].active
        assert outcomes["evil-2"].audience == "device:evil-2"  # past the group's version: its own manifest
        evil = outcomes["evil-1"]
        assert (evil.state, evil.manifest_version, evil.active) == ("skipped", None, False)
        assert evil.status == f"not deployed: manifest version {U32_MAX} already seen: no higher version fits in u32"
        assert all(runs_model(d, assets().model) for d in fleet.devices)


def test_malformed_and_out_of_range_announcements_are_skipped_with_reasons(
    env: Env, mosquitto: MosquittoBroker
) -> None:
    nrf = get_target("nrf52840")
    ref = {"name": "vibration-ae-nrf52840", "sha256": "ab" * 32}
    bad: dict[str, bytes] = {
        "bad-json": b"{not json",
        "bad-version": hostile_announcement("bad-version", model={**ref, "version": 2**32}),
        "bad-chunk": hostile_announcement("bad-chunk", max_chunk=1 << 20),
        "bad-slot": hostile_announcement("bad-slot", slot_bytes=-1),
        "bad-key": hostile_announcement("bad-key", key_ids=["test key\n"]),
        "bad-fleet": hostile_announcement("bad-fleet", fleet="elsewhere"),
    }
    expected = {
        "bad-json": "invalid Announcement JSON",
        "bad-version": "model.version: Input should be less than or equal to 4294967295",
        "bad-chunk": "max_chunk: Input should be less than or equal to 4096",
        "bad-slot": "slot_bytes: Input should be greater than or equal to 0",
        "bad-key": "key_ids.0: String should match pattern",
        "bad-fleet": "announcement names fleet elsewhere on a topic of fleet plant",
    }
    with fleet_of(mosquitto, nrf, 2, "dev", env.keyring) as fleet, hostile_client(mosquitto) as publish:
        for device, payload in bad.items():
            publish(device, payload)
        with DeploymentSession(mosquitto.address, FleetTopics(FLEET), env.store.signer()) as session:
            selection = select_targets_task.fn(session, deployable(), None, None)
            assert [a.device for a in selection.targets] == ids(fleet)
            reasons = {s.device: s.reason for s in selection.skipped}
            assert reasons.keys() == bad.keys() and all(s.profile is None for s in selection.skipped)
            for device, text in expected.items():
                assert text in reasons[device] and "\n" not in reasons[device], reasons[device]
            outcomes = session.deploy(deployable(), selection.targets, timeout_s=10)
        assert [(o.device, o.active) for o in outcomes] == [(d, True) for d in ids(fleet)]
        # a later valid announcement on the same topic replaces the rejection
        publish("bad-json", hostile_announcement("bad-json"))
        found = announcements(mosquitto.address, FleetTopics(FLEET), until=lambda found: "bad-json" in found)
        assert found.keys() == {*ids(fleet), "bad-json"}


# --- the flow end to end ------------------------------------------------------------------------------


def flow(**kwargs: Any) -> dict[str, Any]:
    from flows.deploy import deploy_flow

    return deploy_flow(**kwargs)


@pytest.mark.prefect
def test_flow_deploys_the_champion_to_its_profile_only_and_logs_the_run(
    env: Env, mosquitto: MosquittoBroker, prefect_harness: None
) -> None:
    target, other = profile("nrf_flow"), profile("stm_flow", "stm32l4r5")
    version = env.register(target, "v1")
    name = registered_model_name(target.name)
    with (
        fleet_of(mosquitto, target, 3, "nrf", env.keyring) as mine,
        fleet_of(mosquitto, other, 2, "stm", env.keyring) as theirs,
    ):
        result = flow(model_ref=f"{name}@champion", broker_url=mosquitto.address.url, timeout_s=20)
        assert result["outcome"] == "deployed" and result["registry_version"] == version
        assert result["counts"]["selected"] == 3 and result["counts"]["active"] == 3
        assert {row["device"] for row in result["devices"]} == set(ids(mine))
        assert all(row["active"] and row["latency_ms"]["deploy"] > 0 for row in result["devices"])
        assert [(s["device"], s["reason"]) for s in result["skipped"]] == [
            (d, "profile stm_flow, model is for nrf_flow") for d in ids(theirs)
        ]
        assert all(runs_model(d, assets().model) for d in mine.devices)
        for device in theirs.devices:  # untouched: no manifest, still idle
            assert device.active is None and [s.state for s in device.statuses] == ["idle"]
        assert retained_manifests(mosquitto, ids(theirs)) == {}
        assert {"deploy_ms_p50", "deploy_ms_p95", "load_ms_p50", "inference_ms_p50"} <= set(result["latency"])

    client = MlflowClient()
    run = client.get_run(result["mlflow_run_id"])
    assert client.get_experiment(run.info.experiment_id).name == DEPLOY_EXPERIMENT
    assert run.data.params["model"] == name and run.data.params["version"] == version
    assert run.data.params["fleet"] == FLEET and run.data.params["canary_fraction"] == "0.0"
    assert run.data.metrics["devices_active"] == 3 and run.data.metrics["devices_skipped"] == 2
    assert run.data.metrics["deploy_ms_p95"] >= run.data.metrics["deploy_ms_p50"] > 0
    assert run.data.tags["prefect.flow_run_id"] and run.data.tags["outcome"] == "deployed"
    report = Path(client.download_artifacts(run.info.run_id, "deployment_report.md")).read_text()
    assert report.count("| nrf-000") == 3 and "| stm-0000 | stm_flow |" in report
    assert client.get_experiment(run.info.experiment_id).tags["mlflow.note.content"].startswith("Over-the-air")
    # per device, a table the Prefect UI shows as one (not only markdown)
    table = latest_artifact(f"deployment-{FLEET}-nrf-flow-devices")
    assert table.type == "table"
    rows = json.loads(table.data) if isinstance(table.data, str) else table.data
    assert sorted((row["device"], row["state"]) for row in rows) == [(d, "active") for d in sorted(ids(mine))]


def latest_artifact(key: str) -> Any:
    """The latest Prefect artifact under ``key``."""
    from prefect.client.orchestration import get_client

    async def read() -> Any:
        async with get_client() as client:
            return next(a for a in await client.read_latest_artifacts() if a.key == key)

    return asyncio.run(read())


@pytest.mark.prefect
def test_group_manifest_and_healthy_canary(env: Env, mosquitto: MosquittoBroker, prefect_harness: None) -> None:
    target = profile("nrf_canary_ok")
    env.register(target, "v1")
    name = registered_model_name(target.name)
    with fleet_of(mosquitto, target, 4, "nrf", env.keyring, group="line-1", config=SCORING) as fleet:
        grouped = flow(model_ref=f"{name}@champion", group="line-1", broker_url=mosquitto.address.url, timeout_s=20)
        assert grouped["outcome"] == "deployed"
        assert {row["audience"] for row in grouped["devices"]} == {"group:line-1"}
        env.register(target, "v2")
        result = flow(model_ref=f"{name}@champion", canary_fraction=0.25, watch_s=2.5, timeout_s=20,
                      broker_url=mosquitto.address.url)  # fmt: skip
        assert result["outcome"] == "deployed", result["canary"]
        canary = result["canary"]
        assert canary["healthy"] and len(canary["devices"]) == 1 and canary["windows"] >= 30
        assert canary["baseline_windows"] > 0 and canary["limit"] == pytest.approx(5 * 0.005)
        roles = {row["device"]: row["role"] for row in result["devices"]}
        assert sorted(roles.values()) == ["canary", "fleet", "fleet", "fleet"]
        assert all(row["active"] and row["audience"] == f"device:{row['device']}" for row in result["devices"])
        assert all(d.active is not None for d in fleet.devices)
        assert len({d.active.manifest.model_version for d in fleet.devices if d.active}) == 2  # canary first


@pytest.mark.prefect
def test_unhealthy_canary_rolls_back_devices_and_registry(
    env: Env, mosquitto: MosquittoBroker, prefect_harness: None
) -> None:
    target = profile("nrf_canary_bad")
    name = registered_model_name(target.name)
    good = env.register(target, "good")
    with fleet_of(mosquitto, target, 4, "nrf", env.keyring, config=SCORING) as fleet:
        assert flow(model_ref=f"{name}@champion", broker_url=mosquitto.address.url)["outcome"] == "deployed"
        before = {d.device_id: d.active.manifest.model_version for d in fleet.devices if d.active}
        bad = env.register(target, "bad", threshold=1e-9)  # everything is an anomaly
        assert aliases_of(name) == {CHAMPION: bad, PREVIOUS: good}

        result = flow(model_ref=f"{name}@champion", canary_fraction=0.5, watch_s=2.5, timeout_s=20,
                      broker_url=mosquitto.address.url)  # fmt: skip
        assert result["outcome"] == "rolled back" and result["rolled_back"]
        canary = result["canary"]
        assert not canary["healthy"] and canary["rate"] == 1.0 and canary["windows"] >= 30
        assert canary["baseline_rate"] == 0.0 and "unhealthy" in canary["reason"]
        assert result["registry_rollback"] == f"registry rolled back: {name} champion {bad} -> {good}"
        assert result["notes"] == [f"canaries restored to {name}/{good}"]
        rows = result["devices"]
        canaries = set(canary["devices"])
        bad_version = next(r["manifest_version"] for r in rows if r["role"] == "canary")
        restored = {r["device"]: r for r in rows if r["role"] == "rollback"}
        assert set(restored) == canaries and all(r["active"] for r in restored.values())
        assert all(r["manifest_version"] > bad_version for r in restored.values())
        held = {r["device"] for r in rows if r["role"] == "held"}
        assert held == set(before) - canaries and len(held) == 2
        assert result["counts"]["rolled_back"] == 2 and result["counts"]["held"] == 2
        for device in fleet.devices:
            assert device.active is not None and device.active.threshold == pytest.approx(assets().threshold)
            if device.device_id in held:  # never got the bad model: same manifest as before, no status about it
                assert device.active.manifest.model_version == before[device.device_id]
                assert bad_version not in versions_seen(device)
        assert aliases_of(name) == {CHAMPION: good}
        assert promotion_history(name)[-1].action == "rollback" and promotion_history(name)[-1].actor == "deploy-flow"
        markdown = DeploymentReport(**_report_fields(result)).to_markdown()
        assert "rolled back" in markdown and "| held |" in markdown


def _report_fields(result: dict[str, Any]) -> dict[str, Any]:
    """Rebuild the report object from its dict (round trip of what the flow returns)."""
    outcomes = [DeviceOutcome(**row) for row in result["devices"]]
    skipped = [SkippedDevice(**row) for row in result["skipped"]]
    keys = ("model_ref", "model", "registry_version", "sha256", "target", "fleet", "broker", "canary_fraction",
            "rolled_back", "registry_rollback", "notes", "started_at", "duration_s")  # fmt: skip
    return {**{k: result[k] for k in keys}, "outcomes": outcomes, "skipped": skipped}


@pytest.mark.prefect
def test_model_modified_in_the_artifact_store_is_refused_before_publishing(
    env: Env, mosquitto: MosquittoBroker, prefect_harness: None
) -> None:
    target = profile("nrf_tampered")
    name = registered_model_name(target.name)
    version = env.register(target, "v1")
    tags = describe(f"{name}/{version}").tags
    location = MlflowClient().get_logged_model(tags["lineage.logged_model_id"]).artifact_location
    stored = bundle_dir_of(Path(urllib.parse.unquote(urllib.parse.urlparse(location).path))) / "model.tflite"
    data = bytearray(stored.read_bytes())
    data[len(data) // 2] ^= 0xFF
    stored.write_bytes(bytes(data))
    with fleet_of(mosquitto, target, 2, "nrf", env.keyring) as fleet:
        with pytest.raises(ModelIntegrityError, match="sha256"):
            flow(model_ref=f"{name}@champion", broker_url=mosquitto.address.url)
        assert retained_manifests(mosquitto, ids(fleet)) == {}
        assert all(d.active is None and [s.state for s in d.statuses] == ["idle"] for d in fleet.devices)


# --- the CLI ----------------------------------------------------------------------------------------------


def cli() -> typer.Typer:
    app = typer.Typer()
    app.command()(deploy_command)
    return app


@pytest.mark.prefect
def test_cli_prints_the_table_and_json(
    env: Env, mosquitto: MosquittoBroker, prefect_harness: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    import json

    from rich.console import Console

    monkeypatch.setattr("tinymlops.cli_deploy.console", Console(width=250))
    target = profile("nrf_cli")
    name = registered_model_name(target.name)
    env.register(target, "v1")
    with fleet_of(mosquitto, target, 2, "nrf", env.keyring) as fleet:
        runner = CliRunner()
        result = runner.invoke(cli(), [name, "--broker", mosquitto.address.url, "--timeout", "20"])
        assert result.exit_code == 0, result.output
        rows = [line for line in result.output.splitlines() if "nrf-000" in line]
        assert len(rows) == 2 and all("active" in row and "yes" in row for row in rows), result.output
        assert "deployed" in result.output and "latency (ms)" in result.output
        devices = ",".join(ids(fleet)[:1])
        as_json = runner.invoke(cli(), [f"{name}@champion", "--devices", devices, "--json",
                                        "--broker", mosquitto.address.url])  # fmt: skip
        assert as_json.exit_code == 0, as_json.output
        report = json.loads(as_json.output)
        assert [row["device"] for row in report["devices"]] == ids(fleet)[:1] and report["outcome"] == "deployed"


@pytest.mark.prefect
def test_cli_bad_input_gives_one_line_errors(env: Env, mosquitto: MosquittoBroker, prefect_harness: None) -> None:
    target = profile("nrf_bad_input")
    name = registered_model_name(target.name)
    env.register(target, "v1", champion=False)  # a candidate, no champion
    url = mosquitto.address.url
    cases: list[tuple[list[str], type[Exception], str]] = [
        (["vibration-ae-nowhere", "--broker", url], ModelNotFoundError, "no registered model 'vibration-ae-nowhere'"),
        ([name, "--broker", url], ModelNotFoundError, "has no version with alias 'champion' (aliases: candidate->1)"),
        ([f"{name}/1", "--broker", url, "--fleet", "nowhere"], DeployError, "no device announced"),
        ([f"{name}/1", "--broker", url, "--canary", "120%"], DeployError, "canary fraction '120%' is outside"),
        ([f"{name}/1", "--broker", "http://x"], TinyMLOpsError, "invalid MQTT broker URL"),
        ([f"{name}/1"], DeployError, "no broker to reach the fleet"),
    ]
    runner = CliRunner()
    for args, kind, message in cases:
        result = runner.invoke(cli(), args)
        assert result.exit_code != 0 and isinstance(result.exception, kind), (args, result.output)
        assert message in str(result.exception) and "\n" not in str(result.exception), str(result.exception)


# --- the fleet's OTA service: devices back after a deployment ended ---------------------------------------


@pytest.mark.prefect
def test_devices_back_after_the_deployment_ended_get_the_champion_from_the_ota_service(
    env: Env, mosquitto: MosquittoBroker, prefect_harness: None
) -> None:
    """Two devices offline during the whole deploy flow come back after it ended, one after a broker restart."""
    target = profile("nrf_ota_service")
    env.register(target, "v1")
    name = registered_model_name(target.name)
    topics = FleetTopics(FLEET)
    with contextlib.ExitStack() as stack:
        service = stack.enter_context(OtaService(mosquitto.address, topics, env.keyring))
        with pytest.raises(OtaServiceError, match="already serves fleet plant") as second:  # one per fleet
            OtaService(mosquitto.address, topics, env.keyring).start()
        away = [stack.enter_context(DeviceRuntime(f"away-{i}", FLEET, target, env.keyring, mosquitto.address,
                                                  config=FAST)) for i in range(2)]  # fmt: skip
        announced = announcements(mosquitto.address, topics, until=lambda found: {"away-0", "away-1"} <= found.keys())
        assert {"away-0", "away-1"} <= announced.keys(), "the devices did not announce within 15 s"
        for device in away:
            device.go_offline()  # offline during the whole deployment
        result = flow(model_ref=f"{name}@champion", broker_url=mosquitto.address.url, timeout_s=2)
        rows = result["devices"]
        assert [row["state"] for row in rows] == ["not delivered", "not delivered"]
        assert all(row["status"].endswith("manifest kept: the OTA service serves it") for row in rows)
        back = time.monotonic()
        away[0].go_online()  # back after the deployment ended
        first = away[0].wait_for(lambda s: s.state == "active", timeout_s=30)
        first_s = time.monotonic() - back
        # A broker restart without persistence loses every retained manifest: the service re-publishes them.
        mosquitto.stop()
        mosquitto.start()
        back = time.monotonic()
        away[1].go_online()
        after_restart = away[1].wait_for(lambda s: s.state == "active", timeout_s=30)
        restart_s = time.monotonic() - back
        # It serves only what the retained manifest names: another model's chunks are refused.
        probe = make_client(mosquitto.address, "ota-probe")
        connect(probe, mosquitto.address)
        assert after_restart.version is not None
        stale = ChunkRequest(after_restart.version - 1, b"\0" * 8, (0,))
        probe.publish(topics.request("away-1"), stale.encode(), qos=1).wait_for_publish(5)
        deadline = time.monotonic() + 15
        while service.refused["away-1"] == 0:
            assert time.monotonic() < deadline, "the service did not refuse a request for another model"
            time.sleep(0.05)
        probe.disconnect()
        probe.loop_stop()
    on_champion = [d.device_id for d in away if runs_model(d, assets().model)]
    record(
        FaultRecord(
            "device offline during the whole deployment, back after it ended", broken_devices=0,
            notes=f"deploy flow to 2 offline devices: {rows[0]['state']} x2, manifests kept for the OTA service; "
            f"back afterwards: {len(on_champion)} of 2 active on the champion v{first.version} ({first.total} "
            f"chunks; {first_s * 1e3:.0f} ms after reconnecting, {restart_s * 1e3:.0f} ms for the one back after a "
            f"broker restart without persistence, its manifest re-published by the service); a request for "
            f"another model refused; a second service refused to start. Without the service the manifest is "
            f"withdrawn and the device runs no model until the next deployment",
        )
    )  # fmt: skip
    assert first.version == rows[0]["manifest_version"] and after_restart.version == rows[1]["manifest_version"]
    assert on_champion == ["away-0", "away-1"]
    assert service.served["away-0"] >= first.total and service.served["away-1"] >= after_restart.total
    assert "stop it first" in str(second.value)
