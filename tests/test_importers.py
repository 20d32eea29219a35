from __future__ import annotations

import datetime as dt
import hashlib
import logging
import math
import re
import threading
import tracemalloc
from collections.abc import Callable
from fractions import Fraction
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
import scipy.io

from tasks import importers
from tasks.importers import _CSV_PROBE_ROWS, ImportLimits, ImportResult, import_cwru, import_file, load_signal
from tasks.lake import read_windows
from tests.fault_ledger import FaultRecord, record
from tinymlops.errors import DataImportError

RATE = 25_600
WINDOW = 1024
START = dt.datetime(2026, 3, 1, 12, 0, tzinfo=dt.UTC)


def _sine(n: int, fs: float, freq: float = 1000.0, amp: float = 0.5, seed: int = 0) -> np.ndarray:
    """A tone plus a little noise, so quantisation is exercised on non-trivial values."""
    rng = np.random.default_rng(seed)
    t = np.arange(n) / fs
    return amp * np.sin(2 * np.pi * freq * t) + 0.01 * rng.standard_normal(n)


def _write_npz(path: Path, x: np.ndarray) -> dict[str, object]:
    np.savez(path, accel=x, fs=RATE)
    return {}


def _write_mat(path: Path, x: np.ndarray) -> dict[str, object]:
    scipy.io.savemat(path, {"vib": x.reshape(-1, 1), "fs": float(RATE)})
    return {}


def _write_csv_header(path: Path, x: np.ndarray) -> dict[str, object]:
    pd.DataFrame({"accel_g": x}).to_csv(path, index=False)
    return {"fs": RATE}


def _write_csv_plain(path: Path, x: np.ndarray) -> dict[str, object]:
    np.savetxt(path, x, fmt="%.9f")
    return {"fs": RATE}


def _write_parquet(path: Path, x: np.ndarray) -> dict[str, object]:
    pq.write_table(pa.table({"t": np.arange(x.size) / RATE, "accel": x, "note": ["x"] * x.size}), path)
    return {"fs": RATE, "var": "accel"}


WRITERS: dict[str, tuple[str, Callable[[Path, np.ndarray], dict[str, object]]]] = {
    "npz": (".npz", _write_npz),
    "mat": (".mat", _write_mat),
    "csv-header": (".csv", _write_csv_header),
    "csv-no-header": (".csv", _write_csv_plain),
    "parquet": (".parquet", _write_parquet),
}


def _lake_files(lake: Path) -> list[tuple[str, int]]:
    return sorted((str(p.relative_to(lake)), p.stat().st_size) for p in lake.rglob("*") if p.is_file())


@pytest.mark.parametrize("kind", list(WRITERS))
def test_round_trip_each_format(tmp_path: Path, kind: str) -> None:
    suffix, writer = WRITERS[kind]
    path = tmp_path / f"sensor-{kind}{suffix}"
    x = _sine(10 * WINDOW + 300, RATE)  # the 300-sample remainder is dropped
    extra = writer(path, x)
    lake = tmp_path / "lake"

    result = import_file(path, lake_root=lake, fleet="f1", label="normal", start=START, **extra)  # type: ignore[arg-type]

    assert (result.windows, result.duplicate, result.source_rate_hz) == (10, False, RATE)
    assert result.device == f"sensor-{kind}"
    got = read_windows(lake, fleet="f1", window_samples=WINDOW)
    assert len(got) == 10 and got.sample_rate_hz == RATE
    expected = x[: 10 * WINDOW].reshape(10, WINDOW)
    lsb = np.abs(x[: 10 * WINDOW]).max() / 32767
    # Half an LSB of rounding, plus float32 storage and the 9-decimal CSV text.
    assert np.abs(got.samples - expected).max() <= 0.5 * lsb + 1e-6
    assert list(got.label) == ["normal"] * 10
    assert list(got.device) == [f"sensor-{kind}"] * 10
    assert list(got.seq) == list(range(10))
    start_us = int(START.timestamp() * 1e6)
    assert list(got.timestamp_us) == [start_us + i * 40_000 for i in range(10)]
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert set(got.source) == {f"file:{path.name}#sha256={digest}"}


