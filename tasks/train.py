"""Train the dense anomaly autoencoder on normal vibration features and calibrate its threshold.

The autoencoder learns to reconstruct the DSP features of normal windows; a window whose
reconstruction error exceeds a high percentile of the errors on held-out normal windows is an
anomaly. Normal windows are split three ways so nothing is scored that the model trained on:
train (fits weights and the feature normalisation), validation (early stopping) and calibration
(threshold).
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from types import ModuleType
from typing import Annotated, Any, Literal

import numpy as np
import numpy.typing as npt
import yaml
from prefect import task
from prefect.cache_policies import NO_CACHE
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from tasks.lake import LakeWindows
from tinymlops.contracts.dsp import DspSpec, extract_features, raw_features
from tinymlops.contracts.scoring import anomaly_scores
from tinymlops.errors import ConfigError, TinyMLOpsError
from tinymlops.tfcompat import import_tf, quiet_tensorflow

log = logging.getLogger(__name__)

Float32Array = npt.NDArray[np.float32]
Predictor = Callable[[Float32Array], Any]
# TensorFlow's native (absl) log lines and converter chatter, which bypass TF_CPP_MIN_LOG_LEVEL.


class TrainingDataError(TinyMLOpsError):
    """The windows or features given for training cannot train a model."""


class PruningConfig(BaseModel):
    """Magnitude pruning with a PolynomialDecay sparsity schedule, then a fine-tune."""

    model_config = ConfigDict(extra="forbid")

    target_sparsity: float = Field(default=0.5, ge=0.0, lt=1.0, description="Final fraction of zero weights.")
    begin_step: int = Field(default=0, ge=0, description="Optimizer step at which pruning starts.")
    end_step: int | None = Field(
        default=None, ge=1, description="Step at which target sparsity is reached; unset: 75% of the fine-tune steps."
    )
    frequency: int = Field(default=10, ge=1, description="Steps between mask updates.")
    fine_tune_epochs: int = Field(default=20, ge=1, description="Epochs of training while pruning.")
    learning_rate: float = Field(default=5e-4, gt=0, description="Fine-tune learning rate.")

    @model_validator(mode="after")
    def _steps_ordered(self) -> PruningConfig:
        if self.end_step is not None and self.end_step <= self.begin_step:
            raise ValueError(f"end_step {self.end_step} must be after begin_step {self.begin_step}")
        return self


class QuantizationConfig(BaseModel):
    """How the pruned model becomes a full-integer (int8) model."""

    model_config = ConfigDict(extra="forbid")

    mode: Literal["qat", "ptq"] = Field(
        default="qat", description="qat: pruning-preserving quantization-aware training; ptq: post-training."
    )
    qat_epochs: int = Field(default=10, ge=1, description="Epochs of quantization-aware fine-tuning (qat only).")
    learning_rate: float = Field(default=1e-3, gt=0, description="QAT fine-tune learning rate.")
    representative_samples: int = Field(default=200, ge=1, description="Training rows used to calibrate int8 ranges.")


class QualityGateConfig(BaseModel):
    """Limits of the evaluated model.

    The AUC limits stop the flow before anything is packaged. The false-alarm limits are absolute
    promotion gates: a model that misses them is registered but stays a candidate, with the reason
    recorded (``registry/PROMOTION.md``), whatever the current champion does.
    """

    model_config = ConfigDict(extra="forbid")

    min_auc_int8: float = Field(default=0.95, ge=0, le=1, description="Lowest ROC-AUC of the int8 model.")
    max_auc_loss_int8: float = Field(default=0.01, ge=0, le=1, description="Largest AUC drop from float to int8.")
    max_auc_gap_tflm: float = Field(default=0.01, ge=0, le=1, description="Largest AUC gap int8 TFLite vs TFLM.")
    max_false_alarm_rate: float = Field(
        default=0.02,
        gt=0,
        le=1,
        description="Largest upper confidence bound of the false-alarm rate on held-out normal windows (1: no limit).",
    )
    false_alarm_confidence: float = Field(
        default=0.95, gt=0, lt=1, description="Confidence of that one-sided (Clopper-Pearson) upper bound."
    )
    min_calibration_windows: int = Field(
        default=199, ge=1, description="Fewest calibration windows behind the threshold of a model to promote."
    )


class TrainingConfig(BaseModel):
    """The committed training configuration (``data/training.yaml``)."""

    model_config = ConfigDict(extra="forbid")

    hidden: list[Annotated[int, Field(ge=1)]] = Field(
        default=[24, 8, 24], min_length=1, description="Units of the hidden dense layers."
    )
    epochs: int = Field(default=200, ge=1, description="Maximum training epochs.")
    batch_size: int = Field(default=32, ge=1, description="Mini-batch size.")
    learning_rate: float = Field(default=1e-3, gt=0, description="Adam learning rate.")
    patience: int = Field(default=15, ge=1, description="Epochs without validation improvement before stopping.")
    min_delta: float = Field(default=1e-4, ge=0, description="Smallest validation-loss decrease that counts.")
    validation_fraction: float = Field(default=0.15, gt=0, lt=0.5, description="Normal windows held out for stopping.")
    calibration_fraction: float = Field(
        default=0.15, gt=0, lt=0.5, description="Normal windows held out for threshold."
    )
    threshold_percentile: float = Field(default=99.5, gt=0, le=100, description="Percentile of calibration errors.")
    min_windows: int = Field(default=32, ge=3, description="Fewest normal windows a training run accepts.")
    seed: int = Field(default=42, ge=0, description="Seed of the split, weight initialisation and shuffling.")
    pruning: PruningConfig = Field(default_factory=PruningConfig)
    quantization: QuantizationConfig = Field(default_factory=QuantizationConfig)
    gates: QualityGateConfig = Field(default_factory=QualityGateConfig)


def load_training_config(path: Path | str) -> TrainingConfig:
    """Read and validate a training configuration file.

    Args:
        path: YAML file (the ``training_config`` setting is ``data/training.yaml``).

    Returns:
        The validated configuration.

    Raises:
        ConfigError: The file is missing, is not YAML mapping, or a field is invalid (named in the message).

    """
    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read training config {path}: {exc.strerror or exc}") from exc
    except yaml.YAMLError as exc:
        raise ConfigError(f"training config {path} is not valid YAML: {' '.join(str(exc).split())}") from exc
    if not isinstance(data, dict):
        raise ConfigError(f"training config {path} must be a mapping, got {type(data).__name__}")
    try:
        return TrainingConfig.model_validate(data)
    except ValidationError as exc:
        error = exc.errors()[0]
        field = ".".join(str(part) for part in error["loc"]) or "<root>"
        got = f" (got {error['input']!r})" if "input" in error and not isinstance(error["input"], dict) else ""
        raise ConfigError(f"training config {path}: {field}: {error['msg']}{got}") from exc


@dataclass(frozen=True)
class TrainingData:
    """Normal rows (windows or features) split into train, validation and calibration parts."""

    train: npt.NDArray[Any]
    validation: npt.NDArray[Any]
    calibration: npt.NDArray[Any]

    @classmethod
    def split(
        cls,
        normal: npt.NDArray[Any],
        *,
        validation_fraction: float,
        calibration_fraction: float,
        seed: int,
        min_windows: int = 32,
    ) -> TrainingData:
        """Split normal rows at random (seeded) into the three disjoint parts.

        Args:
            normal: Rows of normal windows or features, shape (n, ...).
            validation_fraction: Fraction held out for early stopping.
            calibration_fraction: Fraction held out for the threshold.
            seed: Seed of the permutation.
            min_windows: Fewest rows accepted.

        Raises:
            TrainingDataError: Fewer than ``min_windows`` rows.

        """
        n = len(normal)
        if n < min_windows:
            raise TrainingDataError(f"too few normal windows to train: {n} < minimum {min_windows}")
        n_val = max(1, round(n * validation_fraction))
        n_cal = max(1, round(n * calibration_fraction))
        order = np.random.default_rng(seed).permutation(n)
        val, cal, train = np.split(order, [n_val, n_val + n_cal])
        # Sorting keeps each part in time order, which makes results easier to read back.
        return cls(normal[np.sort(train)], normal[np.sort(val)], normal[np.sort(cal)])

    def map(self, fn: Callable[[npt.NDArray[Any]], npt.NDArray[Any]]) -> TrainingData:
        """Apply ``fn`` to each part (for example windows to features)."""
        return TrainingData(fn(self.train), fn(self.validation), fn(self.calibration))


def _samples(windows: LakeWindows | npt.ArrayLike, spec: DspSpec) -> npt.NDArray[np.float32]:
    if isinstance(windows, LakeWindows):
        if len(windows) and windows.sample_rate_hz != spec.sample_rate_hz:
            raise TrainingDataError(
                f"windows are sampled at {windows.sample_rate_hz} Hz but the DSP spec expects {spec.sample_rate_hz} Hz"
            )
        return windows.samples
    return np.asarray(windows, dtype=np.float32)


def _speeds(windows: LakeWindows | npt.ArrayLike, rpm: npt.ArrayLike | None) -> npt.NDArray[np.float32] | None:
    """The windows' shaft speeds: given, else the lake rows' own, else None (not known)."""
    if rpm is not None:
        return np.asarray(rpm, dtype=np.float32).reshape(-1)
    return windows.rpm if isinstance(windows, LakeWindows) else None


def fit_feature_spec(
    train_windows: LakeWindows | npt.ArrayLike, spec: DspSpec, rpm: npt.ArrayLike | None = None
) -> DspSpec:
    """Fit the feature normalisation on training windows only and return the fitted spec.

    Args:
        train_windows: Training windows (lake rows or an (n, window_samples) array).
        spec: The DSP front end.
        rpm: Shaft speed per window (NaN where not known); default: the lake rows' own speeds.
    """
    samples = _samples(train_windows, spec)
    if len(samples) == 0:
        raise TrainingDataError("no training windows to fit the feature normalisation on")
    return spec.fitted(raw_features(samples, spec), _speeds(train_windows, rpm))


def featurize(windows: LakeWindows | npt.ArrayLike, spec: DspSpec, rpm: npt.ArrayLike | None = None) -> Float32Array:
    """Turn windows into normalised features with the same front end the device runs, at their speeds."""
    return check_features(extract_features(_samples(windows, spec), spec, _speeds(windows, rpm)))


def prepare_training_data(
    normal_windows: LakeWindows | npt.ArrayLike,
    spec: DspSpec,
    config: TrainingConfig,
    rpm: npt.ArrayLike | None = None,
) -> tuple[TrainingData, DspSpec]:
    """Split normal windows, fit the normalisation on the train part, and featurize every part.

    Args:
        normal_windows: Normal windows (lake rows or an (n, window_samples) array).
        spec: The DSP front end (unfitted or fitted: it is refitted on the train part).
        config: Training configuration (split fractions, seed, minimum windows).
        rpm: Shaft speed per window (NaN where not known); default: the lake rows' own speeds.

    Returns:
        The features of each part and the fitted DSP spec to ship with the model.

    """
    samples = _samples(normal_windows, spec)
    speeds = _speeds(normal_windows, rpm)
    split = partial(
        TrainingData.split,
        validation_fraction=config.validation_fraction,
        calibration_fraction=config.calibration_fraction,
        seed=config.seed,
        min_windows=config.min_windows,
    )
    windows = split(samples)
    if speeds is None:
        fitted = fit_feature_spec(windows.train, spec)
        return windows.map(lambda part: featurize(part, fitted)), fitted
    part_speeds = split(speeds)  # the same seed permutes the speeds exactly as the windows
    fitted = fit_feature_spec(windows.train, spec, part_speeds.train)
    return TrainingData(
        featurize(windows.train, fitted, part_speeds.train),
        featurize(windows.validation, fitted, part_speeds.validation),
        featurize(windows.calibration, fitted, part_speeds.calibration),
    ), fitted


def check_features(features: npt.ArrayLike, *, name: str = "features") -> Float32Array:
    """Return features as a 2-D float32 array, rejecting NaN or infinite values."""
    x = np.asarray(features, dtype=np.float32)
    if x.ndim != 2 or x.shape[0] == 0:
        raise TrainingDataError(f"{name} must be a non-empty (n, n_features) array, got shape {x.shape}")
    bad = ~np.isfinite(x)
    if bad.any():
        raise TrainingDataError(
            f"{name} contain {int(bad.sum())} NaN or infinite values in {int(bad.any(axis=1).sum())} of {len(x)} rows"
        )
    return x


def tf_modules() -> tuple[ModuleType, ModuleType]:
    """Import TensorFlow and tf-keras (lazily, quietly)."""
    return import_tf()


def seed_everything(seed: int) -> None:
    """Seed Python, NumPy and TensorFlow and ask for deterministic kernels.

    Op determinism is process-wide and cannot be switched off again; dense CPU kernels support it.
    """
    tf, tf_keras = tf_modules()
    # The first TensorFlow call initialises devices, which logs natively (for example a missing CUDA driver).
    with quiet_tensorflow():
        tf_keras.utils.set_random_seed(seed)
        try:
            tf.config.experimental.enable_op_determinism()
        except (AttributeError, RuntimeError) as exc:  # older TF or an already-initialised runtime
            log.debug("op determinism unavailable: %s", exc)


def build_autoencoder(n_features: int, hidden: list[int] | tuple[int, ...], seed: int) -> Any:
    """Build an uncompiled dense autoencoder: relu hidden layers and a linear output.

    Args:
        n_features: Input and output width.
        hidden: Units of each hidden layer, for example ``[24, 8, 24]``.
        seed: Seed of the weight initialisation.

    Returns:
        A tf-keras ``Sequential`` model.

    """
    _, tf_keras = tf_modules()
    tf_keras.utils.set_random_seed(seed)
    layers = [tf_keras.layers.Input((n_features,), name="features")]
    layers += [tf_keras.layers.Dense(units, activation="relu", name=f"dense_{i}") for i, units in enumerate(hidden)]
    layers.append(tf_keras.layers.Dense(n_features, name="reconstruction"))
    return tf_keras.Sequential(layers, name="autoencoder")


def dense_macs(layer_sizes: list[int] | tuple[int, ...]) -> int:
    """Multiply-accumulates of one inference of a dense stack with these layer widths (input first)."""
    return sum(a * b for a, b in itertools.pairwise(layer_sizes))


def dense_params(layer_sizes: list[int] | tuple[int, ...]) -> int:
    """Weights plus biases of a dense stack with these layer widths (input first)."""
    return sum(a * b + b for a, b in itertools.pairwise(layer_sizes))


@dataclass
class TrainedModel:
    """A trained autoencoder and how training went.

    Attributes:
        model: The tf-keras model, with the weights of the best validation epoch.
        history: Per-epoch metrics (``loss``, ``val_loss``).
        epochs_run: Epochs actually run (fewer than configured when stopped early).
        best_epoch: 1-based epoch whose weights were kept.

    """

    model: Any
    history: dict[str, list[float]]
    epochs_run: int
    best_epoch: int


@quiet_tensorflow()
def train_autoencoder(
    features_train: npt.ArrayLike, features_val: npt.ArrayLike, config: TrainingConfig
) -> TrainedModel:
    """Train the autoencoder to reconstruct normal features, stopping when validation loss stalls.

    Args:
        features_train: Normalised normal features (n, F) to fit.
        features_val: Held-out normal features for early stopping.
        config: Training configuration.

    Returns:
        The trained model (best validation weights restored) and its history.

    Raises:
        TrainingDataError: Too few rows, mismatched widths, or non-finite values.

    """
    x_train = check_features(features_train, name="training features")
    x_val = check_features(features_val, name="validation features")
    if len(x_train) < config.min_windows:
        raise TrainingDataError(f"too few training windows: {len(x_train)} < minimum {config.min_windows}")
    if x_val.shape[1] != x_train.shape[1]:
        raise TrainingDataError(f"validation features have {x_val.shape[1]} columns, training {x_train.shape[1]}")
    _, tf_keras = tf_modules()
    seed_everything(config.seed)
    model = build_autoencoder(x_train.shape[1], config.hidden, config.seed)
    model.compile(optimizer=tf_keras.optimizers.Adam(config.learning_rate), loss="mse")
    stop = tf_keras.callbacks.EarlyStopping(
        monitor="val_loss", patience=config.patience, min_delta=config.min_delta, restore_best_weights=True
    )
    fit = model.fit(
        x_train,
        x_train,
        validation_data=(x_val, x_val),
        epochs=config.epochs,
        batch_size=config.batch_size,
        shuffle=True,
        callbacks=[stop],
        verbose=0,
    )
    history = {key: [float(v) for v in values] for key, values in fit.history.items()}
    epochs_run = len(history["loss"])
    best_epoch = int(stop.best_epoch) + 1  # the epoch whose weights EarlyStopping restored (min_delta counts)
    log.info(
        "trained %s autoencoder: %d epochs (best %d), loss %.4f, val_loss %.4f",
        "-".join(str(u) for u in [x_train.shape[1], *config.hidden, x_train.shape[1]]),
        epochs_run,
        best_epoch,
        history["loss"][best_epoch - 1],
        history["val_loss"][best_epoch - 1],
    )
    return TrainedModel(model, history, epochs_run, best_epoch)


def reconstruction_error(predict: Predictor, features: npt.ArrayLike) -> Float32Array:
    """Mean squared reconstruction error per row: :func:`~tinymlops.contracts.scoring.anomaly_scores`, as float32.

    Args:
        predict: A tf-keras model or any callable mapping (n, F) float32 features to reconstructions.
        features: Normalised features (n, F); the error is taken against these exact values.

    Returns:
        float32 array (n,).

    """
    x = check_features(features)
    reconstruction = np.asarray(predict(x), dtype=np.float32)
    if reconstruction.shape != x.shape:
        raise TrainingDataError(f"reconstruction has shape {reconstruction.shape}, expected {x.shape}")
    return anomaly_scores(x, reconstruction).astype(np.float32)


def _calibration_rank(n: int, percentile: float) -> int:
    """1-based rank of the calibration error that is the threshold: ``ceil((n + 1) p)``, at most ``n``."""
    return min(n, max(1, math.ceil((n + 1) * percentile / 100.0 - 1e-9)))


def calibrate_threshold(errors: npt.ArrayLike, percentile: float) -> float:
    """Return the threshold: the ``ceil((n + 1) p)``-th smallest of ``n`` held-out normal errors.

    This order statistic (split-conformal) bounds the chance that a new normal window scores above
    it by ``1 - p`` whenever ``n`` is large enough (``(n + 1) p <= n``); below that the threshold is
    the largest error, and :func:`calibrated_false_alarm_rate` says what rate it does promise.
    An interpolated percentile of few errors would promise ``1 - p`` and deliver several times it.

    Raises:
        TrainingDataError: No errors, or non-finite errors.
        ValueError: ``percentile`` outside (0, 100].
    """
    if not 0 < percentile <= 100:
        raise ValueError(f"threshold percentile must be in (0, 100], got {percentile}")
    e = np.asarray(errors, dtype=np.float64).ravel()
    if e.size == 0:
        raise TrainingDataError("no calibration errors to set the threshold from")
    if not np.isfinite(e).all():
        raise TrainingDataError(f"calibration errors contain {int((~np.isfinite(e)).sum())} NaN or infinite values")
    return float(np.sort(e)[_calibration_rank(e.size, percentile) - 1])


def calibrated_false_alarm_rate(n_calibration: int, percentile: float) -> float:
    """Expected share of new normal windows above the threshold :func:`calibrate_threshold` sets.

    For exchangeable errors a new one exceeds the ``k``-th smallest of ``n`` with probability
    ``(n + 1 - k) / (n + 1)``: ``1 - p`` with enough calibration windows, more with few
    (``1 / (n + 1)`` once the threshold is the largest error).

    Raises:
        ValueError: ``n_calibration`` < 1 or ``percentile`` outside (0, 100].
    """
    if n_calibration < 1:
        raise ValueError(f"calibration windows must be at least 1, got {n_calibration}")
    if not 0 < percentile <= 100:
        raise ValueError(f"threshold percentile must be in (0, 100], got {percentile}")
    k = _calibration_rank(n_calibration, percentile)
    return (n_calibration + 1 - k) / (n_calibration + 1)


@dataclass(frozen=True)
class WindowSpeeds:
    """Shaft speed of each window of a dataset's parts, NaN where not known (None: none known)."""

    train: npt.NDArray[np.float32] | None = None
    test: npt.NDArray[np.float32] | None = None
    faults: dict[str, npt.NDArray[np.float32]] = field(default_factory=dict)


