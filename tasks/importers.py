"""Import recorded vibration files (.npz, .mat, .csv, .parquet) into the Parquet lake.

A file becomes windows exactly like the ones a sensor sends: the signal is resampled to the
fleet rate, cut into non-overlapping windows (the remainder is dropped), quantised to int16
with one scale for the whole file, and written atomically per partition. Each file's windows
carry ``source = "file:<name>#sha256=<digest>"``, so importing the same bytes again for the
same device is a no-op.

Memory follows the chosen signal, not the file: a file is hashed in chunks, an .npz archive and a
Parquet file are listed from their headers and only the signal is read, a CSV's signal column is
read alone in chunks. A signal longer than :attr:`ImportLimits.max_samples` is refused as soon as
that is known, and an .mat file (read whole: its format allows nothing else) above
:attr:`ImportLimits.max_mat_bytes` before it is read.

CWRU recordings (:func:`import_cwru`) are named ``1797_<class>[_<size>_DE<kHz>].npz``; each file
becomes one device ``cwru-`` + its stem with ``_`` replaced by ``-`` (``1797_IR_7_DE12.npz`` ->
``cwru-1797-IR-7-DE12``), labelled from its class, drive-end channel ``DE``, at the rig's 1797 rpm
and 0 hp (load 0).

The operating condition travels with the windows (the lake's ``rpm`` and ``load`` columns): given
for a whole file (``rpm=``/``load=``, the CLI's ``--rpm``/``--load``, which win over the file), or
taken from the file: a scalar ``rpm``/``load`` field (npz/mat; CWRU's original .mat files call it
``X097RPM``...), or a column of the signal's length (CSV/Parquet column ``rpm``, an npz/mat array),
averaged over each window. Those fields and columns are never taken for the signal. An rpm must be
finite, > 0 and at most 60,000; a load finite in 0..1: anything else refuses the file in one line.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import hashlib
import logging
import math
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
import scipy.io
from scipy.signal import resample_poly

from firmware.codec import MAX_DEVICE_ID_BYTES, MAX_SAMPLES, VibrationWindow
from tasks.lake import WindowBatch, import_lock, known_sources, last_seq, write_windows
from tinymlops.errors import DataImportError
from tinymlops.settings import DEFAULT_IMPORT_MAX_MAT_MB, DEFAULT_IMPORT_MAX_SAMPLES, DEFAULT_MAX_ABS_G

logger = logging.getLogger(__name__)

SUPPORTED_SUFFIXES = (".csv", ".mat", ".npz", ".parquet")
# Scalar fields that carry a recording's sample rate in Hz, compared without case.
FS_KEYS = ("fs", "fs_hz", "sr", "sample_rate", "sample_rate_hz", "sampling_rate", "sampling_rate_hz",
           "samplerate", "sampling_frequency")  # fmt: skip
INT16_FULL_SCALE = 32767
# A float32 scale below its smallest normal value loses precision, then rounds to 0 (1e-300 g did).
_MIN_PEAK_G = float(np.finfo(np.float32).tiny) * INT16_FULL_SCALE
# The stored rate may differ this much from the one resampling gives (a 0.1 % error in time).
_MAX_RATE_ERROR = 1e-3
_HASH_CHUNK_BYTES = 1 << 20
_CSV_FIRST_LINE_BYTES = 1 << 16
_CSV_PROBE_ROWS = 1000
_CSV_CHUNK_ROWS = 1 << 16
_ZIP_SIGNATURES = (b"PK\x03\x04", b"PK\x05\x06")  # a local file header; an empty archive
_NAME_OK = re.compile(rf"^[A-Za-z0-9_-]{{1,{MAX_DEVICE_ID_BYTES}}}$")
_NAME_BAD_RUN = re.compile(r"[^A-Za-z0-9_-]+")

CWRU_GLOB = "1797_*.npz"
CWRU_CHANNEL = "DE"
_CWRU_NAME = re.compile(r"^1797_(?P<cls>Normal|IR|OR\d*|B)(?:_(?P<size>\d+)_DE(?P<khz>12|48))?$")
_CWRU_LABELS = {"Normal": "normal", "IR": "inner_race", "OR": "outer_race", "B": "ball"}
CWRU_RPM = 1797.0  # the speed every CWRU recording here was made at (their names and README say it)
CWRU_LOAD = 0.0  # 0 hp of the 2 hp motor

MAX_RPM = 60_000.0  # the operating condition's valid range (the simulator's and the DSP's too)
# Fields and columns that carry the operating condition, compared without case (CWRU's .mat: X097RPM).
_RPM_FIELD = re.compile(r"^(rpm|x\d+_?rpm)$", re.IGNORECASE)
_LOAD_FIELD = re.compile(r"^load$", re.IGNORECASE)

Float64Array = npt.NDArray[np.float64]
Condition = float | Float64Array | None
"""An rpm or load: one value for the recording, one per sample of the signal, or None (not known)."""


@dataclass(frozen=True)
class ImportResult:
    """What one file import did.

    Attributes:
        path: The imported file.
        device: Device id the windows were stored under.
        label: Label given to every window (None for unlabelled data).
        windows: Windows written (0 for a duplicate).
        source_rate_hz: Sample rate of the recording before resampling.
        duplicate: True when these bytes were already imported for this device, so nothing was written.
        end: Time just after the last imported sample, where a following file of the recording
            starts (None for a duplicate).

    """

    path: Path
    device: str
    label: str | None
    windows: int
    source_rate_hz: float
    duplicate: bool
    end: dt.datetime | None = None


@dataclass(frozen=True)
class ImportLimits:
    """What one import may hold in memory (see the module docstring).

    Attributes:
        max_samples: The longest signal, in samples of the recording, an import reads.
        max_mat_bytes: The largest .mat file, read whole, an import opens.
    """

    max_samples: int = DEFAULT_IMPORT_MAX_SAMPLES
    max_mat_bytes: int = DEFAULT_IMPORT_MAX_MAT_MB * 2**20


@dataclass(frozen=True)
class _Catalog:
    """What a file holds, before its signal is read.

    Attributes:
        numeric: Names of the numeric arrays or columns (signal candidates).
        others: Names of the other arrays or columns, with what they are (``dtype object``).
        scalars: Single numeric values (npz/mat only; MATLAB stores scalars as 1x1 arrays).
        load: Reads one candidate's data, refusing one longer than the limit.
    """

    numeric: list[str]
    others: dict[str, str]
    scalars: dict[str, float]
    load: Callable[[str], np.ndarray]


@dataclass(frozen=True)
class _Recording:
    """A file's signal, its sample rate and its operating condition (see the module docstring)."""

    signal: Float64Array
    rate_hz: float
    rpm: Condition = None
    load: Condition = None


