"""The device application's C pieces on the host, and the device image booting under QEMU.

``firmware/c/device.mk`` builds ``libdevice_host.so`` (frame.c, slots.c, ed25519_verify.c with
Monocypher, ota_receiver.c) for ctypes, and ``test_frame_driver`` (frame.c under AddressSanitizer
and UBSan) for a differential fuzz against ``firmware.frames.FrameParser`` in a subprocess, so a
memory error fails the test instead of killing pytest. Slot tables are checked against power
loss at points all through a commit (every 23rd byte and each write's edges); Ed25519 against
signatures made by ``firmware.signing``.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import random
import shutil
import socket
import struct
import subprocess
import time
import zlib
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import cast

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from firmware.device import ActiveModel, score_window
from firmware.emulated import read_transfer_record
from firmware.frames import (
    Frame,
    FrameErrorCode,
    FrameFault,
    FrameParser,
    FrameType,
    HelloFrame,
    ScoresFrame,
    StatusFrame,
    SummaryFrame,
    WindowFrame,
    encode_frame,
)
from firmware.ota import decode_dsp_block, encode_dsp_block
from firmware.sensor import MachineSimulator, OperatingPoint, quantize
from firmware.signing import private_key_from_seed, public_key_bytes
from firmware.tflm import TflmRunner
from tests.fault_ledger import FaultRecord
from tests.fault_ledger import record as record_fault
from tests.int8_model import int8_autoencoder
from tinymlops.contracts.dsp import DspSpec, raw_features, resolve_speed

C_DIR = Path(__file__).resolve().parents[1] / "firmware" / "c"
BUILD = C_DIR / "build"
REGION_BYTES = 0x50000
FLASH_BYTES = 1 << 20
SLOT_BYTES = 128 * 1024
TABLE_BYTES = 2300
TRANSFER_BYTES = 572
TRANSFER_OFFSETS = (0x3000, 0x4000)
NONE = 0xFF
FRAME_TIMEOUT_MS = 200
HEADER_BYTES = 8
MAX_PAYLOAD = 4352

pytestmark = pytest.mark.skipif(shutil.which("gcc") is None or shutil.which("make") is None, reason="needs gcc")


# --- the reference encoders of the flash layouts (slots.h) --------------------------------------


def _str8(text: str) -> bytes:
    data = text.encode()
    return bytes([len(data)]) + data


def encode_provisioning(
    device: str, fleet: str, group: str, profile: str, keys: list[tuple[str, bytes | None, bool]]
) -> bytes:
    """The provisioning block of slots.h: identity and the key ring (id, public key or None, revoked)."""
    body = b"".join(_str8(s) for s in (device, fleet, group, profile)) + bytes([len(keys)])
    for key_id, public, revoked in keys:
        body += _str8(key_id) + bytes([int(revoked) | (2 if public is not None else 0)]) + (public or bytes(32))
    head = b"TMPV" + struct.pack("<HH", 1, 8 + len(body) + 4)
    return head + body + struct.pack("<I", zlib.crc32(head + body))


@dataclass(frozen=True)
class Entry:
    """One slot entry of the slot table."""

    model: bytes = b""
    version: int = 0
    arena_bytes: int = 0
    threshold: float = 0.0
    name: str = ""
    dsp: bytes = b""

    def encode(self) -> bytes:
        """The entry's 1140 bytes."""
        name = self.name.encode()
        sha = hashlib.sha256(self.model).digest() if self.model else bytes(32)
        return struct.pack("<II32sIfB64sBH1024s", len(self.model), self.version, sha, self.arena_bytes,
                           self.threshold, len(name), name, 0, len(self.dsp), self.dsp)  # fmt: skip


def encode_table(seq: int, active: int, previous: int, entries: tuple[Entry, Entry]) -> bytes:
    """One copy of the slot table of slots.h."""
    data = b"TMST" + struct.pack("<HHIBBH", 1, TABLE_BYTES, seq, active, previous, 0)
    data += entries[0].encode() + entries[1].encode()
    return data + struct.pack("<I", zlib.crc32(data))


def encode_transfer(seq: int, version: int, model: bytes, chunk_count: int, slot: int, received: set[int]) -> bytes:
    """One copy of the transfer record of slots.h (version 0: cleared)."""
    sha = hashlib.sha256(model).digest() if version else bytes(32)
    bitmap = bytearray(512)
    for i in received:
        bitmap[i >> 3] |= 1 << (i & 7)
    data = b"TMTR" + struct.pack("<HHII32sIHBx", 1, TRANSFER_BYTES, seq, version, sha, len(model) if version else 0,
                                 chunk_count if version else 0, slot if version else 0) + bytes(bitmap)  # fmt: skip
    return data + struct.pack("<I", zlib.crc32(data))


# --- ctypes mirrors -----------------------------------------------------------------------------

WriteFn = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_uint32, ctypes.POINTER(ctypes.c_uint8), ctypes.c_size_t)


class FrameT(ctypes.Structure):
    """frame_t."""

    _fields_ = (("type", ctypes.c_uint8), ("flags", ctypes.c_uint8), ("seq", ctypes.c_uint16),
                ("length", ctypes.c_uint16), ("payload", ctypes.POINTER(ctypes.c_uint8)))  # fmt: skip


class FlashT(ctypes.Structure):
    """slots_flash_t."""

    _fields_ = (("base", ctypes.c_void_p), ("size", ctypes.c_uint32), ("write", WriteFn))


