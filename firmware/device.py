"""The device runtime: a simulated MCU node that takes new models over MQTT and scores its own machine.

One :class:`DeviceRuntime` stands for one sensor node running fixed firmware (no Linux, no
reflash per model). It announces its capabilities (retained), receives a signed manifest for
its device or group, pulls the model in chunks into a staging slot with resume, verifies the
Ed25519 signature and the sha256, loads the model into the real TensorFlow Lite Micro
interpreter, checks that it reproduces the manifest's reference outputs (within the stated
tolerance in LSB), runs one smoke inference, and swaps it in atomically. Any failure leaves the
previous model running and says why on the status topic. Scoring uses the same DSP front end as
training (:func:`tinymlops.contracts.dsp.extract_features`) on windows of the node's own
:class:`~firmware.sensor.MachineSimulator`, each normalised at its own shaft speed (the machine's
tachometer value; a window without a usable speed at the model's reference speed, counted as
``speed_fallback`` in drift summaries and status counters), and publishes scores and drift summaries.

Memory: flash free for models is the catalog flash minus the firmware and runtime reserves;
half of it is the staging slot (the active model keeps the other half until the swap), so a
model larger than the slot is refused before any download. RAM free (SRAM minus the RAM
reserve) caps the tensor arena: a manifest whose arena exceeds it is refused, because running
with less than the server's measured arena cannot work.

Arena and loading: the manifest's ``arena_bytes`` is the smallest working arena the server
measured with :func:`firmware.tflm.measure_arena` on these exact bytes (bound by the sha256 and
the signature), so the device uses it as is. On the host a too-small arena can crash the whole
process instead of failing, so :class:`~firmware.tflm.TflmRunner` still tries it once in a
subprocess before loading (0.1-0.5 s, counted in ``load_ms``); a real MCU gets a clean
allocation error instead and skips that.

Threads: devices do not own MQTT clients. A :class:`DeviceLink` is one MQTT connection with one
driver thread serving one or many devices (``firmware.device_fleet`` puts hundreds on a few
links); paho's network thread only queues messages, so a model load never stalls the network.
"""

from __future__ import annotations

import logging
import math
import queue
import threading
import time
import zlib
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Self

import numpy as np
import numpy.typing as npt
import paho.mqtt.client as mqtt

from firmware.boot import next_boot_epoch
from firmware.codec import VibrationWindow, encode
from firmware.ota import (
    MAX_CHUNK_SIZE,
    SCORE_EDGES_REL,
    Announcement,
    DeviceState,
    DeviceStatus,
    DriftSummary,
    Manifest,
    ModelRef,
    OtaDecodeError,
    OtaReceiver,
    ReceiverConfig,
    ReferenceSet,
    RxStatus,
    ScoreBatch,
    decode_manifest,
    reason_for,
)
from firmware.sensor import MachineSimulator, VibrationSource, quantize
from firmware.signing import KeyRing
from firmware.tflm import TflmRunner
from tinymlops.contracts.dsp import READABLE_VERSIONS, DspSpec, extract_features, resolve_speed
from tinymlops.contracts.scoring import anomaly_scores, is_anomalous
from tinymlops.contracts.topics import FleetTopics, check_name
from tinymlops.errors import TinyMLOpsError
from tinymlops.mqtt import BrokerAddress, connect, make_client
from tinymlops.settings import MqttSettings
from tinymlops.targets import McuTarget

log = logging.getLogger(__name__)

FIRMWARE_VERSION = "tinymlops-sim/0.1.0"
_STATUS_HISTORY = 512


class DeviceError(TinyMLOpsError):
    """A device cannot start, or a model does not fit what the device runs."""


@dataclass(frozen=True)
class DeviceConfig:
    """Behaviour of a simulated device.

    Attributes:
        topic_root: First topic level.
        firmware_version: Reported in the announcement.
        request_window: Chunks asked for per request (the MCU's receive buffers).
        retry_timeout_s: Re-request missing chunks after this long without progress; doubles up
            to ``max_retry_timeout_s`` while nothing arrives.
        max_retry_timeout_s: Longest wait between two requests.
        max_corrupt_chunks: Give a download up after more corrupt chunks than this.
        score_batch: Scores per scores message.
        summary_windows: Publish a drift summary every this many scored windows.
        score_interval_s: Real-time scoring, one window per interval; None scores only on
            :meth:`DeviceRuntime.score_windows`.
        publish_windows: Also publish each raw window on the vibration topic (for the ingest).
        full_scale_g: Sensor full scale (int16 quantisation).
    """

    topic_root: str = "tinymlops"
    firmware_version: str = FIRMWARE_VERSION
    request_window: int = 8
    retry_timeout_s: float = 1.0
    max_retry_timeout_s: float = 8.0
    max_corrupt_chunks: int = 16
    score_batch: int = 10
    summary_windows: int = 100
    score_interval_s: float | None = None
    publish_windows: bool = False
    full_scale_g: float = 16.0