def load_signal(
    path: Path, *, var: str | None = None, fs: float | None = None, limits: ImportLimits | None = None
) -> tuple[Float64Array, float]:
    """Read one 1-D signal and its sample rate from a recorded file.

    Args:
        path: A ``.npz``, ``.mat`` (MATLAB v5), ``.csv`` (header optional) or ``.parquet`` file.
        var: Array, variable or column holding the signal; required when the file holds several.
        fs: Sample rate in Hz; default the scalar ``fs`` stored in the file (npz/mat).
        limits: Bounds on the signal length and .mat size (default :class:`ImportLimits`).

    Returns:
        The signal as float64 and its sample rate in Hz.

    Raises:
        DataImportError: The file is missing, empty, unreadable or of an unsupported type, the signal
            cannot be chosen, contains NaN/inf or exceeds the limits, or the sample rate is unknown.

    """
    _check_file(path)
    recording = _parse(path, var=var, fs=fs, limits=limits or ImportLimits())
    return recording.signal, recording.rate_hz


def load_recording(
    path: Path,
    *,
    target_rate_hz: int,
    var: str | None = None,
    fs: float | None = None,
    limits: ImportLimits | None = None,
) -> Float64Array:
    """Read a recorded file's signal (see :func:`load_signal`) resampled to ``target_rate_hz``.

    Raises:
        DataImportError: As :func:`load_signal`, or no resampling ratio reaches the target rate.
    """
    signal, source_rate = load_signal(path, var=var, fs=fs, limits=limits)
    return _resample(signal, source_rate, target_rate_hz, path)


def load_recording_with_rpm(
    path: Path,
    *,
    target_rate_hz: int,
    window_samples: int,
    rpm: float | None = None,
    var: str | None = None,
    fs: float | None = None,
    limits: ImportLimits | None = None,
) -> tuple[Float64Array, list[float | None]]:
    """:func:`load_recording`, and the shaft speed of each whole window of it: ``rpm``, else the file's, else None.

    Raises:
        DataImportError: As :func:`load_recording`, or an rpm is invalid (negative, not finite, above 60,000).
    """
    if rpm is not None:
        check_condition("rpm", rpm, path)
    _check_file(path)
    recording = _parse(path, var=var, fs=fs, limits=limits or ImportLimits())
    signal = _resample(recording.signal, recording.rate_hz, target_rate_hz, path)
    windowing = signal.size // window_samples, window_samples, recording.rate_hz, target_rate_hz
    return signal, _per_window(recording.rpm if rpm is None else rpm, *windowing)


