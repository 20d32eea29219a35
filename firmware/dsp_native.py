"""ctypes binding of the device-side DSP front end in C (``firmware/c/dsp_features.c``).

The library is built with ``make`` into ``firmware/c/build/`` on first use, and rebuilt when a
source is newer than it. It lets the server run the exact arithmetic the MCU runs (single
precision, int16 samples plus a scale) and compare it with the numpy reference in
:mod:`tinymlops.contracts.dsp`.
"""

from __future__ import annotations

import ctypes
import functools
import logging
import shutil
import subprocess
from pathlib import Path

import numpy as np
import numpy.typing as npt

from tinymlops.contracts.dsp import DspSpec
from tinymlops.errors import TinyMLOpsError

logger = logging.getLogger(__name__)

C_DIR = Path(__file__).resolve().parent / "c"
BUILD_DIR = C_DIR / "build"
LIBRARY = BUILD_DIR / "libdsp_features.so"
_SOURCES = ("dsp_features.c", "dsp_features.h", "Makefile")

DSP_OK = 0
STATUS_NAMES = {
    -1: "DSP_ERR_NULL: a required pointer is NULL",
    -2: "DSP_ERR_SIZE: window_samples is not a power of two in [16, 16384]",
    -3: "DSP_ERR_BANDS: band edges are not increasing within 0..n/2+1",
    -4: "DSP_ERR_ARG: scale or a normalisation std is not finite and > 0",
}


class NativeDspError(TinyMLOpsError):
    """The C DSP library cannot be built, or it rejected its input."""


class ToolchainMissingError(NativeDspError):
    """gcc or make is not installed, so the C DSP library cannot be built."""


_FloatPtr = ctypes.POINTER(ctypes.c_float)


class DspConfig(ctypes.Structure):
    """Mirror of ``dsp_config_t`` in dsp_features.h."""

    _fields_ = (
        ("window_samples", ctypes.c_uint32),
        ("n_bands", ctypes.c_uint32),
        ("band_edges", ctypes.POINTER(ctypes.c_uint16)),
        ("hann", _FloatPtr),
        ("twiddle", _FloatPtr),
        ("mean", _FloatPtr),
        ("std", _FloatPtr),
        ("slope", _FloatPtr),
        ("reference_rpm", ctypes.c_float),
        ("valid_low_rpm", ctypes.c_float),
        ("valid_high_rpm", ctypes.c_float),
        ("speed_log10", ctypes.c_float),
    )


def build_library() -> Path:
    """Build (or bring up to date) the shared library with make.

    Returns:
        Path of the library.

    Raises:
        ToolchainMissingError: gcc or make is not on PATH.
        NativeDspError: The build failed; the message carries the compiler's last line.
    """
    missing = [tool for tool in ("make", "gcc") if shutil.which(tool) is None]
    if missing:
        raise ToolchainMissingError(f"cannot build {LIBRARY.name}: {' and '.join(missing)} not found on PATH")
    logger.info("building %s", LIBRARY)
    result = subprocess.run(
        ["make", "-C", str(C_DIR), LIBRARY.name], capture_output=True, text=True, check=False, timeout=120
    )
    if result.returncode != 0:
        lines = (result.stderr or result.stdout).strip().splitlines() or ["no output"]
        raise NativeDspError(f"make {LIBRARY.name} failed with exit {result.returncode}: {lines[-1]}")
    return LIBRARY


def _is_stale() -> bool:
    if not LIBRARY.exists():
        return True
    built = LIBRARY.stat().st_mtime
    return any((C_DIR / name).stat().st_mtime > built for name in _SOURCES)


@functools.cache
def load_library() -> ctypes.CDLL:
    """Load the C library, building it first where missing or stale."""
    if _is_stale():
        build_library()
    lib = ctypes.CDLL(str(LIBRARY))
    config_ptr = ctypes.POINTER(DspConfig)
    lib.dsp_init_tables.argtypes = (ctypes.c_uint32, ctypes.c_void_p, ctypes.c_void_p)
    lib.dsp_check_config.argtypes = (config_ptr,)
    for name in ("dsp_raw_features", "dsp_features"):
        getattr(lib, name).argtypes = (config_ptr, ctypes.c_void_p, ctypes.c_float, ctypes.c_void_p, ctypes.c_void_p)
    lib.dsp_set_speed.argtypes = (config_ptr, ctypes.c_float)
    for name in ("dsp_init_tables", "dsp_check_config", "dsp_raw_features", "dsp_features", "dsp_set_speed"):
        getattr(lib, name).restype = ctypes.c_int
    return lib


def check_status(function: str, status: int) -> None:
    """Raise :class:`NativeDspError` naming the status when a C call did not return DSP_OK."""
    if status != DSP_OK:
        raise NativeDspError(f"{function} returned {status} ({STATUS_NAMES.get(status, 'unknown status')})")


def _floats(values: npt.ArrayLike) -> npt.NDArray[np.float32]:
    return np.ascontiguousarray(values, dtype=np.float32)


