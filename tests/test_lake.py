"""The lake's layout, its time-pruned reader, the dedupe index and crash-safe compaction."""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import itertools
import json
import logging
import os
import struct
import subprocess
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from firmware.codec import VibrationWindow
from tasks import lake as lake_module
from tasks.lake import (
    Seen,
    SeqIndex,
    WindowBatch,
    compact_lake,
    lake_files,
    load_dedupe_index,
    partition_dir,
    read_keys,
    read_windows,
    save_key_snapshot,
    window_digest,
    write_windows,
)
from tests.conftest import cli_env
from tests.fault_ledger import FaultRecord, record
from tinymlops.errors import LakeError

T0 = int(dt.datetime(2026, 11, 1, 6, tzinfo=dt.UTC).timestamp() * 1e6)
HOUR_US = 3_600_000_000


def at(us: int) -> dt.datetime:
    return dt.datetime.fromtimestamp(us / 1e6, tz=dt.UTC)


def flushed(device: int, seq: int, hour: int, value: int | None = None) -> VibrationWindow:
    """The window :func:`flush` writes (other samples with ``value``)."""
    samples = np.full(64, seq % 1000 if value is None else value, np.int16)
    return VibrationWindow(f"d{device:03d}", seq, T0 + hour * HOUR_US + seq * 1000, 25_600, 1.0, samples)


def flush(lake: Path, devices: int, seqs: range, hour: int, fleet: str = "f") -> None:
    """One ingest flush: every device's windows ``seqs``, all in hour ``hour`` after T0."""
    batch = WindowBatch()
    for device in reversed(range(devices)):  # arrival order is not lake order
        for seq in seqs:
            batch.append(fleet, flushed(device, seq, hour))
    write_windows(lake, batch)


def test_one_flush_writes_one_file_per_fleet_and_hour_sorted_by_device_then_seq(tmp_path: Path) -> None:
    batch = WindowBatch()
    for device in ("b", "a"):
        for seq, hour in ((3, 1), (1, 0), (2, 0)):
            window = VibrationWindow(device, seq, T0 + hour * HOUR_US + seq, 25_600, 1.0, np.zeros(64, np.int16))
            batch.append("f", window)
    files = sorted(write_windows(tmp_path, batch))
    assert [str(f.parent.relative_to(tmp_path)) for f in files] == [
        "vibration/fleet=f/date=2026-11-01/hour=06",
        "vibration/fleet=f/date=2026-11-01/hour=07",
    ]
    first = pq.ParquetFile(files[0]).read()
    assert list(zip(first["device"].to_pylist(), first["seq"].to_pylist(), strict=True)) == [
        ("a", 1), ("a", 2), ("b", 1), ("b", 2)
    ]  # fmt: skip


@pytest.mark.parametrize("fleet", ["", "..", "a/b", "x" * 65, "a b"])
def test_a_fleet_name_that_is_not_one_directory_level_is_refused(tmp_path: Path, fleet: str) -> None:
    with pytest.raises(LakeError, match="invalid fleet name"):
        partition_dir(tmp_path, fleet, "2026-11-01", "06")


