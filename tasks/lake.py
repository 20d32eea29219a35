"""The Parquet data lake: atomic partitioned writes, the dedupe index, quarantine, and the reader.

Layout::

    <lake>/vibration/fleet=<fleet>/date=<YYYY-MM-DD>/hour=<HH>/part-<utc>-<uuid>.parquet
    <lake>/vibration/fleet=<fleet>/date=<YYYY-MM-DD>/hour=<HH>/compact-<utc>-<uuid>.parquet
    <lake>/vibration/.ingest-client-<sha256>.lock    (the lease of an ingest's MQTT client id)
    <lake>/vibration/fleet=<fleet>/.ingest.lock       (the fleet's ingest lease, see ingest_lease)
    <lake>/vibration/fleet=<fleet>/.import.lock       (one import of the fleet at a time, see import_lock)
    <lake>/vibration/fleet=<fleet>/.dedupe-keys.parquet  (the dedupe index's keys, see save_key_snapshot)
    <quarantine>/date=<YYYY-MM-DD>/part-<utc>-<uuid>.parquet

One ingest flush writes one file per fleet and UTC hour (rows sorted by device, then seq), so the
file count grows with flushes, not with devices; :func:`compact_lake` merges a closed hour's files
into one. Every file is written to a hidden temporary name in its final directory, flushed to disk,
then renamed, so a reader or a crash never sees half a file. Readers ignore names starting with
``.`` and read only the hour directories a time range touches.
"""

from __future__ import annotations

import bisect
import contextlib
import ctypes
import datetime as dt
import enum
import fcntl
import hashlib
import json
import logging
import math
import os
import re
import socket
import struct
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TypeVar

import numpy as np
import numpy.typing as npt
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.dataset as ds
import pyarrow.parquet as pq

from firmware.codec import VibrationWindow
from tinymlops.contracts.topics import NAME_PATTERN
from tinymlops.errors import LakeError, LeaseError

log = logging.getLogger(__name__)

try:
    _SYNCFS: Callable[[int], int] | None = ctypes.CDLL(None, use_errno=True).syncfs
except (OSError, AttributeError):  # not Linux: fall back to an fsync per file and directory
    _SYNCFS = None

VIBRATION_TABLE = "vibration"
WINDOW_SCHEMA = pa.schema(
    [
        ("device", pa.string()),
        ("seq", pa.int64()),
        ("timestamp", pa.timestamp("us", tz="UTC")),
        ("sample_rate_hz", pa.int32()),
        ("scale", pa.float32()),
        # little-endian int16 samples, as on the wire: 5x cheaper to encode than list<int16>
        ("samples", pa.binary()),
        ("label", pa.string()),
        ("source", pa.string()),
        ("ingested_at", pa.timestamp("us", tz="UTC")),
        # The sender's boot epoch (0 for version-1 senders and imports; null in files written before it).
        ("epoch", pa.int64()),
        # window_digest() of the content, so a repeated (device, epoch, seq) is compared, not trusted.
        ("digest", pa.int64()),
        # The operating condition: shaft speed (rpm) and load fraction as sent or imported, NaN = not known
        # (null in files written before them, read as NaN). Kept as sent, usable or not: the scorer judges it.
        ("rpm", pa.float32()),
        ("load", pa.float32()),
    ]
)
PARTITION_SCHEMA = pa.schema([("fleet", pa.string()), ("date", pa.string()), ("hour", pa.string())])
PARTITIONING = ds.partitioning(PARTITION_SCHEMA, flavor="hive")
DATASET_SCHEMA = pa.unify_schemas([WINDOW_SCHEMA, PARTITION_SCHEMA])
_HOUR_US = 3_600_000_000
_Read = TypeVar("_Read")
# Compaction buffers this much Arrow data per row group: bounded memory, few row groups.
_COMPACT_ROW_GROUP_BYTES = 64 * 1024 * 1024
QUARANTINE_SCHEMA = pa.schema(
    [
        ("received_at", pa.timestamp("us", tz="UTC")),
        ("topic", pa.string()),
        ("reason", pa.string()),
        ("payload_bytes", pa.int64()),
        ("payload_sha256", pa.string()),
        ("payload_prefix", pa.binary()),
    ]
)


def window_digest(window: VibrationWindow) -> int:
    """Return a 64-bit digest of everything a window carries besides its key (device, epoch, seq).

    Two windows with one key and one digest are one window sent twice; with two digests, the key
    was reused for other content. BLAKE2b over 2 KiB costs about 2 µs, once per received window.
    The operating condition (rpm, load) is content too: one key sent with two speeds is not a
    redelivery, and keeping the first silently would store a wrong speed. It enters the digest only
    when the window carries one, so a window without it (wire versions 1 and 2, a device without a
    tachometer) keeps the digest it had before version 3, and the digests already in the lake stay valid.
    """
    digest = hashlib.blake2b(digest_size=8)
    digest.update(struct.pack("<QIf", window.timestamp_us, window.sample_rate_hz, window.scale))
    digest.update(np.ascontiguousarray(window.samples, dtype="<i2").data)
    if window.rpm is not None or window.load is not None:
        digest.update(struct.pack("<ff", _or_nan(window.rpm), _or_nan(window.load)))
    return int.from_bytes(digest.digest(), "little", signed=True)


def _or_nan(value: float | None) -> float:
    """A known rpm or load as is, an unknown one as NaN, the lake's and the wire's not known."""
    return math.nan if value is None else value


def utc_date(timestamp_us: int) -> str:
    """Return the UTC calendar date (YYYY-MM-DD) of a UNIX timestamp in microseconds."""
    return dt.datetime.fromtimestamp(timestamp_us / 1e6, tz=dt.UTC).strftime("%Y-%m-%d")


def _now_us() -> int:
    return int(dt.datetime.now(tz=dt.UTC).timestamp() * 1e6)


def _sync_filesystem(path: Path) -> bool:
    """Flush the whole filesystem holding ``path`` (Linux syncfs); False where syncfs is unavailable."""
    if _SYNCFS is None:
        return False
    fd = os.open(path, os.O_RDONLY)
    try:
        if _SYNCFS(fd) != 0:
            raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()))
    finally:
        os.close(fd)
    return True


