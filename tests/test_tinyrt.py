"""The C int8 runtime (firmware/c/tinyrt.c) against the real TFLite Micro interpreter, bit for bit.

Parity is exact (0 LSB, every element) on: the tiny test autoencoder, dense models covering
per-tensor and per-channel weights, every fused activation the converter emits (NONE, RELU,
RELU6, RELU_N1_TO_1), no-bias layers and RESHAPE, an MLPerf-Tiny-anomaly-detection-shaped
autoencoder, and the bundles the train flow produces on CWRU. The flatbuffer reader is fuzzed
through an AddressSanitizer + UBSan build of the library in a worker process, so a memory error
or undefined behaviour fails the test instead of killing pytest.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import math
import os
import struct
import subprocess
import sys
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
from hypothesis import event, given, settings
from hypothesis import strategies as st
from tflite_micro.tensorflow.lite.micro.python import schema_py_generated as schema_fb

from firmware.tflm import TflmRunner, measure_arena, op_names
from firmware.tinyrt import NativeRuntime, TinyrtError, arena_required, build_library, load_library, status_name
from tasks.mlperf_reference import reference_layer_sizes
from tests.int8_model import int8_autoencoder, sample_features
from tinymlops.settings import REPO_ROOT
from tinymlops.tfcompat import import_tf

log = logging.getLogger(__name__)

# status codes of tinyrt.h
DEFINED_STATUSES = set(range(-11, 1))
OK, ERR_NULL, ERR_ARENA, ERR_STATE = 0, -1, -8, -11
# fused activations of schema.fbs
NONE, RELU, RELU_N1_TO_1, RELU6 = 0, 1, 2, 3


# ---------------------------------------------------------------------------------------------
# models


def _convert(model: Any, n_features: int, per_channel: bool) -> bytes:
    """Full-integer conversion as tasks/compress.py does it, optionally with per-tensor dense weights."""
    tf, _ = import_tf()
    rows = np.random.default_rng(7).standard_normal((64, n_features)).astype(np.float32)

    def representative() -> Iterator[list[np.ndarray]]:
        for row in rows:
            yield [row[None, :]]

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = representative
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = tf.int8
    converter.inference_output_type = tf.int8
    if not per_channel:
        converter._experimental_disable_per_channel_quantization_for_dense_layers = True
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Statistics for quantized inputs were expected")
        return bytes(converter.convert())


@functools.cache
def mixed_model(per_channel: bool) -> bytes:
    """RESHAPE into a 3-D dense (RELU), RELU6, a clip fused as RELU_N1_TO_1, a bias-free RELU layer, linear out."""
    tf, keras = import_tf()
    keras.utils.set_random_seed(3)
    biased = {"bias_initializer": "random_normal"}  # zero biases are dropped by the converter
    model = keras.Sequential(
        [
            keras.layers.Input((24,), batch_size=1),
            keras.layers.Reshape((4, 6)),
            keras.layers.Dense(10, activation="relu", **biased),
            keras.layers.Flatten(),
            keras.layers.Dense(32, activation=tf.nn.relu6, **biased),
            keras.layers.Dense(16, **biased),
            keras.layers.Lambda(lambda v: tf.clip_by_value(v, -1.0, 1.0)),
            keras.layers.Dense(12, activation="relu", use_bias=False),
            keras.layers.Dense(24, **biased),
        ]
    )
    return _convert(model, 24, per_channel)


@functools.cache
def mlperf_shaped_model() -> bytes:
    """The MLPerf Tiny anomaly-detection autoencoder's dense stack, 640-128x4-8-128x4-640, random weights."""
    _, keras = import_tf()
    keras.utils.set_random_seed(5)
    sizes = reference_layer_sizes()
    layers = [keras.layers.Dense(units, activation="relu", bias_initializer="random_normal") for units in sizes[1:-1]]
    model = keras.Sequential(
        [keras.layers.Input((sizes[0],)), *layers, keras.layers.Dense(sizes[-1], bias_initializer="random_normal")]
    )
    return _convert(model, sizes[0], per_channel=True)


