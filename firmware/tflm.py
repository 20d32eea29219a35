"""The model as the device runs it: the real TensorFlow Lite Micro interpreter, arena measurement, MAC count.

TFLite Micro (``tflite_micro.runtime``) is the interpreter the firmware links, so its tensor arena
is the RAM figure the budget gate checks. Two facts shape this module: there is no Python call
that returns the arena used (the allocator prints a report to file descriptor 2 from C++), and a
too-small arena can crash the whole process instead of raising (segfault or abort in the
allocator's failure path, observed for sizes up to just below the smallest working one). Every
arena size that is not known to work is therefore first tried in a worker subprocess
(``python -m firmware.tflm measure|check ...``) whose crash only raises the lower bound of the search.
"""

from __future__ import annotations

import functools
import logging
import os
import re
import subprocess
import sys
import tempfile
import warnings
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from tflite_micro import runtime

# The flatbuffer schema bindings that tflite_micro itself uses: reading a model does not import TensorFlow.
from tflite_micro.tensorflow.lite.micro.python import schema_py_generated as schema_fb

from tinymlops.errors import TinyMLOpsError

log = logging.getLogger(__name__)

_PACKAGE_ROOT = Path(__file__).resolve().parent.parent
_REPORT_TOTAL = re.compile(r"Arena allocation total (\d+) bytes")
# Largest arena tried while looking for a working size: far above any MCU's SRAM.
_MAX_ARENA_BYTES = 64 * 1024 * 1024
_MAX_WORKERS = 20
_WORKER_TIMEOUT_S = 60.0
_OP_NAMES = {code: name for name, code in vars(schema_fb.BuiltinOperator).items() if not name.startswith("_")}
# Element-wise or data-movement ops: no multiply-accumulate loops worth counting.
_NEGLIGIBLE_OPS = frozenset(
    {
        "ADD",
        "AVERAGE_POOL_2D",
        "CONCATENATION",
        "DEQUANTIZE",
        "EXPAND_DIMS",
        "LOGISTIC",
        "MAX_POOL_2D",
        "MUL",
        "PAD",
        "QUANTIZE",
        "RELU",
        "RELU6",
        "RESHAPE",
        "SOFTMAX",
        "SQUEEZE",
        "SUB",
        "TANH",
    }
)


class TflmError(TinyMLOpsError):
    """A model cannot be loaded, allocated or run by TensorFlow Lite Micro."""


@dataclass(frozen=True)
class ArenaMeasurement:
    """Tensor arena of one model in TFLite Micro (host build, 64-bit pointers).

    Attributes:
        reported_bytes: Total of the recording allocator's report ("Arena allocation total") when
            running in the smallest working arena (which is usually somewhat larger).
        smallest_working_bytes: Smallest ``arena_size`` with which the model allocates and runs.
        model_bytes: Size of the flatbuffer.

    """

    reported_bytes: int
    smallest_working_bytes: int
    model_bytes: int

    def to_dict(self) -> dict[str, int]:
        """Return a JSON-serialisable dict."""
        return asdict(self)


@dataclass(frozen=True)
class ParityReport:
    """Agreement of the TFLite and TFLite Micro outputs on the same quantized inputs.

    Attributes:
        max_abs_lsb: Largest absolute difference of any output element, in quantization steps.
        fraction_differing: Fraction of output elements that differ at all.
        n: Number of input rows compared.

    """

    max_abs_lsb: int
    fraction_differing: float
    n: int

    def to_dict(self) -> dict[str, float | int]:
        """Return a JSON-serialisable dict."""
        return asdict(self)


@dataclass(frozen=True)
class _Quantization:
    shape: tuple[int, ...]
    dtype: np.dtype[Any]
    scale: float
    zero_point: int

    @property
    def is_quantized(self) -> bool:
        return self.dtype in (np.dtype(np.int8), np.dtype(np.uint8))

    @classmethod
    def from_details(cls, details: dict[str, Any]) -> _Quantization:
        params = details.get("quantization_parameters", {})
        scales = np.asarray(params.get("scales", ()), dtype=np.float64)
        zero_points = np.asarray(params.get("zero_points", ()), dtype=np.int64)
        return cls(
            shape=tuple(int(d) for d in details["shape"]),
            dtype=np.dtype(details["dtype"]),
            scale=float(scales[0]) if scales.size else 0.0,
            zero_point=int(zero_points[0]) if zero_points.size else 0,
        )

    def quantize(self, x: npt.NDArray[np.float32]) -> npt.NDArray[Any]:
        if not self.is_quantized:
            return x.astype(self.dtype)
        info = np.iinfo(self.dtype)
        q = np.round(x.astype(np.float64) / self.scale) + self.zero_point
        return np.clip(q, info.min, info.max).astype(self.dtype)

    def dequantize(self, q: npt.NDArray[Any]) -> npt.NDArray[np.float32]:
        if not self.is_quantized:
            return q.astype(np.float32)
        return ((q.astype(np.float64) - self.zero_point) * self.scale).astype(np.float32)