def check_condition(kind: str, value: float, path: Path | str) -> float:
    """Return a valid rpm (finite, > 0, at most 60,000) or load (finite, 0..1).

    Raises:
        DataImportError: One line naming the value, where it comes from and the valid range.
    """
    if kind == "rpm":
        valid, bounds = math.isfinite(value) and 0 < value <= MAX_RPM, f"a finite speed > 0 and at most {MAX_RPM:,.0f}"
    else:
        valid, bounds = math.isfinite(value) and 0 <= value <= 1, "a finite fraction of rated load in 0..1"
    if not valid:
        raise DataImportError(f"invalid {kind} {value:g} for {path}: must be {bounds}")
    return float(value)


def import_file(
    path: Path,
    *,
    lake_root: Path,
    fleet: str,
    device: str | None = None,
    label: str | None = None,
    var: str | None = None,
    fs: float | None = None,
    target_rate_hz: int = 25_600,
    window_samples: int = 1024,
    start: dt.datetime | None = None,
    max_abs_g: float = DEFAULT_MAX_ABS_G,
    limits: ImportLimits | None = None,
    rpm: float | None = None,
    load: float | None = None,
) -> ImportResult:
    """Import one recorded file into the lake as windows of one device.

    Args:
        path: The recording (see :func:`load_signal` for formats).
        lake_root: Lake root.
        fleet: Fleet the device belongs to.
        device: Device id; default the file stem with characters outside ``[A-Za-z0-9_-]`` replaced by ``-``.
        label: Label for every window (``"normal"``, a fault name), or None.
        var: Array, variable or column holding the signal.
        fs: Sample rate of the recording in Hz; default the file's ``fs`` scalar.
        target_rate_hz: Fleet sample rate the signal is resampled to.
        window_samples: Samples per window.
        start: Timezone-aware time of the first sample; default now (UTC).
        max_abs_g: The sensor's physical full scale: a file whose resampled signal (in g) exceeds it
            anywhere is refused whole.
        limits: Bounds on the signal length and .mat size (default :class:`ImportLimits`).
        rpm: Shaft speed of the whole recording; default the file's own (see the module docstring), else not known.
        load: Load fraction of the whole recording; default the file's own, else not known.

    Returns:
        What was imported; ``duplicate=True`` and nothing written if these bytes were already imported.

    Raises:
        DataImportError: The file or an argument is invalid (one line naming it); nothing is written.
        LakeError: The lake cannot be read or written.

    """
    _check_name("fleet", fleet, path)
    if device is not None:
        _check_name("device", device, path)
    if label is not None:  # a label names lake rows and selections: the rule of device names
        _check_name("label", label, path)
    if not 1 <= window_samples <= MAX_SAMPLES:
        raise DataImportError(f"window_samples {window_samples} for {path} is out of range 1..{MAX_SAMPLES}")
    if target_rate_hz <= 0:
        raise DataImportError(f"target rate {target_rate_hz} Hz for {path} must be positive")
    if start is not None and start.utcoffset() is None:
        raise DataImportError(f"start time {start.isoformat()} for {path} has no timezone")
    if rpm is not None:
        check_condition("rpm", rpm, path)
    if load is not None:
        check_condition("load", load, path)

    _check_file(path)
    recording = _parse(path, var=var, fs=fs, limits=limits or ImportLimits())
    signal, source_rate = recording.signal, recording.rate_hz
    device_id = device or _device_from_stem(path)
    source = f"file:{path.name}#sha256={_sha256(path)}"
    with import_lock(lake_root, fleet):  # the check and the write as one step
        if source in known_sources(lake_root, fleet, device_id):
            logger.info("skipped %s: already imported for %s/%s", path, fleet, device_id)
            return ImportResult(path, device_id, label, 0, source_rate, duplicate=True)

        resampled = _resample(signal, source_rate, target_rate_hz, path)
        n_windows = resampled.size // window_samples
        if n_windows == 0:
            raise DataImportError(
                f"{path} is too short: {signal.size} samples at {source_rate:g} Hz give {resampled.size} at "
                f"{target_rate_hz} Hz, one window needs {window_samples}"
            )
        frames = resampled[: n_windows * window_samples].reshape(n_windows, window_samples)
        peak = float(np.abs(frames).max())
        if not peak <= max_abs_g:  # also refuses inf/NaN from resampling huge values
            raise DataImportError(
                f"{path}: peak |value| {peak:.3g} g above the sensor full scale {max_abs_g:g} g "
                f"(window {int(np.abs(frames).max(axis=1).argmax())} of {n_windows}); nothing imported"
            )
        if 0 < peak < _MIN_PEAK_G:
            raise DataImportError(
                f"{path}: peak |value| {peak:.3g} g is too small to store (a float32 scale resolves peaks from "
                f"{_MIN_PEAK_G:.3g} g; are the values in g?); nothing imported"
            )
        quantised, scale = _quantise(frames)
        windowing = n_windows, window_samples, source_rate, target_rate_hz
        rpms = _per_window(recording.rpm if rpm is None else rpm, *windowing)
        loads = _per_window(recording.load if load is None else load, *windowing)

        last = last_seq(lake_root, fleet, device_id)  # imports number their windows in boot epoch 0
        first_seq = 0 if last is None else last + 1
        start_us = _timestamp_us(start or dt.datetime.now(tz=dt.UTC))
        batch = WindowBatch()
        for i in range(n_windows):
            window = VibrationWindow(
                device_id=device_id,
                seq=first_seq + i,
                # Integer arithmetic keeps window timestamps exact over long files.
                timestamp_us=start_us + i * window_samples * 1_000_000 // target_rate_hz,
                sample_rate_hz=target_rate_hz,
                scale=scale,
                samples=quantised[i],
                rpm=rpms[i],
                load=loads[i],
            )
            batch.append(fleet, window, label=label, source=source)
        write_windows(lake_root, batch)
    logger.info(
        "imported %s: %d windows as %s/%s seq %d..%d, label %s, %g Hz -> %d Hz",
        path,
        n_windows,
        fleet,
        device_id,
        first_seq,
        first_seq + n_windows - 1,
        label,
        source_rate,
        target_rate_hz,
    )
    end_us = start_us + n_windows * window_samples * 1_000_000 // target_rate_hz
    end = dt.datetime(1970, 1, 1, tzinfo=dt.UTC) + dt.timedelta(microseconds=end_us)
    return ImportResult(path, device_id, label, n_windows, source_rate, duplicate=False, end=end)