@functools.cache
def unsupported_model(kind: str) -> bytes:
    """A tiny int8 model with one op tinyrt does not have: ``tanh`` (TANH) or ``conv`` (CONV_2D)."""
    _, keras = import_tf()
    keras.utils.set_random_seed(1)
    if kind == "tanh":
        layers = [keras.layers.Dense(8, activation="tanh"), keras.layers.Dense(4)]
    else:
        layers = [
            keras.layers.Reshape((4, 4, 1)),
            keras.layers.Conv2D(2, 3),
            keras.layers.Flatten(),
            keras.layers.Dense(4),
        ]
    model = keras.Sequential([keras.layers.Input((16,), batch_size=1), *layers])
    return _convert(model, 16, per_channel=True)


def fully_connected_layers(model: bytes) -> list[dict[str, int]]:
    """Per FULLY_CONNECTED op: fused activation, number of weight scales, whether it has a bias."""
    fb = schema_fb.Model.GetRootAs(model, 0)
    graph = fb.Subgraphs(0)
    layers = []
    for i in range(graph.OperatorsLength()):
        op = graph.Operators(i)
        code = fb.OperatorCodes(op.OpcodeIndex())
        if max(code.BuiltinCode(), code.DeprecatedBuiltinCode()) != schema_fb.BuiltinOperator.FULLY_CONNECTED:
            continue
        table = op.BuiltinOptions()
        options = schema_fb.FullyConnectedOptions()
        options.Init(table.Bytes, table.Pos)
        inputs = op.InputsAsNumpy()
        scales = graph.Tensors(int(inputs[1])).Quantization().ScaleLength()
        has_bias = len(inputs) > 2 and int(inputs[2]) >= 0
        layers.append({"activation": options.FusedActivationFunction(), "scales": scales, "bias": int(has_bias)})
    return layers


def int8_rows(n: int, width: int, seed: int) -> np.ndarray:
    """Uniform int8 rows over the whole range, saturated ends included."""
    rows = np.random.default_rng(seed).integers(-128, 128, size=(n, width), dtype=np.int8)
    rows[0], rows[1] = -128, 127
    return rows


def assert_bit_exact(model: bytes, rows: np.ndarray, runner: TflmRunner | None = None) -> int:
    """Both runtimes on the same int8 rows: every output element identical. Returns the elements compared."""
    ours = NativeRuntime(model).predict_int8(rows)
    theirs = (runner or TflmRunner(model)).predict_int8(rows)
    assert ours.shape == theirs.shape
    diff = np.abs(ours.astype(np.int32) - theirs.astype(np.int32))
    assert int(diff.max()) == 0, f"{int((diff > 0).sum())} of {diff.size} elements differ, up to {diff.max()} LSB"
    return int(diff.size)


# ---------------------------------------------------------------------------------------------
# parity


def test_tiny_autoencoder_is_bit_exact_with_tflm() -> None:
    model = int8_autoencoder()
    runner = TflmRunner(model)
    native = NativeRuntime(model)
    assert (native.input_scale, native.input_zero_point) == (runner.input.scale, runner.input.zero_point)
    assert (native.output_scale, native.output_zero_point) == (runner.output.scale, runner.output.zero_point)
    assert native.n_features == runner.n_features
    assert_bit_exact(model, int8_rows(400, native.n_features, seed=1), runner)
    features = sample_features(300, seed=4) * 3  # well past the calibration range: saturating inputs too
    np.testing.assert_array_equal(native.predict(features), runner.predict(features))


@pytest.mark.parametrize("per_channel", [True, False], ids=["per-channel", "per-tensor"])
def test_every_activation_bias_and_reshape_is_bit_exact(per_channel: bool) -> None:
    model = mixed_model(per_channel)
    layers = fully_connected_layers(model)
    # the converter really produced what this test claims to cover
    assert {layer["activation"] for layer in layers} == {NONE, RELU, RELU6, RELU_N1_TO_1}
    assert {layer["bias"] for layer in layers} == {0, 1}
    assert "RESHAPE" in op_names(model)
    if per_channel:
        assert all(layer["scales"] > 1 for layer in layers)
    else:
        assert all(layer["scales"] == 1 for layer in layers)
    runner = TflmRunner(model)
    assert_bit_exact(model, int8_rows(400, 24, seed=2), runner)
    features = np.random.default_rng(3).standard_normal((200, 24)).astype(np.float32)
    np.testing.assert_array_equal(NativeRuntime(model).predict(features), runner.predict(features))