def test_the_operating_condition_comes_from_the_options_or_the_file(tmp_path: Path) -> None:
    lake = tmp_path / "lake"
    x = _sine(4 * WINDOW, RATE)
    given = tmp_path / "given.npz"
    np.savez(given, x=x, fs=RATE, rpm=1797)  # the option wins over the file's field
    import_file(given, lake_root=lake, fleet="f", rpm=1200.0, load=0.25)
    field = tmp_path / "field.npz"
    np.savez(field, x=x, fs=RATE, RPM=1797)
    import_file(field, lake_root=lake, fleet="f")
    # a CSV column rpm, one per sample: each window gets the mean of its samples; the column is not a signal
    column = tmp_path / "column.csv"
    pd.DataFrame({"accel_g": x, "rpm": np.repeat([900.0, 1000.0, 1100.0, 1300.0], WINDOW)}).to_csv(column, index=False)
    import_file(column, lake_root=lake, fleet="f", fs=RATE)
    cwru_mat = tmp_path / "cwru.mat"  # CWRU's original .mat files: X097_DE_time and X097RPM
    scipy.io.savemat(cwru_mat, {"X097_DE_time": x.reshape(-1, 1), "X097RPM": np.array([[1796.0]])})
    import_file(cwru_mat, lake_root=lake, fleet="f", fs=RATE)
    unknown = tmp_path / "unknown.npz"
    np.savez(unknown, x=x, fs=RATE)
    import_file(unknown, lake_root=lake, fleet="f")

    windows = read_windows(lake, fleet="f", window_samples=WINDOW)
    by_device = {
        d: (windows.rpm[windows.device == d].tolist(), windows.load[windows.device == d].tolist())
        for d in set(windows.device)
    }
    nan = [math.nan] * 4
    assert by_device["given"] == ([1200.0] * 4, [0.25] * 4)
    assert by_device["field"][0] == [1797.0] * 4
    assert by_device["column"][0] == [900.0, 1000.0, 1100.0, 1300.0]
    assert by_device["cwru"][0] == [1796.0] * 4
    np.testing.assert_array_equal(by_device["unknown"], [nan, nan])
    np.testing.assert_array_equal(by_device["column"][1] + by_device["field"][1] + by_device["cwru"][1], nan * 3)


def test_one_scale_per_file_uses_full_range(tmp_path: Path) -> None:
    path = tmp_path / "dev.npz"
    x = _sine(8 * WINDOW, RATE) * np.linspace(0.1, 1.0, 8 * WINDOW)  # windows of very different amplitude
    np.savez(path, x=x)
    lake = tmp_path / "lake"
    import_file(path, lake_root=lake, fleet="f", fs=RATE)

    table = ds.dataset(lake / "vibration", format="parquet").to_table()
    assert len(set(table["scale"].to_pylist())) == 1
    peak = max(int(np.abs(np.frombuffer(s, "<i2").astype(np.int32)).max()) for s in table["samples"].to_pylist())
    assert peak == 32767  # the largest magnitude maps to full scale, nothing clips


@pytest.mark.parametrize(
    ("source_rate", "ratio"), [(48_000, Fraction(8, 15)), (12_000, Fraction(32, 15)), (44_100, Fraction(256, 441))]
)
def test_resampling_preserves_tone(tmp_path: Path, source_rate: int, ratio: Fraction) -> None:
    tone = 3000.0  # bin 120 of a 1024-point FFT at 25.6 kHz
    n = int(12 * WINDOW / ratio)
    x = _sine(n, source_rate, freq=tone, amp=1.0)
    path = tmp_path / "tone.npz"
    np.savez(path, x=x, fs=source_rate)
    lake = tmp_path / "lake"

    result = import_file(path, lake_root=lake, fleet="f", start=START)

    assert result.windows == math.ceil(n * ratio) // WINDOW
    got = read_windows(lake, fleet="f")
    spectrum = np.abs(np.fft.rfft(got.samples * np.hanning(WINDOW), axis=1)).mean(axis=0)
    freqs = np.fft.rfftfreq(WINDOW, 1 / RATE)
    assert freqs[int(spectrum.argmax())] == pytest.approx(tone, abs=RATE / WINDOW)
    # The tone's amplitude survives: RMS of a unit sine is 1/sqrt(2) (edge windows excluded).
    rms = np.sqrt(np.mean(got.samples[1:-1].astype(np.float64) ** 2))
    assert rms == pytest.approx(np.sqrt(0.5 + 0.01**2), rel=0.01)


