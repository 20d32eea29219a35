"""UART frames between an emulated device's firmware and its gateway: the contract in Python.

``firmware/FIRMWARE.md`` ("UART frames") specifies every byte; ``firmware/c/frame.c`` is the C
side. A frame is ``A5 5A | type u8 | flags u8 | seq u16 | length u16 | payload | CRC-32``, all
little-endian, the CRC (zlib) over bytes 2 .. 8 + length. This module holds:

* :func:`encode_frame` / :func:`decode_frame` for one whole frame;
* :class:`FrameParser`, the incremental receiver: sync search, length cap, CRC, truncation by a
  timeout and replay (the seq of the previous accepted frame) are counted by kind and resynchronised;
* one frozen dataclass per payload type with ``encode()`` and a ``decode(payload)`` classmethod, and
  :func:`decode_payload` dispatching on the frame type.

Every decoder raises only :class:`FrameDecodeError` with one line naming what is wrong. This is a
contract module: it imports nothing of the project but :mod:`tinymlops.errors`.
"""

from __future__ import annotations

import enum
import math
import struct
import zlib
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, ClassVar, Self

from tinymlops.errors import DecodeError

SYNC = b"\xa5\x5a"
FRAME_MAX_PAYLOAD = 4352
HEADER = struct.Struct("<2sBBHH")
HEADER_BYTES = HEADER.size
CRC_BYTES = 4
FRAME_OVERHEAD = HEADER_BYTES + CRC_BYTES
HELLO_VERSION = 1
SHA256_BYTES = 32
MAX_STR8 = 255
MAX_WINDOW_SAMPLES = (FRAME_MAX_PAYLOAD - 14) // 2
MAX_SCORES = 255


class FrameDecodeError(DecodeError):
    """Bytes from the UART are not a valid frame or payload; the message names what is wrong."""


class FrameType(enum.IntEnum):
    """Frame types; host -> device below 0x80, device -> host from 0x81."""

    MANIFEST = 0x01
    CHUNK = 0x02
    WINDOW = 0x03
    SUMMARY_NOW = 0x04
    PING = 0x05
    HELLO = 0x81
    REQUEST = 0x82
    STATUS = 0x83
    SCORES = 0x84
    SUMMARY = 0x85
    LOG = 0x86
    PONG = 0x87
    FRAME_ERROR = 0x88


class FrameErrorCode(enum.IntEnum):
    """Why a receiver dropped a frame (the ``code`` of a FRAME_ERROR frame)."""

    CRC = 1
    LENGTH = 2
    TRUNCATED = 3
    REPLAY = 4
    UNKNOWN_TYPE = 5
    MALFORMED = 6


class DeviceStateCode(enum.IntEnum):
    """The ``state`` byte of a STATUS frame; names are the JSON ``DeviceStatus.state`` values."""

    IDLE = 0
    DOWNLOADING = 1
    VERIFIED = 2
    LOADED = 3
    ACTIVE = 4
    FAILED = 5
    IGNORED = 6
    CANCELLED = 7


class StatusDomain(enum.IntEnum):
    """What the ``code`` of a STATUS frame is."""

    NONE = 0
    OTA = 1  # an RxStatus of the OTA receiver
    RUNTIME = 2  # a trt_status_t of tinyrt: load failed
    SMOKE = 3  # the smoke inference: smoke test failed
    FLASH = 4  # flash or slot table: slot write failed
    CORRUPT_CHUNKS = 5  # download given up: corrupt chunks


def crc32(data: bytes | bytearray | memoryview) -> int:
    """CRC-32 as zlib, the check of every frame."""
    return zlib.crc32(data) & 0xFFFFFFFF


# --- frames ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class Frame:
    """One frame as received or to send.

    Attributes:
        type: Frame type byte (a :class:`FrameType` value when known).
        seq: Per-direction sequence number (u16).
        payload: Payload bytes (at most :data:`FRAME_MAX_PAYLOAD`).
        flags: Flags byte (0).
    """

    type: int
    seq: int
    payload: bytes
    flags: int = 0

    def encode(self) -> bytes:
        """The frame on the wire."""
        return encode_frame(self.type, self.seq, self.payload, self.flags)


