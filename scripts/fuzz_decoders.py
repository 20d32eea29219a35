"""Coverage-guided fuzzing (atheris / libFuzzer) of every decoder that reads bytes from the network, bounded.

Usage::

    .venv/bin/python scripts/fuzz_decoders.py TARGET [libFuzzer flags]
    .venv/bin/python scripts/fuzz_decoders.py manifest -max_total_time=60
    .venv/bin/python scripts/fuzz_decoders.py all -runs=200000

TARGET is one of ``vibration`` (``firmware.codec.decode``), ``manifest``, ``chunk``, ``request``, ``dsp``
(``firmware.ota.decode_*``), ``announce``, ``status``, ``scores``, ``summary`` (the JSON messages), or
``all``: every input's first byte picks the decoder (round robin over the inputs). Without ``-runs`` or
``-max_total_time`` the run stops after 60 s. A binary message is decoded as fuzzed and again with its
CRC-32 recomputed, so the field checks behind the CRC are fuzzed too.

A decoder may return a valid message or raise its documented error (``DecodeError`` for vibration
windows, ``OtaDecodeError`` for the rest) with a one-line message. Anything else, an accepted message
that does not encode back to the same bytes (JSON: to an equal message), or a multi-line error, is a
crash: libFuzzer prints the traceback, writes the input to ``crash-*`` (see ``-artifact_prefix``) and
the script exits non-zero. The corpus grows in ``data/fuzz/<target>`` (git-ignored; ``--corpus``),
seeded with valid messages of every kind.

atheris is an optional extra: ``pip install -e '.[fuzz]'`` (Linux or macOS, CPython 3.8-3.12 wheels).
"""

from __future__ import annotations

import argparse
import hashlib
import logging
import math
import struct
import sys
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

log = logging.getLogger("fuzz_decoders")
REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_SECONDS = 60
CRC_BYTES = 4


@dataclass(frozen=True)
class Target:
    """One decoder under fuzzing.

    Attributes:
        name: Command-line name.
        decode: The decoder.
        documented: The only exception it may raise.
        check: Raises AssertionError unless an accepted message is valid (encodes back).
        crc: Whether the format ends in a CRC-32 of everything before it.
        seeds: Valid messages to start the corpus from.
    """

    name: str
    decode: Callable[[bytes], Any]
    documented: type[Exception]
    check: Callable[[bytes, Any], None]
    crc: bool
    seeds: tuple[bytes, ...]


def fix_crc(data: bytes) -> bytes:
    """``data`` with its last 4 bytes replaced by the CRC-32 of the rest (the formats' trailer)."""
    body = data[:-CRC_BYTES]
    return body + struct.pack("<I", zlib.crc32(body))


