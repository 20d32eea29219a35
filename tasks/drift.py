"""Drift statistics and the decision "this machine is faulty" versus "the fleet's data drifted".

Everything here is plain numpy/scipy on normalised DSP features (``tinymlops.contracts.dsp``: 32 log band
energies, then log RMS, log kurtosis, crest factor) and reconstruction errors of the deployed
model, compared with the champion's :class:`~tinymlops.schemas.DriftReference` (a sample of its
training features, its errors on held-out normal windows, its expected false-alarm rate).

Why the rule looks the way it does (measured on the simulator, see ``tests/test_drift.py``):

* The reference pools every device of the fleet, and machines differ (shaft line amplitudes,
  structural resonance between 3 and 4 kHz), so ONE healthy device is a sub-population of it:
  its per-feature PSI/KS against the pool flags 2-5 of 35 features although nothing changed.
  Feature drift is therefore judged on the pooled windows of the fleet, never on one device alone.
* The autoencoder has learned every device's normal, so a healthy device keeps the reference's
  error distribution and false-alarm rate. A device is **abnormal** when its anomaly rate is
  above ``anomaly_rate_factor`` x the expected rate (the one-sided exact, Clopper-Pearson, lower bound of the rate
  must pass, so a few chance alarms in a short window do not count), or its errors shifted upwards
  (two-sample KS statistic above ``error_shift_threshold`` and significant). Both tests hold for the
  whole fleet: a healthy fleet of N devices has a device flagged by the rate test in at most 1% of
  runs and by the shift test in at most 0.1% (each device tested at 0.01/N and 0.001/N).
* Physics separates the causes by the waveform's *shape*. A sensor gain change multiplies the
  signal: all log bands and log RMS move by the same amount, kurtosis and crest (scale-free) stay.
  Wear adds broadband noise and resonance roughness: levels rise, the signal stays near-Gaussian.
  A speed or load change moves the shaft lines (the low bands) with the shape nearly kept. A
  bearing defect adds impacts ringing the resonance: kurtosis and crest jump far above anything
  in training. Imbalance or misalignment make one shaft line dominate: kurtosis and crest fall
  below anything in training (a sinusoid has kurtosis 1.5). So a window's shape is *changed*
  when its kurtosis or crest lies beyond the reference's 1st/99th percentile; a device has a
  **fault signature** when most (>= 50%) of its windows are changed that way.

Operating points (a speed-aware champion, ``tinymlops.contracts.dsp`` spec version 2): each window is scored at
its own shaft speed. A window whose speed is unusable (missing, not finite, outside the spec's valid
range) is normalised at the reference speed (the documented fallback), judged like the others and
counted. A window at a usable speed outside the intervals the champion trained on
(``tinymlops.contracts.dsp.covered``, 5 % margin) is *uncovered*: the model has never seen the machine there, so
its anomalies say nothing about the machine. When more than half (:data:`NEW_OPERATING_POINT_FRACTION`)
of a device's windows are uncovered, the device is ``drift`` of kind ``new operating point`` (never a
fault alert: it is the fleet's data that moved); otherwise its uncovered windows are left out and the
device is judged on the rest by the rule below.

Device verdict: ``insufficient_data`` with fewer than ``min_windows`` windows; ``fault`` when
abnormal with a fault signature; ``drift`` when abnormal without one (levels or spectrum moved,
shape kept); ``ok`` otherwise (its features may differ from the pool, which is reported, not judged).

Fleet verdict, over the judged devices: the fleet's data drifted when at least ``fleet_fraction``
of them (and at least two, unless the fleet has one device) are ``drift`` devices, or when the
pooled windows of the ``ok`` devices, covering at least ``fleet_fraction`` of the fleet, have at
least ``min_drifted_features`` features with PSI > ``psi_threshold`` and KS > ``ks_threshold``
(the whole operating point moved while the model still reconstructs it, e.g. a speed change).
The fleet's data also drifted when any judged device is at a new operating point: its tachometer,
not a statistic, says so, and the retraining must add that speed. The drift's kind is ``new
operating point`` when devices at new operating points are its only cause (the devices drifted at
covered speeds are below the quorum on their own and the pooled features did not move); the drifted
devices at covered speeds are then device-level problems, alerted like faults. Otherwise the kind is
``data drift``. Then the verdict is ``data_drift``, or ``mixed`` when some devices are also alerted
(a fault signature; retrain without them, alert about them). Otherwise abnormal devices are a
minority: ``fault`` (device-level problems, faulty machines or a sensor that changed on its own:
alert, no retraining). Else ``ok``; ``insufficient_data`` when no device could be judged.

Devices that publish drift summaries instead of raw windows (window and anomaly counts, a score
histogram, feature means and variances) are judged by the same rule: the anomaly count is
exact, the error shift comes from the histogram (KS at the bin edges, a lower bound of the exact
one), feature drift and shape from a normal approximation of each feature; in the pooled check
they enter as normal distributions weighted by their window counts.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt
from scipy import stats

from tasks.rates import rate_lower_bound
from tinymlops.contracts.events import DriftKind
from tinymlops.errors import TinyMLOpsError
from tinymlops.schemas import DriftReference
from tinymlops.settings import DriftSettings

DeviceVerdict = Literal["ok", "drift", "fault", "insufficient_data"]
FleetVerdict = Literal["ok", "data_drift", "fault", "mixed", "insufficient_data"]
EvidenceSource = Literal["windows", "summary"]
FloatArray = npt.NDArray[np.float64]
# P(current feature j < x) at points x: how summaries and pooled mixtures describe a distribution.
CdfBelow = Callable[[int, FloatArray], FloatArray]

STAT_FEATURES = ("log_rms", "log_kurtosis", "crest")
# Floor of a PSI bin fraction: an empty bin contributes a large but finite term.
PSI_EPSILON = 1e-4
# Chance that a healthy fleet has any device's anomaly rate judged high in one monitor run: split
# over the fleet's devices (Bonferroni), so 500 healthy devices do not raise 500x the false alarms.
ANOMALY_RATE_ALPHA = 0.01
# Significance an error-distribution shift must reach besides its size (short windows are noisy),
# likewise for the whole fleet.
ERROR_SHIFT_ALPHA = 1e-3
# A window's shape changed when kurtosis or crest lies beyond these reference quantiles ...
SHAPE_QUANTILES = (0.01, 0.99)
# ... and a device has a fault signature when at least this share of its windows changed shape.
SHAPE_FRACTION = 0.5
# A device whose windows are mostly (more than this share) at speeds its champion never trained on
# is at a new operating point: drift to train on, not a machine to alert about.
NEW_OPERATING_POINT_FRACTION = 0.5
NEW_OPERATING_POINT: DriftKind = "new operating point"
DATA_DRIFT: DriftKind = "data drift"


class DriftError(TinyMLOpsError):
    """Inputs to a drift statistic are empty, misshapen or not finite."""


def _values(x: npt.ArrayLike, name: str) -> FloatArray:
    arr = np.asarray(x, dtype=np.float64).ravel()
    if arr.size == 0:
        raise DriftError(f"{name} is empty")
    if not np.isfinite(arr).all():
        raise DriftError(f"{name} contains {int((~np.isfinite(arr)).sum())} NaN or infinite values")
    return arr


def _matrix(x: npt.ArrayLike, name: str, n_features: int | None = None) -> FloatArray:
    arr = np.asarray(x, dtype=np.float64)
    if arr.ndim != 2 or (n_features is not None and arr.shape[1] != n_features):
        expected = f"(n, {n_features})" if n_features is not None else "(n, n_features)"
        raise DriftError(f"{name} must have shape {expected}, got {arr.shape}")
    if not np.isfinite(arr).all():
        raise DriftError(f"{name} contains {int((~np.isfinite(arr)).sum())} NaN or infinite values")
    return arr


def feature_names(n_features: int) -> tuple[str, ...]:
    """Names of the DSP features: ``band_00`` .. ``band_NN``, then log RMS, log kurtosis, crest."""
    n_bands = n_features - len(STAT_FEATURES)
    if n_bands < 1:
        raise DriftError(f"{n_features} features cannot hold the DSP layout (bands + {', '.join(STAT_FEATURES)})")
    return tuple(f"band_{i:02d}" for i in range(n_bands)) + STAT_FEATURES


def population_stability_index(reference: npt.ArrayLike, current: npt.ArrayLike, bins: int = 10) -> float:
    """Population stability index of ``current`` against ``reference``.

    Bins are the reference's quantiles (ties merged), so each holds about 1/bins of the
    reference; a bin fraction of zero is floored at :data:`PSI_EPSILON`.

    Raises:
        DriftError: Empty or non-finite input, or fewer than 2 bins.
    """
    if bins < 2:
        raise DriftError(f"PSI needs at least 2 bins, got {bins}")
    ref, cur = _values(reference, "reference"), _values(current, "current")
    edges = np.unique(np.quantile(ref, np.linspace(0.0, 1.0, bins + 1)[1:-1]))
    expected = np.bincount(np.searchsorted(edges, ref, side="right"), minlength=edges.size + 1) / ref.size
    actual = np.bincount(np.searchsorted(edges, cur, side="right"), minlength=edges.size + 1) / cur.size
    return _psi(expected, actual)


def _psi(expected: FloatArray, actual: FloatArray) -> float:
    expected, actual = np.maximum(expected, PSI_EPSILON), np.maximum(actual, PSI_EPSILON)
    return float(np.sum((actual - expected) * np.log(actual / expected)))


def ks_statistic(reference: npt.ArrayLike, current: npt.ArrayLike) -> float:
    """Two-sample Kolmogorov-Smirnov statistic (largest gap between the two empirical CDFs)."""
    return float(stats.ks_2samp(_values(reference, "reference"), _values(current, "current")).statistic)


@dataclass(frozen=True)
class FeatureDrift:
    """Per-feature drift of current features against the reference.

    Attributes:
        names: Feature names.
        psi: Population stability index per feature.
        ks: Kolmogorov-Smirnov statistic per feature.
        drifted: Features with PSI above the PSI threshold and KS above the KS threshold.
        n_rows: Current rows compared.
    """

    names: tuple[str, ...]
    psi: FloatArray
    ks: FloatArray
    drifted: npt.NDArray[np.bool_]
    n_rows: int

    @property
    def n_drifted(self) -> int:
        """Number of drifted features."""
        return int(self.drifted.sum())

    @property
    def max_psi(self) -> float:
        """Largest PSI of any feature."""
        return float(self.psi.max())

    @property
    def max_ks(self) -> float:
        """Largest KS statistic of any feature."""
        return float(self.ks.max())

    def drifted_names(self) -> list[str]:
        """Drifted features, largest PSI first."""
        order = np.argsort(-self.psi, kind="stable")
        return [self.names[i] for i in order if self.drifted[i]]

    def summary(self, top: int = 3) -> str:
        """One phrase naming the most drifted features with their PSI and KS."""
        order = np.argsort(-self.psi, kind="stable")
        shown = [i for i in order if self.drifted[i]][:top]
        return ", ".join(f"{self.names[i]} PSI {self.psi[i]:.2f} KS {self.ks[i]:.2f}" for i in shown)

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form."""
        return {
            "n_rows": self.n_rows,
            "n_drifted": self.n_drifted,
            "drifted": self.drifted_names(),
            "psi": {name: float(v) for name, v in zip(self.names, self.psi, strict=True)},
            "ks": {name: float(v) for name, v in zip(self.names, self.ks, strict=True)},
        }


