from __future__ import annotations

import time

import numpy as np
import pytest

from firmware.tflm import (
    ArenaMeasurement,
    TflmError,
    TflmRunner,
    compare_interpreters,
    count_macs,
    measure_arena,
    op_names,
    probe_arena,
    tflite_predict,
)
from tests.int8_model import N_FEATURES, dense_macs, int8_autoencoder, sample_features
from tinymlops.tfcompat import import_tf


@pytest.fixture(scope="module")
def model() -> bytes:
    return int8_autoencoder()


@pytest.fixture(scope="module")
def arena(model: bytes) -> ArenaMeasurement:
    start = time.perf_counter()
    measurement = measure_arena(model)
    # Runs once per model per training: must stay cheap even on a loaded 2-core machine.
    assert time.perf_counter() - start < 15
    return measurement


def test_arena_measurement_is_plausible(model: bytes, arena: ArenaMeasurement) -> None:
    assert arena.model_bytes == len(model)
    assert 0 < arena.reported_bytes <= arena.smallest_working_bytes <= 10 * len(model)


def test_model_runs_in_smallest_arena_and_not_one_byte_less(model: bytes, arena: ArenaMeasurement) -> None:
    assert probe_arena(model, arena.smallest_working_bytes)
    assert not probe_arena(model, arena.smallest_working_bytes - 1)
    runner = TflmRunner(model, arena.smallest_working_bytes)
    y = runner.predict(sample_features(8))
    assert y.shape == (8, N_FEATURES) and y.dtype == np.float32 and np.isfinite(y).all()


@pytest.mark.parametrize("divisor", [2, 20])
def test_too_small_arena_raises_instead_of_crashing(model: bytes, arena: ArenaMeasurement, divisor: int) -> None:
    # A tenth of the arena crashes TFLM in-process (segfault); the runner must probe it in a subprocess.
    size = arena.smallest_working_bytes // divisor
    with pytest.raises(TflmError, match=f"{size}-byte TFLM arena"):
        TflmRunner(model, size)


def test_tflite_and_tflm_agree_within_two_lsb(model: bytes, arena: ArenaMeasurement) -> None:
    x = sample_features(200, seed=7)
    runner = TflmRunner(model, arena.smallest_working_bytes)
    parity = compare_interpreters(model, x, runner)
    assert parity.n == 200
    assert parity.max_abs_lsb <= 2
    assert 0.0 <= parity.fraction_differing < 0.1
    # The float paths quantize the same way, so they differ by the same few output steps at most.
    assert np.abs(runner.predict(x) - tflite_predict(model, x)).max() <= 2 * runner.output.scale + 1e-6


def test_predict_quantizes_and_dequantizes_with_model_scales(model: bytes) -> None:
    runner = TflmRunner(model)
    x = sample_features(16, seed=3)
    q = np.clip(np.round(x / runner.input.scale) + runner.input.zero_point, -128, 127).astype(np.int8)
    raw = runner.predict_int8(q)
    assert raw.dtype == np.int8
    expected = (raw.astype(np.float32) - runner.output.zero_point) * runner.output.scale
    np.testing.assert_allclose(runner.predict(x), expected, rtol=1e-6, atol=1e-6)
    with pytest.raises(TflmError, match="int8 inputs"):
        runner.predict_int8(x)
    with pytest.raises(TflmError, match=rf"shape \(n, {N_FEATURES}\)"):
        runner.predict(np.zeros((2, N_FEATURES + 1), dtype=np.float32))


def test_mac_count_is_sum_of_dense_layers(model: bytes) -> None:
    assert op_names(model) == ["FULLY_CONNECTED"] * 4
    assert count_macs(model) == dense_macs() == 35 * 16 + 16 * 8 + 8 * 16 + 16 * 35


@pytest.fixture(scope="module")
def conv_model() -> bytes:
    """A float model with tiny weights but large activations: its arena is far above ten times its size."""
    tf, keras = import_tf()
    net = keras.Sequential(
        [
            keras.layers.Input((64, 64, 1)),
            keras.layers.Conv2D(8, 3),  # 62x62x8 outputs x 3x3x1 taps
            keras.layers.DepthwiseConv2D(3),  # 60x60x8 outputs x 3x3 taps
            keras.layers.MaxPooling2D(60),
            keras.layers.Flatten(),
            keras.layers.Dense(2),  # 2 outputs x 8 inputs
        ]
    )
    return bytes(tf.lite.TFLiteConverter.from_keras_model(net).convert())


def test_mac_count_of_convolutions(conv_model: bytes) -> None:
    assert op_names(conv_model) == ["CONV_2D", "DEPTHWISE_CONV_2D", "MAX_POOL_2D", "RESHAPE", "FULLY_CONNECTED"]
    assert count_macs(conv_model) == 62 * 62 * 8 * 9 + 60 * 60 * 8 * 9 + 2 * 8


def test_arena_above_default_size_is_found(conv_model: bytes) -> None:
    arena = measure_arena(conv_model)
    # The first conv's input and output are live at once (float32).
    assert arena.smallest_working_bytes >= (64 * 64 * 1 + 62 * 62 * 8) * 4 > 10 * len(conv_model)
    assert arena.reported_bytes <= arena.smallest_working_bytes
    assert not probe_arena(conv_model, arena.smallest_working_bytes - 1)
    runner = TflmRunner(conv_model, arena.smallest_working_bytes)
    x = np.random.default_rng(0).standard_normal((3, 64 * 64)).astype(np.float32)
    np.testing.assert_allclose(runner.predict(x), tflite_predict(conv_model, x), rtol=1e-4, atol=1e-4)


def test_not_a_model_is_a_clear_error() -> None:
    junk = b"\x00" * 64
    for call in (count_macs, op_names, measure_arena, TflmRunner):
        with pytest.raises(TflmError, match="not a TFLite flatbuffer"):
            call(junk)
