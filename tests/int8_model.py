"""A tiny full-integer (int8) dense autoencoder for tests that need a real .tflite model.

Independent of the project's compression code on purpose: the TFLite Micro, budget and C-array
tests must not fail because training or compression changed.
"""

from __future__ import annotations

import functools
import itertools
import warnings
from collections.abc import Iterator

import numpy as np

from tinymlops.tfcompat import import_tf

N_FEATURES = 35
LAYER_UNITS = (16, 8, 16, N_FEATURES)


def dense_macs() -> int:
    """Multiply-accumulates of one inference of :func:`int8_autoencoder`: the sum of in*out per dense layer."""
    sizes = (N_FEATURES, *LAYER_UNITS)
    return sum(a * b for a, b in itertools.pairwise(sizes))


def sample_features(n: int, seed: int = 1) -> np.ndarray:
    """Normalised-feature-like inputs (standard normal, float32)."""
    return np.random.default_rng(seed).standard_normal((n, N_FEATURES)).astype(np.float32)


@functools.lru_cache(maxsize=1)
def int8_autoencoder() -> bytes:
    """Return the flatbuffer of a 35-16-8-16-35 autoencoder with int8 weights, activations, input and output."""
    tf, tf_keras = import_tf()
    tf_keras.utils.set_random_seed(0)
    model = tf_keras.Sequential(
        [tf_keras.layers.Input((N_FEATURES,))]
        + [tf_keras.layers.Dense(units, activation="relu") for units in LAYER_UNITS[:-1]]
        + [tf_keras.layers.Dense(LAYER_UNITS[-1])]
    )
    model.compile(optimizer="adam", loss="mse")
    x = sample_features(256)
    model.fit(x, x, epochs=2, batch_size=64, verbose=0)

    def representative() -> Iterator[list[np.ndarray]]:
        for row in x[:100]:
            yield [row[None, :]]

    converter = tf.lite.TFLiteConverter.from_keras_model(model)
    converter.optimizations = [tf.lite.Optimize.DEFAULT]
    converter.representative_dataset = representative
    converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS_INT8]
    converter.inference_input_type = tf.int8
    converter.inference_output_type = tf.int8
    with warnings.catch_warnings():
        # Harmless for a representative-dataset conversion; TF warns about missing input statistics anyway.
        warnings.filterwarnings("ignore", message="Statistics for quantized inputs were expected")
        return bytes(converter.convert())


def with_first_dense_zeroed(model: bytes) -> bytes:
    """``model`` with the weights of its first FULLY_CONNECTED all zero: a dead model whose output ignores its input.

    Only the weights buffer's bytes change, so the flatbuffer stays valid and loads in every runtime.
    """
    from tflite_micro.tensorflow.lite.micro.python import schema_py_generated as schema_fb

    fb = schema_fb.Model.GetRootAs(model, 0)
    graph = fb.Subgraphs(0)
    for i in range(graph.OperatorsLength()):
        op = graph.Operators(i)
        code = fb.OperatorCodes(op.OpcodeIndex())
        if max(code.BuiltinCode(), code.DeprecatedBuiltinCode()) == schema_fb.BuiltinOperator.FULLY_CONNECTED:
            weights = fb.Buffers(graph.Tensors(int(op.InputsAsNumpy()[1])).Buffer())
            start = weights._tab.Vector(weights._tab.Offset(4))  # the buffer's `data` vector (field 0)
            dead = bytearray(model)
            dead[start : start + weights.DataLength()] = bytes(weights.DataLength())
            return bytes(dead)
    raise ValueError("the model has no FULLY_CONNECTED operator")