def test_load_signal_flattens_columns_and_reads_fs(tmp_path: Path) -> None:
    x = _sine(500, 1000.0)
    for shape in [(-1, 1), (1, -1)]:
        path = tmp_path / f"m{len(shape)}{shape[0]}.mat"
        scipy.io.savemat(path, {"sig": x.reshape(shape), "fs": 1000.0})
        signal, rate = load_signal(path)
        assert signal.dtype == np.float64 and signal.shape == (500,)
        np.testing.assert_allclose(signal, x)
        assert rate == 1000.0
    assert load_signal(path, fs=2000.0)[1] == 2000.0  # the argument wins over the file


def test_second_import_of_same_file_is_a_no_op(tmp_path: Path) -> None:
    path = tmp_path / "dev.npz"
    np.savez(path, x=_sine(5 * WINDOW, RATE), fs=RATE)
    lake = tmp_path / "lake"
    first = import_file(path, lake_root=lake, fleet="f")
    before = _lake_files(lake)

    again = import_file(path, lake_root=lake, fleet="f")

    assert first.windows == 5 and not first.duplicate
    assert again.duplicate and again.windows == 0
    assert _lake_files(lake) == before
    assert len(read_windows(lake, fleet="f")) == 5


def test_second_file_continues_the_device_seq(tmp_path: Path) -> None:
    lake = tmp_path / "lake"
    a, b, other = tmp_path / "a.npz", tmp_path / "b.csv", tmp_path / "o.npz"
    np.savez(a, x=_sine(3 * WINDOW, RATE, seed=1), fs=RATE)
    pd.DataFrame({"g": _sine(4 * WINDOW, RATE, seed=2)}).to_csv(b, index=False)
    np.savez(other, x=_sine(9 * WINDOW, RATE, seed=3), fs=RATE)
    import_file(other, lake_root=lake, fleet="f", device="other")  # another device's seqs do not count
    import_file(a, lake_root=lake, fleet="f", device="dev-1", label="normal", start=START)
    import_file(
        b, lake_root=lake, fleet="f", device="dev-1", label="ball", fs=RATE, start=START + dt.timedelta(hours=1)
    )

    got = read_windows(lake, fleet="f", devices=["dev-1"])
    assert list(got.seq) == list(range(7))
    assert list(got.label) == ["normal"] * 3 + ["ball"] * 4
    assert len(set(got.source)) == 2


def test_device_id_from_file_stem_is_sanitised(tmp_path: Path) -> None:
    path = tmp_path / "my sensor#1 (left).npz"
    np.savez(path, x=_sine(WINDOW, RATE), fs=RATE)
    result = import_file(path, lake_root=tmp_path / "lake", fleet="f")
    assert result.device == "my-sensor-1-left"
    assert list(read_windows(tmp_path / "lake").device) == ["my-sensor-1-left"]


def _nan_file(p: Path) -> None:
    x = _sine(3 * WINDOW, RATE)
    x[[17, 40, 2000]] = [np.nan, np.inf, np.nan]
    np.savez(p, x=x, fs=RATE)


def _two_columns(p: Path) -> None:
    pd.DataFrame({"t": np.arange(2048.0), "g": _sine(2048, RATE)}).to_csv(p, index=False)