def import_cwru(
    cwru_dir: Path,
    *,
    lake_root: Path,
    fleet: str = "cwru",
    target_rate_hz: int = 25_600,
    window_samples: int = 1024,
    max_abs_g: float = DEFAULT_MAX_ABS_G,
    limits: ImportLimits | None = None,
) -> list[ImportResult]:
    """Import every CWRU recording ``1797_*.npz`` of a directory, labelled from its file name.

    The drive-end channel is imported; the rate follows the README (48 kHz for ``Normal`` and
    ``*_DE48``, 12 kHz for ``*_DE12``), the operating condition 1797 rpm at 0 hp. Files already imported are
    skipped as duplicates.

    Args:
        cwru_dir: Directory holding the recordings (the 1 s test fixture there is not imported).
        lake_root: Lake root.
        fleet: Fleet to import into.
        target_rate_hz: Fleet sample rate.
        window_samples: Samples per window.
        max_abs_g: The sensor's physical full scale in g (see :func:`import_file`).
        limits: Bounds on the signal length and .mat size (default :class:`ImportLimits`).

    Returns:
        One result per file, in file-name order.

    Raises:
        DataImportError: No recording found, or a file name does not follow the CWRU scheme (checked
            before anything is imported), or a file is invalid.

    """
    paths = sorted(cwru_dir.glob(CWRU_GLOB))
    if not paths:
        raise DataImportError(f"no CWRU recordings ({CWRU_GLOB}) in {cwru_dir}")
    plans = [(path, *_cwru_meta(path)) for path in paths]
    results = []
    for path, label, rate in plans:
        results.append(
            import_file(
                path,
                lake_root=lake_root,
                fleet=fleet,
                device="cwru-" + path.stem.replace("_", "-"),
                label=label,
                var=CWRU_CHANNEL,
                fs=rate,
                target_rate_hz=target_rate_hz,
                window_samples=window_samples,
                max_abs_g=max_abs_g,
                limits=limits,
                rpm=CWRU_RPM,
                load=CWRU_LOAD,
            )
        )
    new = [r for r in results if not r.duplicate]
    logger.info(
        "CWRU import from %s: %d files, %d windows written, %d files already present",
        cwru_dir,
        len(results),
        sum(r.windows for r in new),
        len(results) - len(new),
    )
    return results