def _main_subgraph(model: bytes) -> tuple[Any, Any]:
    """Return the flatbuffer ``Model`` and its main subgraph, or raise if the bytes are not a TFLite model."""
    if len(model) < 8 or not schema_fb.Model.ModelBufferHasIdentifier(model, 0):
        raise TflmError(f"not a TFLite flatbuffer ({len(model)} bytes, no 'TFL3' identifier)")
    fb = schema_fb.Model.GetRootAs(model, 0)
    if fb.SubgraphsLength() < 1:
        raise TflmError("TFLite model has no subgraph")
    return fb, fb.Subgraphs(0)


def _op_name(fb: Any, op: Any) -> str:
    opcode = fb.OperatorCodes(op.OpcodeIndex())
    code = max(opcode.BuiltinCode(), opcode.DeprecatedBuiltinCode())
    if code == schema_fb.BuiltinOperator.CUSTOM:
        return f"CUSTOM:{(opcode.CustomCode() or b'').decode()}"
    return _OP_NAMES.get(code, f"BUILTIN_{code}")


def op_names(model: bytes) -> list[str]:
    """Return the operator names of the main subgraph in execution order (e.g. ``FULLY_CONNECTED``)."""
    fb, graph = _main_subgraph(model)
    return [_op_name(fb, graph.Operators(i)) for i in range(graph.OperatorsLength())]


def count_macs(model: bytes) -> int:
    """Count the multiply-accumulates of one inference from the model graph.

    FULLY_CONNECTED, CONV_2D and DEPTHWISE_CONV_2D are counted from their weight and output
    shapes; element-wise ops count as zero, any other op as zero with a warning.
    """
    fb, graph = _main_subgraph(model)
    total = 0
    for i in range(graph.OperatorsLength()):
        op = graph.Operators(i)
        name = _op_name(fb, op)
        if name in ("FULLY_CONNECTED", "CONV_2D", "DEPTHWISE_CONV_2D"):
            weights = graph.Tensors(int(op.Inputs(1))).ShapeAsNumpy()
            outputs = int(np.prod(graph.Tensors(int(op.Outputs(0))).ShapeAsNumpy()))
            if name == "FULLY_CONNECTED":  # weights [out, in]: each output element sums `in` products
                total += outputs * int(weights[-1])
            elif name == "CONV_2D":  # weights [out_c, kh, kw, in_c]
                total += outputs * int(np.prod(weights[1:]))
            else:  # weights [1, kh, kw, out_c]: one kh*kw window per output element
                total += outputs * int(weights[1] * weights[2])
        elif name not in _NEGLIGIBLE_OPS:
            log.warning("count_macs: op %s is not counted (0 MACs assumed)", name)
    return total


def _io_counts(model: bytes) -> tuple[int, int]:
    _, graph = _main_subgraph(model)
    return graph.InputsLength(), graph.OutputsLength()