def test_a_time_range_reads_only_the_hours_it_touches(tmp_path: Path) -> None:
    for hour in range(4):
        flush(tmp_path, devices=3, seqs=range(hour * 10, hour * 10 + 10), hour=hour)
    flush(tmp_path, devices=3, seqs=range(40, 50), hour=2, fleet="other")
    start, end = at(T0 + 2 * HOUR_US), at(T0 + 2 * HOUR_US + 30 * 60 * 1_000_000)
    files = lake_files(tmp_path, fleet="f", start=start, end=end)
    assert [f.parent.name for f in files] == ["hour=08"]
    windows = read_windows(tmp_path, fleet="f", start=start, end=end)
    assert sorted(set(windows.seq.tolist())) == list(range(20, 30))
    assert len(read_windows(tmp_path, fleet="f")) == 120
    assert len(lake_files(tmp_path)) == 5


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.tuples(st.sampled_from("abc"), st.integers(0, 1), st.integers(0, 200)), max_size=300),
    st.integers(0, 200),
)
def test_seq_index_answers_exactly_as_a_set(keys: list[tuple[str, int, int]], probe: int) -> None:
    one_by_one, at_once = SeqIndex(), SeqIndex()
    for device, epoch, seq in keys:
        one_by_one.add(device, epoch, seq)
    at_once.update([d for d, _, _ in keys], np.asarray([e for _, e, _ in keys]), np.asarray([s for *_, s in keys]))
    expected = set(keys)
    for device in "abc":
        for epoch in (0, 1):
            for seq in (probe, probe - 1, probe + 1):
                assert one_by_one.contains(device, epoch, seq) == ((device, epoch, seq) in expected)
                assert at_once.contains(device, epoch, seq) == ((device, epoch, seq) in expected)
            seqs = [s for d, e, s in keys if (d, e) == (device, epoch)]
            assert one_by_one.last(device, epoch) == (max(seqs) if seqs else None)
    assert one_by_one.ranges() == at_once.ranges()


def test_seq_index_memory_grows_with_gaps_not_windows() -> None:
    index = SeqIndex(max_ranges_per_stream=100)
    for seq in range(200_000):
        for device in ("a", "b", "c", "d", "e"):
            index.add(device, 7, seq)
    assert index.ranges() == 5  # a million windows, one range per device
    for seq in range(0, 10_000, 2):  # a pathological device: every other seq missing
        index.add("sparse", 7, 10_000_000 + seq)
    assert index.ranges() == 5 + 100
    assert index.contains("sparse", 7, 10_000_000 + 9_998) and not index.contains("sparse", 7, 10_000_000)
    # what it forgot, it no longer vouches for: a key there may be stored
    assert not index.vouches("sparse", 7, 10_000_000) and index.vouches("sparse", 7, 10_000_000 + 9_801)
    assert index.vouches("sparse", 8, 0) and index.vouches("a", 7, 0)


def test_the_dedupe_index_holds_every_key_whatever_its_date_and_recent_digests_by_arrival(tmp_path: Path) -> None:
    years_ago = -5 * 365 * 24
    flush(tmp_path, devices=2, seqs=range(0, 50), hour=years_ago)  # windows their sender dated 2021
    flush(tmp_path, devices=2, seqs=range(60, 70), hour=0)
    now = dt.datetime.now(tz=dt.UTC)
    index = load_dedupe_index(tmp_path, "f", horizon_days=2, now=now)
    assert index.keys.ranges() == 4
    stored, other = flushed(1, 49, years_ago), flushed(1, 49, years_ago, value=7)
    assert index.check("d001", 0, 49, window_digest(stored)) is Seen.DUPLICATE
    assert index.check("d001", 0, 49, window_digest(other)) is Seen.CONFLICT
    assert index.check("d001", 0, 55, window_digest(other)) is Seen.NEW
    assert index.check("d001", 1, 49, window_digest(other)) is Seen.NEW  # another boot epoch
    # three days later: every key is still known, their content no longer
    later = load_dedupe_index(tmp_path, "f", horizon_days=2, now=now + dt.timedelta(days=3))
    assert later.keys.ranges() == 4
    assert later.check("d001", 0, 49, window_digest(stored)) is Seen.UNVERIFIABLE
    assert later.check("d001", 0, 55, window_digest(other)) is Seen.NEW


