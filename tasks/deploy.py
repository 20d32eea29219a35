"""Redeploy registered models to far-edge devices over MQTT: signing keys, targeting, canary, rollback, report.

The device side is ``firmware/OTA_PROTOCOL.md``; this module is the server's part of it:

* **Keys** (:class:`KeyStore`): one Ed25519 signing key, created once and kept outside the
  repository (``$TINYMLOPS_KEYS_DIR``, default ``~/.config/tinymlops/keys``), private key mode
  0600, and the public key ring JSON (trusted and revoked key ids) that devices are provisioned
  with. Rotation makes a new key the signing key; the old one stays trusted until revoked.
* **Targeting**: the devices' retained announcements say what they run and can run;
  :func:`select_targets` keeps only devices whose MCU profile equals the bundle's target and
  that trust the signing key, and reports every other one as skipped with the reason. A device
  is who its topic says: an announcement naming another device or fleet than its topic, or with
  a field out of the protocol's bounds, is rejected for the device of that topic only and
  reported as skipped with the reason.
* **Delivery** (:class:`DeploymentSession`): signed manifests per device (or per group) through
  :class:`~tasks.ota_publisher.ModelPublisher`, which serves the chunks the devices pull; the session
  waits for each device's final status (``active``, ``failed: ...``, ``ignored: ...``) and keeps
  the latencies the devices report. A device that never answers within the timeout is
  reported as not delivered; while the fleet's OTA service (:mod:`tasks.ota_service`) runs,
  its manifest stays retained and the service serves it whenever the device is back;
  without one the manifest is withdrawn, so it does not start a download nobody serves.
* **Manifest versions** are monotonic per device and never reused: ``max(UNIX time in seconds,
  highest version the device announced, reported or was sent + 1)``, so a version a device once
  failed (never retried) or a rollback always gets a higher one. A group manifest carries the
  UNIX time; a member already past it gets its own manifest. So no device, hostile or not, raises
  another's version; one whose next version would not fit the manifest's u32 is skipped with the
  reason.
* **Canary** (:func:`judge_canary`): a fraction of the devices first; their anomaly rate over
  ``watch_s`` is compared with ``factor`` times the larger of the bundle's expected false-alarm
  rate and the rate the old model gives meanwhile on the other devices; any failed canary is
  unhealthy too. Unhealthy: :func:`rollback_canaries` rolls the registry's champion back when
  the failed model was the champion and puts the canaries back on the previous model (a new,
  higher manifest version); the rest of the fleet never gets the bad model.
* **Report** (:class:`DeploymentReport`): per device delivered / verified / loaded / active or
  the failure and the model still running, with latencies; logged to MLflow as a deployment run.
"""

from __future__ import annotations

import datetime as dt
import functools
import hashlib
import json
import logging
import math
import tempfile
import threading
import time
import uuid
import zlib
from collections import defaultdict, deque
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Literal, Self

import numpy as np
import paho.mqtt.client as mqtt
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey
from prefect import task
from prefect.cache_policies import NO_CACHE

from firmware.ota import (
    DEFAULT_CHUNK_SIZE,
    U32_MAX,
    Announcement,
    DeviceStatus,
    ModelRef,
    OtaDecodeError,
    OtaError,
    ReferenceSet,
    RxStatus,
    ScoreBatch,
    compute_references,
    device_audience,
    group_audience,
)
from firmware.signing import (
    KeyRing,
    ManifestSigner,
    SigningError,
    check_key_id,
    generate_keypair,
    key_fingerprint,
    load_private_key,
    public_key_bytes,
    public_key_from_bytes,
    save_private_key,
)
from registry.errors import PromotionError
from registry.models import CHAMPION, PREVIOUS, TAG_SHA256, RegisteredVersion, aliases_of, resolve
from registry.promotion import rollback
from registry.store import configure_experiment, configure_from_settings, first_line, mlflow_client
from registry.tracking import log_deployment_run
from tasks.ota_publisher import ModelPublisher
from tasks.ota_service import parse_presence
from tasks.rates import rate_lower_bound
from tinymlops.contracts.dsp import DspSpec
from tinymlops.contracts.topics import FleetTopics, TopicKind
from tinymlops.errors import TinyMLOpsError
from tinymlops.mqtt import BrokerAddress, connect, make_client
from tinymlops.schemas import ModelBundle
from tinymlops.settings import REPO_ROOT, DriftSettings, MqttSettings, Settings

log = logging.getLogger(__name__)

KEYS_DIR_ENV = "TINYMLOPS_KEYS_DIR"
SIGNING_KEY_FILE = "signing_key.pem"
KEYRING_FILE = "keyring.json"
DEPLOY_EXPERIMENT = "tinymlops-deployments"
DEPLOY_DESCRIPTION = "Over-the-air deployments: one run per model rollout to a fleet, with per-device outcomes."
DEPLOY_ACTOR = "deploy-flow"
FINAL_STATES = frozenset({"active", "failed", "ignored", "cancelled"})
# Confidence of the one-sided bound on the canary anomaly rate: one false alarm in a short watch is not a verdict.
CANARY_CONFIDENCE = 0.95
_SCORE_HISTORY = 10_000

Role = Literal["canary", "fleet", "rollback", "held"]


class DeployError(TinyMLOpsError):
    """A deployment cannot start or its input is invalid."""


class KeyStoreError(TinyMLOpsError):
    """The signing key store is missing, inconsistent, or an operation on it is refused."""


# --- signing keys ---------------------------------------------------------------------------


def _default_key_id(public: Ed25519PublicKey) -> str:
    return f"ota-{dt.datetime.now(tz=dt.UTC):%Y%m%d}-{key_fingerprint(public)[:8]}"


def _ring_keys(ring: KeyRing) -> dict[str, str]:
    """Every key id of a ring with its raw public key in hex, revoked ones included."""
    data: dict[str, str] = json.loads(ring.to_json())["keys"]
    return data


@dataclass(frozen=True)
class KeyInfo:
    """One key of the key ring.

    Attributes:
        key_id: Id written into the manifests it signs.
        fingerprint: First 16 hex digits of the sha256 of the raw public key.
        state: ``signing`` (the current key), ``trusted`` (still accepted by devices) or ``revoked``.
    """

    key_id: str
    fingerprint: str
    state: Literal["signing", "trusted", "revoked"]


