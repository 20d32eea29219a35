"""Emulated devices: the real firmware image in QEMU, joined to the fleet through a gateway.

An :class:`EmulatedDevice` is one ``qemu-system-arm`` process running ``device.elf`` (built by
``firmware.emulator.build_images``) with UART0 bridged to a TCP port, and the
:class:`~firmware.gateway.UartGateway` that connects there and to the broker. Its state
directory holds ``flash.img``: the board's persistent flash region (``firmware/c/slots.h``:
provisioning block, slot table, two model slots), loaded at every start and kept up to date by
the firmware through semihosting, so the models survive a restart or a kill. The provisioning
block is (re)written from the device id, fleet, group, profile and the key ring at every start;
the slot table and the slots are never touched here.

:class:`EmulatedFleet` runs N of them on free ports, starts them in parallel and stops them by
pid.
"""

from __future__ import annotations

import json
import logging
import os
import signal
import struct
import subprocess
import zlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Self

from firmware.emulator import Board, EmulatorError, build_images, find_toolchain, get_board
from firmware.gateway import GatewayConfig, GatewayError, UartGateway
from firmware.sensor import VibrationSource
from firmware.signing import KeyRing
from tinymlops.contracts.topics import check_name
from tinymlops.mqtt import BrokerAddress, free_port
from tinymlops.settings import MqttSettings
from tinymlops.targets import McuTarget

log = logging.getLogger(__name__)

# firmware/c/slots.h: the provisioning block at the start of the flash region, layout version 1
PROVISIONING_MAGIC = b"TMPV"
PROVISIONING_VERSION = 1
PROVISIONING_MAX_BYTES = 0x1000
MAX_KEYS = 8  # ED25519_MAX_KEYS
KEY_FLAG_REVOKED = 1
KEY_FLAG_HAS_KEY = 2
PUBLIC_KEY_BYTES = 32
ERASED = 0xFF
FLASH_IMAGE = "flash.img"
# firmware/c/slots.h: the transfer record (the download in progress), two copies, layout version 1
TRANSFER_MAGIC = b"TMTR"
TRANSFER_OFFSETS = (0x03000, 0x04000)
TRANSFER_BYTES = 572
_TRANSFER_HEADER = struct.Struct("<4sHHII32sIHBx")
_STOP_TIMEOUT_S = 5.0


class EmulatedDeviceError(EmulatorError):
    """An emulated device cannot be provisioned or started."""


def _str8(text: str, what: str) -> bytes:
    raw = text.encode("ascii")
    if len(raw) > 255:
        raise EmulatedDeviceError(f"{what} {text!r} is longer than 255 bytes")
    return bytes([len(raw)]) + raw


def provisioning_block(device: str, fleet: str, group: str | None, profile: str, keyring: KeyRing) -> bytes:
    """The provisioning block (``slots.h``): identity, profile, trusted and revoked keys, CRC-32.

    Raises:
        EmulatedDeviceError: More than 8 keys, or the block exceeds its 4 KiB sector.
    """
    ring = json.loads(keyring.to_json())
    keys: dict[str, str] = ring["keys"]
    revoked = set(ring["revoked"])
    ids = sorted(set(keys) | revoked)
    if len(ids) > MAX_KEYS:
        raise EmulatedDeviceError(f"the device holds at most {MAX_KEYS} keys, the key ring has {len(ids)}")
    body = b"".join(_str8(t, w) for t, w in ((device, "device"), (fleet, "fleet"), (group or "", "group"),
                                               (profile, "profile")))  # fmt: skip
    body += bytes([len(ids)])
    for key_id in ids:
        flags = (KEY_FLAG_REVOKED if key_id in revoked else 0) | (KEY_FLAG_HAS_KEY if key_id in keys else 0)
        public = bytes.fromhex(keys[key_id]) if key_id in keys else bytes(PUBLIC_KEY_BYTES)
        body += _str8(key_id, "key id") + bytes([flags]) + public
    length = 8 + len(body) + 4
    if length > PROVISIONING_MAX_BYTES:
        raise EmulatedDeviceError(f"provisioning block of {length} bytes exceeds {PROVISIONING_MAX_BYTES}")
    head = PROVISIONING_MAGIC + struct.pack("<HH", PROVISIONING_VERSION, length) + body
    return head + struct.pack("<I", zlib.crc32(head) & 0xFFFFFFFF)