def _fsync_path(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_parquet_files(tables: list[tuple[pa.Table, Path]], sync_root: Path) -> list[Path]:
    """Write tables durably, each into its directory under a fresh part name, as one step.

    Every file is first written under a hidden temporary name; then the filesystem is flushed
    once, all files are renamed into place, and it is flushed again. One syncfs per step costs
    far less than an fsync per file and per directory (30x on this project's disks), and no
    file becomes visible before every file's data is on disk. Without syncfs (not Linux), each
    file and directory is fsynced.

    Args:
        tables: (table, directory) pairs.
        sync_root: A directory on the filesystem being written (created if missing).

    Returns:
        The final paths, in order.

    Raises:
        LakeError: A file could not be written (disk full, permissions); no temporary file remains
            and no file of this step is visible.
    """
    stamp = dt.datetime.now(tz=dt.UTC).strftime("%Y%m%dT%H%M%S%f")
    planned = []
    for table, directory in tables:
        name = f"part-{stamp}-{uuid.uuid4().hex[:12]}.parquet"
        planned.append((table, directory / f".tmp-{name}", directory / name))
    current = sync_root
    try:
        sync_root.mkdir(parents=True, exist_ok=True)
        for table, tmp, final in planned:
            current = final
            final.parent.mkdir(parents=True, exist_ok=True)
            with open(tmp, "wb") as handle:
                pq.write_table(table, handle, compression="zstd", use_dictionary=["label", "source"])
                if _SYNCFS is None:
                    handle.flush()
                    os.fsync(handle.fileno())
        current = sync_root
        _sync_filesystem(sync_root)
        for _, tmp, final in planned:
            current = final
            os.replace(tmp, final)
            if _SYNCFS is None:
                _fsync_path(final.parent)
        current = sync_root
        _sync_filesystem(sync_root)
    except OSError as exc:
        for _, tmp, _ in planned:
            tmp.unlink(missing_ok=True)
        raise LakeError(f"cannot write {current}: {exc.strerror or exc}") from exc
    return [final for _, _, final in planned]


def write_parquet_atomic(table: pa.Table, directory: Path) -> Path:
    """Write one table durably into a directory under a fresh part name (see :func:`write_parquet_files`)."""
    return write_parquet_files([(table, directory)], directory)[0]


@dataclass
class WindowBatch:
    """Accepted windows waiting to be written, kept column-wise for a cheap conversion to Arrow."""

    fleet: list[str] = field(default_factory=list)
    device: list[str] = field(default_factory=list)
    epoch: list[int] = field(default_factory=list)
    seq: list[int] = field(default_factory=list)
    timestamp_us: list[int] = field(default_factory=list)
    sample_rate_hz: list[int] = field(default_factory=list)
    scale: list[float] = field(default_factory=list)
    samples: list[npt.NDArray[np.int16]] = field(default_factory=list)
    label: list[str | None] = field(default_factory=list)
    source: list[str] = field(default_factory=list)
    digest: list[int] = field(default_factory=list)
    rpm: list[float] = field(default_factory=list)
    load: list[float] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.seq)

    def append(
        self,
        fleet: str,
        window: VibrationWindow,
        *,
        label: str | None = None,
        source: str = "mqtt",
        digest: int | None = None,
    ) -> None:
        """Add one window (``digest``: its :func:`window_digest`, when the caller already computed it)."""
        self.fleet.append(fleet)
        self.device.append(window.device_id)
        self.epoch.append(window.epoch)
        self.seq.append(window.seq)
        self.timestamp_us.append(window.timestamp_us)
        self.sample_rate_hz.append(window.sample_rate_hz)
        self.scale.append(window.scale)
        self.samples.append(window.samples)
        self.label.append(label)
        self.source.append(source)
        self.digest.append(window_digest(window) if digest is None else digest)
        self.rpm.append(_or_nan(window.rpm))
        self.load.append(_or_nan(window.load))

    def partitions(self) -> dict[tuple[str, str, str], pa.Table]:
        """Group the rows by (fleet, UTC date, UTC hour): one Arrow table each, sorted by device, epoch, seq."""
        hours = np.asarray(self.timestamp_us, dtype=np.int64) // _HOUR_US
        groups: dict[tuple[str, int], list[int]] = defaultdict(list)
        for i, key in enumerate(zip(self.fleet, hours.tolist(), strict=True)):
            groups[key].append(i)
        ingested = pa.scalar(_now_us(), pa.int64()).cast(pa.timestamp("us", tz="UTC"))
        seq = np.asarray(self.seq, dtype=np.int64)
        epoch = np.asarray(self.epoch, dtype=np.int64)
        digest = np.asarray(self.digest, dtype=np.int64)
        ts = np.asarray(self.timestamp_us, dtype=np.int64)
        rate = np.asarray(self.sample_rate_hz, dtype=np.int32)
        scale = np.asarray(self.scale, dtype=np.float32)
        rpm = np.asarray(self.rpm, dtype=np.float32)
        load = np.asarray(self.load, dtype=np.float32)
        tables = {}
        for (fleet, hour), members in groups.items():
            rows = sorted(members, key=lambda i: (self.device[i], self.epoch[i], self.seq[i]))
            index = np.asarray(rows)
            arrays = [self.samples[i] for i in rows]
            offsets = np.zeros(len(rows) + 1, dtype=np.int32)
            np.cumsum([2 * a.size for a in arrays], out=offsets[1:])
            data = pa.py_buffer(np.concatenate(arrays).astype("<i2", copy=False).tobytes())
            start = dt.datetime.fromtimestamp(hour * 3600, tz=dt.UTC)
            tables[(fleet, start.strftime("%Y-%m-%d"), start.strftime("%H"))] = pa.table(
                [
                    pa.array([self.device[i] for i in rows], pa.string()),
                    pa.array(seq[index]),
                    pa.array(ts[index]).cast(pa.timestamp("us", tz="UTC")),
                    pa.array(rate[index]),
                    pa.array(scale[index]),
                    pa.BinaryArray.from_buffers(pa.binary(), len(rows), [None, pa.py_buffer(offsets), data]),
                    pa.array([self.label[i] for i in rows], pa.string()),
                    pa.array([self.source[i] for i in rows], pa.string()),
                    pa.repeat(ingested, len(rows)),
                    pa.array(epoch[index]),
                    pa.array(digest[index]),
                    pa.array(rpm[index]),
                    pa.array(load[index]),
                ],
                schema=WINDOW_SCHEMA,
            )
        return tables


def conform_to_window_schema(table: pa.Table) -> pa.Table:
    """Return a lake file's table in :data:`WINDOW_SCHEMA`; columns a file written before them lacks are null."""
    columns = [
        table[f.name].cast(f.type) if f.name in table.column_names else pa.nulls(table.num_rows, f.type)
        for f in WINDOW_SCHEMA
    ]
    return pa.table(columns, schema=WINDOW_SCHEMA)


def fleet_dir(lake_root: Path, fleet: str) -> Path:
    """Return the directory of a fleet's windows.

    Raises:
        LakeError: The fleet name could not be one directory level (``a/b``, ``..``, empty).
    """
    if not NAME_PATTERN.match(fleet):  # one topic level is one directory level
        raise LakeError(f"invalid fleet name {fleet!r} for the lake: expected 1-64 characters of A-Z a-z 0-9 _ -")
    return lake_root / VIBRATION_TABLE / f"fleet={fleet}"


def partition_dir(lake_root: Path, fleet: str, date: str, hour: str) -> Path:
    """Return the directory of one (fleet, UTC date, UTC hour) partition.

    Raises:
        LakeError: The fleet name could not be one directory level (``a/b``, ``..``, empty).
    """
    return fleet_dir(lake_root, fleet) / f"date={date}" / f"hour={hour}"


@contextlib.contextmanager
def ingest_lease(lake_root: Path, fleet: str, client_id: str) -> Iterator[Path]:
    """Hold the fleet's ingest lease in the lake for the duration of the block, or refuse at once.

    The lease is an exclusive ``flock`` on ``<lake>/vibration/fleet=<fleet>/.ingest.lock``: the
    kernel releases it when its holder exits, however it exits (SIGKILL included), so a dead
    ingest never blocks the next one. The holder writes its pid, host and start time into the
    file, for the refusal of a second ingest. Two ingests of one fleet would share one MQTT
    session (each taking it from the other) and write most windows twice. The MQTT client id is
    leased as well (``<lake>/vibration/.ingest-client-<sha256>.lock``): ingests of two fleets
    under one client id would take the session from each other too, and each would quarantine
    the other fleet's windows as arriving on an unexpected topic.

    Args:
        lake_root: Lake root.
        fleet: Fleet to ingest.
        client_id: MQTT client id of the ingest's persistent session.

    Yields:
        The fleet's lock file.

    Raises:
        LeaseError: Another live process ingests the fleet, or another fleet under the same client id.
        LakeError: The fleet name is invalid or a lock file cannot be created.
    """
    with _held_lock(fleet_dir(lake_root, fleet) / ".ingest.lock", wait=False) as (path, holder):
        if holder is not None:
            raise LeaseError(
                f"fleet {fleet} is already being ingested into {lake_root} by {holder}; "
                "stop that ingest first (one ingest per fleet)"
            )
        digest = hashlib.sha256(client_id.encode()).hexdigest()[:16]
        client_lock = lake_root / VIBRATION_TABLE / f".ingest-client-{digest}.lock"
        with _held_lock(client_lock, wait=False) as (_, other):
            if other is not None:
                raise LeaseError(
                    f"MQTT client id {client_id!r} is already used by the ingest of another fleet into {lake_root} "
                    f"({other}); give each fleet its own client id (TINYMLOPS_MQTT__CLIENT_ID)"
                )
            log.info("holding the ingest lease of fleet %s (%s)", fleet, path)
            yield path