class KeyStore:
    """The server's OTA signing key and the public key ring devices are provisioned with.

    Files in ``directory`` (created 0700): ``signing_key.pem`` (PKCS#8, 0600; refused when group
    or others can read it) and ``keyring.json`` (every key id ever trusted with its public key,
    and the revoked ids: :class:`~firmware.signing.KeyRing` JSON, what ``tinymlops device run
    --keyring`` reads). The signing key's id is the ring entry holding its public key, so the two
    files cannot disagree about it. The key ring is written before the private key, so an
    interrupted rotation leaves at most an extra trusted key, never an unknown signing key.

    Args:
        directory: Key directory; must be outside the repository (a key there could be committed).

    Raises:
        KeyStoreError: The directory is inside the repository.
    """

    def __init__(self, directory: Path) -> None:
        resolved = directory.expanduser().resolve()
        if resolved.is_relative_to(REPO_ROOT.resolve()):
            raise KeyStoreError(
                f"keys directory {resolved} is inside the repository {REPO_ROOT}: "
                f"set {KEYS_DIR_ENV} to a directory outside it"
            )
        self.directory = resolved

    @property
    def private_key_path(self) -> Path:
        """The signing key (0600)."""
        return self.directory / SIGNING_KEY_FILE

    @property
    def keyring_path(self) -> Path:
        """The public key ring (0644)."""
        return self.directory / KEYRING_FILE

    @property
    def exists(self) -> bool:
        """Whether a signing key has been created."""
        return self.private_key_path.exists()

    def _mkdir(self) -> None:
        self.directory.mkdir(parents=True, exist_ok=True, mode=0o700)

    def _install(self, key_id: str | None, ring: KeyRing) -> KeyInfo:
        private, public = generate_keypair()
        key_id = check_key_id(key_id or _default_key_id(public))
        if key_id in _ring_keys(ring):
            raise KeyStoreError(f"key id {key_id!r} is already in {self.keyring_path}; choose another")
        ring.add(key_id, public)
        self._mkdir()
        ring.save(self.keyring_path)
        save_private_key(self.private_key_path, private)
        log.info("signing key %s (%s) in %s", key_id, key_fingerprint(public), self.directory)
        return KeyInfo(key_id, key_fingerprint(public), "signing")

    def init(self, key_id: str | None = None) -> tuple[KeyInfo, bool]:
        """Create the signing key and the key ring, once; an existing key is never overwritten.

        Returns:
            The signing key and whether it was created now (False: it existed, nothing changed).
        """
        if self.exists:
            return self.signing_key(), False
        if self.keyring_path.exists():
            raise KeyStoreError(f"{self.keyring_path} exists without {SIGNING_KEY_FILE}: restore the key or move it")
        return self._install(key_id, KeyRing()), True

    def keyring(self) -> KeyRing:
        """The public key ring.

        Raises:
            KeyStoreError: Not initialised.
        """
        if not self.keyring_path.exists():
            raise KeyStoreError(f"no key ring in {self.directory}: run `tinymlops keys init`")
        try:
            return KeyRing.load(self.keyring_path)
        except SigningError as exc:
            raise KeyStoreError(str(exc)) from None

    def signer(self) -> ManifestSigner:
        """The current signing key with its id.

        Raises:
            KeyStoreError: Not initialised, the private key is readable by others, or its public key is
                not in the ring, or revoked.
        """
        if not self.exists:
            raise KeyStoreError(f"no signing key in {self.directory}: run `tinymlops keys init`")
        try:
            private = load_private_key(self.private_key_path)
        except SigningError as exc:
            raise KeyStoreError(str(exc)) from None
        ring = self.keyring()
        raw = public_key_bytes(private).hex()
        key_id = next((k for k, v in _ring_keys(ring).items() if v == raw), None)
        if key_id is None:
            raise KeyStoreError(f"the signing key {self.private_key_path} is not in the key ring {self.keyring_path}")
        if key_id in ring.revoked:
            raise KeyStoreError(f"the signing key {key_id!r} is revoked: run `tinymlops keys rotate`")
        return ManifestSigner(private, key_id)

    def signing_key(self) -> KeyInfo:
        """The current signing key."""
        signer = self.signer()
        return KeyInfo(signer.key_id, key_fingerprint(signer.public_key), "signing")

    def list_keys(self) -> list[KeyInfo]:
        """Every key of the ring, the signing key first, then by id."""
        ring = self.keyring()
        current = self.signer().key_id if self.exists else None
        infos = []
        for key_id, raw in sorted(_ring_keys(ring).items()):
            fingerprint = key_fingerprint(public_key_from_bytes(bytes.fromhex(raw)))
            state: Literal["signing", "trusted", "revoked"] = (
                "revoked" if key_id in ring.revoked else "signing" if key_id == current else "trusted"
            )
            infos.append(KeyInfo(key_id, fingerprint, state))
        return sorted(infos, key=lambda k: (k.state != "signing", k.key_id))

    def rotate(self, key_id: str | None = None) -> KeyInfo:
        """Make a new key the signing key; the previous one stays trusted until revoked.

        Raises:
            KeyStoreError: Not initialised, or the id is taken.
        """
        previous = self.signer()
        info = self._install(key_id, self.keyring())
        log.info("rotated the signing key: %s -> %s (%s stays trusted until revoked)", previous.key_id,
                 info.key_id, previous.key_id)  # fmt: skip
        return info

    def revoke(self, key_id: str) -> KeyInfo:
        """Revoke a key id: devices provisioned with the new ring refuse manifests it signs.

        Raises:
            KeyStoreError: Unknown id, or it is the current signing key (rotate first).
        """
        ring = self.keyring()
        known = _ring_keys(ring)
        if key_id not in known:
            raise KeyStoreError(f"no key {key_id!r} in {self.keyring_path} (keys: {', '.join(sorted(known))})")
        if self.exists and self.signer().key_id == key_id:
            raise KeyStoreError(f"{key_id!r} is the signing key: run `tinymlops keys rotate` before revoking it")
        ring.revoke(key_id)
        ring.save(self.keyring_path)
        log.info("revoked signing key %s", key_id)
        return next(k for k in self.list_keys() if k.key_id == key_id)

    def export_keyring(self, path: Path) -> Path:
        """Write the public key ring (what devices are provisioned with) to ``path``."""
        self.keyring().save(path)
        return path


# --- the model to deploy --------------------------------------------------------------------


@dataclass(frozen=True)
class DeployableModel:
    """What a manifest needs of a registered bundle: the bytes and everything the device must be told.

    Attributes:
        name: Registered model name (the manifest's model name).
        target: MCU profile it was validated for.
        tflite: The int8 model bytes (verified against the registered sha256).
        dsp_spec: The DSP front end with normalisation statistics.
        threshold: Anomaly threshold on the reconstruction error.
        arena_bytes: Smallest working TFLite Micro arena, measured at packaging.
        registry_version: The registered version, when it came from the registry.
        aliases: Its aliases when resolved.
        expected_anomaly_rate: Expected false-alarm rate on normal data (the drift reference).
    """

    name: str
    target: str
    tflite: bytes
    dsp_spec: DspSpec
    threshold: float
    arena_bytes: int
    registry_version: str | None = None
    aliases: tuple[str, ...] = ()
    expected_anomaly_rate: float | None = None

    @property
    def sha256(self) -> str:
        """sha256 of the model bytes (hex)."""
        return hashlib.sha256(self.tflite).hexdigest()

    @functools.cached_property
    def references(self) -> ReferenceSet:
        """The reference inputs and outputs every manifest of this model carries (computed once).

        Raises:
            OtaError: The model's output is the same for every reference input (a dead model), or it does not run.
        """
        return compute_references(self.tflite, self.arena_bytes)

    @property
    def label(self) -> str:
        """``name/version`` (or ``name@sha256-prefix`` for an unregistered model)."""
        return f"{self.name}/{self.registry_version}" if self.registry_version else f"{self.name}@{self.sha256[:12]}"

    @classmethod
    def from_bundle(cls, bundle: ModelBundle, version: RegisteredVersion | None = None) -> DeployableModel:
        """Read a bundle (its model verified against the recorded sha256)."""
        meta = bundle.metadata
        try:
            expected: float | None = bundle.drift_reference().expected_anomaly_rate
        except OSError:
            expected = None
        return cls(
            name=meta.model_name,
            target=meta.target,
            tflite=bundle.tflite(),
            dsp_spec=bundle.dsp_spec(),
            threshold=meta.threshold,
            arena_bytes=meta.arena_bytes,
            registry_version=version.version if version else None,
            aliases=version.aliases if version else (),
            expected_anomaly_rate=expected,
        )


