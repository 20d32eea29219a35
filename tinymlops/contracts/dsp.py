"""The one DSP front end: a vibration window becomes a small feature vector.

Training (server) and scoring (device runtime) both call :func:`extract_features` with the
:class:`DspSpec` stored next to each model; it is a contract between them (pure numpy, nothing of
the project), and the C front ends in ``firmware/c`` are its twins, held to it by parity tests.
The steps are chosen to be cheap on a Cortex-M with CMSIS-DSP: remove the mean, Hann window,
real FFT, sum of |X|^2 over log-spaced bands, log10 of each band energy, plus log RMS, kurtosis
and crest factor. Normalisation statistics
(mean, std per feature) are fitted on training windows and stored in the spec.

Speed-aware normalisation (spec version 2): a machine's vibration grows with its shaft speed (broadband
rolling and flow noise, shaft lines, impacts), so at another speed every band moves at once and a
model trained at one speed flags the healthy machine. When the training windows span enough speeds,
each feature's mean becomes a line in log10(rpm): ``mean + slope * log10(rpm / reference)``. The
model then sees what is left after the speed trend, which holds between and across the trained
speeds and keeps the normal cloud tight (small faults stay visible). The speed of a window comes
from the tachometer value in its wire format; a window without a usable speed is normalised at the
reference speed (the fallback) and counted by its caller. The spec also records which speeds the
training covered, so the monitor can tell a new operating point from a changed machine.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from functools import cached_property
from typing import Any

import numpy as np
import numpy.typing as npt

DSP_SPEC_VERSION = 2
READABLE_VERSIONS = (1, 2)
_EPS = 1e-12
COVERAGE_MARGIN = 0.05
"""A speed within 5 % of a covered interval counts as covered (tachometers and speed control drift by ~1 %)."""
COVERAGE_GAP = 0.10
"""Training speeds closer than 10 % (relative) form one covered interval; a wider gap is not covered."""
MIN_SPEED_SPAN = 1.15
"""The speed trend is fitted only when training speeds span this ratio (5th to 95th percentile): over a
narrower span the trend of a band is lost in its window-to-window spread, and extrapolating a noisy slope
would move the normal cloud (measured: slopes fitted over a fleet's +/-2 % speed offsets)."""
DEFAULT_VALID_RPM = (60.0, 60_000.0)
Float32Array = npt.NDArray[np.float32]


@dataclass(frozen=True)
class DspSpec:
    """A versioned, serialisable description of the feature front end.

    Attributes:
        sample_rate_hz: Rate the windows are sampled at.
        window_samples: Samples per window (a power of two for the FFT).
        n_bands: Number of log-spaced spectral bands.
        f_min_hz: Lower edge of the first band.
        version: Spec version; a device refuses a spec version it does not implement.
        mean: Per-feature mean for normalisation at the reference speed (empty until fitted).
        std: Per-feature standard deviation for normalisation (empty until fitted).
        speed_reference_rpm: Reference speed of the speed trend; 0 for a speed-unaware spec.
        speed_slope: Per-feature change of the raw feature per decade of rpm (empty: no trend).
        speed_coverage_rpm: Speed intervals (low, high) the training windows covered.
        speed_valid_rpm: Speeds outside this range, non-finite or missing are unusable (fallback).
    """

    sample_rate_hz: int = 25_600
    window_samples: int = 1024
    n_bands: int = 32
    f_min_hz: float = 25.0
    version: int = DSP_SPEC_VERSION
    mean: tuple[float, ...] = field(default=())
    std: tuple[float, ...] = field(default=())
    speed_reference_rpm: float = 0.0
    speed_slope: tuple[float, ...] = field(default=())
    speed_coverage_rpm: tuple[tuple[float, float], ...] = field(default=())
    speed_valid_rpm: tuple[float, float] = DEFAULT_VALID_RPM

    def __post_init__(self) -> None:
        if self.window_samples & (self.window_samples - 1):
            raise ValueError(f"window_samples must be a power of two, got {self.window_samples}")
        if self.version not in READABLE_VERSIONS:
            raise ValueError(f"DSP spec version {self.version} is not implemented (this code: {READABLE_VERSIONS})")
        if len(self.mean) not in (0, self.n_features) or len(self.std) != len(self.mean):
            raise ValueError(
                f"normalisation needs {self.n_features} means and stds, got {len(self.mean)}/{len(self.std)}"
            )
        low, high = self.speed_valid_rpm
        if not 0 < low < high:
            raise ValueError(f"valid speed range {self.speed_valid_rpm} rpm must be 0 < low < high")
        if not (self.speed_reference_rpm == 0 or low <= self.speed_reference_rpm <= high):
            raise ValueError(f"speed reference {self.speed_reference_rpm} rpm is outside {self.speed_valid_rpm}")
        if len(self.speed_slope) not in (0, self.n_features) or (self.speed_slope and not self.speed_aware):
            raise ValueError(
                f"speed trend needs {self.n_features} slopes and a reference speed, "
                f"got {len(self.speed_slope)} at {self.speed_reference_rpm} rpm"
            )
        if any(not 0 < a <= b for a, b in self.speed_coverage_rpm):
            raise ValueError(f"speed coverage {self.speed_coverage_rpm} must be intervals 0 < low <= high")
        if self.version == 1 and (self.speed_aware or self.speed_coverage_rpm):
            raise ValueError("a version-1 DSP spec has no speed fields")

    @property
    def speed_aware(self) -> bool:
        """Whether the spec knows a reference speed (version 2 with speed data)."""
        return self.speed_reference_rpm > 0

    @property
    def n_features(self) -> int:
        """Length of the feature vector: bands plus log RMS, kurtosis and crest factor."""
        return self.n_bands + 3

    @property
    def is_fitted(self) -> bool:
        """Whether normalisation statistics are present."""
        return bool(self.mean)

    @cached_property
    def band_edges(self) -> npt.NDArray[np.int64]:
        """FFT bin index edges of the bands (length n_bands + 1), each band at least one bin wide."""
        n_bins = self.window_samples // 2 + 1
        bin_hz = self.sample_rate_hz / self.window_samples
        first = max(1, round(self.f_min_hz / bin_hz))
        edges = np.round(np.geomspace(first, n_bins, self.n_bands + 1)).astype(np.int64)
        for i in range(1, edges.size):
            edges[i] = max(edges[i], edges[i - 1] + 1)
        if edges[-1] > n_bins:
            raise ValueError(f"{self.n_bands} bands of at least one bin do not fit in {n_bins - first} bins")
        return edges

    @cached_property
    def hann(self) -> Float32Array:
        """The periodic Hann window, as the device stores it in a table."""
        n = np.arange(self.window_samples)
        return (0.5 - 0.5 * np.cos(2 * np.pi * n / self.window_samples)).astype(np.float32)

    def fitted(self, features: Float32Array, rpm: npt.ArrayLike | None = None) -> DspSpec:
        """Return a copy with normalisation statistics fitted on raw features.

        Args:
            features: Raw features of the training windows, (n, n_features).
            rpm: Shaft speed of each window (NaN where unknown); None: no speed data, a
                speed-unaware spec (today's fixed-frequency normalisation).

        Returns:
            A version-1 spec without usable speeds (today's); else a version-2 spec that records the
            reference (geometric mean) speed and the covered intervals, and, when the speeds span
            :data:`MIN_SPEED_SPAN`, each feature's trend per decade of rpm (least squares on the windows
            with a usable speed).
        """
        features = np.asarray(features, dtype=np.float64)
        speeds = np.full(len(features), np.nan) if rpm is None else np.asarray(rpm, dtype=np.float64).reshape(-1)
        if speeds.shape[0] != features.shape[0]:
            raise ValueError(f"{speeds.shape[0]} speeds for {features.shape[0]} feature rows")
        low, high = self.speed_valid_rpm
        usable = np.isfinite(speeds) & (speeds >= low) & (speeds <= high)
        reference, slope = 0.0, np.zeros(0)
        coverage: tuple[tuple[float, float], ...] = ()
        centred = features.mean(axis=0)
        if usable.any():
            log_speed = np.log10(speeds[usable])
            reference = float(10 ** log_speed.mean())
            coverage = _coverage(speeds[usable])
            span = np.percentile(log_speed, 95) - np.percentile(log_speed, 5)
            offset = np.log10(np.where(usable, speeds, reference) / reference)
            if 10**span >= MIN_SPEED_SPAN:
                design = np.stack([np.ones(int(usable.sum())), log_speed - np.log10(reference)], axis=1)
                coef, *_ = np.linalg.lstsq(design, features[usable], rcond=None)
                centred, slope = coef[0], coef[1]
            trend = centred + offset[:, None] * (slope if slope.size else 0.0)
            std = np.maximum((features - trend).std(axis=0), 1e-6)
        else:
            std = np.maximum(features.std(axis=0), 1e-6)
        return replace(
            self,
            # without speed data the spec stays version 1, readable by devices built before speed awareness
            version=DSP_SPEC_VERSION if reference else 1,
            mean=tuple(float(v) for v in centred),
            std=tuple(float(v) for v in std),
            speed_reference_rpm=reference,
            speed_slope=tuple(float(v) for v in slope),
            speed_coverage_rpm=coverage,
        )

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable dict."""
        data = asdict(self)
        data["mean"], data["std"] = list(self.mean), list(self.std)
        data["speed_slope"] = list(self.speed_slope)
        data["speed_coverage_rpm"] = [list(interval) for interval in self.speed_coverage_rpm]
        data["speed_valid_rpm"] = list(self.speed_valid_rpm)
        return data

    def to_json(self) -> str:
        """Return the spec as JSON text."""
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DspSpec:
        """Build a spec from :meth:`to_dict` output."""
        return cls(
            sample_rate_hz=int(data["sample_rate_hz"]),
            window_samples=int(data["window_samples"]),
            n_bands=int(data["n_bands"]),
            f_min_hz=float(data["f_min_hz"]),
            version=int(data["version"]),
            mean=tuple(float(v) for v in data.get("mean", ())),
            std=tuple(float(v) for v in data.get("std", ())),
            speed_reference_rpm=float(data.get("speed_reference_rpm", 0.0)),
            speed_slope=tuple(float(v) for v in data.get("speed_slope", ())),
            speed_coverage_rpm=tuple((float(a), float(b)) for a, b in data.get("speed_coverage_rpm", ())),
            speed_valid_rpm=tuple(float(v) for v in data.get("speed_valid_rpm", DEFAULT_VALID_RPM)),  # type: ignore[arg-type]
        )

    @classmethod
    def from_json(cls, text: str) -> DspSpec:
        """Parse a spec from JSON text."""
        return cls.from_dict(json.loads(text))


def raw_features(windows: npt.ArrayLike, spec: DspSpec) -> Float32Array:
    """Compute un-normalised features for a batch of windows.

    Args:
        windows: Array (n, window_samples) or (window_samples,) in physical units.
        spec: The front-end spec.

    Returns:
        float32 array (n, spec.n_features).
    """
    x = np.asarray(windows, dtype=np.float32)
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim != 2 or x.shape[1] != spec.window_samples:
        raise ValueError(f"windows must have shape (n, {spec.window_samples}), got {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("windows contain NaN or infinite samples")
    centred = x - x.mean(axis=1, keepdims=True)
    power = np.abs(np.fft.rfft(centred * spec.hann, axis=1)) ** 2
    # float64 running sum: band energies are differences of it, float32 cancels next to strong shaft lines
    cumulative = np.concatenate([np.zeros((power.shape[0], 1)), np.cumsum(power, axis=1, dtype=np.float64)], axis=1)
    edges = spec.band_edges
    bands = cumulative[:, edges[1:]] - cumulative[:, edges[:-1]]
    log_bands = np.log10(bands + _EPS)
    m2 = np.mean(centred**2, axis=1)
    m4 = np.mean(centred**4, axis=1)
    rms = np.sqrt(m2)
    kurtosis = m4 / np.maximum(m2**2, _EPS)
    crest = np.max(np.abs(centred), axis=1) / np.maximum(rms, _EPS)
    stats = np.stack([np.log10(rms + _EPS), np.log10(kurtosis + _EPS), crest], axis=1)
    return np.concatenate([log_bands, stats], axis=1).astype(np.float32)


def _coverage(speeds: npt.NDArray[np.float64]) -> tuple[tuple[float, float], ...]:
    """Group sorted speeds into intervals, splitting where neighbours are more than COVERAGE_GAP apart."""
    ordered = np.sort(speeds)
    intervals: list[tuple[float, float]] = []
    start = previous = float(ordered[0])
    for value in ordered[1:]:
        if value > previous * (1 + COVERAGE_GAP):
            intervals.append((start, previous))
            start = float(value)
        previous = float(value)
    intervals.append((start, previous))
    return tuple(intervals)


def usable_speed(rpm: npt.ArrayLike | None, spec: DspSpec, n: int) -> npt.NDArray[np.bool_]:
    """Which of ``n`` windows have a usable speed: finite and inside the spec's valid range."""
    if rpm is None:
        return np.zeros(n, dtype=bool)
    speeds = np.broadcast_to(np.asarray(rpm, dtype=np.float64), (n,))
    low, high = spec.speed_valid_rpm
    with np.errstate(invalid="ignore"):
        return np.isfinite(speeds) & (speeds >= low) & (speeds <= high)


def resolve_speed(
    rpm: npt.ArrayLike | None, spec: DspSpec, n: int
) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.bool_]]:
    """The speed each of ``n`` windows is normalised at, and which fell back to the reference.

    Args:
        rpm: Speed per window (or one for all; NaN or None where unknown).
        spec: The front-end spec.
        n: Number of windows.

    Returns:
        Speeds (rpm) to normalise at, and a mask of the windows whose own speed was unusable
        (missing, non-finite, outside ``spec.speed_valid_rpm``) and that got the reference speed.
        A speed-unaware spec uses no speed: nothing falls back.
    """
    if not spec.speed_aware:
        return np.zeros(n), np.zeros(n, dtype=bool)
    usable = usable_speed(rpm, spec, n)
    speeds = np.broadcast_to(np.asarray(rpm if rpm is not None else np.nan, dtype=np.float64), (n,))
    return np.where(usable, speeds, spec.speed_reference_rpm), ~usable


