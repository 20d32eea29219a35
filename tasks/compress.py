"""Compress the trained autoencoder for a microcontroller: magnitude pruning, then int8 TFLite.

Pruning zeroes weights but a TFLite flatbuffer stores them densely, so pruning shows only in a
compressed artifact (gzip, as an over-the-air update would ship). Full-integer int8 is what
TFLite Micro runs fastest and smallest; it comes from post-training quantization (``ptq``) or from
pruning-preserving quantization-aware training (``qat``), chosen in the training configuration.
"""

from __future__ import annotations

import gzip
import logging
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt
from prefect import task
from prefect.cache_policies import NO_CACHE

from tasks.train import (
    TrainingConfig,
    TrainingDataError,
    check_features,
    quiet_tensorflow,
    seed_everything,
    tf_modules,
)
from tinymlops.errors import ConfigError, TinyMLOpsError

log = logging.getLogger(__name__)

# Without an explicit end step, sparsity reaches its target after this share of the fine-tune
# steps, so the last quarter trains the network at full sparsity to recover accuracy.
_DEFAULT_END_FRACTION = 0.75


class CompressionError(TinyMLOpsError):
    """A model could not be pruned or converted to TFLite."""


@dataclass(frozen=True)
class SizeRow:
    """Size of one model artifact.

    Attributes:
        name: Artifact name, for example ``int8`` or ``pruned_int8``.
        raw_bytes: Flatbuffer size, what occupies flash.
        gzip_bytes: Compressed size, what an over-the-air update transfers.

    """

    name: str
    raw_bytes: int
    gzip_bytes: int


@dataclass
class CompressionResult:
    """Every artifact of one compression run.

    Attributes:
        float_model: Baseline float32 TFLite flatbuffer.
        dynamic_range_model: Baseline with int8 weights and float activations.
        int8_model: Baseline full-integer PTQ model (int8 input and output).
        pruned_float_model: Pruned model, float32.
        pruned_int8_model: Pruned full-integer model: the one to deploy.
        pruned_keras_model: The pruned (stripped) tf-keras model.
        sparsity: Fraction of zero kernel weights achieved by pruning.
        quantization: ``qat`` or ``ptq``: how ``pruned_int8_model`` was made.
        sizes: Raw and gzip bytes of each artifact.

    """

    float_model: bytes
    dynamic_range_model: bytes
    int8_model: bytes
    pruned_float_model: bytes
    pruned_int8_model: bytes
    pruned_keras_model: Any
    sparsity: float
    quantization: str
    sizes: list[SizeRow] = field(default_factory=list)

    @property
    def deployable(self) -> bytes:
        """The model to ship: pruned and full-integer."""
        return self.pruned_int8_model

    def size_table(self) -> list[dict[str, Any]]:
        """Rows for a report: name, raw bytes, gzip bytes."""
        return [{"model": r.name, "raw_bytes": r.raw_bytes, "gzip_bytes": r.gzip_bytes} for r in self.sizes]


def gzip_size(data: bytes) -> int:
    """Bytes of ``data`` after gzip at level 9 (deterministic: no timestamp)."""
    return len(gzip.compress(data, compresslevel=9, mtime=0))


def kernel_sparsity(model: Any) -> float:
    """Fraction of exactly-zero entries over all dense kernels (biases excluded)."""
    kernels = [w for layer in model.layers for w in layer.get_weights()[:1] if w.ndim == 2]
    if not kernels:
        raise CompressionError(f"model {model.name} has no dense kernels")
    total = sum(k.size for k in kernels)
    return float(sum(int(np.count_nonzero(k == 0)) for k in kernels) / total)


def _copy_model(model: Any) -> Any:
    _, tf_keras = tf_modules()
    clone = tf_keras.models.clone_model(model)
    clone.set_weights(model.get_weights())
    return clone


_SPARSITY_TOLERANCE = 0.05


