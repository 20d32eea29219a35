"""Training and evaluation sets from the lake: selection, hold-out, fingerprint, seeded-fault reference.

Training uses normal windows only. Evaluation needs labelled fault windows: imported recordings
(for example CWRU) carry them; a fleet of live sensors usually does not, so
:func:`write_reference_set` adds a seeded-fault reference set simulated at the fleet's
operating point, clearly marked by its source.

A retraining accumulates (:class:`Accumulation`): its normal windows are the union of the windows
its champion trained on (per device, the champion's trained time span at its covered speeds) and the
new, drifted ones, so the operating points the champion covered stay covered. Per operating point (a speed interval;
windows without a usable speed form one point) the new windows supersede the champion's where the
point has any: they are the machine's present state there (a sensor gain change at the same speed
trains on the new data alone, as before). The union is balanced and bounded: each point gets an
equal share of ``max_windows`` (a point with fewer windows keeps them all and its unused share goes
to the others), taken evenly over its devices and time; the hold-out is the last part of each
device at each operating point, so every point is evaluated.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from prefect import task
from prefect.cache_policies import NO_CACHE

from firmware.codec import VibrationWindow
from firmware.sensor import FaultSpec, MachineSimulator, OperatingPoint, quantize
from tasks.lake import LakeWindows, WindowBatch, read_windows, window_problems, write_windows
from tinymlops.contracts.dsp import COVERAGE_GAP, DEFAULT_VALID_RPM, DspSpec, covered
from tinymlops.errors import TinyMLOpsError
from tinymlops.settings import DEFAULT_MAX_ABS_G

log = logging.getLogger(__name__)

NORMAL_LABEL = "normal"
REFERENCE_FAULTS = ("inner_race", "outer_race", "ball", "imbalance", "misalignment")
REFERENCE_SOURCE = "simulator:seeded-fault-reference"
SKIPPED_SHOWN = 5
"""How many skipped windows logs, outcomes and reports name (all are counted)."""
SPEED_NOT_KNOWN = "speed not known"
"""The operating point of windows without a usable speed (one group when balancing)."""


class DatasetError(TinyMLOpsError):
    """The lake selection cannot give a training or evaluation set."""


@dataclass(frozen=True)
class Accumulation:
    """What a retraining keeps of its champion's training data, and how the union is bounded.

    Attributes:
        champion: The champion whose training windows are kept (``NAME/version``), for lineage.
        spans_us: Per device, the first and last timestamp (us) of the windows it trained on.
        coverage_rpm: Speed intervals the champion trained on: operating points of the balance.
        max_windows: Most normal windows of the union (before the hold-out), balanced per operating point.
    """

    champion: str
    spans_us: tuple[tuple[str, int, int], ...]
    coverage_rpm: tuple[tuple[float, float], ...]
    max_windows: int

    def __post_init__(self) -> None:
        if self.max_windows < 1:
            raise DatasetError(f"accumulation cap of {self.max_windows} windows: must be at least 1")

    @classmethod
    def of_champion(
        cls,
        champion: str,
        trained_span_us: Mapping[str, Sequence[int]],
        spec: DspSpec,
        max_windows: int,
    ) -> Accumulation:
        """From a champion bundle's record: its trained spans and its DSP spec's covered speeds."""
        spans = tuple((str(d), int(first), int(last)) for d, (first, last) in sorted(trained_span_us.items()))
        return cls(champion, spans, spec.speed_coverage_rpm, max_windows)

    def lineage(self, balance: Mapping[str, Mapping[str, int]]) -> dict[str, str]:
        """Lineage entries of a model trained on this accumulation (bundle, registry tags ``lineage.*``).

        Args:
            balance: Per operating point, the windows available and kept (:attr:`DatasetSplit.balance`).
        """
        return {
            "accumulated_from": self.champion,
            "accumulated_coverage_rpm": ", ".join(f"{low:.0f}-{high:.0f}" for low, high in self.coverage_rpm) or "-",
            "operating_points": "; ".join(
                f"{name}: {point['kept']} kept of {point['new']} new and {point['champion']} the champion's"
                for name, point in sorted(balance.items())
            ),
        }

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form, recorded as lineage."""
        return {
            "champion": self.champion,
            "spans_us": {device: [first, last] for device, first, last in self.spans_us},
            "coverage_rpm": [list(interval) for interval in self.coverage_rpm],
            "max_windows": self.max_windows,
        }


