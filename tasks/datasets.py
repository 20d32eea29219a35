"""Training and evaluation sets from the lake: selection, hold-out, fingerprint, seeded-fault reference.

Training uses normal windows only. Evaluation needs labelled fault windows: imported recordings
(for example CWRU) carry them; a fleet of live sensors usually does not, so
:func:`write_reference_set` adds a seeded-fault reference set simulated at the fleet's
operating point, clearly marked by its source.
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
from tinymlops.errors import TinyMLOpsError
from tinymlops.settings import DEFAULT_MAX_ABS_G

log = logging.getLogger(__name__)

NORMAL_LABEL = "normal"
REFERENCE_FAULTS = ("inner_race", "outer_race", "ball", "imbalance", "misalignment")
REFERENCE_SOURCE = "simulator:seeded-fault-reference"
SKIPPED_SHOWN = 5
"""How many skipped windows logs, outcomes and reports name (all are counted)."""


class DatasetError(TinyMLOpsError):
    """The lake selection cannot give a training or evaluation set."""


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
    """

    fleet: str
    devices: tuple[str, ...] | None = None
    start: dt.datetime | None = None
    end: dt.datetime | None = None
    unlabelled_as_normal: bool = True

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form, recorded as lineage."""
        return {
            "fleet": self.fleet,
            "devices": list(self.devices) if self.devices else None,
            "start": self.start.isoformat() if self.start else None,
            "end": self.end.isoformat() if self.end else None,
            "unlabelled_as_normal": self.unlabelled_as_normal,
        }


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


def holdout_last(windows: LakeWindows, fraction: float) -> tuple[LakeWindows, LakeWindows]:
    """Split each device's windows in time: the last ``fraction`` of each device is held out.

    A contiguous held-out tail is never adjacent to, or overlapping with, a training window
    except at one boundary, unlike a random split of overlapping-in-time windows.
    """
    keep = np.ones(len(windows), dtype=bool)
    for device in np.unique(windows.device):
        rows = np.flatnonzero(windows.device == device)
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


def load_labelled(
    lake_root: Path, selection: LakeSelection, *, window_samples: int, max_abs_g: float = DEFAULT_MAX_ABS_G
) -> LabelledWindows:
    """Read the selection's normal windows, and the fleet's labelled fault windows, by class.

    The device and time filters apply to normal windows only: labelled fault windows (imported
    recordings, the seeded-fault reference set) are the fleet's evaluation set whatever the
    selection, so a retraining on the last minutes of some devices is still evaluated on them.
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
    if not normal_mask.any():
        raise DatasetError(f"no normal windows in the lake at {lake_root} for {json.dumps(selection.to_dict())}")
    fault_mask = ~is_normal & (labels != "")
    fault_classes = sorted(set(labels[fault_mask]))
    faults = {str(lbl): windows.samples[fault_mask & (labels == lbl)] for lbl in fault_classes}
    fault_rpm = {str(lbl): windows.rpm[fault_mask & (labels == lbl)] for lbl in fault_classes}
    used = windows.select(normal_mask | fault_mask)
    return LabelledWindows(windows.select(normal_mask), faults, fingerprint(used, selection), skipped, fault_rpm)


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
    train, test = holdout_last(labelled.normal, test_fraction)
    counts = {"train_normal": len(train), "test_normal": len(test)}
    counts |= {f"fault_{name}": len(rows) for name, rows in labelled.faults.items()}
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


@task(name="load-dataset", cache_policy=NO_CACHE)
def load_dataset_task(
    lake_root: Path, selection: LakeSelection, window_samples: int, max_abs_g: float = DEFAULT_MAX_ABS_G
) -> DatasetSplit:
    """Prefect task: :func:`load_dataset`."""
    return load_dataset(lake_root, selection, window_samples=window_samples, max_abs_g=max_abs_g)
