"""The MLPerf Tiny anomaly-detection reference, adapted to vibration windows: a baseline to benchmark against.

MLPerf Tiny's AD reference (mlcommons/tiny, ``benchmark/training/anomaly_detection``, from the DCASE
2020 task 2 baseline) scores machine sound with a fully connected autoencoder on 5 consecutive frames
of 128 log-mel energies (640 inputs; 16 kHz audio, 1024-point FFT, hop 512). Adapted to our data:

- Framing: each 1024-sample window (40 ms at 25.6 kHz) is cut into 5 frames of 256 samples at hop
  192, which cover it exactly (4 x 192 + 256 = 1024). One window gives one 640-value input, frame
  after frame, as the reference concatenates its 5 frames.
- Bands: 128 LINEAR bands, FFT bins 1..128 of the 256-point FFT (100 Hz each at 25.6 kHz, 100 Hz to
  12.8 kHz; DC dropped), log10 of the power plus a small epsilon. Mel bands are not used: a 256-point
  FFT has only 129 bins, so 128 mel bands would mostly repeat single low-frequency bins.
- Per frame: the window mean is removed first (as in our front end), then a periodic Hann window.
- Normalisation: each band's mean and standard deviation over the training frames (pooled over the
  5 frame positions, which mean nothing inside a window). The reference feeds raw dB values; both
  models here get standardised inputs so that only front end and size differ.
- Model: 640-128-128-128-128-8-128-128-128-128-640, ReLU hidden layers, linear output. The
  reference's batch normalisation after each hidden dense layer is omitted: the int8 converter folds
  it into the dense weights, so the deployed graph, its bytes and its MACs are the same.
- Training: the same split, early stopping and threshold percentile as ours (``train_autoencoder``
  with the reference's hidden layers), then full-integer int8 post-training quantization. No pruning:
  the reference is not pruned.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

import numpy as np
import numpy.typing as npt

from tasks.compress import representative_rows, to_tflite_int8
from tasks.train import TrainedModel, TrainingConfig, TrainingData, check_features, train_autoencoder
from tinymlops.errors import TinyMLOpsError

log = logging.getLogger(__name__)

# Hidden dense layers of the MLPerf Tiny AD reference: four of 128, the 8-unit bottleneck, four of 128.
REFERENCE_HIDDEN: tuple[int, ...] = (128, 128, 128, 128, 8, 128, 128, 128, 128)
_EPS = 1e-12
Float32Array = npt.NDArray[np.float32]


class ReferenceFrontEndError(TinyMLOpsError):
    """The reference front end is misconfigured or given windows it cannot frame."""


@dataclass(frozen=True)
class ReferenceFrontEnd:
    """The reference's front end: consecutive frames of log band energies.

    Attributes:
        sample_rate_hz: Rate the windows are sampled at.
        window_samples: Samples per window.
        frame_samples: Samples per frame (FFT length).
        hop_samples: Samples between frame starts.
        n_frames: Frames per window.
        n_bands: Bands per frame: FFT bins 1..n_bands.
        mean: Per-band mean for normalisation (empty until fitted).
        std: Per-band standard deviation for normalisation (empty until fitted).
    """

    sample_rate_hz: int = 25_600
    window_samples: int = 1024
    frame_samples: int = 256
    hop_samples: int = 192
    n_frames: int = 5
    n_bands: int = 128
    mean: tuple[float, ...] = field(default=())
    std: tuple[float, ...] = field(default=())

    def __post_init__(self) -> None:
        covered = (self.n_frames - 1) * self.hop_samples + self.frame_samples
        if min(self.frame_samples, self.hop_samples, self.n_frames, self.n_bands) < 1 or covered > self.window_samples:
            raise ReferenceFrontEndError(
                f"{self.n_frames} frames of {self.frame_samples} samples at hop {self.hop_samples} span "
                f"{covered} samples; the window has {self.window_samples}"
            )
        if self.n_bands > self.frame_samples // 2:
            raise ReferenceFrontEndError(
                f"{self.n_bands} bands exceed the {self.frame_samples // 2} non-DC bins of a "
                f"{self.frame_samples}-point FFT"
            )
        if len(self.mean) not in (0, self.n_bands) or len(self.std) != len(self.mean):
            raise ReferenceFrontEndError(
                f"normalisation needs {self.n_bands} means and stds, got {len(self.mean)}/{len(self.std)}"
            )

    @property
    def n_features(self) -> int:
        """Inputs of the model: frames times bands (640 for the reference)."""
        return self.n_frames * self.n_bands

    @property
    def is_fitted(self) -> bool:
        """Whether normalisation statistics are present."""
        return bool(self.mean)

    @property
    def bin_hz(self) -> float:
        """Width of one FFT bin, which is one band."""
        return self.sample_rate_hz / self.frame_samples

    @cached_property
    def frame_starts(self) -> npt.NDArray[np.int64]:
        """First sample of each frame within the window."""
        return np.arange(self.n_frames, dtype=np.int64) * self.hop_samples

    @cached_property
    def hann(self) -> Float32Array:
        """The periodic Hann window of one frame."""
        n = np.arange(self.frame_samples)
        return (0.5 - 0.5 * np.cos(2 * np.pi * n / self.frame_samples)).astype(np.float32)

    def fitted(self, raw: npt.ArrayLike) -> ReferenceFrontEnd:
        """Return a copy with per-band statistics fitted on raw features (n, n_features)."""
        bands = np.asarray(raw, dtype=np.float64).reshape(-1, self.n_bands)
        mean = bands.mean(axis=0)
        std = np.maximum(bands.std(axis=0), 1e-6)
        return ReferenceFrontEnd(
            self.sample_rate_hz,
            self.window_samples,
            self.frame_samples,
            self.hop_samples,
            self.n_frames,
            self.n_bands,
            tuple(float(v) for v in mean),
            tuple(float(v) for v in std),
        )


def reference_raw_features(windows: npt.ArrayLike, front_end: ReferenceFrontEnd) -> Float32Array:
    """Compute un-normalised reference features: log10 band power of each frame, frames concatenated.

    Args:
        windows: Array (n, window_samples) or (window_samples,).
        front_end: The framing and bands.

    Returns:
        float32 array (n, n_frames * n_bands); columns ``f * n_bands + b`` are band ``b`` of frame ``f``.

    Raises:
        ReferenceFrontEndError: Wrong window length or non-finite samples.
    """
    x = np.asarray(windows, dtype=np.float32)
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim != 2 or x.shape[1] != front_end.window_samples:
        raise ReferenceFrontEndError(f"windows must have shape (n, {front_end.window_samples}), got {x.shape}")
    if not np.isfinite(x).all():
        raise ReferenceFrontEndError("windows contain NaN or infinite samples")
    centred = x - x.mean(axis=1, keepdims=True)
    index = front_end.frame_starts[:, None] + np.arange(front_end.frame_samples)[None, :]
    frames = centred[:, index] * front_end.hann  # (n, n_frames, frame_samples)
    power = np.abs(np.fft.rfft(frames, axis=2)) ** 2
    log_bands = np.log10(power[:, :, 1 : front_end.n_bands + 1] + _EPS)
    return log_bands.reshape(len(x), front_end.n_features).astype(np.float32)


def fit_reference_front_end(train_windows: npt.ArrayLike, front_end: ReferenceFrontEnd) -> ReferenceFrontEnd:
    """Fit the per-band normalisation on training windows only and return the fitted front end."""
    raw = reference_raw_features(train_windows, front_end)
    return front_end.fitted(raw)


def reference_features(windows: npt.ArrayLike, front_end: ReferenceFrontEnd) -> Float32Array:
    """Normalised reference features (n, 640): what the reference autoencoder sees."""
    if not front_end.is_fitted:
        raise ReferenceFrontEndError("reference front end has no normalisation statistics; fit it first")
    raw = reference_raw_features(windows, front_end).reshape(-1, front_end.n_frames, front_end.n_bands)
    mean = np.asarray(front_end.mean, dtype=np.float32)
    std = np.asarray(front_end.std, dtype=np.float32)
    normalised = ((raw - mean) / std).reshape(len(raw), front_end.n_features)
    return check_features(normalised, name="reference features")


def reference_layer_sizes(n_features: int = 640) -> list[int]:
    """Widths of the reference's dense stack, input first: 640-128-128-128-128-8-128-128-128-128-640."""
    return [n_features, *REFERENCE_HIDDEN, n_features]