def write_provisioning(path: Path, block: bytes, region_bytes: int) -> None:
    """Create ``path`` as an erased flash region, or keep it; write the provisioning block at its start.

    The slot table and model slots of an existing image are left as they are.
    """
    if not path.exists() or path.stat().st_size != region_bytes:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(bytes([ERASED]) * region_bytes)
    with path.open("r+b") as image:
        image.write(block + bytes([ERASED]) * (PROVISIONING_MAX_BYTES - len(block)))


@dataclass(frozen=True)
class TransferRecord:
    """The firmware's transfer record (``slots.h``): the download a restart resumes."""

    seq: int
    version: int
    sha256: bytes
    model_size: int
    chunk_count: int
    slot: int
    received: frozenset[int]  # chunks written in the staging slot


def read_transfer_record(image: bytes) -> TransferRecord | None:
    """The newest valid transfer record of a flash image; None: none, or cleared (no transfer)."""
    best: TransferRecord | None = None
    for offset in TRANSFER_OFFSETS:
        raw = image[offset : offset + TRANSFER_BYTES]
        if len(raw) < TRANSFER_BYTES:
            continue
        magic, layout, length, seq, version, sha, size, count, slot = _TRANSFER_HEADER.unpack_from(raw)
        crc = struct.unpack_from("<I", raw, TRANSFER_BYTES - 4)[0]
        if (magic, layout, length) != (TRANSFER_MAGIC, 1, TRANSFER_BYTES) or zlib.crc32(raw[:-4]) != crc:
            continue
        bitmap = raw[_TRANSFER_HEADER.size : TRANSFER_BYTES - 4]
        received = frozenset(i for i in range(count) if bitmap[i >> 3] >> (i & 7) & 1)
        if best is None or seq > best.seq:
            best = TransferRecord(seq, version, sha, size, count, slot, received)
    return best if best is not None and best.version != 0 else None