class KeyT(ctypes.Structure):
    """ed25519_key_t."""

    _fields_ = (("key_id", ctypes.c_char * 33), ("public_key", ctypes.c_uint8 * 32), ("has_key", ctypes.c_uint8),
                ("revoked", ctypes.c_uint8))  # fmt: skip


class ProvisioningT(ctypes.Structure):
    """slots_provisioning_t."""

    _fields_ = (("device", ctypes.c_char * 65), ("fleet", ctypes.c_char * 65), ("group", ctypes.c_char * 65),
                ("profile", ctypes.c_char * 33), ("n_keys", ctypes.c_uint8), ("keys", KeyT * 8))  # fmt: skip


class EntryT(ctypes.Structure):
    """slots_entry_t."""

    _fields_ = (("model_size", ctypes.c_uint32), ("version", ctypes.c_uint32), ("sha256", ctypes.c_uint8 * 32),
                ("arena_bytes", ctypes.c_uint32), ("threshold", ctypes.c_float), ("name", ctypes.c_char * 65),
                ("dsp_len", ctypes.c_uint16), ("dsp", ctypes.c_uint8 * 1024))  # fmt: skip


class TableT(ctypes.Structure):
    """slots_table_t."""

    _fields_ = (("seq", ctypes.c_uint32), ("active", ctypes.c_uint8), ("previous", ctypes.c_uint8),
                ("slot", EntryT * 2))  # fmt: skip


class TransferT(ctypes.Structure):
    """slots_transfer_t."""

    _fields_ = (("seq", ctypes.c_uint32), ("version", ctypes.c_uint32), ("sha256", ctypes.c_uint8 * 32),
                ("model_size", ctypes.c_uint32), ("chunk_count", ctypes.c_uint16), ("slot", ctypes.c_uint8),
                ("received", ctypes.c_uint8 * 512))  # fmt: skip

    def chunks(self) -> set[int]:
        """The chunks its bitmap names."""
        return {i for i in range(self.chunk_count) if self.received[i >> 3] >> (i & 7) & 1}


def _transfer_t(version: int, model: bytes, chunk_count: int, slot: int, received: set[int], seq: int = 0) -> TransferT:
    out = TransferT(seq=seq, version=version, model_size=len(model), chunk_count=chunk_count, slot=slot)
    out.sha256[:] = list(hashlib.sha256(model).digest())
    for i in received:
        out.received[i >> 3] |= 1 << (i & 7)
    return out


def _make(target: str) -> None:
    result = subprocess.run(["make", "-s", "-f", str(C_DIR / "device.mk"), target], capture_output=True, text=True,
                            timeout=300, check=False)  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]


@pytest.fixture(scope="module")
def lib() -> ctypes.CDLL:
    """The host library, built by device.mk."""
    _make("host-lib")
    dll = ctypes.CDLL(str(BUILD / "libdevice_host.so"))
    dll.frame_encode.restype = ctypes.c_size_t
    dll.frame_encode.argtypes = (ctypes.c_uint8, ctypes.c_uint16, ctypes.c_char_p, ctypes.c_size_t,
                                 ctypes.c_void_p, ctypes.c_size_t)  # fmt: skip
    dll.frame_parser_feed.argtypes = (ctypes.c_void_p, ctypes.c_uint8, ctypes.c_uint32)
    dll.frame_parser_next.argtypes = (ctypes.c_void_p, ctypes.POINTER(FrameT))
    dll.frame_parser_tick.argtypes = (ctypes.c_void_p, ctypes.c_uint32, ctypes.POINTER(FrameT))
    dll.ed25519_verify.argtypes = (ctypes.c_char_p, ctypes.c_size_t, ctypes.c_char_p, ctypes.c_char_p)
    dll.ed25519_sha512.argtypes = (ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_char_p,
                                   ctypes.c_size_t, ctypes.c_char_p, ctypes.c_size_t)  # fmt: skip
    dll.slots_staging.restype = ctypes.c_uint8
    return dll


# --- frames -------------------------------------------------------------------------------------


class CParser:
    """frame.c's parser through ctypes, fed as the device feeds it (draining after every byte)."""

    def __init__(self, lib: ctypes.CDLL) -> None:
        self.lib = lib
        self.state = ctypes.create_string_buffer(MAX_PAYLOAD + 64 + 64)
        self.now = 0
        lib.frame_parser_init(self.state)

    def _drain(self, event: int, frame: FrameT, out: list[Frame | FrameFault]) -> None:
        while event != 0:
            if event == 1:
                out.append(Frame(frame.type, frame.seq, ctypes.string_at(frame.payload, frame.length), frame.flags))
            else:
                out.append(FrameFault(FrameErrorCode(-event), frame.seq))
            event = self.lib.frame_parser_next(self.state, ctypes.byref(frame))

    def feed(self, data: bytes) -> list[Frame | FrameFault]:
        """Feed bytes; the frames and faults in order."""
        out: list[Frame | FrameFault] = []
        frame = FrameT()
        for byte in data:
            assert self.lib.frame_parser_feed(self.state, byte, self.now) == 0
            self._drain(self.lib.frame_parser_next(self.state, ctypes.byref(frame)), frame, out)
        return out

    def silence(self) -> list[Frame | FrameFault]:
        """The line stays silent for the timeout."""
        self.now += FRAME_TIMEOUT_MS
        out: list[Frame | FrameFault] = []
        frame = FrameT()
        self._drain(self.lib.frame_parser_tick(self.state, self.now, ctypes.byref(frame)), frame, out)
        return out