def resolve_deployable(ref: str, *, require_gates: bool = True) -> DeployableModel:
    """Resolve a registry reference to a verified, deployable model.

    Args:
        ref: ``NAME@alias``, ``NAME/version`` or ``NAME`` (the latest version).
        require_gates: Refuse a version that failed its budget or quality gates at registration.

    Raises:
        ModelNotFoundError: Unknown model, version or alias.
        ModelIntegrityError: The stored model does not match the sha256 recorded at registration.
        DeployError: The version failed its gates, or its reference outputs cannot be computed (a dead
            model gives the same output for every reference input).
    """
    configure_from_settings()
    with tempfile.TemporaryDirectory(prefix="tinymlops-deploy-") as tmp:
        resolved = resolve(ref, Path(tmp) / "model")
        version = resolved.version
        if require_gates and not version.gates_passed:
            raise DeployError(
                f"{version.name}/{version.version} failed its gates at registration (budget_passed="
                f"{version.tags.get('budget_passed')}, gates_passed={version.tags.get('gates_passed')}): not deployable"
            )
        model = DeployableModel.from_bundle(resolved.bundle, version)
    try:
        model.references  # noqa: B018 - computed now: a dead model is refused before any device is touched
    except OtaError as exc:
        raise DeployError(f"{model.label}: {exc}") from None
    log.info("deploying %s (%s, %d bytes, sha256 %s…)", ref, model.label, len(model.tflite), model.sha256[:12])
    return model


# --- watching the fleet -----------------------------------------------------------------------


@dataclass(frozen=True)
class _Scores:
    """One score batch as the server received it."""

    version: int
    windows: int
    anomalies: int


class FleetWatcher:
    """A server-side subscriber to a fleet's announcements, statuses and scores (retained ones included).

    Every message is attributed to the device of the topic it arrived on; one that names another
    device (or an announcement naming another fleet), or is not a valid message, is dropped.

    Attributes:
        announcements: The latest valid announcement of each device.
        rejected: Devices whose latest announcement was rejected, with the reason.
        statuses: The latest status of each device.
        scores: Score batches of each device, oldest first.
        ota_service: The presence the fleet's OTA service retains (None: no service runs).

    Args:
        address: Broker.
        topics: The fleet's topics.
        kinds: Which per-device topics to follow.
        settings: MQTT credentials and TLS.
    """

    def __init__(
        self,
        address: BrokerAddress,
        topics: FleetTopics,
        kinds: Sequence[TopicKind] = ("announce", "status", "scores"),
        *,
        settings: MqttSettings | None = None,
    ) -> None:
        self.topics = topics
        self.address = address
        self.kinds = tuple(kinds)
        self.announcements: dict[str, Announcement] = {}
        self.rejected: dict[str, str] = {}
        self.statuses: dict[str, DeviceStatus] = {}
        self.ota_service: dict[str, Any] | None = None
        self.scores: dict[str, deque[_Scores]] = defaultdict(lambda: deque(maxlen=_SCORE_HISTORY))
        self.changed = threading.Condition()
        self.on_status: list[Callable[[str, DeviceStatus], None]] = []
        self._last_message = time.monotonic()
        self._subscribed = threading.Event()
        client_id = f"tinymlops-watch-{topics.fleet}-{uuid.uuid4().hex[:8]}"
        self._client = make_client(address, client_id, settings=settings)
        self._client.reconnect_delay_set(1, 4)
        self._client.on_message = self._on_message
        self._client.on_subscribe = lambda *_args: self._subscribed.set()

    def start(self, settle_s: float = 0.3, timeout_s: float = 5.0) -> Self:
        """Connect, subscribe, and return once the retained messages have arrived (quiet for ``settle_s``)."""
        connect(self._client, self.address)
        self._subscribe()
        self._client.on_connect = lambda _c, _u, _f, reason, _p: None if reason.is_failure else self._subscribe()
        self.settle(settle_s, timeout_s)
        return self

    def stop(self) -> None:
        """Disconnect."""
        self._client.disconnect()
        self._client.loop_stop()

    def _subscribe(self) -> None:
        kinds = [(self.topics.all_devices(kind), 1) for kind in self.kinds]
        self._client.subscribe([*kinds, (self.topics.ota_service(), 1)])

    def settle(self, quiet_s: float, timeout_s: float) -> None:
        """Wait for the subscription, then until no message came for ``quiet_s`` (at most ``timeout_s``)."""
        deadline = time.monotonic() + timeout_s
        self._subscribed.wait(timeout_s)
        self._last_message = max(self._last_message, time.monotonic())
        while (now := time.monotonic()) < deadline and now - self._last_message < quiet_s:
            time.sleep(min(quiet_s / 4, deadline - now))

    def _on_message(self, _client: mqtt.Client, _userdata: Any, message: mqtt.MQTTMessage) -> None:
        self._last_message = time.monotonic()
        parsed = self.topics.parse(message.topic)
        payload = bytes(message.payload)
        if message.topic == self.topics.ota_service():
            self.ota_service = parse_presence(payload)
            return
        if parsed is None or not payload:
            return
        device, kind = parsed
        try:
            if kind == "announce":
                self._announced(device, payload)
            elif kind == "status":
                status = DeviceStatus.decode_from(device, payload)
                self.statuses[device] = status
                for listener in self.on_status:
                    listener(device, status)
            elif kind == "scores":
                batch = ScoreBatch.decode_from(device, payload)
                self.scores[device].append(_Scores(batch.version, len(batch.scores), sum(batch.anomalies)))
        except OtaDecodeError as exc:
            log.warning("ignoring an invalid %s message on the topic of %s: %s", kind, device, exc)
            return
        with self.changed:
            self.changed.notify_all()

    def _announced(self, device: str, payload: bytes) -> None:
        """Keep a device's announcement, or drop its previous one and record why this one is rejected."""
        try:
            announcement = Announcement.decode_from(device, payload)
            if announcement.fleet != self.topics.fleet:
                raise OtaDecodeError(
                    RxStatus.ERR_FIELD,
                    f"announcement names fleet {announcement.fleet} on a topic of fleet {self.topics.fleet}",
                )
        except OtaDecodeError as exc:
            self.announcements.pop(device, None)
            self.rejected[device] = str(exc)
            raise
        self.rejected.pop(device, None)
        self.announcements[device] = announcement

    def anomaly_counts(
        self, devices: Iterable[str], *, version: int | None = None, exclude_version: int | None = None
    ) -> tuple[int, int]:
        """Windows and anomalies scored by ``devices`` (of one manifest version, or all but one)."""
        windows = anomalies = 0
        for device in devices:
            for batch in list(self.scores.get(device, ())):
                if (version is None or batch.version == version) and batch.version != exclude_version:
                    windows += batch.windows
                    anomalies += batch.anomalies
        return windows, anomalies