def _pruning_steps(n_train: int, config: TrainingConfig) -> tuple[int, int]:
    steps_per_epoch = -(-n_train // config.batch_size)
    total = steps_per_epoch * config.pruning.fine_tune_epochs
    default_end = max(1, int(total * _DEFAULT_END_FRACTION))
    end = config.pruning.end_step if config.pruning.end_step is not None else default_end
    if end > total:
        raise ConfigError(
            f"pruning.end_step {end} exceeds the {total} fine-tune steps "
            f"({config.pruning.fine_tune_epochs} epochs x {steps_per_epoch} steps): the target would never be reached"
        )
    if config.pruning.begin_step >= end:
        raise ConfigError(f"pruning.begin_step {config.pruning.begin_step} is not before end step {end}")
    return end, total


@quiet_tensorflow()
def prune_model(model: Any, x_train: npt.ArrayLike, x_val: npt.ArrayLike, config: TrainingConfig) -> Any:
    """Prune a copy of a trained autoencoder to the target sparsity while fine-tuning it.

    Args:
        model: Trained tf-keras autoencoder (left unchanged).
        x_train: Normal training features.
        x_val: Normal validation features (monitored, not trained on).
        config: Training configuration (``pruning`` section).

    Returns:
        The pruned tf-keras model with the pruning wrappers stripped.

    """
    _, tf_keras = tf_modules()
    import tensorflow_model_optimization as tfmot

    train = check_features(x_train, name="training features")
    val = check_features(x_val, name="validation features")
    end_step, total = _pruning_steps(len(train), config)
    begin = config.pruning.begin_step
    # The mask is only updated every `frequency` steps from begin_step: with few steps, a frequency
    # larger than the schedule would update it once, at sparsity 0. Keep at least 4 updates and make
    # the last one fall exactly on end_step, where the schedule reaches the target.
    frequency = max(1, min(config.pruning.frequency, (end_step - begin) // 4))
    end_step = begin + ((end_step - begin) // frequency) * frequency
    seed_everything(config.seed)
    schedule = tfmot.sparsity.keras.PolynomialDecay(
        initial_sparsity=0.0,
        final_sparsity=config.pruning.target_sparsity,
        begin_step=begin,
        end_step=end_step,
        frequency=frequency,
    )
    # prune_low_magnitude wraps layers in place: work on a copy so the baseline stays intact.
    pruned = tfmot.sparsity.keras.prune_low_magnitude(_copy_model(model), pruning_schedule=schedule)
    pruned.compile(optimizer=tf_keras.optimizers.Adam(config.pruning.learning_rate), loss="mse")
    pruned.fit(
        train,
        train,
        validation_data=(val, val),
        epochs=config.pruning.fine_tune_epochs,
        batch_size=config.batch_size,
        shuffle=True,
        callbacks=[tfmot.sparsity.keras.UpdatePruningStep()],
        verbose=0,
    )
    stripped = tfmot.sparsity.keras.strip_pruning(pruned)
    sparsity = kernel_sparsity(stripped)
    if sparsity < config.pruning.target_sparsity - _SPARSITY_TOLERANCE:
        raise CompressionError(
            f"pruning reached {sparsity:.1%} zero weights, target {config.pruning.target_sparsity:.1%} "
            f"(schedule steps {begin}-{end_step} of {total}, every {frequency}): raise pruning.fine_tune_epochs"
        )
    log.info(
        "pruned to %.1f%% zero weights (target %.1f%%, schedule steps %d-%d of %d)",
        100 * sparsity,
        100 * config.pruning.target_sparsity,
        config.pruning.begin_step,
        end_step,
        total,
    )
    return stripped


def _convert(converter: Any, what: str) -> bytes:
    try:
        return bytes(converter.convert())
    except Exception as exc:  # the converter raises many unrelated types; report one line
        message = " ".join(str(exc).split())[:300]
        raise CompressionError(f"TFLite conversion to {what} failed: {type(exc).__name__}: {message}") from exc


@quiet_tensorflow()
def to_tflite_float(model: Any) -> bytes:
    """Convert a tf-keras model to a float32 TFLite flatbuffer."""
    tf, _ = tf_modules()
    return _convert(tf.lite.TFLiteConverter.from_keras_model(model), "float32")


@quiet_tensorflow()
def to_tflite_dynamic_range(model: Any) -> bytes:
    """Convert with int8 weights and float activations (no representative data needed).

    The converter leaves weight tensors of fewer than 1,024 elements in float32, so for an
    autoencoder whose kernels are all smaller (35x24 = 840) this equals the float32 model.
    """
    tf, _ = tf_modules()
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    return _convert(converter, "dynamic-range int8")


def _representative(representative: npt.ArrayLike) -> Any:
    rows = check_features(representative, name="representative features")

    def generate() -> Iterator[list[npt.NDArray[np.float32]]]:
        for row in rows:
            yield [row[None, :]]

    return generate


@quiet_tensorflow()
def to_tflite_int8(model: Any, representative: npt.ArrayLike) -> bytes:
    """Full-integer post-training quantization: int8 weights, activations, input and output.

    Args:
        model: Float tf-keras model.
        representative: Normal features whose ranges set the activation scales.

    """
    tf, _ = tf_modules()
    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = _representative(representative)
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = tf.int8
    converter.inference_output_type = tf.int8
    return _convert(converter, "full-integer int8")


@quiet_tensorflow()
def quantization_aware_int8(
    model: Any, x_train: npt.ArrayLike, x_val: npt.ArrayLike, representative: npt.ArrayLike, config: TrainingConfig
) -> bytes:
    """Pruning-preserving quantization-aware training, then conversion to a full-integer model.

    Args:
        model: Pruned (stripped) tf-keras model; its zero weights stay zero.
        x_train: Normal training features.
        x_val: Normal validation features.
        representative: Normal features for the converter's range calibration.
        config: Training configuration (``quantization`` section).

    Returns:
        The int8 flatbuffer (int8 input and output).

    """
    tf, tf_keras = tf_modules()
    import tensorflow_model_optimization as tfmot

    train = check_features(x_train, name="training features")
    val = check_features(x_val, name="validation features")
    seed_everything(config.seed)
    annotated = tfmot.quantization.keras.quantize_annotate_model(_copy_model(model))
    qat = tfmot.quantization.keras.quantize_apply(
        annotated, tfmot.experimental.combine.Default8BitPrunePreserveQuantizeScheme()
    )
    qat.compile(optimizer=tf_keras.optimizers.Adam(config.quantization.learning_rate), loss="mse")
    qat.fit(
        train,
        train,
        validation_data=(val, val),
        epochs=config.quantization.qat_epochs,
        batch_size=config.batch_size,
        shuffle=True,
        verbose=0,
    )
    converter = tf.lite.TFLiteConverter.from_keras_model(qat)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = _representative(representative)
    # With TF 2.21 a QAT model with supported_ops = {TFLITE_BUILTINS_INT8} fails to convert: leave it unset.
    converter.inference_input_type = tf.int8
    converter.inference_output_type = tf.int8
    return _convert(converter, "QAT int8")


def representative_rows(x_train: npt.ArrayLike, config: TrainingConfig) -> npt.NDArray[np.float32]:
    """Return a seeded sample of training rows to calibrate int8 ranges."""
    x = check_features(x_train, name="training features")
    n = min(config.quantization.representative_samples, len(x))
    return x[np.sort(np.random.default_rng(config.seed).choice(len(x), size=n, replace=False))]


def compress(model: Any, x_train: npt.ArrayLike, x_val: npt.ArrayLike, config: TrainingConfig) -> CompressionResult:
    """Produce every compressed artifact of a trained autoencoder and their sizes.

    Args:
        model: Trained float tf-keras autoencoder (left unchanged).
        x_train: Normal training features (also the source of representative rows).
        x_val: Normal validation features.
        config: Training configuration (``pruning`` and ``quantization`` sections).

    Returns:
        The flatbuffers, the pruned keras model, the achieved sparsity and the size table.

    """
    train = check_features(x_train, name="training features")
    if len(train) < 2:
        raise TrainingDataError(f"too few training rows to compress with: {len(train)}")
    representative = representative_rows(train, config)
    float_model = to_tflite_float(model)
    dynamic_range_model = to_tflite_dynamic_range(model)
    int8_model = to_tflite_int8(model, representative)
    pruned = prune_model(model, train, x_val, config)
    pruned_float_model = to_tflite_float(pruned)
    if config.quantization.mode == "qat":
        pruned_int8_model = quantization_aware_int8(pruned, train, x_val, representative, config)
    else:
        pruned_int8_model = to_tflite_int8(pruned, representative)
    artifacts = {
        "float32": float_model,
        "dynamic_range": dynamic_range_model,
        "int8": int8_model,
        "pruned_float32": pruned_float_model,
        f"pruned_int8_{config.quantization.mode}": pruned_int8_model,
    }
    sizes = [SizeRow(name, len(data), gzip_size(data)) for name, data in artifacts.items()]
    for row in sizes:
        log.info("%-18s %7d B raw %7d B gzip", row.name, row.raw_bytes, row.gzip_bytes)
    return CompressionResult(
        float_model=float_model,
        dynamic_range_model=dynamic_range_model,
        int8_model=int8_model,
        pruned_float_model=pruned_float_model,
        pruned_int8_model=pruned_int8_model,
        pruned_keras_model=pruned,
        sparsity=kernel_sparsity(pruned),
        quantization=config.quantization.mode,
        sizes=sizes,
    )


@task(name="compress", cache_policy=NO_CACHE)
def compress_task(
    model: Any, x_train: npt.ArrayLike, x_val: npt.ArrayLike, config: TrainingConfig
) -> CompressionResult:
    """Prefect task: :func:`compress`."""
    return compress(model, x_train, x_val, config)