def test_files_written_before_the_epoch_and_digest_columns_read_as_epoch_0_content_unknown(tmp_path: Path) -> None:
    flush(tmp_path, devices=1, seqs=range(0, 5), hour=0)
    (old,) = lake_files(tmp_path, fleet="f")
    pq.write_table(pq.read_table(old).drop_columns(["epoch", "digest"]), old)
    flush(tmp_path, devices=1, seqs=range(5, 10), hour=0)
    assert keys_of(tmp_path) == [("d000", s) for s in range(10)]
    assert set(read_keys(tmp_path, "f")["epoch"].to_pylist()) == {0}
    index = load_dedupe_index(tmp_path, "f", horizon_days=2)
    assert index.check("d000", 0, 3, window_digest(flushed(0, 3, 0))) is Seen.UNVERIFIABLE
    assert index.check("d000", 0, 7, window_digest(flushed(0, 7, 0))) is Seen.DUPLICATE
    report = compact_lake(tmp_path, fleet="f", closed_before=at(T0 + HOUR_US))
    assert (report.files_before, report.files_after, report.rows) == (2, 1, 10)
    assert keys_of(tmp_path) == [("d000", s) for s in range(10)]


def test_the_operating_condition_is_kept_by_every_reader_and_old_files_read_it_as_not_known(tmp_path: Path) -> None:
    nan = float("nan")
    batch = WindowBatch()
    for seq, rpm, load in ((0, 900.0, 0.5), (1, None, None), (2, nan, 0.25), (3, -5.0, None)):
        batch.append("f", dataclasses.replace(flushed(0, seq, 0), rpm=rpm, load=load))  # -5: stored as sent
    write_windows(tmp_path, batch)
    old_batch = WindowBatch()
    for seq in (4, 5):
        old_batch.append("f", dataclasses.replace(flushed(0, seq, 0), rpm=1500.0))
    (old,) = write_windows(tmp_path, old_batch)
    pq.write_table(pq.read_table(old).drop_columns(["rpm", "load"]), old)  # written before the columns
    rpm = [900.0, nan, nan, -5.0, nan, nan]
    load = [0.5, nan, 0.25, nan, nan, nan]
    windows = read_windows(tmp_path, fleet="f")
    assert windows.rpm.dtype == windows.load.dtype == np.float32
    np.testing.assert_array_equal(windows.rpm, np.float32(rpm))  # NaN == NaN here
    np.testing.assert_array_equal(windows.load, np.float32(load))
    picked = windows.select(windows.seq % 2 == 0)
    np.testing.assert_array_equal(picked.rpm, np.float32(rpm[::2]))
    np.testing.assert_array_equal(picked.load, np.float32(load[::2]))
    assert compact_lake(tmp_path, fleet="f", closed_before=at(T0 + HOUR_US)).files_after == 1
    np.testing.assert_array_equal(read_windows(tmp_path, fleet="f").rpm, np.float32(rpm))
    np.testing.assert_array_equal(read_windows(tmp_path, fleet="f").load, np.float32(load))


def test_the_content_digest_covers_the_operating_condition_only_when_a_window_carries_one() -> None:
    window = flushed(0, 7, 0)
    before_v3 = hashlib.blake2b(digest_size=8)  # the digest the lake stored before wire version 3
    before_v3.update(struct.pack("<QIf", window.timestamp_us, window.sample_rate_hz, window.scale))
    before_v3.update(window.samples.astype("<i2").tobytes())
    assert window_digest(window) == int.from_bytes(before_v3.digest(), "little", signed=True)
    with_speed = {window_digest(dataclasses.replace(window, rpm=rpm, load=load))
                  for rpm, load in ((900.0, None), (901.0, None), (900.0, 0.5), (None, 0.5))}  # fmt: skip
    assert len(with_speed) == 4 and window_digest(window) not in with_speed


def test_the_key_snapshot_spares_a_restart_the_files_it_covers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(lake_module, "_SNAPSHOT_MARGIN", dt.timedelta(0))
    flush(tmp_path, devices=2, seqs=range(0, 50), hour=0)
    covered = lake_files(tmp_path, fleet="f")
    save_key_snapshot(tmp_path, "f", load_dedupe_index(tmp_path, "f", horizon_days=2))
    flush(tmp_path, devices=2, seqs=range(50, 60), hour=1)  # written after the snapshot: read again
    for path in covered:  # a covered file is not read any more: its keys come from the snapshot
        path.write_bytes(b"not parquet")
    index = load_dedupe_index(tmp_path, "f", horizon_days=1e-9)
    assert index.keys.ranges() == 2 and index.keys.last("d001", 0) == 59 and index.keys.contains("d000", 0, 0)
    (tmp_path / "vibration" / "fleet=f" / ".dedupe-keys.parquet").write_bytes(b"torn")
    with pytest.raises(LakeError, match="cannot read the keys of fleet f"):  # no snapshot: every file is read
        load_dedupe_index(tmp_path, "f", horizon_days=2)