# --- targeting --------------------------------------------------------------------------------


@dataclass(frozen=True)
class SkippedDevice:
    """A device that is not deployed to, and why."""

    device: str
    profile: str | None
    reason: str


@dataclass(frozen=True)
class TargetSelection:
    """The devices to deploy to and the ones left alone."""

    targets: list[Announcement]
    skipped: list[SkippedDevice]


def version_limit_reason(highest: int) -> str | None:
    """Why a device that has seen manifest version ``highest`` cannot get a newer one (None: it can)."""
    if highest < U32_MAX:
        return None
    return f"manifest version {highest} already seen: no higher version fits in u32"


def select_targets(
    announcements: Sequence[Announcement],
    bundle_target: str,
    devices: Sequence[str] | None = None,
    group: str | None = None,
    key_id: str | None = None,
    rejected: Mapping[str, str] | None = None,
) -> TargetSelection:
    """Pick the devices whose MCU profile equals the bundle's target; report every other one with the reason.

    Args:
        announcements: What the devices announced (retained), each from its own topic.
        bundle_target: The model's MCU profile.
        devices: Only these device ids (an id not announced is skipped).
        group: Only members of this group.
        key_id: The signing key: a device that does not trust it would refuse the manifest.
        rejected: Devices whose announcement was rejected, with the reason: skipped with it (all of
            them, or those of ``devices``; their group is unknown).

    Returns:
        Targets sorted by device id, and the skipped devices.

    Raises:
        DeployError: Both ``devices`` and ``group`` given, or no device is left to deploy to.
    """
    if devices is not None and group is not None:
        raise DeployError("give devices or a group, not both")
    known = {a.device: a for a in announcements}
    refused = {d: reason for d, reason in (rejected or {}).items() if d not in known}
    skipped: list[SkippedDevice] = []
    if devices is not None:
        wanted = list(dict.fromkeys(devices))
        skipped += [SkippedDevice(d, None, refused.get(d, "no announcement in this fleet"))
                    for d in wanted if d not in known]  # fmt: skip
        candidates = [known[d] for d in wanted if d in known]
    else:
        skipped += [SkippedDevice(d, None, reason) for d, reason in refused.items()]
        candidates = [a for a in announcements if group is None or a.group == group]
    targets = []
    for a in sorted(candidates, key=lambda a: a.device):
        too_new = version_limit_reason(a.model.version) if a.model is not None else None
        if too_new is not None:
            skipped.append(SkippedDevice(a.device, a.profile, too_new))
        elif a.profile != bundle_target:
            skipped.append(SkippedDevice(a.device, a.profile, f"profile {a.profile}, model is for {bundle_target}"))
        elif key_id is not None and key_id not in a.key_ids:
            trusted = ", ".join(a.key_ids) or "none"
            skipped.append(
                SkippedDevice(a.device, a.profile, f"does not trust signing key {key_id} (trusts {trusted})")
            )
        else:
            targets.append(a)
    if not targets:
        scope = f"group {group!r}" if group else f"devices {', '.join(devices)}" if devices else "the fleet"
        profiles = sorted({a.profile for a in announcements})
        seen = f"{len(announcements)} announced ({', '.join(profiles)})" if announcements else "no device announced"
        reasons = "; ".join(f"{s.device}: {s.reason}" for s in skipped[:3])
        raise DeployError(
            f"no device of {scope} can take a {bundle_target} model: {seen}" + (f"; {reasons}" if reasons else "")
        )
    return TargetSelection(targets, sorted(skipped, key=lambda s: s.device))


def plan_canary(devices: Sequence[Announcement], fraction: float) -> tuple[list[Announcement], list[Announcement]]:
    """Split the targets into canaries (``ceil(fraction * n)``, at least one when fraction > 0) and the rest.

    Canaries are picked by the CRC-32 of their id: spread over the id range, the same on every run.

    Raises:
        DeployError: ``fraction`` is outside [0, 1].
    """
    if not 0.0 <= fraction <= 1.0:
        raise DeployError(f"canary fraction {fraction} is outside 0..1")
    if fraction == 0.0 or not devices:
        return [], list(devices)
    n = max(1, math.ceil(fraction * len(devices)))
    ordered = sorted(devices, key=lambda a: zlib.crc32(a.device.encode()))
    chosen = {a.device for a in ordered[:n]}
    return [a for a in devices if a.device in chosen], [a for a in devices if a.device not in chosen]


# --- deploying ----------------------------------------------------------------------------------


def _model_text(ref: ModelRef | None) -> str:
    return f"{ref.name} v{ref.version}" if ref else "none"


@dataclass(frozen=True)
class DeviceOutcome:
    """What one deployment (or rollback) did on one device.

    Attributes:
        device: Device id.
        profile: Its MCU profile.
        role: ``canary``, ``fleet``, ``rollback`` (restoring the previous model) or ``held`` (not
            deployed because the canary was unhealthy).
        model: The model label deployed (``name/version``).
        manifest_version: Manifest version (None for ``held``).
        audience: ``device:<id>`` or ``group:<name>``: the manifest topic it was published on.
        delivered: The device answered about this manifest (it received it).
        verified: Every chunk arrived and the sha256 matched.
        loaded: TFLite Micro loaded and allocated it.
        active: It runs the model now.
        state: ``active``, ``failed``, ``ignored``, ``cancelled``, ``timeout`` (delivered, not finished
            in time), ``not delivered``, ``held`` or ``skipped`` (no manifest version left for it).
        status: The device's status line (or what the server saw).
        detail: The measured value and the limit of a failure.
        running: The model the device runs now.
        chunks: ``received/total`` chunks.
        latency_ms: ``deploy`` (server: manifest published -> active status received) and what the
            device reported: ``device_deploy``, ``download``, ``verify``, ``load``, ``inference``.
    """

    device: str
    profile: str
    role: Role
    model: str
    manifest_version: int | None
    audience: str
    delivered: bool
    verified: bool
    loaded: bool
    active: bool
    state: str
    status: str
    detail: str
    running: str
    chunks: str
    latency_ms: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict."""
        return asdict(self)


@dataclass
class _Tracker:
    """The server's view of one device during one deployment wave."""

    announcement: Announcement
    role: Role
    version: int
    audience: str
    published: float = 0.0
    states: set[str] = field(default_factory=set)
    last: DeviceStatus | None = None
    final: DeviceStatus | None = None
    finished: float | None = None

    def update(self, status: DeviceStatus, now: float) -> None:
        about_this = status.version == self.version or (status.active and status.active.version == self.version)
        if not about_this or self.final is not None:
            return
        self.states.add(status.state)
        self.last = status
        if status.state in FINAL_STATES or (status.active and status.active.version == self.version):
            self.final = status
            self.finished = now

    def outcome(self, model: DeployableModel, *, kept: bool = False) -> DeviceOutcome:
        """The outcome; ``kept``: an unfinished manifest stays retained for the fleet's OTA service."""
        a, last, final = self.announcement, self.last, self.final
        left = "manifest kept: the OTA service serves it" if kept else "manifest withdrawn"
        active = final is not None and final.active is not None and final.active.version == self.version
        loaded = active or "loaded" in self.states
        verified = loaded or "verified" in self.states
        state: str
        if final is not None:
            state, status = final.state, final.status
        elif last is not None:
            state, status = "timeout", f"timeout: {last.status}; {left}"
        else:
            state, status = "not delivered", f"not delivered: no answer (offline?); {left}"
        running = _model_text(last.active if last is not None else a.model)
        report = final or last
        latency = {}
        if final is not None:
            device = final.latency_ms
            names = {"deploy_ms": "device_deploy", "download_ms": "download", "verify_ms": "verify",
                     "load_ms": "load", "inference_ms": "inference"}  # fmt: skip
            latency = {short: round(device[key], 3) for key, short in names.items() if key in device}
            if active and self.finished is not None:
                latency["deploy"] = round((self.finished - self.published) * 1e3, 3)
        return DeviceOutcome(
            device=a.device, profile=a.profile, role=self.role, model=model.label, manifest_version=self.version,
            audience=self.audience, delivered=last is not None, verified=verified, loaded=loaded, active=active,
            state=state, status=status, detail=report.detail if report is not None else "", running=running,
            chunks=f"{last.received}/{last.total}" if last is not None else "-", latency_ms=latency,
        )  # fmt: skip