def test_mlperf_anomaly_detection_shape_is_bit_exact() -> None:
    model = mlperf_shaped_model()
    assert [layer["scales"] for layer in fully_connected_layers(model)] == reference_layer_sizes()[1:]
    runner = TflmRunner(model)
    assert_bit_exact(model, int8_rows(150, 640, seed=5), runner)
    features = np.random.default_rng(6).standard_normal((50, 640)).astype(np.float32)
    np.testing.assert_array_equal(NativeRuntime(model).predict(features), runner.predict(features))


@functools.cache
def single_dense_per_tensor() -> bytes:
    """One linear 256 -> 64 dense layer with a bias and per-tensor weights."""
    _, keras = import_tf()
    keras.utils.set_random_seed(8)
    model = keras.Sequential(
        [keras.layers.Input((256,), batch_size=1), keras.layers.Dense(64, bias_initializer="random_normal")]
    )
    return _convert(model, 256, per_channel=False)


def quantize_multiplier(real: float) -> tuple[int, int]:
    """TFLite's QuantizeMultiplier: frexp, then the fraction rounded (half away from zero) to Q31."""
    fraction, exponent = math.frexp(real)
    fixed = math.floor(fraction * 2**31 + 0.5)
    if fixed == 2**31:
        fixed, exponent = fixed // 2, exponent + 1
    return fixed, exponent


def requantize(acc: np.ndarray, multiplier: int, shift: int, zero_point: int) -> np.ndarray:
    """MultiplyByQuantizedMultiplier (gemmlowp rounding) + zero point, clamped to int8, on int64 arrays."""
    x = acc * (1 << max(shift, 0))
    product = x * multiplier + np.where(x * multiplier >= 0, 1 << 30, 1 - (1 << 30))
    high = np.where(product >= 0, product >> 31, -((-product) >> 31))  # divides toward zero
    right = max(-shift, 0)
    mask = (1 << right) - 1
    threshold = (mask >> 1) + (high < 0)
    rounded = (high >> right) + ((high & mask) > threshold)
    return np.clip(rounded + zero_point, -128, 127)


def vector_start(table: Any, vtable_offset: int) -> int:
    """Byte position in the flatbuffer of the first element of a table's vector field."""
    return int(table._tab.Vector(table._tab.Offset(vtable_offset)))