def load_cwru_recordings(cwru_dir: Path, *, target_rate_hz: int = 25_600) -> dict[str, Float64Array]:
    """Return the drive-end signal of each CWRU class (48 kHz files), resampled to the sensor rate.

    Raises:
        DataImportError: No 48 kHz normal recording in the directory, or a file is invalid.
    """
    recordings = {}
    for path in sorted(cwru_dir.glob(CWRU_GLOB)):
        label, rate = _cwru_meta(path)
        if rate != 48_000.0 or label in recordings:
            continue
        signal, _ = load_signal(path, var=CWRU_CHANNEL, fs=rate)
        recordings[label] = _resample(signal, rate, target_rate_hz, path)
    if "normal" not in recordings:
        raise DataImportError(f"no CWRU normal recording (1797_Normal.npz) in {cwru_dir}")
    return recordings


def _cwru_meta(path: Path) -> tuple[str, float]:
    """Return the label and sample rate a CWRU file name stands for."""
    match = _CWRU_NAME.match(path.stem)
    if match is None or (match["cls"] == "Normal") != (match["khz"] is None):
        raise DataImportError(
            f"{path.name} does not follow the CWRU naming 1797_Normal or 1797_<IR|OR..|B>_<size>_DE<12|48>"
        )
    label = _CWRU_LABELS["OR" if match["cls"].startswith("OR") else match["cls"]]
    rate = 12_000.0 if match["khz"] == "12" else 48_000.0
    return label, rate


def _check_name(kind: str, name: str, path: Path) -> None:
    """Reject names that would not make a safe lake partition directory."""
    if not _NAME_OK.match(name):
        raise DataImportError(
            f"{kind} {name!r} for {path} must be 1..{MAX_DEVICE_ID_BYTES} characters of A-Z a-z 0-9 _ -"
        )


def _device_from_stem(path: Path) -> str:
    device = _NAME_BAD_RUN.sub("-", path.stem).strip("-")[:MAX_DEVICE_ID_BYTES]
    if not device:
        raise DataImportError(f"cannot derive a device id from the file name {path.name}: pass --device")
    return device


def _check_file(path: Path) -> None:
    """Refuse an unsupported, missing, unreadable or empty file before anything parses it."""
    if path.suffix.lower() not in SUPPORTED_SUFFIXES:
        raise DataImportError(
            f"unsupported file type {path.suffix or '(none)'!r} for {path}: "
            f"expected one of {', '.join(SUPPORTED_SUFFIXES)}"
        )
    try:
        with open(path, "rb") as handle:
            empty = not handle.read(1)
    except OSError as exc:
        raise DataImportError(f"cannot read {path}: {exc.strerror or exc}") from exc
    if empty:
        raise DataImportError(f"{path} is empty (0 bytes)")


def _sha256(path: Path) -> str:
    """Return the SHA-256 of a file, read in chunks (a recording may be larger than memory)."""
    digest = hashlib.sha256()
    try:
        with open(path, "rb") as handle:
            while chunk := handle.read(_HASH_CHUNK_BYTES):
                digest.update(chunk)
    except OSError as exc:
        raise DataImportError(f"cannot read {path}: {exc.strerror or exc}") from exc
    return digest.hexdigest()


def _parse(path: Path, *, var: str | None, fs: float | None, limits: ImportLimits) -> _Recording:
    """Pick the signal, the sample rate and the operating condition out of a file (at most the signal in memory)."""
    suffix = path.suffix.lower()
    try:
        with _CATALOGS[suffix](path, limits) as catalog:
            signal = _pick_signal(path, catalog, var)
            rate = _sample_rate(path, catalog.scalars, fs)
            rpm = _file_condition(path, catalog, "rpm", _RPM_FIELD, signal.size, exclude=var)
            load = _file_condition(path, catalog, "load", _LOAD_FIELD, signal.size, exclude=var)
    except DataImportError:
        raise
    # Third-party parsers raise many exception types on corrupt input; all mean "unreadable".
    except Exception as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise DataImportError(f"cannot read {path} as {suffix}: {reason}") from exc
    return _Recording(signal, rate, rpm, load)


