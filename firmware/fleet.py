"""A virtual fleet: many simulated sensor nodes in one process, publishing windows over MQTT.

Each node owns a :class:`MachineSimulator` (its machine's physics) and a sequence counter that
starts at 0 in a new boot epoch on every start; the fleet shares one MQTT connection so hundreds of
nodes fit in one process.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import paho.mqtt.client as mqtt

from firmware.boot import next_boot_epoch
from firmware.codec import VibrationWindow, encode
from firmware.sensor import DriftSpec, FaultSpec, MachineSimulator, OperatingPoint, VibrationSource, quantize
from tinymlops.contracts.topics import FleetTopics
from tinymlops.mqtt import BrokerAddress, connect, make_client

log = logging.getLogger(__name__)


class SensorNode:
    """One simulated sensor: a machine, a boot epoch, a sequence counter within it, and a topic."""

    def __init__(
        self, device_id: str, simulator: VibrationSource, topic: str, full_scale_g: float = 16.0, epoch: int = 0
    ) -> None:
        self.device_id = device_id
        self.simulator = simulator
        self.topic = topic
        self.full_scale_g = full_scale_g
        self.epoch = epoch
        self.seq = 0

    def next_window(self, timestamp_us: int) -> VibrationWindow:
        """Simulate the next window, with its speed as the tachometer value, and advance the sequence number."""
        rpm = self.simulator.current_rpm  # the speed of the window about to be produced
        samples, scale = quantize(self.simulator.next_window(), self.full_scale_g)
        window = VibrationWindow(
            self.device_id, self.seq, timestamp_us, self.simulator.sample_rate_hz, scale, samples, self.epoch, rpm
        )
        self.seq += 1
        return window


@dataclass
class FleetStats:
    """What a fleet run published."""

    published: int = 0
    seconds: float = 0.0


class VirtualFleet:
    """Many sensor nodes of one fleet.

    Args:
        fleet: Fleet name (second topic level).
        n_devices: Number of nodes.
        seed: Base seed; node i uses seed + i, so runs are reproducible.
        sample_rate_hz: Sensor rate.
        window_samples: Samples per window.
        topic_root: First topic level.
        device_prefix: Device ids are ``<prefix>-<nnnn>``.
        rpm: Nominal shaft speed; each machine gets a small seeded offset.
        boot_epoch: Boot epoch of every node (default :func:`firmware.boot.next_boot_epoch`: a new
            one for every fleet started), so their seqs, restarting at 0, never repeat a key.
    """

    def __init__(
        self,
        fleet: str,
        n_devices: int,
        *,
        seed: int = 0,
        sample_rate_hz: int = 25_600,
        window_samples: int = 1024,
        topic_root: str = "tinymlops",
        device_prefix: str = "node",
        rpm: float = 1797.0,
        boot_epoch: int | None = None,
    ) -> None:
        self.fleet = fleet
        self.boot_epoch = next_boot_epoch(sender=f"fleet {fleet}") if boot_epoch is None else boot_epoch
        self.nodes: list[SensorNode] = []
        topics = FleetTopics(fleet, topic_root)
        for i in range(n_devices):
            device_id = f"{device_prefix}-{i:04d}"
            simulator = MachineSimulator(
                seed=seed + i,
                sample_rate_hz=sample_rate_hz,
                window_samples=window_samples,
                operating_point=OperatingPoint(rpm=rpm * (1 + 0.01 * ((i % 5) - 2)), load=0.5),
            )
            topic = topics.vibration(device_id)
            self.nodes.append(SensorNode(device_id, simulator, topic, epoch=self.boot_epoch))

    @property
    def device_ids(self) -> list[str]:
        """Ids of all nodes."""
        return [node.device_id for node in self.nodes]

    def _select(self, device_ids: Iterable[str] | None) -> list[SensorNode]:
        wanted = None if device_ids is None else set(device_ids)
        chosen = [n for n in self.nodes if wanted is None or n.device_id in wanted]
        if wanted is not None and len(chosen) != len(wanted):
            missing = sorted(wanted - {n.device_id for n in chosen})
            raise KeyError(f"unknown devices in fleet {self.fleet!r}: {', '.join(missing)}")
        return chosen

    def inject_fault(self, fault: FaultSpec, device_ids: Iterable[str] | None = None) -> None:
        """Give the selected machines (all if None) a fault."""
        for node in self._select(device_ids):
            node.simulator.inject_fault(fault)

    def add_drift(self, drift: DriftSpec, device_ids: Iterable[str] | None = None) -> None:
        """Make the selected machines drift (all if None)."""
        for node in self._select(device_ids):
            node.simulator.add_drift(drift)

    def set_operating_point(self, point: OperatingPoint, device_ids: Iterable[str] | None = None) -> None:
        """Change the selected machines' rpm and load."""
        for node in self._select(device_ids):
            node.simulator.set_operating_point(point)

    def publish_windows(
        self, client: mqtt.Client, windows_per_device: int, nodes: Sequence[SensorNode] | None = None
    ) -> int:
        """Publish a fixed number of windows per node as fast as possible (QoS 1) and wait until all are sent."""
        infos = []
        for _ in range(windows_per_device):
            now_us = time.time_ns() // 1000
            for node in nodes or self.nodes:
                infos.append(client.publish(node.topic, encode(node.next_window(now_us)), qos=1))
        for info in infos:
            info.wait_for_publish(timeout=60)
        return len(infos)

    def run(
        self,
        address: BrokerAddress,
        *,
        interval_s: float = 1.0,
        duration_s: float | None = None,
        windows_per_device: int | None = None,
        stop: threading.Event | None = None,
        client_id: str = "",
    ) -> FleetStats:
        """Publish windows until a bound is reached.

        Args:
            address: Broker.
            interval_s: Each node publishes one window per interval (real time); ignored when
                ``windows_per_device`` is given without ``duration_s``, which publishes as fast as possible.
            duration_s: Stop after this long.
            windows_per_device: Stop after this many windows per node.
            stop: Stop when set.
            client_id: MQTT client id of the fleet's shared connection.
        """
        client = make_client(address, client_id or f"tinymlops-fleet-{self.fleet}")
        connect(client, address)
        stats = FleetStats()
        start = time.monotonic()
        try:
            if windows_per_device is not None and duration_s is None:
                stats.published = self.publish_windows(client, windows_per_device)
            else:
                tick = 0
                while True:
                    if duration_s is not None and time.monotonic() - start >= duration_s:
                        break
                    if windows_per_device is not None and tick >= windows_per_device:
                        break
                    if stop is not None and stop.is_set():
                        break
                    stats.published += self.publish_windows(client, 1)
                    tick += 1
                    next_tick = start + tick * interval_s
                    pause = next_tick - time.monotonic()
                    if pause > 0:
                        (stop or threading.Event()).wait(pause)
        finally:
            stats.seconds = time.monotonic() - start
            client.disconnect()
            client.loop_stop()
        log.info("fleet %s published %d windows in %.1f s", self.fleet, stats.published, stats.seconds)
        return stats