def load_targets() -> dict[str, Target]:
    """Import the decoders (under atheris instrumentation when called inside it) and describe them."""
    import numpy as np

    from firmware import codec
    from firmware.ota import (
        Announcement,
        Chunk,
        ChunkRequest,
        DeviceStatus,
        DriftSummary,
        ModelRef,
        OtaDecodeError,
        ReferenceSet,
        ScoreBatch,
        build_manifest,
        decode_chunk,
        decode_dsp_block,
        decode_manifest,
        decode_request,
        device_audience,
        encode_dsp_block,
        group_audience,
    )
    from firmware.signing import ManifestSigner, generate_keypair
    from tinymlops.contracts.dsp import DspSpec
    from tinymlops.errors import DecodeError

    def same_bytes(payload: bytes, decoded: Any) -> None:
        if decoded.encode() != payload:
            raise AssertionError(f"accepted {payload!r} re-encodes as {decoded.encode()!r}")

    def same_window(payload: bytes, decoded: Any) -> None:
        # flags are reserved (decode ignores them); a version-1 window re-encodes as version 3 with epoch 0, a
        # version-1/2 one with rpm 0.0 and load NaN (not known); a version-3 rpm of -0.0 as 0.0 (not known), a
        # signalling NaN rpm as its quiet form, any NaN load as the NaN encode writes
        rest = payload[4:] if payload[2] != 1 else bytes(4) + payload[4:]
        if payload[2] == 3:
            rpm, load = struct.unpack_from("<ff", rest, 24)
            rest = rest[:24] + rest[32:]
        else:
            rpm, load = 0.0, math.nan
        condition = struct.pack("<ff", 0.0 if rpm == 0 else rpm, math.nan if math.isnan(load) else load)
        canonical = fix_crc(payload[:2] + b"\x03\x00" + rest[:24] + condition + rest[24:])
        if codec.encode(decoded) != canonical:
            raise AssertionError(f"accepted window {payload!r} re-encodes differently")

    def same_dsp(payload: bytes, decoded: Any) -> None:
        if encode_dsp_block(decoded) != payload:
            raise AssertionError(f"accepted DSP block {payload!r} re-encodes differently")

    def json_round_trip(kind: Any) -> Callable[[bytes, Any], None]:
        def check(payload: bytes, decoded: Any) -> None:
            again = kind.decode(decoded.encode())  # an OtaDecodeError here is a crash too
            if again != decoded:
                raise AssertionError(f"accepted {payload!r} does not survive encode/decode: {again!r}")

        return check

    n = DspSpec().n_features
    spec = DspSpec(mean=tuple(0.25 * i for i in range(n)), std=tuple(1.0 + i for i in range(n)))
    signer = ManifestSigner(generate_keypair()[0], "fuzz-key")
    model = hashlib.shake_256(b"tinymlops fuzz model").digest(3000)
    references = ReferenceSet((bytes(n), bytes(range(n))), (bytes(range(n)), bytes(n)))
    manifests = [
        build_manifest(model, name="vibration-ae-nrf52840", version=7, target="nrf52840", audience=audience,
                       dsp_spec=spec, threshold=0.8125, arena_bytes=3656, signer=signer, chunk_size=size,
                       references=references).encode()
        for audience, size in ((device_audience("node-0001"), 1024), (group_audience("line-3"), 256))
    ]  # fmt: skip
    rng = np.random.default_rng(0)
    windows = [
        codec.encode(codec.VibrationWindow("node-0001", 42, 1_790_000_000_000_000, 25_600, 0.001,
                                           rng.integers(-2000, 2000, size, dtype=np.int16), epoch, rpm, load))
        for size, epoch, rpm, load in ((8, 0, None, None), (1024, 1_790_000_000, 1797.0, 0.5))
    ]  # fmt: skip
    tag = hashlib.sha256(model).digest()[:8]
    ref = ModelRef(name="vibration-ae-nrf52840", version=7, sha256=hashlib.sha256(model).hexdigest())
    announce = Announcement(device="node-0001", fleet="plant", group="line-3", firmware="1.2.0", profile="nrf52840",
                            flash_free=700_000, slot_bytes=262_144, ram_free=131_072, max_chunk=1024,
                            dsp_versions=[1], key_ids=["fuzz-key"], model=ref, ts=1.79e9)  # fmt: skip
    status = DeviceStatus(device="node-0001", seq=3, ts=1.79e9, state="downloading", status="downloading 1/3",
                          model=ref.name, version=7, received=1, total=3, active=ref,
                          latency_ms={"deploy_ms": 12.5}, counters={"retries": 1})  # fmt: skip
    scores = ScoreBatch(device="node-0001", model=ref.name, version=7, threshold=0.8125, first_seq=40, ts=1.79e9,
                        scores=[0.1, 0.9, 2.5], anomalies=[False, True, True])  # fmt: skip
    summary = DriftSummary(device="node-0001", model=ref.name, version=7, threshold=0.8125, start_ts=1.79e9,
                           end_ts=1.79e9 + 60, windows=3, anomalies=1, score_mean=0.5, score_edges=[0.0, 0.4, 0.8],
                           score_counts=[1, 1, 1], feature_mean=[0.0, 1.0], feature_var=[1.0, 2.0],
                           latency_ms={"inference_mean": 1.5})  # fmt: skip
    ota, json_kinds = OtaDecodeError, {"announce": announce, "status": status, "scores": scores, "summary": summary}
    targets = [
        Target("vibration", codec.decode, DecodeError, same_window, True, tuple(windows)),
        Target("manifest", decode_manifest, ota, same_bytes, True, tuple(manifests)),
        Target("chunk", decode_chunk, ota, same_bytes, True,
               (Chunk(7, tag, 0, 3, model[:1024]).encode(), Chunk(7, tag, 2, 3, model[2048:]).encode())),
        Target("request", decode_request, ota, same_bytes, True,
               (ChunkRequest(7, tag, (0, 1, 2)).encode(), ChunkRequest(7, tag, (5,)).encode())),
        Target("dsp", decode_dsp_block, ota, same_dsp, False, (encode_dsp_block(spec),)),
        *(Target(name, type(message).decode, ota, json_round_trip(type(message)), False, (message.encode(),))
          for name, message in json_kinds.items()),
    ]  # fmt: skip
    return {t.name: t for t in targets}


