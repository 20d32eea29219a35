"""Training and evaluation sets: selections filter normal windows; labelled faults are the fleet's."""

from __future__ import annotations

import datetime as dt
from pathlib import Path

import numpy as np
import pytest

from firmware.codec import VibrationWindow
from tasks.datasets import DatasetError, LakeSelection, load_dataset, load_labelled, parse_selector
from tasks.lake import WindowBatch, write_windows

T0 = int(dt.datetime(2026, 11, 1, tzinfo=dt.UTC).timestamp() * 1e6)
HOUR_US = 3_600_000_000


def lake_with(tmp_path: Path) -> Path:
    batch = WindowBatch()
    rng = np.random.default_rng(0)
    for device, label, start in (("a", None, T0), ("b", None, T0), ("ref-ball", "ball", T0 - 24 * HOUR_US)):
        for seq in range(40):
            samples = rng.normal(0, 200, 1024).astype(np.int16)
            window = VibrationWindow(device, seq, start + seq * HOUR_US // 100, 25_600, 0.001, samples)
            batch.append("f", window, label=label, source="mqtt" if label is None else "simulator")
    write_windows(tmp_path, batch)
    return tmp_path


def test_selection_filters_normal_windows_but_keeps_the_fleets_faults(tmp_path: Path) -> None:
    lake = lake_with(tmp_path)
    since = dt.datetime.fromtimestamp((T0 + 20 * HOUR_US // 100) / 1e6, tz=dt.UTC)
    labelled = load_labelled(lake, LakeSelection("f", devices=("a",), start=since), window_samples=1024)
    assert set(labelled.normal.device) == {"a"}
    assert len(labelled.normal) == 20
    assert {k: len(v) for k, v in labelled.faults.items()} == {"ball": 40}


def test_holdout_is_the_last_part_of_each_device_in_time(tmp_path: Path) -> None:
    split = load_dataset(lake_with(tmp_path), LakeSelection("f"), window_samples=1024, test_fraction=0.25)
    assert split.counts == {"train_normal": 60, "test_normal": 20, "fault_ball": 40}
    assert len(split.fingerprint) == 64


def test_no_fault_windows_is_a_clear_error(tmp_path: Path) -> None:
    lake = lake_with(tmp_path)
    # a fleet with only normal windows cannot be evaluated
    with pytest.raises(DatasetError, match="no labelled fault windows for fleet 'g'"):
        batch = WindowBatch()
        for seq in range(10):
            batch.append("g", VibrationWindow("x", seq, T0 + seq, 25_600, 0.001, np.zeros(1024, np.int16)))
        write_windows(lake, batch)
        load_dataset(lake, LakeSelection("g"), window_samples=1024)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("device=a", "names no fleet"),
        ("fleet=f,colour=red", "invalid lake selector part"),
        ("fleet=f,since=yesterday", "is not an ISO time"),
    ],
)
def test_bad_selectors(text: str, message: str) -> None:
    with pytest.raises(DatasetError, match=message):
        parse_selector(text)


def test_unusable_lake_windows_are_skipped_and_named(tmp_path: Path) -> None:
    """A window another writer stored without validation (scale 3e38 reads back as inf) is skipped, not fatal."""
    lake = lake_with(tmp_path)
    batch = WindowBatch()
    loud = np.full(1024, 20_000, np.int16)
    batch.append("f", VibrationWindow("a", 1000, T0 + HOUR_US // 2, 25_600, 3e38, loud))
    batch.append("f", VibrationWindow("b", 1000, T0 + HOUR_US // 2, 25_600, 1.0, loud))
    write_windows(lake, batch)

    split = load_dataset(lake, LakeSelection("f"), window_samples=1024, test_fraction=0.25)

    assert [(w.device, w.seq) for w in split.skipped] == [("a", 1000), ("b", 1000)]
    assert split.skipped[0].reason.startswith("non-finite samples")
    assert split.skipped[1].reason.startswith("out of range")
    assert split.counts == {"train_normal": 60, "test_normal": 20, "fault_ball": 40, "skipped_unusable": 2}
    assert all(np.isfinite(x).all() for x in (split.train_normal, split.test_normal))