def encode_frame(frame_type: int, seq: int, payload: bytes, flags: int = 0) -> bytes:
    """Build one frame: sync, header, payload, CRC-32.

    Raises:
        FrameDecodeError: A field is out of range or the payload is larger than the cap.
    """
    if not 0 <= frame_type <= 0xFF or not 0 <= flags <= 0xFF or not 0 <= seq <= 0xFFFF:
        raise FrameDecodeError(f"frame type {frame_type}, flags {flags} or seq {seq} out of range")
    if len(payload) > FRAME_MAX_PAYLOAD:
        raise FrameDecodeError(f"frame payload of {len(payload)} bytes exceeds {FRAME_MAX_PAYLOAD}")
    body = HEADER.pack(SYNC, frame_type, flags, seq, len(payload)) + bytes(payload)
    return body + struct.pack("<I", crc32(body[2:]))


def decode_frame(data: bytes) -> Frame:
    """Parse exactly one whole frame.

    Raises:
        FrameDecodeError: Not one valid frame (sync, length, CRC, trailing bytes).
    """
    if len(data) < FRAME_OVERHEAD:
        raise FrameDecodeError(f"frame of {len(data)} bytes is shorter than its {FRAME_OVERHEAD}-byte overhead")
    sync, frame_type, flags, seq, length = HEADER.unpack_from(data)
    if sync != SYNC:
        raise FrameDecodeError(f"frame starts with {sync.hex()}, not the sync a55a")
    if length > FRAME_MAX_PAYLOAD:
        raise FrameDecodeError(f"frame length {length} exceeds {FRAME_MAX_PAYLOAD}")
    if len(data) != FRAME_OVERHEAD + length:
        raise FrameDecodeError(f"frame is {len(data)} bytes, its length field needs {FRAME_OVERHEAD + length}")
    (crc,) = struct.unpack_from("<I", data, HEADER_BYTES + length)
    if crc != crc32(data[2 : HEADER_BYTES + length]):
        raise FrameDecodeError(f"frame CRC {crc:08x} does not match its bytes")
    return Frame(frame_type, seq, bytes(data[HEADER_BYTES : HEADER_BYTES + length]), flags)


@dataclass(frozen=True)
class FrameFault:
    """A frame the parser dropped.

    Attributes:
        code: Why.
        seq: The seq of the dropped frame when its header was read, else 0.
    """

    code: FrameErrorCode
    seq: int = 0


@dataclass
class FrameParser:
    """Incremental frame receiver: feed bytes as they come, get frames and faults back.

    After any error it resynchronises on the next sync bytes. A frame whose seq equals the
    previous accepted one is a replay and is dropped. :meth:`expire` drops a partial frame
    when the line stayed silent too long (the caller's timeout).

    Attributes:
        errors: Faults counted by kind.
        last_seq: Seq of the last accepted frame, None before the first.
    """

    errors: Counter[FrameErrorCode] = field(default_factory=Counter)
    last_seq: int | None = None
    _buffer: bytearray = field(default_factory=bytearray)

    @property
    def pending(self) -> int:
        """Bytes held of a frame not yet complete."""
        return len(self._buffer)

    def reset(self) -> None:
        """Forget buffered bytes and the replay state (the peer restarted)."""
        self._buffer.clear()
        self.last_seq = None

    def expire(self) -> list[Frame | FrameFault]:
        """The line stayed silent with a partial frame held: drop it as truncated.

        As ``frame.c``: only its first sync byte is dropped and the bytes held are searched again,
        so a real frame that arrived inside a bogus one is still found.

        Returns:
            The truncation fault, then whatever the bytes held still give; [] when nothing was held.
        """
        start = self._buffer.find(SYNC)
        if start < 0:
            self._buffer.clear()
            return []
        seq = struct.unpack_from("<H", self._buffer, start + 4)[0] if len(self._buffer) >= start + HEADER_BYTES else 0
        del self._buffer[: start + 1]
        return [self._fault(FrameErrorCode.TRUNCATED, seq), *self.feed(b"")]

    def _fault(self, code: FrameErrorCode, seq: int) -> FrameFault:
        self.errors[code] += 1
        return FrameFault(code, seq)

    def feed(self, data: bytes) -> list[Frame | FrameFault]:
        """Add received bytes; return the frames completed and the faults met, in order."""
        self._buffer += data
        out: list[Frame | FrameFault] = []
        buf = self._buffer
        while True:
            start = buf.find(SYNC)
            if start < 0:
                # keep a trailing first sync byte: its partner may come next
                del buf[: len(buf) - 1 if buf.endswith(SYNC[:1]) else len(buf)]
                return out
            del buf[:start]
            if len(buf) < HEADER_BYTES:
                return out
            _, frame_type, flags, seq, length = HEADER.unpack_from(buf)
            if length > FRAME_MAX_PAYLOAD:
                out.append(self._fault(FrameErrorCode.LENGTH, seq))
                del buf[:1]
                continue
            end = HEADER_BYTES + length + CRC_BYTES
            if len(buf) < end:
                return out
            (crc,) = struct.unpack_from("<I", buf, HEADER_BYTES + length)
            if crc != crc32(buf[2 : HEADER_BYTES + length]):
                out.append(self._fault(FrameErrorCode.CRC, seq))
                del buf[:1]
                continue
            payload = bytes(buf[HEADER_BYTES : HEADER_BYTES + length])
            del buf[:end]
            if seq == self.last_seq:
                out.append(self._fault(FrameErrorCode.REPLAY, seq))
                continue
            self.last_seq = seq
            out.append(Frame(frame_type, seq, payload, flags))