@contextlib.contextmanager
def import_lock(lake_root: Path, fleet: str) -> Iterator[Path]:
    """Hold the fleet's import lock (``.import.lock``, a ``flock`` beside the ingest lease), waiting for it.

    An import checks what the lake holds (the file's source, the device's last seq) and then
    writes; two imports of a fleet at once would both pass the check and write the file twice.
    Imports are short, so a second one waits instead of refusing.

    Raises:
        LakeError: The fleet name is invalid or the lock file cannot be created.
    """
    with _held_lock(fleet_dir(lake_root, fleet) / ".import.lock", wait=True) as (path, _):
        yield path


@contextlib.contextmanager
def _held_lock(path: Path, *, wait: bool) -> Iterator[tuple[Path, str | None]]:
    """Take an exclusive ``flock`` on a lock file and write the holder (pid, host, since) into it.

    Yields:
        The lock file, and None once it is held; without ``wait``, when another process holds it,
        the description of that holder instead (the lock is then not held).
    """
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise LakeError(f"cannot create the lock file {path}: {exc.strerror or exc}") from exc
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            busy = None
        except BlockingIOError:
            busy = _lease_holder(fd)
        if busy is not None:
            if not wait:
                yield path, busy
                return
            log.info("waiting for %s, held by %s", path, busy)
            fcntl.flock(fd, fcntl.LOCK_EX)
        since = dt.datetime.now(tz=dt.UTC).isoformat(timespec="seconds")
        holder = {"pid": os.getpid(), "host": socket.gethostname(), "since": since}
        os.ftruncate(fd, 0)
        os.pwrite(fd, json.dumps(holder).encode(), 0)
        yield path, None
    finally:
        os.close(fd)  # releases the lock


def _lease_holder(fd: int) -> str:
    """Describe the holder of a lease from its lock file ("pid 123 on host since 2026-...")."""
    try:
        holder = json.loads(os.pread(fd, 4096, 0))
        return f"pid {holder['pid']} on {holder['host']} since {holder['since']}"
    except (OSError, ValueError, KeyError, TypeError):  # the holder is between taking the lock and writing
        return "another process (starting)"


def write_windows(lake_root: Path, batch: WindowBatch) -> list[Path]:
    """Write a batch durably, one file per (fleet, UTC date, UTC hour) partition.

    Returns:
        The written files.

    Raises:
        LakeError: A fleet name is invalid or a file could not be written (nothing of the batch is visible).
    """
    tables = [(table, partition_dir(lake_root, *key)) for key, table in batch.partitions().items()]
    return write_parquet_files(tables, lake_root)


@dataclass(frozen=True)
class QuarantineRecord:
    """A rejected message: why, and enough of it to recognise it (its size, sha256 and first bytes)."""

    received_at_us: int
    topic: str
    reason: str
    payload_bytes: int
    payload_sha256: str
    payload_prefix: bytes

    @classmethod
    def of(
        cls, received_at_us: int, topic: str, reason: str, payload: bytes | bytearray, prefix_bytes: int
    ) -> QuarantineRecord:
        """The record of ``payload``, keeping only its first ``prefix_bytes`` bytes."""
        digest = hashlib.sha256(payload).hexdigest()
        return cls(received_at_us, topic, reason, len(payload), digest, bytes(payload[:prefix_bytes]))


def write_quarantine(quarantine_root: Path, records: Sequence[QuarantineRecord]) -> Path | None:
    """Write rejected messages durably to the quarantine; returns the file, or None if nothing to write."""
    if not records:
        return None
    table = pa.table(
        [
            pa.array([r.received_at_us for r in records], pa.int64()).cast(pa.timestamp("us", tz="UTC")),
            pa.array([r.topic for r in records], pa.string()),
            pa.array([r.reason for r in records], pa.string()),
            pa.array([r.payload_bytes for r in records], pa.int64()),
            pa.array([r.payload_sha256 for r in records], pa.string()),
            pa.array([r.payload_prefix for r in records], pa.binary()),
        ],
        schema=QUARANTINE_SCHEMA,
    )
    return write_parquet_atomic(table, quarantine_root / f"date={utc_date(records[0].received_at_us)}")


def quarantine_files(quarantine_root: Path) -> list[Path]:
    """The quarantine's files, oldest first (their names start with the UTC time they were written)."""
    if not quarantine_root.exists():
        return []
    return sorted(quarantine_root.glob("date=*/part-*.parquet"), key=lambda path: path.name)


def rotate_quarantine(quarantine_root: Path, max_bytes: int) -> list[Path]:
    """Delete the oldest quarantine files until the rest take at most ``max_bytes``; the newest always stays.

    Returns:
        The deleted files.
    """
    files = quarantine_files(quarantine_root)
    sizes = [path.stat().st_size for path in files]
    total = sum(sizes)
    removed: list[Path] = []
    for path, size in zip(files[:-1], sizes[:-1], strict=True):
        if total <= max_bytes:
            break
        path.unlink(missing_ok=True)
        total -= size
        removed.append(path)
        with contextlib.suppress(OSError):  # the date directory, once its last file is gone
            path.parent.rmdir()
    if removed:
        log.warning("quarantine over %d bytes: deleted its %d oldest files", max_bytes, len(removed))
    return removed


def read_quarantine(quarantine_root: Path) -> pa.Table:
    """Return every quarantined message (empty table if there are none)."""
    files = quarantine_files(quarantine_root)
    if not files:
        return QUARANTINE_SCHEMA.empty_table()
    return ds.dataset(files, schema=QUARANTINE_SCHEMA, format="parquet").to_table()


def _hour_range(start: dt.datetime | None, end: dt.datetime | None) -> tuple[str, str]:
    """Return the inclusive ("YYYY-MM-DD/HH") bounds of the hour partitions a time range touches."""
    low = start.astimezone(dt.UTC).strftime("%Y-%m-%d/%H") if start is not None else ""
    high = end.astimezone(dt.UTC).strftime("%Y-%m-%d/%H") if end is not None else "~"
    return low, high


def _read_manifest(manifest: Path) -> tuple[str, list[str]] | None:
    """Return a compaction manifest's (output, replaced files), or None when it is torn.

    A torn manifest was never flushed, so its output was never renamed into place.
    """
    try:
        plan = json.loads(manifest.read_text())
        return str(plan["output"]), [str(name) for name in plan["replaced"]]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def _superseded(hour_dir: Path, listed: set[str]) -> set[str]:
    """Return the names of files a finished compaction replaced but did not yet delete (see :func:`compact_lake`).

    A compaction counts as finished when its output is among ``listed``, the names of one listing of
    the directory taken *before* the manifests are read: judged by a later ``exists()``, an output
    renamed into place between the listing and the check would hide the replaced files while the
    listing lacks the output (windows missing), or the other way round (windows twice).
    """
    replaced: set[str] = set()
    for manifest in hour_dir.glob(".compaction-*.json"):
        plan = _read_manifest(manifest)
        if plan is not None and plan[0] in listed:
            replaced.update(plan[1])
    return replaced


