"""The fleet's long-running OTA service: serve the deployed model to any device that asks, at any time.

A deployment session serves chunks only while it runs; a device offline during the whole deployment
(or restarted, or new in a group) gets the retained manifest later and asks for chunks nobody serves.
:class:`OtaService` is that nobody: it follows the fleet's retained manifests (device and group
topics) and the devices' announcements, and answers a chunk request only for the model the retained
manifest of that device (or of the group it announced) names now. The manifest is the source of
truth: a signed manifest that the key ring verifies, whose model bytes it fetches from the registry
by name and sha256 (and checks); a request for any other model, an older one included, is refused.

It survives broker restarts: on every reconnect it subscribes again and, once the broker's retained
messages have arrived, re-publishes the manifests the broker lost (a broker without persistence
loses them all). One per fleet: it publishes its presence retained on ``FleetTopics.ota_service``
(with an empty will, so the broker clears a crashed service's presence once its keepalive expires,
within 45 s) and refuses to start while another one's presence is there. Two that started at the
same instant both serve: harmless, devices take duplicate chunks.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import queue
import socket
import threading
import time
import uuid
from collections import Counter
from collections.abc import Callable
from typing import Any, Self

import paho.mqtt.client as mqtt

from firmware.ota import (
    Announcement,
    Manifest,
    OtaDecodeError,
    decode_manifest,
    decode_request,
    device_audience,
    group_audience,
    split_model,
)
from firmware.signing import KeyRing, UnknownKeyError
from tinymlops.contracts.topics import FleetTopics
from tinymlops.errors import TinyMLOpsError
from tinymlops.mqtt import BrokerAddress, connect, make_client, parse_broker_url
from tinymlops.settings import MqttSettings, Settings

log = logging.getLogger(__name__)

ModelSource = Callable[[str, str], bytes | None]
"""``(model name, sha256 hex) -> model bytes`` (None: not found)."""


class OtaServiceError(TinyMLOpsError):
    """The OTA service cannot start (another one serves the fleet, the broker is unreachable)."""


def registry_model_source(name: str, sha256: str) -> bytes | None:
    """The registered ``.tflite`` of model ``name`` with this sha256 (verified on download), or None."""
    from registry.errors import RegistryError
    from tasks.deploy import find_registered_by_sha, resolve_deployable

    version = find_registered_by_sha(name, sha256)
    if version is None:
        return None
    try:
        return resolve_deployable(f"{name}/{version}", require_gates=False).tflite
    except RegistryError as exc:
        log.warning("cannot fetch %s/%s: %s", name, version, exc)
        return None


def parse_presence(payload: bytes) -> dict[str, Any] | None:
    """An OTA service's retained presence (None: empty, or not a JSON object)."""
    try:
        presence = json.loads(payload) if payload else None
    except ValueError:
        return None
    return presence if isinstance(presence, dict) else None