def feature_drift(
    reference_features: npt.ArrayLike,
    current_features: npt.ArrayLike,
    settings: DriftSettings,
    *,
    bins: int = 10,
) -> FeatureDrift:
    """PSI and KS of every feature column; a feature drifted when both exceed their thresholds.

    Args:
        reference_features: Reference rows (n_ref, F), normalised like the current ones.
        current_features: Current rows (n, F).
        settings: Thresholds.
        bins: PSI bins.

    Raises:
        DriftError: Empty, misshapen or non-finite features.
    """
    ref = _matrix(reference_features, "reference features")
    cur = _matrix(current_features, "current features", ref.shape[1])
    if len(ref) == 0 or len(cur) == 0:
        raise DriftError(f"feature drift needs rows on both sides, got {len(ref)} reference and {len(cur)} current")
    psi = np.array([population_stability_index(ref[:, j], cur[:, j], bins) for j in range(ref.shape[1])])
    ks = np.array([ks_statistic(ref[:, j], cur[:, j]) for j in range(ref.shape[1])])
    drifted = (psi > settings.psi_threshold) & (ks > settings.ks_threshold)
    return FeatureDrift(feature_names(ref.shape[1]), psi, ks, drifted, len(cur))


@dataclass(frozen=True)
class ErrorShift:
    """How the reconstruction-error distribution moved against the reference's calibration errors.

    Attributes:
        ks: Two-sample KS statistic.
        p_value: Its two-sided p-value.
        median_ratio: Current median error over reference median error.
    """

    ks: float
    p_value: float
    median_ratio: float

    def to_dict(self) -> dict[str, float]:
        """JSON-serialisable form."""
        return {"ks": self.ks, "p_value": self.p_value, "median_ratio": self.median_ratio}