def lake_with_closed_and_open_hours(lake: Path) -> list[tuple[str, int]]:
    for i in range(5):
        flush(lake, devices=4, seqs=range(i * 10, i * 10 + 10), hour=0)
    for i in range(2):
        flush(lake, devices=4, seqs=range(100 + i * 10, 110 + i * 10), hour=1)
    return keys_of(lake)


def keys_of(lake: Path) -> list[tuple[str, int]]:
    table = read_keys(lake, "f")
    return sorted(zip(table["device"].to_pylist(), table["seq"].to_pylist(), strict=True))


def test_compaction_merges_closed_hours_only_and_keeps_every_window(tmp_path: Path) -> None:
    before = lake_with_closed_and_open_hours(tmp_path)
    samples_before = read_windows(tmp_path, fleet="f").samples
    report = compact_lake(tmp_path, fleet="f", closed_before=at(T0 + HOUR_US + 1))
    assert report.to_dict() == {
        "partitions": 1, "files_before": 5, "files_after": 1, "rows": 200, "stale_temporaries_removed": 0
    }  # fmt: skip
    hour0 = partition_dir(tmp_path, "f", "2026-11-01", "06")
    assert [p.name.startswith("compact-") for p in hour0.iterdir() if not p.name.startswith(".")] == [True]
    assert len(list(partition_dir(tmp_path, "f", "2026-11-01", "07").glob("*.parquet"))) == 2
    assert keys_of(tmp_path) == before
    np.testing.assert_array_equal(read_windows(tmp_path, fleet="f").samples, samples_before)
    # a late window lands in the compacted hour: the next pass merges it
    flush(tmp_path, devices=1, seqs=range(1000, 1001), hour=0)
    again = compact_lake(tmp_path, fleet="f", closed_before=at(T0 + HOUR_US + 1))
    assert (again.files_before, again.files_after, again.rows) == (2, 1, 201)


@pytest.mark.parametrize("failing_step", ["rename", "delete"])
def test_a_compaction_failing_at_any_step_shows_every_window_exactly_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, failing_step: str
) -> None:
    before = lake_with_closed_and_open_hours(tmp_path)
    hour0 = partition_dir(tmp_path, "f", "2026-11-01", "06")
    if failing_step == "rename":
        monkeypatch.setattr(lake_module.os, "replace", _raise_enospc)
    else:
        real_unlink = Path.unlink

        def unlink(path: Path, missing_ok: bool = False) -> None:
            if path.name.startswith("part-"):
                _raise_enospc()
            real_unlink(path, missing_ok=missing_ok)

        monkeypatch.setattr(Path, "unlink", unlink)
    with pytest.raises(LakeError, match=r"cannot compact .*No space left on device"):
        compact_lake(tmp_path, fleet="f", closed_before=at(T0 + HOUR_US + 1))
    monkeypatch.undo()
    assert keys_of(tmp_path) == before  # nothing lost, nothing twice
    visible = [p.name.split("-")[0] for p in sorted(hour0.glob("*.parquet")) if not p.name.startswith(".")]
    manifests = list(hour0.glob(".compaction-*.json"))
    if failing_step == "rename":  # rolled back: the old files, no manifest, no temporary
        assert visible == ["part"] * 5 and not manifests and not list(hour0.glob(".tmp-*"))
    else:  # the output is visible; the manifest makes readers skip the files it replaced
        assert sorted(visible) == ["compact"] + ["part"] * 5 and len(manifests) == 1
    compact_lake(tmp_path, fleet="f", closed_before=at(T0 + HOUR_US + 1))
    assert [p.name.split("-")[0] for p in hour0.iterdir() if not p.name.startswith(".")] == ["compact"]
    assert not list(hour0.glob(".compaction-*")) and keys_of(tmp_path) == before