def skipped_outcome(model: DeployableModel, device: Announcement, role: Role, reason: str) -> DeviceOutcome:
    """The outcome of a device of a wave that got no manifest (``reason``): it keeps its model."""
    return DeviceOutcome(
        device=device.device, profile=device.profile, role=role, model=model.label, manifest_version=None,
        audience="-", delivered=False, verified=False, loaded=False, active=False, state="skipped",
        status=f"not deployed: {reason}", detail="", running=_model_text(device.model), chunks="-",
    )  # fmt: skip


class DeploymentSession:
    """One server connection pair for a deployment: the publisher (manifests, chunks) and the watcher.

    Args:
        address: Broker.
        topics: The fleet's topics.
        signer: Signs every manifest.
        mqtt_settings: MQTT credentials and TLS.
        chunk_size: Bytes per chunk (256..4096; capped by what each device announces).
    """

    def __init__(
        self,
        address: BrokerAddress,
        topics: FleetTopics,
        signer: ManifestSigner,
        *,
        mqtt_settings: MqttSettings | None = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
    ) -> None:
        self.address = address
        self.topics = topics
        self.signer = signer
        self.chunk_size = chunk_size
        client_id = f"tinymlops-deploy-{topics.fleet}-{uuid.uuid4().hex[:8]}"
        self.publisher = ModelPublisher(address, topics, signer, client_id=client_id, settings=mqtt_settings)
        self.watcher = FleetWatcher(address, topics, settings=mqtt_settings)
        self.watcher.on_status.append(self._on_status)
        self._trackers: dict[str, _Tracker] = {}
        self._sent: dict[str, int] = {}

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    def start(self, settle_s: float = 0.3) -> Self:
        """Connect both clients; return once the retained announcements and statuses have arrived."""
        self.publisher.start()
        try:
            self.watcher.start(settle_s=settle_s)
        except BaseException:
            self.publisher.stop()
            raise
        return self

    def stop(self) -> None:
        """Disconnect both clients."""
        self.watcher.stop()
        self.publisher.stop()

    def announcements(self) -> list[Announcement]:
        """The devices' announcements (retained and live), sorted by device id."""
        return [self.watcher.announcements[d] for d in sorted(self.watcher.announcements)]

    def _on_status(self, device: str, status: DeviceStatus) -> None:
        tracker = self._trackers.get(device)
        if tracker is not None:
            with self.watcher.changed:
                tracker.update(status, time.monotonic())

    def highest_version(self, device: str) -> int:
        """The highest manifest version the device announced, reported or was sent in this session (0: none)."""
        seen = [self._sent.get(device, 0)]
        announced = self.watcher.announcements.get(device)
        if announced is not None and announced.model is not None:
            seen.append(announced.model.version)
        status = self.watcher.statuses.get(device)
        if status is not None:
            seen += [status.version or 0, status.active.version if status.active else 0]
        return max(seen)

    def rejected(self) -> dict[str, str]:
        """Devices whose announcement was rejected, with the reason."""
        return dict(self.watcher.rejected)

    def deploy(
        self,
        model: DeployableModel,
        devices: Sequence[Announcement],
        *,
        role: Role = "fleet",
        group: str | None = None,
        timeout_s: float = 60.0,
    ) -> list[DeviceOutcome]:
        """Publish signed manifests, wait for every device's final status, return one outcome per device.

        Each device gets its own version, ``max(UNIX time, its highest version + 1)``, so no device's
        history (or hostile announcement) raises another's; a device for which that does not fit u32
        gets a ``skipped`` outcome, the others are deployed. With ``group``, the members whose version
        is the UNIX time share one group manifest; a member already past it gets its own manifest
        (it takes the newer of the two; the group one is not newer for it).

        Args:
            model: What to deploy.
            devices: The targets (from :func:`select_targets`).
            role: Recorded in the outcomes.
            group: Publish one manifest to this group instead of one per device; only when every
                announced member of the group it is newer for is among ``devices``.
            timeout_s: How long to wait for the devices' final statuses.

        Raises:
            DeployError: The group has announced members outside ``devices`` that would take its manifest.
        """
        if not devices:
            return []
        ids = [a.device for a in devices]
        now = int(time.time())
        members = {d for d, a in self.watcher.announcements.items()
                   if group is not None and a.group == group and self.highest_version(d) < now}  # fmt: skip
        if not members <= set(ids):
            outside = ", ".join(sorted(members - set(ids)))
            raise DeployError(f"group {group!r} has members outside the targets: {outside}")
        highest = {d: self.highest_version(d) for d in ids}
        blocked = {d: reason for d in ids if (reason := version_limit_reason(highest[d])) is not None}
        for device, reason in blocked.items():
            log.warning("not deploying to %s: %s", device, reason)
        versions = {d: max(now, highest[d] + 1) for d in ids if d not in blocked}
        self._sent.update(versions)
        chunk_size = min([self.chunk_size, *(a.max_chunk for a in devices)])
        audiences = {d: device_audience(d) for d in versions}
        if group is not None:
            audiences.update({d: group_audience(group) for d, version in versions.items() if version == now})
        on_group = [d for d in versions if audiences[d] != device_audience(d)]
        with self.watcher.changed:
            self._trackers = {
                a.device: _Tracker(a, role, versions[a.device], audiences[a.device])
                for a in devices
                if a.device in versions
            }

        references = model.references

        def publish(device: str | None, version: int) -> None:
            self.publisher.deploy(
                model.tflite, name=model.name, version=version, target=model.target, dsp_spec=model.dsp_spec,
                threshold=model.threshold, arena_bytes=model.arena_bytes, device=device,
                group=group if device is None else None, chunk_size=chunk_size, references=references,
            )  # fmt: skip

        log.info("deploying %s as manifest v%s to %d device(s)%s", model.label,
                 "/".join(map(str, sorted(set(versions.values())))) or "-", len(versions),
                 f" (group {group})" if group else "")  # fmt: skip
        if on_group:
            published = time.monotonic()
            for device in on_group:
                self._trackers[device].published = published
            publish(None, now)
        for device in (d for d in versions if d not in on_group):
            self._trackers[device].published = time.monotonic()
            publish(device, versions[device])
        deadline = time.monotonic() + timeout_s
        with self.watcher.changed:
            self.watcher.changed.wait_for(
                lambda: all(t.final is not None for t in self._trackers.values()), max(deadline - time.monotonic(), 0)
            )
            trackers, self._trackers = self._trackers, {}
        kept = self.watcher.ota_service is not None
        unfinished = sorted({t.audience for t in trackers.values() if t.final is None})
        for audience in [] if kept else unfinished:  # nobody would serve its chunks after this session
            self.publisher.withdraw(audience)
        if kept and unfinished:
            log.info("%d manifest(s) unanswered, left to the OTA service: %s", len(unfinished), ", ".join(unfinished))
        by_id = {a.device: a for a in devices}
        outcomes = [
            trackers[d].outcome(model, kept=kept)
            if d in trackers
            else skipped_outcome(model, by_id[d], role, blocked[d])
            for d in ids
        ]
        active = sum(o.active for o in outcomes)
        log.info("%s: %d of %d device(s) active", model.label, active, len(outcomes))
        return outcomes


