"""Over-the-air model delivery: message formats and the receiver state machine.

The protocol is specified in ``firmware/OTA_PROTOCOL.md``; this module is its reference
implementation for both sides:

* device side: :class:`OtaReceiver`, a pure state machine (no I/O) that checks a manifest
  (signature, audience, version, profile, DSP version, size, arena), assembles numbered chunks
  into a staging slot and checks the sha256; ``firmware/c/ota_receiver.c`` mirrors it and
  returns the same :class:`RxStatus` codes for the same bytes;
* server side: :func:`build_manifest` (signed with a :class:`~firmware.signing.ManifestSigner`)
  and :func:`split_model`; the server's MQTT publisher (retained manifests, chunks on request) is
  :class:`tasks.ota_publisher.ModelPublisher`;
* both: encode/decode of every message, on the topics ``tinymlops.contracts.topics`` names.
  Binary messages (manifest, chunk, chunk request) have a versioned header and a CRC-32;
  announce, status, scores and summary messages are compact JSON. Every decoder raises only :class:`OtaDecodeError`.

MQTT 3.1.1 only (QoS 1, retained messages), so the embedded amqtt broker works too.
"""

from __future__ import annotations

import enum
import hashlib
import itertools
import math
import re
import struct
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal, Self

import pydantic
from pydantic import BaseModel, ConfigDict, Field

from firmware.signing import (
    BadSignatureError,
    KeyRing,
    ManifestSigner,
    RevokedKeyError,
    UnknownKeyError,
    private_key_from_seed,
)
from tinymlops.contracts.dsp import READABLE_VERSIONS, DspSpec
from tinymlops.contracts.topics import (
    DEVICE_AUDIENCE,
    GROUP_AUDIENCE,
    NAME_PATTERN,
    check_name,
)
from tinymlops.errors import DecodeError, TinyMLOpsError

MAGIC = b"TO"
PROTOCOL_VERSION = 1
TYPE_MANIFEST = 1
TYPE_CHUNK = 2
TYPE_REQUEST = 3
MIN_CHUNK_SIZE = 256
MAX_CHUNK_SIZE = 4096
DEFAULT_CHUNK_SIZE = 1024
MAX_CHUNKS = 4096
MAX_REQUEST_INDICES = 64
MAX_NAME_BYTES = 64
MAX_TARGET_BYTES = 32
MAX_AUDIENCE_BYTES = 71  # "device:" and a 64-character id
MAX_KEY_ID_BYTES = 32
MAX_DSP_BLOCK_BYTES = 1024
MAX_DSP_BANDS = 120
MAX_REFERENCE_BLOCK_BYTES = 1024
REFERENCE_BLOCK_VERSION = 1
MAX_REFERENCES = 4
MAX_REFERENCE_VALUES = 256  # int8 inputs or outputs per reference
MAX_TOLERANCE_LSB = 16
DEFAULT_TOLERANCE_LSB = 2  # tflite-micro and tinyrt are bit-exact; a few LSB leave room for another runtime
TAG_BYTES = 8
SIGNATURE_BYTES = 64
CRC_BYTES = 4
JSON_VERSION = 1
U32_MAX = 0xFFFF_FFFF  # manifest versions, sizes and the arena are u32 on the wire
U16_MAX = 0xFFFF
MAX_FIRMWARE_CHARS = 2 * 255 + 3  # a gateway announces `firmware (board)`: two str8 of the serial protocol
MAX_ANNOUNCED_KEYS = 64
MAX_ANNOUNCED_DSP_VERSIONS = 16

_MANIFEST_HEADER = struct.Struct("<2sBBIIHHIf32sBBBBHH")
_CHUNK_HEADER = struct.Struct("<2sBBI8sHHH")
_REQUEST_HEADER = struct.Struct("<2sBBI8sH")
_DSP_HEADER = struct.Struct("<HIHHfH")
_DSP_SPEED = struct.Struct("<3f")  # version 2: reference rpm, valid rpm low, valid rpm high
_REFERENCE_HEADER = struct.Struct("<BBBHH")
_CRC = struct.Struct("<I")
MANIFEST_HEADER_SIZE = _MANIFEST_HEADER.size
CHUNK_HEADER_SIZE = _CHUNK_HEADER.size
REQUEST_HEADER_SIZE = _REQUEST_HEADER.size
DSP_HEADER_SIZE = _DSP_HEADER.size
REFERENCE_HEADER_SIZE = _REFERENCE_HEADER.size
# The largest valid manifest: the MQTT receive buffer an MCU needs for it (2379 bytes).
MAX_MANIFEST_BYTES = (
    MANIFEST_HEADER_SIZE + MAX_NAME_BYTES + MAX_TARGET_BYTES + MAX_AUDIENCE_BYTES + MAX_KEY_ID_BYTES
    + MAX_DSP_BLOCK_BYTES + MAX_REFERENCE_BLOCK_BYTES + SIGNATURE_BYTES + CRC_BYTES
)  # fmt: skip

_TARGET_PATTERN = re.compile(r"^[a-z0-9][a-z0-9_]{0,31}$")
_KEY_ID_PATTERN = re.compile(r"^[A-Za-z0-9._-]{1,32}$")
_PRINTABLE = re.compile(r"^[\x21-\x7e]+$")
# Score histogram bin edges, as multiples of the model's threshold; the last bin is open.
SCORE_EDGES_REL = (0.0, 0.25, 0.5, 0.75, 1.0, 1.5, 2.0, 4.0, 8.0)


class RxStatus(enum.IntEnum):
    """Result codes of the receiver, identical in ``firmware/c/ota_receiver.h`` (``OTA_<name>``)."""

    OK = 0
    DONE = 1
    DUPLICATE = 2
    SAME = 3
    ERR_NULL = -1
    ERR_TRUNCATED = -2
    ERR_MAGIC = -3
    ERR_VERSION = -4
    ERR_TYPE = -5
    ERR_LENGTH = -6
    ERR_CRC = -7
    ERR_FIELD = -8
    ERR_BAD_SIGNATURE = -9
    ERR_UNKNOWN_KEY = -10
    ERR_REVOKED_KEY = -11
    ERR_WRONG_AUDIENCE = -12
    ERR_NOT_NEWER = -13
    ERR_WRONG_PROFILE = -14
    ERR_DSP_VERSION = -15
    ERR_TOO_LARGE = -16
    ERR_ARENA = -17
    ERR_NO_MANIFEST = -18
    ERR_STALE = -19
    ERR_INDEX = -20
    ERR_INCOMPLETE = -21
    ERR_SHA256 = -22
    ERR_BUFFER = -23

    @property
    def is_error(self) -> bool:
        """Whether the code is a rejection (negative)."""
        return self.value < 0


# The short reason a device reports as ``failed: <reason>`` (or ``ignored: <reason>``).
REASONS: dict[RxStatus, str] = {
    RxStatus.ERR_BAD_SIGNATURE: "bad signature",
    RxStatus.ERR_UNKNOWN_KEY: "unknown key",
    RxStatus.ERR_REVOKED_KEY: "revoked key",
    RxStatus.ERR_WRONG_AUDIENCE: "wrong audience",
    RxStatus.ERR_NOT_NEWER: "not newer",
    RxStatus.ERR_WRONG_PROFILE: "wrong profile",
    RxStatus.ERR_DSP_VERSION: "unsupported dsp spec",
    RxStatus.ERR_TOO_LARGE: "too large",
    RxStatus.ERR_ARENA: "arena too large",
    RxStatus.ERR_SHA256: "sha256 mismatch",
    RxStatus.ERR_INCOMPLETE: "incomplete",
}


def reason_for(code: RxStatus) -> str:
    """Short reason for a rejection code; any decoding failure is ``bad manifest``."""
    return REASONS.get(code, "bad manifest")


class OtaError(TinyMLOpsError):
    """An OTA message cannot be built or an OTA operation is invalid."""