def _capture_fd2(fn: Callable[[], object]) -> str:
    """Run ``fn`` and return what it wrote to file descriptor 2 (C++ ``stderr`` included)."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile() as sink:
        os.dup2(sink.fileno(), 2)
        try:
            fn()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
        sink.seek(0)
        return sink.read().decode(errors="replace")


def _run_once(model: bytes, arena_bytes: int) -> Any:
    """Build an interpreter with ``arena_bytes`` and invoke it once on zeros; raise RuntimeError if it fails."""
    interpreter = runtime.Interpreter.from_bytes(model, arena_size=arena_bytes)
    n_inputs, _ = _io_counts(model)
    for index in range(n_inputs):
        details = interpreter.get_input_details(index)
        interpreter.set_input(np.zeros(details["shape"], dtype=details["dtype"]), index)
    interpreter.invoke()
    return interpreter


def _emit(word: str, value: int) -> None:
    """Write one protocol line to the parent (stdout, flushed at once so it survives a crash)."""
    sys.stdout.write(f"{word} {value}\n")
    sys.stdout.flush()


def _attempt(model: bytes, size: int) -> Any:
    """Worker step: announce, try and report one arena size; return the interpreter if it ran."""
    _emit("try", size)
    try:
        interpreter = _run_once(model, size)
    except RuntimeError as exc:
        _emit("fail", size)
        log.debug("arena %d failed: %s", size, exc)
        return None
    _emit("ok", size)
    return interpreter


def _measure_worker(model: bytes, lo: int, hi: int) -> None:
    """Worker: find a working arena (if ``hi`` is 0), bisect between ``lo`` (fails) and ``hi`` (works).

    Ends with ``reported N``: the allocator report's total when running in the smallest working arena.
    """
    if hi == 0:
        # Start at TFLM's own default (ten times the model), or well above a size that already failed.
        size = min(4 * lo, _MAX_ARENA_BYTES) if lo else 10 * len(model)
        while _attempt(model, size) is None:
            if size >= _MAX_ARENA_BYTES:
                return
            size = min(size * 4, _MAX_ARENA_BYTES)
        hi = size
    while hi - lo > 1:
        mid = (lo + hi) // 2
        if _attempt(model, mid) is None:
            lo = mid
        else:
            hi = mid
    interpreter = _attempt(model, hi)
    match = _REPORT_TOTAL.search(_capture_fd2(interpreter.print_allocations))
    _emit("reported", int(match.group(1)) if match else -1)


@dataclass
class _Search:
    """State of the arena search across worker processes."""

    lo: int = 0
    hi: int = 0
    reported: int | None = None
    stderr_tail: str = ""


def _run_worker(args: Sequence[str]) -> tuple[int, list[str], str]:
    """Run ``python -m firmware.tflm ARGS``; return its exit code (negative: signal), stdout lines, stderr tail."""
    pythonpath = os.pathsep.join(filter(None, [str(_PACKAGE_ROOT), os.environ.get("PYTHONPATH")]))
    try:
        proc = subprocess.run(
            [sys.executable, "-m", "firmware.tflm", *args],
            capture_output=True,
            text=True,
            timeout=_WORKER_TIMEOUT_S,
            env={**os.environ, "PYTHONPATH": pythonpath},
            check=False,
        )
    except subprocess.TimeoutExpired as exc:
        raise TflmError(f"TFLite Micro arena probe timed out after {_WORKER_TIMEOUT_S:.0f} s") from exc
    tail = " | ".join(line for line in proc.stderr.splitlines()[-3:] if line.strip())
    if proc.returncode > 0:
        raise TflmError(f"TFLite Micro arena probe failed (exit {proc.returncode}): {tail}")
    return proc.returncode, proc.stdout.splitlines(), tail


def _apply_worker_output(state: _Search, lines: Sequence[str]) -> int | None:
    """Fold a worker's protocol lines into ``state``; return the size it was trying when it stopped, if any."""
    pending: int | None = None
    for line in lines:
        word, _, value = line.partition(" ")
        if word not in ("try", "ok", "fail", "reported") or not value.lstrip("-").isdigit():
            continue
        size = int(value)
        if word == "try":
            pending = size
        elif word == "ok":
            state.hi, pending = size if state.hi == 0 else min(state.hi, size), None
        elif word == "fail":
            state.lo, pending = max(state.lo, size), None
        elif size >= 0:
            state.reported = size
    return pending


def _model_file(directory: str, model: bytes) -> str:
    path = Path(directory) / "model.tflite"
    path.write_bytes(model)
    return str(path)


def measure_arena(model: bytes) -> ArenaMeasurement:
    """Measure the tensor arena the model needs in TFLite Micro.

    The smallest working arena is found by bisection to the byte, in worker subprocesses: a
    worker killed by a signal while trying size N proves N too small, and a new worker goes on
    from there. The allocator's report is then read for a run in that smallest arena.

    Raises:
        TflmError: If the bytes are not a model or the model does not run with any arena.

    """
    _main_subgraph(model)
    state = _Search()
    with tempfile.TemporaryDirectory(prefix="tflm-probe-") as tmp:
        path = _model_file(tmp, model)
        for _ in range(_MAX_WORKERS):
            code, lines, state.stderr_tail = _run_worker(["measure", path, str(state.lo), str(state.hi)])
            pending = _apply_worker_output(state, lines)
            if code == 0:
                break
            if pending is None:
                raise TflmError(f"TFLite Micro crashed (signal {-code}) outside an arena trial: {state.stderr_tail}")
            if state.hi == 0 and pending >= _MAX_ARENA_BYTES:
                raise TflmError(f"model crashes TFLite Micro even with a {pending}-byte arena: {state.stderr_tail}")
            log.debug("arena %d crashed the probe (signal %d)", pending, -code)
            state.lo = max(state.lo, pending)
        else:
            raise TflmError(f"TFLite Micro arena probe crashed {_MAX_WORKERS} times; lower bound {state.lo} bytes")
    if state.hi == 0:
        raise TflmError(
            f"model does not allocate in TFLite Micro even with a {_MAX_ARENA_BYTES}-byte arena: {state.stderr_tail}"
        )
    if state.reported is None:
        raise TflmError("TFLite Micro allocator report has no 'Arena allocation total' line")
    measurement = ArenaMeasurement(state.reported, state.hi, len(model))
    log.info("TFLM arena: %s", measurement)
    return measurement