# --- canary -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class CanaryVerdict:
    """Whether the canaries are healthy, with the figures behind it.

    Attributes:
        healthy: Every canary is active and their anomaly rate is not significantly above the limit.
        reason: The verdict in words.
        devices: The canaries.
        watch_s: How long their scores were watched.
        windows: Windows the canaries scored with the new model.
        anomalies: Of which anomalous.
        baseline_windows: Windows scored by the old model meanwhile (other devices, canaries before).
        baseline_anomalies: Of which anomalous.
        expected_rate: The bundle's expected false-alarm rate.
        limit: ``factor * max(expected_rate, baseline rate)``.
        lower_bound: 95 % one-sided lower bound of the canary anomaly rate; unhealthy when above ``limit``.
    """

    healthy: bool
    reason: str
    devices: tuple[str, ...]
    watch_s: float
    windows: int = 0
    anomalies: int = 0
    baseline_windows: int = 0
    baseline_anomalies: int = 0
    expected_rate: float | None = None
    limit: float | None = None
    lower_bound: float | None = None

    @property
    def rate(self) -> float | None:
        """Canary anomaly rate."""
        return self.anomalies / self.windows if self.windows else None

    @property
    def baseline_rate(self) -> float | None:
        """Old-model anomaly rate over the same period."""
        return self.baseline_anomalies / self.baseline_windows if self.baseline_windows else None

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict."""
        return {**asdict(self), "devices": list(self.devices), "rate": self.rate, "baseline_rate": self.baseline_rate}


def judge_canary(
    session: DeploymentSession,
    model: DeployableModel,
    canary: Sequence[DeviceOutcome],
    others: Sequence[Announcement],
    *,
    watch_s: float,
    factor: float,
    min_windows: int,
) -> CanaryVerdict:
    """Watch the canaries' scores for ``watch_s`` and decide whether the rest of the fleet gets the model.

    Unhealthy when a canary did not become active, when the canaries scored fewer than
    ``min_windows`` windows (no evidence of health), or when the 95 % lower bound of their anomaly
    rate exceeds ``factor * max(expected false-alarm rate, old model's rate meanwhile)``: the old
    model's rate on the other devices (and on the canaries before the deployment) stands for the
    machines' own state, so a fault in the plant does not roll a good model back.
    """
    devices = tuple(o.device for o in canary)
    failed = [o for o in canary if not o.active]
    if failed:
        listed = ", ".join(f"{o.device} {o.status}" for o in failed[:3])
        return CanaryVerdict(
            False, f"unhealthy: {len(failed)} of {len(canary)} canaries not active: {listed}", devices, 0.0
        )
    time.sleep(watch_s)
    watcher = session.watcher
    # each canary's new model has its own manifest version
    fresh = [watcher.anomaly_counts([o.device], version=o.manifest_version) for o in canary]
    before = [watcher.anomaly_counts([o.device], exclude_version=o.manifest_version) for o in canary]
    before.append(watcher.anomaly_counts(a.device for a in others))
    windows, anomalies = sum(w for w, _ in fresh), sum(a for _, a in fresh)
    base_windows, base_anomalies = sum(w for w, _ in before), sum(a for _, a in before)
    expected = model.expected_anomaly_rate
    verdict = CanaryVerdict(False, "", devices, watch_s, windows, anomalies, base_windows, base_anomalies, expected)
    rates = [r for r in (expected, verdict.baseline_rate) if r is not None]
    if windows < min_windows:
        return replace(
            verdict, reason=f"unhealthy: too few canary windows to judge: {windows} < {min_windows} in {watch_s:g} s"
        )
    if not rates:
        return replace(verdict, reason="unhealthy: no expected or pre-deployment anomaly rate to compare with")
    limit = factor * max(rates)
    bound = rate_lower_bound(anomalies, windows, CANARY_CONFIDENCE)
    healthy = bound <= limit
    old = f"{verdict.baseline_rate:.2%}" if verdict.baseline_rate is not None else "n/a"
    reason = (
        f"{'healthy' if healthy else 'unhealthy'}: canary anomaly rate {anomalies / windows:.2%} "
        f"({anomalies}/{windows}, 95% lower bound {bound:.2%}) vs limit {limit:.2%} = {factor:g} x max(expected "
        f"{'n/a' if expected is None else f'{expected:.2%}'}, old model {old})"
    )
    return replace(verdict, healthy=healthy, reason=reason, limit=limit, lower_bound=bound)


# --- rollback -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RollbackResult:
    """What an automatic rollback did."""

    outcomes: list[DeviceOutcome]
    registry: str | None
    notes: list[str]


def find_registered_by_sha(name: str, sha256: str) -> str | None:
    """The version of registered model ``name`` whose ``.tflite`` has this sha256 (the newest), or None."""
    from mlflow.exceptions import MlflowException

    client = mlflow_client()
    try:
        versions = client.search_model_versions(f"name='{name}'", max_results=1000)
    except MlflowException as exc:
        log.warning("cannot search versions of %s: %s", name, first_line(exc))
        return None
    matches = [int(v.version) for v in versions if (v.tags or {}).get(TAG_SHA256) == sha256]
    return str(max(matches)) if matches else None


def rollback_registry(model: DeployableModel, reason: str) -> str | None:
    """Move the champion back to ``previous`` when the failed model is the champion; what was done, in words."""
    if model.registry_version is None:
        return None
    try:
        champion = aliases_of(model.name).get(CHAMPION)
        if champion != model.registry_version:
            return f"registry unchanged: {model.label} is not the champion (champion: {champion or 'none'})"
        record = rollback(model.name, actor=DEPLOY_ACTOR, reason=reason)
    except PromotionError as exc:
        return f"registry not rolled back: {exc}"
    return f"registry rolled back: {model.name} champion {record.from_version} -> {record.version}"


def rollback_canaries(
    session: DeploymentSession,
    failed: DeployableModel,
    canary: Sequence[Announcement],
    *,
    reason: str,
    timeout_s: float,
) -> RollbackResult:
    """Put the canaries back on the previous model (a new, higher manifest version); roll the registry back.

    The model restored is the registry's: ``@previous`` when the failed model is the champion
    (the registry's champion moves back to it), else the current ``@champion``; without either,
    the registered version whose sha256 a canary announced before the deployment. Looked up
    before the registry rollback moves the aliases, resolved and verified like any deployment.
    """
    restore = restore_model(failed, canary)
    registry = rollback_registry(failed, reason)
    if restore is None:
        note = f"no previous model of {failed.name} in the registry: the canaries keep {failed.label}"
        return RollbackResult([], registry, [note])
    outcomes = session.deploy(restore, canary, role="rollback", timeout_s=timeout_s)
    return RollbackResult(outcomes, registry, [f"canaries restored to {restore.label}"])


def restore_model(failed: DeployableModel, canary: Sequence[Announcement]) -> DeployableModel | None:
    """The model the canaries go back to (see :func:`rollback_canaries`), or None when there is none."""
    try:
        aliases = aliases_of(failed.name)
    except TinyMLOpsError:
        aliases = {}
    alias = PREVIOUS if aliases.get(CHAMPION) == failed.registry_version else CHAMPION
    version = aliases.get(alias)
    ref = f"{failed.name}/{version}" if version is not None and version != failed.registry_version else None
    if ref is None:
        for before in (a.model for a in canary if a.model is not None and a.model.sha256 != failed.sha256):
            found = find_registered_by_sha(before.name, before.sha256)
            if found:
                ref = f"{before.name}/{found}"
                break
    return resolve_deployable(ref, require_gates=False) if ref else None


# --- the report -----------------------------------------------------------------------------------


def _percentile(values: Sequence[float], q: float) -> float | None:
    return float(np.percentile(values, q)) if values else None


@dataclass
class DeploymentReport:
    """The outcome of one deployment: per device, the canary verdict, the rollback, the latencies."""

    model_ref: str
    model: str
    registry_version: str | None
    sha256: str
    target: str
    fleet: str
    broker: str
    canary_fraction: float
    outcomes: list[DeviceOutcome]
    skipped: list[SkippedDevice]
    canary: CanaryVerdict | None = None
    rolled_back: bool = False
    registry_rollback: str | None = None
    notes: list[str] = field(default_factory=list)
    started_at: str = ""
    duration_s: float = 0.0

    def final(self) -> dict[str, DeviceOutcome]:
        """The last outcome of each device (a rolled-back canary: its rollback)."""
        return {o.device: o for o in self.outcomes}

    @property
    def outcome(self) -> str:
        """``deployed`` (every target active), ``rolled back``, ``partial`` or ``failed``."""
        if self.rolled_back:
            return "rolled back"
        final = self.final().values()
        active = sum(o.active for o in final)
        return "deployed" if active == len(final) else "partial" if active else "failed"

    def counts(self) -> dict[str, int]:
        """Devices per final state, with the selected, skipped (at selection or in a wave) and rolled-back totals."""
        final = list(self.final().values())
        counts = {"selected": len(final), "skipped": len(self.skipped) + sum(o.state == "skipped" for o in final),
                  "active": sum(o.active and o.role != "rollback" for o in final),
                  "rolled_back": sum(o.role == "rollback" and o.active for o in final)}  # fmt: skip
        for state in ("failed", "ignored", "cancelled", "timeout", "not delivered", "held"):
            counts[state.replace(" ", "_")] = sum(o.state == state for o in final)
        return counts

    def latency_summary(self) -> dict[str, float]:
        """p50/p95 of the deployment latency and p50 of the device-reported stages (new model, active devices)."""
        rows = [o.latency_ms for o in self.outcomes if o.active and o.role in ("canary", "fleet")]
        summary: dict[str, float] = {}
        for key, quantiles in {"deploy": (50, 95), "device_deploy": (50, 95), "download": (50,), "load": (50,),
                               "inference": (50,)}.items():  # fmt: skip
            values = [r[key] for r in rows if key in r]
            for q in quantiles:
                value = _percentile(values, q)
                if value is not None:
                    summary[f"{key}_ms_p{q}"] = round(value, 3)
        return summary

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable dict."""
        return {
            "outcome": self.outcome, "model_ref": self.model_ref, "model": self.model,
            "registry_version": self.registry_version, "sha256": self.sha256, "target": self.target,
            "fleet": self.fleet, "broker": self.broker, "canary_fraction": self.canary_fraction,
            "counts": self.counts(), "latency": self.latency_summary(),
            "canary": self.canary.to_dict() if self.canary else None, "rolled_back": self.rolled_back,
            "registry_rollback": self.registry_rollback, "notes": list(self.notes),
            "devices": [o.to_dict() for o in self.outcomes], "skipped": [asdict(s) for s in self.skipped],
            "started_at": self.started_at, "duration_s": round(self.duration_s, 3),
        }  # fmt: skip

    def to_markdown(self) -> str:
        """The report as markdown: summary, canary verdict, a table per device, the skipped devices."""

        def ms(o: DeviceOutcome, key: str) -> str:
            return f"{o.latency_ms[key]:.1f}" if key in o.latency_ms else "-"

        def mark(flag: bool) -> str:
            return "yes" if flag else "no"

        counts = self.counts()
        lines = [
            f"# Deployment of {self.model}/{self.registry_version or '-'} to fleet {self.fleet}: {self.outcome}",
            "",
            f"- model: `{self.model_ref}` (sha256 `{self.sha256[:16]}…`, target {self.target})",
            f"- devices: {counts['selected']} selected, {counts['active']} active, {counts['failed']} failed, "
            f"{counts['not_delivered']} not delivered, {counts['timeout']} timed out, {counts['held']} held, "
            f"{counts['rolled_back']} rolled back, {counts['skipped']} skipped",
            f"- broker: {self.broker}; started {self.started_at}; {self.duration_s:.1f} s",
        ]
        lines += [f"- latency {k}: {v:.1f} ms" for k, v in self.latency_summary().items()]
        if self.canary is not None:
            lines.append(
                f"- canary ({self.canary_fraction:.0%}, {len(self.canary.devices)} devices): {self.canary.reason}"
            )
        if self.registry_rollback:
            lines.append(f"- {self.registry_rollback}")
        lines += [f"- {note}" for note in self.notes]
        lines += [
            "",
            "| device | role | manifest | delivered | verified | loaded | active | status | running now | chunks "
            "| deploy ms | load ms | inference ms |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for o in self.outcomes:
            version = f"v{o.manifest_version}" if o.manifest_version is not None else "-"
            status = o.status + (f" ({o.detail})" if o.detail and not o.active else "")
            lines.append(
                f"| {o.device} | {o.role} | {o.model} {version} | {mark(o.delivered)} | {mark(o.verified)} | "
                f"{mark(o.loaded)} | {mark(o.active)} | {status.replace('|', '/')} | {o.running} | {o.chunks} | "
                f"{ms(o, 'deploy')} | {ms(o, 'load')} | {ms(o, 'inference')} |"
            )
        if self.skipped:
            lines += ["", "| skipped device | profile | reason |", "|---|---|---|"]
            lines += [f"| {s.device} | {s.profile or '-'} | {s.reason} |" for s in self.skipped]
        return "\n".join(lines) + "\n"


def held_outcomes(model: DeployableModel, devices: Sequence[Announcement], reason: str) -> list[DeviceOutcome]:
    """Outcomes of the devices that were not deployed to (the canary was unhealthy): they keep their model."""
    outcomes = []
    for a in devices:
        held = DeviceOutcome(
            device=a.device, profile=a.profile, role="held", model=model.label, manifest_version=None, audience="-",
            delivered=False, verified=False, loaded=False, active=False, state="held",
            status=f"not deployed: {reason}", detail="", running=_model_text(a.model), chunks="-",
        )  # fmt: skip
        outcomes.append(held)
    return outcomes


def log_deployment(report: DeploymentReport, *, flow_run_id: str | None, settings: Settings | None = None) -> str:
    """Log the deployment to MLflow (experiment ``tinymlops-deployments``); return the run id.

    Params: model, version, fleet, canary; metrics: device counts, latency p50/p95, canary rates;
    artifacts: the report as markdown and JSON; tag ``prefect.flow_run_id``
    (:func:`registry.tracking.log_deployment_run`).
    """
    experiment_id = configure_experiment(DEPLOY_EXPERIMENT, settings, description=DEPLOY_DESCRIPTION)
    params = {"model": report.model, "model_ref": report.model_ref, "version": report.registry_version or "",
              "fleet": report.fleet, "target": report.target, "canary_fraction": report.canary_fraction,
              "broker": report.broker}  # fmt: skip
    metrics: dict[str, float] = {f"devices_{k}": float(v) for k, v in report.counts().items()}
    metrics.update({k: float(v) for k, v in report.latency_summary().items()})
    metrics.update(rolled_back=float(report.rolled_back), duration_s=report.duration_s)
    if report.canary is not None:
        for key in ("rate", "baseline_rate", "limit", "lower_bound"):
            value = getattr(report.canary, key)
            if value is not None:
                metrics[f"canary_{key}"] = float(value)
        metrics["canary_healthy"] = float(report.canary.healthy)
    run_id = log_deployment_run(
        experiment_id,
        run_name=f"deploy-{report.model}-{report.fleet}",
        tags={"outcome": report.outcome, "model_sha256": report.sha256, "target": report.target},
        params=params,
        metrics=metrics,
        markdown=report.to_markdown(),
        report=report.to_dict(),
        flow_run_id=flow_run_id,
    )
    log.info("deployment logged to MLflow run %s", run_id)
    return run_id


# --- Prefect tasks -----------------------------------------------------------------------------


@task(name="resolve-model", task_run_name="resolve-{ref}", cache_policy=NO_CACHE)
def resolve_deployable_task(ref: str) -> DeployableModel:
    """Prefect task: :func:`resolve_deployable`."""
    return resolve_deployable(ref)


@task(name="select-targets", cache_policy=NO_CACHE)
def select_targets_task(
    session: DeploymentSession, model: DeployableModel, devices: list[str] | None, group: str | None
) -> TargetSelection:
    """Prefect task: :func:`select_targets` on the session's announcements and rejections, with its signing key."""
    return select_targets(session.announcements(), model.target, devices, group, session.signer.key_id,
                          session.rejected())  # fmt: skip


@task(name="deploy-wave", task_run_name="deploy-{role}", cache_policy=NO_CACHE)
def deploy_wave_task(
    session: DeploymentSession,
    model: DeployableModel,
    devices: list[Announcement],
    role: Role,
    group: str | None,
    timeout_s: float,
) -> list[DeviceOutcome]:
    """Prefect task: :meth:`DeploymentSession.deploy`."""
    return session.deploy(model, devices, role=role, group=group, timeout_s=timeout_s)


@task(name="judge-canary", cache_policy=NO_CACHE)
def judge_canary_task(
    session: DeploymentSession,
    model: DeployableModel,
    canary: list[DeviceOutcome],
    others: list[Announcement],
    watch_s: float,
    drift: DriftSettings,
) -> CanaryVerdict:
    """Prefect task: :func:`judge_canary` with the drift settings' anomaly-rate factor and minimum windows."""
    verdict = judge_canary(session, model, canary, others, watch_s=watch_s, factor=drift.anomaly_rate_factor,
                           min_windows=drift.min_windows)  # fmt: skip
    (log.info if verdict.healthy else log.warning)("canary: %s", verdict.reason)
    return verdict


@task(name="rollback-canaries", cache_policy=NO_CACHE)
def rollback_canaries_task(
    session: DeploymentSession, model: DeployableModel, canary: list[Announcement], reason: str, timeout_s: float
) -> RollbackResult:
    """Prefect task: :func:`rollback_canaries`."""
    return rollback_canaries(session, model, canary, reason=reason, timeout_s=timeout_s)


@task(name="log-deployment", retries=2, retry_delay_seconds=3, cache_policy=NO_CACHE)
def log_deployment_task(report: DeploymentReport, flow_run_id: str | None) -> str:
    """Prefect task: :func:`log_deployment`."""
    return log_deployment(report, flow_run_id=flow_run_id)


def load_signer(keys_dir: Path) -> ManifestSigner:
    """The signing key of the key store in ``keys_dir`` (the ``keys_dir`` setting, resolved)."""
    return KeyStore(keys_dir).signer()


def report_started_at() -> str:
    """Now, as the report's start stamp (UTC, seconds)."""
    return dt.datetime.now(tz=dt.UTC).isoformat(timespec="seconds")


def as_fraction(value: float | str) -> float:
    """Parse a canary fraction: ``0.1``, ``10%``.

    Raises:
        DeployError: Not a number in 0..1 (or 0..100 %).
    """
    text = str(value).strip()
    try:
        fraction = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise DeployError(f"invalid canary fraction {value!r}: expected e.g. 0.1 or 10%") from None
    if not 0.0 <= fraction <= 1.0:
        raise DeployError(f"canary fraction {value!r} is outside 0..1 (0..100%)")
    return fraction