# --- payload helpers ------------------------------------------------------------------------


class _Reader:
    """Reads fields of one payload; every shortfall is a :class:`FrameDecodeError` naming the field."""

    def __init__(self, data: bytes, what: str) -> None:
        self.data = bytes(data)
        self.offset = 0
        self.what = what

    def take(self, fmt: str, name: str) -> tuple[Any, ...]:
        size = struct.calcsize("<" + fmt)
        if self.offset + size > len(self.data):
            raise FrameDecodeError(f"{self.what} payload of {len(self.data)} bytes ends inside {name}")
        values = struct.unpack_from("<" + fmt, self.data, self.offset)
        self.offset += size
        return values

    def uint(self, fmt: str, name: str) -> int:
        return int(self.take(fmt, name)[0])

    def f32(self, name: str) -> float:
        return float(self.take("f", name)[0])

    def raw(self, n: int, name: str) -> bytes:
        if self.offset + n > len(self.data):
            raise FrameDecodeError(f"{self.what} payload of {len(self.data)} bytes ends inside {name}")
        value = self.data[self.offset : self.offset + n]
        self.offset += n
        return value

    def str8(self, name: str) -> str:
        raw = self.raw(self.uint("B", f"{name} length"), name)
        if not all(0x20 <= b < 0x7F for b in raw):
            raise FrameDecodeError(f"{self.what} {name} is not printable ASCII: {raw!r}")
        return raw.decode("ascii")

    def optional(self, fmt: str, name: str) -> Any | None:
        """A field appended to a layout later: None when the payload ends before it (a sender that predates it)."""
        return None if self.offset == len(self.data) else self.take(fmt, name)[0]

    def rest(self) -> bytes:
        value = self.data[self.offset :]
        self.offset = len(self.data)
        return value

    def end(self) -> None:
        if self.offset != len(self.data):
            raise FrameDecodeError(f"{self.what} payload has {len(self.data) - self.offset} bytes past its fields")


def _str8(text: str, name: str) -> bytes:
    raw = text.encode("ascii", errors="replace")  # a non-ASCII character becomes "?", refused below
    if len(raw) > MAX_STR8 or raw != text.encode("utf-8") or not all(0x20 <= b < 0x7F for b in raw):
        raise FrameDecodeError(f"{name} {text!r} is not 0-255 printable ASCII characters")
    return bytes([len(raw)]) + raw


def _finite(value: float, name: str, what: str) -> float:
    if not math.isfinite(value):
        raise FrameDecodeError(f"{what} {name} is not finite: {value}")
    return value


def _f32(value: float) -> float:
    """The value as float32 holds it (what a round trip gives back)."""
    return float(struct.unpack("<f", struct.pack("<f", value))[0])


# --- host -> device payloads ----------------------------------------------------------------


