"""A stand-in for the C device application, in Python, speaking the UART frames over TCP like QEMU does.

It listens on a loopback port (as QEMU's ``-serial tcp:...,server=on``), accepts the gateway and
then behaves as FIRMWARE.md says the firmware does: HELLO and a status at boot, the OTA receiver
of ``firmware.ota`` for manifests and chunks, the C runtime (``firmware.tinyrt``, the same
tinyrt the firmware links) to load and score, SCORES/SUMMARY frames, FRAME_ERROR for bad frames.
Its "flash" (the active model, and the download in progress with the chunks it holds, as the
firmware's transfer record) survives :meth:`FakeUartDevice.kill` and a new start, as flash.img
does: the same manifest after a restart resumes at the first missing chunk. Instruction counts are
wall-clock nanoseconds: plausible numbers, not measurements.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import socket
import threading
import time
from dataclasses import dataclass, field

import numpy as np

from firmware.device import DeviceError, check_references
from firmware.frames import (
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
    decode_payload,
    encode_frame,
)
from firmware.ota import (
    SCORE_EDGES_REL,
    Manifest,
    OtaDecodeError,
    OtaReceiver,
    ReceiverConfig,
    RxStatus,
    decode_chunk,
    decode_manifest,
)
from firmware.signing import KeyRing
from firmware.tinyrt import NativeRuntime, TinyrtError
from tinymlops.contracts.dsp import extract_features
from tinymlops.contracts.scoring import anomaly_scores, is_anomalous
from tinymlops.mqtt import free_port

SLOT_BYTES = 128 * 1024
RAM_FREE = 192 * 1024


@dataclass
class KeptTransfer:
    """The transfer record of slots.h with its staging slot: the download a restart resumes."""

    version: int
    sha256: bytes
    staging: bytearray
    received: bytearray  # one flag per chunk


@dataclass
class FakeFlash:
    """What survives a restart: the active model, and the download in progress."""

    manifest: Manifest | None = None
    model: bytes = b""
    transfer: KeptTransfer | None = None


@dataclass
class _Download:
    manifest: Manifest
    source: int
    started: float
    outstanding: set[int] = field(default_factory=set)
    last_request: float = 0.0
    counters: list[int] = field(default_factory=lambda: [0, 0, 0, 0, 0])


class FakeUartDevice:
    """The device application's behaviour on the UART, in Python (a test double for device.elf)."""

    def __init__(
        self, device_id: str, fleet: str, profile: str, keyring: KeyRing, *, group: str = "", flash: FakeFlash | None
    ) -> None:
        self.device_id, self.fleet, self.profile, self.group = device_id, fleet, profile, group
        self.keyring = keyring
        self.flash = flash or FakeFlash()
        self.port = free_port()
        self._server = socket.create_server(("127.0.0.1", self.port))
        self._sock: socket.socket | None = None
        self._seq = 0
        self._status_seq = 0
        self._lock = threading.Lock()
        self._parser = FrameParser()
        self._download: _Download | None = None
        self._last_status: StatusFrame | None = None
        self._window: WindowFrame | None = None
        self._runtime: NativeRuntime | None = None
        self._pending: list[tuple[int, ScoreItem]] = []
        self._summary: list[tuple[float, np.ndarray, int, int]] = []
        self._alive = True
        self.frames_received: list[int] = []
        active = self.flash.manifest
        self.receiver = OtaReceiver(
            ReceiverConfig(device_id, profile, SLOT_BYTES, RAM_FREE, group or None), keyring,
            active_version=active.model_version if active else 0,
        )  # fmt: skip
        if active is not None:
            self._runtime = NativeRuntime(self.flash.model)
        self._thread = threading.Thread(target=self._run, name=f"fake-uart-{device_id}", daemon=True)
        self._thread.start()

    # --- lifecycle -----------------------------------------------------------------------------

    def kill(self) -> None:
        """Power loss: close the UART at once; the flash stays."""
        self._alive = False
        for sock in (self._sock, self._server):
            if sock is not None:
                with contextlib.suppress(OSError):
                    sock.shutdown(socket.SHUT_RDWR)
                sock.close()
        self._thread.join(5)

    def _run(self) -> None:
        try:
            self._sock, _ = self._server.accept()
        except OSError:
            return
        self._sock.settimeout(0.05)
        self._send(self._hello())
        self._send_status(DeviceStateCode.ACTIVE if self.flash.manifest else DeviceStateCode.IDLE)
        while self._alive:
            try:
                data = self._sock.recv(65536)
            except TimeoutError:
                data = None
            except OSError:
                return
            if data == b"":
                return
            if data:
                for item in self._parser.feed(data):
                    self._on_item(item)
            self._tick()

    def _send(self, payload: Payload) -> None:
        with self._lock:
            self._seq = (self._seq + 1) & 0xFFFF
            frame = encode_frame(payload.TYPE, self._seq, payload.encode())
            if self._sock is not None:
                with contextlib.suppress(OSError):
                    self._sock.sendall(frame)

    # --- messages ------------------------------------------------------------------------------

    def _active_info(self) -> ModelInfo | None:
        m = self.flash.manifest
        return ModelInfo(m.model_version, m.sha256, m.model_name) if m else None

    def _hello(self) -> HelloFrame:
        return HelloFrame(
            flash_free=2 * SLOT_BYTES, slot_bytes=SLOT_BYTES, ram_free=RAM_FREE, max_chunk=4096, dsp_versions=0b110,
            device=self.device_id, fleet=self.fleet, group=self.group, firmware="tinymlops-fw/0.1.0",
            profile=self.profile, board="fake-uart", key_ids=tuple(self.keyring.key_ids), model=self._active_info(),
        )  # fmt: skip

    def _send_status(
        self,
        state: DeviceStateCode,
        domain: StatusDomain = StatusDomain.NONE,
        code: int = 0,
        manifest: Manifest | None = None,
        received: int = 0,
        detail: str = "",
        **instructions: int,
    ) -> None:
        self._status_seq += 1
        dl = self._download
        counters = tuple(dl.counters) if dl is not None else (0, 0, 0, 0, 0)
        status = StatusFrame(
            self._status_seq, state, domain, code, manifest.model_version if manifest else 0, received,
            manifest.chunk_count if manifest else 0, self._active_info(), manifest.model_name if manifest else "",
            counters=counters, frame_errors=tuple(self._parser.errors[FrameErrorCode(c)] for c in (1, 2, 3, 4, 6)),  # type: ignore[arg-type]
            detail=detail[:200], **instructions,
        )  # fmt: skip
        self._last_status = status
        self._send(status)

    def _on_item(self, item: Frame | FrameFault) -> None:
        if isinstance(item, FrameFault):
            self._send(FrameErrorFrame(item.code, item.seq))
            return
        self.frames_received.append(item.type)
        try:
            payload = decode_payload(item)
        except FrameDecodeError:
            known = item.type in {t.value for t in FrameType}
            code = FrameErrorCode.MALFORMED if known else FrameErrorCode.UNKNOWN_TYPE
            self._parser.errors[code] += 1
            self._send(FrameErrorFrame(code, item.seq))
            return
        if isinstance(payload, ManifestFrame):
            self._on_manifest(payload)
        elif isinstance(payload, ChunkFrame):
            self._on_chunk(payload.chunk)
        elif isinstance(payload, WindowFrame):
            self._on_window(payload)
        elif isinstance(payload, SummaryNowFrame):
            self._flush_scores()
            self._send_summary()
        elif isinstance(payload, PingFrame) and not isinstance(payload, PongFrame):
            self._send(PongFrame(payload.nonce))

    def _request(self) -> None:
        dl = self._download
        request = self.receiver.request(8)
        if dl is None or request is None:
            return
        dl.outstanding = set(request.indices)
        dl.last_request = time.monotonic()
        dl.counters[0] += 1
        self._send(RequestFrame(request.encode()))

    def _tick(self) -> None:
        dl = self._download
        if dl is not None and time.monotonic() - dl.last_request > 0.5:
            dl.counters[1] += 1
            self._request()

    def _on_manifest(self, frame: ManifestFrame) -> None:
        dl = self._download
        if not frame.manifest:
            if dl is not None and dl.source == frame.source:
                self.receiver.abort()
                self._download = None
                self.flash.transfer = None
                self._send_status(DeviceStateCode.CANCELLED, manifest=dl.manifest, detail="manifest withdrawn")
            return
        code = self.receiver.on_manifest(frame.manifest)
        if code == RxStatus.SAME:
            if self._last_status is not None:
                self._send(self._last_status)
            self._request()
            return
        if code.is_error:
            state = DeviceStateCode.IGNORED if code == RxStatus.ERR_NOT_NEWER else DeviceStateCode.FAILED
            try:
                about: Manifest | None = decode_manifest(frame.manifest)
            except OtaDecodeError:
                about = None
            self._send_status(state, StatusDomain.OTA, int(code), about, detail=self.receiver.detail)
            return
        manifest = self.receiver.manifest
        assert manifest is not None
        self._download = dl = _Download(manifest, frame.source, time.perf_counter())
        kept = self.flash.transfer
        if kept is not None and (kept.version, kept.sha256) == (manifest.model_version, manifest.sha256):
            code = self.receiver.resume(bytes(kept.staging), kept.received)  # as the firmware's record
        else:
            size, count = manifest.model_size, manifest.chunk_count
            self.flash.transfer = KeptTransfer(manifest.model_version, manifest.sha256, bytearray(size),
                                               bytearray(count))  # fmt: skip
        received = self.receiver.received_count
        self._send_status(DeviceStateCode.DOWNLOADING, manifest=manifest, received=received)
        if code == RxStatus.DONE:
            self._complete(dl)
        else:
            self._request()

    def _fail(self, domain: StatusDomain, code: int, detail: str, received: int, **instructions: int) -> None:
        dl = self._download
        assert dl is not None
        self.receiver.abort()
        self.flash.transfer = None
        self._send_status(DeviceStateCode.FAILED, domain, code, dl.manifest, received, detail, **instructions)
        self._download = None

    def _on_chunk(self, payload: bytes) -> None:
        dl = self._download
        code = self.receiver.on_chunk(payload)
        if dl is None:
            return
        if code == RxStatus.DUPLICATE:
            dl.counters[2] += 1
        elif code in (RxStatus.ERR_STALE, RxStatus.ERR_NO_MANIFEST):
            dl.counters[4] += 1
        elif code.is_error:
            dl.counters[3] += 1
            if dl.counters[3] > 16:
                self._fail(StatusDomain.CORRUPT_CHUNKS, dl.counters[3], "corrupt chunks", self.receiver.received_count)
            else:
                self._request()
        elif code == RxStatus.DONE:
            self._keep(payload)
            self._complete(dl)
        else:
            self._keep(payload)
            dl.outstanding = {i for i in dl.outstanding if not self.receiver.has_chunk(i)}
            if not dl.outstanding:
                m = dl.manifest
                self._send_status(DeviceStateCode.DOWNLOADING, manifest=m, received=self.receiver.received_count)
                self._request()

    def _keep(self, payload: bytes) -> None:
        """A stored chunk into the kept transfer (the firmware saves its record after each chunk)."""
        kept, dl, chunk = self.flash.transfer, self._download, decode_chunk(payload)
        if kept is not None and dl is not None:
            start = chunk.index * dl.manifest.chunk_size
            kept.staging[start : start + len(chunk.payload)] = chunk.payload
            kept.received[chunk.index] = 1

    def _complete(self, dl: _Download) -> None:
        m, n = dl.manifest, dl.manifest.chunk_count
        t = time.perf_counter_ns()
        code = self.receiver.finish()
        verify = time.perf_counter_ns() - t
        if code.is_error:
            self._fail(StatusDomain.OTA, int(code), self.receiver.detail, n, verify_instructions=verify)
            return
        self._send_status(DeviceStateCode.VERIFIED, manifest=m, received=n, verify_instructions=verify)
        model = self.receiver.image()
        t = time.perf_counter_ns()
        try:
            runtime = NativeRuntime(model)
        except TinyrtError as exc:
            self._fail(StatusDomain.RUNTIME, -4, str(exc), n, verify_instructions=verify)
            return
        load = time.perf_counter_ns() - t
        self._send_status(DeviceStateCode.LOADED, manifest=m, received=n, verify_instructions=verify,
                          load_instructions=load)  # fmt: skip
        try:
            check_references(runtime.predict_int8, m.references())
        except DeviceError as exc:  # device_main.c check_references: the same detail
            self._fail(StatusDomain.SMOKE, -1, str(exc), n)
            return
        window = self._window or WindowFrame(0, 1e-3, m.dsp_spec().sample_rate_hz, (0,) * m.dsp_spec().window_samples)
        score, _, dsp, inference = self._score(runtime, m, window)
        if not math.isfinite(score):
            self._fail(StatusDomain.SMOKE, 0, "non-finite smoke score", n)
            return
        self._flush_scores()
        self.flash = FakeFlash(m, model)  # the slot table commit
        self._runtime = runtime
        self._summary = []
        self.receiver.commit()
        self._send_status(DeviceStateCode.ACTIVE, manifest=m, received=n, verify_instructions=verify,
                          load_instructions=load, smoke_instructions=dsp + inference, dsp_instructions=dsp,
                          inference_instructions=inference,
                          download_ms=int((time.perf_counter() - dl.started) * 1e3),
                          deploy_ms=int((time.perf_counter() - dl.started) * 1e3))  # fmt: skip
        self._download = None
        self._send(self._hello())

    @staticmethod
    def _score(runtime: NativeRuntime, m: Manifest, window: WindowFrame) -> tuple[float, np.ndarray, int, int]:
        physical = np.asarray(window.samples, dtype=np.float32) * np.float32(window.scale)
        t0 = time.perf_counter_ns()
        features = extract_features(physical, m.dsp_spec(), window.rpm)
        t1 = time.perf_counter_ns()
        reconstruction = runtime.predict(features)
        t2 = time.perf_counter_ns()
        return float(anomaly_scores(features, reconstruction)[0]), features[0], t1 - t0, t2 - t1

    def _on_window(self, window: WindowFrame) -> None:
        self._window = window
        m, runtime = self.flash.manifest, self._runtime
        if m is None or runtime is None:
            return
        score, features, dsp, inference = self._score(runtime, m, window)
        item = ScoreItem(score, bool(is_anomalous(score, m.threshold)), dsp, inference)
        self._pending.append((window.seq, item))
        self._summary.append((score, features, dsp, inference))
        if len(self._pending) >= 4:
            self._flush_scores()

    def _flush_scores(self) -> None:
        m, pending = self.flash.manifest, self._pending
        self._pending = []
        if m is not None and pending:
            self._send(ScoresFrame(m.model_version, pending[0][0], tuple(i for _, i in pending)))

    def _send_summary(self) -> None:
        m, rows = self.flash.manifest, self._summary
        self._summary = []
        if m is None:
            return
        scores = np.array([r[0] for r in rows], dtype=np.float64)
        edges = np.asarray(SCORE_EDGES_REL) * m.threshold
        counts = np.zeros(len(edges), dtype=np.int64)
        for s in scores:
            counts[max(int(np.searchsorted(edges, s, side="right")) - 1, 0)] += 1
        n = m.dsp_spec().n_features
        feats = np.stack([r[1] for r in rows]) if rows else np.zeros((1, n))
        self._send(SummaryFrame(
            m.model_version, m.threshold, len(rows), int(np.sum(is_anomalous(scores, m.threshold))),
            float(scores.mean()) if rows else 0.0, tuple(int(c) for c in counts),
            tuple(float(v) for v in feats.mean(axis=0)), tuple(float(v) for v in feats.var(axis=0)),
            float(np.mean([r[2] for r in rows] or [0])), float(np.mean([r[3] for r in rows] or [0])),
            max((r[3] for r in rows), default=0),
        ))  # fmt: skip


def sha256(data: bytes) -> str:
    """Hex sha256 (for assertions)."""
    return hashlib.sha256(data).hexdigest()
