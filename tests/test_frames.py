"""The UART frame contract (firmware/frames.py): round trips, the incremental parser, garbage.

Properties: ``decode(encode(x)) == x`` for every payload type; any bytes fed to the parser give
frames or counted faults, never an exception; every payload decoder on any bytes returns a value
that re-encodes to the same bytes or raises only FrameDecodeError.
"""

from __future__ import annotations

import math
import struct
from dataclasses import replace

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from firmware.frames import (
    FRAME_MAX_PAYLOAD,
    PAYLOAD_TYPES,
    SYNC,
    ChunkFrame,
    DeviceStateCode,
    Frame,
    FrameDecodeError,
    FrameErrorCode,
    FrameErrorFrame,
    FrameFault,
    FrameParser,
    FrameType,
    HelloFrame,
    LogFrame,
    ManifestFrame,
    ModelInfo,
    Payload,
    PingFrame,
    PongFrame,
    RequestFrame,
    ScoreItem,
    ScoresFrame,
    StatusDomain,
    StatusFrame,
    SummaryFrame,
    SummaryNowFrame,
    WindowFrame,
    decode_frame,
    decode_payload,
    encode_frame,
    payload_frame,
)
from tinymlops.errors import DecodeError

u8, u16, u32 = (st.integers(0, 2**b - 1) for b in (8, 16, 32))
u64 = st.integers(0, 2**64 - 1)
f32 = st.floats(width=32, allow_nan=False, allow_infinity=False)
text = st.text(st.characters(min_codepoint=0x20, max_codepoint=0x7E), max_size=40)
models = st.builds(ModelInfo, u32, st.binary(min_size=32, max_size=32), text)
counts5 = st.tuples(u16, u16, u16, u16, u16)

payloads: st.SearchStrategy[Payload] = st.one_of(
    st.builds(ManifestFrame, st.sampled_from([0, 1]), st.binary(max_size=1400)),
    st.builds(ChunkFrame, st.binary(max_size=4200)),
    st.builds(
        WindowFrame, u32, f32, u32, st.lists(st.integers(-32768, 32767), max_size=1024).map(tuple), st.none() | f32
    ),
    st.just(SummaryNowFrame()),
    st.builds(PingFrame, u32),
    st.builds(PongFrame, u32),
    st.builds(
        HelloFrame,
        u32,
        u32,
        u32,
        u16,
        u32,
        text,
        text,
        text,
        text,
        text,
        text,
        st.lists(text, max_size=4).map(tuple),
        st.none() | models,
    ),
    st.builds(RequestFrame, st.binary(min_size=1, max_size=200)),
    st.builds(
        StatusFrame,
        u16,
        st.sampled_from(DeviceStateCode),
        st.sampled_from(StatusDomain),
        st.integers(-32768, 32767),
        u32,
        u16,
        u16,
        st.none() | models,
        text,
        u32,
        u32,
        u64,
        u64,
        u64,
        u32,
        u32,
        counts5,
        counts5,
        text,
        u32,
    ),
    st.builds(
        ScoresFrame, u32, u32, st.lists(st.builds(ScoreItem, f32, st.booleans(), u32, u32), max_size=20).map(tuple)
    ),
    st.builds(
        SummaryFrame,
        u32,
        f32,
        u32,
        u32,
        f32,
        st.lists(u32, max_size=9).map(tuple),
        st.just((0.5,) * 35),
        st.just((0.25,) * 35),
        f32,
        f32,
        u32,
        u32,
    ),
    st.builds(LogFrame, text),
    st.builds(FrameErrorFrame, st.sampled_from(FrameErrorCode), u16),
)


@given(payloads, u16)
@settings(max_examples=300, deadline=None)
def test_every_payload_round_trips_through_a_frame(payload: Payload, seq: int) -> None:
    frame = decode_frame(payload_frame(payload, seq))
    assert (frame.type, frame.seq) == (payload.TYPE, seq)
    assert decode_payload(frame) == payload


@given(st.lists(payloads, min_size=1, max_size=6), st.integers(1, 64))
@settings(max_examples=100, deadline=None)
def test_parser_reassembles_frames_split_anywhere(items: list[Payload], step: int) -> None:
    stream = b"".join(payload_frame(p, seq) for seq, p in enumerate(items))
    parser = FrameParser()
    out = []
    for k in range(0, len(stream), step):
        out += parser.feed(stream[k : k + step])
    assert [decode_payload(f) for f in out if isinstance(f, Frame)] == items
    assert not parser.errors and parser.pending == 0


@given(st.binary(max_size=3000))
@settings(max_examples=300, deadline=None)
def test_garbage_never_raises_from_the_parser(garbage: bytes) -> None:
    parser = FrameParser()
    for item in parser.feed(garbage):
        if isinstance(item, Frame):  # a valid frame inside garbage is possible in principle
            assert len(item.payload) <= FRAME_MAX_PAYLOAD
    # the line recovers: a good frame after the garbage is received
    while parser.pending:  # the sender went silent: each timeout drops one bogus sync
        parser.expire()
    out = parser.feed(encode_frame(FrameType.PONG, 7777, struct.pack("<I", 1)))
    assert any(isinstance(f, Frame) and f.seq == 7777 for f in out)