def _hour_dirs(lake_root: Path, fleet: str | None, start: dt.datetime | None, end: dt.datetime | None) -> list[Path]:
    root = lake_root / VIBRATION_TABLE
    if not root.is_dir():
        return []
    low, high = _hour_range(start, end)
    fleet_dirs = [root / f"fleet={fleet}"] if fleet is not None else sorted(root.glob("fleet=*"))
    dirs = []
    for fleet_dir in fleet_dirs:
        for date_dir in sorted(fleet_dir.glob("date=*")):
            date = date_dir.name.removeprefix("date=")
            if not low[:10] <= date <= high[:10]:
                continue
            dirs += [d for d in sorted(date_dir.glob("hour=*")) if low <= f"{date}/{d.name[5:]}" <= high]
    return dirs


def lake_files(
    lake_root: Path, *, fleet: str | None = None, start: dt.datetime | None = None, end: dt.datetime | None = None
) -> list[Path]:
    """Return the visible Parquet files of the hour partitions that a fleet and a time range touch.

    Args:
        lake_root: Lake root.
        fleet: Only this fleet (all fleets if None).
        start: Only hours that end after this time (timezone-aware).
        end: Only hours that start at or before this time.
    """
    files = []
    for hour_dir in _hour_dirs(lake_root, fleet, start, end):
        listed = {f.name for f in hour_dir.glob("*.parquet") if not f.name.startswith(".")}
        skip = _superseded(hour_dir, listed)
        files += [hour_dir / name for name in sorted(listed - skip)]
    return files


def _read_lake(
    lake_root: Path,
    read: Callable[[ds.Dataset], _Read],
    *,
    fleet: str | None = None,
    start: dt.datetime | None = None,
    end: dt.datetime | None = None,
    select: Callable[[Path], bool] | None = None,
) -> _Read | None:
    """Read the visible files as one snapshot, even while a compaction deletes the files it merged.

    A compaction deletes the files it merged only once its output is visible, and its manifest only
    after them (see :func:`compact_lake`). So a resolved file set either reads in full, and then
    holds every window exactly once (see :func:`_superseded`), or names a deleted file, and then
    the read fails with FileNotFoundError. The read then starts over from a fresh listing while
    holding compaction off: a shared ``flock`` on the compaction lock waits for the running pass
    to end and keeps the next one waiting until the read is done. The common read takes no lock.

    Args:
        lake_root: Lake root.
        read: Reads what the caller needs from the dataset; called again from scratch on a retry.
        fleet: Only this fleet (all fleets if None).
        start: Only hours that end after this time.
        end: Only hours that start at or before this time.
        select: Only the files it keeps.

    Returns:
        What ``read`` returned, or None when no file is visible.

    Raises:
        LakeError: The lake cannot be read, or a file vanished while no compaction could run.
    """

    def read_once() -> _Read | None:
        dataset = _vibration_dataset(lake_root, fleet=fleet, start=start, end=end, select=select)
        return None if dataset is None else read(dataset)

    try:
        return read_once()
    except FileNotFoundError as exc:  # a compaction deleted a merged file after the listing
        log.debug("a lake file vanished under a read, reading again with compaction held off: %s", exc)
    with _compaction_held_off(lake_root):
        try:
            return read_once()
        except FileNotFoundError as exc:
            raise LakeError(
                f"cannot read the lake at {lake_root}: a file vanished while no compaction ran ({exc}); "
                "something else deletes lake files"
            ) from exc


@contextlib.contextmanager
def _compaction_held_off(lake_root: Path) -> Iterator[None]:
    """Hold a shared ``flock`` on the compaction lock: wait for a running pass, keep the next one waiting."""
    try:
        fd = os.open(lake_root / VIBRATION_TABLE / ".compaction.lock", os.O_RDONLY)
    except FileNotFoundError:  # no compaction ever ran here
        yield
        return
    try:
        fcntl.flock(fd, fcntl.LOCK_SH)
        yield
    finally:
        os.close(fd)  # releases the lock


def _vibration_dataset(
    lake_root: Path,
    *,
    fleet: str | None = None,
    start: dt.datetime | None = None,
    end: dt.datetime | None = None,
    select: Callable[[Path], bool] | None = None,
) -> ds.Dataset | None:
    files = [f for f in lake_files(lake_root, fleet=fleet, start=start, end=end) if select is None or select(f)]
    if not files:
        return None
    root = lake_root / VIBRATION_TABLE
    try:
        return ds.dataset(
            [str(f) for f in files],
            format="parquet",
            partitioning=PARTITIONING,
            partition_base_dir=str(root),
            schema=DATASET_SCHEMA,
        )
    except FileNotFoundError:
        raise  # vanished under a compaction: _read_lake reads again
    except (OSError, pa.ArrowInvalid) as exc:
        raise LakeError(f"cannot open lake at {root}: {exc}") from exc


Stream = tuple[str, int]
"""A device's boot epoch: (device, epoch); its seqs count its windows from 0."""