@dataclass(frozen=True)
class LakeSelection:
    """Which lake windows a training run reads.

    Attributes:
        fleet: Fleet to read.
        devices: Only these devices (None: all).
        start: Only windows at or after this time.
        end: Only windows before this time.
        unlabelled_as_normal: Treat unlabelled live windows as normal (a fleet commissioned
            healthy); labelled fault windows are never trained on.
        accumulate: Also the windows a champion trained on, the union balanced per operating
            point and bounded (a retraining); None: only the windows the filters select.
    """

    fleet: str
    devices: tuple[str, ...] | None = None
    start: dt.datetime | None = None
    end: dt.datetime | None = None
    unlabelled_as_normal: bool = True
    accumulate: Accumulation | None = None

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form, recorded as lineage."""
        return {
            "fleet": self.fleet,
            "devices": list(self.devices) if self.devices else None,
            "start": self.start.isoformat() if self.start else None,
            "end": self.end.isoformat() if self.end else None,
            "unlabelled_as_normal": self.unlabelled_as_normal,
        } | ({"accumulate": self.accumulate.to_dict()} if self.accumulate else {})


@dataclass(frozen=True)
class SkippedWindow:
    """A lake window left out of a dataset because it cannot be trained on."""

    device: str
    seq: int
    reason: str

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form, for outcomes and reports."""
        return {"device": self.device, "seq": self.seq, "reason": self.reason}


def skipped_summary(skipped: tuple[SkippedWindow, ...]) -> dict[str, Any]:
    """Count of skipped windows and the first :data:`SKIPPED_SHOWN` of them, for outcomes and reports."""
    return {"count": len(skipped), "first": [w.to_dict() for w in skipped[:SKIPPED_SHOWN]]}


def drop_unusable(windows: LakeWindows, max_abs_g: float) -> tuple[LakeWindows, tuple[SkippedWindow, ...]]:
    """Drop windows with non-finite or out-of-range samples (older data, another writer), saying which.

    Args:
        windows: Windows read from the lake.
        max_abs_g: The sensor's physical full scale in g.

    Returns:
        The usable windows, and the skipped ones with their reasons, in lake order.
    """
    problems = window_problems(windows.samples, max_abs_g)
    skipped = tuple(
        SkippedWindow(str(device), int(seq), problem)
        for device, seq, problem in zip(windows.device, windows.seq, problems, strict=True)
        if problem is not None
    )
    if skipped:
        log.warning(
            "skipped %d unusable lake windows (device, seq, reason), first: %s",
            len(skipped),
            "; ".join(f"{w.device} {w.seq}: {w.reason}" for w in skipped[:SKIPPED_SHOWN]),
        )
    return windows.select(np.asarray([p is None for p in problems], dtype=bool)), skipped


@dataclass
class DatasetSplit:
    """Normal windows for training and held-out testing, and fault windows by class."""

    train_normal: npt.NDArray[np.float32]
    test_normal: npt.NDArray[np.float32]
    faults: dict[str, npt.NDArray[np.float32]]
    sample_rate_hz: int
    fingerprint: str
    counts: dict[str, int] = field(default_factory=dict)
    skipped: tuple[SkippedWindow, ...] = ()
    trained_span_us: dict[str, tuple[int, int]] = field(default_factory=dict)
    train_rpm: npt.NDArray[np.float32] | None = None
    """Shaft speed of each training window (NaN where not known; None: no speed data at all)."""
    test_rpm: npt.NDArray[np.float32] | None = None
    fault_rpm: dict[str, npt.NDArray[np.float32]] = field(default_factory=dict)
    balance: dict[str, dict[str, int]] = field(default_factory=dict)
    """An accumulating selection's normal windows per operating point: available and kept."""


def time_spans(windows: LakeWindows) -> dict[str, tuple[int, int]]:
    """Per device, the first and last timestamp (us) of its windows."""
    return {
        str(device): (int(windows.timestamp_us[rows].min()), int(windows.timestamp_us[rows].max()))
        for device in np.unique(windows.device)
        for rows in [windows.device == device]
    }


def outside_spans(windows: LakeWindows, spans: Mapping[str, Sequence[int]]) -> npt.NDArray[np.bool_]:
    """Mask of windows outside their device's span (devices without one: every window)."""
    mask = np.ones(len(windows), dtype=bool)
    for device, (first, last) in spans.items():
        rows = windows.device == device
        mask[rows] = (windows.timestamp_us[rows] < first) | (windows.timestamp_us[rows] > last)
    return mask