def _raise_enospc(*_args: object) -> None:
    raise OSError(28, os.strerror(28))


def test_a_torn_manifest_and_stale_temporaries_are_cleaned_up(tmp_path: Path) -> None:
    before = lake_with_closed_and_open_hours(tmp_path)
    hour0 = partition_dir(tmp_path, "f", "2026-11-01", "06")
    (hour0 / ".compaction-torn.json").write_text('{"output": "compact-x.parq')
    stale = hour0 / ".tmp-part-killed.parquet"
    stale.write_bytes(b"PAR1 half a file")
    os.utime(stale, (0, 0))
    fresh = hour0 / ".tmp-part-writing.parquet"
    fresh.write_bytes(b"PAR1 being written")
    assert keys_of(tmp_path) == before
    report = compact_lake(tmp_path, fleet="f", closed_before=at(T0 + HOUR_US + 1))
    assert report.stale_temporaries_removed == 1 and report.files_after == 1
    assert not stale.exists() and fresh.exists() and not list(hour0.glob(".compaction-*"))
    assert json.loads(json.dumps(report.to_dict()))["rows"] == 200


def test_lake_compact_through_the_cli(tmp_path: Path) -> None:
    lake = tmp_path / "lake"
    lake_with_closed_and_open_hours(lake)
    result = subprocess.run(
        [sys.executable, "-m", "tinymlops", "lake", "compact", "--fleet", "f", "--after-minutes", "0"],
        env=cli_env(tmp_path), capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    figures = json.loads(result.stdout)
    assert (figures["partitions"], figures["files_before"], figures["files_after"]) == (2, 7, 2)
    assert len(lake_files(lake)) == 2


READERS_ROUNDS = 12
READERS_HOURS = 4
READERS_PER_HOUR = 20  # windows per device, hour and round


def _round_keys(rounds: int) -> set[tuple[str, int]]:
    """The (device, seq) keys the first ``rounds`` rounds of the compaction-under-readers test write."""
    count = rounds * READERS_HOURS * READERS_PER_HOUR
    return {(f"d{device:03d}", seq) for device in range(2) for seq in range(count)}


def test_readers_see_every_window_exactly_once_while_compaction_deletes_files(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A compaction deletes the files it merged; readers at that moment must neither fail nor double-count.

    A writer-compactor thread adds one file to each of four closed hours and compacts them, round
    after round; the readers (``read_windows``, ``read_keys``, ``load_dedupe_index``) read in a loop in
    the meantime. Each round waits for three more reads, so reads and compactions overlap by count.
    Every read must hold each window at most once, every window committed before it began, and
    none beyond what was being written when it ended.
    """
    caplog.set_level(logging.DEBUG, logger="tasks.lake")
    progress = threading.Condition()
    started = committed = reads = 0
    failure: list[BaseException] = []

    def reads_reach(wanted: int) -> Callable[[], bool]:
        return lambda: reads >= wanted

    def write_and_compact() -> None:
        nonlocal started, committed
        try:
            for round_ in range(READERS_ROUNDS):
                with progress:
                    started += 1
                batch = WindowBatch()  # one write of every hour, as an ingest flush
                for hour, device in itertools.product(range(READERS_HOURS), range(2)):
                    first = (round_ * READERS_HOURS + hour) * READERS_PER_HOUR
                    for seq in range(first, first + READERS_PER_HOUR):
                        window = VibrationWindow(
                            f"d{device:03d}", seq, T0 + hour * HOUR_US + seq, 25_600, 1.0, np.zeros(64, np.int16)
                        )
                        batch.append("f", window)
                write_windows(tmp_path, batch)
                with progress:
                    committed += 1
                compact_lake(tmp_path, fleet="f", closed_before=at(T0 + 24 * HOUR_US))
                with progress:
                    if not progress.wait_for(reads_reach(3 * (round_ + 1)), timeout=120):
                        raise TimeoutError(f"readers stalled at {reads} reads")
        except BaseException as exc:  # re-raised by the test thread
            failure.append(exc)

    compactor = threading.Thread(target=write_and_compact)
    compactor.start()
    problems: list[str] = []
    failed = wrong = 0
    try:
        while compactor.is_alive():
            with progress:
                lower = _round_keys(committed)
            kind = ("read_windows", "read_keys", "load_dedupe_index")[reads % 3]
            try:
                keys = _read_keys_with(kind, tmp_path, lower)
            except Exception as exc:  # counted, so the ledger shows how many reads failed
                failed += 1
                problems.append(f"{kind}: {type(exc).__name__}: {exc}")
                keys = None
            with progress:
                upper = _round_keys(started)
                reads += 1
                progress.notify_all()
            if keys is not None and (len(keys) != len(set(keys)) or not lower <= set(keys) <= upper):
                wrong += 1
                problems.append(f"{kind}: {len(keys)} keys, {len(set(keys))} distinct, {len(lower - set(keys))} lost")
    finally:
        compactor.join()
    if failure:
        raise failure[0]
    stored = keys_of(tmp_path)
    again = sum("vanished under a read" in r.getMessage() for r in caplog.records)
    record(
        FaultRecord(
            "compaction under readers",
            sent=len(_round_keys(READERS_ROUNDS)),
            in_lake=len(stored),
            duplicates=len(stored) - len(set(stored)),
            lost=len(_round_keys(READERS_ROUNDS) - set(stored)),
            notes=f"{reads} reads (read_windows, read_keys, load_dedupe_index in turn) during {READERS_ROUNDS} "
            f"compaction passes of {READERS_HOURS} hours; {failed} reads failed, {wrong} saw a window twice or missed "
            f"one; {again} reads listed a file the compaction then deleted and read again with compaction held off",
        )
    )
    assert reads >= 3 * READERS_ROUNDS
    assert problems == []
    assert stored == sorted(_round_keys(READERS_ROUNDS))


def _read_keys_with(kind: str, lake: Path, committed: set[tuple[str, int]]) -> list[tuple[str, int]]:
    """Read the fleet's (device, seq) keys with one reader (the seq index: the committed keys it holds, its last)."""
    if kind == "read_windows":
        windows = read_windows(lake, fleet="f")
        return list(zip(windows.device.tolist(), windows.seq.tolist(), strict=True))
    if kind == "read_keys":
        table = read_keys(lake, "f")
        return list(zip(table["device"].to_pylist(), table["seq"].to_pylist(), strict=True))
    index = load_dedupe_index(lake, "f", horizon_days=2).keys
    keys = [(d, s) for d, s in committed if index.contains(d, 0, s)]
    return keys + [(d, s) for d in ("d000", "d001") if (s := index.last(d, 0)) is not None and (d, s) not in committed]


def test_a_file_vanishing_with_compaction_held_off_is_one_lake_error(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Only a compaction may delete lake files under a reader; anything else is named, not retried forever."""
    lake_with_closed_and_open_hours(tmp_path)
    compact_lake(tmp_path, fleet="f", closed_before=at(T0 + HOUR_US + 1))  # creates the compaction lock
    real_lake_files = lake_module.lake_files

    def listing_with_a_deleted_file(*args: Any, **kwargs: Any) -> list[Path]:
        files = real_lake_files(*args, **kwargs)
        return [*files, files[0].with_name("part-deleted-by-someone.parquet")]

    monkeypatch.setattr(lake_module, "lake_files", listing_with_a_deleted_file)
    with pytest.raises(LakeError, match=r"a file vanished while no compaction ran .*part-deleted-by-someone") as info:
        read_keys(tmp_path, "f")
    assert "\n" not in str(info.value)