class SeqIndex:
    """The (device, epoch, seq) keys stored in the lake, as sorted disjoint seq ranges per (device, epoch).

    A device numbers the windows of a boot epoch one by one, so their stored seqs form a few long
    runs: memory grows with the gaps in a stream (windows sampled offline, lost on the way), not
    with the number of windows. A stream with more than ``max_ranges_per_stream`` gaps forgets its
    oldest ranges, so memory stays bounded even when its seqs are never contiguous; the index then
    no longer vouches for the seqs below what it forgot (:meth:`vouches`).
    """

    def __init__(self, max_ranges_per_stream: int = 4096) -> None:
        self.max_ranges_per_stream = max_ranges_per_stream
        self._starts: dict[Stream, list[int]] = {}
        self._ends: dict[Stream, list[int]] = {}  # inclusive
        self._floor: dict[Stream, int] = {}  # seqs below were forgotten

    def contains(self, device: str, epoch: int, seq: int) -> bool:
        """Whether the window (device, epoch, seq) is recorded."""
        starts = self._starts.get((device, epoch))
        if not starts:
            return False
        i = bisect.bisect_right(starts, seq) - 1
        return i >= 0 and seq <= self._ends[(device, epoch)][i]

    def vouches(self, device: str, epoch: int, seq: int) -> bool:
        """Whether the index knows if this key is stored (False: below the ranges it forgot)."""
        return seq >= self._floor.get((device, epoch), 0)

    def add(self, device: str, epoch: int, seq: int) -> None:
        """Record one stored window."""
        self.add_range(device, epoch, seq, seq)

    def add_range(self, device: str, epoch: int, low: int, high: int) -> None:
        """Record the stored windows ``low..high`` (inclusive) of one device's boot epoch."""
        stream = (device, epoch)
        starts = self._starts.setdefault(stream, [])
        ends = self._ends.setdefault(stream, [])
        if not starts or low > ends[-1] + 1:  # the stream goes on after a gap
            starts.append(low)
            ends.append(high)
            self._bound(stream, starts, ends)
            return
        if low >= starts[-1]:  # the commonest case: the stream goes on without a gap
            ends[-1] = max(ends[-1], high)
            return
        first = bisect.bisect_left(ends, low - 1)  # first range ending at or after low - 1
        stop = bisect.bisect_right(starts, high + 1)  # ranges before stop start at or before high + 1
        if first < stop:
            low, high = min(low, starts[first]), max(high, ends[stop - 1])
        starts[first:stop] = [low]
        ends[first:stop] = [high]
        self._bound(stream, starts, ends)

    def _bound(self, stream: Stream, starts: list[int], ends: list[int]) -> None:
        excess = len(starts) - self.max_ranges_per_stream
        if excess > 0:
            self._floor[stream] = max(self._floor.get(stream, 0), ends[excess - 1] + 1)
            del starts[:excess], ends[:excess]

    def update(self, devices: Sequence[str], epochs: npt.NDArray[np.int64], seqs: npt.NDArray[np.int64]) -> None:
        """Record many stored windows at once (any order, duplicates allowed)."""
        if len(seqs) == 0:
            return
        names, codes = np.unique(np.asarray(devices, dtype=object).astype(str), return_inverse=True)
        epochs, seqs = np.asarray(epochs, dtype=np.int64), np.asarray(seqs, dtype=np.int64)
        order = np.lexsort((seqs, epochs, codes))
        codes, epochs, seqs = codes[order], epochs[order], seqs[order]
        breaks = np.flatnonzero((np.diff(codes) != 0) | (np.diff(epochs) != 0) | (np.diff(seqs) > 1)) + 1
        for start, stop in zip(np.r_[0, breaks], np.r_[breaks, len(codes)], strict=True):
            self.add_range(str(names[codes[start]]), int(epochs[start]), int(seqs[start]), int(seqs[stop - 1]))

    def last(self, device: str, epoch: int) -> int | None:
        """Return the highest stored seq of a device's boot epoch, or None."""
        ends = self._ends.get((device, epoch))
        return ends[-1] if ends else None

    def ranges(self) -> int:
        """Return how many ranges the index holds (its memory is proportional)."""
        return sum(len(starts) for starts in self._starts.values())

    def range_rows(self) -> Iterator[tuple[str, int, int, int, int]]:
        """Yield every range as (device, epoch, first seq, last seq, the stream's forgotten-below seq)."""
        for stream, starts in self._starts.items():
            floor = self._floor.get(stream, 0)
            for start, end in zip(starts, self._ends[stream], strict=True):
                yield stream[0], stream[1], start, end, floor

    def forget_below(self, device: str, epoch: int, floor: int) -> None:
        """No longer vouch for the seqs of a stream below ``floor`` (restoring a saved index)."""
        if floor > self._floor.get((device, epoch), 0):
            self._floor[(device, epoch)] = floor


class Seen(enum.Enum):
    """What the dedupe index says of a received window."""

    NEW = "new"
    DUPLICATE = "duplicate"  # the key is stored with the same content: a redelivery
    CONFLICT = "conflict"  # the key is stored with other content: a reused seq
    UNVERIFIABLE = "unverifiable"  # the key may be stored, and its content is beyond the index


class _DigestRing:
    """The content digests of one stream's most recent seqs, in two fixed arrays (slot = seq mod size)."""

    def __init__(self, size: int) -> None:
        self.seqs = np.full(size, -1, np.int64)
        self.digests = np.zeros(size, np.int64)

    def get(self, seq: int) -> int | None:
        slot = seq % len(self.seqs)
        return int(self.digests[slot]) if self.seqs[slot] == seq else None

    def put(self, seq: int, digest: int) -> None:
        slot = seq % len(self.seqs)
        self.seqs[slot] = seq
        self.digests[slot] = digest

    def put_many(self, seqs: npt.NDArray[np.int64], digests: npt.NDArray[np.int64]) -> None:
        slots = seqs % len(self.seqs)
        self.seqs[slots] = seqs
        self.digests[slots] = digests


class DedupeIndex:
    """Every key in the lake, and the content digests of the recent ones: the ingest's exactly-once check.

    The keys (device, epoch, seq) of the whole lake are held as seq ranges (:class:`SeqIndex`), so a
    window stored at any time, whatever date its sender's clock gave it, is recognised. The content
    digest of each stream's ``digests_per_stream`` most recent seqs (of the
    ``digest_streams_per_device`` boot epochs of a device that appeared last) is held beside them,
    in fixed arrays: a repeated key is a redelivery only if its digest matches. A repeated key whose digest is no
    longer held cannot be told apart from a reused one, and neither can a seq below what a
    stream's range bound forgot: both are :attr:`Seen.UNVERIFIABLE`, for the quarantine.
    """

    def __init__(
        self, *, max_ranges_per_stream: int = 4096, digests_per_stream: int = 4096, digest_streams_per_device: int = 4
    ) -> None:
        self.keys = SeqIndex(max_ranges_per_stream)
        # Every lake file written before this time is in the index (see save_key_snapshot).
        self.covers_before_us = 0
        self.digests_per_stream = digests_per_stream
        self.digest_streams_per_device = digest_streams_per_device
        self._rings: dict[str, dict[int, _DigestRing]] = {}

    def check(self, device: str, epoch: int, seq: int, digest: int) -> Seen:
        """Say whether a received window is new, a redelivery, a reused key or beyond the index."""
        if not self.keys.vouches(device, epoch, seq):
            return Seen.UNVERIFIABLE
        if not self.keys.contains(device, epoch, seq):
            return Seen.NEW
        ring = self._rings.get(device, {}).get(epoch)
        stored = ring.get(seq) if ring is not None else None
        if stored is None:
            return Seen.UNVERIFIABLE
        return Seen.DUPLICATE if stored == digest else Seen.CONFLICT

    def add(self, device: str, epoch: int, seq: int, digest: int) -> None:
        """Record one stored window and its digest."""
        self.keys.add(device, epoch, seq)
        self._ring(device, epoch).put(seq, digest)

    def update(
        self,
        devices: Sequence[str],
        epochs: npt.NDArray[np.int64],
        seqs: npt.NDArray[np.int64],
        digests: npt.NDArray[np.int64],
        with_digest: npt.NDArray[np.bool_],
    ) -> None:
        """Record many stored windows; the digests of the rows ``with_digest``, in row order (later wins)."""
        self.keys.update(devices, epochs, seqs)
        rows = np.flatnonzero(with_digest)
        if len(rows) == 0:
            return
        names, codes = np.unique(np.asarray(devices, dtype=object)[rows].astype(str), return_inverse=True)
        row_epochs = np.asarray(epochs, dtype=np.int64)[rows]
        order = np.lexsort((row_epochs, codes))  # stable: row order is kept within a stream
        rows, codes, row_epochs = rows[order], codes[order], row_epochs[order]
        breaks = np.flatnonzero((np.diff(codes) != 0) | (np.diff(row_epochs) != 0)) + 1
        seqs, digests = np.asarray(seqs, dtype=np.int64), np.asarray(digests, dtype=np.int64)
        for start, stop in zip(np.r_[0, breaks], np.r_[breaks, len(rows)], strict=True):
            members = rows[start:stop]
            self._ring(str(names[codes[start]]), int(row_epochs[start])).put_many(seqs[members], digests[members])

    def _ring(self, device: str, epoch: int) -> _DigestRing:
        rings = self._rings.get(device)
        if rings is None:
            rings = self._rings[device] = {}
        ring = rings.get(epoch)
        if ring is None:
            ring = rings[epoch] = _DigestRing(self.digests_per_stream)
            if len(rings) > self.digest_streams_per_device:  # forget the epoch first written longest ago
                del rings[next(iter(rings))]
        return ring