def fingerprint(windows: LakeWindows, selection: LakeSelection) -> str:
    """sha256 over the selection and every selected window's identity and samples."""
    digest = hashlib.sha256(json.dumps(selection.to_dict(), sort_keys=True).encode())
    for device, seq, source in zip(windows.device, windows.seq, windows.source, strict=True):
        digest.update(f"{device}\x00{seq}\x00{source}\x00".encode())
    digest.update(np.ascontiguousarray(windows.samples).tobytes())
    return digest.hexdigest()


def operating_points(rpm: npt.ArrayLike, coverage_rpm: Sequence[tuple[float, float]]) -> npt.NDArray[np.object_]:
    """Name each window's operating point: a speed interval (``"1029-1530 rpm"``) or :data:`SPEED_NOT_KNOWN`.

    A speed inside one of ``coverage_rpm`` (with the 5 % margin of ``tinymlops.contracts.dsp.covered``) belongs
    to that interval; the other usable speeds are grouped like the DSP spec groups training speeds
    (neighbours within 10 % form one interval); a speed that is missing, not finite or outside the
    valid range has none.
    """
    speeds = np.asarray(rpm, dtype=np.float64).ravel()
    names = np.full(speeds.shape, SPEED_NOT_KNOWN, dtype=object)
    low, high = DEFAULT_VALID_RPM
    with np.errstate(invalid="ignore"):
        open_rows = np.isfinite(speeds) & (speeds >= low) & (speeds <= high)
    for interval in coverage_rpm:
        inside = open_rows & covered(speeds, DspSpec(speed_coverage_rpm=(interval,)))
        names[inside] = _interval_name(interval)
        open_rows &= ~inside
    if open_rows.any():
        order = np.flatnonzero(open_rows)[np.argsort(speeds[open_rows], kind="stable")]
        start = 0
        for i in range(1, order.size + 1):
            if i == order.size or speeds[order[i]] > speeds[order[i - 1]] * (1 + COVERAGE_GAP):
                group = order[start:i]
                names[group] = _interval_name((float(speeds[group[0]]), float(speeds[group[-1]])))
                start = i
    return names


def _interval_name(interval: tuple[float, float]) -> str:
    return f"{interval[0]:.0f}-{interval[1]:.0f} rpm"


def balance_operating_points(
    points: npt.NDArray[np.object_], order_key: npt.NDArray[np.int64], max_windows: int
) -> tuple[npt.NDArray[np.bool_], dict[str, dict[str, int]]]:
    """Keep at most ``max_windows`` rows, an equal share per operating point, evenly over each point's rows.

    Args:
        points: Operating point of each row (:func:`operating_points`).
        order_key: Sort key of the rows (device, then time); a point's kept rows are evenly spaced in it.
        max_windows: The cap.

    Returns:
        The mask of kept rows, and per point the rows available and kept.
    """
    names, counts = np.unique(points.astype(str), return_counts=True)
    quota = dict.fromkeys(names.tolist(), 0)
    left, open_names = max_windows, sorted(names.tolist(), key=lambda n: int(counts[names == n][0]))
    while open_names and left > 0:  # water-filling: the smallest points first, unused shares passed on
        name = open_names.pop(0)
        share = left // (len(open_names) + 1)
        quota[name] = min(int(counts[names == name][0]), max(share, 1))
        left -= quota[name]
    keep = np.zeros(points.size, dtype=bool)
    summary = {}
    for name, count in zip(names.tolist(), counts.tolist(), strict=True):
        rows = np.flatnonzero(points.astype(str) == name)
        rows = rows[np.argsort(order_key[rows], kind="stable")]
        chosen = rows[np.unique(np.linspace(0, rows.size - 1, quota[name]).round().astype(np.int64))]
        keep[chosen] = True
        summary[name] = {"available": count, "kept": int(chosen.size)}
    return keep, summary


