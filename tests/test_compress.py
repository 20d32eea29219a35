"""Compression: pruning sparsity, int8 conversions (PTQ and pruning-preserving QAT), sizes."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from firmware.tflm import op_names, tflite_predict
from tasks.compress import (
    CompressionResult,
    compress,
    gzip_size,
    kernel_sparsity,
    prune_model,
    to_tflite_int8,
)
from tasks.train import TrainingConfig, dense_params, reconstruction_error, train_autoencoder
from tinymlops.errors import ConfigError
from tinymlops.tfcompat import import_tf

N_FEATURES = 35
REFERENCE_PARAMS = dense_params([640, 128, 128, 128, 128, 8, 128, 128, 128, 128, 640])


def low_rank_features(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mixing = np.random.default_rng(99).standard_normal((4, N_FEATURES)) / 2
    return (rng.standard_normal((n, 4)) @ mixing + 0.1 * rng.standard_normal((n, N_FEATURES))).astype(np.float32)


CONFIG = TrainingConfig.model_validate(
    {
        "hidden": [24, 8, 24],
        "epochs": 8,
        "batch_size": 32,
        "learning_rate": 0.01,
        "seed": 3,
        # 512 rows / 32 = 16 steps per epoch; 4 epochs = 64 steps; target reached at step 48.
        "pruning": {"target_sparsity": 0.5, "fine_tune_epochs": 4, "frequency": 4, "learning_rate": 0.002},
        "quantization": {"mode": "qat", "qat_epochs": 5, "learning_rate": 0.001, "representative_samples": 100},
    }
)


@pytest.fixture(scope="module")
def data() -> dict[str, np.ndarray]:
    return {"train": low_rank_features(512, seed=1), "val": low_rank_features(128, seed=2)}


@pytest.fixture(scope="module")
def baseline(data: dict[str, np.ndarray]) -> Any:
    return train_autoencoder(data["train"], data["val"], CONFIG).model


@pytest.fixture(scope="module")
def result(baseline: Any, data: dict[str, np.ndarray]) -> CompressionResult:
    return compress(baseline, data["train"], data["val"], CONFIG)


def tensor_summary(model: bytes) -> tuple[list[dict[str, Any]], dict[str, Any], dict[str, Any]]:
    tf, _ = import_tf()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        interpreter = tf.lite.Interpreter(model_content=model)
    return interpreter.get_tensor_details(), interpreter.get_input_details()[0], interpreter.get_output_details()[0]


def int8_kernels(model: bytes) -> list[np.ndarray]:
    """The constant 2-D int8 weight tensors of a flatbuffer."""
    tf, _ = import_tf()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        interpreter = tf.lite.Interpreter(model_content=model)
    interpreter.allocate_tensors()
    kernels = []
    for details in interpreter.get_tensor_details():
        if details["dtype"] == np.int8 and len(details["shape"]) == 2 and details["shape"][0] > 1:
            kernels.append(interpreter.get_tensor(details["index"]))
    return kernels


def assert_full_integer(model: bytes) -> None:
    tensors, inp, out = tensor_summary(model)
    assert inp["dtype"] == np.int8 and out["dtype"] == np.int8
    assert set(op_names(model)) == {"FULLY_CONNECTED"}
    # Activations and weights int8, biases int32: no float tensor anywhere.
    assert {np.dtype(t["dtype"]) for t in tensors} <= {np.dtype(np.int8), np.dtype(np.int32)}


def test_qat_int8_model_is_full_integer_sparse_and_accurate(
    result: CompressionResult, baseline: Any, data: dict[str, np.ndarray]
) -> None:
    assert result.quantization == "qat"
    assert_full_integer(result.pruned_int8_model)
    kernels = int8_kernels(result.pruned_int8_model)
    assert len(kernels) == 4
    zeros = sum(int(np.sum(k == 0)) for k in kernels) / sum(k.size for k in kernels)
    assert zeros >= CONFIG.pruning.target_sparsity - 0.02  # QAT kept the pruned zeros
    x = data["val"]
    faulty = x + np.random.default_rng(5).normal(0.0, 1.0, x.shape).astype(np.float32)
    int8 = lambda v: tflite_predict(result.pruned_int8_model, v)  # noqa: E731
    error_pruned = float(np.mean(reconstruction_error(result.pruned_keras_model, x)))
    error_int8 = reconstruction_error(int8, x)
    assert float(np.mean(error_int8)) < 1.5 * error_pruned
    labels = np.r_[np.zeros(len(x)), np.ones(len(faulty))]
    assert roc_auc_score(labels, np.r_[error_int8, reconstruction_error(int8, faulty)]) > 0.98


def test_ptq_int8_model_is_full_integer(result: CompressionResult, data: dict[str, np.ndarray]) -> None:
    assert_full_integer(result.int8_model)
    ptq_pruned = to_tflite_int8(result.pruned_keras_model, data["train"][:100])
    assert_full_integer(ptq_pruned)
    # Same quantization, pruned or not: the pruned one compresses better.
    assert gzip_size(ptq_pruned) < gzip_size(result.int8_model)


def test_pruning_reaches_target_and_leaves_baseline_alone(
    result: CompressionResult, baseline: Any, data: dict[str, np.ndarray]
) -> None:
    assert result.sparsity == pytest.approx(CONFIG.pruning.target_sparsity, abs=0.02)
    assert kernel_sparsity(baseline) < 0.01
    assert kernel_sparsity(result.pruned_keras_model) == pytest.approx(result.sparsity)
    pruned_error = float(np.mean(reconstruction_error(result.pruned_keras_model, data["val"])))
    base_error = float(np.mean(reconstruction_error(baseline, data["val"])))
    assert pruned_error < 2.0 * base_error + 0.05


def test_size_table(result: CompressionResult) -> None:
    sizes = {row.name: row for row in result.sizes}
    assert list(sizes) == ["float32", "dynamic_range", "int8", "pruned_float32", "pruned_int8_qat"]
    assert sizes["int8"].raw_bytes < sizes["float32"].raw_bytes
    assert sizes["pruned_int8_qat"].raw_bytes < sizes["float32"].raw_bytes
    # Pruning does not shrink the flatbuffer, only its compressed form.
    assert sizes["pruned_float32"].raw_bytes == sizes["float32"].raw_bytes
    assert sizes["pruned_float32"].gzip_bytes < 0.8 * sizes["float32"].gzip_bytes
    assert sizes["pruned_int8_qat"].gzip_bytes < sizes["int8"].gzip_bytes
    for row in result.sizes:
        assert row.gzip_bytes == gzip_size(
            {
                "float32": result.float_model,
                "dynamic_range": result.dynamic_range_model,
                "int8": result.int8_model,
                "pruned_float32": result.pruned_float_model,
                "pruned_int8_qat": result.pruned_int8_model,
            }[row.name]
        )
    assert result.size_table()[0] == {
        "model": "float32",
        "raw_bytes": len(result.float_model),
        "gzip_bytes": sizes["float32"].gzip_bytes,
    }
    # The deployable model is over 10x smaller than even the int8 weights of the MLPerf Tiny reference.
    assert len(result.deployable) * 10 < REFERENCE_PARAMS


def test_pruning_end_step_beyond_fine_tune_is_a_config_error(baseline: Any, data: dict[str, np.ndarray]) -> None:
    config = CONFIG.model_copy(update={"pruning": CONFIG.pruning.model_copy(update={"end_step": 1000})})
    with pytest.raises(ConfigError, match=r"pruning.end_step 1000 exceeds the 64 fine-tune steps"):
        prune_model(baseline, data["train"], data["val"], config)


def test_pruning_reaches_target_with_few_steps_and_a_large_frequency(
    baseline: Any, data: dict[str, np.ndarray]
) -> None:
    """96 rows / 32 = 3 steps per epoch, 4 epochs: 12 steps, fewer than the default mask-update frequency of 10.

    The schedule adapts its frequency so the mask is updated several times and last at the end step;
    before that fix the only update came at step 0 and the model stayed dense (0% sparsity).
    """
    config = CONFIG.model_copy(update={"pruning": CONFIG.pruning.model_copy(update={"frequency": 10})})
    pruned = prune_model(baseline, data["train"][:96], data["val"], config)
    assert kernel_sparsity(pruned) == pytest.approx(0.5, abs=0.02)


def test_compress_in_ptq_mode(baseline: Any, data: dict[str, np.ndarray]) -> None:
    config = CONFIG.model_copy(
        update={
            "pruning": CONFIG.pruning.model_copy(update={"fine_tune_epochs": 1}),
            "quantization": CONFIG.quantization.model_copy(update={"mode": "ptq"}),
        }
    )
    ptq = compress(baseline, data["train"], data["val"], config)
    assert ptq.quantization == "ptq"
    assert ptq.sizes[-1].name == "pruned_int8_ptq"
    assert_full_integer(ptq.deployable)
    assert ptq.sparsity == pytest.approx(CONFIG.pruning.target_sparsity, abs=0.02)
    assert len(ptq.deployable) == len(ptq.int8_model)  # same per-channel layout, only the weights differ
