"""Hundreds of simulated devices in one process, on a few shared MQTT connections.

Each device keeps its own identity, topics, staging slot, TFLite Micro interpreter and machine;
only the transport is shared: devices are split into :class:`~firmware.device.DeviceLink` groups
of ``devices_per_connection``, each one paho client and one driver thread. The machines are the
ones :class:`~firmware.fleet.VirtualFleet` builds for the same fleet, seed and device ids, so a
device scores the machine the sensor fleet of the same seed streams, and faults injected through
:attr:`DeviceFleet.sensors` show in the scores; speed changes made there (operating point, speed
drift) reach each device as its machine's tachometer value, at which every window is normalised.
Behind a broker whose ACL gives each MQTT user only its own topics, pass per-device ``credentials``
and one device per connection.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Self

from firmware.device import DeviceConfig, DeviceError, DeviceLink, DeviceRuntime, Score
from firmware.fleet import VirtualFleet
from firmware.ota import DeviceStatus, DriftSummary
from firmware.signing import KeyRing
from tinymlops.mqtt import BrokerAddress
from tinymlops.settings import MqttSettings
from tinymlops.targets import McuTarget

log = logging.getLogger(__name__)


class DeviceFleet:
    """Many :class:`DeviceRuntime` of one fleet and one MCU profile.

    Args:
        fleet: Fleet name.
        n_devices: Number of devices, ids ``<device_prefix>-<nnnn>``.
        profile: MCU profile of every device.
        keyring: Trusted signing keys (shared: the same firmware image).
        broker: Broker.
        group: Group of every device (None: no group).
        groups: Per-device group overrides, by device id.
        seed: Base seed of the machines (as :class:`~firmware.fleet.VirtualFleet`).
        devices_per_connection: Devices sharing one MQTT connection and driver thread.
        config: Device behaviour (``score_interval_s`` set: devices score in real time).
        device_prefix: Prefix of the device ids.
        sample_rate_hz: Sensor rate.
        window_samples: Samples per window.
        mqtt_settings: MQTT credentials and TLS shared by every connection.
        credentials: Per-device MQTT settings (user name and password of that device) for a broker
            whose ACL gives each user only its own topics; needs ``devices_per_connection=1``, since
            one connection acts as one user.
    """

    def __init__(
        self,
        fleet: str,
        n_devices: int,
        profile: McuTarget,
        keyring: KeyRing,
        broker: BrokerAddress,
        *,
        group: str | None = None,
        groups: Mapping[str, str] | None = None,
        seed: int = 0,
        devices_per_connection: int = 50,
        config: DeviceConfig | None = None,
        device_prefix: str = "node",
        sample_rate_hz: int = 25_600,
        window_samples: int = 1024,
        mqtt_settings: MqttSettings | None = None,
        credentials: Callable[[str], MqttSettings] | None = None,
    ) -> None:
        if n_devices < 1 or devices_per_connection < 1:
            raise DeviceError(f"need >= 1 device and >= 1 per connection, got {n_devices}/{devices_per_connection}")
        if credentials is not None and devices_per_connection != 1:
            raise DeviceError(
                f"per-device credentials need devices_per_connection=1, got {devices_per_connection}: "
                "one MQTT connection is one user"
            )
        self.fleet = fleet
        self.broker = broker
        self.config = config or DeviceConfig()
        self.devices_per_connection = devices_per_connection
        self.mqtt_settings = mqtt_settings
        self.credentials = credentials
        self.sensors = VirtualFleet(
            fleet, n_devices, seed=seed, sample_rate_hz=sample_rate_hz, window_samples=window_samples,
            topic_root=self.config.topic_root, device_prefix=device_prefix,
        )  # fmt: skip
        overrides = dict(groups or {})
        self.devices = [
            DeviceRuntime(
                node.device_id,
                fleet,
                profile,
                keyring,
                broker,
                group=overrides.get(node.device_id, group),
                simulator=node.simulator,
                config=self.config,
            )
            for node in self.sensors.nodes
        ]
        self._by_id = {d.device_id: d for d in self.devices}
        self._links: list[DeviceLink] = []

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    def __len__(self) -> int:
        return len(self.devices)

    def device(self, device_id: str) -> DeviceRuntime:
        """One device by id.

        Raises:
            DeviceError: No such device.
        """
        try:
            return self._by_id[device_id]
        except KeyError:
            raise DeviceError(f"no device {device_id!r} in fleet {self.fleet!r}") from None

    def start(self) -> Self:
        """Connect every link (devices announce themselves and pick up retained manifests)."""
        step = self.devices_per_connection
        for k in range(0, len(self.devices), step):
            devices = self.devices[k : k + step]
            client_id = f"tinymlops-devices-{self.fleet}-{k // step}"
            settings = self.credentials(devices[0].device_id) if self.credentials else self.mqtt_settings
            link = DeviceLink(self.broker, devices, client_id=client_id, settings=settings)
            link.start()
            self._links.append(link)
        log.info("fleet %s: %d devices on %d connections", self.fleet, len(self.devices), len(self._links))
        return self

    def stop(self) -> None:
        """Disconnect every link."""
        for link in self._links:
            link.stop()
        self._links.clear()

    @property
    def connections(self) -> int:
        """MQTT connections in use."""
        return len(self._links)

    def score_windows(self, n: int, device_ids: Iterable[str] | None = None) -> dict[str, list[Score]]:
        """Score ``n`` windows on each selected device (all if None), now, without real time."""
        chosen = self.devices if device_ids is None else [self.device(d) for d in device_ids]
        return {d.device_id: d.score_windows(n) for d in chosen}

    def publish_summaries(self) -> dict[str, DriftSummary | None]:
        """Publish every device's drift summary now."""
        return {d.device_id: d.publish_summary() for d in self.devices}

    def statuses(self) -> dict[str, DeviceStatus | None]:
        """The latest status of every device."""
        return {d.device_id: d.status for d in self.devices}

    def wait_for_all(
        self,
        predicate: Callable[[DeviceStatus], bool],
        timeout_s: float = 60.0,
        device_ids: Iterable[str] | None = None,
        after_seq: int = 0,
    ) -> dict[str, DeviceStatus]:
        """Wait until every selected device has a status (``seq > after_seq``) satisfying ``predicate``.

        Raises:
            DeviceError: Some did not within the timeout (the message counts and names a few).
        """
        chosen = self.devices if device_ids is None else [self.device(d) for d in device_ids]
        deadline = time.monotonic() + timeout_s
        found: dict[str, DeviceStatus] = {}
        for device in chosen:
            with contextlib.suppress(DeviceError):
                found[device.device_id] = device.wait_for(predicate, max(deadline - time.monotonic(), 0.0), after_seq)
        missing = [d.device_id for d in chosen if d.device_id not in found]
        if missing:
            raise DeviceError(
                f"{len(missing)} of {len(chosen)} devices did not reach the expected status in {timeout_s:.0f} s: "
                f"{', '.join(missing[:5])}{' …' if len(missing) > 5 else ''}"
            )
        return found

    def run(self, seconds: float | None = None, stop: threading.Event | None = None) -> None:
        """Keep the devices running for ``seconds`` or until ``stop`` is set (see ``config.score_interval_s``)."""
        stop = stop or threading.Event()
        stop.wait(seconds)