@dataclass(frozen=True)
class ManifestFrame:
    """MANIFEST: the MQTT manifest payload verbatim, after the topic it came from.

    Attributes:
        source: 0 the device's manifest topic, 1 its group's.
        manifest: The MQTT payload; empty: withdrawn.
    """

    TYPE: ClassVar[FrameType] = FrameType.MANIFEST
    DEVICE: ClassVar[int] = 0
    GROUP: ClassVar[int] = 1

    source: int
    manifest: bytes

    def encode(self) -> bytes:
        """The payload bytes."""
        if self.source not in (self.DEVICE, self.GROUP):
            raise FrameDecodeError(f"MANIFEST source {self.source} is not 0 (device) or 1 (group)")
        return bytes([self.source]) + self.manifest

    @classmethod
    def decode(cls, payload: bytes) -> Self:
        """Parse a payload. Raises FrameDecodeError when it is not one."""
        r = _Reader(payload, "MANIFEST")
        source = r.uint("B", "source")
        if source not in (cls.DEVICE, cls.GROUP):
            raise FrameDecodeError(f"MANIFEST source {source} is not 0 (device) or 1 (group)")
        return cls(source, r.rest())


@dataclass(frozen=True)
class ChunkFrame:
    """CHUNK: the MQTT chunk payload verbatim."""

    TYPE: ClassVar[FrameType] = FrameType.CHUNK

    chunk: bytes

    def encode(self) -> bytes:
        """The payload bytes."""
        return self.chunk

    @classmethod
    def decode(cls, payload: bytes) -> Self:
        """Parse a payload (any bytes)."""
        return cls(bytes(payload))


@dataclass(frozen=True)
class WindowFrame:
    """WINDOW: one sensor window as the ADC gives it, with the machine's shaft speed.

    Attributes:
        seq: Window sequence number (the gateway's).
        scale: Physical units (g) per LSB, float32.
        sample_rate_hz: Sample rate.
        samples: The int16 samples.
        rpm: Shaft speed (tachometer), float32 appended after the samples; 0.0 or NaN: not known. None: the
            field is absent (the layout before it; a device that does not announce DSP version 2 gets that).
    """

    TYPE: ClassVar[FrameType] = FrameType.WINDOW
    _HEAD: ClassVar[struct.Struct] = struct.Struct("<IfIH")

    seq: int
    scale: float
    sample_rate_hz: int
    samples: tuple[int, ...]
    rpm: float | None = None

    def encode(self) -> bytes:
        """The payload bytes."""
        n = len(self.samples)
        if n > MAX_WINDOW_SAMPLES:
            raise FrameDecodeError(f"WINDOW of {n} samples exceeds {MAX_WINDOW_SAMPLES}")
        _finite(self.scale, "scale", "WINDOW")
        speed = b"" if self.rpm is None else struct.pack("<f", self.rpm)
        return (
            self._HEAD.pack(self.seq, self.scale, self.sample_rate_hz, n) + struct.pack(f"<{n}h", *self.samples) + speed
        )

    @classmethod
    def decode(cls, payload: bytes) -> Self:
        """Parse a payload. Raises FrameDecodeError when it is not one."""
        r = _Reader(payload, "WINDOW")
        seq = r.uint("I", "seq")
        scale = _finite(r.f32("scale"), "scale", "WINDOW")
        rate = r.uint("I", "sample_rate_hz")
        n = r.uint("H", "n")
        samples = r.take(f"{n}h", f"{n} samples")
        rpm = r.optional("f", "rpm")  # any value: an unusable speed is data, the device falls back
        r.end()
        return cls(seq, scale, rate, tuple(samples), rpm)


@dataclass(frozen=True)
class SummaryNowFrame:
    """SUMMARY_NOW: publish the drift summary now (empty payload)."""

    TYPE: ClassVar[FrameType] = FrameType.SUMMARY_NOW

    def encode(self) -> bytes:
        """The payload bytes (none)."""
        return b""

    @classmethod
    def decode(cls, payload: bytes) -> Self:
        """Parse a payload. Raises FrameDecodeError when it is not empty."""
        _Reader(payload, "SUMMARY_NOW").end()
        return cls()


@dataclass(frozen=True)
class PingFrame:
    """PING (host -> device) and PONG (the echo): a u32 nonce."""

    TYPE: ClassVar[FrameType] = FrameType.PING

    nonce: int

    def encode(self) -> bytes:
        """The payload bytes."""
        return struct.pack("<I", self.nonce)

    @classmethod
    def decode(cls, payload: bytes) -> Self:
        """Parse a payload. Raises FrameDecodeError when it is not one."""
        r = _Reader(payload, cls.TYPE.name)
        nonce = r.uint("I", "nonce")
        r.end()
        return cls(nonce)