class OtaDecodeError(DecodeError):
    """Bytes received over MQTT are not a valid OTA message; ``code`` says which check failed."""

    def __init__(self, code: RxStatus, message: str) -> None:
        super().__init__(message)
        self.code = code


def crc32(data: bytes | bytearray | memoryview) -> int:
    """CRC-32 as zlib (reflected polynomial 0xEDB88320), the check of every binary OTA message."""
    return zlib.crc32(data) & 0xFFFFFFFF


def _with_crc(body: bytes) -> bytes:
    return body + _CRC.pack(crc32(body))


def device_audience(device: str) -> str:
    """Manifest audience of one device."""
    return DEVICE_AUDIENCE + check_name(device, "device id")


def group_audience(group: str) -> str:
    """Manifest audience of a group of devices."""
    return GROUP_AUDIENCE + check_name(group, "group")


# --- DSP block ------------------------------------------------------------------------------


def encode_dsp_block(spec: DspSpec) -> bytes:
    """The DSP spec as the manifest carries it: parameters and float32 normalisation stats.

    Version 1: header, mean[n], std[n]. Version 2 adds the speed trend the device applies per window:
    reference rpm, valid rpm low and high (f32 each), slope[n]. A spec without a trend travels as
    version 1, so devices built before speed awareness take it; the covered speed intervals stay on
    the server (the monitor judges them).

    Raises:
        OtaError: The spec has no normalisation statistics.
    """
    if not spec.is_fitted:
        raise OtaError("a deployed DSP spec needs normalisation statistics; fit it first")
    n = spec.n_features
    version = 2 if spec.speed_slope else 1
    header = _DSP_HEADER.pack(version, spec.sample_rate_hz, spec.window_samples, spec.n_bands, spec.f_min_hz, n)
    block = header + struct.pack(f"<{n}f", *spec.mean) + struct.pack(f"<{n}f", *spec.std)
    if version == 1:
        return block
    speed = _DSP_SPEED.pack(spec.speed_reference_rpm, *spec.speed_valid_rpm)
    return block + speed + struct.pack(f"<{n}f", *spec.speed_slope)


def _dsp_block_size(version: int, n: int) -> int:
    return DSP_HEADER_SIZE + 8 * n + (0 if version == 1 else _DSP_SPEED.size + 4 * n)


def decode_dsp_block(block: bytes) -> DspSpec:
    """Parse a version-1 or version-2 DSP block into a :class:`DspSpec`.

    Raises:
        OtaDecodeError: Not a valid block.
    """
    if len(block) < DSP_HEADER_SIZE:
        raise OtaDecodeError(RxStatus.ERR_FIELD, f"DSP block of {len(block)} bytes is shorter than its header")
    version, rate, window, n_bands, f_min, n = _DSP_HEADER.unpack_from(block)
    if version not in READABLE_VERSIONS:
        raise OtaDecodeError(RxStatus.ERR_DSP_VERSION, f"DSP spec version {version} is not {list(READABLE_VERSIONS)}")
    needed = _dsp_block_size(version, n)
    if len(block) != needed:
        raise OtaDecodeError(
            RxStatus.ERR_FIELD, f"DSP block is {len(block)} bytes, version {version} with {n} statistics needs {needed}"
        )
    if rate < 1 or not 16 <= window <= 16_384 or window & (window - 1):
        raise OtaDecodeError(RxStatus.ERR_FIELD, f"DSP rate {rate} Hz / window {window}: window not a power of two")
    if not 1 <= n_bands <= MAX_DSP_BANDS or n != n_bands + 3:
        raise OtaDecodeError(RxStatus.ERR_FIELD, f"DSP spec with {n_bands} bands needs {n_bands + 3} stats, has {n}")
    mean = struct.unpack_from(f"<{n}f", block, DSP_HEADER_SIZE)
    std = struct.unpack_from(f"<{n}f", block, DSP_HEADER_SIZE + 4 * n)
    if not (math.isfinite(f_min) and f_min >= 0 and all(map(math.isfinite, mean))):
        raise OtaDecodeError(RxStatus.ERR_FIELD, "DSP f_min or a feature mean is not finite")
    if not all(math.isfinite(s) and s > 0 for s in std):
        raise OtaDecodeError(RxStatus.ERR_FIELD, "a DSP feature std is not finite and > 0")
    if version == 1:
        return DspSpec(rate, window, n_bands, f_min, version, mean, std)
    reference, low, high = _DSP_SPEED.unpack_from(block, DSP_HEADER_SIZE + 8 * n)
    slope = struct.unpack_from(f"<{n}f", block, DSP_HEADER_SIZE + 8 * n + _DSP_SPEED.size)
    reference_ok = low <= reference <= high or (reference == 0 and not any(slope))  # 0: no speed data
    if not (all(map(math.isfinite, (reference, low, high, *slope))) and 0 < low < high and reference_ok):
        raise OtaDecodeError(
            RxStatus.ERR_FIELD, f"DSP speed reference {reference} rpm, valid {low}..{high} rpm or a slope is invalid"
        )
    has_trend = any(slope)
    return DspSpec(rate, window, n_bands, f_min, version, mean, std, reference, slope if has_trend else (), (),
                   (low, high))  # fmt: skip


# --- reference block -----------------------------------------------------------------------


@dataclass(frozen=True)
class ReferenceSet:
    """Reference inputs of a model and the int8 outputs it must give for them (the manifest's reference block).

    A device runs each input through the model it just loaded and refuses the model (``smoke test
    failed``, the old model keeps running) when an output differs from the expected one by more
    than ``tolerance`` LSB: a model that is not the one the server ran, or a runtime that does
    not compute it, never replaces a working one.

    Attributes:
        inputs: One int8 input tensor per reference (``bytes``, two's complement), all of one length.
        expected: The int8 output tensor the server's TFLite Micro gave for each input.
        tolerance: Largest accepted difference per output value, in LSB.
    """

    inputs: tuple[bytes, ...]
    expected: tuple[bytes, ...]
    tolerance: int = DEFAULT_TOLERANCE_LSB

    def encode(self) -> bytes:
        """The reference block (version 1): header, every input, then every expected output.

        Raises:
            OtaError: Out of the block's bounds.
        """
        problem = self.problem()
        if problem:
            raise OtaError(f"cannot encode references: {problem}")
        n_in, n_out = len(self.inputs[0]), len(self.expected[0])
        header = _REFERENCE_HEADER.pack(REFERENCE_BLOCK_VERSION, len(self.inputs), self.tolerance, n_in, n_out)
        return header + b"".join(self.inputs) + b"".join(self.expected)

    def problem(self) -> str | None:
        """The first bound the set breaks, in words; None when it is valid."""
        k = len(self.inputs)
        if not 1 <= k <= MAX_REFERENCES or len(self.expected) != k:
            return f"{k} inputs and {len(self.expected)} outputs: 1..{MAX_REFERENCES} of each, as many of both"
        n_in, n_out = len(self.inputs[0]), len(self.expected[0])
        if not (1 <= n_in <= MAX_REFERENCE_VALUES and 1 <= n_out <= MAX_REFERENCE_VALUES):
            return f"{n_in} inputs and {n_out} outputs per reference: each must be 1..{MAX_REFERENCE_VALUES}"
        if any(len(x) != n_in for x in self.inputs) or any(len(y) != n_out for y in self.expected):
            return "references of different lengths"
        if not 0 <= self.tolerance <= MAX_TOLERANCE_LSB:
            return f"tolerance {self.tolerance} LSB is outside 0..{MAX_TOLERANCE_LSB}"
        size = REFERENCE_HEADER_SIZE + k * (n_in + n_out)
        if size > MAX_REFERENCE_BLOCK_BYTES:
            return f"reference block of {size} bytes > {MAX_REFERENCE_BLOCK_BYTES}"
        return None

    def mismatch(self, index: int, output: bytes) -> str | None:
        """Why ``output`` (int8 bytes) does not reproduce reference ``index`` within the tolerance; None if it does."""
        expected = self.expected[index]
        if len(output) != len(expected):
            return f"reference {index + 1} of {len(self.inputs)}: {len(output)} outputs, expected {len(expected)}"
        got, want = struct.unpack(f"<{len(output)}b", output), struct.unpack(f"<{len(expected)}b", expected)
        worst = max(range(len(got)), key=lambda i: abs(got[i] - want[i]))
        off = abs(got[worst] - want[worst])
        if off <= self.tolerance:
            return None
        return (
            f"reference {index + 1} of {len(self.inputs)}: output {worst} is {got[worst]}, expected {want[worst]} "
            f"({off} LSB > {self.tolerance})"
        )