def test_encoder_matches_frames_py(lib: ctypes.CDLL) -> None:
    out = ctypes.create_string_buffer(MAX_PAYLOAD + 12)
    for payload in (b"", b"\x01\x02\x03", bytes(range(256)) * 17):
        n = lib.frame_encode(0x83, 513, payload, len(payload), out, len(out))
        assert out.raw[:n] == encode_frame(0x83, 513, payload)
    assert lib.frame_encode(0x83, 1, bytes(MAX_PAYLOAD + 1), MAX_PAYLOAD + 1, out, len(out)) == 0
    assert lib.frame_encode(0x83, 1, b"abc", 3, out, 8 + 3 + 3) == 0  # no room for the CRC


def test_parser_good_truncated_oversized_crc_replay(lib: ctypes.CDLL) -> None:
    p = CParser(lib)
    ping = encode_frame(FrameType.PING, 1, b"\x01\x02\x03\x04")
    assert p.feed(ping) == [Frame(FrameType.PING, 1, b"\x01\x02\x03\x04")]
    assert p.feed(ping) == [FrameFault(FrameErrorCode.REPLAY, 1)]  # replay: same seq as the last accepted frame
    bad_crc = bytearray(encode_frame(FrameType.PING, 2, b"abcd"))
    bad_crc[-1] ^= 0x40
    assert p.feed(bytes(bad_crc)) == [FrameFault(FrameErrorCode.CRC, 2)]
    oversized = b"\xa5\x5a\x03\x00" + struct.pack("<HH", 3, MAX_PAYLOAD + 1)
    assert p.feed(oversized) == [FrameFault(FrameErrorCode.LENGTH, 3)]
    partial = encode_frame(FrameType.WINDOW, 4, bytes(100))[:50]
    assert p.feed(partial) == []
    assert p.silence() == [FrameFault(FrameErrorCode.TRUNCATED, 4)]
    assert p.feed(encode_frame(FrameType.PING, 5, b"wxyz")) == [Frame(FrameType.PING, 5, b"wxyz")]


def test_parser_finds_a_frame_inside_a_bogus_one(lib: ctypes.CDLL) -> None:
    p = CParser(lib)
    frame = encode_frame(FrameType.PING, 9, b"1234")
    # garbage that looks like a sync and a header announcing 40 bytes swallows the real frame
    bogus = b"\x00\xff\xa5\x5a\x05\x00\x07\x00\x28\x00"
    out = p.feed(b"\x13\x37" + bogus + frame + bytes(40 + 4 - len(frame)))
    assert out == [FrameFault(FrameErrorCode.CRC, 7), Frame(FrameType.PING, 9, b"1234")]


_frame_bytes = st.builds(
    encode_frame,
    st.sampled_from([int(t) for t in FrameType] + [0x00, 0x7F]),
    st.integers(0, 0xFFFF),
    st.binary(max_size=300),
)


@st.composite
def _stream(draw: st.DrawFn) -> list[tuple[str, bytes]]:
    """Operations on a line: whole, damaged, cut and repeated frames, garbage, silences."""
    ops: list[tuple[str, bytes]] = []
    for _ in range(draw(st.integers(1, 12))):
        kind = draw(st.sampled_from(["frame", "frame", "flip", "cut", "garbage", "sync", "silence", "replay"]))
        data = draw(_frame_bytes)
        if kind == "flip":
            i = draw(st.integers(0, len(data) - 1))
            data = data[:i] + bytes([data[i] ^ draw(st.integers(1, 255))]) + data[i + 1 :]
        elif kind == "cut":
            data = data[: draw(st.integers(1, len(data) - 1))]
        elif kind == "garbage":
            data = draw(st.binary(min_size=1, max_size=64))
        elif kind == "sync":
            data = b"\xa5\x5a" + draw(st.binary(max_size=10))
        elif kind == "replay" and ops and ops[-1][0] == "B":
            data = ops[-1][1]
        ops.append(("T", b"") if kind == "silence" else ("B", data))
    return ops