def _file_condition(
    path: Path, catalog: _Catalog, kind: str, field: re.Pattern[str], n_samples: int, exclude: str | None
) -> Condition:
    """A file's own rpm or load: a scalar field, or an array/column with one value per signal sample; else None."""
    scalars = {name: value for name, value in catalog.scalars.items() if field.match(name)}
    arrays = [name for name in catalog.numeric if field.match(name) and name != exclude]
    if len(scalars) + len(arrays) > 1:
        found = ", ".join(sorted([*scalars, *arrays]))
        raise DataImportError(f"{path} gives several {kind} fields ({found}): pass --{kind}")
    if scalars:
        ((name, value),) = scalars.items()
        return check_condition(kind, value, f"{path} (field {name!r})")
    if not arrays:
        return None
    values = np.asarray(catalog.load(arrays[0]), dtype=np.float64).reshape(-1)
    if values.size != n_samples:
        raise DataImportError(
            f"{path}: {kind} column {arrays[0]!r} has {values.size:,} values, the signal {n_samples:,}: one per sample"
        )
    bad = np.flatnonzero(~np.isfinite(values) | (values <= 0 if kind == "rpm" else values < 0)
                         | (values > (MAX_RPM if kind == "rpm" else 1.0)))  # fmt: skip
    if bad.size:
        check_condition(kind, float(values[bad[0]]), f"{path} ({arrays[0]!r} row {int(bad[0]) + 1})")
    return values


def _per_window(
    condition: Condition, n_windows: int, window_samples: int, source_rate: float, target_rate_hz: int
) -> list[float | None]:
    """One rpm or load per window: the recording's value, or the mean of the samples each window spans."""
    if condition is None or isinstance(condition, float):
        return [condition] * n_windows
    # window i spans [i, i + 1) x window_samples / target_rate seconds: those source samples, at least one
    edges = np.arange(n_windows + 1) * (window_samples * source_rate / target_rate_hz)
    first = np.minimum(np.floor(edges[:-1]).astype(np.int64), condition.size - 1)
    stop = np.maximum(np.minimum(np.ceil(edges[1:]).astype(np.int64), condition.size), first + 1)
    sums = np.concatenate([[0.0], np.cumsum(condition)])
    return [float(value) for value in (sums[stop] - sums[first]) / (stop - first)]


def _too_long(path: Path, var: str, samples: int, limits: ImportLimits) -> DataImportError:
    return DataImportError(
        f"{path}: {var!r} holds more than {limits.max_samples:,} samples ({samples:,} read), the import limit "
        "(TINYMLOPS_LAKE__IMPORT_MAX_SAMPLES); split the recording"
    )


@contextlib.contextmanager
def _npz_catalog(path: Path, limits: ImportLimits) -> Iterator[_Catalog]:
    """List an .npz archive's arrays from their headers; an array's data is read only when it is loaded."""
    with open(path, "rb") as handle:
        signature = handle.read(4)
    if signature not in _ZIP_SIGNATURES:  # np.load would try it as a pickle and say so
        raise DataImportError(f"{path} is not a .npz archive: it does not start with a zip signature")
    with np.load(path, allow_pickle=False) as archive:
        shapes: dict[str, tuple[tuple[int, ...], np.dtype[Any]]] = {}
        for member in archive.zip.namelist():
            with archive.zip.open(member) as stream:
                version = np.lib.format.read_magic(stream)
                read_header = (
                    np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
                )
                shape, _, dtype = read_header(stream)
            shapes[member.removesuffix(".npy")] = (shape, dtype)

        def load(name: str) -> np.ndarray:
            size = math.prod(shapes[name][0])
            if size > limits.max_samples:
                raise _too_long(path, name, size, limits)
            return np.asarray(archive[name])

        numeric = {name for name, (_, dtype) in shapes.items() if dtype.kind in "iuf"}
        scalars = {name: float(load(name).reshape(-1)[0]) for name in numeric if math.prod(shapes[name][0]) == 1}
        others = {name: f"dtype {dtype}" for name, (_, dtype) in shapes.items() if name not in numeric}
        yield _Catalog(sorted(numeric - scalars.keys()), others, scalars, load)