@given(st.sampled_from(sorted(PAYLOAD_TYPES)), st.binary(max_size=600))
@settings(max_examples=500, deadline=None)
def test_payload_decoders_raise_only_frame_decode_error(frame_type: FrameType, garbage: bytes) -> None:
    try:
        payload = decode_payload(Frame(frame_type, 0, garbage))
    except FrameDecodeError as exc:
        assert isinstance(exc, DecodeError) and "\n" not in str(exc)
        return
    if frame_type != FrameType.LOG:  # LOG replaces non-ASCII bytes
        assert payload.encode() == garbage


def test_parser_counts_crc_length_replay_and_truncation_and_resyncs() -> None:
    good = [encode_frame(FrameType.PONG, seq, struct.pack("<I", seq)) for seq in range(4)]
    bad_crc = bytearray(good[1])
    bad_crc[9] ^= 1
    oversize = SYNC + struct.pack("<BBHH", 0x87, 0, 9, FRAME_MAX_PAYLOAD + 1)
    parser = FrameParser()
    out = parser.feed(b"noise" + good[0] + bytes(bad_crc) + oversize + good[0] + good[2] + good[2] + good[3][:10])
    frames = [f.seq for f in out if isinstance(f, Frame)]
    faults = [f for f in out if isinstance(f, FrameFault)]
    assert frames == [0, 2]  # seq 1 was lost to its CRC; 0 again and 2 again are replays
    assert [(f.code, f.seq) for f in faults] == [
        (FrameErrorCode.CRC, 1), (FrameErrorCode.LENGTH, 9), (FrameErrorCode.REPLAY, 0), (FrameErrorCode.REPLAY, 2),
    ]  # fmt: skip
    assert parser.expire() == [FrameFault(FrameErrorCode.TRUNCATED, 3)]
    assert [f.seq for f in parser.feed(good[3]) if isinstance(f, Frame)] == [3]
    assert parser.errors == {FrameErrorCode.CRC: 1, FrameErrorCode.LENGTH: 1, FrameErrorCode.REPLAY: 2,
                             FrameErrorCode.TRUNCATED: 1}  # fmt: skip


def test_status_layout_matches_the_table_byte_for_byte() -> None:
    sha = bytes(range(32))
    status = StatusFrame(7, DeviceStateCode.ACTIVE, StatusDomain.NONE, 0, 3, 5, 5, ModelInfo(3, sha, "m"), "m",
                         100, 200, 1, 2, 3, 4, 5, (1, 2, 3, 4, 5), (6, 7, 8, 9, 10), "ok", 12)  # fmt: skip
    before_speed = (
        struct.pack("<HBBhIHH", 7, 4, 0, 0, 3, 5, 5) + b"\x01" + struct.pack("<I", 3) + sha + b"\x01m" + b"\x01m"
        + struct.pack("<IIQQQII", 100, 200, 1, 2, 3, 4, 5) + struct.pack("<10H", *range(1, 11)) + b"\x02ok"
    )  # fmt: skip
    expected = before_speed + struct.pack("<I", 12)
    assert status.encode() == expected
    frame = encode_frame(FrameType.STATUS, 1, expected)
    assert frame[:8] == b"\xa5\x5a\x83\x00\x01\x00" + struct.pack("<H", len(expected))
    # a device that predates the speed-fallback count: the shorter layout still decodes, with 0
    assert StatusFrame.decode(before_speed) == replace(status, speed_fallback=0)


def test_fields_appended_later_are_optional_in_window_and_summary() -> None:
    samples = (1, -2, 3, -4)
    head = struct.pack("<IfIH", 9, 0.5, 25_600, 4) + struct.pack("<4h", *samples)
    assert WindowFrame.decode(head) == WindowFrame(9, 0.5, 25_600, samples)  # rpm None: not sent
    assert WindowFrame.decode(head + struct.pack("<f", 1187.5)).rpm == 1187.5
    unusable = WindowFrame.decode(head + struct.pack("<f", math.nan)).rpm  # data: the device falls back
    assert unusable is not None and math.isnan(unusable)
    assert WindowFrame(9, 0.5, 25_600, samples, 0.0).encode() == head + bytes(4)
    summary = SummaryFrame(3, 1.0, 2, 0, 0.125, (2,) + (0,) * 8, (0.0,), (1.0,), 10.0, 20.0, 30, 2)
    assert SummaryFrame.decode(summary.encode()[:-4]) == replace(summary, speed_fallback=0)


@pytest.mark.parametrize(
    ("frame_type", "payload", "message"),
    [
        (0x42, b"", "unknown frame type 0x42"),
        (FrameType.MANIFEST, b"\x02abc", "source 2"),
        (FrameType.HELLO, b"\x02", "HELLO version 2"),
        (FrameType.WINDOW, struct.pack("<IfIH", 1, 1.0, 100, 3) + b"\0\0", "ends inside 3 samples"),
        (FrameType.WINDOW, struct.pack("<IfIH", 1, 1.0, 100, 1) + b"\0\0" + b"\0\0", "ends inside rpm"),
        (FrameType.WINDOW, struct.pack("<IfIH", 1, 1.0, 100, 1) + b"\0\0" + bytes(6), "2 bytes past its fields"),
        (FrameType.FRAME_ERROR, b"\x09\x00\x00", "code 9"),
        (FrameType.PING, b"\0\0\0\0\0", "1 bytes past its fields"),
    ],
)
def test_bad_payloads_say_what_is_wrong(frame_type: int, payload: bytes, message: str) -> None:
    with pytest.raises(FrameDecodeError, match=message):
        decode_payload(Frame(frame_type, 0, payload))