class FuzzDriver:
    """test_frame_driver (ASan + UBSan) in a subprocess."""

    def __init__(self) -> None:
        self.proc = subprocess.Popen([str(BUILD / "test_frame_driver")], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip

    def run(self, ops: list[tuple[str, bytes]]) -> tuple[list[Frame | FrameFault], list[int]]:
        """Play one case; its events and error counts by kind 1..6."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        request = b"".join(b"B" + struct.pack("<H", len(d)) + d if op == "B" else b"T" for op, d in ops) + b"E"
        try:
            self.proc.stdin.write(request)
            self.proc.stdin.flush()
            (n,) = struct.unpack("<I", self._read(4))
            events: list[Frame | FrameFault] = []
            for _ in range(n):
                code, frame_type, seq, length = struct.unpack("<bBHH", self._read(6))
                if code == 1:
                    events.append(Frame(frame_type, seq, self._read(length)))
                else:
                    events.append(FrameFault(FrameErrorCode(-code), seq))
            counts = list(struct.unpack("<6H", self._read(12)))
        except (BrokenPipeError, EOFError):
            raise AssertionError(f"frame driver died: {self.close()}") from None
        return events, counts

    def _read(self, n: int) -> bytes:
        assert self.proc.stdout is not None
        data = self.proc.stdout.read(n)
        if len(data) != n:
            raise EOFError
        return data

    def close(self) -> str:
        """End the driver; its stderr (the sanitizer's report, if any)."""
        assert self.proc.stdin is not None and self.proc.stderr is not None
        try:
            self.proc.stdin.write(b"Q")
            self.proc.stdin.close()
        except BrokenPipeError:
            pass
        self.proc.wait(10)
        return self.proc.stderr.read().decode(errors="replace")


@pytest.fixture(scope="module")
def fuzz_driver() -> Iterator[FuzzDriver]:
    """One driver process for the whole fuzz run."""
    _make("frame-fuzz")
    driver = FuzzDriver()
    yield driver
    report = driver.close()
    assert driver.proc.returncode == 0, report


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(ops=_stream())
def test_parser_fuzz_matches_frames_py(fuzz_driver: FuzzDriver, ops: list[tuple[str, bytes]]) -> None:
    reference = FrameParser()
    expected: list[Frame | FrameFault] = []
    for op, data in ops:
        expected += reference.feed(data) if op == "B" else reference.expire()
    events, counts = fuzz_driver.run(ops)
    assert events == expected
    assert counts[:4] == [reference.errors[FrameErrorCode(k)] for k in (1, 2, 3, 4)]


def test_parser_fuzz_survives_random_bytes(fuzz_driver: FuzzDriver) -> None:
    rng = random.Random(7)
    noise = bytes(rng.choice((0xA5, 0x5A, 0, 0xFF, rng.randrange(256))) for _ in range(60000))
    reference = FrameParser()
    expected = reference.feed(noise)
    ops = [("B", noise)]
    while reference.pending:  # every sync held in the noise times out in turn
        expected += reference.expire()
        ops.append(("T", b""))
    ping = encode_frame(FrameType.PING, 1, b"abcd")
    expected += reference.feed(ping)
    events, _ = fuzz_driver.run([*ops, ("B", ping)])
    assert events == expected
    assert events[-1] == Frame(FrameType.PING, 1, b"abcd")


# --- Ed25519 ------------------------------------------------------------------------------------


def _key(key_id: str, public: bytes | None, revoked: bool = False) -> KeyT:
    key = KeyT(key_id=key_id.encode(), has_key=int(public is not None), revoked=int(revoked))
    if public is not None:
        key.public_key[:] = list(public)
    return key


def test_sha512_matches_hashlib(lib: ctypes.CDLL) -> None:
    out = ctypes.create_string_buffer(64)
    for a, b, c in ((b"", b"", b""), (b"abc", b"", b""), (b"x" * 111, b"y", b"z" * 17), (b"q" * 300, b"r" * 64, b"")):
        lib.ed25519_sha512(out, a, len(a), b, len(b), c, len(c))
        assert out.raw == hashlib.sha512(a + b + c).digest()


def test_ed25519_vectors(lib: ctypes.CDLL) -> None:
    signer = private_key_from_seed(bytes([1]) * 32)
    other = private_key_from_seed(bytes([2]) * 32)
    ring = (KeyT * 4)(
        _key("server-1", public_key_bytes(signer)),
        _key("server-2", public_key_bytes(other)),
        _key("old", public_key_bytes(signer), revoked=True),
        _key("gone", None, revoked=True),
    )
    lib.ed25519_verify_set_keys(ring, 4)
    for size in (0, 1, 480, 1353):
        message = bytes((7 * i + size) & 0xFF for i in range(size))
        signature = signer.sign(message)
        assert lib.ed25519_verify(message, len(message), signature, b"server-1") == 0
        assert lib.ed25519_verify(message, len(message), signature, b"server-2") == -9  # wrong key
        assert lib.ed25519_verify(message, len(message), signature, b"old") == -11  # revoked, key still listed
        assert lib.ed25519_verify(message, len(message), signature, b"gone") == -11
        assert lib.ed25519_verify(message, len(message), signature, b"nobody") == -10
        bad = bytearray(signature)
        bad[size % 64] ^= 1
        assert lib.ed25519_verify(message, len(message), bytes(bad), b"server-1") == -9
        if size:
            altered = bytes([message[0] ^ 0x80]) + message[1:]
            assert lib.ed25519_verify(altered, len(altered), signature, b"server-1") == -9
    lib.ed25519_verify_set_keys(None, 0)


# --- slots --------------------------------------------------------------------------------------


@dataclass
class Flash:
    """A flash region with a write that can lose power after a number of bytes."""

    lib: ctypes.CDLL
    data: ctypes.Array[ctypes.c_char] = field(default_factory=lambda: ctypes.create_string_buffer(REGION_BYTES))
    budget: int | None = None  # bytes still written before the power goes; None: no loss
    writes: list[tuple[int, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.callback = WriteFn(self._write)
        self.ops = FlashT(ctypes.addressof(self.data), REGION_BYTES, self.callback)

    def _write(self, offset: int, data: ctypes._Pointer[ctypes.c_uint8], n: int) -> int:
        self.writes.append((offset, n))
        take = n if self.budget is None else min(n, self.budget)
        ctypes.memmove(ctypes.addressof(self.data) + offset, data, take)
        if self.budget is not None:
            self.budget -= take
        return 0 if take == n else -1

    def put(self, offset: int, data: bytes) -> None:
        """Write without any loss (the runner, or a completed download)."""
        ctypes.memmove(ctypes.addressof(self.data) + offset, data, len(data))

    def copy(self) -> Flash:
        """The same contents, as after a restart."""
        other = Flash(self.lib)
        other.put(0, self.data.raw)
        return other

    def boot(self) -> tuple[int, TableT]:
        """slots_boot on this region."""
        table = TableT()
        return self.lib.slots_boot(ctypes.byref(self.ops), ctypes.byref(table)), table


def _entry_t(entry: Entry) -> EntryT:
    out = EntryT(model_size=len(entry.model), version=entry.version, arena_bytes=entry.arena_bytes,
                 threshold=entry.threshold, name=entry.name.encode(), dsp_len=len(entry.dsp))  # fmt: skip
    out.sha256[:] = list(hashlib.sha256(entry.model).digest())
    out.dsp[: len(entry.dsp)] = list(entry.dsp)
    return out


MODEL_A = Entry(bytes((i * 31) & 0xFF for i in range(5000)), 3, 2048, 0.5, "ae-a", b"\x01\x00" + bytes(30))
MODEL_B = Entry(bytes((i * 17 + 5) & 0xFF for i in range(SLOT_BYTES)), 4, 4096, 0.75, "ae-b", b"\x01\x00" + bytes(90))
MODEL_C = Entry(bytes((i * 7 + 1) & 0xFF for i in range(777)), 5, 1024, 1.25, "ae-c", b"\x02\x00")


def _flash_with_a(lib: ctypes.CDLL) -> Flash:
    flash = Flash(lib)
    flash.put(0x10000, MODEL_A.model)
    table = encode_table(5, 0, NONE, (MODEL_A, Entry()))
    flash.put(0x1000, table)
    flash.put(0x2000, table)
    return flash


def test_provisioning_block(lib: ctypes.CDLL) -> None:
    flash = Flash(lib)
    block = encode_provisioning("dev-1", "plant", "", "nrf52840", [("k1", bytes(range(32)), False), ("k0", None, True)])
    flash.put(0, block)
    prov = ProvisioningT()
    assert lib.slots_load_provisioning(ctypes.byref(flash.ops), ctypes.byref(prov)) == 0
    assert (prov.device, prov.fleet, prov.group, prov.profile, prov.n_keys) == (b"dev-1", b"plant", b"", b"nrf52840", 2)
    assert bytes(prov.keys[0].public_key) == bytes(range(32)) and prov.keys[0].has_key and not prov.keys[0].revoked
    assert prov.keys[1].key_id == b"k0" and prov.keys[1].revoked and not prov.keys[1].has_key
    damaged = bytearray(block)
    damaged[10] ^= 1
    flash.put(0, bytes(damaged))
    assert lib.slots_load_provisioning(ctypes.byref(flash.ops), ctypes.byref(prov)) == -6  # CRC
    bad_name = encode_provisioning("dev 1", "plant", "", "p", [])
    flash.put(0, bad_name)
    assert lib.slots_load_provisioning(ctypes.byref(flash.ops), ctypes.byref(prov)) == -7  # field


def test_table_encoding_matches_the_layout(lib: ctypes.CDLL) -> None:
    table = TableT(seq=9, active=1, previous=0)
    table.slot[0] = _entry_t(MODEL_A)
    table.slot[1] = _entry_t(MODEL_C)
    out = ctypes.create_string_buffer(TABLE_BYTES)
    lib.slots_encode_table(ctypes.byref(table), out)
    assert out.raw == encode_table(9, 1, 0, (MODEL_A, MODEL_C))


def test_boot_picks_the_newest_valid_copy_and_falls_back(lib: ctypes.CDLL) -> None:
    flash = _flash_with_a(lib)
    assert flash.boot()[0] == 0 and flash.boot()[1].active == 0
    flash.put(0x30000, MODEL_C.model)
    flash.put(0x2000, encode_table(6, 1, 0, (MODEL_A, MODEL_C)))  # copy 1 newer
    status, table = flash.boot()
    assert (status, table.seq, table.active, table.previous) == (0, 6, 1, 0)
    newer_but_torn = bytearray(encode_table(7, 0, 1, (MODEL_A, MODEL_C)))
    newer_but_torn[100] ^= 0xFF
    flash.put(0x1000, bytes(newer_but_torn))
    assert flash.boot()[1].seq == 6
    flash.put(0x30000, b"\x00" * 10)  # the active model damaged: the previous one runs
    status, table = flash.boot()
    assert (status, table.active, table.previous) == (1, 0, NONE)
    flash.put(0x10000, b"\x00" * 10)  # both damaged
    assert flash.boot()[0] == 2
    status, table = Flash(lib).boot()  # blank flash: no table, no model
    assert (status, table.seq, table.active) == (2, 0, NONE)


def _commit(flash: Flash, table: TableT, slot: int, entry: Entry) -> int:
    return int(flash.lib.slots_commit(ctypes.byref(flash.ops), ctypes.byref(table), slot,
                                      ctypes.byref(_entry_t(entry))))  # fmt: skip


def _check_boots_into(flash: Flash, allowed: dict[int, Entry]) -> int:
    """Boot a copy of the region: a valid table whose active model verifies, one of `allowed`."""
    status, table = flash.copy().boot()
    assert status == 0, f"boot status {status}"
    assert table.active in allowed
    assert table.slot[table.active].version == allowed[table.active].version
    return int(table.active)


def test_commit_survives_power_loss_at_any_point(lib: ctypes.CDLL) -> None:
    base = _flash_with_a(lib)
    base.put(0x30000, MODEL_B.model)  # the download, complete and verified
    _, table = base.boot()
    assert _commit(base.copy(), table, 0, MODEL_B) == -7  # never over the running slot
    full = base.copy()
    assert _commit(full, table, 1, MODEL_B) == 0
    assert [offset for offset, _ in full.writes] == [0x2000, 0x1000]  # copy 0 is the newest: copy 1 first
    assert (table.seq, table.active, table.previous) == (6, 1, 0)
    for budget in [*range(0, 2 * TABLE_BYTES + 1, 23), TABLE_BYTES - 1, TABLE_BYTES, TABLE_BYTES + 1]:
        flash = base.copy()
        _, fresh = flash.boot()
        flash.budget = budget
        status = _commit(flash, fresh, 1, MODEL_B)
        assert (status == 0) == (budget >= 2 * TABLE_BYTES)
        active = _check_boots_into(flash, {0: MODEL_A, 1: MODEL_B})
        assert active == (1 if budget >= TABLE_BYTES else 0), budget
        # after the restart, the next model goes into the slot not running, and its commit is safe too
        restarted = flash.copy()
        _, table2 = restarted.boot()
        staging = lib.slots_staging(ctypes.byref(table2))
        assert staging != table2.active
        restarted.put(0x10000 + SLOT_BYTES * staging, MODEL_C.model)
        for budget2 in (0, TABLE_BYTES // 2, TABLE_BYTES, TABLE_BYTES + 7, None):
            again = restarted.copy()
            _, table3 = again.boot()
            again.budget = budget2
            _commit(again, table3, staging, MODEL_C)
            running = {0: MODEL_A, 1: MODEL_B}[table2.active]
            new = _check_boots_into(again, {table2.active: running, staging: MODEL_C})
            assert new == (staging if budget2 is None or budget2 >= TABLE_BYTES else table2.active)


def _load_transfer(flash: Flash) -> tuple[int, TransferT]:
    record = TransferT()
    return flash.lib.slots_load_transfer(ctypes.byref(flash.copy().ops), ctypes.byref(record)), record


def test_transfer_record_encoding_and_boot_choice(lib: ctypes.CDLL) -> None:
    record = _transfer_t(7, MODEL_B.model, 128, 1, {0, 1, 2, 127}, seq=41)
    out = ctypes.create_string_buffer(TRANSFER_BYTES)
    lib.slots_encode_transfer(ctypes.byref(record), out)
    assert out.raw == encode_transfer(41, 7, MODEL_B.model, 128, 1, {0, 1, 2, 127})
    flash = _flash_with_a(lib)
    status, loaded = _load_transfer(flash)
    assert (status, loaded.seq, loaded.version) == (2, 0, 0)  # blank: no transfer
    flash.put(TRANSFER_OFFSETS[1], out.raw)
    image = ctypes.string_at(flash.data, REGION_BYTES)
    kept = read_transfer_record(image)
    assert kept is not None and kept.received == {0, 1, 2, 127} and (kept.version, kept.slot) == (7, 1)
    status, loaded = _load_transfer(flash)
    assert (status, loaded.seq, loaded.version, loaded.chunks()) == (0, 41, 7, {0, 1, 2, 127})
    flash.put(TRANSFER_OFFSETS[0], encode_transfer(42, 0, b"", 0, 0, set()))  # cleared, newer
    status, loaded = _load_transfer(flash)
    assert (status, loaded.seq, loaded.version) == (2, 42, 0) and read_transfer_record(flash.data.raw) is None
    torn = bytearray(encode_transfer(43, 8, MODEL_C.model, 1, 0, {0}))
    torn[300] ^= 0x10
    flash.put(TRANSFER_OFFSETS[1], bytes(torn))  # newer but torn: the cleared one counts
    assert _load_transfer(flash)[0] == 2
    flash.put(TRANSFER_OFFSETS[1], encode_transfer(43, 8, MODEL_C.model, 4097, 0, {0}))  # a count out of range
    assert _load_transfer(flash)[0] == 2


def test_transfer_record_survives_power_loss_at_any_point(lib: ctypes.CDLL) -> None:
    """Saves as the device makes them (a new download, then one chunk each, then the clear): a power loss
    anywhere leaves the record of the save before or the one being made, never a torn or older one."""
    flash = _flash_with_a(lib)
    saves = [_transfer_t(4, MODEL_B.model, 128, 1, set(range(k))) for k in range(6)]
    saves.append(TransferT())  # slots_clear_transfer's record: version 0
    expected: list[tuple[int, set[int]]] = [(0, set())]  # (version, chunks) after each save; none at first
    seq = 0
    for n, record in enumerate(saves):
        record.seq = seq
        for budget in [*range(0, TRANSFER_BYTES + 1, 23), 1, TRANSFER_BYTES - 1]:
            cut = flash.copy()
            cut.budget = budget
            attempt = TransferT.from_buffer_copy(record)
            status = lib.slots_save_transfer(ctypes.byref(cut.ops), ctypes.byref(attempt))
            assert (status == 0) == (budget >= TRANSFER_BYTES)
            loaded_status, loaded = _load_transfer(cut)
            got = (loaded.version, loaded.chunks()) if loaded_status == 0 else (0, set())
            done = (record.version, set(range(n)) if record.version else set())
            assert got == (done if budget >= TRANSFER_BYTES else expected[-1]), (n, budget)
        assert lib.slots_save_transfer(ctypes.byref(flash.ops), ctypes.byref(record)) == 0
        assert flash.writes == [(TRANSFER_OFFSETS[k % 2], TRANSFER_BYTES) for k in range(n + 1)]  # one copy each
        seq = record.seq
        expected.append((record.version, set(range(n)) if record.version else set()))
    assert seq == len(saves)
    status, table = flash.copy().boot()
    assert (status, table.active) == (0, 0)  # the slot table is never written by a save


# --- the device image under QEMU ----------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Uart:
    """The device's UART0 over QEMU's TCP serial bridge."""

    def __init__(self, port: int) -> None:
        deadline = time.monotonic() + 20
        while True:
            try:
                self.sock = socket.create_connection(("127.0.0.1", port), timeout=1)
                break
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)
        self.parser = FrameParser()
        self.frames: list[Frame] = []

    def expect(self, frame_type: FrameType, timeout_s: float = 20.0) -> Frame:
        """The next frame of this type (others are kept in ``frames``)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for i, frame in enumerate(self.frames):
                if frame.type == frame_type:
                    return self.frames.pop(i)
            self.sock.settimeout(max(deadline - time.monotonic(), 0.01))
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                break
            assert data, "the device closed the line"
            self.frames += [f for f in self.parser.feed(data) if isinstance(f, Frame)]
        raise AssertionError(f"no {frame_type.name} within {timeout_s} s; got {self.frames}")


needs_qemu = pytest.mark.skipif(
    shutil.which("qemu-system-arm") is None or shutil.which("arm-none-eabi-gcc") is None,
    reason="needs qemu-system-arm and arm-none-eabi-gcc",
)


@contextlib.contextmanager
def running_device(tmp_path: Path, flash: bytes) -> Iterator[Uart]:
    """device.elf under QEMU (mps2-an386, -icount shift=0) with this flash region, its UART connected."""
    command = ["make", "-s", "-C", str(C_DIR), "-f", "Makefile.arm", "BOARD=mps2-an386", "build/mps2-an386/device.elf"]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, check=False)
    assert result.returncode == 0, result.stderr[-3000:]
    image = tmp_path / "flash.img"
    image.write_bytes(flash + bytes(FLASH_BYTES - len(flash)))
    port = _free_port()
    qemu = subprocess.Popen(
        ["qemu-system-arm", "-M", "mps2-an386", "-nographic", "-monitor", "none", "-icount", "shift=0",
         "-semihosting-config", f"enable=on,target=native,arg=device,arg=flash={image}",
         "-serial", f"tcp:127.0.0.1:{port},server=on,wait=on",
         "-device", f"loader,file={image},addr=0x00300000,force-raw=on",
         "-kernel", str(C_DIR / "build" / "mps2-an386" / "device.elf")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=tmp_path,
    )  # fmt: skip
    try:
        yield Uart(port)
    finally:
        qemu.kill()
        qemu.wait(10)


def _provisioning() -> bytes:
    return encode_provisioning("emu-1", "plant", "line-2", "nrf52840",
                               [("k1", bytes(range(32)), False), ("k0", bytes(32), True)])  # fmt: skip


@needs_qemu
def test_device_image_boots_says_hello_and_answers_ping(tmp_path: Path) -> None:
    with running_device(tmp_path, _provisioning()) as uart:
        hello = HelloFrame.decode(uart.expect(FrameType.HELLO).payload)
        assert (hello.device, hello.fleet, hello.group, hello.profile, hello.board) == (
            "emu-1", "plant", "line-2", "nrf52840", "mps2-an386")  # fmt: skip
        assert hello.key_ids == ("k1",) and hello.model is None and hello.slot_bytes == SLOT_BYTES
        status = StatusFrame.decode(uart.expect(FrameType.STATUS).payload)
        assert status.state == 0 and status.active is None
        uart.sock.sendall(encode_frame(FrameType.PING, 1, b"\xde\xad\xbe\xef"))
        assert uart.expect(FrameType.PONG).payload == b"\xde\xad\xbe\xef"
        uart.sock.sendall(encode_frame(FrameType.PING, 1, b"abcd"))  # replayed seq
        assert uart.expect(FrameType.FRAME_ERROR).payload == b"\x04\x01\x00"


@needs_qemu
def test_device_scores_windows_as_device_py(tmp_path: Path) -> None:
    """A model in the slot table at boot scores windows as firmware.device.score_window does, each at its speed.

    The DSP spec is version 2 with a speed trend; the windows carry the tachometer value (float32 on the wire)
    at several speeds, unusable ones (NaN, 0, 70000 rpm: the fallback, counted) and one without the field (a
    gateway that predates it: unknown, the fallback).
    """
    model = int8_autoencoder()
    sim, speeds = MachineSimulator(seed=99), np.repeat([900.0, 1100.0, 1300.0, 1500.0], 8)
    training = []
    for rpm in speeds:
        sim.set_operating_point(OperatingPoint(rpm, 0.5))
        training.append(sim.next_window())
    fitted = DspSpec().fitted(raw_features(np.stack(training), DspSpec()), speeds)
    assert fitted.version == 2 and fitted.speed_slope
    block = encode_dsp_block(fitted)
    spec = decode_dsp_block(block)  # float32 statistics, as the device holds them
    threshold = 1.0
    entry = Entry(model, 7, 16384, threshold, "vibration-ae", block)
    table = encode_table(1, 0, NONE, (entry, Entry()))
    flash = bytearray(0x10000 + len(model))
    flash[: len(_provisioning())] = _provisioning()
    flash[0x1000 : 0x1000 + TABLE_BYTES] = table
    flash[0x2000 : 0x2000 + TABLE_BYTES] = table
    flash[0x10000:] = model
    reference = cast(ActiveModel, SimpleNamespace(spec=spec, runner=TflmRunner(model, 16384)))
    rpms: list[float | None] = [900.0, 1234.5, 1500.0, 2400.0, float("nan"), 0.0, 70_000.0, None, 60.0, 1000.0]
    windows = [quantize(sim.next_window()) for _ in rpms]
    with running_device(tmp_path, bytes(flash)) as uart:
        hello = HelloFrame.decode(uart.expect(FrameType.HELLO).payload)
        assert hello.model is not None and hello.model.version == 7 and hello.dsp_version_list == [1, 2]
        assert StatusFrame.decode(uart.expect(FrameType.STATUS).payload).speed_fallback == 0  # the boot status
        for seq, ((samples, scale), rpm) in enumerate(zip(windows, rpms, strict=True), start=1):
            frame = WindowFrame(100 + seq, scale, spec.sample_rate_hz, tuple(samples.tolist()), rpm)
            uart.sock.sendall(encode_frame(FrameType.WINDOW, seq, frame.encode()))
        scores = ScoresFrame.decode(uart.expect(FrameType.SCORES).payload)
        uart.sock.sendall(encode_frame(FrameType.SUMMARY_NOW, 11, b""))
        summary = SummaryFrame.decode(uart.expect(FrameType.SUMMARY).payload)
        uart.sock.sendall(encode_frame(FrameType.MANIFEST, 12, b"\x00not a manifest"))  # any status carries the count
        status = StatusFrame.decode(uart.expect(FrameType.STATUS).payload)
    assert scores.model_version == 7 and scores.first_seq == 101 and len(scores.items) == 10
    on_wire = [None if rpm is None else float(np.float32(rpm)) for rpm in rpms]
    expected = [
        score_window(reference, samples.astype(np.float32) * np.float32(scale), rpm)
        for (samples, scale), rpm in zip(windows, on_wire, strict=True)
    ]
    device_scores = np.array([item.score for item in scores.items])
    reference_scores = np.array([score for score, *_ in expected])
    # the same int8 inputs reach the model: only the float32 front end differs from numpy's (5e-6 here)
    np.testing.assert_allclose(device_scores, reference_scores, rtol=1e-4)
    assert [item.anomaly for item in scores.items] == [s > threshold for s in reference_scores]
    assert all(item.dsp_instructions > 0 and item.inference_instructions > 0 for item in scores.items)
    features = np.stack([f for _, f, *_ in expected])
    assert summary.windows == 10 and summary.model_version == 7
    np.testing.assert_allclose(summary.feature_mean, features.mean(axis=0), atol=1e-3)
    np.testing.assert_allclose(summary.score_mean, reference_scores.mean(), rtol=1e-4)
    fell_back = resolve_speed(np.array(on_wire, dtype=float), spec, len(rpms))[1]
    fallbacks = int(fell_back.sum())
    dsp = np.array([item.dsp_instructions for item in scores.items])
    record_fault(
        FaultRecord(
            "window without a usable speed (C firmware under QEMU)", broken_devices=0,
            notes=f"{len(scores.items)} of {len(rpms)} windows scored over the UART (NaN, 0 and 70,000 rpm, and one "
            f"without the rpm field, among 900-2,400 rpm); {summary.speed_fallback} at the reference speed, counted "
            f"in the SUMMARY ({summary.speed_fallback}) and STATUS ({status.speed_fallback}) frames; scores against "
            f"firmware.device.score_window: largest relative difference "
            f"{float(np.max(np.abs(device_scores / reference_scores - 1))):.1g}; "
            f"DSP {int(np.median(dsp[~fell_back])):,} instructions per window at a usable speed, "
            f"{int(np.median(dsp[fell_back])):,} at the fallback",
        )
    )  # fmt: skip
    assert fallbacks == 4 and summary.speed_fallback == fallbacks and status.speed_fallback == fallbacks


@needs_qemu
def test_device_boots_the_previous_model_when_the_active_one_is_damaged(tmp_path: Path) -> None:
    model = int8_autoencoder()
    block = encode_dsp_block(DspSpec(mean=(0.0,) * 35, std=(1.0,) * 35))
    previous = Entry(model, 3, 16384, 1.0, "ae-old", block)
    damaged = Entry(model, 4, 16384, 1.0, "ae-new", block)
    table = encode_table(8, 1, 0, (previous, damaged))
    flash = bytearray(0x10000 + 2 * SLOT_BYTES)
    flash[: len(_provisioning())] = _provisioning()
    flash[0x1000 : 0x1000 + TABLE_BYTES] = table
    flash[0x2000 : 0x2000 + TABLE_BYTES] = table
    flash[0x10000 : 0x10000 + len(model)] = model
    flash[0x30000 : 0x30000 + len(model)] = model
    flash[0x30000 + len(model) // 2] ^= 0x01  # one bit flipped in the active slot
    with running_device(tmp_path, bytes(flash)) as uart:
        assert b"sha256" in uart.expect(FrameType.LOG).payload
        hello = HelloFrame.decode(uart.expect(FrameType.HELLO).payload)
        assert hello.model is not None and (hello.model.version, hello.model.name) == (3, "ae-old")


@needs_qemu
def test_unprovisioned_device_says_why(tmp_path: Path) -> None:
    with running_device(tmp_path, b"\xff" * FLASH_BYTES) as uart:
        hello = HelloFrame.decode(uart.expect(FrameType.HELLO).payload)
        assert hello.device == "" and hello.model is None
        status = StatusFrame.decode(uart.expect(FrameType.STATUS).payload)
        assert (status.state, status.domain, status.code) == (5, 4, -3)  # failed, flash/slots, bad magic
        uart.sock.sendall(encode_frame(FrameType.PING, 1, b"ok!!"))
        assert uart.expect(FrameType.PONG).payload == b"ok!!"