@dataclass(frozen=True)
class MemoryBudget:
    """Memory a profile leaves for models.

    Attributes:
        flash_free: Flash for models: catalog flash minus firmware and runtime reserves.
        slot_bytes: Staging slot, half of ``flash_free``: the largest model accepted.
        ram_free: SRAM minus the RAM reserve: the largest tensor arena accepted.
    """

    flash_free: int
    slot_bytes: int
    ram_free: int

    @classmethod
    def of(cls, profile: McuTarget) -> MemoryBudget:
        """The budget of a catalog profile."""
        flash_free = profile.flash_bytes - profile.firmware_flash_reserve_bytes - profile.runtime_flash_bytes
        return cls(flash_free, flash_free // 2, profile.sram_bytes - profile.ram_reserve_bytes)


@dataclass(frozen=True)
class ActiveModel:
    """A verified model loaded in TFLite Micro, with the DSP spec and threshold it came with."""

    manifest: Manifest
    spec: DspSpec
    runner: TflmRunner

    @property
    def ref(self) -> ModelRef:
        """Name, version and sha256, as reported."""
        m = self.manifest
        return ModelRef(name=m.model_name, version=m.model_version, sha256=m.sha256_hex)

    @property
    def threshold(self) -> float:
        """Anomaly threshold on the reconstruction error."""
        return self.manifest.threshold


@dataclass(frozen=True)
class Score:
    """The anomaly score of one window.

    Attributes:
        seq: Window sequence number of the device.
        score: Mean squared reconstruction error of the normalised features.
        anomaly: Whether the score exceeds the model's threshold.
        dsp_ms: DSP front-end time.
        inference_ms: TFLite Micro inference time.
        speed_fallback: The window's speed was unusable: normalised at the model's reference speed.
    """

    seq: int
    score: float
    anomaly: bool
    dsp_ms: float
    inference_ms: float
    speed_fallback: bool = False


def score_window(
    model: ActiveModel, window: npt.NDArray[np.float32], rpm: float | None = None
) -> tuple[float, npt.NDArray[np.float32], float, float]:
    """Score one physical window: DSP at the window's shaft speed, inference, reconstruction error.

    Args:
        model: The loaded model and its DSP spec.
        window: The window in physical units.
        rpm: The window's shaft speed; None, NaN or outside the spec's valid range: the reference speed.

    Returns:
        The score, the normalised features, DSP milliseconds and inference milliseconds.
    """
    t0 = time.perf_counter()
    features = extract_features(window, model.spec, rpm)
    t1 = time.perf_counter()
    reconstruction = model.runner.predict(features)
    t2 = time.perf_counter()
    score = float(anomaly_scores(features, reconstruction)[0])
    return score, features[0], (t1 - t0) * 1e3, (t2 - t1) * 1e3


def check_references(
    predict_int8: Callable[[npt.NDArray[np.int8]], npt.NDArray[np.int8]], references: ReferenceSet
) -> None:
    """Run the manifest's reference inputs through a loaded model; the outputs must match within the tolerance.

    Args:
        predict_int8: The loaded model: int8 rows in, int8 rows out (TFLite Micro, or tinyrt).
        references: The manifest's reference block.

    Raises:
        DeviceError: An output differs by more than the tolerance (a model that is not the one the
            server ran, e.g. a dead layer, or a runtime that does not compute it).
    """
    inputs = np.frombuffer(b"".join(references.inputs), dtype=np.int8).reshape(len(references.inputs), -1)
    for index, output in enumerate(predict_int8(inputs)):
        problem = references.mismatch(index, output.tobytes())
        if problem:
            raise DeviceError(problem)


class _Summary:
    """Running statistics of one summary period of one model."""

    def __init__(self, n_features: int) -> None:
        self.start_ts = time.time()
        self.windows = 0
        self.anomalies = 0
        self.speed_fallback = 0
        self.score_sum = 0.0
        self.counts = np.zeros(len(SCORE_EDGES_REL), dtype=np.int64)
        self.feature_sum = np.zeros(n_features)
        self.feature_sq = np.zeros(n_features)
        self.dsp_ms: list[float] = []
        self.inference_ms: list[float] = []

    def add(self, score: Score, features: npt.NDArray[np.float32], threshold: float) -> None:
        edges = np.asarray(SCORE_EDGES_REL) * threshold
        self.counts[max(int(np.searchsorted(edges, score.score, side="right")) - 1, 0)] += 1
        self.windows += 1
        self.anomalies += score.anomaly
        self.speed_fallback += score.speed_fallback
        self.score_sum += score.score
        f = features.astype(np.float64)
        self.feature_sum += f
        self.feature_sq += f * f
        self.dsp_ms.append(score.dsp_ms)
        self.inference_ms.append(score.inference_ms)

    def message(self, device: str, model: ActiveModel) -> DriftSummary:
        n = max(self.windows, 1)
        mean = self.feature_sum / n
        var = np.maximum(self.feature_sq / n - mean * mean, 0.0)
        latency = {}
        if self.windows:
            latency = {
                "dsp_mean": float(np.mean(self.dsp_ms)),
                "inference_mean": float(np.mean(self.inference_ms)),
                "inference_p95": float(np.percentile(self.inference_ms, 95)),
            }
        return DriftSummary(
            device=device, model=model.manifest.model_name, version=model.manifest.model_version,
            threshold=model.threshold, start_ts=self.start_ts, end_ts=time.time(), windows=self.windows,
            anomalies=self.anomalies, score_mean=self.score_sum / n,
            score_edges=[e * model.threshold for e in SCORE_EDGES_REL], score_counts=[int(c) for c in self.counts],
            feature_mean=[float(v) for v in mean], feature_var=[float(v) for v in var], latency_ms=latency,
            speed_fallback=self.speed_fallback,
        )  # fmt: skip


@dataclass
class _Transfer:
    """Bookkeeping of the download in progress."""

    manifest: Manifest
    source: str
    started: float
    check_ms: float
    outstanding: set[int] = field(default_factory=set)
    last_request: float = 0.0
    retries: int = 0
    stalled: int = 0
    requests: int = 0
    duplicates: int = 0
    corrupt: int = 0
    stale: int = 0
    expedite: bool = False

    def counters(self) -> dict[str, int]:
        return {"requests": self.requests, "retries": self.retries, "duplicates": self.duplicates,
                "corrupt": self.corrupt, "stale": self.stale}  # fmt: skip


class DeviceRuntime:
    """One simulated sensor node: OTA model updates, TFLite Micro scoring, status and summaries.

    Attributes:
        statuses: The latest statuses it published, oldest first.
        windows_scored: Windows scored since start.
        anomalies: Windows scored above the threshold since start.
        speed_fallbacks: Windows scored at the fallback speed since start (their speed was unusable).

    Args:
        device_id: Device id (one topic level).
        fleet: Fleet name.
        profile: The MCU profile it runs on (memory limits, the manifest target it accepts).
        keyring: Trusted manifest signing keys.
        broker: Broker for :meth:`start`; None when a :class:`DeviceLink` is made by the caller.
        group: Group whose manifests it also follows.
        simulator: Its machine; default one seeded from the device id.
        config: Behaviour; defaults to :class:`DeviceConfig`.
        mqtt_settings: MQTT credentials and TLS for :meth:`start`.
        boot_epoch: Boot epoch of its windows (default :func:`firmware.boot.next_boot_epoch`): every
            device object is a new boot, its window seqs start at 0 again in a new epoch.
    """

    def __init__(
        self,
        device_id: str,
        fleet: str,
        profile: McuTarget,
        keyring: KeyRing,
        broker: BrokerAddress | None = None,
        *,
        group: str | None = None,
        simulator: VibrationSource | None = None,
        config: DeviceConfig | None = None,
        mqtt_settings: MqttSettings | None = None,
        boot_epoch: int | None = None,
    ) -> None:
        self.device_id = check_name(device_id, "device id")
        self.group = check_name(group, "group") if group is not None else None
        self.fleet = fleet
        self.profile = profile
        self.keyring = keyring
        self.config = config or DeviceConfig()
        self.topics = FleetTopics(fleet, self.config.topic_root)
        self.budget = MemoryBudget.of(profile)
        self.receiver = OtaReceiver(
            ReceiverConfig(self.device_id, profile.name, self.budget.slot_bytes, self.budget.ram_free, self.group),
            keyring,
        )
        self.simulator: VibrationSource = simulator or MachineSimulator(seed=zlib.crc32(self.device_id.encode()))
        self.broker = broker
        self.mqtt_settings = mqtt_settings
        self.statuses: deque[DeviceStatus] = deque(maxlen=_STATUS_HISTORY)
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._link: DeviceLink | None = None
        self._own_link = False
        self._connected = False
        self._active: ActiveModel | None = None
        self._transfer: _Transfer | None = None
        self._status: DeviceStatus | None = None
        self._status_seq = 0
        self.boot_epoch = next_boot_epoch(sender=self.device_id) if boot_epoch is None else boot_epoch
        self._window_seq = 0
        self.windows_scored = 0
        self.anomalies = 0
        self.speed_fallbacks = 0
        self._last_window: npt.NDArray[np.float32] | None = None
        self._last_rpm: float | None = None
        self._pending: list[Score] = []
        self._summary: _Summary | None = None
        self._next_score_at: float | None = None

    # --- wiring -------------------------------------------------------------------------

    def attach(self, link: DeviceLink) -> None:
        """Route this device's MQTT traffic through ``link`` (called by the link)."""
        self._link = link

    def subscriptions(self) -> list[str]:
        """Topics this device listens to: its manifest and chunk topics, and its group's manifest."""
        topics = [self.topics.manifest(self.device_id), self.topics.chunk(self.device_id)]
        if self.group is not None:
            topics.append(self.topics.group_manifest(self.group))
        return topics

    def start(self) -> Self:
        """Connect on a link of its own (a single device) and announce itself.

        Raises:
            DeviceError: No broker was given, or the device is already on a link.
            BrokerError: The broker cannot be reached.
        """
        if self.broker is None:
            raise DeviceError(f"device {self.device_id} has no broker to connect to")
        if self._link is not None:
            raise DeviceError(f"device {self.device_id} is already connected through a link")
        link = DeviceLink(self.broker, [self], client_id=f"tinymlops-dev-{self.fleet}-{self.device_id}",
                          settings=self.mqtt_settings)  # fmt: skip
        self._own_link = True
        link.start()
        return self

    def stop(self) -> None:
        """Disconnect the device's own link (a fleet stops its links itself)."""
        if self._link is not None and self._own_link:
            self._link.stop()

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    def go_offline(self) -> None:
        """Lose the network (a device alone on its link really disconnects); state and staging are kept."""
        if self._link is not None:
            self._link.set_online(self, False)

    def go_online(self) -> None:
        """Come back: re-announce, re-publish the status, resume a download where it stopped."""
        if self._link is not None:
            self._link.set_online(self, True)

    # --- state --------------------------------------------------------------------------

    @property
    def active(self) -> ActiveModel | None:
        """The model it runs now."""
        return self._active

    @property
    def status(self) -> DeviceStatus | None:
        """The latest status it published."""
        return self._status

    @property
    def connected(self) -> bool:
        """Whether it is online and its link connected."""
        return self._connected

    def wait_for(
        self, predicate: Callable[[DeviceStatus], bool], timeout_s: float = 10.0, after_seq: int = 0
    ) -> DeviceStatus:
        """Wait until a status with ``seq > after_seq`` satisfies ``predicate``; return it.

        Raises:
            DeviceError: None did within the timeout (the message names the latest status).
        """
        found: list[DeviceStatus] = []

        def match() -> bool:
            found[:] = [s for s in self.statuses if s.seq > after_seq and predicate(s)][:1]
            return bool(found)

        with self._changed:
            if not self._changed.wait_for(match, timeout_s):
                latest = self._status.status if self._status else "no status"
                raise DeviceError(f"device {self.device_id}: no matching status within {timeout_s:.0f} s; {latest}")
        return found[0]

    def announcement(self) -> Announcement:
        """What it tells the server about itself."""
        return Announcement(
            device=self.device_id, fleet=self.fleet, group=self.group, firmware=self.config.firmware_version,
            profile=self.profile.name, flash_free=self.budget.flash_free, slot_bytes=self.budget.slot_bytes,
            ram_free=self.budget.ram_free, max_chunk=MAX_CHUNK_SIZE, dsp_versions=list(READABLE_VERSIONS),
            key_ids=self.keyring.key_ids, model=self._active.ref if self._active else None, ts=time.time(),
        )  # fmt: skip

    # --- link callbacks (driver thread) ---------------------------------------------------

    def on_connected(self) -> None:
        """The link (re)connected: announce, re-publish the status (a new broker lost it), resume."""
        with self._lock:
            self._connected = True
            self._publish(self.topics.announce(self.device_id), self.announcement().encode(), qos=1, retain=True)
            if self._status is None:
                self._set_status("idle")
            else:
                self._publish(self.topics.status(self.device_id), self._status.encode(), qos=1, retain=True)
            if self._transfer is not None:
                self._request(time.monotonic())

    def on_disconnected(self) -> None:
        """The link dropped: stop requesting until it is back."""
        with self._lock:
            self._connected = False

    def handle(self, topic: str, payload: bytes) -> None:
        """One incoming message on a topic of :meth:`subscriptions`."""
        with self._lock:
            if topic == self.topics.chunk(self.device_id):
                self._on_chunk(payload)
            else:
                self._on_manifest(topic, payload)

    def tick(self, now: float) -> None:
        """Timers: re-request missing chunks; real-time scoring."""
        with self._lock:
            tr = self._transfer
            if tr is not None and self._connected:
                wait = min(self.config.retry_timeout_s * 2 ** min(tr.stalled, 16), self.config.max_retry_timeout_s)
                if tr.expedite or now - tr.last_request >= wait:
                    tr.retries += not tr.expedite
                    tr.stalled += not tr.expedite
                    tr.expedite = False
                    self._request(now)
            interval = self.config.score_interval_s
            if interval is None:
                return
            if self._next_score_at is None:
                # spread devices over the interval so a fleet does not score in bursts
                self._next_score_at = now + interval * (zlib.crc32(self.device_id.encode()) % 1000) / 1000
            if now >= self._next_score_at:
                self._score(1, flush=False)
                self._next_score_at = max(self._next_score_at + interval, now)

    # --- OTA ----------------------------------------------------------------------------

    def _on_manifest(self, topic: str, payload: bytes) -> None:
        started = time.perf_counter()
        if not payload:  # retained manifest cleared by the server: cancel its download
            tr = self._transfer
            if tr is not None and tr.source == topic:
                self.receiver.abort()
                self._transfer = None
                self._set_status("cancelled", manifest=tr.manifest, detail="manifest withdrawn")
            return
        code = self.receiver.on_manifest(payload)
        check_ms = (time.perf_counter() - started) * 1e3
        if code == RxStatus.SAME:
            # The manifest it already took, delivered again (a retained message after a reconnect, or a
            # server asking again): no new status, but the current one again as an answer; resume a download.
            if self._status is not None:
                self._publish(self.topics.status(self.device_id), self._status.encode(), qos=1, retain=True)
            if self._transfer is not None:
                self._request(time.monotonic())
            return
        if code.is_error:
            try:
                manifest: Manifest | None = decode_manifest(payload)
            except OtaDecodeError:
                manifest = None
            state: DeviceState = "ignored" if code == RxStatus.ERR_NOT_NEWER else "failed"
            self._set_status(state, reason=reason_for(code), detail=self.receiver.detail, manifest=manifest)
            return
        m = self.receiver.manifest
        assert m is not None  # accepted: the receiver holds it
        self._transfer = _Transfer(m, topic, started, check_ms)
        self._set_status("downloading", manifest=m, received=0, total=m.chunk_count)
        self._request(time.monotonic())

    def _request(self, now: float) -> None:
        tr = self._transfer
        request = self.receiver.request(self.config.request_window)
        if tr is None or request is None or not self._connected:
            return
        tr.outstanding = set(request.indices)
        tr.last_request = now
        tr.requests += 1
        self._publish(self.topics.request(self.device_id), request.encode(), qos=1)

    def _on_chunk(self, payload: bytes) -> None:
        tr = self._transfer
        code = self.receiver.on_chunk(payload)
        if tr is None:
            return
        if code == RxStatus.DUPLICATE:
            tr.duplicates += 1
            return
        if code in (RxStatus.ERR_STALE, RxStatus.ERR_NO_MANIFEST):
            tr.stale += 1
            return
        m = tr.manifest
        if code.is_error:
            tr.corrupt += 1
            log.debug("%s: corrupt chunk: %s", self.device_id, self.receiver.detail)
            if tr.corrupt > self.config.max_corrupt_chunks:
                self._fail(tr, "corrupt chunks", f"{tr.corrupt} corrupt chunks, last: {self.receiver.detail}")
            else:
                tr.expedite = True  # a chunk was lost for sure: ask again at the next tick, not after the timeout
            return
        tr.stalled = 0
        if code == RxStatus.DONE:
            self._complete(tr)
            return
        tr.outstanding = {i for i in tr.outstanding if not self.receiver.has_chunk(i)}
        if not tr.outstanding:
            received = self.receiver.received_count
            self._set_status("downloading", manifest=m, received=received, total=m.chunk_count,
                             counters=tr.counters())  # fmt: skip
            self._request(time.monotonic())

    def _fail(self, tr: _Transfer, reason: str, detail: str, latency: dict[str, float] | None = None) -> None:
        """Give the download up; the active model keeps running."""
        received = self.receiver.received_count
        self.receiver.abort()
        self._transfer = None
        self._set_status("failed", reason=reason, detail=detail, manifest=tr.manifest, received=received,
                         total=tr.manifest.chunk_count, latency=latency, counters=tr.counters())  # fmt: skip

    def _complete(self, tr: _Transfer) -> None:
        """All chunks are in: verify, load, smoke-test, swap."""
        m = tr.manifest
        n = m.chunk_count
        latency = {"download_ms": (time.perf_counter() - tr.started) * 1e3}
        t = time.perf_counter()
        code = self.receiver.finish()
        latency["verify_ms"] = (time.perf_counter() - t) * 1e3 + tr.check_ms
        if code.is_error:
            self._fail(tr, reason_for(code), self.receiver.detail, latency)
            return
        self._set_status("verified", manifest=m, received=n, total=n, latency=latency, counters=tr.counters())
        model = self.receiver.image()
        t = time.perf_counter()
        try:
            spec = m.dsp_spec()
            runner = TflmRunner(model, m.arena_bytes)
            outputs = int(np.prod(runner.output.shape[1:]))
            if runner.n_features != spec.n_features or outputs != spec.n_features:
                raise DeviceError(
                    f"model maps {runner.n_features} to {outputs} values, the DSP spec gives {spec.n_features} features"
                )
        except Exception as exc:  # whatever the new model does wrong, the old one must keep running
            self._fail(tr, "load failed", f"{type(exc).__name__}: {exc}", latency)
            return
        latency["load_ms"] = (time.perf_counter() - t) * 1e3
        self._set_status("loaded", manifest=m, received=n, total=n, latency=latency, counters=tr.counters())
        candidate = ActiveModel(m, spec, runner)
        t = time.perf_counter()
        try:
            check_references(runner.predict_int8, m.references())
            window = self._last_window if self._last_window is not None else self._sample()
            score, _, dsp_ms, inference_ms = score_window(candidate, window, self._last_rpm)
            if not math.isfinite(score):
                raise DeviceError(f"smoke inference gave a non-finite score {score}")
        except Exception as exc:  # the new model must not replace the old one if it cannot score
            self._fail(tr, "smoke test failed", f"{type(exc).__name__}: {exc}", latency)
            return
        latency.update(smoke_ms=(time.perf_counter() - t) * 1e3, dsp_ms=dsp_ms, inference_ms=inference_ms)
        self._flush_scores()  # pending scores belong to the previous model
        self._active = candidate  # the swap: one reference assignment
        self._summary = _Summary(spec.n_features)
        self.receiver.commit()
        self._transfer = None
        latency["deploy_ms"] = (time.perf_counter() - tr.started) * 1e3
        self._set_status("active", manifest=m, received=n, total=n, latency=latency, counters=tr.counters())
        self._publish(self.topics.announce(self.device_id), self.announcement().encode(), qos=1, retain=True)

    # --- scoring ------------------------------------------------------------------------

    def _sample(self) -> npt.NDArray[np.float32]:
        """Take the next window from the sensor (int16 as the ADC gives it) with its speed, publish it if configured."""
        rpm = self.simulator.current_rpm  # the speed of the window about to be sampled
        samples, scale = quantize(self.simulator.next_window(), self.config.full_scale_g)
        window = VibrationWindow(self.device_id, self._window_seq, time.time_ns() // 1000,
                                 self.simulator.sample_rate_hz, scale, samples, self.boot_epoch, rpm)  # fmt: skip
        self._window_seq += 1
        if self.config.publish_windows:
            self._publish(self.topics.vibration(self.device_id), encode(window), qos=1)
        self._last_window = window.physical()
        self._last_rpm = rpm
        return self._last_window

    def score_windows(self, n: int) -> list[Score]:
        """Sample and score ``n`` windows now (no real time), publish their scores; [] without a model."""
        with self._lock:
            return self._score(n, flush=True)

    def _score(self, n: int, *, flush: bool) -> list[Score]:
        results = []
        for _ in range(n):
            seq = self._window_seq
            window = self._sample()
            model = self._active
            if model is None or self._summary is None:
                continue
            value, features, dsp_ms, inference_ms = score_window(model, window, self._last_rpm)
            fallback = bool(resolve_speed(self._last_rpm, model.spec, 1)[1][0])
            score = Score(seq, value, bool(is_anomalous(value, model.threshold)), dsp_ms, inference_ms, fallback)
            results.append(score)
            self.windows_scored += 1
            self.anomalies += score.anomaly
            self.speed_fallbacks += fallback
            self._summary.add(score, features, model.threshold)
            self._pending.append(score)
            if len(self._pending) >= self.config.score_batch:
                self._flush_scores()
            if self._summary.windows >= self.config.summary_windows:
                self.publish_summary()
        if flush:
            self._flush_scores()
        return results

    def _flush_scores(self) -> None:
        model, pending = self._active, self._pending
        self._pending = []
        if model is None or not pending:
            return
        batch = ScoreBatch(
            device=self.device_id, model=model.manifest.model_name, version=model.manifest.model_version,
            threshold=model.threshold, first_seq=pending[0].seq, ts=time.time(),
            scores=[s.score for s in pending], anomalies=[s.anomaly for s in pending],
        )  # fmt: skip
        self._publish(self.topics.scores(self.device_id), batch.encode(), qos=0)

    def publish_summary(self) -> DriftSummary | None:
        """Publish the drift summary of the period so far and start a new period; None without a model."""
        with self._lock:
            model, summary = self._active, self._summary
            if model is None or summary is None:
                return None
            message = summary.message(self.device_id, model)
            self._summary = _Summary(model.spec.n_features)
            self._publish(self.topics.summary(self.device_id), message.encode(), qos=1)
            return message

    # --- publishing ---------------------------------------------------------------------

    def _publish(self, topic: str, payload: bytes, *, qos: int, retain: bool = False) -> None:
        if self._link is not None and self._connected:
            self._link.publish(topic, payload, qos=qos, retain=retain)

    def _set_status(
        self,
        state: DeviceState,
        *,
        reason: str = "",
        detail: str = "",
        manifest: Manifest | None = None,
        received: int = 0,
        total: int = 0,
        latency: dict[str, float] | None = None,
        counters: dict[str, int] | None = None,
    ) -> None:
        self._status_seq += 1
        if self.speed_fallbacks:  # joins the counters when non-zero, as the emulated device's frame errors do
            counters = {**(counters or {}), "speed_fallback": self.speed_fallbacks}
        text = {"downloading": f"downloading {received}/{total}", "failed": f"failed: {reason}",
                "ignored": f"ignored: {reason}"}.get(state, state)  # fmt: skip
        status = DeviceStatus(
            device=self.device_id, seq=self._status_seq, ts=time.time(), state=state, status=text, reason=reason,
            detail=detail, model=manifest.model_name if manifest else None,
            version=manifest.model_version if manifest else None, received=received, total=total,
            active=self._active.ref if self._active else None, latency_ms=latency or {}, counters=counters or {},
        )  # fmt: skip
        level = logging.WARNING if state == "failed" else logging.DEBUG  # the deploy report sums them up
        if state != "downloading" or received in (0, total):
            log.log(level, "%s: %s %s", self.device_id, text, detail)
        self._status = status
        self.statuses.append(status)
        self._publish(self.topics.status(self.device_id), status.encode(), qos=1, retain=True)
        self._changed.notify_all()


_CONNECTED = "connected"
_DISCONNECTED = "disconnected"
_ONLINE = "online"
_OFFLINE = "offline"
_STOP = "stop"


class DeviceLink:
    """One MQTT connection and one driver thread for one or many devices.

    paho's network thread only queues what arrives; the driver thread hands messages to the
    devices subscribed to their topics and runs the devices' timers every ``tick_s``.

    Args:
        address: Broker.
        devices: Devices served by this connection (their ids stay in their topics).
        client_id: MQTT client id.
        settings: MQTT credentials and TLS.
        tick_s: Timer period.
    """

    def __init__(
        self,
        address: BrokerAddress,
        devices: Sequence[DeviceRuntime],
        *,
        client_id: str,
        settings: MqttSettings | None = None,
        tick_s: float = 0.05,
    ) -> None:
        self.address = address
        self.devices = list(devices)
        self.tick_s = tick_s
        self._routes: dict[str, list[DeviceRuntime]] = {}
        for device in self.devices:
            device.attach(self)
            for topic in device.subscriptions():
                self._routes.setdefault(topic, []).append(device)
        self.client_id = client_id
        self._client = make_client(address, client_id, settings=settings)
        self._client.reconnect_delay_set(1, 2)
        self._client.on_message = self._on_message
        self._client.on_disconnect = lambda *_args: self._inbox.put((_DISCONNECTED, b""))
        self._inbox: queue.Queue[tuple[str, bytes]] = queue.Queue()
        self._offline: set[str] = set()
        self._disconnected_by_us = False
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()

    def start(self) -> None:
        """Connect, subscribe, start the driver thread; return once the devices have announced themselves.

        Raises:
            BrokerError: The broker cannot be reached.
        """
        connect(self._client, self.address)
        self._on_connect()
        self._client.on_connect = lambda _c, _u, _f, reason, _p: None if reason.is_failure else self._on_connect()
        self._thread = threading.Thread(target=self._drive, name=f"device-link-{self.client_id}", daemon=True)
        self._thread.start()
        self._ready.wait(10)

    def stop(self) -> None:
        """Disconnect and end the driver thread."""
        self._client.disconnect()
        self._client.loop_stop()
        self._inbox.put((_STOP, b""))
        if self._thread is not None:
            self._thread.join(10)

    def publish(self, topic: str, payload: bytes, *, qos: int, retain: bool = False) -> None:
        """Publish for a device."""
        self._client.publish(topic, payload, qos=qos, retain=retain)

    def set_online(self, device: DeviceRuntime, online: bool) -> None:
        """Take one device off the network or bring it back; with every device off, the connection closes."""
        if online:
            self._offline.discard(device.device_id)
            if self._disconnected_by_us:
                self._disconnected_by_us = False
                self._client.reconnect()
                self._client.loop_start()  # the reconnect's CONNACK brings every online device back
            else:
                self._inbox.put((_ONLINE, device.device_id.encode()))
            return
        self._offline.add(device.device_id)
        self._inbox.put((_OFFLINE, device.device_id.encode()))
        if len(self._offline) == len(self.devices) and not self._disconnected_by_us:
            self._disconnected_by_us = True
            self._client.disconnect()
            self._client.loop_stop()

    def _on_connect(self) -> None:
        if self._routes:
            self._client.subscribe([(topic, 1) for topic in self._routes])
        self._inbox.put((_CONNECTED, b""))

    def _on_message(self, _client: mqtt.Client, _userdata: Any, message: mqtt.MQTTMessage) -> None:
        self._inbox.put((message.topic, bytes(message.payload)))

    def _dispatch(self, kind: str, payload: bytes) -> None:
        if kind == _CONNECTED:
            for device in self.devices:
                if device.device_id not in self._offline:
                    device.on_connected()
            self._ready.set()
        elif kind == _DISCONNECTED:
            for device in self.devices:
                device.on_disconnected()
        elif kind in (_ONLINE, _OFFLINE):
            device_id = payload.decode()
            for device in self.devices:
                if device.device_id == device_id and kind == _ONLINE:
                    device.on_connected()
                elif device.device_id == device_id:
                    device.on_disconnected()
        else:
            for device in self._routes.get(kind, ()):
                if device.device_id not in self._offline:
                    device.handle(kind, payload)

    def _drive(self) -> None:
        last_tick = 0.0
        while True:
            try:
                kind, payload = self._inbox.get(timeout=self.tick_s)
            except queue.Empty:
                kind, payload = "", b""
            if kind == _STOP:
                return
            try:
                if kind:
                    self._dispatch(kind, payload)
                now = time.monotonic()
                if now - last_tick >= self.tick_s:
                    last_tick = now
                    for device in self.devices:
                        device.tick(now)
            except Exception:  # one device's bug must not stop the others on this link
                log.exception("device link: handling %r failed", kind)