def _float_ptr(array: npt.NDArray[np.float32]) -> ctypes._Pointer[ctypes.c_float]:
    return array.ctypes.data_as(_FloatPtr)


class NativeFrontEnd:
    """The C front end configured for one :class:`DspSpec`: tables, band edges and statistics.

    Args:
        spec: The spec; its normalisation statistics are used by :meth:`features` only.
    """

    def __init__(self, spec: DspSpec) -> None:
        self.spec = spec
        self.lib = load_library()
        n = spec.window_samples
        self.hann = np.zeros(n, dtype=np.float32)
        self.twiddle = np.zeros(n, dtype=np.float32)
        check_status("dsp_init_tables", self.lib.dsp_init_tables(n, self.hann.ctypes.data, self.twiddle.ctypes.data))
        self.band_edges = np.ascontiguousarray(spec.band_edges, dtype=np.uint16)
        self.mean, self.std, self.slope = _floats(spec.mean), _floats(spec.std), _floats(spec.speed_slope)
        self.config = DspConfig(
            window_samples=n,
            n_bands=spec.n_bands,
            band_edges=self.band_edges.ctypes.data_as(ctypes.POINTER(ctypes.c_uint16)),
            hann=_float_ptr(self.hann),
            twiddle=_float_ptr(self.twiddle),
            mean=_float_ptr(self.mean) if spec.is_fitted else None,
            std=_float_ptr(self.std) if spec.is_fitted else None,
            slope=_float_ptr(self.slope) if spec.speed_slope else None,
            reference_rpm=spec.speed_reference_rpm,
            valid_low_rpm=spec.speed_valid_rpm[0],
            valid_high_rpm=spec.speed_valid_rpm[1],
        )
        check_status("dsp_check_config", self.lib.dsp_check_config(ctypes.byref(self.config)))
        self.work = np.zeros(n, dtype=np.float32)

    def set_speed(self, rpm: float) -> bool:
        """Set the shaft speed of the next window as the device does; True: unusable, the reference is used."""
        return bool(self.lib.dsp_set_speed(ctypes.byref(self.config), rpm))

    def _run(
        self, function: str, samples_int16: npt.ArrayLike, scale: float, rpm: npt.ArrayLike | None = None
    ) -> npt.NDArray[np.float32]:
        samples = np.asarray(samples_int16)
        if samples.dtype != np.int16:
            raise NativeDspError(f"samples must be int16 as on the wire, got {samples.dtype}")
        samples = np.ascontiguousarray(samples.reshape(1, -1) if samples.ndim == 1 else samples)
        if samples.ndim != 2 or samples.shape[1] != self.spec.window_samples:
            raise NativeDspError(f"samples must have shape (n, {self.spec.window_samples}), got {samples.shape}")
        out = np.zeros((samples.shape[0], self.spec.n_features), dtype=np.float32)
        call = getattr(self.lib, function)
        config, work = ctypes.byref(self.config), self.work.ctypes.data
        speeds = np.broadcast_to(np.asarray(np.nan if rpm is None else rpm, dtype=np.float32), (samples.shape[0],))
        for i in range(samples.shape[0]):
            self.set_speed(float(speeds[i]))
            check_status(function, call(config, samples[i].ctypes.data, scale, work, out[i].ctypes.data))
        return out

    def raw_features(self, samples_int16: npt.ArrayLike, scale: float) -> npt.NDArray[np.float32]:
        """Raw features of int16 windows (n, N) whose physical value is samples * scale."""
        return self._run("dsp_raw_features", samples_int16, scale)

    def features(
        self, samples_int16: npt.ArrayLike, scale: float, rpm: npt.ArrayLike | None = None
    ) -> npt.NDArray[np.float32]:
        """Normalised features, as the model on the device sees them; the spec must be fitted.

        ``rpm``: the shaft speed of each window (or one for all) as the wire carries it (float32; NaN or
        None: unknown, the reference speed is used).
        """
        if not self.spec.is_fitted:
            raise NativeDspError("DSP spec has no normalisation statistics; fit it on training windows first")
        return self._run("dsp_features", samples_int16, scale, rpm)


def native_raw_features(samples_int16: npt.ArrayLike, scale: float, spec: DspSpec) -> npt.NDArray[np.float32]:
    """Raw features computed by the device's C code: the counterpart of :func:`tinymlops.contracts.dsp.raw_features`.

    Args:
        samples_int16: int16 windows, shape (n, spec.window_samples) or (spec.window_samples,).
        scale: Physical units per LSB, as in the wire format.
        spec: The front-end spec.

    Returns:
        float32 array (n, spec.n_features).

    Raises:
        ToolchainMissingError: The library is not built and gcc or make is missing.
        NativeDspError: Bad input (dtype, shape, scale) or a failed build.
    """
    return NativeFrontEnd(spec).raw_features(samples_int16, scale)


def native_features(samples_int16: npt.ArrayLike, scale: float, spec: DspSpec) -> npt.NDArray[np.float32]:
    """Normalised features computed by the C code.

    The counterpart of :func:`tinymlops.contracts.dsp.extract_features`.
    """
    return NativeFrontEnd(spec).features(samples_int16, scale)