class OtaService:
    """Serve the chunks of the currently deployed models of one fleet, from one MQTT connection.

    Attributes:
        served: Chunks served per device.
        refused: Chunk requests refused per device (not the model its retained manifest names).

    Args:
        address: Broker.
        topics: The fleet's topics.
        keyring: Verifies the retained manifests; one that does not verify is not served.
        reload_keyring: Reads the key ring again when a manifest names a key id it does not know
            (the signing key was rotated while the service ran); None: never.
        model_source: Fetches model bytes by name and sha256 (default: the registry).
        settings: MQTT credentials and TLS.
        settle_s: After a (re)connect, how long the broker's retained messages are awaited before
            the lost ones are re-published, and at start whether another service is present.
    """

    def __init__(
        self,
        address: BrokerAddress,
        topics: FleetTopics,
        keyring: KeyRing,
        *,
        model_source: ModelSource = registry_model_source,
        reload_keyring: Callable[[], KeyRing] | None = None,
        settings: MqttSettings | None = None,
        settle_s: float = 0.5,
    ) -> None:
        self.address = address
        self.topics = topics
        self.keyring = keyring
        self.reload_keyring = reload_keyring
        self.model_source = model_source
        self.settle_s = settle_s
        self.instance = uuid.uuid4().hex[:12]
        self.served: Counter[str] = Counter()
        self.refused: Counter[str] = Counter()
        self._client = make_client(address, f"tinymlops-ota-service-{topics.fleet}-{self.instance}", settings=settings)
        self._client.reconnect_delay_set(1, 4)  # a restarted broker is found again within seconds
        self._client.will_set(topics.ota_service(), b"", qos=1, retain=True)
        self._lock = threading.Lock()
        self._manifests: dict[str, tuple[Manifest, bytes]] = {}  # manifest topic -> (manifest, payload)
        self._seen_since_connect: set[str] = set()
        self._groups: dict[str, str | None] = {}
        self._models: dict[str, bytes] = {}  # sha256 hex -> model bytes
        # A chunk carries the manifest version: encoded per (sha256 hex, chunk size, version).
        self._chunks: dict[tuple[str, int, int], list[bytes]] = {}
        self._wanted: set[str] = set()
        self._fetches: queue.Queue[tuple[str, str] | None] = queue.Queue()
        self._other: dict[str, Any] | None = None
        self._serving = False
        self._connections = 0
        self._stopped = threading.Event()
        self._fetcher = threading.Thread(target=self._fetch_models, name="ota-service-fetch", daemon=True)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    @property
    def presence(self) -> dict[str, Any]:
        """What this service announces on the presence topic."""
        return {"v": 1, "instance": self.instance, "host": socket.gethostname(), "pid": os.getpid(), "ts": time.time()}

    def start(self) -> Self:
        """Connect, refuse when another service serves the fleet, then serve from the network thread.

        Raises:
            OtaServiceError: Another OTA service's presence is retained for this fleet.
        """
        self._client.on_message = self._on_message
        self._client.on_connect = lambda _c, _u, _f, reason, _p: None if reason.is_failure else self._on_connect()
        connect(self._client, self.address)
        self._fetcher.start()
        self._on_connect()
        deadline = time.monotonic() + self.settle_s
        while self._other is None and time.monotonic() < deadline:
            time.sleep(0.02)
        if self._other is not None:
            other = self._other
            self.stop(clear_presence=False)
            raise OtaServiceError(
                f"an OTA service already serves fleet {self.topics.fleet}: instance {other.get('instance')} "
                f"on {other.get('host')} pid {other.get('pid')}; stop it first"
            )
        self._client.publish(self.topics.ota_service(), json.dumps(self.presence).encode(), qos=1, retain=True)
        self._serving = True
        log.info("OTA service %s serving fleet %s on %s", self.instance, self.topics.fleet, self.address.url)
        return self

    def stop(self, *, clear_presence: bool = True) -> None:
        """Clear the presence (unless another service holds it) and disconnect."""
        self._stopped.set()
        self._fetches.put(None)
        if clear_presence and self._client.is_connected():
            self._client.publish(self.topics.ota_service(), b"", qos=1, retain=True).wait_for_publish(5)
        self._client.disconnect()
        self._client.loop_stop()

    def wait_stopped(self, timeout_s: float | None = None) -> bool:
        """Block until :meth:`stop` (for a foreground service)."""
        return self._stopped.wait(timeout_s)

    # --- connection --------------------------------------------------------------------------

    def _on_connect(self) -> None:
        with self._lock:
            self._connections += 1
            self._seen_since_connect.clear()
            reconnect = self._connections > 1
        t = self.topics
        kinds = [t.ota_service(), t.all_devices("manifest"), t.all_group_manifests(), t.all_devices("announce")]
        self._client.subscribe([*((topic, 1) for topic in kinds), (t.all_devices("request"), 1)])
        if reconnect:
            log.info("OTA service reconnected to %s: re-publishing its presence", self.address.url)
            self._client.publish(t.ota_service(), json.dumps(self.presence).encode(), qos=1, retain=True)
            threading.Timer(self.settle_s, self._republish_lost).start()

    def _republish_lost(self) -> None:
        """Re-publish the manifests the broker did not deliver again after a reconnect (it lost them)."""
        with self._lock:
            lost = [(topic, payload) for topic, (_, payload) in self._manifests.items()
                    if topic not in self._seen_since_connect]  # fmt: skip
        for topic, payload in lost:
            log.info("the broker lost the retained manifest on %s: re-publishing it", topic)
            self._client.publish(topic, payload, qos=1, retain=True)

    # --- messages ----------------------------------------------------------------------------

    def _on_message(self, _client: mqtt.Client, _userdata: Any, message: mqtt.MQTTMessage) -> None:
        try:
            self._handle(message.topic, bytes(message.payload))
        except Exception:  # an exception here would end paho's network thread, and the service with it
            log.exception("OTA service: handling a message on %s failed", message.topic)

    def _handle(self, topic: str, payload: bytes) -> None:
        if topic == self.topics.ota_service():
            self._on_presence(payload)
            return
        if self.topics.is_manifest(topic):
            self._on_manifest(topic, payload)
            return
        parsed = self.topics.parse(topic)
        if parsed is None:
            return
        device, kind = parsed
        if kind == "announce":
            try:
                self._groups[device] = Announcement.decode_from(device, payload).group if payload else None
            except OtaDecodeError as exc:
                log.warning("ignoring the announcement of %s: %s", device, exc)
                self._groups.pop(device, None)
        elif kind == "request":
            self._on_request(device, payload)

    def _on_presence(self, payload: bytes) -> None:
        presence = parse_presence(payload)
        if presence is not None and presence.get("instance") != self.instance:
            if self._serving:
                log.warning("another OTA service (%s) announced itself for fleet %s; both serve the same manifests",
                            presence.get("instance"), self.topics.fleet)  # fmt: skip
            self._other = presence

    def _on_manifest(self, topic: str, payload: bytes) -> None:
        """Follow a retained manifest: serve what it names from now on; empty or invalid: serve nothing there."""
        with self._lock:
            self._seen_since_connect.add(topic)
        if not payload:
            with self._lock:
                self._manifests.pop(topic, None)
            return
        try:
            manifest = decode_manifest(payload)
            self._verify(manifest)
            problem = (
                None if self.topics.audience_topic(manifest.audience) == topic else f"it is for {manifest.audience}"
            )
        except TinyMLOpsError as exc:  # undecodable, unsigned, unknown key (also after a reload), revoked
            problem = str(exc)
        if problem is not None:
            log.warning("not serving the manifest on %s: %s", topic, problem)
            with self._lock:
                self._manifests.pop(topic, None)
            return
        with self._lock:
            self._manifests[topic] = (manifest, payload)
            fetch = manifest.sha256_hex not in self._models and manifest.sha256_hex not in self._wanted
            if fetch:
                self._wanted.add(manifest.sha256_hex)
        if fetch:
            self._fetches.put((manifest.model_name, manifest.sha256_hex))

    def _verify(self, manifest: Manifest) -> None:
        """Check the signature; an unknown key id reads the key ring again once (a rotation)."""
        try:
            self.keyring.verify(manifest.key_id, manifest.signed_bytes(), manifest.signature)
        except UnknownKeyError:
            if self.reload_keyring is None:
                raise
            self.keyring = self.reload_keyring()
            self.keyring.verify(manifest.key_id, manifest.signed_bytes(), manifest.signature)

    def _fetch_models(self) -> None:
        """Fetch the model bytes of new manifests, off the network thread (the registry may be slow)."""
        while (item := self._fetches.get()) is not None:
            name, sha = item
            try:
                model = self.model_source(name, sha)
            except Exception:  # a registry outage must not end the service; the next manifest retries
                log.exception("fetching %s (sha256 %s…) failed", name, sha[:12])
                model = None
            with self._lock:
                self._wanted.discard(sha)
                if model is not None and hashlib.sha256(model).hexdigest() == sha:
                    self._models[sha] = model
                    log.info("serving %s (sha256 %s…, %d bytes)", name, sha[:12], len(model))
                else:
                    log.warning("model %s with sha256 %s… not found: its manifest is not served", name, sha[:12])

    def current_manifests(self, device: str) -> list[Manifest]:
        """The manifests retained now for ``device``: its own and its announced group's."""
        topics = [self.topics.manifest(device)]
        group = self._groups.get(device)
        if group:
            topics.append(self.topics.group_manifest(group))
        with self._lock:
            return [self._manifests[t][0] for t in topics if t in self._manifests]

    def _on_request(self, device: str, payload: bytes) -> None:
        try:
            request = decode_request(payload)
        except OtaDecodeError as exc:
            log.warning("bad chunk request from %s: %s", device, exc)
            return
        audiences = {device_audience(device)} | ({group_audience(g)} if (g := self._groups.get(device)) else set())
        manifest = next((m for m in self.current_manifests(device) if m.audience in audiences
                         and (m.model_version, m.tag) == (request.model_version, request.tag)), None)  # fmt: skip
        if manifest is None:
            self.refused[device] += 1
            log.info("%s asked for v%d/%s, not what its retained manifest names: refused", device,
                     request.model_version, request.tag.hex())  # fmt: skip
            return
        chunks = self._chunks_of(manifest)
        if chunks is None:
            return  # still fetching the model: the device asks again
        topic = self.topics.chunk(device)
        for index in request.indices:
            if index < len(chunks):
                self.served[device] += 1
                self._client.publish(topic, chunks[index], qos=1)

    def _chunks_of(self, manifest: Manifest) -> list[bytes] | None:
        key = (manifest.sha256_hex, manifest.chunk_size, manifest.model_version)
        with self._lock:
            chunks = self._chunks.get(key)
            model = self._models.get(manifest.sha256_hex)
        if chunks is not None or model is None:
            return chunks
        encoded = [c.encode() for c in split_model(model, manifest)]
        with self._lock:
            self._chunks[key] = encoded
        return encoded


def start_ota_service(settings: Settings, address: BrokerAddress | None = None) -> OtaService:
    """Start the OTA service of a fleet from the settings: the key ring of the key store, the registry's models.

    Args:
        settings: Fleet, broker, MQTT credentials, key store, as the caller resolved them.
        address: Broker (default: ``settings.mqtt.url``).

    Raises:
        OtaServiceError: No broker configured, or another OTA service serves the fleet.
        KeyStoreError: No signing key ring to verify manifests with.
    """
    from tasks.deploy import KeyStore

    if address is None:
        if not settings.mqtt.url:
            raise OtaServiceError("the OTA service needs a broker: pass --broker or set TINYMLOPS_MQTT__URL")
        address = parse_broker_url(settings.mqtt.url)
    topics = FleetTopics(settings.fleet, settings.mqtt.topic_root)
    store = KeyStore(settings.resolved_keys_dir)
    return OtaService(address, topics, store.keyring(), reload_keyring=store.keyring, settings=settings.mqtt).start()
