"""The one DSP front end: a vibration window becomes a small feature vector.

Training (server) and scoring (device runtime) both call :func:`extract_features` with the
:class:`DspSpec` stored next to each model. The steps are chosen to be cheap on a Cortex-M
with CMSIS-DSP: remove the mean, Hann window, real FFT, sum of |X|^2 over log-spaced bands,
log10 of each band energy, plus log RMS, kurtosis and crest factor. Normalisation statistics
(mean, std per feature) are fitted on training windows and stored in the spec.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
import numpy.typing as npt

DSP_SPEC_VERSION = 1
_EPS = 1e-12
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
        mean: Per-feature mean for normalisation (empty until fitted).
        std: Per-feature standard deviation for normalisation (empty until fitted).
    """

    sample_rate_hz: int = 25_600
    window_samples: int = 1024
    n_bands: int = 32
    f_min_hz: float = 25.0
    version: int = DSP_SPEC_VERSION
    mean: tuple[float, ...] = field(default=())
    std: tuple[float, ...] = field(default=())

    def __post_init__(self) -> None:
        if self.window_samples & (self.window_samples - 1):
            raise ValueError(f"window_samples must be a power of two, got {self.window_samples}")
        if self.version != DSP_SPEC_VERSION:
            raise ValueError(f"DSP spec version {self.version} is not implemented (this code: {DSP_SPEC_VERSION})")
        if len(self.mean) not in (0, self.n_features) or len(self.std) != len(self.mean):
            raise ValueError(
                f"normalisation needs {self.n_features} means and stds, got {len(self.mean)}/{len(self.std)}"
            )

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

    def fitted(self, features: Float32Array) -> DspSpec:
        """Return a copy with normalisation statistics fitted on raw features."""
        mean = features.mean(axis=0)
        std = np.maximum(features.std(axis=0), 1e-6)
        return DspSpec(
            self.sample_rate_hz,
            self.window_samples,
            self.n_bands,
            self.f_min_hz,
            self.version,
            tuple(float(v) for v in mean),
            tuple(float(v) for v in std),
        )

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable dict."""
        data = asdict(self)
        data["mean"], data["std"] = list(self.mean), list(self.std)
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


def normalise(features: Float32Array, spec: DspSpec) -> Float32Array:
    """Apply the spec's stored normalisation to raw features."""
    if not spec.is_fitted:
        raise ValueError("DSP spec has no normalisation statistics; fit it on training windows first")
    mean = np.asarray(spec.mean, dtype=np.float32)
    std = np.asarray(spec.std, dtype=np.float32)
    return ((features - mean) / std).astype(np.float32)


def extract_features(windows: npt.ArrayLike, spec: DspSpec) -> Float32Array:
    """Compute normalised features: what the autoencoder sees, on the server and on the device."""
    return normalise(raw_features(windows, spec), spec)