def probe_arena(model: bytes, arena_bytes: int) -> bool:
    """Return whether the model allocates and runs with ``arena_bytes``, tried in a subprocess.

    The answer depends only on the bytes and the size, so it is remembered for the process: a
    fleet of simulated devices loading the same model probes it once, not once per device.
    """
    _main_subgraph(model)
    if arena_bytes <= 0:
        return False
    return _probe_cached(model, arena_bytes)


@functools.lru_cache(maxsize=256)
def _probe_cached(model: bytes, arena_bytes: int) -> bool:
    with tempfile.TemporaryDirectory(prefix="tflm-probe-") as tmp:
        code, lines, _ = _run_worker(["check", _model_file(tmp, model), str(arena_bytes)])
    return code == 0 and f"ok {arena_bytes}" in lines


class TflmRunner:
    """Run a model in the TFLite Micro interpreter, one row per ``invoke`` as on the device.

    Args:
        model: The .tflite flatbuffer (one input and one output tensor).
        arena_bytes: Tensor arena size; default ten times the model size (TFLM's default).
            The size is first tried in a subprocess, so a too-small arena raises instead of
            crashing this process.

    Raises:
        TflmError: If the model does not load or allocate with that arena.

    """

    def __init__(self, model: bytes, arena_bytes: int | None = None) -> None:
        n_inputs, n_outputs = _io_counts(model)
        if (n_inputs, n_outputs) != (1, 1):
            raise TflmError(f"TflmRunner needs one input and one output tensor, model has {n_inputs}/{n_outputs}")
        self.arena_bytes = 10 * len(model) if arena_bytes is None else arena_bytes
        if not probe_arena(model, self.arena_bytes):
            raise TflmError(f"model ({len(model)} bytes) does not allocate in a {self.arena_bytes}-byte TFLM arena")
        try:
            self._interpreter = runtime.Interpreter.from_bytes(model, arena_size=self.arena_bytes)
        except (RuntimeError, ValueError) as exc:
            raise TflmError(f"TFLite Micro cannot load the model: {exc}") from exc
        self.input = _Quantization.from_details(self._interpreter.get_input_details(0))
        self.output = _Quantization.from_details(self._interpreter.get_output_details(0))

    @property
    def n_features(self) -> int:
        """Number of input elements per row."""
        return int(np.prod(self.input.shape[1:]))

    def predict(self, x: npt.ArrayLike) -> npt.NDArray[np.float32]:
        """Quantize float rows with the input scale, run them, and dequantize the outputs.

        Args:
            x: float32 array (n, n_features).

        Returns:
            float32 array (n, output elements).

        """
        rows = _as_rows(np.asarray(x, dtype=np.float32), self.n_features)
        return self.output.dequantize(self._invoke_rows(self.input.quantize(rows)))

    def predict_int8(self, x_int8: npt.ArrayLike) -> npt.NDArray[np.int8]:
        """Run already-quantized int8 rows and return the raw int8 outputs (for LSB comparisons)."""
        if self.input.dtype != np.dtype(np.int8) or self.output.dtype != np.dtype(np.int8):
            raise TflmError(
                f"predict_int8 needs an int8 model, input is {self.input.dtype}, output {self.output.dtype}"
            )
        rows = _as_rows(np.asarray(x_int8), self.n_features)
        if rows.dtype != np.int8:
            raise TflmError(f"predict_int8 needs int8 inputs, got {rows.dtype}")
        return self._invoke_rows(rows).astype(np.int8)

    def _invoke_rows(self, rows: npt.NDArray[Any]) -> npt.NDArray[Any]:
        outputs = []
        for row in rows:
            self._interpreter.set_input(row.reshape(self.input.shape).astype(self.input.dtype), 0)
            try:
                self._interpreter.invoke()
            except RuntimeError as exc:
                raise TflmError(f"TFLite Micro invoke failed: {exc}") from exc
            outputs.append(np.asarray(self._interpreter.get_output(0)).reshape(-1))
        if not outputs:
            return np.zeros((0, int(np.prod(self.output.shape[1:]))), dtype=self.output.dtype)
        return np.stack(outputs)