def decode_checked(target: Target, data: bytes) -> None:
    """Decode; let anything but a one-line documented error, or an invalid accepted message, escape."""
    try:
        decoded = target.decode(data)
    except target.documented as exc:
        if "\n" in str(exc) or not str(exc):
            raise AssertionError(f"{target.name}: error message is not one line: {exc!r}") from exc
        return
    target.check(data, decoded)


def one_input(target: Target, data: bytes) -> None:
    """Fuzz one input: as it is and, for a CRC-protected format, with its CRC made valid."""
    decode_checked(target, data)
    if target.crc and len(data) > CRC_BYTES:
        decode_checked(target, fix_crc(data))


def write_seeds(corpus: Path, seeds: Sequence[bytes]) -> None:
    """Put the valid messages into the corpus directory (named by content, so reruns add nothing)."""
    corpus.mkdir(parents=True, exist_ok=True)
    for seed in seeds:
        (corpus / f"seed-{hashlib.sha1(seed).hexdigest()}").write_bytes(seed)


def main(argv: Sequence[str]) -> None:
    """Parse the target and run libFuzzer on it until its bound; never returns (libFuzzer exits)."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("target", help="decoder to fuzz, or 'all'")
    parser.add_argument("--corpus", type=Path, help="corpus directory (default data/fuzz/<target>)")
    args, libfuzzer_args = parser.parse_known_args(argv[1:])
    try:
        import atheris
    except ImportError:
        log.error("atheris is not installed: pip install -e '.[fuzz]' (wheels for Linux/macOS, CPython <= 3.12)")
        sys.exit(2)
    with atheris.instrument_imports(include=["firmware", "tinymlops"]):
        targets = load_targets()
    names = sorted(targets)
    if args.target != "all" and args.target not in targets:
        parser.error(f"unknown target {args.target!r}; choose from all, {', '.join(names)}")
    if not any(a.startswith(("-runs=", "-max_total_time=")) for a in libfuzzer_args):
        libfuzzer_args.append(f"-max_total_time={DEFAULT_SECONDS}")
    corpus = args.corpus or REPO_ROOT / "data" / "fuzz" / args.target

    if args.target == "all":
        chosen = [targets[name] for name in names]
        # the first byte picks the decoder, so one corpus serves all of them
        write_seeds(corpus, [bytes([i]) + seed for i, t in enumerate(chosen) for seed in t.seeds])

        def test_one_input(data: bytes) -> None:
            if data:
                one_input(chosen[data[0] % len(chosen)], data[1:])

    else:
        target = targets[args.target]
        write_seeds(corpus, target.seeds)

        def test_one_input(data: bytes) -> None:
            one_input(target, data)

    log.info("fuzzing %s with corpus %s and %s", args.target, corpus, " ".join(libfuzzer_args))
    atheris.Setup([argv[0], *libfuzzer_args, str(corpus)], test_one_input)
    atheris.Fuzz()


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    main(sys.argv)