@contextlib.contextmanager
def _mat_catalog(path: Path, limits: ImportLimits) -> Iterator[_Catalog]:
    """Read a MATLAB v5 file whole (its format allows no chunked read), refusing one above the size limit."""
    size = path.stat().st_size
    if size > limits.max_mat_bytes:
        raise DataImportError(
            f"{path} is {size / 2**20:,.0f} MiB, above the {limits.max_mat_bytes / 2**20:,.0f} MiB limit for .mat "
            "files, which are read whole (TINYMLOPS_LAKE__IMPORT_MAX_MAT_MB); save the signal as .npz or .csv"
        )
    items = {k: np.asarray(v) for k, v in scipy.io.loadmat(path).items() if not k.startswith("__")}
    numeric = {k for k, v in items.items() if _is_numeric(v)}
    scalars = {k: float(items[k].reshape(-1)[0]) for k in numeric if items[k].size == 1}

    def load(name: str) -> np.ndarray:
        if items[name].size > limits.max_samples:
            raise _too_long(path, name, items[name].size, limits)
        return items[name]

    others = {k: f"dtype {v.dtype}" for k, v in items.items() if k not in numeric}
    yield _Catalog(sorted(numeric - scalars.keys()), others, scalars, load)


@contextlib.contextmanager
def _csv_catalog(path: Path, limits: ImportLimits) -> Iterator[_Catalog]:
    """Judge a CSV's columns from its first rows; the chosen column is then read alone, in chunks."""
    with open(path, "rb") as handle:
        first = handle.readline(_CSV_FIRST_LINE_BYTES + 1)
    if len(first) > _CSV_FIRST_LINE_BYTES:  # pandas would hold the whole line, however long, to parse it
        raise DataImportError(f"{path}: the first line is longer than {_CSV_FIRST_LINE_BYTES:,} bytes; not a CSV")
    first_line = first.decode("utf-8-sig", errors="replace").strip()
    header = None if all(_is_number(cell) for cell in first_line.split(",")) else 0
    probe = pd.read_csv(path, header=header, nrows=_CSV_PROBE_ROWS)
    columns = {str(name): name for name in probe.columns}

    def load(name: str) -> np.ndarray:
        parts, total = [], 0
        with pd.read_csv(path, header=header, usecols=[columns[name]], chunksize=_CSV_CHUNK_ROWS) as chunks:
            for chunk in chunks:
                column = chunk[columns[name]]
                if not _is_numeric(column.to_numpy()):
                    values = pd.to_numeric(column, errors="coerce")
                    row = int((values.isna() & column.notna()).idxmax())
                    raise DataImportError(
                        f"{path}: column {name!r} is not numeric: {column[row]!r} in data row {row + 1}"
                    )
                total += len(column)
                if total > limits.max_samples:
                    raise _too_long(path, name, total, limits)
                parts.append(column.to_numpy(dtype=np.float64))
        return np.concatenate(parts) if parts else np.zeros(0)

    numeric = [str(name) for name in probe.columns if _is_numeric(probe[name].to_numpy())]
    others = {str(name): f"dtype {probe[name].dtype}" for name in probe.columns if str(name) not in numeric}
    yield _Catalog(numeric, others, {}, load)


@contextlib.contextmanager
def _parquet_catalog(path: Path, limits: ImportLimits) -> Iterator[_Catalog]:
    """List a Parquet file's columns from its schema; the chosen column is then read alone."""
    with pq.ParquetFile(path) as parquet:
        fields = {f.name: f.type for f in parquet.schema_arrow}

        def load(name: str) -> np.ndarray:
            if parquet.metadata.num_rows > limits.max_samples:
                raise _too_long(path, name, parquet.metadata.num_rows, limits)
            # Nulls in a numeric column become NaN, which validation then reports.
            return np.asarray(parquet.read(columns=[name]).column(0).to_numpy(), dtype=np.float64)

        numeric = [n for n, t in fields.items() if pa.types.is_integer(t) or pa.types.is_floating(t)]
        yield _Catalog(numeric, {n: f"type {t}" for n, t in fields.items() if n not in numeric}, {}, load)


_CATALOGS: dict[str, Callable[[Path, ImportLimits], contextlib.AbstractContextManager[_Catalog]]] = {
    ".npz": _npz_catalog,
    ".mat": _mat_catalog,
    ".csv": _csv_catalog,
    ".parquet": _parquet_catalog,
}


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _is_numeric(array: np.ndarray) -> bool:
    return array.dtype.kind in "iuf"


