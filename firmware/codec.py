"""Vibration window wire format, version 3 (see firmware/VIBRATION_FORMAT.md); versions 1 and 2 are still read.

All integers little-endian. A version-3 message is::

    offset  size  field
    0       2     magic b"TV"
    2       1     header version (3)
    3       1     flags (0; reserved)
    4       4     boot_epoch     u32, the device's boot counter: a new value on every start
    8       4     seq            u32, sequence number within the boot epoch
    12      8     timestamp_us   u64, UNIX time of the first sample, microseconds
    20      4     sample_rate_hz u32
    24      4     scale          f32, physical units (g) per LSB
    28      4     rpm            f32, shaft speed from a tachometer or the drive (0.0: not known)
    32      4     load           f32, load as a fraction of rated, 0..1 (NaN: not known)
    36      2     n_samples      u16
    38      1     id_len         u8, length of device id
    39      id_len device id (UTF-8, 1..64 bytes)
    ...     2*n   samples        i16[n_samples]
    ...     4     crc32          u32, zlib CRC-32 of every byte before it

Version 2 is the same without ``rpm`` and ``load`` (a 31-byte header), version 1 also without
``boot_epoch`` (27 bytes); they decode with rpm and load not known (None), version 1 with boot epoch
0. A window is identified by (device, boot_epoch, seq): a device that restarts its seq at 0 on every
start stays unique as long as its epoch changes. Decoding raises :class:`DecodeError` with one line
naming what is wrong, and nothing else. An rpm that is not finite or negative, or a load outside
0..1, is not a decode error: the samples are good data whose operating condition is unusable, kept
as sent for the scorer's documented fallback (``tinymlops.contracts.dsp.resolve_speed``).
"""

from __future__ import annotations

import math
import struct
import zlib
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from tinymlops.errors import DecodeError

MAGIC = b"TV"
HEADER_VERSION = 3
_HEADERS = {1: struct.Struct("<2sBBIQIfHB"), 2: struct.Struct("<2sBBIIQIfHB"), 3: struct.Struct("<2sBBIIQIfffHB")}
_HEADER = _HEADERS[HEADER_VERSION]
HEADER_SIZE = _HEADER.size
_MIN_HEADER_SIZE = min(h.size for h in _HEADERS.values())
MAX_EPOCH = 2**32 - 1
CRC_SIZE = 4
MAX_DEVICE_ID_BYTES = 64
MAX_SAMPLES = 16_384
MAX_MESSAGE_BYTES = HEADER_SIZE + MAX_DEVICE_ID_BYTES + 2 * MAX_SAMPLES + CRC_SIZE


@dataclass(frozen=True, slots=True)
class VibrationWindow:
    """One window of int16 samples from one sensor, as sent on the wire."""

    device_id: str
    seq: int
    timestamp_us: int
    sample_rate_hz: int
    scale: float
    samples: npt.NDArray[np.int16]
    epoch: int = 0
    """The device's boot epoch (0: a version-1 sender, or a device without a boot counter)."""
    rpm: float | None = None
    """Shaft speed in rpm from a tachometer or the drive (None: not known; a version-1/2 sender)."""
    load: float | None = None
    """Load as a fraction of rated, 0..1 (None: not known)."""

    def physical(self) -> npt.NDArray[np.float32]:
        """Return the samples in physical units (g)."""
        return self.samples.astype(np.float32) * np.float32(self.scale)


def encode(window: VibrationWindow) -> bytes:
    """Encode a window into the version-3 wire format (rpm None is sent as 0.0, load None as NaN).

    Args:
        window: The window to encode.

    Returns:
        The message bytes, CRC included.
    """
    device = window.device_id.encode("utf-8")
    if not 1 <= len(device) <= MAX_DEVICE_ID_BYTES:
        raise ValueError(f"device id must be 1..{MAX_DEVICE_ID_BYTES} UTF-8 bytes, got {len(device)}")
    samples = np.ascontiguousarray(window.samples, dtype="<i2")
    if samples.ndim != 1 or not 1 <= samples.size <= MAX_SAMPLES:
        raise ValueError(f"samples must be 1-D with 1..{MAX_SAMPLES} values, got shape {samples.shape}")
    if not 0 <= window.epoch <= MAX_EPOCH:
        raise ValueError(f"boot epoch must be 0..{MAX_EPOCH}, got {window.epoch}")
    header = _HEADER.pack(
        MAGIC,
        HEADER_VERSION,
        0,
        window.epoch,
        window.seq,
        window.timestamp_us,
        window.sample_rate_hz,
        window.scale,
        0.0 if window.rpm is None else window.rpm,
        math.nan if window.load is None else window.load,
        samples.size,
        len(device),
    )
    body = header + device + samples.tobytes()
    return body + struct.pack("<I", zlib.crc32(body))


