"""ctypes binding of the fixed-point DSP front end in C (``firmware/c/dsp_q15.c``).

The front end for cores without an FPU (Cortex-M0+, the RP2040): the features of
:func:`tinymlops.contracts.dsp.raw_features` computed in integer arithmetic only (q15 Hann and twiddles,
block-floating-point int32 FFT, 64-bit energies, fixed-point log2). The library is built with
``make -f dsp_q15.mk`` into ``firmware/c/build/`` on first use and rebuilt when a source is newer.

:func:`raw_features_q15` and :func:`features_q15` mirror :func:`tinymlops.contracts.dsp.raw_features` and
:func:`tinymlops.contracts.dsp.extract_features`: windows in physical units are quantized to int16 per window
(the largest magnitude at full scale) as a sensor would deliver them; int16 windows with their
``scale`` go in unchanged, as on the wire.
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

from tinymlops.contracts.dsp import DspSpec, normalise
from tinymlops.errors import TinyMLOpsError

logger = logging.getLogger(__name__)

C_DIR = Path(__file__).resolve().parent / "c"
BUILD_DIR = C_DIR / "build"
MAKEFILE = "dsp_q15.mk"
LIBRARY = BUILD_DIR / "libdsp_q15.so"
# the same source with ARMv6-M's 16-bit-half multiplies (-DDSPQ_SPLIT_MUL): must be bit-identical
SPLIT_LIBRARY = BUILD_DIR / "libdsp_q15_split.so"
_SOURCES = ("dsp_q15.c", "dsp_q15.h", MAKEFILE)
INT16_FULL_SCALE = 32767
Q16_ONE = 65536

DSPQ_OK = 0
STATUS_NAMES = {
    -1: "DSPQ_ERR_NULL: a required pointer is NULL",
    -2: "DSPQ_ERR_SIZE: window_samples is not a power of two in [16, 16384]",
    -3: "DSPQ_ERR_BANDS: band edges are not increasing within 0..n/2+1",
    -4: "DSPQ_ERR_ARG: scale, std or input scale is not finite and > 0, or an affine constant does not fit",
}

Float32Array = npt.NDArray[np.float32]
Int16Array = npt.NDArray[np.int16]


class Q15DspError(TinyMLOpsError):
    """The fixed-point C DSP library cannot be built, or it rejected its input."""


class Q15ToolchainMissingError(Q15DspError):
    """gcc or make is not installed, so the fixed-point C DSP library cannot be built."""


class Affine(ctypes.Structure):
    """Mirror of ``dspq_affine_t`` in dsp_q15.h."""

    _fields_ = (("mul", ctypes.c_int32), ("shift", ctypes.c_int32), ("add", ctypes.c_int64))


class Q15Config(ctypes.Structure):
    """Mirror of ``dspq_config_t`` in dsp_q15.h."""

    _fields_ = (
        ("window_samples", ctypes.c_uint32),
        ("n_bands", ctypes.c_uint32),
        ("band_edges", ctypes.POINTER(ctypes.c_uint16)),
        ("hann", ctypes.POINTER(ctypes.c_uint32)),
        ("twiddle", ctypes.POINTER(ctypes.c_int32)),
        ("log2_scale_q16", ctypes.c_int32),
        ("scale_set", ctypes.c_uint32),
        ("affine", ctypes.POINTER(Affine)),
        ("slope_q16", ctypes.POINTER(ctypes.c_int32)),
        ("reference_bits", ctypes.c_uint32),
        ("valid_low_bits", ctypes.c_uint32),
        ("valid_high_bits", ctypes.c_uint32),
        ("log2_reference_q16", ctypes.c_int32),
        ("speed_log10_q16", ctypes.c_int32),
    )


def build_library(split: bool = False) -> Path:
    """Build (or bring up to date) the shared library with make.

    Args:
        split: Build the variant with ARMv6-M's 16-bit-half multiplies instead.

    Returns:
        Path of the library.

    Raises:
        Q15ToolchainMissingError: gcc or make is not on PATH.
        Q15DspError: The build failed; the message carries the compiler's last line.
    """
    library = SPLIT_LIBRARY if split else LIBRARY
    missing = [tool for tool in ("make", "gcc") if shutil.which(tool) is None]
    if missing:
        raise Q15ToolchainMissingError(f"cannot build {library.name}: {' and '.join(missing)} not found on PATH")
    logger.info("building %s", library)
    result = subprocess.run(
        ["make", "-C", str(C_DIR), "-f", MAKEFILE, library.name],
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )
    if result.returncode != 0:
        lines = (result.stderr or result.stdout).strip().splitlines() or ["no output"]
        raise Q15DspError(f"make {library.name} failed with exit {result.returncode}: {lines[-1]}")
    return library


def _is_stale(library: Path) -> bool:
    if not library.exists():
        return True
    built = library.stat().st_mtime
    return any((C_DIR / name).stat().st_mtime > built for name in _SOURCES)


@functools.cache
def load_library(split: bool = False) -> ctypes.CDLL:
    """Load the C library (the split-multiply variant when ``split``), building it where missing or stale."""
    library = SPLIT_LIBRARY if split else LIBRARY
    if _is_stale(library):
        build_library(split)
    lib = ctypes.CDLL(str(library))
    config_ptr = ctypes.POINTER(Q15Config)
    lib.dspq_init_tables.argtypes = (ctypes.c_uint32, ctypes.c_void_p, ctypes.c_void_p)
    lib.dspq_check_config.argtypes = (config_ptr,)
    lib.dspq_set_scale.argtypes = (config_ptr, ctypes.c_float)
    for name in ("dspq_raw_features_q16", "dspq_raw_features_f32", "dspq_features_int8"):
        getattr(lib, name).argtypes = (config_ptr, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p)
    lib.dspq_prepare.argtypes = (
        ctypes.c_uint32,
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_float,
        ctypes.c_int32,
        ctypes.c_void_p,
    )
    lib.dspq_prepare_speed.argtypes = (
        config_ptr,
        ctypes.c_void_p,
        ctypes.c_float,
        ctypes.c_float,
        ctypes.c_float,
        ctypes.c_void_p,
    )
    lib.dspq_set_speed.argtypes = (config_ptr, ctypes.c_float)
    for name in (
        "dspq_init_tables",
        "dspq_check_config",
        "dspq_set_scale",
        "dspq_raw_features_q16",
        "dspq_raw_features_f32",
        "dspq_features_int8",
        "dspq_prepare",
        "dspq_prepare_speed",
        "dspq_set_speed",
    ):
        getattr(lib, name).restype = ctypes.c_int
    return lib


def check_status(function: str, status: int) -> None:
    """Raise :class:`Q15DspError` naming the status when a C call did not return DSPQ_OK."""
    if status != DSPQ_OK:
        raise Q15DspError(f"{function} returned {status} ({STATUS_NAMES.get(status, 'unknown status')})")


def quantize_windows(windows: npt.ArrayLike, window_samples: int) -> tuple[Int16Array, Float32Array]:
    """Quantize physical windows to int16, one scale per window (its largest magnitude at full scale).

    Args:
        windows: Array (n, window_samples) or (window_samples,) in physical units.
        window_samples: Expected samples per window.

    Returns:
        The int16 windows (n, window_samples) and the float32 scale of each (units per LSB; 1.0 for
        an all-zero window).

    Raises:
        Q15DspError: Wrong shape, or NaN or infinite samples.
    """
    x = np.asarray(windows, dtype=np.float64)
    x = x[None, :] if x.ndim == 1 else x
    if x.ndim != 2 or x.shape[1] != window_samples:
        raise Q15DspError(f"windows must have shape (n, {window_samples}), got {x.shape}")
    if not np.isfinite(x).all():
        raise Q15DspError("windows contain NaN or infinite samples")
    peak = np.abs(x).max(axis=1)
    scales = np.where(peak > 0, peak / INT16_FULL_SCALE, 1.0).astype(np.float32)
    counts = np.clip(np.rint(x / scales.astype(np.float64)[:, None]), -32768, 32767)
    return counts.astype(np.int16), scales


class Q15FrontEnd:
    """The fixed-point C front end configured for one :class:`DspSpec`: q15 tables and band edges.

    Args:
        spec: The spec; its normalisation statistics are used by :meth:`features_int8` only.
        split: Use the library built with ARMv6-M's 16-bit-half multiplies.
    """

    def __init__(self, spec: DspSpec, split: bool = False) -> None:
        self.spec = spec
        self.lib = load_library(split)
        n = spec.window_samples
        self.hann = np.zeros(n, dtype=np.uint32)
        self.twiddle = np.zeros(n, dtype=np.int32)
        check_status("dspq_init_tables", self.lib.dspq_init_tables(n, self.hann.ctypes.data, self.twiddle.ctypes.data))
        self.band_edges = np.ascontiguousarray(spec.band_edges, dtype=np.uint16)
        self.config = Q15Config(
            window_samples=n,
            n_bands=spec.n_bands,
            band_edges=self.band_edges.ctypes.data_as(ctypes.POINTER(ctypes.c_uint16)),
            hann=self.hann.ctypes.data_as(ctypes.POINTER(ctypes.c_uint32)),
            twiddle=self.twiddle.ctypes.data_as(ctypes.POINTER(ctypes.c_int32)),
            log2_scale_q16=0,
            scale_set=0,
            affine=None,
        )
        self._affine: ctypes.Array[Affine] | None = None
        self._slope_q16 = np.zeros(spec.n_features, dtype=np.int32)
        self.work = np.zeros(n, dtype=np.int32)

    def _samples(self, samples_int16: npt.ArrayLike) -> Int16Array:
        samples = np.asarray(samples_int16)
        if samples.dtype != np.int16:
            raise Q15DspError(f"samples must be int16 as on the wire, got {samples.dtype}")
        samples = np.ascontiguousarray(samples.reshape(1, -1) if samples.ndim == 1 else samples)
        if samples.ndim != 2 or samples.shape[1] != self.spec.window_samples:
            raise Q15DspError(f"samples must have shape (n, {self.spec.window_samples}), got {samples.shape}")
        return samples

    def _run(
        self,
        function: str,
        samples_int16: npt.ArrayLike,
        scale: float | npt.ArrayLike,
        dtype: type[np.generic],
        rpm: npt.ArrayLike | None = None,
    ) -> npt.NDArray[np.generic]:
        samples = self._samples(samples_int16)
        scales = np.broadcast_to(np.asarray(scale, dtype=np.float32), (samples.shape[0],))
        speeds = np.broadcast_to(np.asarray(np.nan if rpm is None else rpm, dtype=np.float32), (samples.shape[0],))
        out = np.zeros((samples.shape[0], self.spec.n_features), dtype=dtype)
        call = getattr(self.lib, function)
        config = ctypes.byref(self.config)
        current: float | None = None
        for i in range(samples.shape[0]):
            if current != float(scales[i]):  # a device sets the scale once, when it changes
                check_status("dspq_set_scale", self.lib.dspq_set_scale(config, float(scales[i])))
                current = float(scales[i])
            self.set_speed(float(speeds[i]))
            check_status(function, call(config, samples[i].ctypes.data, self.work.ctypes.data, out[i].ctypes.data))
        return out

    def raw_features_q16(self, samples_int16: npt.ArrayLike, scale: float | npt.ArrayLike) -> npt.NDArray[np.int32]:
        """Raw features in Q16 as the device holds them (log10 values; the crest factor linear)."""
        return self._run("dspq_raw_features_q16", samples_int16, scale, np.int32).astype(np.int32)

    def raw_features(self, samples_int16: npt.ArrayLike, scale: float | npt.ArrayLike) -> Float32Array:
        """Raw features of int16 windows (n, N) whose physical value is samples * scale (per window or one)."""
        return self._run("dspq_raw_features_f32", samples_int16, scale, np.float32).astype(np.float32)

    def prepare_int8(self, input_scale: float, input_zero_point: int) -> None:
        """Fold the spec's normalisation and the model's input quantization into per-feature constants.

        Raises:
            Q15DspError: The spec is not fitted, or the C code rejected the constants.
        """
        if not self.spec.is_fitted:
            raise Q15DspError("DSP spec has no normalisation statistics; fit it on training windows first")
        mean = np.ascontiguousarray(self.spec.mean, dtype=np.float32)
        std = np.ascontiguousarray(self.spec.std, dtype=np.float32)
        affine = (Affine * self.spec.n_features)()
        status = self.lib.dspq_prepare(
            self.spec.n_bands, mean.ctypes.data, std.ctypes.data, input_scale, input_zero_point, affine
        )
        check_status("dspq_prepare", status)
        self._affine = affine
        self.config.affine = ctypes.cast(affine, ctypes.POINTER(Affine))
        slope = np.ascontiguousarray(self.spec.speed_slope, dtype=np.float32)
        status = self.lib.dspq_prepare_speed(
            ctypes.byref(self.config),
            slope.ctypes.data if slope.size else None,
            self.spec.speed_reference_rpm,
            *self.spec.speed_valid_rpm,
            self._slope_q16.ctypes.data,
        )
        check_status("dspq_prepare_speed", status)

    def set_speed(self, rpm: float) -> bool:
        """Set the shaft speed of the next window as the device does; True: unusable, the reference is used."""
        return bool(self.lib.dspq_set_speed(ctypes.byref(self.config), rpm))

    def features_int8(
        self, samples_int16: npt.ArrayLike, scale: float | npt.ArrayLike, rpm: npt.ArrayLike | None = None
    ) -> npt.NDArray[np.int8]:
        """The model's int8 input computed on the device's integer path; call :meth:`prepare_int8` first.

        ``rpm``: the shaft speed of each window (or one for all); NaN or None: unknown, the reference speed.
        """
        if self._affine is None:
            raise Q15DspError("call prepare_int8 with the model's input scale and zero point first")
        return self._run("dspq_features_int8", samples_int16, scale, np.int8, rpm).astype(np.int8)


def _front_end_input(
    windows: npt.ArrayLike, spec: DspSpec, scale: float | None
) -> tuple[Int16Array, float | Float32Array]:
    array = np.asarray(windows)
    if array.dtype == np.int16:
        if scale is None:
            raise Q15DspError("int16 windows need their scale (physical units per LSB)")
        return array, scale
    if scale is not None:
        raise Q15DspError("scale applies to int16 windows only; physical windows are quantized per window")
    return quantize_windows(array, spec.window_samples)


def raw_features_q15(windows: npt.ArrayLike, spec: DspSpec, *, scale: float | None = None) -> Float32Array:
    """Raw features by the fixed-point C front end: the counterpart of :func:`tinymlops.contracts.dsp.raw_features`.

    Args:
        windows: Physical windows (n, spec.window_samples) or (spec.window_samples,), quantized to
            int16 per window here; or int16 windows as on the wire, with ``scale``.
        spec: The front-end spec.
        scale: Physical units per LSB of int16 windows.

    Returns:
        float32 array (n, spec.n_features).

    Raises:
        Q15ToolchainMissingError: The library is not built and gcc or make is missing.
        Q15DspError: Bad input (dtype, shape, non-finite samples, scale) or a failed build.
    """
    samples, scales = _front_end_input(windows, spec, scale)
    return Q15FrontEnd(spec).raw_features(samples, scales)


def features_q15(
    windows: npt.ArrayLike, spec: DspSpec, *, scale: float | None = None, rpm: npt.ArrayLike | None = None
) -> Float32Array:
    """Normalised fixed-point features at each window's speed.

    The counterpart of :func:`tinymlops.contracts.dsp.extract_features`.

    Raises:
        Q15DspError: As :func:`raw_features_q15`, or the spec is not fitted.
    """
    if not spec.is_fitted:
        raise Q15DspError("DSP spec has no normalisation statistics; fit it on training windows first")
    return normalise(raw_features_q15(windows, spec, scale=scale), spec, rpm)


def features_int8_q15(
    windows: npt.ArrayLike,
    spec: DspSpec,
    input_scale: float,
    input_zero_point: int,
    *,
    scale: float | None = None,
    rpm: npt.ArrayLike | None = None,
) -> npt.NDArray[np.int8]:
    """The model's int8 input straight from the integer path (``dspq_features_int8``).

    Args:
        windows: As :func:`raw_features_q15`.
        spec: A fitted front-end spec.
        input_scale: The model input tensor's quantization scale.
        input_zero_point: Its zero point.
        scale: Physical units per LSB of int16 windows.
        rpm: Shaft speed of each window (or one for all) for a speed-aware spec; None or NaN: unknown.

    Raises:
        Q15DspError: As :func:`features_q15`, or the affine constants do not fit.
    """
    samples, scales = _front_end_input(windows, spec, scale)
    front = Q15FrontEnd(spec)
    front.prepare_int8(input_scale, input_zero_point)
    return front.features_int8(samples, scales, rpm)