@dataclass(frozen=True)
class PongFrame(PingFrame):
    """PONG: the nonce of a PING, echoed."""

    TYPE: ClassVar[FrameType] = FrameType.PONG


# --- device -> host payloads ----------------------------------------------------------------


@dataclass(frozen=True)
class ModelInfo:
    """A model as the device reports it.

    Attributes:
        version: Model version.
        sha256: sha256 of the model (32 bytes).
        name: Model name.
    """

    version: int
    sha256: bytes
    name: str

    def encode(self) -> bytes:
        """u32 version, 32 B sha256, str8 name."""
        if len(self.sha256) != SHA256_BYTES:
            raise FrameDecodeError(f"model sha256 of {len(self.sha256)} bytes, expected {SHA256_BYTES}")
        return struct.pack("<I", self.version) + self.sha256 + _str8(self.name, "model name")

    @classmethod
    def read(cls, r: _Reader) -> Self:
        """Read the fields from a payload reader."""
        version = r.uint("I", "model version")
        sha256 = r.raw(SHA256_BYTES, "model sha256")
        return cls(version, sha256, r.str8("model name"))


def _optional_model(r: _Reader, name: str) -> ModelInfo | None:
    flag = r.uint("B", f"has_{name}")
    if flag > 1:
        raise FrameDecodeError(f"{r.what} has_{name} is {flag}, not 0 or 1")
    return ModelInfo.read(r) if flag else None


def _encode_optional_model(model: ModelInfo | None) -> bytes:
    return b"\x00" if model is None else b"\x01" + model.encode()


@dataclass(frozen=True)
class HelloFrame:
    """HELLO: what the device is and can run (the announcement's fields).

    Attributes:
        flash_free: Flash for models, bytes.
        slot_bytes: One model slot: the largest model accepted.
        ram_free: RAM for the tensor arena.
        max_chunk: Largest chunk size it takes.
        dsp_versions: Bit v set: DSP spec version v implemented.
        device: Device id.
        fleet: Fleet.
        group: Group, empty for none.
        firmware: Firmware name and version, e.g. ``tinymlops-fw/0.1.0``.
        profile: MCU profile (catalog key).
        board: Board, e.g. ``mps2-an386``.
        key_ids: Trusted key ids (not revoked).
        model: The active model, or None.
        version: HELLO layout version (1).
    """

    TYPE: ClassVar[FrameType] = FrameType.HELLO
    _HEAD: ClassVar[struct.Struct] = struct.Struct("<BIIIHI")

    flash_free: int
    slot_bytes: int
    ram_free: int
    max_chunk: int
    dsp_versions: int
    device: str
    fleet: str
    group: str
    firmware: str
    profile: str
    board: str
    key_ids: tuple[str, ...]
    model: ModelInfo | None
    version: int = HELLO_VERSION

    @property
    def dsp_version_list(self) -> list[int]:
        """The DSP spec versions implemented, ascending."""
        return [v for v in range(32) if self.dsp_versions >> v & 1]

    def encode(self) -> bytes:
        """The payload bytes."""
        if len(self.key_ids) > 255:
            raise FrameDecodeError(f"HELLO with {len(self.key_ids)} key ids exceeds 255")
        head = self._HEAD.pack(self.version, self.flash_free, self.slot_bytes, self.ram_free, self.max_chunk,
                               self.dsp_versions)  # fmt: skip
        texts = b"".join(
            _str8(t, n)
            for t, n in (
                (self.device, "device"),
                (self.fleet, "fleet"),
                (self.group, "group"),
                (self.firmware, "firmware"),
                (self.profile, "profile"),
                (self.board, "board"),
            )
        )
        keys = bytes([len(self.key_ids)]) + b"".join(_str8(k, "key id") for k in self.key_ids)
        return head + texts + keys + _encode_optional_model(self.model)

    @classmethod
    def decode(cls, payload: bytes) -> Self:
        """Parse a payload. Raises FrameDecodeError when it is not one."""
        r = _Reader(payload, "HELLO")
        version = r.uint("B", "hello version")
        if version != HELLO_VERSION:
            raise FrameDecodeError(f"HELLO version {version}, this reads {HELLO_VERSION}")
        flash_free, slot_bytes, ram_free = (r.uint("I", n) for n in ("flash_free", "slot_bytes", "ram_free"))
        max_chunk = r.uint("H", "max_chunk")
        dsp_versions = r.uint("I", "dsp_versions")
        device, fleet, group, firmware, profile, board = (
            r.str8(n) for n in ("device", "fleet", "group", "firmware", "profile", "board")
        )
        key_ids = tuple(r.str8("key id") for _ in range(r.uint("B", "n_keys")))
        model = _optional_model(r, "model")
        r.end()
        return cls(flash_free, slot_bytes, ram_free, max_chunk, dsp_versions, device, fleet, group, firmware,
                   profile, board, key_ids, model, version)  # fmt: skip