class EmulatedDevice:
    """One emulated device: QEMU running the device image, and its gateway.

    Args:
        device_id: Device id (one topic level).
        fleet: Fleet name.
        profile: The MCU profile written into its provisioning (the manifest target it accepts).
        keyring: Trusted and revoked signing keys, provisioned into flash.
        broker: Broker.
        state_dir: Directory of this device (``flash.img``, ``qemu.log``).
        board: The QEMU board (a :class:`~firmware.emulator.Board` or its name).
        group: Group whose manifests it also follows.
        simulator: Its machine; default one seeded from the device id.
        config: Gateway behaviour.
        mqtt_settings: MQTT credentials and TLS.
        elf: The device image; default built with ``build_images``.
    """

    def __init__(
        self,
        device_id: str,
        fleet: str,
        profile: McuTarget,
        keyring: KeyRing,
        broker: BrokerAddress,
        *,
        state_dir: Path,
        board: Board | str = "mps2-an386",
        group: str | None = None,
        simulator: VibrationSource | None = None,
        config: GatewayConfig | None = None,
        mqtt_settings: MqttSettings | None = None,
        elf: Path | None = None,
    ) -> None:
        self.device_id = check_name(device_id, "device id")
        self.fleet = check_name(fleet, "fleet")
        self.group = check_name(group, "group") if group is not None else None
        self.profile = profile
        self.keyring = keyring
        self.broker = broker
        self.board = get_board(board) if isinstance(board, str) else board
        if self.board.flash_base is None or "device" not in self.board.images:
            raise EmulatedDeviceError(f"board {self.board.name} cannot run the device image (no persistent flash)")
        self.state_dir = state_dir
        self.simulator = simulator
        self.config = config or GatewayConfig()
        self.mqtt_settings = mqtt_settings
        self.elf = elf
        self.gateway: UartGateway | None = None
        self.port: int | None = None
        self._process: subprocess.Popen[bytes] | None = None
        self._status_seq = 0

    @property
    def flash_image(self) -> Path:
        """The persistent flash region."""
        return self.state_dir / FLASH_IMAGE

    @property
    def log_file(self) -> Path:
        """QEMU's and the semihosting console's output."""
        return self.state_dir / "qemu.log"

    @property
    def pid(self) -> int | None:
        """QEMU's process id while it runs."""
        return self._process.pid if self._process is not None and self._process.poll() is None else None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    def _image(self) -> Path:
        if self.elf is not None:
            return self.elf
        images = build_images(self.board)
        if images.device is None:
            raise EmulatedDeviceError(f"no device image for {self.board.name}: firmware/c/device_main.c is missing")
        self.elf = images.device
        return images.device

    def command(self, elf: Path, port: int) -> list[str]:
        """The QEMU command line (FIRMWARE.md): UART0 on a TCP server port, flash loaded and mirrored."""
        assert self.board.flash_base is not None
        flash = str(self.flash_image.resolve())
        return [
            find_toolchain().qemu, "-M", self.board.machine, "-display", "none", "-monitor", "none",
            "-serial", f"tcp:127.0.0.1:{port},server=on,wait=on", "-kernel", str(elf),
            "-semihosting-config", f"enable=on,target=native,arg=device,arg=flash={flash.replace(',', ',,')}",
            "-icount", "shift=0",
            "-device", f"loader,file={flash.replace(',', ',,')},addr={self.board.flash_base:#x},force-raw=on",
        ]  # fmt: skip

    def start(self) -> Self:
        """Provision flash, start QEMU and the gateway; return once the device said HELLO and joined the broker.

        Raises:
            ToolchainMissingError: QEMU or the cross toolchain is missing.
            EmulatorError: The image does not build, or QEMU or the device does not come up.
            BrokerError: The broker cannot be reached.
        """
        if self._process is not None and self._process.poll() is None:
            raise EmulatedDeviceError(f"emulated device {self.device_id} is already running")
        elf = self._image()
        block = provisioning_block(self.device_id, self.fleet, self.group, self.profile.name, self.keyring)
        write_provisioning(self.flash_image, block, self.board.flash_size)
        self.port = free_port()
        with self.log_file.open("ab") as log_file:
            self._process = subprocess.Popen(self.command(elf, self.port), stdout=log_file, stderr=subprocess.STDOUT,
                                             cwd=self.state_dir, start_new_session=True)  # fmt: skip
        log.info("%s: QEMU %s (pid %d), UART on port %d", self.device_id, self.board.name, self._process.pid,
                 self.port)  # fmt: skip
        self.gateway = UartGateway(
            self.device_id, self.fleet, self.profile, ("127.0.0.1", self.port), self.broker, group=self.group,
            simulator=self.simulator, config=self.config, mqtt_settings=self.mqtt_settings,
            first_status_seq=self._status_seq,
        )  # fmt: skip
        if self.simulator is None:
            self.simulator = self.gateway.simulator  # the same machine after a restart
        try:
            self.gateway.start()
        except (GatewayError, OSError) as exc:
            tail = self._log_tail()
            self.kill()
            raise EmulatedDeviceError(f"emulated device {self.device_id} did not come up: {exc}{tail}") from None
        except BaseException:
            self.kill()
            raise
        return self

    def _log_tail(self) -> str:
        try:
            lines = self.log_file.read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return f"; QEMU log: {lines[-1][:200]}" if lines else ""

    def _end(self, sig: signal.Signals) -> None:
        gateway, self.gateway = self.gateway, None
        process, self._process = self._process, None
        if gateway is not None and gateway.status is not None:
            self._status_seq = gateway.status.seq
        if sig == signal.SIGKILL:  # power loss: the device dies first, the gateway sees its UART close
            self._signal(process, sig)
        if gateway is not None:
            gateway.stop()
        self._signal(process, sig)

    def _signal(self, process: subprocess.Popen[bytes] | None, sig: signal.Signals) -> None:
        if process is None or process.poll() is not None:
            return
        try:
            os.killpg(process.pid, sig)  # its own session: QEMU and nothing else
        except ProcessLookupError:
            return
        try:
            process.wait(_STOP_TIMEOUT_S)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()

    def stop(self) -> None:
        """Leave the broker and end QEMU (SIGTERM by its pid); flash.img stays."""
        self._end(signal.SIGTERM)

    def kill(self) -> None:
        """Power loss: SIGKILL QEMU by its pid at once, then drop the gateway; flash.img stays."""
        self._end(signal.SIGKILL)

    def restart(self) -> Self:
        """Stop (if running) and start again with the same flash image."""
        self.stop()
        return self.start()