def test_per_tensor_multiplier_is_computed_in_double_like_per_channel() -> None:
    """TFLM's per-tensor multiplier is double(s_in) * double(s_w) / double(s_out), as per channel, not
    double(float(s_in * s_w)) / s_out (GetQuantizedConvolutionMultipler's expression). The two differ by
    about 5e-8 relative, which no natural model shows, so the model is rigged: weights patched to 127
    (first half) and 1 (second half), making every accumulator in about +-2M reachable, and an output
    scale that keeps those unclamped; rows are then built for accumulators where the two round apart."""
    model = bytearray(single_dense_per_tensor())
    fb = schema_fb.Model.GetRootAs(bytes(model), 0)
    graph = fb.Subgraphs(0)
    op = graph.Operators(0)
    x_t, w_t, b_t = (graph.Tensors(int(i)) for i in op.InputsAsNumpy())
    y_t = graph.Tensors(int(op.OutputsAsNumpy()[0]))
    s_in, s_w = np.float32(x_t.Quantization().Scale(0)), np.float32(w_t.Quantization().Scale(0))
    zp_in, zp_out = int(x_t.Quantization().ZeroPoint(0)), int(y_t.Quantization().ZeroPoint(0))
    bias = fb.Buffers(b_t.Buffer()).DataAsNumpy().view("<i4").astype(np.int64)
    weights_at = vector_start(fb.Buffers(w_t.Buffer()), 4)
    model[weights_at : weights_at + 64 * 256] = (bytes([127] * 128 + [1] * 128)) * 64
    low, high = 128 * 127 * (-128 - zp_in), 128 * 127 * (127 - zp_in)  # the 127-weight half; the 1s fill in
    s_out = np.float32(float(s_in * s_w) * max(-low, high) / 125)  # the largest accumulator maps to ~125 LSB
    scale_at = vector_start(y_t.Quantization(), 8)
    model[scale_at : scale_at + 4] = s_out.tobytes()
    rigged = bytes(model)

    float_product = quantize_multiplier(float(s_in * s_w) / float(s_out))
    double_product = quantize_multiplier(float(s_in) * float(s_w) / float(s_out))
    assert float_product != double_product
    acc = np.arange(low, high + 1, dtype=np.int64)
    telling = acc[requantize(acc, *float_product, zp_out) != requantize(acc, *double_product, zp_out)]
    assert telling.size > 0, "no accumulator value tells the two multipliers apart"

    def row_for(target: int) -> np.ndarray:
        """Inputs whose channel-0 accumulator is target: the 127-weight half coarse, the 1-weight half the rest."""
        coarse = int(np.clip(round((target - bias[0]) / 127), 128 * (-128 - zp_in), 128 * (127 - zp_in)))
        fine = int(target - bias[0] - 127 * coarse)
        parts = [
            np.full(128, coarse // 128) + (np.arange(128) < coarse % 128),
            np.full(128, fine // 128) + (np.arange(128) < fine % 128),
        ]
        row = np.concatenate(parts) + zp_in
        assert row.min() >= -128 and row.max() <= 127, target
        return row.astype(np.int8)

    rows = np.stack([row_for(int(t)) for t in telling[:: max(1, telling.size // 40)]])
    accs = ((rows.astype(np.int64) - zp_in) @ np.array([127] * 128 + [1] * 128))[:, None] + bias[None, :]
    expected = requantize(accs, *double_product, zp_out)
    assert (expected[:, 0] != requantize(accs[:, 0], *float_product, zp_out)).all()
    np.testing.assert_array_equal(TflmRunner(rigged).predict_int8(rows), expected)
    np.testing.assert_array_equal(NativeRuntime(rigged).predict_int8(rows), expected)


@pytest.mark.slow
@pytest.mark.parametrize(
    ("board", "name"),
    [
        ("mps2-an386", "per-tensor"),
        ("mps2-an386", "per-channel"),
        ("mps2-an386", "mlperf"),
        ("microbit", "per-tensor"),
        ("microbit", "per-channel"),
    ],
)
def test_bit_exact_on_the_emulated_cores(board: str, name: str) -> None:
    """The Cortex-M builds (SXTB16/SMLAD dot product on the M4F, plain C on the M0) give TFLM's outputs too.

    Row widths 6, 40, 32, 16, 12 (mixed) and 640/128/8 (MLPerf shape) exercise the 4-byte loop and its tail.
    """
    from firmware import emulator
    from firmware.tflm import count_macs
    from tinymlops.contracts.dsp import DspSpec

    model = mlperf_shaped_model() if name == "mlperf" else mixed_model(name == "per-channel")
    runner = TflmRunner(model)
    rows = int8_rows(6, runner.n_features, seed=13)
    spec = DspSpec(window_samples=256)
    measured = emulator.measure(board, model, spec, np.zeros((len(rows), 256), np.int16), 1.0, model_inputs=rows)
    np.testing.assert_array_equal(measured.output_int8, runner.predict_int8(rows))
    per_mac = measured.inference_instructions_mean / count_macs(model)
    log.info(
        "%s %s: %.0f instructions per inference, %.2f per MAC",
        board,
        name,
        measured.inference_instructions_mean,
        per_mac,
    )


# ---------------------------------------------------------------------------------------------
# refusals and the arena


@pytest.mark.parametrize(("kind", "name"), [("tanh", "TANH"), ("conv", "CONV_2D")])
def test_a_model_with_an_unsupported_op_is_refused(kind: str, name: str) -> None:
    model = unsupported_model(kind)
    assert name in op_names(model)
    index = op_names(model).index(name)
    with pytest.raises(
        TinyrtError, match=rf"^model rejected by tinyrt: ERR_UNSUPPORTED_OP \(operator {index} is {name}"
    ):
        NativeRuntime(model)
    with pytest.raises(TinyrtError, match="ERR_UNSUPPORTED_OP"):
        arena_required(model)


def test_a_too_small_arena_is_refused_with_the_size_needed() -> None:
    model = int8_autoencoder()
    needed = arena_required(model)
    with pytest.raises(TinyrtError, match=rf"^model rejected by tinyrt: ERR_ARENA \(needs {needed} bytes\)$"):
        NativeRuntime(model, arena_bytes=needed - 1)
    exact = NativeRuntime(model, arena_bytes=needed)
    assert exact.arena_required == needed
    rows = int8_rows(20, exact.n_features, seed=9)
    np.testing.assert_array_equal(
        exact.predict_int8(rows), NativeRuntime(model, arena_bytes=4 * needed).predict_int8(rows)
    )


def test_bad_inputs_and_not_a_model_raise_one_line_errors() -> None:
    native = NativeRuntime(int8_autoencoder())
    with pytest.raises(TinyrtError, match="needs int8 inputs"):
        native.predict_int8(np.zeros((1, native.n_features), dtype=np.float32))
    with pytest.raises(TinyrtError, match=r"shape \(n, 35\)"):
        native.predict_int8(np.zeros((1, 3), dtype=np.int8))
    with pytest.raises(TinyrtError, match=r"^model rejected by tinyrt: ERR_FORMAT$"):
        NativeRuntime(b"not a flatbuffer at all")


def test_the_c_api_refuses_null_pointers_and_invoke_before_init() -> None:
    lib = load_library()
    state = ctypes.create_string_buffer(lib.trt_model_size())
    model = int8_autoencoder()
    assert lib.trt_init(None, model, len(model), None, 0) == ERR_NULL
    assert lib.trt_init(state, None, 0, None, 0) == ERR_NULL
    assert lib.trt_init(state, model, len(model), None, 64) == ERR_NULL  # a length without an arena
    assert not lib.trt_input(state) and not lib.trt_output(state)
    assert lib.trt_invoke(state) == ERR_STATE  # the failed init left nothing to run
    assert lib.trt_invoke(None) == ERR_NULL
    assert [status_name(code) for code in (OK, ERR_NULL, ERR_STATE)] == ["OK", "ERR_NULL", "ERR_STATE"]


@pytest.mark.slow
def test_arena_is_no_larger_than_tflm_needs() -> None:
    """tinyrt's arena: activations (greedy, a buffer reused once its last reader ran) plus per-output
    parameters (the folded bias; per channel also the multiplier and a one-byte shift, which TFLM keeps
    in its arena too). It stays under even the total TFLM's allocator reports, which excludes the
    slack the smallest working arena needs; TFLM's host figure also holds its 64-bit tensor structs."""
    for name, model in (
        ("tiny", int8_autoencoder()),
        ("mixed", mixed_model(True)),
        ("mlperf", mlperf_shaped_model()),
    ):
        ours = arena_required(model)
        tflm = measure_arena(model)
        log.info(
            "arena %s: tinyrt %d B, TFLM smallest working %d B (reported %d B)",
            name,
            ours,
            tflm.smallest_working_bytes,
            tflm.reported_bytes,
        )
        assert ours <= tflm.reported_bytes <= tflm.smallest_working_bytes, (name, ours, tflm)


# ---------------------------------------------------------------------------------------------
# fuzzing the flatbuffer reader under AddressSanitizer + UBSan

# Reads (u32 length, u32 claimed length, bytes) records from stdin; per record prints the first
# init's status (no arena), the size asked for, then init and invoke in exactly that arena, and the output.
_WORKER = r"""
import ctypes, struct, sys
from firmware.tinyrt import declare_functions
lib = declare_functions(ctypes.CDLL(sys.argv[1]))
state = ctypes.create_string_buffer(lib.trt_model_size())
while True:
    head = sys.stdin.buffer.read(8)
    if len(head) < 8:
        break
    n, claimed = struct.unpack("<II", head)
    model = ctypes.create_string_buffer(sys.stdin.buffer.read(n) or b"\0", max(n, 1))
    first = lib.trt_init(state, model, claimed, None, 0)
    required = lib.trt_arena_required(state)
    second = invoke = 1
    output = ""
    if first == -8 and required <= 1 << 22:
        arena = (ctypes.c_uint8 * required)()
        second = lib.trt_init(state, model, claimed, arena, required)
        if second == 0:
            inp = lib.trt_input(state).contents
            ctypes.memset(inp.data, 0x5A, inp.size)
            invoke = lib.trt_invoke(state)
            out = lib.trt_output(state).contents
            output = ctypes.string_at(out.data, out.size).hex()
    sys.stdout.write(f"{first} {required} {second} {invoke} {output}\n")
    sys.stdout.flush()
"""


class SanitizedRuntime:
    """The ASan/UBSan build of tinyrt in a worker process; restarted after a crash so shrinking works."""

    def __init__(self) -> None:
        self.library = build_library("libtinyrt_asan.so")
        self.proc: subprocess.Popen[bytes] | None = None

    def _start(self) -> subprocess.Popen[bytes]:
        asan = subprocess.run(["gcc", "-print-file-name=libasan.so"], capture_output=True, text=True, check=True)
        env = {
            **os.environ,
            "LD_PRELOAD": asan.stdout.strip(),
            "ASAN_OPTIONS": "detect_leaks=0:abort_on_error=0",
            "UBSAN_OPTIONS": "print_stacktrace=1",
            "PYTHONMALLOC": "malloc",  # every buffer straight from malloc: ASan's redzones around each
            "PYTHONPATH": str(REPO_ROOT),
        }
        return subprocess.Popen(
            [sys.executable, "-c", _WORKER, str(self.library)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
        )

    def run(self, model: bytes, claimed_len: int | None = None) -> tuple[int, int, int, int, str]:
        """(first init status, arena asked for, init status in that arena, invoke status, output hex)."""
        if self.proc is None or self.proc.poll() is not None:
            self.proc = self._start()
        assert self.proc.stdin is not None and self.proc.stdout is not None
        claimed = len(model) if claimed_len is None else claimed_len
        try:
            self.proc.stdin.write(struct.pack("<II", len(model), claimed) + model)
            self.proc.stdin.flush()
            line = self.proc.stdout.readline().decode()
        except BrokenPipeError:
            line = ""
        if not line:
            self.proc.wait(timeout=30)
            assert self.proc.stderr is not None
            report = self.proc.stderr.read().decode(errors="replace")
            self.proc = None
            raise AssertionError(f"tinyrt crashed on a {len(model)}-byte input:\n{report[-3000:]}")
        first, required, second, invoke, *output = line.split()
        return int(first), int(required), int(second), int(invoke), "".join(output)

    def close(self) -> None:
        """End the worker (closing its stdin ends its loop)."""
        if self.proc is not None and self.proc.stdin is not None:
            self.proc.stdin.close()
            self.proc.wait(timeout=30)


@pytest.fixture(scope="module")
def sanitized() -> Iterator[SanitizedRuntime]:
    runtime = SanitizedRuntime()
    yield runtime
    runtime.close()


@functools.cache
def fuzz_seeds() -> tuple[bytes, bytes]:
    """Valid models to mutate: the tiny autoencoder (per-channel) and the per-tensor mixed model with RESHAPE."""
    return int8_autoencoder(), mixed_model(False)


def assert_defined(result: tuple[int, int, int, int, str]) -> None:
    first, required, second, invoke, _ = result
    event(f"init {first}")  # the status mix: pytest --hypothesis-show-statistics
    assert first in DEFINED_STATUSES and first != OK, result  # no arena: OK is impossible
    if first == ERR_ARENA:
        assert required > 0
        if required <= 1 << 22:
            assert second == OK and invoke == OK, result  # in exactly the size it asked for, it runs


def test_the_sanitized_worker_catches_an_out_of_bounds_read(sanitized: SanitizedRuntime) -> None:
    """The harness itself: a length that lies about the buffer makes the reader run off it, and that fails."""
    model = int8_autoencoder()
    with pytest.raises(AssertionError, match="AddressSanitizer"):
        sanitized.run(model[: len(model) // 2], claimed_len=len(model))


def test_valid_seeds_run_identically_under_the_sanitizers(sanitized: SanitizedRuntime) -> None:
    for model in fuzz_seeds():
        first, required, second, invoke, output = sanitized.run(model)
        assert (first, required, second, invoke) == (ERR_ARENA, arena_required(model), OK, OK)
        native = NativeRuntime(model)
        expected = native.predict_int8(np.full((1, native.n_features), 0x5A, dtype=np.int8))
        assert output == expected.tobytes().hex()


@settings(max_examples=300, deadline=None)
@given(seed=st.sampled_from([0, 1]), cut=st.floats(0.0, 1.0, exclude_max=True))
def test_truncated_models_are_refused_or_read_only_what_they_hold(
    sanitized: SanitizedRuntime, seed: int, cut: float
) -> None:
    model = fuzz_seeds()[seed]
    result = sanitized.run(model[: int(cut * len(model))])
    assert_defined(result)
    if result[2] == OK:  # every byte it read is still there: then it must compute the same
        assert result[4] == sanitized.run(model)[4]


@settings(max_examples=400, deadline=None)
@given(
    seed=st.sampled_from([0, 1]),
    flips=st.lists(st.tuples(st.floats(0.0, 1.0, exclude_max=True), st.integers(1, 255)), min_size=1, max_size=8),
)
def test_random_byte_flips_never_crash(sanitized: SanitizedRuntime, seed: int, flips: list[tuple[float, int]]) -> None:
    model = bytearray(fuzz_seeds()[seed])
    for where, mask in flips:
        model[int(where * len(model))] ^= mask
    assert_defined(sanitized.run(bytes(model)))


# absolute extremes, anything, or (relative to where it is written) pointing just around the end of the buffer
OFFSETS = st.one_of(
    st.tuples(
        st.just(False),
        st.sampled_from([0, 1, 2, 3, 4, 0x7FFF_FFFF, 0x8000_0000, 0xFFFF_FFFF, 0xFFFF_FFFC, 0xFFFF_0000, 0x1_0000]),
    ),
    st.tuples(st.just(False), st.integers(0, 2**32 - 1)),
    st.tuples(st.just(True), st.integers(-64, 64)),
)


@settings(max_examples=400, deadline=None)
@given(
    seed=st.sampled_from([0, 1]),
    splices=st.lists(
        st.tuples(st.floats(0.0, 1.0, exclude_max=True), OFFSETS, st.sampled_from([2, 4])), min_size=1, max_size=4
    ),
)
def test_spliced_offsets_never_crash(
    sanitized: SanitizedRuntime, seed: int, splices: list[tuple[float, tuple[bool, int], int]]
) -> None:
    """Offsets, lengths and vtable entries (u32 or u16, aligned) replaced by extreme or random values."""
    model = bytearray(fuzz_seeds()[seed])
    for where, (from_end, value), width in splices:
        at = int(where * (len(model) - width)) & ~(width - 1)
        raw = len(model) - at + value if from_end else value
        model[at : at + width] = (raw & ((1 << (8 * width)) - 1)).to_bytes(width, "little")
    assert_defined(sanitized.run(bytes(model)))


@settings(max_examples=300, deadline=None)
@given(body=st.binary(max_size=600), root=st.integers(0, 700), identified=st.booleans())
def test_random_bytes_are_refused(sanitized: SanitizedRuntime, body: bytes, root: int, identified: bool) -> None:
    model = (struct.pack("<I", root) + b"TFL3" + body) if identified else body
    result = sanitized.run(model)
    assert_defined(result)
    assert result[0] != ERR_ARENA or identified  # without the identifier nothing is a model


# ---------------------------------------------------------------------------------------------
# the project's own models


@pytest.mark.slow
@pytest.mark.realdata
@pytest.mark.prefect
def test_trained_cwru_bundles_are_bit_exact_with_tflm(cwru_trained: dict[str, object]) -> None:
    from tinymlops.schemas import load_bundle

    bundles = cwru_trained["bundles"]
    assert isinstance(bundles, dict) and bundles
    for target, directory in bundles.items():
        bundle = load_bundle(Path(str(directory)))
        model = bundle.tflite()
        runner = TflmRunner(model, bundle.metadata.arena_bytes)
        native = NativeRuntime(model)
        real = bundle.drift_reference().features.astype(np.float32)
        compared = assert_bit_exact(model, int8_rows(300, native.n_features, seed=11), runner)
        compared += assert_bit_exact(model, runner.input.quantize(real), runner)
        np.testing.assert_array_equal(native.predict(real), runner.predict(real))
        log.info(
            "%s: %d output elements identical; arena tinyrt %d B, bundle (TFLM) %d B",
            target,
            compared,
            native.arena_required,
            bundle.metadata.arena_bytes,
        )
        assert native.arena_required <= bundle.metadata.arena_bytes
