"""Property-based fuzzing of every decoder that reads bytes from the network.

Decoders: ``firmware.codec.decode`` (documented error :class:`~tinymlops.errors.DecodeError`);
``firmware.ota.decode_manifest``, ``decode_chunk``, ``decode_request``, ``decode_dsp_block`` and the
JSON messages ``Announcement``, ``DeviceStatus``, ``ScoreBatch``, ``DriftSummary`` (documented error
:class:`~firmware.ota.OtaDecodeError`). Properties:

* any bytes: the decoder returns a valid object or raises only its documented error; an accepted
  message is valid in the strongest sense, it encodes back (to the same bytes for binary formats);
* round trip: ``decode(encode(x)) == x`` for generated valid messages;
* mutation: a single changed byte, a truncation or an extension of a valid binary message is always
  rejected (CRC-32 and the length fields catch every one); a mutated JSON message is rejected or
  decodes to a valid message; a mutated binary message with its CRC fixed up reaches the field checks,
  which must reject it with the documented error or accept a message that re-encodes identically.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import struct
import zlib
from collections.abc import Callable
from typing import Any, get_args

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from firmware import codec
from firmware.ota import (
    MAX_CHUNK_SIZE,
    MAX_CHUNKS,
    MAX_DSP_BANDS,
    MAX_DSP_BLOCK_BYTES,
    MAX_REQUEST_INDICES,
    MIN_CHUNK_SIZE,
    TAG_BYTES,
    Announcement,
    Chunk,
    ChunkRequest,
    DeviceState,
    DeviceStatus,
    DriftSummary,
    Manifest,
    ModelRef,
    OtaDecodeError,
    ReferenceSet,
    ScoreBatch,
    decode_chunk,
    decode_dsp_block,
    decode_manifest,
    decode_request,
    encode_dsp_block,
)
from firmware.signing import KeyRing, ManifestSigner, generate_keypair
from tinymlops.contracts.dsp import READABLE_VERSIONS, DspSpec
from tinymlops.errors import DecodeError

PRIVATE_KEY, PUBLIC_KEY = generate_keypair()
JsonMessage = Announcement | DeviceStatus | ScoreBatch | DriftSummary
JSON_KINDS: tuple[type[JsonMessage], ...] = (Announcement, DeviceStatus, ScoreBatch, DriftSummary)
# The machine is shared: no per-example deadline; each property keeps its example count small.
FAST = settings(max_examples=250, deadline=None)

# --- strategies -------------------------------------------------------------------------------

U16 = st.integers(0, 2**16 - 1)
U32 = st.integers(0, 2**32 - 1)
U64 = st.integers(0, 2**64 - 1)
NAMES = st.from_regex(r"[A-Za-z0-9_-]{1,64}", fullmatch=True)
TEXT = st.text(max_size=24)
FINITE = st.floats(allow_nan=False, allow_infinity=False)
F32 = st.floats(width=32, allow_nan=False, allow_infinity=False)
F32_POSITIVE = st.floats(width=32, min_value=0.0, exclude_min=True, allow_infinity=False)
NON_NEGATIVE = st.integers(min_value=0)


@st.composite
def windows(draw: st.DrawFn, max_samples: int = codec.MAX_SAMPLES) -> codec.VibrationWindow:
    """A valid vibration window: UTF-8 device id of 1-64 bytes, 1..16384 int16 samples."""
    device = draw(st.text(min_size=1, max_size=64).filter(lambda s: len(s.encode()) <= codec.MAX_DEVICE_ID_BYTES))
    n = draw(st.one_of(st.integers(1, min(64, max_samples)), st.integers(1, max_samples)))
    seed = draw(U32)  # samples from a seeded generator: fast for 16k values, still reproducible
    samples = np.random.default_rng(seed).integers(-(2**15), 2**15, n, dtype=np.int16)
    # any float32 rpm and load, unusable ones included: they are data, never a decode error
    rpm, load = draw(st.none() | st.floats(width=32)), draw(st.none() | st.floats(width=32))
    return codec.VibrationWindow(device, draw(U32), draw(U64), draw(U32), draw(F32_POSITIVE), samples, draw(U32),
                                 rpm, load)  # fmt: skip


@st.composite
def opaque_dsp_blocks(draw: st.DrawFn) -> bytes:
    """A DSP block of another version: the manifest carries it, the device refuses it."""
    version = draw(U16.filter(lambda v: v not in READABLE_VERSIONS))
    size = draw(st.integers(0, MAX_DSP_BLOCK_BYTES - 2))
    return struct.pack("<H", version) + np.random.default_rng(draw(U32)).bytes(size)


@st.composite
def fitted_dsp_blocks(draw: st.DrawFn) -> bytes:
    """A DSP block of a fitted spec: any version, rate, window, band count and statistics in range."""
    version = draw(st.sampled_from(READABLE_VERSIONS))
    # a version-2 block also carries a slope per feature: at most 80 bands fit the manifest's 1,024 bytes
    n_bands = draw(st.integers(1, MAX_DSP_BANDS if version == 1 else 80))
    n = n_bands + 3
    # Up to 246 statistics: a seeded generator fills them, hypothesis places a few extreme values.
    rng = np.random.default_rng(draw(U32))
    mean = rng.normal(0.0, 3.0, n).astype(np.float32).tolist()
    std = rng.uniform(1e-3, 10.0, n).astype(np.float32).tolist()
    for _ in range(draw(st.integers(0, 3))):
        mean[draw(st.integers(0, n - 1))] = draw(F32)
        std[draw(st.integers(0, n - 1))] = draw(F32_POSITIVE)
    spec = DspSpec(
        sample_rate_hz=draw(st.integers(1, 2**32 - 1)),
        window_samples=2 ** draw(st.integers(4, 14)),
        n_bands=n_bands,
        f_min_hz=draw(st.floats(width=32, min_value=0.0, allow_infinity=False)),
        version=version,
        mean=tuple(mean),
        std=tuple(std),
    )
    if version == 2:
        reference = float(np.float32(rng.uniform(60.0, 60_000.0)))
        slope = tuple(rng.normal(0.0, 2.0, n).astype(np.float32).tolist())
        spec = dataclasses.replace(spec, speed_reference_rpm=reference, speed_slope=slope)
    return encode_dsp_block(spec)


@st.composite
def reference_blocks(draw: st.DrawFn) -> bytes:
    """A reference block within its bounds: 1..4 references, at most 1024 bytes in all."""
    count = draw(st.integers(1, 4))
    n_in = draw(st.integers(1, 1017 // count - 1))
    n_out = draw(st.integers(1, min(256, 1017 // count - n_in)))
    n_in = min(n_in, 256)
    inputs = tuple(draw(st.binary(min_size=n_in, max_size=n_in)) for _ in range(count))
    expected = tuple(draw(st.binary(min_size=n_out, max_size=n_out)) for _ in range(count))
    return ReferenceSet(inputs, expected, draw(st.integers(0, 16))).encode()


@st.composite
def manifests(draw: st.DrawFn) -> Manifest:
    """A manifest within every protocol range, signed with a generated Ed25519 key."""
    chunk_size = draw(st.integers(MIN_CHUNK_SIZE, MAX_CHUNK_SIZE))
    model_size = draw(st.integers(1, chunk_size * MAX_CHUNKS))
    unsigned = Manifest(
        model_name=draw(st.from_regex(r"[\x21-\x7e]{1,64}", fullmatch=True)),
        model_version=draw(st.integers(1, 2**32 - 1)),
        target=draw(st.from_regex(r"[a-z0-9][a-z0-9_]{0,31}", fullmatch=True)),
        audience=draw(st.sampled_from(["device:", "group:"])) + draw(NAMES),
        key_id="",
        model_size=model_size,
        chunk_size=chunk_size,
        chunk_count=-(-model_size // chunk_size),
        sha256=draw(st.binary(min_size=32, max_size=32)),
        arena_bytes=draw(st.integers(1, 2**32 - 1)),
        threshold=draw(F32_POSITIVE),
        dsp_block=draw(opaque_dsp_blocks() | fitted_dsp_blocks()),
        reference_block=draw(reference_blocks()),
    )
    key_id = draw(st.from_regex(r"[A-Za-z0-9._-]{1,32}", fullmatch=True))
    return unsigned.signed(ManifestSigner(PRIVATE_KEY, key_id))


@st.composite
def chunks(draw: st.DrawFn) -> Chunk:
    """A chunk: index below count, 1..4096 payload bytes."""
    count = draw(st.integers(1, MAX_CHUNKS))
    payload = draw(st.binary(min_size=1, max_size=MAX_CHUNK_SIZE))
    return Chunk(draw(U32), draw(st.binary(min_size=TAG_BYTES, max_size=TAG_BYTES)), draw(st.integers(0, count - 1)),
                 count, payload)  # fmt: skip


requests = st.builds(
    ChunkRequest,
    model_version=U32,
    tag=st.binary(min_size=TAG_BYTES, max_size=TAG_BYTES),
    indices=st.sets(U16, min_size=1, max_size=MAX_REQUEST_INDICES).map(lambda s: tuple(sorted(s))),
)
# Valid messages within the protocol's bounds (u32 versions and sizes, the manifest's name rules); the
# tests below then break one field at a time.
model_refs = st.builds(ModelRef, name=st.from_regex(r"[\x21-\x7e]{1,64}", fullmatch=True),
                       version=st.integers(1, 2**32 - 1),
                       sha256=st.from_regex(r"[0-9a-f]{64}", fullmatch=True))  # fmt: skip
announcements = st.builds(
    Announcement, device=NAMES, fleet=NAMES, group=st.none() | NAMES,
    firmware=st.from_regex(r"[\x20-\x7e]{1,40}", fullmatch=True),
    profile=st.from_regex(r"[a-z0-9][a-z0-9_]{0,31}", fullmatch=True), flash_free=U32, slot_bytes=U32, ram_free=U32,
    max_chunk=st.integers(MIN_CHUNK_SIZE, MAX_CHUNK_SIZE), dsp_versions=st.lists(U16, max_size=4),
    key_ids=st.lists(st.from_regex(r"[A-Za-z0-9._-]{1,32}", fullmatch=True), max_size=4),
    model=st.none() | model_refs, ts=FINITE,
)  # fmt: skip
statuses = st.builds(
    DeviceStatus, device=NAMES, seq=NON_NEGATIVE, ts=FINITE, state=st.sampled_from(get_args(DeviceState)),
    status=TEXT, reason=TEXT, detail=TEXT, model=st.none() | TEXT, version=st.none() | U32,
    received=st.integers(0, 4096), total=st.integers(0, 4096), active=st.none() | model_refs,
    latency_ms=st.dictionaries(TEXT, FINITE, max_size=4), counters=st.dictionaries(TEXT, st.integers(), max_size=4),
)  # fmt: skip


@st.composite
def score_batches(draw: st.DrawFn) -> ScoreBatch:
    """As many anomaly flags as scores."""
    n = draw(st.integers(0, 40))
    return ScoreBatch(device=draw(NAMES), model=draw(TEXT), version=draw(U32), threshold=draw(FINITE),
                      first_seq=draw(NON_NEGATIVE), ts=draw(FINITE),
                      scores=draw(st.lists(FINITE, min_size=n, max_size=n)),
                      anomalies=draw(st.lists(st.booleans(), min_size=n, max_size=n)))  # fmt: skip


@st.composite
def drift_summaries(draw: st.DrawFn) -> DriftSummary:
    """A consistent histogram (counts sum to the windows), anomalies <= windows, paired feature statistics."""
    counts = draw(st.lists(st.integers(0, 10**6), max_size=12))
    windows = sum(counts)
    n_features = draw(st.integers(0, 40))
    return DriftSummary(
        device=draw(NAMES), model=draw(TEXT), version=draw(U32), threshold=draw(FINITE),
        start_ts=draw(FINITE), end_ts=draw(FINITE), windows=windows, anomalies=draw(st.integers(0, windows)),
        score_mean=draw(FINITE), score_edges=draw(st.lists(FINITE, min_size=len(counts), max_size=len(counts))),
        score_counts=counts, feature_mean=draw(st.lists(FINITE, min_size=n_features, max_size=n_features)),
        feature_var=draw(st.lists(FINITE, min_size=n_features, max_size=n_features)),
        latency_ms=draw(st.dictionaries(TEXT, FINITE, max_size=3)),
    )  # fmt: skip


JSON_STRATEGIES: dict[type[JsonMessage], st.SearchStrategy[Any]] = {
    Announcement: announcements,
    DeviceStatus: statuses,
    ScoreBatch: score_batches(),
    DriftSummary: drift_summaries(),
}
# Any JSON value, NaN and Infinity literals and huge numbers included (json.dumps writes them).
json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


# --- the decoders as (name, decode, encode of a decoded object, documented error) -------------


def _codec_canonical(payload: bytes) -> bytes:
    """What ``encode`` writes for an accepted window: version 3, the reserved flags byte 0 (decode ignores it).

    A version-1 message gains boot epoch 0 (the 4 bytes after the flags), a version-1 or -2 one rpm 0.0 and
    load NaN after the scale (not known). Of a version-3 rpm, -0.0 is 0.0 (both not known) and a signalling
    NaN its quiet form (a float32 through a Python float); any NaN load is the one NaN ``encode`` writes.
    """
    rest = payload[4:-4] if payload[2] != 1 else bytes(4) + payload[4:-4]
    if payload[2] == 3:
        rpm, load = struct.unpack_from("<ff", rest, 24)
        rest = rest[:24] + rest[32:]
    else:
        rpm, load = 0.0, math.nan
    condition = struct.pack("<ff", 0.0 if rpm == 0 else rpm, math.nan if math.isnan(load) else load)
    body = payload[:2] + b"\x03\x00" + rest[:24] + condition + rest[24:]
    return body + struct.pack("<I", zlib.crc32(body))


BINARY: dict[str, tuple[Callable[[bytes], Any], st.SearchStrategy[Any]]] = {
    "vibration": (codec.decode, windows()),
    "manifest": (decode_manifest, manifests()),
    "chunk": (decode_chunk, chunks()),
    "request": (decode_request, requests),
}


def encode_any(message: Any) -> bytes:
    return codec.encode(message) if isinstance(message, codec.VibrationWindow) else bytes(message.encode())


def assert_binary_accepted_is_valid(kind: str, payload: bytes, decoded: Any) -> None:
    """An accepted binary message is a valid object: it re-encodes to the very bytes it came from."""
    if kind == "vibration":
        assert isinstance(decoded, codec.VibrationWindow)
        assert codec.encode(decoded) == _codec_canonical(payload)
    else:
        assert decoded.encode() == payload


def _known(value: float | None, unknown: Callable[[float], bool]) -> str | None:
    """An rpm or load as comparable text: None when not known (None, or what encodes as not known)."""
    return None if value is None or unknown(value) else repr(value)


def assert_same_window(a: codec.VibrationWindow, b: codec.VibrationWindow) -> None:
    assert (a.device_id, a.epoch, a.seq, a.timestamp_us, a.sample_rate_hz, a.scale) == (
        b.device_id, b.epoch, b.seq, b.timestamp_us, b.sample_rate_hz, b.scale,
    )  # fmt: skip
    assert _known(a.rpm, lambda rpm: rpm == 0) == _known(b.rpm, lambda rpm: rpm == 0)
    assert _known(a.load, math.isnan) == _known(b.load, math.isnan)
    assert b.samples.dtype == np.int16 and np.array_equal(a.samples, b.samples)


def decode_binary_or_documented_error(kind: str, payload: bytes) -> None:
    """Decode: a one-line documented error, or a valid message (any other exception fails the test)."""
    decode = BINARY[kind][0]
    documented = DecodeError if kind == "vibration" else OtaDecodeError
    try:
        decoded = decode(payload)
    except documented as exc:
        assert str(exc) and "\n" not in str(exc), repr(exc)  # one line naming what is wrong
        return
    assert_binary_accepted_is_valid(kind, payload, decoded)


def decode_json_or_documented_error(kind: type[JsonMessage], payload: bytes) -> None:
    """Decode; an accepted message must be valid: it encodes to JSON that decodes back to an equal message."""
    try:
        decoded = kind.decode(payload)
    except OtaDecodeError as exc:
        assert str(exc) and "\n" not in str(exc), repr(exc)
        return
    assert isinstance(decoded, kind)
    assert kind.decode(decoded.encode()) == decoded, payload


# --- (a) arbitrary bytes ----------------------------------------------------------------------


@FAST
@given(data=st.data(), kind=st.sampled_from(sorted(BINARY)))
def test_binary_decoders_take_any_bytes(data: st.DataObject, kind: str) -> None:
    prefix = {"vibration": b"TV\x03", "manifest": b"TO\x01\x01", "chunk": b"TO\x01\x02", "request": b"TO\x01\x03"}
    # raw bytes rarely pass the magic: also start from the right header, or from a real message's header
    valid = encode_any(data.draw(BINARY[kind][1], label="message"))
    start = data.draw(st.sampled_from([b"", prefix[kind], valid[: len(valid) // 2]]), label="start")
    decode_binary_or_documented_error(kind, start + data.draw(st.binary(max_size=2048), label="tail"))


@FAST
@given(kind=st.sampled_from(JSON_KINDS), payload=st.binary(max_size=512))
def test_json_decoders_take_any_bytes(kind: type[JsonMessage], payload: bytes) -> None:
    decode_json_or_documented_error(kind, payload)


@FAST
@given(kind=st.sampled_from(JSON_KINDS), value=json_values)
def test_json_decoders_take_any_json_value(kind: type[JsonMessage], value: Any) -> None:
    decode_json_or_documented_error(kind, json.dumps(value).encode())


@FAST
@given(data=st.data(), kind=st.sampled_from(JSON_KINDS))
def test_json_decoders_take_any_value_in_any_field(data: st.DataObject, kind: type[JsonMessage]) -> None:
    # A valid message with one field replaced by any JSON value (NaN, 1e999, nesting...) or dropped.
    fields = data.draw(JSON_STRATEGIES[kind], label="message").model_dump(mode="json")
    name = data.draw(st.sampled_from(sorted(fields)), label="field")
    if data.draw(st.booleans(), label="drop"):
        del fields[name]
    else:
        fields[name] = data.draw(json_values | st.floats() | st.integers(), label="value")  # numbers: most fields
    decode_json_or_documented_error(kind, json.dumps(fields).encode())


EXAMPLES: dict[type[JsonMessage], tuple[JsonMessage, str, Any]] = {
    # a valid message, a numeric field, where in that field the number goes
    Announcement: (
        Announcement(device="node-1", fleet="plant", firmware="1.0", profile="nrf52840", flash_free=1, slot_bytes=1,
                     ram_free=1, max_chunk=1024, dsp_versions=[1], key_ids=["k"], ts=1.0),
        "ts", "__X__",
    ),
    DeviceStatus: (DeviceStatus(device="node-1", seq=1, ts=1.0, state="idle", status="idle"), "latency_ms",
                   {"deploy_ms": "__X__"}),
    ScoreBatch: (
        ScoreBatch(device="node-1", model="m", version=1, threshold=0.5, first_seq=0, ts=1.0, scores=[0.1],
                   anomalies=[False]),
        "scores", ["__X__"],
    ),
    DriftSummary: (
        DriftSummary(device="node-1", model="m", version=1, threshold=0.5, start_ts=0.0, end_ts=1.0, windows=1,
                     anomalies=0, score_mean=0.1, score_edges=[0.0], score_counts=[1], feature_mean=[0.0],
                     feature_var=[1.0]),
        "threshold", "__X__",
    ),
}  # fmt: skip


@pytest.mark.parametrize("literal", ["NaN", "Infinity", "-Infinity", "1e999"])
@pytest.mark.parametrize("kind", JSON_KINDS)
def test_json_decoders_refuse_numbers_json_cannot_carry(kind: type[JsonMessage], literal: str) -> None:
    # Found by the fuzzing above: these parsed into NaN or infinite numbers, which re-encode as null.
    message, field, placeholder = EXAMPLES[kind]
    assert kind.decode(message.encode()) == message
    text = json.dumps({**message.model_dump(mode="json"), field: placeholder}).replace('"__X__"', literal)
    with pytest.raises(OtaDecodeError, match="not finite"):
        kind.decode(text.encode())


@FAST
@given(data=st.data())
def test_dsp_block_decoder_takes_any_bytes(data: st.DataObject) -> None:
    # random bytes, random bytes behind a readable version field, or a valid block with one mutation
    readable = st.builds(
        lambda v, b: struct.pack("<H", v) + b,
        st.sampled_from(READABLE_VERSIONS),
        st.binary(max_size=MAX_DSP_BLOCK_BYTES),
    )
    mutated = fitted_dsp_blocks().flatmap(mutations)
    payload = data.draw(st.binary(max_size=MAX_DSP_BLOCK_BYTES + 8) | readable | mutated, label="payload")
    try:
        spec = decode_dsp_block(payload)
    except OtaDecodeError:
        return
    assert encode_dsp_block(spec) == payload  # accepted: a fitted spec that encodes to the same bytes


def with_crc(body: bytes) -> bytes:
    return body + struct.pack("<I", zlib.crc32(body))


@FAST
@given(
    device=st.text(max_size=80).map(str.encode) | st.binary(max_size=80),
    n=st.integers(0, 3) | st.integers(codec.MAX_SAMPLES - 2, codec.MAX_SAMPLES + 12),
    scale=st.floats(width=32),
    flags=st.integers(0, 255),
    fields=st.tuples(U32, U32, U64, U32),
    version=st.sampled_from([1, 2, 3]),
    condition=st.tuples(st.floats(width=32), st.floats(width=32)),
)
def test_vibration_decoder_accepts_exactly_the_documented_format(
    device: bytes,
    n: int,
    scale: float,
    flags: int,
    fields: tuple[int, int, int, int],
    version: int,
    condition: tuple[float, float],
) -> None:
    # Built field by field from VIBRATION_FORMAT.md (version 3; version 2 without rpm and load; version 1 also
    # without the boot epoch), lengths consistent and CRC valid, any value in every field: accepted if and only
    # if the id is 1..64 bytes of UTF-8, 1..16384 samples, scale finite and > 0, whatever the rpm and load (an
    # unusable speed is data, not a decode error). (Atheris found 65..255-byte ids accepted; this property
    # pins the limits.)
    epoch, seq, timestamp_us, rate = fields
    rpm, load = condition
    if version == 3:
        header = struct.pack("<2sBBIIQIfffHB", b"TV", 3, flags, epoch, seq, timestamp_us, rate, scale, rpm, load, n,
                             len(device))  # fmt: skip
    elif version == 2:
        header = struct.pack("<2sBBIIQIfHB", b"TV", 2, flags, epoch, seq, timestamp_us, rate, scale, n, len(device))
    else:
        header = struct.pack("<2sBBIQIfHB", b"TV", 1, flags, seq, timestamp_us, rate, scale, n, len(device))
    payload = with_crc(header + device + bytes(range(256)) * (2 * n // 256) + bytes(2 * n % 256))
    try:
        device.decode()
        utf8 = True
    except UnicodeDecodeError:
        utf8 = False
    valid = 1 <= len(device) <= codec.MAX_DEVICE_ID_BYTES and utf8 and 1 <= n <= codec.MAX_SAMPLES
    valid = valid and math.isfinite(scale) and scale > 0
    if valid:
        decoded = codec.decode(payload)
        assert (decoded.epoch, decoded.seq) == (epoch if version > 1 else 0, seq)
        known = version == 3 and rpm != 0, version == 3 and not math.isnan(load)
        assert (decoded.rpm is not None, decoded.load is not None) == known
        assert codec.encode(decoded) == _codec_canonical(payload)
    else:
        with pytest.raises(DecodeError):
            codec.decode(payload)


@FAST
@given(
    length=st.integers(0, 4) | st.integers(MAX_CHUNK_SIZE - 2, MAX_CHUNK_SIZE + 4),
    count=st.integers(0, 3) | st.integers(MAX_CHUNKS - 2, MAX_CHUNKS + 4) | U16,
    index=U16,
    version=U32,
)
def test_chunk_decoder_accepts_exactly_the_documented_ranges(length: int, count: int, index: int, version: int) -> None:
    # 1..4096 payload bytes, 1..4096 chunks, index below the count (OTA_PROTOCOL.md).
    payload = with_crc(struct.pack("<2sBBI8sHHH", b"TO", 1, 2, version, b"tag-0001", index, count, length)
                       + b"\xa5" * length)  # fmt: skip
    if 1 <= length <= MAX_CHUNK_SIZE and 1 <= count <= MAX_CHUNKS and index < count:
        assert decode_chunk(payload).encode() == payload
    else:
        with pytest.raises(OtaDecodeError):
            decode_chunk(payload)


@FAST
@given(indices=st.lists(U16, max_size=MAX_REQUEST_INDICES + 6), version=U32)
def test_request_decoder_accepts_exactly_the_documented_ranges(indices: list[int], version: int) -> None:
    # 1..64 strictly increasing chunk numbers.
    n = len(indices)
    payload = with_crc(struct.pack(f"<2sBBI8sH{n}H", b"TO", 1, 3, version, b"tag-0001", n, *indices))
    if 1 <= n <= MAX_REQUEST_INDICES and all(a < b for a, b in itertools.pairwise(indices)):
        assert decode_request(payload) == ChunkRequest(version, b"tag-0001", tuple(indices))
    else:
        with pytest.raises(OtaDecodeError):
            decode_request(payload)


# --- (b) round trip ---------------------------------------------------------------------------


@FAST
@given(window=windows())
def test_vibration_round_trip(window: codec.VibrationWindow) -> None:
    assert_same_window(window, codec.decode(codec.encode(window)))


@FAST
@given(manifest=manifests())
def test_manifest_round_trip_keeps_a_valid_signature(manifest: Manifest) -> None:
    decoded = decode_manifest(manifest.encode())
    assert decoded == manifest
    KeyRing({manifest.key_id: PUBLIC_KEY}).verify(decoded.key_id, decoded.signed_bytes(), decoded.signature)
    if decoded.dsp_version in READABLE_VERSIONS:
        assert encode_dsp_block(decoded.dsp_spec()) == manifest.dsp_block


@FAST
@given(chunk=chunks(), request=requests)
def test_chunk_and_request_round_trip(chunk: Chunk, request: ChunkRequest) -> None:
    assert decode_chunk(chunk.encode()) == chunk
    assert decode_request(request.encode()) == request


@FAST
@given(data=st.data(), kind=st.sampled_from(JSON_KINDS))
def test_json_round_trip(data: st.DataObject, kind: type[JsonMessage]) -> None:
    message = data.draw(JSON_STRATEGIES[kind], label="message")
    assert kind.decode(message.encode()) == message


def test_largest_messages_round_trip() -> None:
    window = codec.VibrationWindow("x" * 64, 2**32 - 1, 2**64 - 1, 2**32 - 1, 1.0,
                                   np.full(codec.MAX_SAMPLES, -(2**15), np.int16), 2**32 - 1)  # fmt: skip
    assert len(codec.encode(window)) == codec.MAX_MESSAGE_BYTES
    assert_same_window(window, codec.decode(codec.encode(window)))
    chunk = Chunk(2**32 - 1, b"\xff" * TAG_BYTES, MAX_CHUNKS - 1, MAX_CHUNKS, b"\xa5" * MAX_CHUNK_SIZE)
    assert decode_chunk(chunk.encode()) == chunk
    request = ChunkRequest(2**32 - 1, b"\0" * TAG_BYTES, tuple(range(2**16 - MAX_REQUEST_INDICES, 2**16)))
    assert decode_request(request.encode()) == request


# --- (c) mutation -----------------------------------------------------------------------------


def mutations(valid: bytes) -> st.SearchStrategy[bytes]:
    """One changed byte anywhere, a truncation to any shorter length, or 1-64 extra bytes."""
    flip = st.tuples(st.integers(0, len(valid) - 1), st.integers(1, 255)).map(
        lambda p: valid[: p[0]] + bytes([valid[p[0]] ^ p[1]]) + valid[p[0] + 1 :]
    )
    truncate = st.integers(0, len(valid) - 1).map(lambda n: valid[:n])
    extend = st.binary(min_size=1, max_size=64).map(lambda extra: valid + extra)
    return st.one_of(flip, truncate, extend)


@FAST
@given(data=st.data(), kind=st.sampled_from(sorted(BINARY)))
def test_binary_mutations_are_always_rejected(data: st.DataObject, kind: str) -> None:
    decode, strategy = BINARY[kind]
    valid = encode_any(data.draw(strategy, label="message"))
    mutated = data.draw(mutations(valid), label="mutated")
    documented = DecodeError if kind == "vibration" else OtaDecodeError
    with pytest.raises(documented):
        decode(mutated)


@FAST
@given(data=st.data(), kind=st.sampled_from(sorted(BINARY)))
def test_binary_mutations_behind_a_fixed_crc_reach_only_documented_errors(data: st.DataObject, kind: str) -> None:
    # The CRC is recomputed after the change, so the field checks themselves are fuzzed.
    valid = encode_any(data.draw(BINARY[kind][1], label="message"))
    body = bytearray(valid[:-4])
    for _ in range(data.draw(st.integers(1, 4), label="changes")):
        # mostly the headers (the first 128 bytes), sometimes anywhere (text fields, DSP block, indices)
        offset = data.draw(st.integers(0, min(len(body) - 1, 127)) | st.integers(0, len(body) - 1), label="offset")
        body[offset] = data.draw(st.integers(0, 255), label="byte")
    payload = bytes(body) + struct.pack("<I", zlib.crc32(body))
    decode_binary_or_documented_error(kind, payload)


@FAST
@given(data=st.data(), kind=st.sampled_from(JSON_KINDS))
def test_json_mutations_are_rejected_or_valid(data: st.DataObject, kind: type[JsonMessage]) -> None:
    valid = data.draw(JSON_STRATEGIES[kind], label="message").encode()
    decode_json_or_documented_error(kind, data.draw(mutations(valid), label="mutated"))


@settings(max_examples=100, deadline=None)
@given(data=st.data(), kind=st.sampled_from(sorted(BINARY)))
def test_every_single_bit_flip_of_a_small_message_is_caught(data: st.DataObject, kind: str) -> None:
    # Exhaustive over every bit of one small message per example: CRC-32 catches every burst <= 32 bits.
    decode, strategy = BINARY[kind]
    if kind == "vibration":
        strategy = windows(max_samples=32)
    valid = encode_any(data.draw(strategy, label="message"))
    documented = DecodeError if kind == "vibration" else OtaDecodeError
    for offset in range(min(len(valid), 400)):
        for bit in range(8):
            with pytest.raises(documented):
                decode(valid[:offset] + bytes([valid[offset] ^ (1 << bit)]) + valid[offset + 1 :])