def decode_reference_block(block: bytes) -> ReferenceSet:
    """Parse a version-1 reference block.

    Raises:
        OtaDecodeError: Not a valid version-1 block (``ERR_FIELD``).
    """
    if len(block) < REFERENCE_HEADER_SIZE:
        raise OtaDecodeError(RxStatus.ERR_FIELD, f"reference block of {len(block)} bytes is shorter than its header")
    version, k, tolerance, n_in, n_out = _REFERENCE_HEADER.unpack_from(block)
    if version != REFERENCE_BLOCK_VERSION:
        raise OtaDecodeError(RxStatus.ERR_FIELD, f"reference block version {version} is not {REFERENCE_BLOCK_VERSION}")
    if len(block) != REFERENCE_HEADER_SIZE + k * (n_in + n_out):
        raise OtaDecodeError(
            RxStatus.ERR_FIELD, f"reference block is {len(block)} bytes, {k} x ({n_in} + {n_out}) values do not fit"
        )
    at = REFERENCE_HEADER_SIZE
    inputs = tuple(block[at + i * n_in : at + (i + 1) * n_in] for i in range(k))
    at += k * n_in
    expected = tuple(block[at + i * n_out : at + (i + 1) * n_out] for i in range(k))
    references = ReferenceSet(inputs, expected, tolerance)
    problem = references.problem()
    if problem:
        raise OtaDecodeError(RxStatus.ERR_FIELD, f"invalid reference block: {problem}")
    return references


def compute_references(model: bytes, arena_bytes: int | None = None, count: int = 3) -> ReferenceSet:
    """Reference inputs for ``model`` and the int8 outputs the server's TFLite Micro gives for them.

    The inputs are the quantized normalised feature vectors a device meets: all zeros (the training
    mean) and ``count - 1`` standard normal draws seeded by the model's sha256 (deterministic).

    Raises:
        OtaError: The model is not int8, does not run, or gives the same output for every input (a
            dead model: its output does not depend on what the sensor measures).
    """
    import numpy as np

    from firmware.tflm import TflmError, TflmRunner

    try:
        runner = TflmRunner(model, arena_bytes)
        n = runner.n_features
        seed = int.from_bytes(hashlib.sha256(model).digest()[:8], "little")
        features = np.vstack([np.zeros(n), np.random.default_rng(seed).standard_normal((count - 1, n))])
        inputs = runner.input.quantize(features.astype(np.float32)).astype(np.int8)
        outputs = runner.predict_int8(inputs)
    except TflmError as exc:
        raise OtaError(f"cannot compute the model's reference outputs: {exc}") from None
    if all(np.array_equal(outputs[0], row) for row in outputs[1:]):
        raise OtaError(
            f"the model gives the same output for all {count} reference inputs: its output does not depend on "
            "its input (a dead layer?); not deployable"
        )
    return ReferenceSet(tuple(r.tobytes() for r in inputs), tuple(r.tobytes() for r in outputs))


# --- manifest -------------------------------------------------------------------------------


def _f32(value: float) -> float:
    return float(struct.unpack("<f", struct.pack("<f", value))[0])