def _as_rows(x: npt.NDArray[Any], n_features: int) -> npt.NDArray[Any]:
    if x.ndim == 1:
        x = x[None, :]
    if x.ndim != 2 or x.shape[1] != n_features:
        raise TflmError(f"inputs must have shape (n, {n_features}), got {x.shape}")
    return x


@dataclass
class _TfliteModel:
    """A TFLite interpreter (reference kernels) with its I/O quantization."""

    interpreter: Any
    input: _Quantization
    output: _Quantization
    input_index: int
    output_index: int

    @classmethod
    def load(cls, model: bytes) -> _TfliteModel:
        from tinymlops.tfcompat import import_tf

        tf, _ = import_tf()
        with warnings.catch_warnings():
            # tf.lite.Interpreter warns it is deprecated for ai_edge_litert, which is not a dependency.
            warnings.filterwarnings("ignore", message=r".*tf\.lite\.Interpreter is deprecated", category=UserWarning)
            # Reference kernels, no XNNPACK delegate: the closest arithmetic to TFLM's reference kernels.
            interpreter = tf.lite.Interpreter(
                model_content=model, experimental_op_resolver_type=tf.lite.experimental.OpResolverType.BUILTIN_REF
            )
        inp, out = interpreter.get_input_details()[0], interpreter.get_output_details()[0]
        return cls(
            interpreter,
            _Quantization(tuple(int(d) for d in inp["shape"]), np.dtype(inp["dtype"]), *inp["quantization"]),
            _Quantization(tuple(int(d) for d in out["shape"]), np.dtype(out["dtype"]), *out["quantization"]),
            int(inp["index"]),
            int(out["index"]),
        )

    def invoke_rows(self, rows: npt.NDArray[Any]) -> npt.NDArray[Any]:
        """Run rows of raw (already quantized) inputs as one batch; return raw outputs (n, output elements)."""
        feature_shape = self.input.shape[1:]
        rows = _as_rows(rows, int(np.prod(feature_shape)))
        self.interpreter.resize_tensor_input(self.input_index, [rows.shape[0], *feature_shape])
        self.interpreter.allocate_tensors()
        self.interpreter.set_tensor(
            self.input_index, rows.reshape(rows.shape[0], *feature_shape).astype(self.input.dtype)
        )
        self.interpreter.invoke()
        return np.asarray(self.interpreter.get_tensor(self.output_index)).reshape(rows.shape[0], -1)


def tflite_predict(model: bytes, x: npt.ArrayLike) -> npt.NDArray[np.float32]:
    """Run float rows through the TFLite interpreter (reference kernels), quantized as :meth:`TflmRunner.predict`."""
    lite = _TfliteModel.load(model)
    rows = np.asarray(x, dtype=np.float32)
    return lite.output.dequantize(lite.invoke_rows(lite.input.quantize(rows)))


def compare_interpreters(model: bytes, x: npt.ArrayLike, runner: TflmRunner | None = None) -> ParityReport:
    """Compare TFLite and TFLite Micro outputs on the same quantized inputs, in output LSB.

    Args:
        model: An int8 .tflite flatbuffer.
        x: float32 rows (n, n_features), quantized with the model's input scale.
        runner: A TFLM runner for ``model`` to reuse (one is built otherwise).

    """
    runner = runner or TflmRunner(model)
    q = runner.input.quantize(_as_rows(np.asarray(x, dtype=np.float32), runner.n_features))
    diff = np.abs(runner.predict_int8(q).astype(np.int32) - _TfliteModel.load(model).invoke_rows(q).astype(np.int32))
    report = ParityReport(
        max_abs_lsb=int(diff.max()) if diff.size else 0,
        fraction_differing=float(np.mean(diff > 0)) if diff.size else 0.0,
        n=int(q.shape[0]),
    )
    log.info("TFLite vs TFLM parity: %s", report)
    return report


def _main(argv: Sequence[str]) -> int:
    """Probe worker: ``measure MODEL LO HI`` (find and bisect) or ``check MODEL SIZE`` (one trial)."""
    if len(argv) == 4 and argv[0] == "measure":
        _measure_worker(Path(argv[1]).read_bytes(), int(argv[2]), int(argv[3]))
    elif len(argv) == 3 and argv[0] == "check":
        _attempt(Path(argv[1]).read_bytes(), int(argv[2]))
    else:
        sys.stderr.write("usage: python -m firmware.tflm measure MODEL LO HI | check MODEL SIZE\n")
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