BadMaker = Callable[[Path], object]
BAD_INPUTS = [
    pytest.param(".npz", _nan_file, {}, r"3 NaN/inf values of 3072, first at index 17", id="nan"),
    pytest.param(
        ".npz",
        lambda p: np.savez(p, x=_sine(1900, 48_000.0), fs=48_000),
        {},
        r"too short: 1900 samples at 48000 Hz give 1014 at 25600 Hz, one window needs 1024",
        id="too-short",
    ),
    pytest.param(
        ".npz",
        lambda p: np.savez(p, DE=_sine(2048, RATE), fs=RATE),
        {"var": "FE"},
        r"variable 'FE' in .* not found; signals there: DE",
        id="unknown-var",
    ),
    pytest.param(
        ".mat",
        lambda p: scipy.io.savemat(p, {"DE": _sine(2048, RATE), "FE": _sine(2048, RATE)}),
        {"fs": RATE},
        r"several signals \(DE, FE\): pass --var",
        id="several-arrays",
    ),
    pytest.param(".csv", _two_columns, {"fs": RATE}, r"several signals \(g, t\)", id="several-columns"),
    pytest.param(
        ".parquet",
        lambda p: pq.write_table(pa.table({"g": _sine(2048, RATE)}), p),
        {"fs": RATE, "var": "acc"},
        r"variable 'acc' .* not found; signals there: g",
        id="unknown-column",
    ),
    pytest.param(
        ".csv", lambda p: p.write_text("g\n0.1\n0.2\nbad\n"), {"fs": RATE}, r"no numeric signal .*found: g", id="text"
    ),
    pytest.param(
        ".npz",
        lambda p: np.savez(p, xyz=np.zeros((2048, 3)), fs=RATE),
        {},
        r"shape \(2048, 3\); expected",
        id="matrix",
    ),
    pytest.param(
        ".wav", lambda p: p.write_bytes(b"RIFF0000WAVE"), {"fs": RATE}, r"unsupported file type '.wav'", id="extension"
    ),
    pytest.param(
        ".npz", lambda p: p.write_bytes(b"PK\x03\x04 no zip"), {"fs": RATE}, r"cannot read .* as .npz", id="corrupt-npz"
    ),
    pytest.param(
        ".mat",
        lambda p: p.write_bytes(b"\x00" * 40 + b"junk" * 50),
        {"fs": RATE},
        r"cannot read .* as .mat",
        id="corrupt-mat",
    ),
    pytest.param(
        ".parquet",
        lambda p: p.write_bytes(b"PAR1 cut"),
        {"fs": RATE},
        r"cannot read .* as .parquet",
        id="corrupt-parquet",
    ),
    pytest.param(".csv", lambda p: p.write_bytes(b""), {"fs": RATE}, r"is empty \(0 bytes\)", id="empty-file"),
    pytest.param(
        ".csv",
        lambda p: np.savetxt(p, _sine(2048, RATE)),
        {},
        r"sample rate unknown for .*: pass --fs",
        id="missing-fs",
    ),
    pytest.param(
        ".npz",
        lambda p: np.savez(p, x=_sine(2048, RATE), fs=0.0),
        {},
        r"invalid sample rate 0.0 Hz",
        id="bad-fs",
    ),
    pytest.param(
        ".npz",
        lambda p: np.savez(p, x=_sine(2048, RATE), fs=RATE),
        {"device": "a/b"},
        r"device 'a/b' .* must be 1..64 characters",
        id="bad-device",
    ),
    # hostile files (issue 13, item 7)
    pytest.param(
        ".npz",
        lambda p: np.savez(p, x=_sine(50 * WINDOW, RATE) * 2e300, fs=RATE),
        {},
        r"peak \|value\| .* above the sensor full scale",
        id="values-near-1e300",
    ),
    pytest.param(
        ".npz",
        lambda p: np.savez(p, x=_sine(4 * WINDOW, RATE) * 1e-300, fs=RATE),
        {},
        r"peak \|value\| 5.*e-301 g is too small to store",
        id="values-near-1e-300",
    ),
    pytest.param(
        ".csv",
        lambda p: pd.DataFrame({"t": np.arange(4 * WINDOW) / RATE, "value": ["0,1 g"] * (4 * WINDOW)}).to_csv(
            p, index=False
        ),
        {"fs": RATE},
        r"holds 'value', not numeric, besides the numeric 't': pass --var t if that is the signal",
        id="text-value-column",
    ),
    pytest.param(
        ".csv",
        lambda p: p.write_text("g\n" + "0.1\n" * (2 * _CSV_PROBE_ROWS) + "0.2 g\n" + "0.1\n" * 100),
        {"fs": RATE},
        rf"column 'g' is not numeric: '0.2 g' in data row {2 * _CSV_PROBE_ROWS + 1}",
        id="text-after-the-first-rows",
    ),
    pytest.param(
        ".csv",
        lambda p: p.write_text("0.1," * 50_000),
        {"fs": RATE},
        r"the first line is longer than 65,536 bytes; not a CSV",
        id="csv-without-lines",
    ),
    pytest.param(
        ".npz",
        lambda p: np.savez(p, x=_sine(4 * WINDOW, RATE)),
        {"fs": 1e300},
        r"cannot resample .* from 1e\+300 Hz to 25600 Hz",
        id="fs-1e300",
    ),
    pytest.param(
        ".npz",
        lambda p: np.savez(p, x=_sine(4 * WINDOW, RATE)),
        {"fs": 3e7},
        r"cannot resample .* from 3e\+07 Hz to 25600 Hz: the nearest ratio .* is 1/1000 \(30000 Hz\)",
        id="fs-without-a-close-ratio",
    ),
    *(
        pytest.param(
            ".npz",
            lambda p: np.savez(p, x=_sine(4 * WINDOW, RATE), fs=RATE),
            {"label": label},
            rf"label {re.escape(repr(label))} for .* must be 1..64 characters",
            id=f"label-{name}",
        )
        for name, label in (("empty", ""), ("path", "../../etc/passwd"), ("newline", "normal\nx"))
    ),
    pytest.param(
        ".npz",
        lambda p: p.write_bytes(b"\x80\x04 not an archive" * 100),
        {"fs": RATE},
        r"is not a .npz archive: it does not start with a zip signature",
        id="npz-not-an-archive",
    ),
    *(
        pytest.param(
            ".npz",
            lambda p: np.savez(p, x=_sine(2 * WINDOW, RATE), fs=RATE),
            {kind: value},
            rf"invalid {kind} {value:g} for .*: must be a finite",
            id=f"{kind}-{value:g}",
        )
        for kind, value in (
            ("rpm", -5.0),
            ("rpm", math.nan),
            ("rpm", math.inf),
            ("rpm", 60_001.0),
            ("rpm", 0.0),
            ("load", 1.5),
            ("load", -0.1),
        )
    ),
    pytest.param(
        ".npz",
        lambda p: np.savez(p, x=_sine(2 * WINDOW, RATE), fs=RATE, rpm=-1797),
        {},
        r"invalid rpm -1797 for .*field 'rpm'.*: must be a finite speed > 0",
        id="rpm-field-negative",
    ),
    pytest.param(
        ".csv",
        lambda p: pd.DataFrame(
            {"g": _sine(2 * WINDOW, RATE), "rpm": [1797.0] * 99 + [70_000.0] * (2 * WINDOW - 99)}
        ).to_csv(p, index=False),
        {"fs": RATE},
        r"invalid rpm 70000 for .*'rpm' row 100\): must be a finite speed > 0 and at most 60,000",
        id="rpm-column-too-fast",
    ),
]