def covered(rpm: npt.ArrayLike, spec: DspSpec) -> npt.NDArray[np.bool_]:
    """Whether each speed lies inside an operating interval the training covered (with a 5 % margin)."""
    speeds = np.atleast_1d(np.asarray(rpm, dtype=np.float64))
    inside = np.zeros(speeds.shape, dtype=bool)
    for low, high in spec.speed_coverage_rpm:
        with np.errstate(invalid="ignore"):
            inside |= (speeds >= low * (1 - COVERAGE_MARGIN)) & (speeds <= high * (1 + COVERAGE_MARGIN))
    return inside


def normalise(features: Float32Array, spec: DspSpec, rpm: npt.ArrayLike | None = None) -> Float32Array:
    """Apply the spec's stored normalisation to raw features, at each window's speed.

    Args:
        features: Raw features, (n, n_features).
        spec: The fitted front-end spec.
        rpm: Speed per window (NaN or None where unknown: the reference speed is used).
    """
    if not spec.is_fitted:
        raise ValueError("DSP spec has no normalisation statistics; fit it on training windows first")
    mean = np.asarray(spec.mean, dtype=np.float32)
    std = np.asarray(spec.std, dtype=np.float32)
    if spec.speed_slope:
        speeds, _ = resolve_speed(rpm, spec, len(features))
        offset = np.log10(speeds / spec.speed_reference_rpm).astype(np.float32)
        mean = mean + offset[:, None] * np.asarray(spec.speed_slope, dtype=np.float32)
    return ((features - mean) / std).astype(np.float32)


def extract_features(windows: npt.ArrayLike, spec: DspSpec, rpm: npt.ArrayLike | None = None) -> Float32Array:
    """Compute normalised features: what the autoencoder sees, on the server and on the device."""
    return normalise(raw_features(windows, spec), spec, rpm)