def decode(payload: bytes) -> VibrationWindow:
    """Decode and integrity-check a version-3 (or version-1 or -2) message.

    Args:
        payload: The raw MQTT payload.

    Returns:
        The decoded window.

    Raises:
        DecodeError: The bytes are not a valid message; the message says why.
    """
    size = len(payload)
    if size > MAX_MESSAGE_BYTES:
        raise DecodeError(f"oversized message: {size} bytes, at most {MAX_MESSAGE_BYTES}")
    if size < _MIN_HEADER_SIZE + CRC_SIZE:
        raise DecodeError(f"truncated message: {size} bytes, a header and CRC need {_MIN_HEADER_SIZE + CRC_SIZE}")
    magic, version = bytes(payload[:2]), payload[2]
    if magic != MAGIC:
        raise DecodeError(f"bad magic {magic!r}, expected {MAGIC!r}")
    header = _HEADERS.get(version)
    if header is None:
        raise DecodeError(f"unsupported header version {version}, this decoder reads {sorted(_HEADERS)}")
    if size < header.size + CRC_SIZE:
        raise DecodeError(f"truncated message: {size} bytes, a version-{version} header and CRC need "
                          f"{header.size + CRC_SIZE}")  # fmt: skip
    rpm: float | None = None
    load: float | None = None
    if version == 1:
        _, _, _flags, seq, ts_us, fs, scale, n, id_len = header.unpack_from(payload)
        epoch = 0
    elif version == 2:
        _, _, _flags, epoch, seq, ts_us, fs, scale, n, id_len = header.unpack_from(payload)
    else:
        _, _, _flags, epoch, seq, ts_us, fs, scale, rpm_sent, load_sent, n, id_len = header.unpack_from(payload)
        # 0.0 and NaN mean "not known"; any other value, usable or not, is kept as sent (see the module doc)
        rpm = None if rpm_sent == 0.0 else rpm_sent
        load = None if math.isnan(load_sent) else load_sent
    start = header.size
    expected = start + id_len + 2 * n + CRC_SIZE
    if size != expected:
        kind = "truncated" if size < expected else "oversized"
        raise DecodeError(f"{kind} message: {size} bytes, header announces {expected} ({n} samples)")
    (crc_sent,) = struct.unpack_from("<I", payload, size - CRC_SIZE)
    crc_computed = zlib.crc32(memoryview(payload)[: size - CRC_SIZE])
    if crc_sent != crc_computed:
        raise DecodeError(f"bad CRC: message says {crc_sent:#010x}, content gives {crc_computed:#010x}")
    if id_len == 0 or n == 0:
        raise DecodeError(f"empty field: device id {id_len} bytes, {n} samples")
    if id_len > MAX_DEVICE_ID_BYTES or n > MAX_SAMPLES:  # what encode() refuses to write
        raise DecodeError(
            f"field out of range: device id {id_len} bytes (at most {MAX_DEVICE_ID_BYTES}), "
            f"{n} samples (at most {MAX_SAMPLES})"
        )
    try:
        device = bytes(payload[start : start + id_len]).decode("utf-8")
    except UnicodeDecodeError as exc:
        raise DecodeError(f"device id is not UTF-8: {exc.reason}") from None
    if not math.isfinite(scale) or scale <= 0:
        raise DecodeError(f"invalid scale {scale}: must be a finite positive number")
    samples = np.frombuffer(payload, dtype="<i2", count=n, offset=start + id_len)
    return VibrationWindow(device, seq, ts_us, fs, float(scale), samples, epoch, rpm, load)
