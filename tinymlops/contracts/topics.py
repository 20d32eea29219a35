"""Every MQTT topic of a fleet, named once.

Per-device topics are ``<root>/<fleet>/<device>/<suffix>``, group topics
``<root>/<fleet>/groups/<group>/<suffix>``, the OTA service's presence ``<root>/<fleet>/services/ota``.
The ingest, the OTA publisher and service, the devices, the benchmarks and the broker ACL all take
their topics from here, so a renamed topic cannot leave one of them behind.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from tinymlops.contracts.errors import TinyMLOpsError

NAME_PATTERN = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
"""A fleet, device or group name: one topic level, one lake partition, one MQTT user name."""

TopicKind = Literal["announce", "manifest", "request", "chunk", "status", "scores", "summary", "vibration"]
DEVICE_SUFFIXES: dict[TopicKind, str] = {
    "announce": "announce",  # device capabilities, retained JSON, device -> server
    "manifest": "ota/manifest",  # the device's desired model, retained binary manifest, server -> device
    "request": "ota/req",  # chunk requests, binary, device -> server
    "chunk": "ota/chunk",  # model chunks, binary, server -> device
    "status": "ota/status",  # deployment status, retained JSON, device -> server
    "scores": "scores",  # anomaly scores, JSON, device -> server
    "summary": "summary",  # periodic drift summaries, JSON, device -> server
    "vibration": "vibration",  # raw windows (firmware.codec), device -> ingest
}
DEVICE_PUBLISHES: tuple[TopicKind, ...] = ("vibration", "announce", "request", "status", "scores", "summary")
"""The per-device topics a device writes (the broker ACL grants exactly these)."""
DEVICE_READS: tuple[TopicKind, ...] = ("manifest", "chunk")
"""The per-device topics a device reads."""
GROUP_READS: tuple[TopicKind, ...] = ("manifest",)
"""The group topics a member of the group reads."""
GROUPS_LEVEL = "groups"
"""The third topic level of group topics; no device may be called so."""
OTA_SERVICE_SUFFIX = "services/ota"
"""Below ``<root>/<fleet>/``: the OTA service's presence, retained JSON (empty: none)."""
DEVICE_AUDIENCE = "device:"
"""A manifest's audience prefix for one device; its manifest goes to the device's manifest topic."""
GROUP_AUDIENCE = "group:"
"""A manifest's audience prefix for a group; its manifest goes to the group's manifest topic."""

_KIND_OF_SUFFIX: dict[str, TopicKind] = {suffix: kind for kind, suffix in DEVICE_SUFFIXES.items()}


class TopicError(TinyMLOpsError):
    """A name cannot be a topic level, or an audience names no topic."""


def check_name(name: str, what: str = "name") -> str:
    """Return ``name`` if it can be one topic level (1-64 of ``A-Z a-z 0-9 _ -``).

    Raises:
        TopicError: It cannot.
    """
    if not NAME_PATTERN.match(name):
        raise TopicError(f"invalid {what} {name!r}: expected 1-64 characters of A-Z a-z 0-9 _ -")
    return name


def check_root(root: str) -> str:
    """Return ``root`` if it can be the first topic level (no wildcards, not a ``$`` system topic).

    Raises:
        TopicError: It cannot.
    """
    if not root or any(c in root for c in "+#") or root.startswith("$"):
        raise TopicError(f"invalid topic root {root!r}: no wildcards, not starting with $")
    return root