class EmulatedFleet:
    """N emulated devices of one fleet on free ports, started in parallel.

    Args:
        fleet: Fleet name.
        n_devices: Number of devices, ids ``<device_prefix>-<nnnn>``.
        profile: MCU profile of every device.
        keyring: Trusted signing keys.
        broker: Broker.
        state_root: Directory of the devices' state directories.
        board: QEMU board.
        group: Group of every device.
        config: Gateway behaviour.
        device_prefix: Prefix of the device ids.
        mqtt_settings: MQTT credentials and TLS shared by every device.
        credentials: Per-device MQTT settings (overrides ``mqtt_settings``).
    """

    def __init__(
        self,
        fleet: str,
        n_devices: int,
        profile: McuTarget,
        keyring: KeyRing,
        broker: BrokerAddress,
        *,
        state_root: Path,
        board: Board | str = "mps2-an386",
        group: str | None = None,
        config: GatewayConfig | None = None,
        device_prefix: str = "emu",
        mqtt_settings: MqttSettings | None = None,
        credentials: Callable[[str], MqttSettings] | None = None,
    ) -> None:
        if n_devices < 1:
            raise EmulatedDeviceError(f"need >= 1 emulated device, got {n_devices}")
        self.fleet = fleet
        self.devices = [
            EmulatedDevice(
                f"{device_prefix}-{i:04d}", fleet, profile, keyring, broker,
                state_dir=state_root / fleet / f"{device_prefix}-{i:04d}", board=board, group=group, config=config,
                mqtt_settings=credentials(f"{device_prefix}-{i:04d}") if credentials else mqtt_settings,
            )
            for i in range(n_devices)
        ]  # fmt: skip
        self._by_id = {d.device_id: d for d in self.devices}

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, *_exc: object) -> None:
        self.stop()

    def __len__(self) -> int:
        return len(self.devices)

    def device(self, device_id: str) -> EmulatedDevice:
        """One device by id.

        Raises:
            EmulatedDeviceError: No such device.
        """
        try:
            return self._by_id[device_id]
        except KeyError:
            raise EmulatedDeviceError(f"no emulated device {device_id!r} in fleet {self.fleet!r}") from None

    def start(self) -> Self:
        """Build the image once, start every device in parallel; on any failure stop them all and raise."""
        if self.devices:
            elf = self.devices[0]._image()
            for device in self.devices:
                device.elf = elf
        with ThreadPoolExecutor(max_workers=min(8, len(self.devices))) as pool:
            futures = [pool.submit(device.start) for device in self.devices]
            errors = [f.exception() for f in futures]
        failed = next((e for e in errors if e is not None), None)
        if failed is not None:
            self.stop()
            raise failed
        log.info("fleet %s: %d emulated devices up", self.fleet, len(self.devices))
        return self

    def stop(self) -> None:
        """Stop every device (gateway, then QEMU by pid)."""
        with ThreadPoolExecutor(max_workers=min(8, max(len(self.devices), 1))) as pool:
            list(pool.map(lambda d: d.stop(), self.devices))

    def restart(self, device_id: str) -> EmulatedDevice:
        """Restart one device keeping its flash image."""
        return self.device(device_id).restart()