@dataclass(frozen=True)
class RequestFrame:
    """REQUEST: the MQTT chunk request payload verbatim."""

    TYPE: ClassVar[FrameType] = FrameType.REQUEST

    request: bytes

    def encode(self) -> bytes:
        """The payload bytes."""
        return self.request

    @classmethod
    def decode(cls, payload: bytes) -> Self:
        """Parse a payload. Raises FrameDecodeError when it is empty."""
        if not payload:
            raise FrameDecodeError("REQUEST payload is empty")
        return cls(bytes(payload))


COUNTER_NAMES = ("requests", "retries", "duplicates", "corrupt", "stale")
FRAME_ERROR_NAMES = ("crc", "length", "truncated", "replay", "malformed")


@dataclass(frozen=True)
class StatusFrame:
    """STATUS: the device's deployment state, with instruction counts.

    Attributes:
        status_seq: Device's status counter (u16).
        state: Deployment state.
        domain: What ``code`` is.
        code: The result code in its domain (i16).
        manifest_version: Version of the manifest the status is about, 0 for none.
        received: Chunks received.
        total: Chunks of the model.
        active: The model running now, or None.
        manifest_name: Model name of the manifest, empty for none.
        download_ms: Manifest -> last chunk, device clock.
        deploy_ms: Manifest -> active, device clock.
        verify_instructions: sha256 and Ed25519 verification.
        load_instructions: tinyrt parse and arena plan.
        smoke_instructions: The smoke inference (DSP and model).
        dsp_instructions: DSP of the smoke window.
        inference_instructions: Inference of the smoke window.
        counters: requests, retries, duplicates, corrupt, stale.
        frame_errors: crc, length, truncated, replay, malformed frames received by the device.
        detail: Measured value and limit, or what failed.
        speed_fallback: Windows scored at the fallback speed since boot (u32 appended after ``detail``;
            0 from a device that predates it).
    """

    TYPE: ClassVar[FrameType] = FrameType.STATUS
    _HEAD: ClassVar[struct.Struct] = struct.Struct("<HBBhIHH")
    _TIMES: ClassVar[struct.Struct] = struct.Struct("<IIQQQII")

    status_seq: int
    state: DeviceStateCode
    domain: StatusDomain
    code: int
    manifest_version: int
    received: int
    total: int
    active: ModelInfo | None
    manifest_name: str
    download_ms: int = 0
    deploy_ms: int = 0
    verify_instructions: int = 0
    load_instructions: int = 0
    smoke_instructions: int = 0
    dsp_instructions: int = 0
    inference_instructions: int = 0
    counters: tuple[int, int, int, int, int] = (0, 0, 0, 0, 0)
    frame_errors: tuple[int, int, int, int, int] = (0, 0, 0, 0, 0)
    detail: str = ""
    speed_fallback: int = 0

    def encode(self) -> bytes:
        """The payload bytes."""
        head = self._HEAD.pack(self.status_seq, self.state, self.domain, self.code, self.manifest_version,
                               self.received, self.total)  # fmt: skip
        times = self._TIMES.pack(
            self.download_ms, self.deploy_ms, self.verify_instructions, self.load_instructions,
            self.smoke_instructions, self.dsp_instructions, self.inference_instructions,
        )  # fmt: skip
        return (
            head
            + _encode_optional_model(self.active)
            + _str8(self.manifest_name, "manifest name")
            + times
            + struct.pack("<5H5H", *self.counters, *self.frame_errors)
            + _str8(self.detail, "detail")
            + struct.pack("<I", self.speed_fallback)
        )

    @classmethod
    def decode(cls, payload: bytes) -> Self:
        """Parse a payload. Raises FrameDecodeError when it is not one."""
        r = _Reader(payload, "STATUS")
        seq, state, domain, code, version, received, total = r.take("HBBhIHH", "header")
        try:
            state_code = DeviceStateCode(state)
            domain_code = StatusDomain(domain)
        except ValueError:
            raise FrameDecodeError(f"STATUS state {state} or domain {domain} is unknown") from None
        active = _optional_model(r, "active")
        name = r.str8("manifest name")
        times = r.take("IIQQQII", "latencies")
        counts = r.take("5H5H", "counters")
        detail = r.str8("detail")
        speed_fallback = r.optional("I", "speed_fallback") or 0
        r.end()
        download_ms, deploy_ms, verify, load, smoke, dsp, inference = times
        return cls(
            seq, state_code, domain_code, code, version, received, total, active, name, download_ms, deploy_ms,
            verify, load, smoke, dsp, inference, counters=counts[:5], frame_errors=counts[5:], detail=detail,
            speed_fallback=speed_fallback,
        )  # fmt: skip