def _pick_signal(path: Path, catalog: _Catalog, var: str | None) -> Float64Array:
    """Choose the signal (the only numeric array, or ``var``), flatten a column, validate its values."""
    numeric = sorted(catalog.numeric)
    if var is None:  # an rpm or load column is the operating condition, never the signal
        numeric = [name for name in numeric if not (_RPM_FIELD.match(name) or _LOAD_FIELD.match(name))]
        if not numeric:
            found = ", ".join(sorted(catalog.others) + sorted(catalog.scalars)) or "nothing"
            raise DataImportError(f"no numeric signal in {path} (found: {found})")
        if len(numeric) > 1:
            raise DataImportError(f"{path} holds several signals ({', '.join(numeric)}): pass --var to pick one")
        if catalog.others:  # a text signal column beside a numeric time column: the time is no signal
            others = ", ".join(repr(name) for name in sorted(catalog.others))
            raise DataImportError(
                f"{path} holds {others}, not numeric, besides the numeric {numeric[0]!r}: "
                f"pass --var {numeric[0]} if that is the signal"
            )
        var = numeric[0]
    elif var in catalog.others:
        raise DataImportError(f"variable {var!r} in {path} is not numeric ({catalog.others[var]})")
    elif var not in numeric:
        what = "a scalar, not a signal" if var in catalog.scalars else "not found"
        raise DataImportError(f"variable {var!r} in {path} is {what}; signals there: {', '.join(numeric) or 'none'}")
    array = catalog.load(var)
    if array.ndim == 2 and 1 in array.shape:
        array = array.reshape(-1)
    if array.ndim != 1:
        raise DataImportError(f"variable {var!r} in {path} has shape {array.shape}; expected (n,), (n, 1) or (1, n)")
    signal = array.astype(np.float64)
    if signal.size == 0:
        raise DataImportError(f"variable {var!r} in {path} has no samples")
    bad = ~np.isfinite(signal)
    if bad.any():
        raise DataImportError(
            f"{path}: {var!r} has {int(bad.sum())} NaN/inf values of {signal.size}, first at index {int(bad.argmax())}"
        )
    return signal


def _sample_rate(path: Path, scalars: dict[str, float], fs: float | None) -> float:
    """``fs`` if given, else the file's own sample-rate field (one of :data:`FS_KEYS`, any case)."""
    if fs is None:
        found = {name: value for name, value in scalars.items() if name.lower() in FS_KEYS}
        if not found:
            raise DataImportError(f"sample rate unknown for {path} (no field such as fs or sample_rate): pass --fs")
        if len(set(found.values())) > 1:
            raise DataImportError(f"{path} gives several sample rates ({found}): pass --fs")
        fs = next(iter(found.values()))
    if not math.isfinite(fs) or fs <= 0:
        raise DataImportError(f"invalid sample rate {fs} Hz for {path}: must be a finite positive number")
    return float(fs)


def _resample(signal: Float64Array, source_rate: float, target_rate_hz: int, path: Path) -> Float64Array:
    """Resample by the nearest ratio up/down with both terms at most 1000 (48 kHz -> 25.6 kHz is 8/15).

    Raises:
        DataImportError: No such ratio comes within 0.1 % of the target rate (a source rate more
            than 1000x off the target, 1e300 Hz, or an odd rate such as 10 MHz).
    """
    ratio = (Fraction(target_rate_hz) / Fraction(source_rate)).limit_denominator(1000)
    if ratio == 1:
        return signal
    effective = source_rate * ratio.numerator / ratio.denominator
    if not 0 < ratio.numerator <= 1000 or abs(effective - target_rate_hz) > _MAX_RATE_ERROR * target_rate_hz:
        raise DataImportError(
            f"cannot resample {path} from {source_rate:g} Hz to {target_rate_hz} Hz: the nearest ratio up/down "
            f"with both at most 1000 is {ratio} ({effective:.6g} Hz); resample the recording closer to the target"
        )
    if not math.isclose(effective, target_rate_hz, rel_tol=1e-9):
        logger.warning("%s: resampling by %s gives %.3f Hz, stored as %d Hz", path, ratio, effective, target_rate_hz)
    return np.asarray(resample_poly(signal, ratio.numerator, ratio.denominator), dtype=np.float64)


def _quantise(frames: Float64Array) -> tuple[npt.NDArray[np.int16], float]:
    """Quantise to int16 with one scale so that the largest magnitude maps to full scale."""
    peak = float(np.abs(frames).max())
    # An all-zero recording has no peak; any positive scale represents it exactly.
    scale = float(np.float32(peak / INT16_FULL_SCALE)) if peak > 0 else 1.0
    # The lake stores the scale as float32: its relative rounding (6e-8) keeps |peak / scale|
    # below 32767.5, so rounding never leaves the int16 range.
    return np.rint(frames / scale).astype(np.int16), scale


def _timestamp_us(moment: dt.datetime) -> int:
    return (moment - dt.datetime(1970, 1, 1, tzinfo=dt.UTC)) // dt.timedelta(microseconds=1)