KEY_SNAPSHOT = ".dedupe-keys.parquet"
# A file renamed into place after the index listed the lake carries a stamp at most this old.
_SNAPSHOT_MARGIN = dt.timedelta(hours=1)
_FILE_STAMP = re.compile(r"^(?:part|compact)-(\d{8}T\d{12})-")
_KEY_SNAPSHOT_SCHEMA = pa.schema(
    [("device", pa.string()), ("epoch", pa.int64()), ("start", pa.int64()), ("end", pa.int64()),
     ("floor", pa.int64())]
)  # fmt: skip


def _file_stamp_us(path: Path) -> int | None:
    """The UTC time a lake file was written (its name says it: ``part-<stamp>-…``), or None."""
    match = _FILE_STAMP.match(path.name)
    if match is None:
        return None
    written = dt.datetime.strptime(match.group(1), "%Y%m%dT%H%M%S%f").replace(tzinfo=dt.UTC)
    return int(written.timestamp() * 1e6)


def save_key_snapshot(lake_root: Path, fleet: str, index: DedupeIndex) -> Path:
    """Persist the index's keys (seq ranges, a few rows per device) so the next start reads only newer files.

    The snapshot covers every file written before ``index.covers_before_us``: the next
    :func:`load_dedupe_index` reads it and then only the files written since.

    Raises:
        LakeError: The snapshot cannot be written (the previous one stays).
    """
    rows = list(index.keys.range_rows())
    table = pa.table([list(column) for column in zip(*rows, strict=True)] if rows else [[]] * 5,
                     schema=_KEY_SNAPSHOT_SCHEMA)  # fmt: skip
    table = table.replace_schema_metadata({"covers_before_us": str(index.covers_before_us)})
    target = fleet_dir(lake_root, fleet) / KEY_SNAPSHOT
    temporary = target.with_name(f".tmp-{uuid.uuid4().hex[:12]}{KEY_SNAPSHOT}")
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        with open(temporary, "wb") as handle:
            pq.write_table(table, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, target)
        _fsync_path(target.parent)
    except OSError as exc:
        temporary.unlink(missing_ok=True)
        raise LakeError(f"cannot write the dedupe key snapshot {target}: {exc.strerror or exc}") from exc
    return target


def _read_key_snapshot(lake_root: Path, fleet: str) -> tuple[pa.Table, int] | None:
    """Return the fleet's keys snapshot and the time before which it covers every file (None: none usable)."""
    path = fleet_dir(lake_root, fleet) / KEY_SNAPSHOT
    if not path.exists():
        return None
    try:
        table = pq.read_table(path)
        return table, int((table.schema.metadata or {})[b"covers_before_us"])
    except (OSError, pa.ArrowInvalid, KeyError, ValueError) as exc:  # read the whole lake instead
        log.warning("ignoring the dedupe key snapshot %s: %s", path, exc)
        return None


def _restore_keys(keys: SeqIndex, snapshot: pa.Table) -> None:
    """Record a snapshot's ranges (see :func:`save_key_snapshot`) in ``keys``."""
    for device, epoch, start, end, floor in zip(*(snapshot[c].to_pylist() for c in snapshot.column_names), strict=True):
        keys.add_range(device, epoch, start, end)
        keys.forget_below(device, epoch, floor)


def load_dedupe_index(
    lake_root: Path, fleet: str, horizon_days: float, *, now: dt.datetime | None = None, **limits: int
) -> DedupeIndex:
    """Read a fleet's keys, and the digests of the windows that arrived within the horizon, into an index.

    Every key of the fleet is loaded, whatever the windows' own timestamps: the keys snapshot
    (:func:`save_key_snapshot`) and then every file written since it (a file's name carries its
    write time), or every file when there is no snapshot. Digests come from the files written
    within the horizon, for the rows that arrived (``ingested_at``) within it: a horizon of arrival,
    never of the sender's clock. Only narrow columns are read; rows written before the ``epoch``
    column count as epoch 0, and before the ``digest`` column as content unknown.

    Args:
        lake_root: Lake root.
        fleet: Fleet name.
        horizon_days: Load the digests of the windows ingested in the last this many days.
        now: Reference time, default the current time.
        **limits: :class:`DedupeIndex` bounds.

    Raises:
        LakeError: The lake cannot be read.
    """
    now = now or dt.datetime.now(tz=dt.UTC)
    since_us = int((now - dt.timedelta(days=horizon_days)).timestamp() * 1e6)
    covers_before_us = int((dt.datetime.now(tz=dt.UTC) - _SNAPSHOT_MARGIN).timestamp() * 1e6)
    snapshot = _read_key_snapshot(lake_root, fleet)

    def fresh_index() -> DedupeIndex:
        index = DedupeIndex(**limits)
        index.covers_before_us = covers_before_us
        if snapshot is not None:
            _restore_keys(index.keys, snapshot[0])
        return index

    def needed(path: Path) -> bool:
        stamp = _file_stamp_us(path)
        return snapshot is None or stamp is None or stamp >= min(snapshot[1], since_us)

    def read(dataset: ds.Dataset) -> DedupeIndex:
        index = fresh_index()  # from scratch: _read_lake reads again after a compaction deleted a file
        try:
            for batch in dataset.to_batches(columns=["device", "epoch", "seq", "digest", "ingested_at"]):
                digest = batch.column("digest")
                arrived = batch.column("ingested_at").cast(pa.int64()).fill_null(0).to_numpy()
                with_digest = digest.is_valid().to_numpy(zero_copy_only=False) & (arrived >= since_us)
                index.update(
                    batch.column("device").to_pylist(),
                    batch.column("epoch").fill_null(0).to_numpy(),
                    batch.column("seq").to_numpy(),
                    digest.fill_null(0).to_numpy(),
                    with_digest,
                )
        except FileNotFoundError:
            raise
        except (OSError, pa.ArrowInvalid) as exc:
            raise LakeError(f"cannot read the keys of fleet {fleet} from {lake_root}: {exc}") from exc
        return index

    return _read_lake(lake_root, read, fleet=fleet, select=needed) or fresh_index()


def last_seq(lake_root: Path, fleet: str, device: str, epoch: int = 0) -> int | None:
    """Return the highest seq stored for a device's boot epoch (rows without an epoch count as 0), or None."""
    table = _read_lake(
        lake_root,
        lambda dataset: dataset.to_table(columns=["epoch", "seq"], filter=pc.field("device") == device),
        fleet=fleet,
    )
    if table is None:
        return None
    mask = pc.equal(pc.fill_null(table["epoch"], 0), epoch)
    return pc.max(pc.filter(table["seq"], mask)).as_py()


def read_keys(lake_root: Path, fleet: str) -> pa.Table:
    """Return the ``device``, ``epoch`` and ``seq`` of every window of a fleet (one row per stored window)."""
    table = _read_lake(lake_root, lambda dataset: dataset.to_table(columns=["device", "epoch", "seq"]), fleet=fleet)
    if table is None:
        return pa.table(
            {
                "device": pa.array([], pa.string()),
                "epoch": pa.array([], pa.int64()),
                "seq": pa.array([], pa.int64()),
            }
        )
    return table.set_column(1, "epoch", pc.fill_null(table["epoch"], 0))


def known_sources(lake_root: Path, fleet: str, device: str) -> set[str]:
    """Return the distinct ``source`` values already stored for one device."""
    table = _read_lake(
        lake_root,
        lambda dataset: dataset.to_table(columns=["source"], filter=pc.field("device") == device),
        fleet=fleet,
    )
    return set() if table is None else set(pc.unique(table["source"]).to_pylist())