@dataclass(frozen=True)
class ScoreItem:
    """One scored window of a SCORES frame.

    Attributes:
        score: Reconstruction error (float32).
        anomaly: Score above the threshold.
        dsp_instructions: DSP of this window.
        inference_instructions: Inference of this window.
    """

    score: float
    anomaly: bool
    dsp_instructions: int
    inference_instructions: int


@dataclass(frozen=True)
class ScoresFrame:
    """SCORES: scores of consecutive windows.

    Attributes:
        model_version: Version of the model that scored.
        first_seq: Window seq of the first score.
        items: The scores, in window order.
    """

    TYPE: ClassVar[FrameType] = FrameType.SCORES
    _ITEM: ClassVar[struct.Struct] = struct.Struct("<fBII")

    model_version: int
    first_seq: int
    items: tuple[ScoreItem, ...]

    def encode(self) -> bytes:
        """The payload bytes."""
        if len(self.items) > MAX_SCORES:
            raise FrameDecodeError(f"SCORES with {len(self.items)} items exceeds {MAX_SCORES}")
        return struct.pack("<IIB", self.model_version, self.first_seq, len(self.items)) + b"".join(
            self._ITEM.pack(i.score, int(i.anomaly), i.dsp_instructions, i.inference_instructions) for i in self.items
        )

    @classmethod
    def decode(cls, payload: bytes) -> Self:
        """Parse a payload. Raises FrameDecodeError when it is not one."""
        r = _Reader(payload, "SCORES")
        version = r.uint("I", "model version")
        first = r.uint("I", "first_seq")
        items = []
        for k in range(r.uint("B", "n")):
            score, anomaly, dsp, inference = r.take("fBII", f"score {k}")
            if anomaly not in (0, 1):
                raise FrameDecodeError(f"SCORES anomaly flag {anomaly} of score {k} is not 0 or 1")
            items.append(ScoreItem(score, bool(anomaly), dsp, inference))
        r.end()
        return cls(version, first, tuple(items))


