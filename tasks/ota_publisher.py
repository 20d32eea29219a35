"""The server side of OTA delivery over MQTT: retained manifests, and chunks on request.

The messages and the device's receiver are in :mod:`firmware.ota` (protocol:
``firmware/OTA_PROTOCOL.md``); this module is the server's publisher that
:class:`tasks.deploy.DeploymentSession` and the fleet's OTA service deliver through.
"""

from __future__ import annotations

import logging
import threading
from collections import Counter, deque
from typing import Any, Self

import paho.mqtt.client as mqtt

from firmware.ota import (
    DEFAULT_CHUNK_SIZE,
    Manifest,
    OtaDecodeError,
    OtaError,
    ReferenceSet,
    build_manifest,
    decode_request,
    device_audience,
    group_audience,
    split_model,
)
from firmware.signing import ManifestSigner
from tinymlops.contracts.dsp import DspSpec
from tinymlops.contracts.topics import FleetTopics
from tinymlops.mqtt import BrokerAddress, connect, make_client
from tinymlops.settings import MqttSettings

log = logging.getLogger(__name__)


class ModelPublisher:
    """Serve models to devices: retained manifests, and chunks on request (stateless per request).

    Owns one MQTT connection; on every (re)connect it re-subscribes to the fleet's chunk requests
    and re-publishes the manifests it published (a restarted broker without persistence has lost
    them). Subclasses may override :meth:`chunk_payloads` to shape what goes out.

    Attributes:
        served: Chunks served per device.
        log: The latest (device, chunk index) requests served, oldest first.

    Args:
        address: Broker.
        topics: The fleet's topics.
        signer: Signs manifests built by :meth:`deploy`.
        client_id: MQTT client id.
        settings: MQTT credentials and TLS.
    """

    def __init__(
        self,
        address: BrokerAddress,
        topics: FleetTopics,
        signer: ManifestSigner,
        *,
        client_id: str = "",
        settings: MqttSettings | None = None,
    ) -> None:
        self.address = address
        self.topics = topics
        self.signer = signer
        self._client = make_client(address, client_id or f"tinymlops-ota-{topics.fleet}", settings=settings)
        self._client.reconnect_delay_set(1, 4)  # a restarted broker is found again within seconds
        self._models: dict[tuple[int, bytes], list[bytes]] = {}
        self._retained: dict[str, bytes] = {}
        self._lock = threading.Lock()
        self.served: Counter[str] = Counter()
        self.log: deque[tuple[str, int]] = deque(maxlen=100_000)

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    def start(self) -> Self:
        """Connect, subscribe to chunk requests and keep serving from the network thread."""
        self._client.message_callback_add(self.topics.all_devices("request"), self._on_request)
        connect(self._client, self.address)
        self._on_connect()
        self._client.on_connect = lambda _c, _u, _f, reason, _p: None if reason.is_failure else self._on_connect()
        return self

    def stop(self) -> None:
        """Disconnect."""
        self._client.disconnect()
        self._client.loop_stop()

    def _on_connect(self) -> None:
        self._client.subscribe(self.topics.all_devices("request"), qos=1)
        with self._lock:
            retained = list(self._retained.items())
        for topic, payload in retained:
            self._client.publish(topic, payload, qos=1, retain=True)

    def add_model(self, manifest: Manifest, model: bytes) -> None:
        """Make ``model`` servable for chunk requests of ``manifest``."""
        chunks = [c.encode() for c in split_model(model, manifest)]
        with self._lock:
            self._models[(manifest.model_version, manifest.tag)] = chunks

    def publish_manifest(self, manifest: Manifest, model: bytes) -> None:
        """Serve ``model`` and publish its manifest (retained) to the manifest's audience; wait until sent."""
        self.add_model(manifest, model)
        topic, payload = self.topics.audience_topic(manifest.audience), manifest.encode()
        with self._lock:
            self._retained[topic] = payload
        self._client.publish(topic, payload, qos=1, retain=True).wait_for_publish(10)

    def deploy(
        self,
        model: bytes,
        *,
        name: str,
        version: int,
        target: str,
        dsp_spec: DspSpec,
        threshold: float,
        arena_bytes: int,
        device: str | None = None,
        group: str | None = None,
        chunk_size: int = DEFAULT_CHUNK_SIZE,
        references: ReferenceSet | None = None,
    ) -> Manifest:
        """Build, sign and publish a manifest for one device or one group; return it.

        Raises:
            OtaError: Neither or both of ``device`` and ``group`` given, a field out of range, or
                the model's references cannot be computed (see :func:`build_manifest`).
        """
        if (device is None) == (group is None):
            raise OtaError("deploy to exactly one of device or group")
        audience = device_audience(device) if device is not None else group_audience(group or "")
        manifest = build_manifest(
            model, name=name, version=version, target=target, audience=audience, dsp_spec=dsp_spec,
            threshold=threshold, arena_bytes=arena_bytes, signer=self.signer, chunk_size=chunk_size,
            references=references,
        )  # fmt: skip
        self.publish_manifest(manifest, model)
        return manifest

    def withdraw(self, audience: str) -> None:
        """Clear the retained manifest of an audience (an empty retained message); devices cancel its download."""
        topic = self.topics.audience_topic(audience)
        with self._lock:
            self._retained.pop(topic, None)
        self._client.publish(topic, b"", qos=1, retain=True).wait_for_publish(10)

    def chunk_payloads(self, device: str, index: int, encoded: bytes) -> list[bytes]:
        """Payloads to publish for one requested chunk (default: the chunk once); a hook for subclasses."""
        return [encoded]

    def _on_request(self, _client: mqtt.Client, _userdata: Any, message: mqtt.MQTTMessage) -> None:
        parsed = self.topics.parse(message.topic)
        if parsed is None:
            return
        device = parsed[0]
        try:
            request = decode_request(bytes(message.payload))
        except OtaDecodeError as exc:
            log.warning("bad chunk request from %s: %s", device, exc)
            return
        with self._lock:
            chunks = self._models.get((request.model_version, request.tag))
        if chunks is None:
            log.warning("%s requested unknown model v%d/%s", device, request.model_version, request.tag.hex())
            return
        topic = self.topics.chunk(device)
        for index in request.indices:
            if index >= len(chunks):
                continue
            self.served[device] += 1
            self.log.append((device, index))
            for payload in self.chunk_payloads(device, index, chunks[index]):
                self._client.publish(topic, payload, qos=1)
