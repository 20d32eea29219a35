"""ctypes binding of the device's int8 inference runtime in C (``firmware/c/tinyrt.c``).

The library is built with ``make`` into ``firmware/c/build/`` on first use, and rebuilt when a
source is newer than it. It runs a ``.tflite`` model with the arithmetic the MCU runs, so the
server can check it bit for bit against TensorFlow Lite Micro (:mod:`firmware.tflm`) and measure
the arena the device needs.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import shutil
import subprocess
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from tflite_micro.tensorflow.lite.micro.python import schema_py_generated as schema_fb

from tinymlops.errors import TinyMLOpsError

logger = logging.getLogger(__name__)

C_DIR = Path(__file__).resolve().parent / "c"
BUILD_DIR = C_DIR / "build"
LIBRARY = BUILD_DIR / "libtinyrt.so"
_SOURCES = ("tinyrt.c", "tinyrt.h", "Makefile")

TRT_OK = 0
TRT_ERR_UNSUPPORTED_OP = -4
TRT_ERR_ARENA = -8
# Names of the TFLite schema's builtin operator codes, for messages (the schema bindings only; no TFLM import).
_OP_NAMES = {code: name for name, code in vars(schema_fb.BuiltinOperator).items() if not name.startswith("_")}


class TinyrtError(TinyMLOpsError):
    """The runtime library cannot be built, or it rejected a model or a call."""


class TrtIo(ctypes.Structure):
    """Mirror of ``trt_io_t`` in tinyrt.h."""

    _fields_ = (
        ("data", ctypes.POINTER(ctypes.c_int8)),
        ("size", ctypes.c_uint32),
        ("scale", ctypes.c_float),
        ("zero_point", ctypes.c_int32),
    )


def build_library(name: str = LIBRARY.name) -> Path:
    """Build (or bring up to date) a library target of ``firmware/c/Makefile`` with make.

    Args:
        name: The make target, a file name under ``build/`` (``libtinyrt.so`` or ``libtinyrt_asan.so``).

    Returns:
        Path of the library.

    Raises:
        TinyrtError: make or gcc is missing, or the build failed (the message carries the compiler's last line).
    """
    missing = [tool for tool in ("make", "gcc") if shutil.which(tool) is None]
    if missing:
        raise TinyrtError(f"cannot build {name}: {' and '.join(missing)} not found on PATH")
    logger.info("building %s", BUILD_DIR / name)
    result = subprocess.run(["make", "-C", str(C_DIR), name], capture_output=True, text=True, check=False, timeout=120)
    if result.returncode != 0:
        lines = (result.stderr or result.stdout).strip().splitlines() or ["no output"]
        raise TinyrtError(f"make {name} failed with exit {result.returncode}: {lines[-1]}")
    return BUILD_DIR / name


def _is_stale() -> bool:
    if not LIBRARY.exists():
        return True
    built = LIBRARY.stat().st_mtime
    return any((C_DIR / name).stat().st_mtime > built for name in _SOURCES)


def declare_functions(lib: ctypes.CDLL) -> ctypes.CDLL:
    """Set the argument and result types of the runtime's functions on a loaded library."""
    lib.trt_init.argtypes = (ctypes.c_void_p, ctypes.c_char_p, ctypes.c_size_t, ctypes.c_void_p, ctypes.c_size_t)
    lib.trt_init.restype = ctypes.c_int
    lib.trt_invoke.argtypes = (ctypes.c_void_p,)
    lib.trt_invoke.restype = ctypes.c_int
    lib.trt_arena_required.argtypes = (ctypes.c_void_p,)
    lib.trt_arena_required.restype = ctypes.c_size_t
    for name in ("trt_input", "trt_output"):
        getattr(lib, name).argtypes = (ctypes.c_void_p,)
        getattr(lib, name).restype = ctypes.POINTER(TrtIo)
    lib.trt_status_name.argtypes = (ctypes.c_int,)
    lib.trt_status_name.restype = ctypes.c_char_p
    lib.trt_failed_op.argtypes = (ctypes.c_void_p, ctypes.POINTER(ctypes.c_int32))
    lib.trt_failed_op.restype = ctypes.c_int32
    lib.trt_model_size.argtypes = ()
    lib.trt_model_size.restype = ctypes.c_size_t
    return lib


@functools.cache
def load_library() -> ctypes.CDLL:
    """Load the runtime library, building it first where missing or stale."""
    if _is_stale():
        build_library()
    return declare_functions(ctypes.CDLL(str(LIBRARY)))


def status_name(status: int) -> str:
    """The runtime's name of a status code (``OK``, ``ERR_FORMAT``, ...)."""
    return str(load_library().trt_status_name(status).decode())


class _Model:
    """A ``trt_model_t`` with the model bytes and arena it points into, kept alive together."""

    def __init__(self, model: bytes, arena_bytes: int) -> None:
        lib = load_library()
        self.lib = lib
        self.state = ctypes.create_string_buffer(lib.trt_model_size())
        self.model = ctypes.create_string_buffer(model, len(model))
        self.arena = ctypes.create_string_buffer(max(arena_bytes, 1)) if arena_bytes > 0 else None
        self.status = int(lib.trt_init(self.state, self.model, len(model), self.arena, max(arena_bytes, 0)))
        self.arena_required = int(lib.trt_arena_required(self.state))

    def error(self) -> TinyrtError:
        """One-line error naming the status of a failed init (and the operator, where one caused it)."""
        detail = ""
        builtin = ctypes.c_int32(-1)
        op_index = int(self.lib.trt_failed_op(self.state, ctypes.byref(builtin)))
        if self.status == TRT_ERR_ARENA:
            detail = f" (needs {self.arena_required} bytes)"
        elif op_index >= 0:
            name = _OP_NAMES.get(builtin.value, f"builtin {builtin.value}")
            detail = f" (operator {op_index} is {name}, builtin code {builtin.value})"
        return TinyrtError(f"model rejected by tinyrt: {status_name(self.status)}{detail}")


def arena_required(model: bytes) -> int:
    """Bytes of arena tinyrt needs for ``model`` (4-byte aligned arena).

    Raises:
        TinyrtError: The runtime rejects the model.
    """
    probe = _Model(model, 0)
    if probe.status not in (TRT_OK, TRT_ERR_ARENA):
        raise probe.error()
    return probe.arena_required


class NativeRuntime:
    """A model loaded in the C runtime, run one row per invoke as on the device.

    Args:
        model: The int8 .tflite flatbuffer (one int8 input and one int8 output tensor).
        arena_bytes: Arena size; default exactly :func:`arena_required`.

    Raises:
        TinyrtError: The model is rejected, or the arena is too small (the message gives the size needed).
    """

    def __init__(self, model: bytes, arena_bytes: int | None = None) -> None:
        size = arena_required(model) if arena_bytes is None else arena_bytes
        self._model = _Model(model, size)
        if self._model.status != TRT_OK:
            raise self._model.error()
        self.arena_required = self._model.arena_required
        lib = self._model.lib
        self._input = lib.trt_input(self._model.state).contents
        self._output = lib.trt_output(self._model.state).contents

    @property
    def input_scale(self) -> float:
        """Scale of the int8 input tensor."""
        return float(self._input.scale)

    @property
    def input_zero_point(self) -> int:
        """Zero point of the int8 input tensor."""
        return int(self._input.zero_point)

    @property
    def output_scale(self) -> float:
        """Scale of the int8 output tensor."""
        return float(self._output.scale)

    @property
    def output_zero_point(self) -> int:
        """Zero point of the int8 output tensor."""
        return int(self._output.zero_point)

    @property
    def n_features(self) -> int:
        """Number of input elements per row."""
        return int(self._input.size)

    @property
    def n_outputs(self) -> int:
        """Number of output elements per row."""
        return int(self._output.size)

    def predict_int8(self, rows_int8: npt.ArrayLike) -> npt.NDArray[np.int8]:
        """Run quantized rows and return the raw int8 outputs.

        Args:
            rows_int8: int8 array (n, n_features) or (n_features,).

        Returns:
            int8 array (n, n_outputs).

        Raises:
            TinyrtError: The rows are not int8 or have the wrong width.
        """
        rows = self._rows(np.asarray(rows_int8))
        if rows.dtype != np.int8:
            raise TinyrtError(f"predict_int8 needs int8 inputs, got {rows.dtype}")
        out = np.empty((rows.shape[0], self.n_outputs), dtype=np.int8)
        lib, state = self._model.lib, self._model.state
        for i, row in enumerate(np.ascontiguousarray(rows)):
            ctypes.memmove(self._input.data, row.ctypes.data, self.n_features)
            status = int(lib.trt_invoke(state))
            if status != TRT_OK:
                raise TinyrtError(f"trt_invoke failed: {status_name(status)}")
            ctypes.memmove(out[i].ctypes.data, self._output.data, self.n_outputs)
        return out

    def predict(self, rows_float: npt.ArrayLike) -> npt.NDArray[np.float32]:
        """Quantize float rows with the input scale, run them, dequantize the outputs (as :class:`TflmRunner`).

        Args:
            rows_float: float32 array (n, n_features) or (n_features,).

        Returns:
            float32 array (n, n_outputs).
        """
        rows = self._rows(np.asarray(rows_float, dtype=np.float32))
        q = np.round(rows.astype(np.float64) / self.input_scale) + self.input_zero_point
        raw = self.predict_int8(np.clip(q, -128, 127).astype(np.int8))
        return ((raw.astype(np.float64) - self.output_zero_point) * self.output_scale).astype(np.float32)

    def _rows(self, x: npt.NDArray[Any]) -> npt.NDArray[Any]:
        if x.ndim == 1:
            x = x[None, :]
        if x.ndim != 2 or x.shape[1] != self.n_features:
            raise TinyrtError(f"inputs must have shape (n, {self.n_features}), got {x.shape}")
        return x