@dataclass(frozen=True)
class SummaryFrame:
    """SUMMARY: the drift summary of one period.

    Attributes:
        model_version: Model version.
        threshold: Anomaly threshold (float32).
        windows: Windows scored in the period.
        anomalies: Of which anomalous.
        score_mean: Mean score.
        score_counts: Histogram over ``SCORE_EDGES_REL`` x threshold (9 bins, the last open).
        feature_mean: Mean of each normalised feature.
        feature_var: Variance of each normalised feature.
        dsp_instructions_mean: Mean DSP instructions per window.
        inference_instructions_mean: Mean inference instructions per window.
        inference_instructions_max: Largest inference instruction count.
        speed_fallback: Windows of the period scored at the fallback speed (u32 appended at the end; 0 from a
            device that predates it).
    """

    TYPE: ClassVar[FrameType] = FrameType.SUMMARY

    model_version: int
    threshold: float
    windows: int
    anomalies: int
    score_mean: float
    score_counts: tuple[int, ...]
    feature_mean: tuple[float, ...]
    feature_var: tuple[float, ...]
    dsp_instructions_mean: float
    inference_instructions_mean: float
    inference_instructions_max: int
    speed_fallback: int = 0

    def encode(self) -> bytes:
        """The payload bytes."""
        n_bins, n = len(self.score_counts), len(self.feature_mean)
        if n_bins > 255 or n != len(self.feature_var) or n > 0xFFFF:
            raise FrameDecodeError(f"SUMMARY with {n_bins} bins, {n}/{len(self.feature_var)} feature stats")
        return (
            struct.pack(
                "<IfIIfB", self.model_version, self.threshold, self.windows, self.anomalies, self.score_mean, n_bins
            )
            + struct.pack(f"<{n_bins}I", *self.score_counts)
            + struct.pack(f"<H{n}f{n}f", n, *self.feature_mean, *self.feature_var)
            + struct.pack(
                "<ffII",
                self.dsp_instructions_mean,
                self.inference_instructions_mean,
                self.inference_instructions_max,
                self.speed_fallback,
            )
        )

    @classmethod
    def decode(cls, payload: bytes) -> Self:
        """Parse a payload. Raises FrameDecodeError when it is not one."""
        r = _Reader(payload, "SUMMARY")
        version, threshold, windows, anomalies, score_mean, n_bins = r.take("IfIIfB", "header")
        counts = r.take(f"{n_bins}I", "score counts")
        n = r.uint("H", "n_features")
        mean = r.take(f"{n}f", "feature means")
        var = r.take(f"{n}f", "feature variances")
        dsp, inference, inference_max = r.take("ffI", "latencies")
        speed_fallback = r.optional("I", "speed_fallback") or 0
        r.end()
        return cls(version, threshold, windows, anomalies, score_mean, counts, mean, var, dsp, inference,
                   inference_max, speed_fallback)  # fmt: skip


@dataclass(frozen=True)
class LogFrame:
    """LOG: a line of text from the firmware (non-ASCII bytes are replaced)."""

    TYPE: ClassVar[FrameType] = FrameType.LOG

    text: str

    def encode(self) -> bytes:
        """The payload bytes."""
        return self.text.encode("ascii", errors="replace")

    @classmethod
    def decode(cls, payload: bytes) -> Self:
        """Parse a payload (any bytes)."""
        return cls(bytes(payload).decode("ascii", errors="replace"))


@dataclass(frozen=True)
class FrameErrorFrame:
    """FRAME_ERROR: the device dropped a frame.

    Attributes:
        code: Why.
        seq: Seq of the dropped frame.
    """

    TYPE: ClassVar[FrameType] = FrameType.FRAME_ERROR

    code: FrameErrorCode
    seq: int

    def encode(self) -> bytes:
        """The payload bytes."""
        return struct.pack("<BH", self.code, self.seq)

    @classmethod
    def decode(cls, payload: bytes) -> Self:
        """Parse a payload. Raises FrameDecodeError when it is not one."""
        r = _Reader(payload, "FRAME_ERROR")
        code = r.uint("B", "code")
        seq = r.uint("H", "seq")
        r.end()
        try:
            return cls(FrameErrorCode(code), seq)
        except ValueError:
            raise FrameDecodeError(f"FRAME_ERROR code {code} is unknown") from None


Payload = (
    ManifestFrame
    | ChunkFrame
    | WindowFrame
    | SummaryNowFrame
    | PingFrame
    | PongFrame
    | HelloFrame
    | RequestFrame
    | StatusFrame
    | ScoresFrame
    | SummaryFrame
    | LogFrame
    | FrameErrorFrame
)

PAYLOAD_TYPES: dict[FrameType, type[Payload]] = {
    cls.TYPE: cls
    for cls in (
        ManifestFrame,
        ChunkFrame,
        WindowFrame,
        SummaryNowFrame,
        PingFrame,
        PongFrame,
        HelloFrame,
        RequestFrame,
        StatusFrame,
        ScoresFrame,
        SummaryFrame,
        LogFrame,
        FrameErrorFrame,
    )
}


def decode_payload(frame: Frame) -> Payload:
    """The typed payload of a frame.

    Raises:
        FrameDecodeError: Unknown frame type, or a payload that is not of its type.
    """
    try:
        kind = PAYLOAD_TYPES[FrameType(frame.type)]
    except ValueError:
        raise FrameDecodeError(f"unknown frame type 0x{frame.type:02x}") from None
    return kind.decode(frame.payload)


def payload_frame(payload: Payload, seq: int) -> bytes:
    """Encode a typed payload as a whole frame with ``seq``."""
    return encode_frame(payload.TYPE, seq, payload.encode())