def holdout_last(
    windows: LakeWindows, fraction: float, groups: npt.NDArray[np.object_] | None = None
) -> tuple[LakeWindows, LakeWindows]:
    """Split each device's windows in time: the last ``fraction`` of each device is held out.

    A contiguous held-out tail is never adjacent to, or overlapping with, a training window
    except at one boundary, unlike a random split of overlapping-in-time windows. With ``groups``
    (an operating point per window), the last part of each device at each point is held out.
    """
    keep = np.ones(len(windows), dtype=bool)
    keys = (
        windows.device
        if groups is None
        else np.asarray([f"{d}\x00{g}" for d, g in zip(windows.device, groups, strict=True)])
    )
    for key in np.unique(keys):
        rows = np.flatnonzero(keys == key)
        rows = rows[np.argsort(windows.timestamp_us[rows], kind="stable")]
        n_test = round(len(rows) * fraction)
        keep[rows[len(rows) - n_test :]] = False
    return windows.select(keep), windows.select(~keep)


@dataclass(frozen=True)
class LabelledWindows:
    """Windows of a selection split by label: normal ones and fault ones by class."""

    normal: LakeWindows
    faults: dict[str, npt.NDArray[np.float32]]
    fingerprint: str
    skipped: tuple[SkippedWindow, ...] = ()
    fault_rpm: dict[str, npt.NDArray[np.float32]] = field(default_factory=dict)
    """Shaft speed of each fault window by class (NaN where not known)."""
    operating_point: npt.NDArray[np.object_] | None = None
    """Operating point of each normal window (an accumulating selection), else None."""
    balance: dict[str, dict[str, int]] = field(default_factory=dict)
    """Per operating point of an accumulating selection: normal windows available and kept."""


def accumulated(
    windows: LakeWindows, is_normal: npt.NDArray[np.bool_], new: npt.NDArray[np.bool_], accumulate: Accumulation
) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.object_], dict[str, dict[str, int]]]:
    """The normal windows of a retraining: its new windows and its champion's, per operating point, capped.

    Per operating point (:func:`operating_points` of the champion's covered speeds), the new windows
    when the point has any (the machine's present state there), else the champion's windows there
    (a point the fleet did not visit lately stays covered); then :func:`balance_operating_points`.
    The champion's windows are those of its trained span per device at its covered speeds (or
    without a usable speed): a window of the span at a speed it does not cover was not trained on.

    Args:
        windows: The fleet's lake windows.
        is_normal: Which are normal.
        new: Which are the retraining's new normal windows (its selection's filters).
        accumulate: The champion's record and the cap.

    Returns:
        The mask of the chosen windows, the operating point of each chosen one (in lake order),
        and per point: new and champion windows available, and windows kept.
    """
    spans = {device: (first, last) for device, first, last in accumulate.spans_us}
    old = is_normal & ~new & ~outside_spans(windows, spans) & np.isin(windows.device, list(spans))
    rows = np.flatnonzero(new | old)
    points = operating_points(windows.rpm[rows], accumulate.coverage_rpm)
    visited = set(points[new[rows]].tolist())
    # the champion trained inside its covered intervals: a window of its span at another speed was not trained on
    trained = [_interval_name(interval) for interval in accumulate.coverage_rpm] + [SPEED_NOT_KNOWN]
    known = np.isin(points, trained) if accumulate.coverage_rpm else np.ones(rows.size, dtype=bool)
    usable = new[rows] | (known & ~np.isin(points, list(visited)))
    rows, points = rows[usable], points[usable]
    device_rank = np.unique(windows.device[rows], return_inverse=True)[1].astype(np.int64)
    rank = np.empty(rows.size, dtype=np.int64)
    rank[np.lexsort((windows.timestamp_us[rows], device_rank))] = np.arange(rows.size)
    kept, balance = balance_operating_points(points, rank, accumulate.max_windows)
    for name, point in balance.items():
        point["champion"] = int(np.sum(old[rows] & (points == name)))
        point["new"] = point["available"] - point["champion"]
    mask = np.zeros(len(windows), dtype=bool)
    mask[rows[kept]] = True
    log.info("retraining accumulated from %s, per operating point: %s", accumulate.champion, balance)
    return mask, points[kept], balance