_NOT_GIVEN = np.zeros(0, np.float32)


@dataclass(frozen=True)
class LakeWindows:
    """Windows read from the lake, in physical units, with their metadata row by row.

    ``rpm`` and ``load`` are the operating condition per row, NaN where not known (a window sent
    without it, a file written before the columns); left out, every row's is not known.
    """

    samples: npt.NDArray[np.float32]
    sample_rate_hz: int
    fleet: npt.NDArray[np.str_]
    device: npt.NDArray[np.str_]
    seq: npt.NDArray[np.int64]
    timestamp_us: npt.NDArray[np.int64]
    label: npt.NDArray[np.object_]
    source: npt.NDArray[np.object_]
    rpm: npt.NDArray[np.float32] = field(default_factory=lambda: _NOT_GIVEN)
    load: npt.NDArray[np.float32] = field(default_factory=lambda: _NOT_GIVEN)

    def __post_init__(self) -> None:
        for name in ("rpm", "load"):
            value = getattr(self, name)
            if value is _NOT_GIVEN:
                value = np.full(len(self), np.nan, np.float32)
            value = np.asarray(value, dtype=np.float32)
            if value.shape != (len(self),):
                raise ValueError(f"{name} has shape {value.shape}, expected ({len(self)},): one per window")
            object.__setattr__(self, name, value)  # frozen: set once, here

    def __len__(self) -> int:
        return int(self.samples.shape[0])

    def select(self, mask: npt.NDArray[np.bool_]) -> LakeWindows:
        """Return the rows where ``mask`` is true."""
        return LakeWindows(
            self.samples[mask],
            self.sample_rate_hz,
            self.fleet[mask],
            self.device[mask],
            self.seq[mask],
            self.timestamp_us[mask],
            self.label[mask],
            self.source[mask],
            self.rpm[mask],
            self.load[mask],
        )