def error_shift(reference_errors: npt.ArrayLike, current_errors: npt.ArrayLike) -> ErrorShift:
    """Compare current reconstruction errors with the reference's (KS statistic, p-value, median ratio)."""
    ref, cur = _values(reference_errors, "reference errors"), _values(current_errors, "current errors")
    result = stats.ks_2samp(ref, cur)
    ratio = float(np.median(cur) / max(float(np.median(ref)), 1e-12))
    return ErrorShift(float(result.statistic), float(result.pvalue), ratio)


def anomaly_rate(errors: npt.ArrayLike, threshold: float) -> float:
    """Fraction of windows whose error is above the threshold (equal is not an anomaly)."""
    return float(np.mean(_values(errors, "errors") > threshold))


@dataclass(frozen=True)
class ShapeChange:
    """Windows whose waveform shape (kurtosis, crest) lies outside the reference's 1%-99% range.

    Attributes:
        impulsive_fraction: Share of windows with kurtosis or crest above the reference's 99th percentile.
        periodic_fraction: Share of windows with kurtosis or crest below the reference's 1st percentile.
        kurtosis_median: Median normalised log kurtosis of the windows.
        crest_median: Median normalised crest factor of the windows.
    """

    impulsive_fraction: float
    periodic_fraction: float
    kurtosis_median: float
    crest_median: float

    @property
    def fault_signature(self) -> bool:
        """Whether most windows changed shape: impacts (bearing) or a dominant shaft line."""
        return max(self.impulsive_fraction, self.periodic_fraction) >= SHAPE_FRACTION

    @property
    def kind(self) -> str:
        """``impulsive``, ``periodic`` or ``kept``."""
        if not self.fault_signature:
            return "kept"
        return "impulsive" if self.impulsive_fraction >= self.periodic_fraction else "periodic"

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form."""
        return {
            "impulsive_fraction": self.impulsive_fraction,
            "periodic_fraction": self.periodic_fraction,
            "kurtosis_median": self.kurtosis_median,
            "crest_median": self.crest_median,
            "kind": self.kind,
        }


def shape_change(reference_features: npt.ArrayLike, current_features: npt.ArrayLike) -> ShapeChange:
    """Measure how many windows have a kurtosis or crest factor beyond the reference's 1%/99% range.

    The last two DSP features are log kurtosis and crest factor (``tinymlops.contracts.dsp``).
    """
    ref = _matrix(reference_features, "reference features")
    cur = _matrix(current_features, "current features", ref.shape[1])
    feature_names(ref.shape[1])  # checks the layout
    if len(ref) == 0 or len(cur) == 0:
        raise DriftError(f"shape change needs rows on both sides, got {len(ref)} reference and {len(cur)} current")
    shape_ref, shape_cur = ref[:, -2:], cur[:, -2:]
    low, high = np.quantile(shape_ref, SHAPE_QUANTILES, axis=0)
    return ShapeChange(
        impulsive_fraction=float(np.mean((shape_cur > high).any(axis=1))),
        periodic_fraction=float(np.mean((shape_cur < low).any(axis=1))),
        kurtosis_median=float(np.median(shape_cur[:, 0])),
        crest_median=float(np.median(shape_cur[:, 1])),
    )


@dataclass(frozen=True)
class DeviceAssessment:
    """What the monitor concluded about one device in one time window.

    Attributes:
        device: Device id.
        verdict: ``ok``, ``drift``, ``fault`` or ``insufficient_data``.
        reasons: One line per check: the measured value against its limit.
        n_windows: Windows scored.
        anomalies: Windows above the model's threshold.
        anomaly_rate: ``anomalies / n_windows``.
        anomaly_rate_lower: One-sided Clopper-Pearson lower bound of the anomaly rate (level 1 - 0.01/fleet size).
        anomaly_rate_limit: ``anomaly_rate_factor`` x the expected false-alarm rate.
        error_shift: Error distribution against the reference (None without windows).
        features: Feature drift against the pooled reference (None without windows).
        shape: Waveform shape change (None without windows).
        source: ``windows`` (every window scored here) or ``summary`` (the device's own summaries).
        speed_fallback: Windows without a usable speed, normalised at the champion's reference speed.
        speed_uncovered: Windows at usable speeds outside the champion's covered intervals.
        drift_kind: ``new operating point`` or ``data drift`` for a ``drift`` device, else None.
    """

    device: str
    verdict: DeviceVerdict
    reasons: tuple[str, ...]
    n_windows: int
    anomalies: int
    anomaly_rate: float
    anomaly_rate_lower: float
    anomaly_rate_limit: float
    error_shift: ErrorShift | None
    features: FeatureDrift | None
    shape: ShapeChange | None
    source: EvidenceSource = "windows"
    speed_fallback: int = 0
    speed_uncovered: int = 0
    drift_kind: DriftKind | None = None

    @property
    def new_operating_point(self) -> bool:
        """Whether the device runs mostly at speeds its champion never trained on."""
        return self.drift_kind == NEW_OPERATING_POINT

    @property
    def judged(self) -> bool:
        """Whether the device had enough windows to be judged."""
        return self.verdict != "insufficient_data"

    @property
    def abnormal(self) -> bool:
        """Whether the device is judged ``drift`` or ``fault``."""
        return self.verdict in ("drift", "fault")

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form."""
        return {
            "device": self.device,
            "source": self.source,
            "verdict": self.verdict,
            "reasons": list(self.reasons),
            "n_windows": self.n_windows,
            "anomalies": self.anomalies,
            "anomaly_rate": self.anomaly_rate,
            "anomaly_rate_lower": self.anomaly_rate_lower,
            "anomaly_rate_limit": self.anomaly_rate_limit,
            "error_shift": self.error_shift.to_dict() if self.error_shift else None,
            "features": self.features.to_dict() if self.features else None,
            "shape": self.shape.to_dict() if self.shape else None,
            "speed_fallback": self.speed_fallback,
            "speed_uncovered": self.speed_uncovered,
            "drift_kind": self.drift_kind,
        }


def assess_device(
    device: str,
    features: npt.ArrayLike,
    errors: npt.ArrayLike,
    reference: DriftReference,
    threshold: float,
    settings: DriftSettings,
    fleet_size: int = 1,
    *,
    uncovered: npt.ArrayLike | None = None,
    fallback: npt.ArrayLike | None = None,
) -> DeviceAssessment:
    """Judge one device's windows against the champion's reference (rule in the module docstring).

    Args:
        device: Device id.
        features: The device's normalised features (n, F), made with the champion's DSP spec.
        errors: The champion's reconstruction errors of those rows (n,).
        reference: The champion's drift reference.
        threshold: The champion's anomaly threshold.
        settings: Drift thresholds.
        fleet_size: Devices judged in the same run; the tests' significance is split over them.
        uncovered: Per row, whether its speed is usable but outside the champion's covered
            intervals (None: every row covered, a speed-unaware champion).
        fallback: Per row, whether it had no usable speed and was normalised at the reference
            speed (counted only).

    Raises:
        DriftError: Features, errors and masks disagree in length or width, or are not finite.
    """
    ref = _matrix(reference.features, "reference features")
    x = _matrix(features, f"features of {device}", ref.shape[1])
    e = np.asarray(errors, dtype=np.float64).ravel()
    if e.size != len(x):
        raise DriftError(f"{device}: {len(x)} feature rows but {e.size} errors")
    off = _mask(uncovered, len(x), f"{device}: uncovered")
    n_fallback = int(_mask(fallback, len(x), f"{device}: fallback").sum())
    n_off = int(off.sum())
    speed = (n_fallback, n_off)
    if len(x) >= settings.min_windows and n_off > NEW_OPERATING_POINT_FRACTION * len(x):
        return _new_operating_point(device, x, e, threshold, reference, settings, speed)
    x, e = x[~off], e[~off]
    if len(x) == 0:
        return _no_windows(device, reference, settings, speed)
    anomalies = int(np.sum(_values(e, f"errors of {device}") > threshold))
    evidence = (error_shift(reference.errors, e), feature_drift(ref, x, settings), shape_change(ref, x))
    return _judge(device, len(x), anomalies, evidence, reference, settings, "windows", fleet_size, speed)


def _mask(values: npt.ArrayLike | None, n: int, name: str) -> npt.NDArray[np.bool_]:
    if values is None:
        return np.zeros(n, dtype=bool)
    mask = np.asarray(values, dtype=bool).ravel()
    if mask.size != n:
        raise DriftError(f"{name} has {mask.size} flags for {n} windows")
    return mask


def _speed_reason(n: int, speed: tuple[int, int]) -> str:
    fallback, uncovered = speed
    return (
        f"speed: {uncovered}/{n} windows outside the champion's covered speeds (new operating point when more "
        f"than {NEW_OPERATING_POINT_FRACTION:.0%}; otherwise left out of the judgement), {fallback} without a "
        "usable speed (scored at the reference speed)"
    )


def _new_operating_point(
    device: str,
    x: FloatArray,
    e: FloatArray,
    threshold: float,
    reference: DriftReference,
    settings: DriftSettings,
    speed: tuple[int, int],
) -> DeviceAssessment:
    """A device mostly at uncovered speeds: ``drift`` of kind new operating point, its figures reported."""
    n = len(x)
    anomalies = int(np.sum(_values(e, f"errors of {device}") > threshold))
    limit = settings.anomaly_rate_factor * reference.expected_anomaly_rate
    ref = _matrix(reference.features, "reference features")
    shape = shape_change(ref, x)
    reasons = (
        _speed_reason(n, speed),
        f"new operating point: the champion never trained at these speeds, so its anomaly rate "
        f"{anomalies / n:.1%} (limit {limit:.1%}) and waveform shape {shape.kind} are not evidence about the machine",
    )
    return DeviceAssessment(
        device,
        "drift",
        reasons,
        n,
        anomalies,
        anomalies / n,
        rate_lower_bound(anomalies, n, 1 - ANOMALY_RATE_ALPHA),
        limit,
        error_shift(reference.errors, e),
        feature_drift(ref, x, settings),
        shape,
        "windows",
        *speed,
        NEW_OPERATING_POINT,
    )


def _no_windows(
    device: str, reference: DriftReference, settings: DriftSettings, speed: tuple[int, int] = (0, 0)
) -> DeviceAssessment:
    limit = settings.anomaly_rate_factor * reference.expected_anomaly_rate
    reasons = (f"0 windows < minimum {settings.min_windows}",) + (
        (_speed_reason(sum(speed), speed),) if any(speed) else ()
    )
    return DeviceAssessment(
        device, "insufficient_data", reasons, 0, 0, 0.0, 0.0, limit, None, None, None, "windows", *speed
    )


def _judge(
    device: str,
    n: int,
    anomalies: int,
    evidence: tuple[ErrorShift, FeatureDrift, ShapeChange],
    reference: DriftReference,
    settings: DriftSettings,
    source: EvidenceSource,
    fleet_size: int,
    speed: tuple[int, int] = (0, 0),
) -> DeviceAssessment:
    """The device rule of the module docstring, with one reason line per check."""
    if fleet_size < 1:
        raise DriftError(f"{device}: fleet size {fleet_size} < 1")
    shift, drift, shape = evidence
    limit = settings.anomaly_rate_factor * reference.expected_anomaly_rate
    rate_alpha, shift_alpha = ANOMALY_RATE_ALPHA / fleet_size, ERROR_SHIFT_ALPHA / fleet_size
    rate, lower = anomalies / n, rate_lower_bound(anomalies, n, 1 - rate_alpha)
    rate_high = lower > limit
    errors_up = shift.ks > settings.error_shift_threshold and shift.p_value < shift_alpha and shift.median_ratio > 1
    approx = " (normal approximation from the device summary)" if source == "summary" else ""
    reasons = [
        f"anomaly rate {rate:.1%} ({anomalies}/{n}, lower bound {lower:.1%} at alpha {rate_alpha:.2g}) "
        f"{'>' if rate_high else '<='} limit {limit:.1%} ({settings.anomaly_rate_factor:g} x expected "
        f"{reference.expected_anomaly_rate:.1%})",
        f"errors {'shifted up' if errors_up else 'not shifted up'}: KS {shift.ks:.2f} (p {shift.p_value:.2g}, "
        f"median x{shift.median_ratio:.2f}); limit KS > {settings.error_shift_threshold:.2f} "
        f"at p < {shift_alpha:.2g} with the median up",
        f"waveform shape {shape.kind}: kurtosis/crest above the training p99 in {shape.impulsive_fraction:.0%}, "
        f"below p1 in {shape.periodic_fraction:.0%} of windows (fault signature at >= {SHAPE_FRACTION:.0%}){approx}",
        f"{drift.n_drifted}/{len(drift.names)} features differ from the fleet reference "
        f"(PSI > {settings.psi_threshold:g} and KS > {settings.ks_threshold:g})"
        + (f": {drift.summary()}" if drift.n_drifted else ""),
    ]
    if any(speed):
        reasons.append(_speed_reason(n + speed[1], speed))
    verdict: DeviceVerdict
    if n < settings.min_windows:
        verdict = "insufficient_data"
        reasons.insert(0, f"{n} windows < minimum {settings.min_windows}")
    elif (rate_high or errors_up) and shape.fault_signature:
        verdict = "fault"
    elif rate_high or errors_up:
        verdict = "drift"
    else:
        verdict = "ok"
    kind = DATA_DRIFT if verdict == "drift" else None
    return DeviceAssessment(
        device, verdict, tuple(reasons), n, anomalies, rate, lower, limit, shift, drift, shape, source, *speed, kind
    )


@dataclass(frozen=True)
class SummaryStats:
    """What a device reports about a period instead of its windows (``firmware.ota.DriftSummary``).

    Attributes:
        windows: Windows scored.
        anomalies: Windows above the threshold.
        score_edges: Lower edges of the score histogram bins; the last bin is open.
        score_counts: Windows per bin.
        feature_mean: Mean of each normalised feature.
        feature_var: Variance of each normalised feature.
        speed_fallback: Windows the device scored at the reference speed (theirs was unusable).
    """

    windows: int
    anomalies: int
    score_edges: FloatArray
    score_counts: npt.NDArray[np.int64]
    feature_mean: FloatArray
    feature_var: FloatArray
    speed_fallback: int = 0

    def __post_init__(self) -> None:
        if self.score_edges.shape != self.score_counts.shape or int(self.score_counts.sum()) != self.windows:
            raise DriftError(
                f"summary histogram has {self.score_edges.size} edges, {self.score_counts.size} counts "
                f"summing to {int(self.score_counts.sum())}, for {self.windows} windows"
            )
        if not 0 <= self.anomalies <= self.windows or self.feature_mean.shape != self.feature_var.shape:
            raise DriftError(f"summary has {self.anomalies} anomalies in {self.windows} windows or mismatched moments")

    @classmethod
    def merge(cls, parts: Sequence[SummaryStats]) -> SummaryStats:
        """Combine consecutive summaries of one device (same histogram edges) into one."""
        if not parts:
            raise DriftError("no summaries to merge")
        edges = parts[0].score_edges
        if any(p.score_edges.shape != edges.shape or not np.allclose(p.score_edges, edges) for p in parts):
            raise DriftError("summaries with different score histogram edges cannot be merged")
        n = np.array([p.windows for p in parts], dtype=np.float64)
        total = max(float(n.sum()), 1.0)
        mean = sum(w * p.feature_mean for w, p in zip(n, parts, strict=True)) / total
        second = sum(w * (p.feature_var + p.feature_mean**2) for w, p in zip(n, parts, strict=True)) / total
        return cls(
            windows=int(n.sum()),
            anomalies=sum(p.anomalies for p in parts),
            score_edges=edges,
            score_counts=np.sum([p.score_counts for p in parts], axis=0),
            feature_mean=np.asarray(mean, dtype=np.float64),
            feature_var=np.maximum(np.asarray(second, dtype=np.float64) - mean**2, 0.0),
            speed_fallback=sum(p.speed_fallback for p in parts),
        )

    def cdf_below(self, j: int, x: FloatArray) -> FloatArray:
        """Normal approximation of P(feature j < x)."""
        sd = math.sqrt(max(float(self.feature_var[j]), 1e-12))
        return np.asarray(stats.norm.cdf((x - self.feature_mean[j]) / sd), dtype=np.float64)


def histogram_error_shift(reference_errors: npt.ArrayLike, edges: npt.ArrayLike, counts: npt.ArrayLike) -> ErrorShift:
    """Compare a score histogram (lower bin edges, last bin open) with the reference errors.

    The KS statistic is taken at the bin edges, a lower bound of the exact one; its p-value uses
    the two-sample effective size; the median is interpolated in its bin (a lower bound when it
    falls in the open last bin).
    """
    ref = np.sort(_values(reference_errors, "reference errors"))
    lower = np.asarray(edges, dtype=np.float64)
    c = np.asarray(counts, dtype=np.float64)
    n = float(c.sum())
    if n <= 0 or lower.shape != c.shape:
        raise DriftError(f"score histogram needs matching edges and counts with windows, got {lower.size}/{c.size}")
    cumulative = np.cumsum(c) / n
    ref_below = np.searchsorted(ref, lower[1:], side="left") / ref.size
    ks = float(np.max(np.abs(cumulative[:-1] - ref_below))) if lower.size > 1 else 0.0
    n_eff = max(1, round(n * ref.size / (n + ref.size)))
    i = int(np.searchsorted(cumulative, 0.5, side="left"))
    if i >= lower.size - 1:
        median = float(lower[-1])
    else:
        before = cumulative[i - 1] if i else 0.0
        median = float(lower[i] + (lower[i + 1] - lower[i]) * (0.5 - before) / max(cumulative[i] - before, 1e-12))
    ratio = median / max(float(np.median(ref)), 1e-12)
    return ErrorShift(ks, float(stats.kstwo.sf(ks, n_eff)), ratio)


def _cdf_feature_drift(
    reference_features: FloatArray,
    components: Sequence[tuple[float, CdfBelow]],
    n_rows: int,
    settings: DriftSettings,
    bins: int = 10,
) -> FeatureDrift:
    """PSI and KS of every feature against a current distribution given as a mixture of CDFs.

    The KS statistic is taken at the reference points, on both sides of each step.
    """
    weights = np.asarray([w for w, _ in components], dtype=np.float64)
    weights /= max(float(weights.sum()), 1e-12)
    m = len(reference_features)
    steps = np.arange(1, m + 1) / m
    psi, ks = [], []
    for j in range(reference_features.shape[1]):
        column = np.sort(reference_features[:, j])

        def below(x: FloatArray, j: int = j) -> FloatArray:
            return np.asarray(sum(w * cdf(j, x) for w, (_, cdf) in zip(weights, components, strict=True)))

        edges = np.unique(np.quantile(column, np.linspace(0.0, 1.0, bins + 1)[1:-1]))
        expected = np.bincount(np.searchsorted(edges, column, side="right"), minlength=edges.size + 1) / m
        actual = np.diff(np.concatenate([[0.0], below(edges), [1.0]]))
        psi.append(_psi(expected, actual))
        at = below(column)
        ks.append(float(max(np.max(np.abs(steps - at)), np.max(np.abs(steps - 1 / m - at)))))
    psi_arr, ks_arr = np.asarray(psi), np.asarray(ks)
    drifted = (psi_arr > settings.psi_threshold) & (ks_arr > settings.ks_threshold)
    return FeatureDrift(feature_names(reference_features.shape[1]), psi_arr, ks_arr, drifted, n_rows)


def _normal_shape(reference_features: FloatArray, summary: SummaryStats) -> ShapeChange:
    """:class:`ShapeChange` from a summary's moments: tail probabilities of kurtosis and crest (normal)."""
    low, high = np.quantile(reference_features[:, -2:], SHAPE_QUANTILES, axis=0)
    j = np.arange(reference_features.shape[1] - 2, reference_features.shape[1])
    above = [1.0 - float(summary.cdf_below(int(k), np.asarray([h]))[0]) for k, h in zip(j, high, strict=True)]
    under = [float(summary.cdf_below(int(k), np.asarray([lo]))[0]) for k, lo in zip(j, low, strict=True)]
    return ShapeChange(max(above), max(under), float(summary.feature_mean[-2]), float(summary.feature_mean[-1]))


def assess_device_summary(
    device: str,
    summary: SummaryStats,
    reference: DriftReference,
    threshold: float,
    settings: DriftSettings,
    fleet_size: int = 1,
) -> DeviceAssessment:
    """Judge one device from its own summaries (no raw windows), with the rule of :func:`assess_device`.

    The anomaly count is exact; the error shift comes from the score histogram, the feature drift
    and the waveform shape from a normal approximation of each feature (mean, variance).

    Raises:
        DriftError: The summary's feature count or histogram does not fit the reference.
    """
    ref = _matrix(reference.features, "reference features")
    if summary.feature_mean.size != ref.shape[1]:
        raise DriftError(f"{device}: summary has {summary.feature_mean.size} features, the reference {ref.shape[1]}")
    if summary.windows == 0:
        return _no_windows(device, reference, settings)
    evidence = (
        histogram_error_shift(reference.errors, summary.score_edges, summary.score_counts),
        _cdf_feature_drift(ref, [(1.0, summary.cdf_below)], summary.windows, settings),
        _normal_shape(ref, summary),
    )
    speed = (summary.speed_fallback, 0)  # a summary says nothing of coverage: judged like covered windows
    return _judge(
        device, summary.windows, summary.anomalies, evidence, reference, settings, "summary", fleet_size, speed
    )


def _quorum(count: int, n_devices: int, fraction: float) -> int:
    """Fewest devices that speak for ``count`` devices: the fraction of them, and two unless the fleet has one."""
    return max(min(2, n_devices), math.ceil(fraction * count - 1e-9))


def pooled_feature_drift(
    reference_features: npt.ArrayLike,
    device_features: Mapping[str, npt.ArrayLike | SummaryStats],
    assessments: Sequence[DeviceAssessment],
    settings: DriftSettings,
) -> FeatureDrift | None:
    """Feature drift of the pooled windows of the devices judged ``ok``.

    Devices known only from summaries enter as normal distributions with their moments (the
    statistics then become approximate). Returns None when the ``ok`` devices are fewer than
    ``fleet_fraction`` of the fleet (or fewer than two): a part of a heterogeneous fleet is a
    sub-population of the reference, not a drift.
    """
    ok = [a.device for a in assessments if a.verdict == "ok"]
    if not ok or len(ok) < _quorum(len(assessments), len(assessments), settings.fleet_fraction):
        return None
    ref = _matrix(reference_features, "reference features")
    items = [device_features[d] for d in ok]
    arrays = [np.asarray(item, dtype=np.float64) for item in items if not isinstance(item, SummaryStats)]
    if len(arrays) == len(items):
        return feature_drift(ref, np.concatenate(arrays), settings)
    components: list[tuple[float, CdfBelow]] = []
    for item in items:
        if isinstance(item, SummaryStats):
            components.append((float(item.windows), item.cdf_below))
        else:
            columns = np.sort(_matrix(item, "device features", ref.shape[1]), axis=0)
            components.append((float(len(columns)), _empirical_below(columns)))
    return _cdf_feature_drift(ref, components, int(sum(w for w, _ in components)), settings)


def _empirical_below(columns: FloatArray) -> CdfBelow:
    def below(j: int, x: FloatArray) -> FloatArray:
        return np.searchsorted(columns[:, j], x, side="left") / len(columns)

    return below


@dataclass(frozen=True)
class FleetAssessment:
    """The fleet's verdict over one time window, with the device assessments it rests on.

    Attributes:
        verdict: ``ok``, ``data_drift``, ``fault``, ``mixed`` or ``insufficient_data``.
        reasons: One line per fleet-level check: measured value against its limit.
        devices: Every device's assessment.
        pooled: Feature drift of the pooled ``ok`` devices (None when too few).
        kind: What drifted when the fleet's data did: ``new operating point`` (only devices at
            speeds the champion never trained on) or ``data drift``; None otherwise.
    """

    verdict: FleetVerdict
    reasons: tuple[str, ...]
    devices: tuple[DeviceAssessment, ...]
    pooled: FeatureDrift | None
    kind: DriftKind | None = None

    def _with(self, *verdicts: str) -> list[str]:
        return [a.device for a in self.devices if a.verdict in verdicts]

    @property
    def judged_devices(self) -> list[str]:
        """Devices with enough windows."""
        return [a.device for a in self.devices if a.judged]

    @property
    def drift_devices(self) -> list[str]:
        """Devices judged ``drift``."""
        return self._with("drift")

    @property
    def fault_devices(self) -> list[str]:
        """Devices judged ``fault``."""
        return self._with("fault")

    @property
    def new_operating_point_devices(self) -> list[str]:
        """Devices judged ``drift`` because they run mostly at speeds the champion never trained on."""
        return [a.device for a in self.devices if a.new_operating_point]

    @property
    def insufficient_devices(self) -> list[str]:
        """Devices with too few windows."""
        return self._with("insufficient_data")

    @property
    def drift_detected(self) -> bool:
        """Whether the fleet's data drifted (``data_drift`` or ``mixed``): retraining is due."""
        return self.verdict in ("data_drift", "mixed")

    @property
    def alert_devices(self) -> list[str]:
        """Devices to alert about, never one at a new operating point.

        Every abnormal device when the fleet did not drift; the faulty ones when it did; with a drift
        of kind new operating point, also the devices drifted at covered speeds (too few to be the
        fleet's drift).
        """
        if self.verdict == "fault":
            return self._with("drift", "fault")
        if self.kind == NEW_OPERATING_POINT:
            return [a.device for a in self.devices if a.abnormal and not a.new_operating_point]
        if self.verdict == "mixed":
            return self.fault_devices
        return []

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form."""
        return {
            "verdict": self.verdict,
            "kind": self.kind,
            "reasons": list(self.reasons),
            "drift_devices": self.drift_devices,
            "new_operating_point_devices": self.new_operating_point_devices,
            "fault_devices": self.fault_devices,
            "insufficient_devices": self.insufficient_devices,
            "alert_devices": self.alert_devices,
            "pooled": self.pooled.to_dict() if self.pooled else None,
            "devices": [a.to_dict() for a in self.devices],
        }


def assess_fleet(
    assessments: Sequence[DeviceAssessment], settings: DriftSettings, *, pooled: FeatureDrift | None = None
) -> FleetAssessment:
    """Combine device assessments (and the pooled feature drift) into the fleet verdict.

    Args:
        assessments: One assessment per device seen in the window.
        settings: Drift thresholds.
        pooled: :func:`pooled_feature_drift` of the same window, when available.
    """
    devices = tuple(assessments)
    judged = [a for a in devices if a.judged]
    n_drift = sum(a.verdict == "drift" for a in judged)
    n_new_point = sum(a.new_operating_point for a in judged)
    n_fault = sum(a.verdict == "fault" for a in judged)
    if not judged:
        reason = f"no device of {len(devices)} had {settings.min_windows} windows to judge"
        return FleetAssessment("insufficient_data", (reason,), devices, pooled)

    need = _quorum(len(judged), len(devices), settings.fleet_fraction)
    vote = n_drift >= need
    covered_vote = n_drift - n_new_point >= need
    moved = pooled is not None and pooled.n_drifted >= settings.min_drifted_features
    reasons = [
        f"{n_drift}/{len(judged)} judged devices drifted {'>=' if vote else '<'} {need} needed "
        f"(fleet fraction {settings.fleet_fraction:g}); {n_fault} with a fault signature",
    ]
    if n_new_point:
        reasons.append(
            f"{n_new_point} judged devices at a new operating point (more than {NEW_OPERATING_POINT_FRACTION:.0%} "
            "of their windows at speeds the champion never trained on): the fleet's data drifted"
        )
    if pooled is None:
        reasons.append("pooled features: too few ok devices to compare the fleet's operating point")
    else:
        reasons.append(
            f"pooled features of {pooled.n_rows} windows: {pooled.n_drifted} drifted "
            f"{'>=' if moved else '<'} {settings.min_drifted_features}"
            + (f": {pooled.summary()}" if pooled.n_drifted else "")
        )
    if len(judged) < len(devices):
        reasons.append(f"{len(devices) - len(judged)} devices not judged (fewer than {settings.min_windows} windows)")
    fallback = sum(a.speed_fallback for a in devices)
    if fallback:
        reasons.append(f"{fallback} windows without a usable speed, scored at the champion's reference speed")
    verdict: FleetVerdict
    kind: DriftKind | None = None
    if vote or moved or n_new_point:
        kind = DATA_DRIFT if covered_vote or moved else NEW_OPERATING_POINT
        alerted = n_fault + (n_drift - n_new_point if kind == NEW_OPERATING_POINT else 0)
        verdict = "mixed" if alerted else "data_drift"
        reasons.append(f"drift of kind {kind}")
    elif n_fault or n_drift:
        verdict = "fault"
    else:
        verdict = "ok"
    return FleetAssessment(verdict, tuple(reasons), devices, pooled, kind)