def load_labelled(
    lake_root: Path, selection: LakeSelection, *, window_samples: int, max_abs_g: float = DEFAULT_MAX_ABS_G
) -> LabelledWindows:
    """Read the selection's normal windows, and the fleet's labelled fault windows, by class.

    The device and time filters apply to normal windows only: labelled fault windows (imported
    recordings, the seeded-fault reference set) are the fleet's evaluation set whatever the
    selection, so a retraining on the last minutes of some devices is still evaluated on them.
    An accumulating selection adds the normal windows inside its champion's trained spans and
    balances the union per operating point (module docstring).
    Windows with non-finite samples or samples beyond ``max_abs_g`` are skipped and reported.

    Raises:
        DatasetError: The selection holds no usable windows, or no normal ones.
    """
    windows, skipped = drop_unusable(
        read_windows(lake_root, fleet=selection.fleet, window_samples=window_samples), max_abs_g
    )
    labels = np.asarray([lbl if lbl is not None else "" for lbl in windows.label], dtype=object)
    in_selection = np.ones(len(windows), dtype=bool)
    if selection.devices is not None:
        in_selection &= np.isin(windows.device, list(selection.devices))
    if selection.start is not None:
        in_selection &= windows.timestamp_us >= int(selection.start.timestamp() * 1e6)
    if selection.end is not None:
        in_selection &= windows.timestamp_us < int(selection.end.timestamp() * 1e6)
    is_normal = labels == NORMAL_LABEL
    if selection.unlabelled_as_normal:
        is_normal |= labels == ""
    normal_mask = is_normal & in_selection
    points, balance = None, dict[str, dict[str, int]]()
    if selection.accumulate is not None:
        normal_mask, points, balance = accumulated(windows, is_normal, normal_mask, selection.accumulate)
    if not normal_mask.any():
        raise DatasetError(f"no normal windows in the lake at {lake_root} for {json.dumps(selection.to_dict())}")
    fault_mask = ~is_normal & (labels != "")
    fault_classes = sorted(set(labels[fault_mask]))
    faults = {str(lbl): windows.samples[fault_mask & (labels == lbl)] for lbl in fault_classes}
    fault_rpm = {str(lbl): windows.rpm[fault_mask & (labels == lbl)] for lbl in fault_classes}
    used = windows.select(normal_mask | fault_mask)
    return LabelledWindows(
        windows.select(normal_mask),
        faults,
        fingerprint(used, selection),
        skipped,
        fault_rpm=fault_rpm,
        operating_point=points,
        balance=balance,
    )


def load_dataset(
    lake_root: Path,
    selection: LakeSelection,
    *,
    window_samples: int,
    test_fraction: float = 0.2,
    max_abs_g: float = DEFAULT_MAX_ABS_G,
) -> DatasetSplit:
    """Read a selection, split normal windows into train and a time-ordered test tail, group faults.

    Unusable windows (non-finite, beyond ``max_abs_g``) are skipped and listed in ``skipped``.

    Raises:
        DatasetError: No normal windows, or no fault windows to evaluate against.
    """
    labelled = load_labelled(lake_root, selection, window_samples=window_samples, max_abs_g=max_abs_g)
    if not labelled.faults:
        raise DatasetError(
            f"no labelled fault windows for fleet {selection.fleet!r} to evaluate against: import labelled "
            "recordings or add the seeded-fault reference set (tinymlops reference)"
        )
    train, test = holdout_last(labelled.normal, test_fraction, labelled.operating_point)
    counts = {"train_normal": len(train), "test_normal": len(test)}
    counts |= {f"fault_{name}": len(rows) for name, rows in labelled.faults.items()}
    counts |= {f"operating_point {name}": point["kept"] for name, point in labelled.balance.items()}
    if labelled.skipped:
        counts["skipped_unusable"] = len(labelled.skipped)
    log.info("dataset for fleet %s: %s", selection.fleet, counts)
    return DatasetSplit(
        train_normal=train.samples,
        test_normal=test.samples,
        faults=labelled.faults,
        sample_rate_hz=labelled.normal.sample_rate_hz,
        fingerprint=labelled.fingerprint,
        counts=counts,
        skipped=labelled.skipped,
        trained_span_us=time_spans(train),
        train_rpm=train.rpm,
        test_rpm=test.rpm,
        fault_rpm=labelled.fault_rpm,
        balance=labelled.balance,
    )