@dataclass(frozen=True)
class FleetTopics:
    """Topic names of one fleet.

    Attributes:
        fleet: Fleet name (second level).
        root: First topic level (``Settings.mqtt.topic_root``).
    """

    fleet: str
    root: str = "tinymlops"

    def __post_init__(self) -> None:
        check_name(self.fleet, "fleet")
        check_root(self.root)

    @property
    def prefix(self) -> str:
        """``<root>/<fleet>``, the first two levels of every topic of the fleet."""
        return f"{self.root}/{self.fleet}"

    def device_topic(self, device: str, kind: TopicKind) -> str:
        """One per-device topic of one device."""
        return f"{self.prefix}/{check_name(device, 'device id')}/{DEVICE_SUFFIXES[kind]}"

    def announce(self, device: str) -> str:
        """Device capabilities, retained JSON, device -> server."""
        return self.device_topic(device, "announce")

    def manifest(self, device: str) -> str:
        """The device's desired model, retained binary manifest, server -> device."""
        return self.device_topic(device, "manifest")

    def request(self, device: str) -> str:
        """Chunk requests, binary, device -> server."""
        return self.device_topic(device, "request")

    def chunk(self, device: str) -> str:
        """Model chunks, binary, server -> device."""
        return self.device_topic(device, "chunk")

    def status(self, device: str) -> str:
        """Deployment status, retained JSON, device -> server."""
        return self.device_topic(device, "status")

    def scores(self, device: str) -> str:
        """Anomaly scores, JSON, device -> server."""
        return self.device_topic(device, "scores")

    def summary(self, device: str) -> str:
        """Periodic drift summaries, JSON, device -> server."""
        return self.device_topic(device, "summary")

    def vibration(self, device: str) -> str:
        """Raw windows (``firmware.codec``), the ingest's topic."""
        return self.device_topic(device, "vibration")

    def group_topic(self, group: str, kind: TopicKind) -> str:
        """One topic of a group of devices."""
        return f"{self.prefix}/{GROUPS_LEVEL}/{check_name(group, 'group')}/{DEVICE_SUFFIXES[kind]}"

    def group_manifest(self, group: str) -> str:
        """A group's desired model, retained binary manifest, server -> every device of the group."""
        return self.group_topic(group, "manifest")

    def all_group_manifests(self) -> str:
        """Subscription for every group's manifest topic: ``<root>/<fleet>/groups/+/ota/manifest``."""
        return f"{self.prefix}/{GROUPS_LEVEL}/+/{DEVICE_SUFFIXES['manifest']}"

    def audience_topic(self, audience: str) -> str:
        """The manifest topic of a manifest audience (``device:<id>`` or ``group:<name>``).

        Raises:
            TopicError: The audience is neither.
        """
        if audience.startswith(DEVICE_AUDIENCE):
            return self.manifest(audience.removeprefix(DEVICE_AUDIENCE))
        if audience.startswith(GROUP_AUDIENCE):
            return self.group_manifest(audience.removeprefix(GROUP_AUDIENCE))
        raise TopicError(f"invalid audience {audience!r}: expected device:<id> or group:<name>")

    def is_manifest(self, topic: str) -> bool:
        """Whether ``topic`` is a manifest topic (of a device or a group) of this fleet."""
        return topic.startswith(f"{self.prefix}/") and topic.endswith(f"/{DEVICE_SUFFIXES['manifest']}")

    def ota_service(self) -> str:
        """The fleet's OTA service presence, retained JSON (empty: none); not a device topic."""
        return f"{self.prefix}/{OTA_SERVICE_SUFFIX}"

    def all_devices(self, kind: TopicKind) -> str:
        """Subscription for one kind of per-device topic of every device, e.g. ``<root>/<fleet>/+/ota/status``."""
        return f"{self.prefix}/+/{DEVICE_SUFFIXES[kind]}"

    def parse(self, topic: str) -> tuple[str, TopicKind] | None:
        """Return ``(device, kind)`` of a per-device topic of this fleet, or None."""
        prefix = f"{self.prefix}/"
        if not topic.startswith(prefix):
            return None
        device, _, suffix = topic.removeprefix(prefix).partition("/")
        kind = _KIND_OF_SUFFIX.get(suffix)
        if kind is None or not NAME_PATTERN.match(device) or device == GROUPS_LEVEL:
            return None
        return device, kind