def _chunk_count(size: int, chunk_size: int) -> int:
    return -(-size // chunk_size)


@dataclass(frozen=True)
class Manifest:
    """What a device should run: model identity, integrity, delivery, DSP front end, threshold, signature.

    Attributes:
        model_name: Registered model name.
        model_version: Monotonic version (>= 1); a device ignores one not newer than what it has.
        target: MCU profile the model was validated for (catalog key).
        audience: ``device:<id>`` or ``group:<name>``: whom the manifest is for (signed).
        key_id: Id of the signing key.
        model_size: Bytes of the .tflite.
        chunk_size: Bytes per chunk (256-4096; the last chunk is shorter).
        chunk_count: ceil(model_size / chunk_size).
        sha256: sha256 of the whole model (32 bytes).
        arena_bytes: TFLite Micro tensor arena the server measured for these bytes.
        threshold: Anomaly threshold on the reconstruction error (float32).
        dsp_block: The DSP spec with normalisation statistics (:func:`encode_dsp_block`).
        reference_block: Reference inputs and the outputs the model must give (:class:`ReferenceSet`).
        signature: Ed25519 signature over :meth:`signed_bytes` (64 bytes; empty while unsigned).
    """

    model_name: str
    model_version: int
    target: str
    audience: str
    key_id: str
    model_size: int
    chunk_size: int
    chunk_count: int
    sha256: bytes
    arena_bytes: int
    threshold: float
    dsp_block: bytes
    reference_block: bytes
    signature: bytes = b""

    @property
    def dsp_version(self) -> int:
        """DSP spec version: the first field of ``dsp_block`` (0 when the block is too short to hold it)."""
        return int(struct.unpack_from("<H", self.dsp_block)[0]) if len(self.dsp_block) >= 2 else 0

    @property
    def tag(self) -> bytes:
        """First 8 bytes of the model sha256: binds chunks and requests to this model."""
        return self.sha256[:TAG_BYTES]

    @property
    def sha256_hex(self) -> str:
        """The model sha256 in hex."""
        return self.sha256.hex()

    def chunk_length(self, index: int) -> int:
        """Payload bytes of chunk ``index``."""
        return min(self.chunk_size, self.model_size - index * self.chunk_size)

    def dsp_spec(self) -> DspSpec:
        """The DSP spec this model expects.

        Raises:
            OtaDecodeError: The DSP block is not a valid version-1 spec.
        """
        return decode_dsp_block(self.dsp_block)

    def references(self) -> ReferenceSet:
        """The reference inputs and expected outputs the model must reproduce.

        Raises:
            OtaDecodeError: The reference block is not valid.
        """
        return decode_reference_block(self.reference_block)

    def signed_bytes(self) -> bytes:
        """Canonical bytes the signature covers: the whole message up to the signature."""
        texts = [s.encode() for s in (self.model_name, self.target, self.audience, self.key_id)]
        header = _MANIFEST_HEADER.pack(
            MAGIC, PROTOCOL_VERSION, TYPE_MANIFEST, self.model_version, self.model_size, self.chunk_size,
            self.chunk_count, self.arena_bytes, self.threshold, self.sha256, *map(len, texts), len(self.dsp_block),
            len(self.reference_block),
        )  # fmt: skip
        return header + b"".join(texts) + self.dsp_block + self.reference_block

    def signed(self, signer: ManifestSigner) -> Manifest:
        """Return a copy signed by ``signer`` (its key id replaces this one)."""
        unsigned = replace(self, key_id=signer.key_id, signature=b"")
        return replace(unsigned, signature=signer.sign(unsigned.signed_bytes()))

    def encode(self) -> bytes:
        """The manifest message: signed bytes, signature, CRC-32.

        Raises:
            OtaError: The manifest is not signed.
        """
        if len(self.signature) != SIGNATURE_BYTES:
            raise OtaError(f"manifest {self.model_name} v{self.model_version} is not signed")
        return _with_crc(self.signed_bytes() + self.signature)


def build_manifest(
    model: bytes,
    *,
    name: str,
    version: int,
    target: str,
    audience: str,
    dsp_spec: DspSpec,
    threshold: float,
    arena_bytes: int,
    signer: ManifestSigner,
    chunk_size: int = DEFAULT_CHUNK_SIZE,
    references: ReferenceSet | None = None,
) -> Manifest:
    """Build and sign the manifest of ``model`` for one audience.

    ``references`` is what the model must reproduce on the device; by default
    :func:`compute_references` on these bytes with the manifest's arena.

    Raises:
        OtaError: A field is out of the protocol's range (the message names it), or the model's
            references cannot be computed (not int8, or a dead model).
    """
    if references is None:
        references = compute_references(model, arena_bytes)
    manifest = Manifest(
        model_name=name,
        model_version=version,
        target=target,
        audience=audience,
        key_id=signer.key_id,
        model_size=len(model),
        chunk_size=chunk_size,
        chunk_count=_chunk_count(len(model), chunk_size) if chunk_size > 0 else 0,
        sha256=hashlib.sha256(model).digest(),
        arena_bytes=arena_bytes,
        threshold=_f32(threshold),
        dsp_block=encode_dsp_block(dsp_spec),
        reference_block=references.encode(),
    ).signed(signer)
    problem = _manifest_field_problem(manifest)
    if problem:
        raise OtaError(f"cannot build manifest: {problem}")
    return manifest


def _audience_ok(audience: str) -> bool:
    for prefix in (DEVICE_AUDIENCE, GROUP_AUDIENCE):
        if audience.startswith(prefix):
            return bool(NAME_PATTERN.match(audience.removeprefix(prefix)))
    return False


def _manifest_field_problem(m: Manifest) -> str | None:
    """The first field of ``m`` outside the protocol's range, in words; None when all are valid."""
    if m.model_version < 1 or m.model_size < 1 or m.arena_bytes < 1:
        return f"version {m.model_version}, size {m.model_size} and arena {m.arena_bytes} must be >= 1"
    if not MIN_CHUNK_SIZE <= m.chunk_size <= MAX_CHUNK_SIZE:
        return f"chunk size {m.chunk_size} is outside {MIN_CHUNK_SIZE}..{MAX_CHUNK_SIZE}"
    if m.chunk_count != _chunk_count(m.model_size, m.chunk_size) or m.chunk_count > MAX_CHUNKS:
        return f"chunk count {m.chunk_count} is not ceil({m.model_size}/{m.chunk_size}) <= {MAX_CHUNKS}"
    if not (math.isfinite(m.threshold) and m.threshold > 0):
        return f"threshold {m.threshold} must be finite and > 0"
    if not (1 <= len(m.model_name.encode()) <= MAX_NAME_BYTES and _PRINTABLE.match(m.model_name)):
        return f"model name {m.model_name!r} must be 1-{MAX_NAME_BYTES} printable ASCII characters"
    if not _TARGET_PATTERN.match(m.target):
        return f"target {m.target!r} must be 1-{MAX_TARGET_BYTES} characters of a-z 0-9 _"
    if not _audience_ok(m.audience):
        return f"audience {m.audience!r} must be device:<id> or group:<name>"
    if not _KEY_ID_PATTERN.match(m.key_id):
        return f"key id {m.key_id!r} must be 1-{MAX_KEY_ID_BYTES} characters of A-Z a-z 0-9 . _ -"
    if not 2 <= len(m.dsp_block) <= MAX_DSP_BLOCK_BYTES:
        return f"DSP block of {len(m.dsp_block)} bytes is outside 2..{MAX_DSP_BLOCK_BYTES}"
    if m.dsp_version in READABLE_VERSIONS:
        try:
            decode_dsp_block(m.dsp_block)
        except OtaDecodeError as exc:
            return str(exc)
    try:
        decode_reference_block(m.reference_block)
    except OtaDecodeError as exc:
        return str(exc)
    return None


def _check_binary_header(payload: bytes, msg_type: int, what: str) -> None:
    if len(payload) < 4:
        raise OtaDecodeError(RxStatus.ERR_TRUNCATED, f"truncated {what}: {len(payload)} bytes")
    if payload[:2] != MAGIC:
        raise OtaDecodeError(RxStatus.ERR_MAGIC, f"bad magic {bytes(payload[:2])!r} in {what}, expected {MAGIC!r}")
    if payload[2] != PROTOCOL_VERSION:
        raise OtaDecodeError(
            RxStatus.ERR_VERSION, f"{what} protocol version {payload[2]}, this reads {PROTOCOL_VERSION}"
        )
    if payload[3] != msg_type:
        raise OtaDecodeError(RxStatus.ERR_TYPE, f"message type {payload[3]} is not a {what} ({msg_type})")


def _check_length_and_crc(payload: bytes, expected: int, what: str) -> None:
    if len(payload) != expected:
        raise OtaDecodeError(RxStatus.ERR_LENGTH, f"{what} is {len(payload)} bytes, its header announces {expected}")
    (sent,) = _CRC.unpack_from(payload, expected - CRC_BYTES)
    computed = crc32(memoryview(payload)[: expected - CRC_BYTES])
    if sent != computed:
        raise OtaDecodeError(
            RxStatus.ERR_CRC, f"bad {what} CRC: message says {sent:#010x}, content gives {computed:#010x}"
        )


def decode_manifest(payload: bytes) -> Manifest:
    """Decode and integrity-check a manifest message (the signature is checked by the receiver).

    Raises:
        OtaDecodeError: Not a valid manifest; ``code`` names the failed check.
    """
    payload = bytes(payload)
    _check_binary_header(payload, TYPE_MANIFEST, "manifest")
    if len(payload) < MANIFEST_HEADER_SIZE + SIGNATURE_BYTES + CRC_BYTES:
        raise OtaDecodeError(RxStatus.ERR_TRUNCATED, f"truncated manifest: {len(payload)} bytes")
    (_, _, _, version, size, chunk_size, count, arena, threshold, sha, *lengths) = _MANIFEST_HEADER.unpack_from(payload)
    text_lengths, dsp_len, ref_len = lengths[:4], lengths[4], lengths[5]
    body_len = MANIFEST_HEADER_SIZE + sum(text_lengths) + dsp_len + ref_len
    _check_length_and_crc(payload, body_len + SIGNATURE_BYTES + CRC_BYTES, "manifest")
    limits = (MAX_NAME_BYTES, MAX_TARGET_BYTES, MAX_AUDIENCE_BYTES, MAX_KEY_ID_BYTES)
    if any(not 1 <= n <= limit for n, limit in zip(text_lengths, limits, strict=True)):
        raise OtaDecodeError(RxStatus.ERR_FIELD, f"manifest text field lengths {text_lengths} out of range {limits}")
    offset, texts = MANIFEST_HEADER_SIZE, []
    for n in text_lengths:
        raw = payload[offset : offset + n]
        if not all(0x21 <= b <= 0x7E for b in raw):
            raise OtaDecodeError(RxStatus.ERR_FIELD, f"manifest text field {raw!r} is not printable ASCII")
        texts.append(raw.decode("ascii"))
        offset += n
    manifest = Manifest(
        texts[0], version, texts[1], texts[2], texts[3], size, chunk_size, count, sha, arena, threshold,
        payload[offset : offset + dsp_len], payload[offset + dsp_len : body_len],
        payload[body_len : body_len + SIGNATURE_BYTES],
    )  # fmt: skip
    problem = _manifest_field_problem(manifest)
    if problem:
        raise OtaDecodeError(RxStatus.ERR_FIELD, f"invalid manifest: {problem}")
    return manifest


# --- chunks and requests --------------------------------------------------------------------


@dataclass(frozen=True)
class Chunk:
    """One numbered piece of a model.

    Attributes:
        model_version: Version of the manifest it belongs to.
        tag: First 8 bytes of the model sha256.
        index: 0-based chunk number.
        count: Chunks in the model.
        payload: The bytes (1..4096).
    """

    model_version: int
    tag: bytes
    index: int
    count: int
    payload: bytes

    def encode(self) -> bytes:
        """The chunk message: header, payload, CRC-32 over both."""
        header = _CHUNK_HEADER.pack(
            MAGIC, PROTOCOL_VERSION, TYPE_CHUNK, self.model_version, self.tag, self.index, self.count, len(self.payload)
        )
        return _with_crc(header + self.payload)


def split_model(model: bytes, manifest: Manifest) -> list[Chunk]:
    """Cut ``model`` into the manifest's chunks.

    Raises:
        OtaError: The bytes do not match the manifest's size or sha256.
    """
    if len(model) != manifest.model_size or hashlib.sha256(model).digest() != manifest.sha256:
        raise OtaError(
            f"model ({len(model)} bytes) does not match manifest {manifest.model_name} v{manifest.model_version}"
        )
    step = manifest.chunk_size
    return [
        Chunk(manifest.model_version, manifest.tag, i, manifest.chunk_count, model[i * step : (i + 1) * step])
        for i in range(manifest.chunk_count)
    ]


def decode_chunk(payload: bytes) -> Chunk:
    """Decode and CRC-check a chunk message.

    Raises:
        OtaDecodeError: Not a valid chunk; ``code`` names the failed check.
    """
    payload = bytes(payload)
    _check_binary_header(payload, TYPE_CHUNK, "chunk")
    if len(payload) < CHUNK_HEADER_SIZE + CRC_BYTES:
        raise OtaDecodeError(RxStatus.ERR_TRUNCATED, f"truncated chunk: {len(payload)} bytes")
    _, _, _, version, tag, index, count, length = _CHUNK_HEADER.unpack_from(payload)
    _check_length_and_crc(payload, CHUNK_HEADER_SIZE + length + CRC_BYTES, "chunk")
    if not 1 <= length <= MAX_CHUNK_SIZE or not 1 <= count <= MAX_CHUNKS:
        raise OtaDecodeError(RxStatus.ERR_FIELD, f"chunk length {length} or count {count} out of range")
    if index >= count:
        raise OtaDecodeError(RxStatus.ERR_INDEX, f"chunk index {index} >= count {count}")
    return Chunk(version, tag, index, count, payload[CHUNK_HEADER_SIZE : CHUNK_HEADER_SIZE + length])


@dataclass(frozen=True)
class ChunkRequest:
    """A device asks for chunks of one model (pull: the device drives pace, gaps and resume).

    Attributes:
        model_version: Version of the manifest.
        tag: First 8 bytes of the model sha256.
        indices: Chunk numbers wanted, strictly increasing, at most 64.
    """

    model_version: int
    tag: bytes
    indices: tuple[int, ...]

    def encode(self) -> bytes:
        """The request message: header, u16 indices, CRC-32."""
        n = len(self.indices)
        header = _REQUEST_HEADER.pack(MAGIC, PROTOCOL_VERSION, TYPE_REQUEST, self.model_version, self.tag, n)
        return _with_crc(header + struct.pack(f"<{n}H", *self.indices))


def decode_request(payload: bytes) -> ChunkRequest:
    """Decode and CRC-check a chunk request.

    Raises:
        OtaDecodeError: Not a valid request; ``code`` names the failed check.
    """
    payload = bytes(payload)
    _check_binary_header(payload, TYPE_REQUEST, "chunk request")
    if len(payload) < REQUEST_HEADER_SIZE + CRC_BYTES:
        raise OtaDecodeError(RxStatus.ERR_TRUNCATED, f"truncated chunk request: {len(payload)} bytes")
    _, _, _, version, tag, n = _REQUEST_HEADER.unpack_from(payload)
    _check_length_and_crc(payload, REQUEST_HEADER_SIZE + 2 * n + CRC_BYTES, "chunk request")
    indices = struct.unpack_from(f"<{n}H", payload, REQUEST_HEADER_SIZE)
    if not 1 <= n <= MAX_REQUEST_INDICES or any(b <= a for a, b in itertools.pairwise(indices)):
        raise OtaDecodeError(RxStatus.ERR_FIELD, f"chunk request needs 1..{MAX_REQUEST_INDICES} increasing indices")
    return ChunkRequest(version, tag, tuple(indices))


# --- JSON messages --------------------------------------------------------------------------


class _JsonMessage(BaseModel):
    """Compact JSON with a version field; unknown fields are ignored so newer senders stay readable."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    v: int = JSON_VERSION

    def encode(self) -> bytes:
        """Compact JSON bytes."""
        return self.model_dump_json().encode()

    @classmethod
    def decode(cls, payload: bytes) -> Self:
        """Parse a message.

        Raises:
            OtaDecodeError: Not JSON of this message, or another version.
        """
        try:
            message = cls.model_validate_json(bytes(payload))
        except pydantic.ValidationError as exc:
            first = exc.errors()[0]
            where = ".".join(str(p) for p in first["loc"]) or "message"
            raise OtaDecodeError(RxStatus.ERR_FIELD, f"invalid {cls.__name__} JSON: {where}: {first['msg']}") from None
        if message.v != JSON_VERSION:
            raise OtaDecodeError(RxStatus.ERR_VERSION, f"{cls.__name__} version {message.v}, this reads {JSON_VERSION}")
        if not _all_finite(message.model_dump()):
            # NaN/Infinity literals or an overflowing 1e999: not JSON numbers, and encode() would write null
            raise OtaDecodeError(RxStatus.ERR_FIELD, f"invalid {cls.__name__} JSON: a number is not finite")
        return message


def _all_finite(value: object) -> bool:
    """Whether every float in a dumped message (nested dicts and lists) is finite."""
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(map(_all_finite, value.values()))
    if isinstance(value, list | tuple):
        return all(map(_all_finite, value))
    return True


_Name = Field(pattern=NAME_PATTERN.pattern)
_U32 = Field(ge=0, le=U32_MAX)


class ModelRef(BaseModel):
    """A model a device runs."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    name: str = Field(pattern=r"^[\x21-\x7e]{1,64}$")  # a manifest's model name: printable ASCII, 1-64
    version: int = Field(ge=1, le=U32_MAX)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class _DeviceMessage(_JsonMessage):
    """A JSON message a device publishes on its own topics; the topic, not the ``device`` field, says who sent it."""

    noun: ClassVar[str] = "message"

    device: str = _Name

    @classmethod
    def decode_from(cls, device: str, payload: bytes) -> Self:
        """Parse a message received on the topic of ``device``.

        Raises:
            OtaDecodeError: Not a valid message, or it names another device than its topic.
        """
        message = cls.decode(payload)
        if message.device != device:
            raise OtaDecodeError(
                RxStatus.ERR_FIELD, f"{cls.noun} names device {message.device} on the topic of {device}"
            )
        return message


class Announcement(_DeviceMessage):
    """What a device can run, published retained at start and on every reconnect (TinyML-as-a-Service)."""

    noun: ClassVar[str] = "announcement"

    fleet: str = _Name
    group: str | None = Field(default=None, pattern=NAME_PATTERN.pattern)
    firmware: str = Field(pattern=rf"^[\x20-\x7e]{{1,{MAX_FIRMWARE_CHARS}}}$")
    profile: str = Field(pattern=_TARGET_PATTERN.pattern)
    flash_free: int = Field(ge=0, le=U32_MAX, description="Flash for models: catalog flash minus firmware and runtime.")
    slot_bytes: int = Field(ge=0, le=U32_MAX, description="Largest model accepted: the staging slot.")
    ram_free: int = Field(ge=0, le=U32_MAX, description="RAM for the tensor arena: SRAM minus the RAM reserve.")
    max_chunk: int = Field(ge=MIN_CHUNK_SIZE, le=MAX_CHUNK_SIZE)
    dsp_versions: list[Annotated[int, Field(ge=0, le=U16_MAX)]] = Field(max_length=MAX_ANNOUNCED_DSP_VERSIONS)
    key_ids: list[Annotated[str, Field(pattern=_KEY_ID_PATTERN.pattern)]] = Field(max_length=MAX_ANNOUNCED_KEYS)
    model: ModelRef | None = None
    ts: float


DeviceState = Literal["idle", "downloading", "verified", "loaded", "active", "failed", "ignored", "cancelled"]


class DeviceStatus(_DeviceMessage):
    """Deployment progress and outcome, published retained (the latest state wins).

    ``status`` is the human line (``downloading 3/7``, ``failed: too large``); ``state`` and
    ``reason`` are the same in fields. ``model``/``version`` name the manifest the status is
    about; ``active`` is what the device runs now.
    """

    noun: ClassVar[str] = "status"

    seq: int = Field(ge=0, description="Per-device counter: orders statuses.")
    ts: float
    state: DeviceState
    status: str
    reason: str = ""
    detail: str = ""
    model: str | None = None
    version: int | None = Field(default=None, ge=0, le=U32_MAX)
    received: int = Field(default=0, ge=0, le=MAX_CHUNKS)
    total: int = Field(default=0, ge=0, le=MAX_CHUNKS)
    active: ModelRef | None = None
    latency_ms: dict[str, float] = Field(default_factory=dict)
    counters: dict[str, int] = Field(default_factory=dict)


class ScoreBatch(_DeviceMessage):
    """Anomaly scores of consecutive windows of one device."""

    noun: ClassVar[str] = "score batch"

    model: str
    version: int = _U32
    threshold: float
    first_seq: int = Field(ge=0)
    ts: float
    scores: list[float]
    anomalies: list[bool]

    @pydantic.model_validator(mode="after")
    def _same_lengths(self) -> ScoreBatch:
        if len(self.scores) != len(self.anomalies):
            raise ValueError(f"{len(self.scores)} scores but {len(self.anomalies)} anomaly flags")
        return self


class DriftSummary(_DeviceMessage):
    """What a drift monitor needs from one device over one period, without the raw windows.

    ``score_counts[i]`` counts scores in ``[score_edges[i], score_edges[i+1])``, the last bin is
    open; edges are :data:`SCORE_EDGES_REL` times the threshold. Feature statistics are over
    the normalised features the model saw.
    """

    noun: ClassVar[str] = "summary"

    model: str
    version: int = _U32
    threshold: float
    start_ts: float
    end_ts: float
    windows: int = Field(ge=0)
    anomalies: int = Field(ge=0)
    score_mean: float
    score_edges: list[float]
    score_counts: list[int]
    feature_mean: list[float]
    feature_var: list[float]
    latency_ms: dict[str, float] = Field(default_factory=dict)
    speed_fallback: int = Field(
        default=0, ge=0, description="Windows scored at the fallback (reference) speed: theirs was unusable."
    )

    @pydantic.model_validator(mode="after")
    def _consistent(self) -> DriftSummary:
        if len(self.score_edges) != len(self.score_counts) or sum(self.score_counts) != self.windows:
            raise ValueError("score histogram does not match its edges or the window count")
        if len(self.feature_mean) != len(self.feature_var) or self.anomalies > self.windows:
            raise ValueError("feature statistics or anomaly count are inconsistent")
        if self.speed_fallback > self.windows:
            raise ValueError(f"{self.speed_fallback} fallback-speed windows of {self.windows}")
        return self


# --- the receiver (device side) -------------------------------------------------------------


@dataclass(frozen=True)
class ReceiverConfig:
    """What the receiver checks manifests against.

    Attributes:
        device_id: This device (audience ``device:<id>``).
        profile: MCU profile name a manifest's target must equal.
        slot_bytes: Staging slot: the largest model accepted.
        ram_bytes: RAM for the tensor arena: the largest arena accepted.
        group: Group (audience ``group:<name>``), if any.
        dsp_versions: DSP spec versions this firmware implements.
    """

    device_id: str
    profile: str
    slot_bytes: int
    ram_bytes: int
    group: str | None = None
    dsp_versions: frozenset[int] = frozenset(READABLE_VERSIONS)


@dataclass
class _Download:
    manifest: Manifest
    staging: bytearray
    received: bytearray  # one flag byte per chunk (the C receiver uses a bitmap)
    n_received: int = 0


class OtaReceiver:
    """The OTA state machine of one device, without I/O: manifest checks, chunk assembly, sha256.

    Args:
        config: Identity and limits.
        keyring: Trusted signing keys.
        active_version: Version of the model the device runs (0: none).

    Every call returns an :class:`RxStatus`; ``detail`` holds the last rejection in words.
    """

    def __init__(self, config: ReceiverConfig, keyring: KeyRing, active_version: int = 0) -> None:
        self.config = config
        self.keyring = keyring
        self.active_version = active_version
        self.highest_version = active_version
        self.detail = ""
        self._download: _Download | None = None
        self._last_digest = b""  # sha256 of the last accepted manifest message

    @property
    def manifest(self) -> Manifest | None:
        """The manifest being downloaded (or just completed)."""
        return self._download.manifest if self._download else None

    @property
    def received_count(self) -> int:
        """Chunks received of the current download."""
        return self._download.n_received if self._download else 0

    @property
    def complete(self) -> bool:
        """Whether every chunk of the current download is in."""
        d = self._download
        return d is not None and d.n_received == d.manifest.chunk_count

    def _reject(self, code: RxStatus, detail: str) -> RxStatus:
        self.detail = detail
        return code

    def on_manifest(self, payload: bytes) -> RxStatus:
        """Check a manifest and, if acceptable, start downloading it (replacing a download in progress).

        Checks in order: decoding, signature, audience, identical to the last accepted one
        (``SAME``), version, profile, DSP version, size against the slot, arena against RAM.
        """
        try:
            m = decode_manifest(payload)
        except OtaDecodeError as exc:
            return self._reject(exc.code, str(exc))
        try:
            self.keyring.verify(m.key_id, m.signed_bytes(), m.signature)
        except RevokedKeyError as exc:
            return self._reject(RxStatus.ERR_REVOKED_KEY, str(exc))
        except UnknownKeyError as exc:
            return self._reject(RxStatus.ERR_UNKNOWN_KEY, str(exc))
        except BadSignatureError as exc:
            return self._reject(RxStatus.ERR_BAD_SIGNATURE, str(exc))
        cfg = self.config
        audiences = {device_audience(cfg.device_id)} | ({group_audience(cfg.group)} if cfg.group else set())
        if m.audience not in audiences:
            return self._reject(RxStatus.ERR_WRONG_AUDIENCE, f"manifest is for {m.audience}, not {sorted(audiences)}")
        digest = hashlib.sha256(payload).digest()
        if digest == self._last_digest:
            return RxStatus.SAME
        newest = max(self.active_version, self.highest_version)
        if m.model_version <= newest:
            return self._reject(RxStatus.ERR_NOT_NEWER, f"version {m.model_version} is not newer than {newest}")
        if m.target != cfg.profile:
            return self._reject(RxStatus.ERR_WRONG_PROFILE, f"model is for {m.target}, this device is {cfg.profile}")
        if m.dsp_version not in cfg.dsp_versions:
            return self._reject(
                RxStatus.ERR_DSP_VERSION, f"DSP spec version {m.dsp_version} not in {sorted(cfg.dsp_versions)}"
            )
        if m.model_size > cfg.slot_bytes:
            return self._reject(RxStatus.ERR_TOO_LARGE, f"model {m.model_size} B > staging slot {cfg.slot_bytes} B")
        if m.arena_bytes > cfg.ram_bytes:
            return self._reject(RxStatus.ERR_ARENA, f"arena {m.arena_bytes} B > RAM free {cfg.ram_bytes} B")
        self._download = _Download(m, bytearray(m.model_size), bytearray(m.chunk_count))
        self._last_digest = digest
        self.highest_version = m.model_version
        return RxStatus.OK

    def on_chunk(self, payload: bytes) -> RxStatus:
        """Store a chunk: ``OK``, ``DONE`` (the last one missing), ``DUPLICATE``, or a rejection."""
        try:
            chunk = decode_chunk(payload)
        except OtaDecodeError as exc:
            return self._reject(exc.code, str(exc))
        d = self._download
        if d is None:
            return self._reject(RxStatus.ERR_NO_MANIFEST, "chunk received with no download in progress")
        m = d.manifest
        if chunk.model_version != m.model_version or chunk.tag != m.tag:
            return self._reject(
                RxStatus.ERR_STALE, f"chunk of v{chunk.model_version}/{chunk.tag.hex()}, downloading v{m.model_version}"
            )
        if chunk.count != m.chunk_count:
            return self._reject(RxStatus.ERR_FIELD, f"chunk count {chunk.count}, manifest says {m.chunk_count}")
        expected = m.chunk_length(chunk.index)
        if len(chunk.payload) != expected:
            return self._reject(
                RxStatus.ERR_LENGTH, f"chunk {chunk.index} has {len(chunk.payload)} bytes, expected {expected}"
            )
        if d.received[chunk.index]:
            return RxStatus.DUPLICATE
        start = chunk.index * m.chunk_size
        d.staging[start : start + expected] = chunk.payload
        d.received[chunk.index] = 1
        d.n_received += 1
        return RxStatus.DONE if d.n_received == m.chunk_count else RxStatus.OK

    def resume(self, staging: bytes, received: Sequence[int]) -> RxStatus:
        """Go on with the download of the manifest just accepted, from chunks kept across a restart.

        ``received[i]`` nonzero says chunk ``i`` is already in ``staging`` (the firmware keeps the bitmap
        in its transfer record, ``firmware/c/slots.h``); the final sha256 still checks them.
        ``OK``, ``DONE`` when none is missing, ``ERR_NO_MANIFEST`` without a download.
        """
        d = self._download
        if d is None:
            return self._reject(RxStatus.ERR_NO_MANIFEST, "no download to resume")
        n = d.manifest.chunk_count
        d.received = bytearray(1 if i < len(received) and received[i] else 0 for i in range(n))
        d.n_received = sum(d.received)
        size = min(len(staging), d.manifest.model_size)
        d.staging[:size] = staging[:size]
        return RxStatus.DONE if d.n_received == n else RxStatus.OK

    def has_chunk(self, index: int) -> bool:
        """Whether chunk ``index`` of the current download is in."""
        d = self._download
        return d is not None and 0 <= index < len(d.received) and bool(d.received[index])

    def missing(self, limit: int = MAX_REQUEST_INDICES) -> list[int]:
        """The first ``limit`` chunk numbers not received yet (where a resumed download goes on)."""
        d = self._download
        if d is None:
            return []
        return [i for i, have in enumerate(d.received) if not have][:limit]

    def request(self, limit: int = MAX_REQUEST_INDICES) -> ChunkRequest | None:
        """A request for the first ``limit`` missing chunks (at most 64), or None when nothing is missing."""
        wanted = self.missing(min(limit, MAX_REQUEST_INDICES))
        m = self.manifest
        if not wanted or m is None:
            return None
        return ChunkRequest(m.model_version, m.tag, tuple(wanted))

    def finish(self) -> RxStatus:
        """Check the assembled model's sha256; on mismatch the download is dropped."""
        d = self._download
        if d is None:
            return self._reject(RxStatus.ERR_NO_MANIFEST, "no download to finish")
        if d.n_received != d.manifest.chunk_count:
            return self._reject(
                RxStatus.ERR_INCOMPLETE, f"{d.manifest.chunk_count - d.n_received} of {d.manifest.chunk_count} missing"
            )
        digest = hashlib.sha256(d.staging).digest()
        if digest != d.manifest.sha256:
            self._download = None
            return self._reject(
                RxStatus.ERR_SHA256, f"model sha256 {digest.hex()[:16]}… != manifest {d.manifest.sha256_hex[:16]}…"
            )
        return RxStatus.OK

    def image(self) -> bytes:
        """The assembled model (after :meth:`finish` returned ``OK``).

        Raises:
            OtaError: No complete download.
        """
        if not self.complete or self._download is None:
            raise OtaError("no complete model in the staging slot")
        return bytes(self._download.staging)

    def commit(self) -> None:
        """The downloaded model became active: its version is now the active one."""
        if self._download is not None:
            self.active_version = self._download.manifest.model_version
        self._download = None

    def abort(self) -> None:
        """Drop the current download (the version stays seen: only a newer manifest is accepted)."""
        self._download = None


# --- test vectors for the C receiver --------------------------------------------------------


@dataclass
class _Transcript:
    """Vector files and the script of commands with the Python receiver's results."""

    directory: Path
    lines: list[str] = field(default_factory=list)
    files: dict[str, bytes] = field(default_factory=dict)

    def file(self, name: str, data: bytes) -> str:
        self.files[name] = data
        return name

    def add(self, *words: object) -> None:
        self.lines.append(" ".join(str(w) for w in words))


def _flip(data: bytes, offset: int) -> bytes:
    return data[:offset] + bytes([data[offset] ^ 0x5A]) + data[offset + 1 :]


def _recrc(message: bytes) -> bytes:
    return _with_crc(message[:-CRC_BYTES])


def write_test_vectors(directory: Path) -> list[Path]:
    """Write the deterministic OTA test vectors and the C test's script into ``directory``.

    The script (``script.txt``) is a transcript of the Python :class:`OtaReceiver` run on the
    vectors: each line is a command with the result the Python receiver gave, which
    ``firmware/c/test_ota_receiver.c`` replays and must reproduce. Keys come from fixed seeds
    and Ed25519 is deterministic, so the files are identical on every run.

    Returns:
        The files written, sorted.
    """
    key = ManifestSigner(private_key_from_seed(hashlib.sha256(b"tinymlops vector key 1").digest()), "vec-key-1")
    old = ManifestSigner(private_key_from_seed(hashlib.sha256(b"tinymlops vector key 0").digest()), "vec-key-0")
    stranger = ManifestSigner(private_key_from_seed(hashlib.sha256(b"tinymlops vector key x").digest()), "vec-key-x")
    keyring = KeyRing({key.key_id: key.public_key, old.key_id: old.public_key}, revoked=[old.key_id])
    config = ReceiverConfig("node-0007", "nrf52840", slot_bytes=262_144, ram_bytes=131_072, group="line-3")
    model = hashlib.shake_256(b"tinymlops vector model").digest(4500)
    n = DspSpec().n_features
    spec = DspSpec(mean=tuple(0.125 * i - 2 for i in range(n)), std=tuple(0.5 + 0.0625 * i for i in range(n)))
    values = hashlib.shake_256(b"tinymlops vector references").digest(4 * n)
    references = ReferenceSet((values[:n], values[n : 2 * n]), (values[2 * n : 3 * n], values[3 * n :]))
    base = {"name": "vibration-ae-nrf52840", "target": "nrf52840", "dsp_spec": spec, "threshold": 0.8125,
            "arena_bytes": 3656, "audience": device_audience("node-0007"), "references": references}  # fmt: skip

    def manifest(signer: ManifestSigner = key, version: int = 3, data: bytes = model, **changes: Any) -> Manifest:
        return build_manifest(data, version=version, signer=signer, **{**base, **changes})

    good = manifest()
    t = _Transcript(directory)
    versions = ",".join(map(str, sorted(config.dsp_versions)))
    t.add("config", config.device_id, config.group, config.profile, config.slot_bytes, config.ram_bytes, 2, versions)
    t.add("limit", "manifest", MAX_MANIFEST_BYTES)
    t.add("limit", "chunk", CHUNK_HEADER_SIZE + MAX_CHUNK_SIZE + CRC_BYTES)
    t.add("limit", "request", REQUEST_HEADER_SIZE + 2 * MAX_REQUEST_INDICES + CRC_BYTES)
    t.add("key", key.key_id, "trusted")
    t.add("key", old.key_id, "revoked")
    t.file("model.bin", model)
    t.add("sha256", "model.bin", hashlib.sha256(model).hexdigest())
    t.add("crc", "model.bin", 0, f"{crc32(model):08x}")
    chunk_files = []
    for chunk in split_model(model, good):
        name = t.file(f"chunk_{chunk.index:03d}.bin", chunk.encode())
        chunk_files.append(name)
        # CRC of everything before the message's own CRC field: must equal that field
        t.add("crc", name, CRC_BYTES, f"{crc32(t.files[name][:-CRC_BYTES]):08x}")

    good_bytes = good.encode()
    t.add("crc", "manifest_ok.bin", CRC_BYTES, f"{crc32(good_bytes[:-CRC_BYTES]):08x}")
    header_crc_fixed = bytearray(good_bytes)
    struct.pack_into("<H", header_crc_fixed, 12, 100)  # chunk_size 100: a field error behind a valid CRC
    resigned_threshold = bytearray(good_bytes)
    struct.pack_into("<f", resigned_threshold, 20, 0.5)  # content changed after signing
    opaque_dsp = replace(good, dsp_block=struct.pack("<H", 3) + b"\0" * 14).signed(key)
    trend = tuple(0.25 - 0.015625 * i for i in range(n))
    speed_spec = replace(spec, speed_reference_rpm=1200.0, speed_slope=trend, speed_coverage_rpm=((900.0, 1500.0),))
    speed_block = bytearray(encode_dsp_block(speed_spec))
    struct.pack_into("<f", speed_block, DSP_HEADER_SIZE + 8 * n, 50.0)  # reference below the valid range
    bad_speed = replace(good, dsp_block=bytes(speed_block)).signed(key)
    bad_references = replace(good, reference_block=b"\x02" + good.reference_block[1:]).signed(key)
    manifests: list[tuple[str, bytes]] = [
        ("manifest_ok", good_bytes),
        ("manifest_truncated", good_bytes[:40]),
        ("manifest_short", good_bytes[:-1]),
        ("manifest_bad_magic", b"XO" + good_bytes[2:]),
        ("manifest_bad_version", _recrc(good_bytes[:2] + b"\x02" + good_bytes[3:])),
        ("manifest_bad_type", _recrc(good_bytes[:3] + b"\x02" + good_bytes[4:])),
        ("manifest_bad_crc", _flip(good_bytes, 30)),
        ("manifest_bad_field", _recrc(bytes(header_crc_fixed))),
        ("manifest_bad_signature", _recrc(bytes(resigned_threshold))),
        ("manifest_unknown_key", manifest(stranger).encode()),
        ("manifest_revoked_key", manifest(old).encode()),
        ("manifest_wrong_audience", manifest(audience=device_audience("node-0008")).encode()),
        ("manifest_group", manifest(audience=group_audience("line-3")).encode()),
        ("manifest_old_version", manifest(version=2).encode()),
        ("manifest_wrong_profile", manifest(target="stm32l4r5").encode()),
        ("manifest_dsp_version", opaque_dsp.encode()),
        ("manifest_dsp_speed", manifest(dsp_spec=speed_spec).encode()),
        ("manifest_dsp_bad_speed", bad_speed.encode()),
        ("manifest_bad_references", bad_references.encode()),
        ("manifest_too_large", manifest(data=bytes(300_000)).encode()),
        ("manifest_arena", manifest(arena_bytes=200_000).encode()),
    ]
    for _name, payload in manifests:
        # The C stub verifier accepts exactly the (message, signature) pairs Python's Ed25519 accepts.
        try:
            m = decode_manifest(payload)
            keyring.verify(m.key_id, m.signed_bytes(), m.signature)
            t.add("trust", m.key_id, hashlib.sha256(m.signed_bytes()).hexdigest(), m.signature.hex())
        except (OtaDecodeError, BadSignatureError, UnknownKeyError, RevokedKeyError):
            pass
    for name, payload in manifests:
        rx = OtaReceiver(config, keyring, active_version=2)
        t.add("reset")
        t.add("manifest", t.file(f"{name}.bin", payload), rx.on_manifest(payload).name)

    tampered = _recrc(_flip(t.files[chunk_files[2]], CHUNK_HEADER_SIZE + 7))
    other_tag = Chunk(3, bytes(TAG_BYTES), 0, 5, model[:1024]).encode()
    corrupt_chunks = {
        "chunk_bad_crc": _flip(t.files[chunk_files[1]], CHUNK_HEADER_SIZE + 3),
        "chunk_truncated": t.files[chunk_files[1]][:20],
        "chunk_short": t.files[chunk_files[1]][:-9],
        "chunk_stale": other_tag,
        "chunk_bad_index": Chunk(3, good.tag, 9, 5, model[:1024]).encode(),
        "chunk_bad_length": Chunk(3, good.tag, 1, 5, model[1024:1124]).encode(),
        "chunk_bad_count": Chunk(3, good.tag, 1, 6, model[1024:2048]).encode(),
        "chunk_tampered": tampered,
    }
    for name, payload in corrupt_chunks.items():
        t.file(f"{name}.bin", payload)

    rx = OtaReceiver(config, keyring, active_version=2)

    def step(kind: str, name: str) -> None:
        payload = t.files[name]
        code = rx.on_manifest(payload) if kind == "manifest" else rx.on_chunk(payload)
        t.add(kind, name, code.name)

    def missing(limit: int) -> None:
        t.add("missing", limit, ",".join(map(str, rx.missing(limit))) or "-")

    def request(limit: int, name: str) -> None:
        req = rx.request(limit)
        t.add("request", limit, t.file(name, req.encode() if req else b""))

    t.add("reset")
    step("chunk", chunk_files[0])  # no manifest yet
    step("manifest", "manifest_ok.bin")
    step("manifest", "manifest_ok.bin")  # redelivered retained manifest
    request(3, "request_first.bin")
    for name in (chunk_files[3], chunk_files[0], chunk_files[3], *(f"{c}.bin" for c in corrupt_chunks)):
        if name != "chunk_tampered.bin":
            step("chunk", name)
    missing(8)
    request(8, "request_resume.bin")
    t.add("finish", rx.finish().name)
    for name in (chunk_files[1], chunk_files[4], chunk_files[2]):
        step("chunk", name)
    missing(8)
    t.add("finish", rx.finish().name)
    t.add("image", "model.bin")
    rx.commit()
    t.add("commit")
    step("manifest", "manifest_ok.bin")
    step("manifest", "manifest_group.bin")  # same version as the active model now
    t.add("reset")
    rx = OtaReceiver(config, keyring, active_version=2)
    step("manifest", "manifest_ok.bin")
    for name in (chunk_files[0], chunk_files[1], "chunk_tampered.bin", chunk_files[3], chunk_files[4]):
        step("chunk", name)
    t.add("finish", rx.finish().name)
    step("chunk", chunk_files[0])  # the download was dropped

    directory.mkdir(parents=True, exist_ok=True)
    t.files["script.txt"] = ("\n".join(t.lines) + "\n").encode()
    written = []
    for name, data in sorted(t.files.items()):
        (directory / name).write_bytes(data)
        written.append(directory / name)
    return written


def vector_files(directory: Path) -> dict[str, bytes]:
    """Read every file of a vector directory by name (to compare with a fresh :func:`write_test_vectors`)."""
    return {p.name: p.read_bytes() for p in sorted(directory.iterdir()) if p.is_file()}