@pytest.mark.parametrize(("suffix", "make", "kwargs", "pattern"), BAD_INPUTS)
def test_bad_input_raises_and_writes_nothing(
    tmp_path: Path, suffix: str, make: BadMaker, kwargs: dict[str, object], pattern: str
) -> None:
    lake = tmp_path / "lake"
    good = tmp_path / "good.npz"
    np.savez(good, x=_sine(2 * WINDOW, RATE), fs=RATE)
    import_file(good, lake_root=lake, fleet="f", device="dev")
    before = _lake_files(lake)
    path = tmp_path / f"bad{suffix}"
    make(path)

    with pytest.raises(DataImportError, match=pattern) as info:
        import_file(path, lake_root=lake, fleet="f", **{"device": "dev", **kwargs})  # type: ignore[arg-type]

    message = str(info.value)
    assert path.name in message and "\n" not in message
    assert _lake_files(lake) == before


def test_file_beyond_the_physical_full_scale_is_refused_in_one_line(tmp_path: Path) -> None:
    """Finite but absurd values (1e40 g) would be stored with a scale whose samples read back as inf."""
    lake = tmp_path / "lake"
    good = tmp_path / "good.npz"
    np.savez(good, x=_sine(2 * WINDOW, RATE), fs=RATE)
    import_file(good, lake_root=lake, fleet="f", device="dev")
    before = _lake_files(lake)
    path = tmp_path / "absurd.npz"
    signal = _sine(4 * WINDOW, RATE)
    signal[3 * WINDOW + 7] = 1e40
    np.savez(path, x=signal, fs=RATE)

    with pytest.raises(DataImportError, match=r"peak \|value\| .* above the sensor full scale 2000 g") as info:
        import_file(path, lake_root=lake, fleet="f", device="dev")

    message = str(info.value)
    assert path.name in message and "\n" not in message and "nothing imported" in message
    assert _lake_files(lake) == before
    assert np.isfinite(read_windows(lake, fleet="f").samples).all()


