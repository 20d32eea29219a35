"""The OTA protocol without a broker: codecs, corruptions, topics and the receiver state machine."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import struct
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from firmware.ota import (
    MAX_CHUNK_SIZE,
    MAX_MANIFEST_BYTES,
    Announcement,
    Chunk,
    ChunkRequest,
    DeviceStatus,
    DriftSummary,
    Manifest,
    ModelRef,
    OtaDecodeError,
    OtaError,
    OtaReceiver,
    ReceiverConfig,
    ReferenceSet,
    RxStatus,
    ScoreBatch,
    build_manifest,
    decode_chunk,
    decode_dsp_block,
    decode_manifest,
    decode_reference_block,
    decode_request,
    device_audience,
    encode_dsp_block,
    group_audience,
    split_model,
)
from firmware.signing import KeyRing, ManifestSigner, private_key_from_seed
from tinymlops.contracts.dsp import DspSpec
from tinymlops.contracts.topics import FleetTopics, TopicError, check_name

MODEL = hashlib.shake_256(b"test model").digest(5000)
SIGNER = ManifestSigner(private_key_from_seed(bytes(32)), "test-key")
RING = KeyRing({"test-key": SIGNER.public_key})
N = DspSpec().n_features
SPEC = DspSpec(version=1, mean=tuple(0.1 * i for i in range(N)), std=tuple(1 + 0.01 * i for i in range(N)))
CONFIG = ReceiverConfig("node-0001", "nrf52840", slot_bytes=262_144, ram_bytes=131_072, group="line-1")
REFERENCES = ReferenceSet((bytes(range(N)), bytes(N)), (bytes(range(1, N + 1)), bytes([5]) * N))


def manifest(version: int = 3, model: bytes = MODEL, **changes: Any) -> Manifest:
    kwargs: dict[str, Any] = {
        "name": "vibration-ae-nrf52840",
        "target": "nrf52840",
        "dsp_spec": SPEC,
        "threshold": 0.7,
        "arena_bytes": 3000,
        "audience": device_audience("node-0001"),
        "signer": SIGNER,
        "chunk_size": 1024,
        "references": REFERENCES,
    }
    return build_manifest(model, version=version, **{**kwargs, **changes})


# --- binary codecs ----------------------------------------------------------------------------


def test_manifest_round_trip() -> None:
    m = manifest()
    decoded = decode_manifest(m.encode())
    assert decoded == m
    assert (m.model_size, m.chunk_count, m.chunk_length(4)) == (5000, 5, 904)
    assert m.sha256 == hashlib.sha256(MODEL).digest() and m.tag == m.sha256[:8]
    assert m.threshold == struct.unpack("<f", struct.pack("<f", 0.7))[0]
    spec = decoded.dsp_spec()  # normalisation stats travel as float32
    assert spec.n_bands == SPEC.n_bands and spec.window_samples == SPEC.window_samples
    assert spec.mean == tuple(struct.unpack(f"<{N}f", struct.pack(f"<{N}f", *SPEC.mean)))
    RING.verify(decoded.key_id, decoded.signed_bytes(), decoded.signature)


def test_largest_manifest_has_the_documented_size() -> None:
    largest = dataclasses.replace(
        manifest(),
        model_name="n" * 64,
        target="t" * 32,
        audience=device_audience("d" * 64),
        dsp_block=struct.pack("<H", 3) + bytes(1022),  # another DSP version travels as an opaque block
        reference_block=ReferenceSet((bytes(170),) * 3, (bytes(169),) * 3).encode(),  # 7 + 3 x 339 = 1024 bytes
    ).signed(ManifestSigner(private_key_from_seed(bytes(32)), "k" * 32))
    payload = largest.encode()
    assert len(payload) == MAX_MANIFEST_BYTES and decode_manifest(payload) == largest
    assert largest.dsp_version == 3


def test_signature_covers_every_field() -> None:
    m = manifest()
    changes: dict[str, Any] = {
        "model_name": "other",
        "model_version": 4,
        "target": "rp2040",
        "audience": "group:x",
        "key_id": "k2",
        "model_size": 4999,
        "chunk_size": 2048,
        "chunk_count": 6,
        "sha256": bytes(32),
        "arena_bytes": 1,
        "threshold": 0.5,
        "dsp_block": m.dsp_block[:-1] + b"\x01",
        "reference_block": m.reference_block[:-1] + b"\x01",
    }
    assert set(changes) == {f.name for f in dataclasses.fields(Manifest)} - {"signature"}
    for name, value in changes.items():
        assert dataclasses.replace(m, **{name: value}).signed_bytes() != m.signed_bytes(), name


def test_chunks_reassemble_the_model() -> None:
    m = manifest()
    chunks = [decode_chunk(c.encode()) for c in split_model(MODEL, m)]
    assert [c.index for c in chunks] == list(range(5)) and {c.count for c in chunks} == {5}
    assert b"".join(c.payload for c in chunks) == MODEL and len(chunks[-1].payload) == 904
    with pytest.raises(OtaError, match="does not match"):
        split_model(MODEL[:-1], m)


def test_request_round_trip() -> None:
    request = ChunkRequest(7, b"12345678", (0, 3, 4095))
    assert decode_request(request.encode()) == request
    for bad in ((), (2, 1), (1, 1), tuple(range(65))):
        with pytest.raises(OtaDecodeError, match="increasing indices") as exc:
            decode_request(ChunkRequest(7, b"12345678", bad).encode())
        assert exc.value.code == RxStatus.ERR_FIELD


MESSAGES = {
    "manifest": (lambda: manifest().encode(), decode_manifest),
    "chunk": (lambda: split_model(MODEL, manifest())[4].encode(), decode_chunk),
    "request": (lambda: ChunkRequest(3, b"abcdefgh", (1, 2, 9)).encode(), decode_request),
}


@pytest.mark.parametrize("kind", sorted(MESSAGES))
def test_every_byte_flip_and_truncation_is_rejected(kind: str) -> None:
    build, decoder = MESSAGES[kind]
    message = build()
    decoder(message)
    for i in range(len(message)):
        flipped = message[:i] + bytes([message[i] ^ 0x10]) + message[i + 1 :]
        with pytest.raises(OtaDecodeError) as exc:
            decoder(flipped)
        assert exc.value.code.is_error
    for n in range(len(message)):
        with pytest.raises(OtaDecodeError):
            decoder(message[:n])
    with pytest.raises(OtaDecodeError, match="announces"):
        decoder(message + b"\0")


def test_decode_errors_name_the_failed_check() -> None:
    good = manifest().encode()
    cases = {
        b"TO": RxStatus.ERR_TRUNCATED,
        b"XX" + good[2:]: RxStatus.ERR_MAGIC,
        good[:2] + b"\x09" + good[3:]: RxStatus.ERR_VERSION,
        split_model(MODEL, manifest())[0].encode(): RxStatus.ERR_TYPE,
        good[:-1] + bytes([good[-1] ^ 1]): RxStatus.ERR_CRC,
        good[:-1]: RxStatus.ERR_LENGTH,
    }
    for payload, code in cases.items():
        with pytest.raises(OtaDecodeError) as exc:
            decode_manifest(payload)
        assert exc.value.code == code, exc.value
    chunk = Chunk(3, b"12345678", 5, 5, b"x").encode()
    with pytest.raises(OtaDecodeError, match="index 5 >= count 5") as exc:
        decode_chunk(chunk)
    assert exc.value.code == RxStatus.ERR_INDEX


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=2000), st.sampled_from([b"", b"TO\x01\x01", b"TO\x01\x02", b"TO\x01\x03"]))
def test_random_bytes_raise_only_the_decode_error(data: bytes, prefix: bytes) -> None:
    for decoder in (decode_manifest, decode_chunk, decode_request):
        with pytest.raises(OtaDecodeError):
            decoder(prefix + data)
    with contextlib.suppress(OtaDecodeError):  # a random DSP block may be valid; else only the decode error
        decode_dsp_block(b"\x01\x00" + data)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda b: b[:10], "shorter than its header"),
        (lambda b: b[:-4], "statistics need"),
        (lambda b: b[:6] + struct.pack("<H", 1000) + b[8:], "not a power of two"),
        (lambda b: b[:8] + struct.pack("<H", 10) + b[10:], "needs 13 stats"),
        (lambda b: b[:16] + struct.pack("<f", float("nan")) + b[20:], "not finite"),
        (lambda b: b[:-4] + struct.pack("<f", 0.0), "std"),
    ],
)
def test_invalid_dsp_blocks_are_rejected(mutate: Any, message: str) -> None:
    block = encode_dsp_block(SPEC)
    assert decode_dsp_block(block).n_features == N
    with pytest.raises(OtaDecodeError, match=message):
        decode_dsp_block(mutate(block))
    with pytest.raises(OtaDecodeError) as exc:
        decode_dsp_block(struct.pack("<H", 3) + block[2:])
    assert exc.value.code == RxStatus.ERR_DSP_VERSION


SPEED_SPEC = dataclasses.replace(
    SPEC, version=2, speed_reference_rpm=1200.0, speed_slope=tuple(0.5 - 0.125 * i for i in range(N))
)


def test_speed_aware_dsp_block_round_trips_what_the_device_needs() -> None:
    decoded = decode_dsp_block(encode_dsp_block(SPEED_SPEC))
    assert decoded.version == 2 and decoded.speed_reference_rpm == 1200.0
    assert decoded.speed_slope == SPEED_SPEC.speed_slope and decoded.speed_valid_rpm == SPEED_SPEC.speed_valid_rpm
    # without a trend the block stays version 1: devices built before speed awareness take it
    untrended = dataclasses.replace(SPEC, version=2, speed_reference_rpm=1200.0, speed_coverage_rpm=((1100.0, 1300.0),))
    assert encode_dsp_block(untrended) == encode_dsp_block(SPEC)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda b: b[:-4], "version 2 with 35 statistics needs"),
        (lambda b: b[: 16 + 8 * N] + struct.pack("<f", 50.0) + b[20 + 8 * N :], "speed reference"),
        (lambda b: b[:-4] + struct.pack("<f", float("inf")), "slope"),
    ],
)
def test_invalid_speed_aware_dsp_blocks_are_rejected(mutate: Any, message: str) -> None:
    with pytest.raises(OtaDecodeError, match=message):
        decode_dsp_block(mutate(encode_dsp_block(SPEED_SPEC)))


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda b: b[:6], "shorter than its header"),
        (lambda b: b"\x02" + b[1:], "version 2 is not 1"),
        (lambda b: b[:-1], "values do not fit"),
        (lambda b: b[:1] + b"\x00" + b[2:7], "0 inputs"),
        (lambda b: b[:2] + b"\x11" + b[3:], "tolerance 17 LSB"),
        (lambda b: b"\x01\x04\x02" + struct.pack("<HH", 200, 100) + bytes(1200), "> 1024"),
    ],
)
def test_invalid_reference_blocks_are_rejected(mutate: Any, message: str) -> None:
    block = REFERENCES.encode()
    assert decode_reference_block(block) == REFERENCES and len(block) == 7 + 2 * (N + N)
    with pytest.raises(OtaDecodeError, match=message) as exc:
        decode_reference_block(mutate(block))
    assert exc.value.code == RxStatus.ERR_FIELD


def test_reference_outputs_must_match_within_the_tolerance() -> None:
    expected = bytes([0, 10, 0xF6])  # 0, 10, -10
    references = ReferenceSet((bytes(3),), (expected,), tolerance=2)
    assert references.mismatch(0, bytes([2, 8, 0xF4])) is None  # every value off by exactly 2 LSB
    assert references.mismatch(0, bytes([0, 10, 0xF3])) == "reference 1 of 1: output 2 is -13, expected -10 (3 LSB > 2)"
    assert references.mismatch(0, bytes(2)) == "reference 1 of 1: 2 outputs, expected 3"


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"chunk_size": 100}, "chunk size 100"),
        ({"chunk_size": MAX_CHUNK_SIZE + 1}, "chunk size"),
        ({"audience": "everyone"}, "audience"),
        ({"audience": "device:a/b"}, "audience"),
        ({"name": "has space"}, "model name"),
        ({"target": "NRF52840"}, "target"),
        ({"threshold": float("inf")}, "threshold"),
        ({"arena_bytes": 0}, "arena"),
        ({"version": 0}, "version"),
    ],
)
def test_build_manifest_refuses_out_of_range_fields(change: dict[str, Any], message: str) -> None:
    with pytest.raises(OtaError, match=message):
        manifest(**change)


def test_unsigned_manifest_and_unfitted_spec_cannot_be_encoded() -> None:
    with pytest.raises(OtaError, match="not signed"):
        dataclasses.replace(manifest(), signature=b"").encode()
    with pytest.raises(OtaError, match="normalisation"):
        encode_dsp_block(DspSpec())


# --- JSON messages ------------------------------------------------------------------------------


def json_messages() -> list[Any]:
    ref = ModelRef(name="m", version=2, sha256="ab" * 32)
    return [
        Announcement(
            device="node-0001",
            fleet="plant",
            group="g",
            firmware="fw 1",
            profile="nrf52840",
            flash_free=524_288,
            slot_bytes=262_144,
            ram_free=131_072,
            max_chunk=4096,
            dsp_versions=[1],
            key_ids=["k"],
            model=ref,
            ts=1.5,
        ),
        DeviceStatus(
            device="node-0001",
            seq=3,
            ts=2.0,
            state="failed",
            status="failed: too large",
            reason="too large",
            detail="model 1 B > slot 0 B",
            model="m",
            version=3,
            active=ref,
            latency_ms={"deploy_ms": 1.0},
            counters={"requests": 2},
        ),
        ScoreBatch(
            device="node-0001",
            model="m",
            version=2,
            threshold=0.5,
            first_seq=10,
            ts=3.0,
            scores=[0.1, 0.9],
            anomalies=[False, True],
        ),
        DriftSummary(
            device="node-0001",
            model="m",
            version=2,
            threshold=0.5,
            start_ts=1.0,
            end_ts=2.0,
            windows=3,
            anomalies=1,
            score_mean=0.4,
            score_edges=[0.0, 0.5],
            score_counts=[2, 1],
            feature_mean=[0.0, 1.0],
            feature_var=[1.0, 2.0],
            latency_ms={"inference_mean": 0.1},
        ),
    ]


@pytest.mark.parametrize("message", json_messages(), ids=lambda m: type(m).__name__)
def test_json_messages_round_trip_and_reject_corruption(message: Any) -> None:
    kind = type(message)
    payload = message.encode()
    assert kind.decode(payload) == message and b'": ' not in payload and b'", "' not in payload  # compact JSON
    for n in range(len(payload)):
        with pytest.raises(OtaDecodeError):
            kind.decode(payload[:n])
    with pytest.raises(OtaDecodeError) as exc:
        kind.decode(payload.replace(b'"v":1', b'"v":2'))
    assert exc.value.code == RxStatus.ERR_VERSION
    with pytest.raises(OtaDecodeError, match="device"):
        kind.decode(payload.replace(b'"node-0001"', b'"a/b"'))
    with pytest.raises(OtaDecodeError):
        kind.decode(b"\xff\xfe" + payload)
    assert kind.decode(payload[:-1] + b',"future_field":1}') == message  # newer senders stay readable


@pytest.mark.parametrize("message", json_messages(), ids=lambda m: type(m).__name__)
def test_device_messages_take_their_identity_from_the_topic_and_fit_u32(message: Any) -> None:
    kind = type(message)
    payload = message.encode()
    assert kind.decode_from("node-0001", payload) == message
    with pytest.raises(OtaDecodeError, match=f"^{kind.noun} names device node-0001 on the topic of node-0009$"):
        kind.decode_from("node-0009", payload)
    too_big = payload.replace(b'"version":2', b'"version":4294967296').replace(b'"version":3', b'"version":4294967296')
    with pytest.raises(OtaDecodeError, match="less than or equal to 4294967295"):
        kind.decode_from("node-0001", too_big)
    at_limit = kind.decode_from("node-0001", too_big.replace(b"4294967296", b"4294967295"))
    assert at_limit != message


def test_inconsistent_scores_and_summaries_are_rejected() -> None:
    batch, summary = json_messages()[2], json_messages()[3]
    with pytest.raises(OtaDecodeError, match="anomaly flags"):
        ScoreBatch.decode(batch.encode().replace(b"[false,true]", b"[false]"))
    with pytest.raises(OtaDecodeError, match="histogram"):
        DriftSummary.decode(summary.encode().replace(b'"windows":3', b'"windows":4'))


@settings(max_examples=200, deadline=None)
@given(st.binary(max_size=500))
def test_json_decoders_raise_only_the_decode_error(data: bytes) -> None:
    for kind in (Announcement, DeviceStatus, ScoreBatch, DriftSummary):
        with pytest.raises(OtaDecodeError):
            kind.decode(data)


# --- topics -------------------------------------------------------------------------------------


def test_topics() -> None:
    topics = FleetTopics("plant", "root")
    assert topics.manifest("node-1") == "root/plant/node-1/ota/manifest"
    assert topics.group_manifest("canary") == "root/plant/groups/canary/ota/manifest"
    assert topics.audience_topic(group_audience("canary")) == topics.group_manifest("canary")
    assert topics.audience_topic(device_audience("node-1")) == topics.manifest("node-1")
    assert topics.all_devices("status") == "root/plant/+/ota/status"
    for kind in ("announce", "request", "chunk", "status", "scores", "summary", "vibration"):
        topic = getattr(topics, kind)("node-1")
        assert topics.parse(topic) == ("node-1", kind)
    assert topics.parse(topics.group_manifest("canary")) is None
    assert topics.parse("root/other/node-1/announce") is None
    for bad in ("a/b", "+", "#", "", "x" * 65, "é"):
        with pytest.raises(TopicError):
            check_name(bad)
    with pytest.raises(TopicError):
        topics.audience_topic("all")


# --- the receiver -------------------------------------------------------------------------------


def test_receiver_assembles_any_order_and_verifies() -> None:
    rx = OtaReceiver(CONFIG, RING, active_version=2)
    m = manifest()
    assert rx.on_manifest(m.encode()) == RxStatus.OK
    assert rx.on_manifest(m.encode()) == RxStatus.SAME
    chunks = [c.encode() for c in split_model(MODEL, m)]
    assert rx.request(3) == ChunkRequest(3, m.tag, (0, 1, 2))
    assert [rx.on_chunk(chunks[i]) for i in (4, 1, 4)] == [RxStatus.OK, RxStatus.OK, RxStatus.DUPLICATE]
    assert rx.missing() == [0, 2, 3] and rx.received_count == 2 and rx.has_chunk(4) and not rx.has_chunk(0)
    assert rx.finish() == RxStatus.ERR_INCOMPLETE
    with pytest.raises(OtaError):
        rx.image()
    assert [rx.on_chunk(chunks[i]) for i in (3, 0, 2)] == [RxStatus.OK, RxStatus.OK, RxStatus.DONE]
    assert rx.request() is None and rx.finish() == RxStatus.OK and rx.image() == MODEL
    rx.commit()
    assert rx.active_version == 3 and rx.manifest is None
    assert rx.on_chunk(chunks[0]) == RxStatus.ERR_NO_MANIFEST


def test_receiver_check_order_and_in_progress_download() -> None:
    rx = OtaReceiver(CONFIG, RING, active_version=2)
    # wrong profile and too large: the profile is checked first, as in the C receiver
    assert rx.on_manifest(manifest(target="stm32l4r5", model=bytes(300_000)).encode()) == RxStatus.ERR_WRONG_PROFILE
    assert "stm32l4r5" in rx.detail
    assert rx.on_manifest(manifest(model=bytes(300_000)).encode()) == RxStatus.ERR_TOO_LARGE
    assert rx.on_manifest(manifest(arena_bytes=131_073).encode()) == RxStatus.ERR_ARENA
    assert rx.on_manifest(manifest(version=2).encode()) == RxStatus.ERR_NOT_NEWER
    assert rx.on_manifest(manifest(audience="device:node-0002").encode()) == RxStatus.ERR_WRONG_AUDIENCE
    assert rx.on_manifest(manifest(audience=group_audience("line-1")).encode()) == RxStatus.OK
    first = rx.manifest
    chunks = [c.encode() for c in split_model(MODEL, manifest())]
    assert rx.on_chunk(chunks[0]) == RxStatus.OK
    # a rejected manifest leaves the download alone; an older or equal version than it is refused
    assert rx.on_manifest(manifest(target="rp2040", version=9).encode()) == RxStatus.ERR_WRONG_PROFILE
    assert rx.on_manifest(manifest(version=3, threshold=0.9).encode()) == RxStatus.ERR_NOT_NEWER
    assert rx.manifest == first and rx.received_count == 1
    # a newer one replaces it
    newer = manifest(version=4, model=MODEL[:3000])
    assert rx.on_manifest(newer.encode()) == RxStatus.OK and rx.received_count == 0
    assert rx.on_chunk(chunks[1]) == RxStatus.ERR_STALE


def test_receiver_rejects_tampered_image_and_bad_signatures() -> None:
    rx = OtaReceiver(CONFIG, RING)
    m = manifest()
    forged = dataclasses.replace(m, threshold=9.0)
    assert rx.on_manifest(forged.encode()) == RxStatus.ERR_BAD_SIGNATURE
    stranger = private_key_from_seed(bytes([1]) * 32)
    assert rx.on_manifest(manifest(signer=ManifestSigner(stranger, "test-key")).encode()) == RxStatus.ERR_BAD_SIGNATURE
    assert rx.on_manifest(manifest(signer=ManifestSigner(stranger, "x")).encode()) == RxStatus.ERR_UNKNOWN_KEY
    revoked = KeyRing({"test-key": SIGNER.public_key}, revoked=["test-key"])
    assert OtaReceiver(CONFIG, revoked).on_manifest(m.encode()) == RxStatus.ERR_REVOKED_KEY
    assert rx.on_manifest(m.encode()) == RxStatus.OK
    for chunk in split_model(MODEL, m):
        payload = chunk.payload if chunk.index != 2 else bytes([chunk.payload[0] ^ 1]) + chunk.payload[1:]
        rx.on_chunk(dataclasses.replace(chunk, payload=payload).encode())
    assert rx.complete and rx.finish() == RxStatus.ERR_SHA256 and rx.manifest is None
    assert rx.on_manifest(m.encode()) == RxStatus.SAME  # the same manifest is not downloaded again