def reference_training_config(config: TrainingConfig) -> TrainingConfig:
    """Our training configuration with the reference's hidden layers and post-training int8 quantization.

    Split fractions, seed, epochs, early stopping and the threshold percentile stay ours, so both
    models are trained and calibrated the same way; pruning settings are unused (no pruning).
    """
    data = config.model_dump()
    data["hidden"] = list(REFERENCE_HIDDEN)
    data["quantization"]["mode"] = "ptq"
    return TrainingConfig.model_validate(data)


@dataclass(frozen=True)
class ReferenceFeatureSets:
    """The reference's feature sets of one run, made from the same windows as ours.

    Attributes:
        parts: Train, validation (early stopping) and calibration (threshold) normal features.
        test_normal: Held-out normal features, for evaluation only.
        faults: Fault features by class, for evaluation only.
        front_end: The front end fitted on the train part.
    """

    parts: TrainingData
    test_normal: Float32Array
    faults: dict[str, Float32Array]
    front_end: ReferenceFrontEnd


def build_reference_feature_sets(
    train_normal: npt.ArrayLike,
    test_normal: npt.ArrayLike,
    faults: dict[str, npt.NDArray[np.float32]],
    front_end: ReferenceFrontEnd,
    config: TrainingConfig,
) -> ReferenceFeatureSets:
    """Split the training windows exactly as ours are split, fit on the train part, featurize everything.

    The split is :meth:`TrainingData.split` with the same fractions and seed as
    ``tasks.train.prepare_training_data``, so the two models see the same windows in each part.
    """
    windows = TrainingData.split(
        np.asarray(train_normal, dtype=np.float32),
        validation_fraction=config.validation_fraction,
        calibration_fraction=config.calibration_fraction,
        seed=config.seed,
        min_windows=config.min_windows,
    )
    fitted = fit_reference_front_end(windows.train, front_end)
    return ReferenceFeatureSets(
        parts=windows.map(lambda part: reference_features(part, fitted)),
        test_normal=reference_features(test_normal, fitted),
        faults={name: reference_features(w, fitted) for name, w in faults.items()},
        front_end=fitted,
    )


@dataclass(frozen=True)
class ReferenceModel:
    """The trained reference and its deployable int8 flatbuffer."""

    trained: TrainedModel
    int8_model: bytes

    @property
    def model(self) -> Any:
        """The float tf-keras model."""
        return self.trained.model


def train_reference(features: ReferenceFeatureSets, config: TrainingConfig) -> ReferenceModel:
    """Train the reference autoencoder like ours and quantize it to full-integer int8 (PTQ, no pruning).

    Args:
        features: The reference's feature sets.
        config: Our training configuration; :func:`reference_training_config` makes the reference's.
    """
    reference_config = reference_training_config(config)
    trained = train_autoencoder(features.parts.train, features.parts.validation, reference_config)
    int8_model = to_tflite_int8(trained.model, representative_rows(features.parts.train, reference_config))
    log.info("reference int8 model: %d bytes", len(int8_model))
    return ReferenceModel(trained, int8_model)