def parse_selector(text: str) -> LakeSelection:
    """Parse a lake selector ``fleet=NAME[,device=ID[|ID...]][,since=ISO][,until=ISO]``.

    Raises:
        DatasetError: Unknown key, missing fleet or a malformed time.
    """
    fields: dict[str, str] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        key, sep, value = part.partition("=")
        if not sep or key not in ("fleet", "device", "since", "until"):
            raise DatasetError(f"invalid lake selector part {part!r}: use fleet=, device=, since=, until=")
        fields[key] = value
    if "fleet" not in fields:
        raise DatasetError(f"lake selector {text!r} names no fleet (fleet=NAME)")

    def when(key: str) -> dt.datetime | None:
        if key not in fields:
            return None
        try:
            value = dt.datetime.fromisoformat(fields[key])
        except ValueError:
            raise DatasetError(f"lake selector {key}={fields[key]!r} is not an ISO time") from None
        return value if value.tzinfo else value.replace(tzinfo=dt.UTC)

    devices = tuple(fields["device"].split("|")) if "device" in fields else None
    return LakeSelection(fields["fleet"], devices, when("since"), when("until"))


def write_reference_set(
    lake_root: Path,
    fleet: str,
    *,
    windows_per_fault: int = 64,
    severity: float = 0.6,
    rpm: float = 1797.0,
    seed: int = 10_000,
    sample_rate_hz: int = 25_600,
    window_samples: int = 1024,
    faults: tuple[str, ...] = REFERENCE_FAULTS,
) -> int:
    """Write labelled seeded-fault windows for a fleet into the lake (idempotent per fleet and seed).

    Each fault class comes from its own simulated machine at the fleet's operating point, device id
    ``ref-<fault>``, label = the fault class, source = ``simulator:seeded-fault-reference#seed=N``.

    Returns:
        Windows written (0 when the set was already there).
    """
    from tasks.lake import known_sources

    source = f"{REFERENCE_SOURCE}#seed={seed}"
    batch = WindowBatch()
    start_us = int(dt.datetime.now(tz=dt.UTC).timestamp() * 1e6)
    for i, kind in enumerate(faults):
        device = f"ref-{kind.replace('_', '-')}"
        if source in known_sources(lake_root, fleet, device):
            continue
        machine = MachineSimulator(
            seed=seed + i,
            sample_rate_hz=sample_rate_hz,
            window_samples=window_samples,
            operating_point=OperatingPoint(rpm=rpm, load=0.5),
        )
        machine.inject_fault(FaultSpec(kind=kind, severity=severity))  # type: ignore[arg-type]
        step_us = int(window_samples / sample_rate_hz * 1e6)
        for seq in range(windows_per_fault):
            speed = machine.current_rpm
            samples, scale = quantize(machine.next_window())
            window = VibrationWindow(device, seq, start_us + seq * step_us, sample_rate_hz, scale, samples, rpm=speed)
            batch.append(fleet, window, label=kind, source=source)
    if len(batch):
        write_windows(lake_root, batch)
    log.info("seeded-fault reference set for fleet %s: %d windows written", fleet, len(batch))
    return len(batch)


def champion_accumulation(model_ref: str, max_windows: int) -> Accumulation | None:
    """What a retraining keeps of the registered champion ``model_ref``: its trained spans and covered speeds.

    Returns None when the registry has no such model version (the retraining then trains on its
    new windows alone, logged).

    Raises:
        RegistryError: The registry cannot be reached or the champion's artifacts are broken.
    """
    import tempfile

    from registry.errors import ModelNotFoundError
    from registry.models import resolve
    from registry.store import configure_from_settings

    configure_from_settings()
    with tempfile.TemporaryDirectory(prefix="tinymlops-champion-") as tmp:
        try:
            champion = resolve(model_ref, Path(tmp) / "bundle")
        except ModelNotFoundError as exc:
            log.warning("no champion to accumulate from (%s): training on the new windows only", exc)
            return None
        bundle = champion.bundle
        return Accumulation.of_champion(
            f"{champion.version.name}/{champion.version.version}",
            bundle.metadata.trained_span_us,
            bundle.dsp_spec(),
            max_windows,
        )


@task(name="champion-accumulation", retries=2, retry_delay_seconds=3, cache_policy=NO_CACHE)
def champion_accumulation_task(model_ref: str, max_windows: int) -> Accumulation | None:
    """Prefect task: :func:`champion_accumulation`."""
    return champion_accumulation(model_ref, max_windows)


@task(name="load-dataset", cache_policy=NO_CACHE)
def load_dataset_task(
    lake_root: Path, selection: LakeSelection, window_samples: int, max_abs_g: float = DEFAULT_MAX_ABS_G
) -> DatasetSplit:
    """Prefect task: :func:`load_dataset`."""
    return load_dataset(lake_root, selection, window_samples=window_samples, max_abs_g=max_abs_g)