def test_missing_file_is_an_import_error(tmp_path: Path) -> None:
    with pytest.raises(DataImportError, match=r"cannot read .*nowhere.npz"):
        load_signal(tmp_path / "nowhere.npz", fs=RATE)


def test_import_cwru_names_labels_and_rates(tmp_path: Path) -> None:
    src = tmp_path / "cwru"
    src.mkdir()
    lengths = {"1797_Normal": 48_000 // 10, "1797_IR_7_DE12": 12_000 // 10, "1797_OR6_7_DE48": 48_000 // 10}
    for stem, n in lengths.items():
        np.savez(src / f"{stem}.npz", DE=_sine(n, 48_000.0).reshape(-1, 1), FE=np.zeros((n, 1)))
    np.savez(src / "cwru_de_48k_1797rpm_1s.npz", normal=_sine(48_000, 48_000.0), fs=48_000, rpm=1797)  # not imported
    lake = tmp_path / "lake"

    results = import_cwru(src, lake_root=lake)

    by_device = {r.device: r for r in results}
    assert sorted(by_device) == ["cwru-1797-IR-7-DE12", "cwru-1797-Normal", "cwru-1797-OR6-7-DE48"]
    assert by_device["cwru-1797-Normal"].label == "normal"
    assert by_device["cwru-1797-IR-7-DE12"].label == "inner_race"
    assert by_device["cwru-1797-OR6-7-DE48"].label == "outer_race"
    assert by_device["cwru-1797-IR-7-DE12"].source_rate_hz == 12_000
    # 0.1 s at any source rate is 2560 samples at 25.6 kHz: two windows each.
    assert [r.windows for r in results] == [2, 2, 2]
    windows = read_windows(lake, fleet="cwru")
    assert len(windows) == 6
    assert windows.rpm.tolist() == [1797.0] * 6 and windows.load.tolist() == [0.0] * 6  # the rig's, 0 hp
    # the 1 s fixture says its speed in its own rpm field
    import_file(src / "cwru_de_48k_1797rpm_1s.npz", lake_root=lake, fleet="fixture", var="normal")
    assert set(read_windows(lake, fleet="fixture").rpm.tolist()) == {1797.0}


def test_import_cwru_rejects_unknown_names_before_importing(tmp_path: Path) -> None:
    np.savez(tmp_path / "1797_Normal.npz", DE=_sine(4800, 48_000.0))
    np.savez(tmp_path / "1797_XX_7_DE48.npz", DE=_sine(4800, 48_000.0))
    with pytest.raises(DataImportError, match=r"1797_XX_7_DE48.npz does not follow the CWRU naming"):
        import_cwru(tmp_path, lake_root=tmp_path / "lake")
    assert not (tmp_path / "lake").exists()


@pytest.mark.realdata
def test_import_real_cwru(cwru_dir: Path, tmp_path: Path) -> None:
    lake = tmp_path / "lake"
    results = import_cwru(cwru_dir, lake_root=lake)

    expected_labels = {
        "1797_Normal.npz": "normal",
        "1797_IR_7_DE48.npz": "inner_race",
        "1797_IR_7_DE12.npz": "inner_race",
        "1797_OR6_7_DE48.npz": "outer_race",
        "1797_OR6_7_DE12.npz": "outer_race",
        "1797_B_7_DE48.npz": "ball",
    }
    assert {r.path.name: r.label for r in results} == expected_labels
    windows = read_windows(lake, fleet="cwru", window_samples=WINDOW)
    for r in results:
        n = np.load(r.path)["DE"].shape[0]
        ratio = Fraction(RATE, int(r.source_rate_hz))
        assert r.source_rate_hz == (12_000 if "DE12" in r.path.name else 48_000)
        assert r.windows == math.ceil(n * ratio) // WINDOW
        assert int((windows.device == r.device).sum()) == r.windows
        assert set(windows.label[windows.device == r.device]) == {r.label}
    normal = next(r for r in results if r.label == "normal")
    # 243,938 samples at 48 kHz are 130,101 at 25.6 kHz: 127 full windows.
    assert normal.windows == 127
    assert set(windows.rpm.tolist()) == {1797.0}  # every recording is at the rig's 1797 rpm (names, README)
    fixture = import_file(cwru_dir / "cwru_de_48k_1797rpm_1s.npz", lake_root=lake, fleet="fixture", var="normal")
    assert fixture.windows == 25 and set(read_windows(lake, fleet="fixture").rpm.tolist()) == {1797.0}  # its field

    original = np.load(normal.path)["DE"].ravel()
    imported = windows.samples[windows.device == normal.device].astype(np.float64)
    rms_in, rms_out = np.sqrt(np.mean(original**2)), np.sqrt(np.mean(imported**2))
    assert rms_out == pytest.approx(rms_in, rel=0.01)

    again = import_cwru(cwru_dir, lake_root=lake)
    assert all(r.duplicate for r in again)
    assert len(read_windows(lake, fleet="cwru")) == len(windows)


def test_two_imports_of_one_file_at_once_write_it_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """Import A has checked the lake for the file; import B of the same file starts right then.

    B must wait on the fleet's import lock (it logs so) until A has written, then find the file
    imported. Without the lock B checks and writes meanwhile, and A writes the file a second time.
    """
    path = tmp_path / "dev.npz"
    np.savez(path, x=_sine(50 * WINDOW, RATE), fs=RATE)
    lake = tmp_path / "lake"
    results: dict[str, object] = {}
    b_waits_or_is_done = threading.Event()

    class LockWaitSeen(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.getMessage().startswith("waiting for") and ".import.lock" in record.getMessage():
                b_waits_or_is_done.set()

    def import_b() -> None:
        try:
            results["b"] = import_file(path, lake_root=lake, fleet="f")
        except Exception as exc:  # re-raised by the test thread
            results["b"] = exc
        finally:
            b_waits_or_is_done.set()

    b = threading.Thread(target=import_b)
    real_known_sources = importers.known_sources

    def a_checks_then_b_starts(lake_root: Path, fleet: str, device: str) -> set[str]:
        found = real_known_sources(lake_root, fleet, device)
        if threading.current_thread() is not b and not b.is_alive():
            b.start()
            assert b_waits_or_is_done.wait(timeout=120), "import B neither waited on the lock nor finished"
        return found

    caplog.set_level(logging.INFO, logger="tasks.lake")
    seen = LockWaitSeen()
    logging.getLogger("tasks.lake").addHandler(seen)
    monkeypatch.setattr(importers, "known_sources", a_checks_then_b_starts)
    try:
        results["a"] = import_file(path, lake_root=lake, fleet="f")
    finally:
        b.join(timeout=120)
        logging.getLogger("tasks.lake").removeHandler(seen)
    outcomes = [results["a"], results["b"]]
    assert all(isinstance(r, ImportResult) for r in outcomes), outcomes
    assert sorted(r.duplicate for r in outcomes if isinstance(r, ImportResult)) == [False, True]
    windows = read_windows(lake, fleet="f")
    assert sorted(windows.seq.tolist()) == list(range(50))


def _traced_peak(run: Callable[[], object]) -> tuple[float, object]:
    """Run ``run`` under tracemalloc; return its peak of traced Python and NumPy memory in MiB and its outcome."""
    tracemalloc.start()
    try:
        outcome: object = run()
    except DataImportError as exc:
        outcome = exc
    finally:
        peak = tracemalloc.get_traced_memory()[1] / 2**20
        tracemalloc.stop()
    return peak, outcome


def test_large_files_are_read_in_chunks_or_refused_before_reading(tmp_path: Path) -> None:
    """Memory follows the signal, not the file: a large file is streamed, or refused in one line.

    Four generated files: a 100 MiB sparse ``.npz`` that is no archive (read whole and reported as
    "pickled data" before), a 30 MiB CSV whose signal column sits beside a long text column, a CSV
    longer than a low sample limit, and a 100 MiB ``.mat`` above a low size limit.
    """
    lake = tmp_path / "lake"
    limits = ImportLimits(max_samples=100_000, max_mat_bytes=10 * 2**20)
    no_archive = tmp_path / "huge.npz"
    with open(no_archive, "wb") as handle:
        handle.truncate(100 * 2**20)
    wide = tmp_path / "wide.csv"
    with open(wide, "w") as text:
        text.write("value,note\n")
        note = "n" * 240
        text.writelines(f"{v:.6f},{note}\n" for v in _sine(120_000, RATE))
    long = tmp_path / "long.csv"
    long.write_text("g\n" + "0.5\n" * 2_000_000)
    mat = tmp_path / "huge.mat"
    with open(mat, "wb") as handle:
        handle.truncate(100 * 2**20)

    def run(path: Path, **kwargs: Any) -> tuple[float, object]:
        return _traced_peak(lambda: import_file(path, lake_root=lake, fleet="f", fs=RATE, **kwargs))

    no_archive_peak, no_archive_outcome = run(no_archive, device="dev")
    wide_peak, wide_outcome = run(wide, device="dev", var="value", limits=ImportLimits(max_samples=200_000))
    long_peak, long_outcome = run(long, device="dev", limits=limits)
    mat_peak, mat_outcome = run(mat, device="dev", limits=limits)

    windows = len(read_windows(lake, fleet="f"))
    sizes = {p.name: p.stat().st_size / 2**20 for p in (no_archive, wide, long, mat)}
    record(
        FaultRecord(
            "hostile import files",
            sent=120_000 // WINDOW,
            in_lake=windows,
            duplicates=0,
            lost=120_000 // WINDOW - windows,
            notes=f"{len(BAD_INPUTS)} bad or hostile files (values near 1e300 and 1e-300, a text signal column, "
            "--fs 1e300, labels '', '../../etc/passwd' and 'normal\\nx', rpm and load out of range, ...) each refused "
            "in one line, lake "
            f"unchanged; traced peak memory: {sizes['huge.npz']:.0f} MiB non-archive .npz refused at "
            f"{no_archive_peak:.1f} MiB, {sizes['wide.csv']:.0f} MiB CSV imported at {wide_peak:.1f} MiB, "
            f"{sizes['long.csv']:.0f} MiB CSV over a 100,000-sample limit refused at {long_peak:.1f} MiB, "
            f"{sizes['huge.mat']:.0f} MiB .mat over a 10 MiB limit refused at {mat_peak:.1f} MiB",
        )
    )
    assert isinstance(no_archive_outcome, DataImportError)
    assert "is not a .npz archive" in str(no_archive_outcome) and "pickled" not in str(no_archive_outcome)
    assert isinstance(wide_outcome, ImportResult) and wide_outcome.windows == 120_000 // WINDOW == windows
    assert isinstance(long_outcome, DataImportError) and "more than 100,000 samples" in str(long_outcome)
    assert isinstance(mat_outcome, DataImportError) and "above the 10 MiB limit" in str(mat_outcome)
    assert no_archive_peak < 2 and mat_peak < 2 and long_peak < 4
    assert wide_peak < sizes["wide.csv"] / 4