@dataclass(frozen=True)
class FeatureSets:
    """Every feature set of one training run, all made with the spec fitted on the train part.

    Attributes:
        parts: Train, validation (early stopping) and calibration (threshold) normal features.
        test_normal: Held-out normal features, for evaluation only.
        faults: Fault features by class, for evaluation only.
        spec: The fitted DSP spec shipped with the model.
    """

    parts: TrainingData
    test_normal: Float32Array
    faults: dict[str, Float32Array]
    spec: DspSpec


def build_feature_sets(
    train_normal: npt.ArrayLike,
    test_normal: npt.ArrayLike,
    faults: dict[str, npt.NDArray[np.float32]],
    spec: DspSpec,
    config: TrainingConfig,
    speeds: WindowSpeeds | None = None,
) -> FeatureSets:
    """Split the training windows, fit the normalisation on the train part and featurize everything.

    Args:
        train_normal: Normal windows for training (split into train/validation/calibration).
        test_normal: Held-out normal windows.
        faults: Fault windows by class.
        spec: The DSP front end (sample rate and window length of the data).
        config: Training configuration.
        speeds: Shaft speed of every window (None: not known, a speed-unaware model).
    """
    speeds = speeds or WindowSpeeds()
    parts, fitted = prepare_training_data(train_normal, spec, config, speeds.train)
    return FeatureSets(
        parts=parts,
        test_normal=featurize(test_normal, fitted, speeds.test),
        faults={name: featurize(windows, fitted, speeds.faults.get(name)) for name, windows in faults.items()},
        spec=fitted,
    )


@task(name="build-features", cache_policy=NO_CACHE)
def build_feature_sets_task(
    train_normal: npt.ArrayLike,
    test_normal: npt.ArrayLike,
    faults: dict[str, npt.NDArray[np.float32]],
    spec: DspSpec,
    config: TrainingConfig,
    speeds: WindowSpeeds | None = None,
) -> FeatureSets:
    """Prefect task: :func:`build_feature_sets`."""
    return build_feature_sets(train_normal, test_normal, faults, spec, config, speeds)


@task(name="train-autoencoder", cache_policy=NO_CACHE)
def train_autoencoder_task(features: FeatureSets, config: TrainingConfig) -> TrainedModel:
    """Prefect task: :func:`train_autoencoder` on the train part, stopping on the validation part."""
    return train_autoencoder(features.parts.train, features.parts.validation, config)