def read_windows(
    lake_root: Path,
    *,
    fleet: str | None = None,
    devices: Iterable[str] | None = None,
    start: dt.datetime | None = None,
    end: dt.datetime | None = None,
    labels: Iterable[str] | None = None,
    window_samples: int | None = None,
) -> LakeWindows:
    """Read windows for a fleet, a device set, a time range and labels, ordered by device, then time.

    Args:
        lake_root: Lake root.
        fleet: Only this fleet (all fleets if None).
        devices: Only these devices.
        start: Only windows at or after this time (timezone-aware).
        end: Only windows before this time.
        labels: Only these labels (``"normal"``, fault names); unlabelled MQTT windows count as None.
        window_samples: Expected samples per window; rows of other lengths are an error.

    Returns:
        The matching windows (possibly none).

    Raises:
        LakeError: The lake cannot be read, or windows of different lengths or rates were selected.
    """
    expr = pc.scalar(True)
    if fleet is not None:
        expr &= pc.field("fleet") == fleet
    if devices is not None:
        expr &= pc.field("device").isin(list(devices))
    if start is not None:
        expr &= pc.field("timestamp") >= pa.scalar(start, pa.timestamp("us", tz="UTC"))
    if end is not None:
        expr &= pc.field("timestamp") < pa.scalar(end, pa.timestamp("us", tz="UTC"))
    if labels is not None:
        expr &= pc.field("label").isin(list(labels))
    width = window_samples or 0
    selected = _read_lake(lake_root, lambda dataset: dataset.to_table(filter=expr), fleet=fleet, start=start, end=end)
    if selected is None or selected.num_rows == 0:
        return _empty_windows(width)
    table = selected.sort_by([("fleet", "ascending"), ("device", "ascending"), ("timestamp", "ascending")])
    lengths = [n // 2 for n in pc.unique(pc.binary_length(table["samples"])).to_pylist()]
    rates = pc.unique(table["sample_rate_hz"]).to_pylist()
    if len(lengths) != 1 or (window_samples is not None and lengths[0] != window_samples):
        raise LakeError(
            f"selected windows have lengths {sorted(lengths)}, expected one length {window_samples or ''}".strip()
        )
    if len(rates) != 1:
        raise LakeError(f"selected windows have sample rates {sorted(rates)} Hz; select one rate")
    column = table["samples"].combine_chunks()
    offsets = np.frombuffer(column.buffers()[1], dtype=np.int32, count=len(column) + 1, offset=4 * column.offset)
    flat = np.frombuffer(
        column.buffers()[2], dtype="<i2", count=(offsets[-1] - offsets[0]) // 2, offset=int(offsets[0])
    )
    samples = flat.reshape(table.num_rows, lengths[0]).astype(np.float32)
    with np.errstate(over="ignore"):  # a corrupt scale gives inf, which window_problems() reports
        samples *= table["scale"].to_numpy(zero_copy_only=False).astype(np.float32)[:, None]
    return LakeWindows(
        samples=samples,
        sample_rate_hz=int(rates[0]),
        fleet=np.asarray(table["fleet"].to_pylist()),
        device=np.asarray(table["device"].to_pylist()),
        seq=table["seq"].to_numpy(),
        timestamp_us=table["timestamp"].cast(pa.int64()).to_numpy(),
        label=np.asarray(table["label"].to_pylist(), dtype=object),
        source=np.asarray(table["source"].to_pylist(), dtype=object),
        rpm=_condition(table["rpm"]),
        load=_condition(table["load"]),
    )


def _condition(column: pa.ChunkedArray) -> npt.NDArray[np.float32]:
    """An rpm or load column as float32, NaN where not known (null: a file written before the column)."""
    return np.asarray(pc.fill_null(column, np.nan).to_numpy(), dtype=np.float32)


def range_problem(samples: npt.NDArray[np.int16], scale: float, max_abs_g: float) -> str | None:
    """Say why a window's samples x scale are outside the sensor's physical full scale, if they are.

    Args:
        samples: The window's int16 samples.
        scale: Physical units (g) per LSB.
        max_abs_g: The largest |sample x scale| a real sensor reports.

    Returns:
        One line starting ``out of range:`` or ``invalid scale``, or None when the window is within range.
    """
    if not np.isfinite(scale) or scale <= 0:
        return f"invalid scale {scale}: must be a finite positive number"
    peak = float(np.abs(samples.astype(np.int32)).max(initial=0)) * float(scale)  # float64: never overflows
    if peak > max_abs_g:
        return f"out of range: peak |sample x scale| {peak:.3g} g above the sensor full scale {max_abs_g:g} g"
    return None


def window_problems(samples: npt.NDArray[np.float32], max_abs_g: float) -> list[str | None]:
    """Say, row by row, why windows in physical units cannot be trained on (None for a usable row).

    Args:
        samples: Windows in g, one per row, as :func:`read_windows` returns them.
        max_abs_g: The largest |sample| a real sensor reports.

    Returns:
        Per row: ``"non-finite samples: N"``, ``"out of range: ..."`` or None.
    """
    bad_count = np.count_nonzero(~np.isfinite(samples), axis=1)
    peaks = np.abs(np.where(np.isfinite(samples), samples, 0)).max(axis=1, initial=0)
    problems: list[str | None] = []
    for bad, peak in zip(bad_count.tolist(), peaks.tolist(), strict=True):
        if bad:
            problems.append(f"non-finite samples: {bad} NaN or infinite of {samples.shape[1]}")
        elif peak > max_abs_g:
            problems.append(f"out of range: peak |sample| {peak:.3g} g above the sensor full scale {max_abs_g:g} g")
        else:
            problems.append(None)
    return problems


def _empty_windows(width: int) -> LakeWindows:
    empty_str = np.asarray([], dtype=str)
    return LakeWindows(
        np.zeros((0, width), np.float32),
        0,
        empty_str,
        empty_str,
        np.zeros(0, np.int64),
        np.zeros(0, np.int64),
        np.zeros(0, object),
        np.zeros(0, object),
        np.zeros(0, np.float32),
        np.zeros(0, np.float32),
    )


def lake_summary(lake_root: Path) -> pa.Table:
    """Return window counts per fleet, device and label."""
    table = _read_lake(lake_root, lambda dataset: dataset.to_table(columns=["fleet", "device", "label", "seq"]))
    if table is None:
        return pa.table(
            {
                "fleet": pa.array([], pa.string()),
                "device": pa.array([], pa.string()),
                "label": pa.array([], pa.string()),
                "windows": pa.array([], pa.int64()),
            }
        )
    grouped = table.group_by(["fleet", "device", "label"], use_threads=False).aggregate([("seq", "count")])
    return grouped.rename_columns(["fleet", "device", "label", "windows"]).sort_by(
        [("fleet", "ascending"), ("device", "ascending")]
    )


@dataclass(frozen=True)
class CompactionReport:
    """What one compaction pass did."""

    partitions: int
    files_before: int
    files_after: int
    rows: int
    stale_temporaries_removed: int

    def to_dict(self) -> dict[str, int]:
        """Return the figures as a plain dict (flow results, CLI output)."""
        return {
            "partitions": self.partitions,
            "files_before": self.files_before,
            "files_after": self.files_after,
            "rows": self.rows,
            "stale_temporaries_removed": self.stale_temporaries_removed,
        }


def compact_lake(
    lake_root: Path,
    *,
    fleet: str | None = None,
    closed_before: dt.datetime | None = None,
    stale_after: dt.timedelta = dt.timedelta(minutes=10),
) -> CompactionReport:
    """Merge the files of every closed hour partition into one file each, crash-safely.

    The merged file is written and flushed under a hidden name next to a hidden manifest that
    names it and the files it replaces; then it is renamed into place and the replaced files are
    deleted, the manifest last. Readers skip files that a manifest with a visible output replaces, so
    at every instant, crash included, each window is visible exactly once; a reader that listed a
    file before its deletion reads again with compaction held off (see :func:`_read_lake`). The
    next pass finishes or rolls back what a crashed pass left, and removes temporary files of writes
    killed more than ``stale_after`` ago. One pass runs at a time, and none while such a reader reads
    again (an ``flock`` on ``.compaction.lock``: exclusive for a pass, shared for the reader).

    Args:
        lake_root: Lake root.
        fleet: Only this fleet (all fleets if None).
        closed_before: Compact the hours that ended at or before this time (default: one hour ago,
            so a late window rarely lands in an hour already compacted; if one does, it is merged
            on the next pass).
        stale_after: Age after which a temporary file cannot belong to a running write.

    Returns:
        Partitions compacted, files before and after, rows merged, stale temporaries removed.

    Raises:
        LakeError: A file could not be read or written; what was compacted before stays compacted
            and nothing is lost or duplicated.
    """
    closed_before = closed_before or dt.datetime.now(tz=dt.UTC) - dt.timedelta(hours=1)
    root = lake_root / VIBRATION_TABLE
    if not root.is_dir():
        return CompactionReport(0, 0, 0, 0, 0)
    partitions = files_before = files_after = rows = stale = 0
    with open(root / ".compaction.lock", "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        for hour_dir in _hour_dirs(lake_root, fleet, None, closed_before - dt.timedelta(hours=1)):
            hour_start = dt.datetime.strptime(f"{hour_dir.parent.name[5:]} {hour_dir.name[5:]}", "%Y-%m-%d %H").replace(
                tzinfo=dt.UTC
            )
            if hour_start + dt.timedelta(hours=1) > closed_before:
                continue
            stale += _finish_compactions(hour_dir, time.time() - stale_after.total_seconds())
            files = [f for f in sorted(hour_dir.glob("*.parquet")) if not f.name.startswith(".")]
            if len(files) < 2:
                continue
            rows += _compact_hour(hour_dir, files)
            partitions += 1
            files_before += len(files)
            files_after += 1
    log.info(
        "compacted %d hour partitions of %s: %d files -> %d, %d rows", partitions, fleet or "all fleets",
        files_before, files_after, rows,
    )  # fmt: skip
    return CompactionReport(partitions, files_before, files_after, rows, stale)


def _flush_to_disk(paths: Sequence[Path], directory: Path) -> None:
    """Make written files and a directory's entries durable (one syncfs, else an fsync each)."""
    if _sync_filesystem(directory):
        return
    for path in [*paths, directory]:
        _fsync_path(path)


def _finish_compactions(hour_dir: Path, stale_before_s: float) -> int:
    """Finish (output visible) or roll back (output not visible) crashed compactions; drop stale temporaries."""
    for manifest in hour_dir.glob(".compaction-*.json"):
        plan = _read_manifest(manifest)
        if plan is not None and (hour_dir / plan[0]).exists():
            for name in plan[1]:
                (hour_dir / name).unlink(missing_ok=True)
            _flush_to_disk([], hour_dir)
        manifest.unlink()
    removed = 0
    for temporary in hour_dir.glob(".tmp-*"):
        if temporary.stat().st_mtime < stale_before_s:
            temporary.unlink()
            removed += 1
    return removed


def _compact_hour(hour_dir: Path, files: list[Path]) -> int:
    """Merge ``files`` into one file in ``hour_dir`` (see :func:`compact_lake`); returns the rows merged."""
    stamp = dt.datetime.now(tz=dt.UTC).strftime("%Y%m%dT%H%M%S%f")
    token = uuid.uuid4().hex[:12]
    output = hour_dir / f"compact-{stamp}-{token}.parquet"
    temporary = hour_dir / f".tmp-{output.name}"
    manifest = hour_dir / f".compaction-{token}.json"
    current = temporary
    try:
        expected = pending_bytes = 0
        pending: list[pa.Table] = []
        with pq.ParquetWriter(
            temporary, WINDOW_SCHEMA, compression="zstd", use_dictionary=["device", "label", "source"]
        ) as writer:
            for path in files:
                current = path
                table = conform_to_window_schema(pq.ParquetFile(path).read())
                expected += table.num_rows
                pending.append(table)
                pending_bytes += table.nbytes
                if pending_bytes >= _COMPACT_ROW_GROUP_BYTES:
                    writer.write_table(pa.concat_tables(pending))
                    pending, pending_bytes = [], 0
            if pending:
                writer.write_table(pa.concat_tables(pending))
        current = temporary
        written = pq.ParquetFile(temporary).metadata.num_rows
        if written != expected:
            raise LakeError(f"compacting {hour_dir}: wrote {written} rows, expected {expected}")
        current = manifest
        manifest.write_text(json.dumps({"output": output.name, "replaced": [f.name for f in files]}))
        _flush_to_disk([temporary, manifest], hour_dir)
        current = output
        os.replace(temporary, output)
        _flush_to_disk([], hour_dir)
        for path in files:
            current = path
            path.unlink()
        _flush_to_disk([], hour_dir)
        manifest.unlink()
    except (OSError, pa.ArrowInvalid) as exc:
        temporary.unlink(missing_ok=True)
        if not output.exists():
            manifest.unlink(missing_ok=True)  # rolled back; with the output visible the next pass finishes
        raise LakeError(f"cannot compact {current}: {getattr(exc, 'strerror', None) or exc}") from exc
    return expected
