"""The firmware images on emulated Cortex-M boards: build with ``arm-none-eabi-gcc``, run in QEMU, measure.

``firmware/c/Makefile.arm`` builds, per board, ``bench.elf`` (the measurement image),
``test_ota.elf`` (the OTA receiver's unit tests) and ``device.elf`` (the device application)
into ``firmware/c/build/<board>/``. :func:`measure` places the model, the DSP configuration and
sensor windows in the board's memory with QEMU's loader device (the "bench input", layout in
``firmware/c/bench_input.h``), runs ``bench.elf`` under ``-icount shift=0`` and reads back the
features, the int8 output and the instructions the DSP front end and the inference took
(``board_instructions()``: SysTick ticks x ns per tick, one instruction per ns; resolution one
tick, see :attr:`Board.instructions_per_tick`).
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import signal
import struct
import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from tinymlops.contracts.dsp import DspSpec
from tinymlops.errors import TinyMLOpsError

logger = logging.getLogger(__name__)

C_DIR = Path(__file__).resolve().parent / "c"
BUILD_DIR = C_DIR / "build"
_BUILD_INPUTS = ("*.c", "*.h", "Makefile.arm", "third_party.mk", "boards/*.ld")
_BUILD_TIMEOUT_S = 300.0

BENCH_INPUT_MAGIC = 0x49424D54
BENCH_INPUT_VERSION = 1
_HEADER = struct.Struct("<IHHIIIIfIIIIIIIIIIIII")
_FLAG_NORMALISE = 1
_FLAG_INFERENCE = 2
_MODEL_ALIGNMENT = 16


class EmulatorError(TinyMLOpsError):
    """A firmware image does not build, or it failed or timed out in QEMU."""


class ToolchainMissingError(EmulatorError):
    """The cross compiler, newlib or QEMU is not installed."""


@dataclass(frozen=True)
class Board:
    """An emulated board the images are built for.

    Attributes:
        name: ``--board`` value and build directory name.
        machine: QEMU ``-M`` machine.
        core: The Cortex-M core QEMU models.
        cpu_flags: Compiler flags for the core (as in Makefile.arm).
        clock_hz: The SysTick clock (processor clock): 1e9 / clock_hz instructions per tick.
        uart_base: Address of UART0.
        bench_input_addr: Where the bench input is loaded (bench_main.c's BENCH_INPUT_ADDR).
        bench_input_max: Bytes free for the bench input there.
        flash_base: The persistent flash region, None when the board has none.
        flash_size: Bytes of that region.
        images: The images Makefile.arm builds for the board (device once device_main.c exists).
    """

    name: str
    machine: str
    core: str
    cpu_flags: tuple[str, ...]
    clock_hz: int
    uart_base: int
    bench_input_addr: int
    bench_input_max: int
    flash_base: int | None
    flash_size: int
    images: tuple[str, ...]

    @property
    def instructions_per_tick(self) -> float:
        """Resolution of ``board_instructions()``: ns per SysTick tick, one instruction per ns."""
        return 1e9 / self.clock_hz


BOARDS: dict[str, Board] = {
    "mps2-an386": Board(
        name="mps2-an386",
        machine="mps2-an386",
        core="Cortex-M4F",
        cpu_flags=("-mcpu=cortex-m4", "-mthumb", "-mfloat-abi=hard", "-mfpu=fpv4-sp-d16"),
        clock_hz=25_000_000,
        uart_base=0x4000_4000,
        bench_input_addr=0x0010_0000,
        bench_input_max=0x0020_0000,
        flash_base=0x0030_0000,
        flash_size=0x0010_0000,
        images=("bench", "selftest", "test_ota", "device"),
    ),
    "microbit": Board(
        name="microbit",
        machine="microbit",
        core="Cortex-M0",
        cpu_flags=("-mcpu=cortex-m0", "-mthumb"),
        clock_hz=16_000_000,
        uart_base=0x4000_2000,
        bench_input_addr=0x0003_0000,
        bench_input_max=0x0001_0000,
        flash_base=None,
        flash_size=0,
        images=("bench", "selftest"),
    ),
}


def get_board(name: str) -> Board:
    """Return the board called ``name``.

    Raises:
        EmulatorError: No such board.
    """
    try:
        return BOARDS[name]
    except KeyError:
        raise EmulatorError(f"unknown board {name!r}; boards: {', '.join(BOARDS)}") from None


@dataclass(frozen=True)
class Toolchain:
    """Paths of the tools the images need."""

    make: str
    gcc: str
    size: str
    nm: str
    qemu: str


def find_toolchain() -> Toolchain:
    """Find make, the Arm GCC, binutils, newlib and QEMU.

    Raises:
        ToolchainMissingError: One line naming the first missing tool and its Debian package.
    """
    packages = {
        "make": "make",
        "arm-none-eabi-gcc": "gcc-arm-none-eabi",
        "arm-none-eabi-size": "binutils-arm-none-eabi",
        "arm-none-eabi-nm": "binutils-arm-none-eabi",
        "qemu-system-arm": "qemu-system-arm",
    }
    paths: dict[str, str] = {}
    for tool, package in packages.items():
        path = shutil.which(tool)
        if path is None:
            raise ToolchainMissingError(f"{tool} not found on PATH: install the Debian package {package}")
        paths[tool] = path
    libc = subprocess.run(
        [paths["arm-none-eabi-gcc"], "-print-file-name=libc_nano.a"], capture_output=True, text=True, check=False
    ).stdout.strip()
    if not os.path.isabs(libc):  # gcc echoes the bare name when the library is not installed
        raise ToolchainMissingError("newlib-nano for arm-none-eabi not found: install the Debian package "
                                    "libnewlib-arm-none-eabi")  # fmt: skip
    return Toolchain(paths["make"], paths["arm-none-eabi-gcc"], paths["arm-none-eabi-size"],
                     paths["arm-none-eabi-nm"], paths["qemu-system-arm"])  # fmt: skip


@dataclass(frozen=True)
class ImageSet:
    """The linked images of one board: bench always, the others None where not built.

    An image is not built when it was not asked for, or its sources do not exist yet.
    """

    board: Board
    bench: Path
    selftest: Path | None
    test_ota: Path | None
    device: Path | None

    def images(self) -> dict[str, Path]:
        """Image name -> ELF path, for the images built."""
        found = {"bench": self.bench, "selftest": self.selftest, "test_ota": self.test_ota, "device": self.device}
        return {name: path for name, path in found.items() if path is not None}

    def require(self, name: str) -> Path:
        """The ELF of image ``name``.

        Raises:
            EmulatorError: That image was not built.
        """
        path = self.images().get(name)
        if path is None:
            raise EmulatorError(f"no {name} image for {self.board.name}; build it with build_images")
        return path


def _newest_source_mtime() -> float:
    return max(path.stat().st_mtime for pattern in _BUILD_INPUTS for path in C_DIR.glob(pattern))


def _expected_images(board: Board, only: Sequence[str] | None) -> list[Path]:
    names = [name for name in board.images if name != "device" or (C_DIR / "device_main.c").exists()]
    if only is not None:
        unknown = sorted(set(only) - set(board.images))
        if unknown:
            raise EmulatorError(f"{board.name} has no image {unknown[0]!r}; images: {', '.join(board.images)}")
        names = [name for name in names if name in only or name == "bench"]
    return [BUILD_DIR / board.name / f"{name}.elf" for name in names]


def build_images(board: Board | str, only: Sequence[str] | None = None) -> ImageSet:
    """Build (or bring up to date) the board's images with ``make -f Makefile.arm``.

    Skips make when every image is newer than every source, header, linker script and makefile.

    Args:
        board: A :class:`Board` or its name.
        only: Build just these images and bench (e.g. ``()``: bench alone), so a measurement does
            not wait for, or fail on, an image it does not run. Default: all of the board's images.

    Returns:
        The images.

    Raises:
        ToolchainMissingError: A tool is missing.
        EmulatorError: The build failed; the message carries the compiler's first error line.
    """
    board = get_board(board) if isinstance(board, str) else board
    toolchain = find_toolchain()
    expected = _expected_images(board, only)
    newest = _newest_source_mtime()
    if any(not path.exists() or path.stat().st_mtime < newest for path in expected):
        logger.info("building the %s images %s", board.name, ", ".join(path.stem for path in expected))
        targets = [str(path.relative_to(C_DIR)) for path in expected]
        result = subprocess.run(
            [toolchain.make, "-C", str(C_DIR), "-f", "Makefile.arm", f"BOARD={board.name}", "-j2", *targets],
            capture_output=True,
            text=True,
            check=False,
            timeout=_BUILD_TIMEOUT_S,
        )
        if result.returncode != 0:
            lines = (result.stderr or result.stdout).splitlines()
            errors = [line for line in lines if "error" in line.lower()] or lines or ["no output"]
            raise EmulatorError(f"make -f Makefile.arm BOARD={board.name} failed: {errors[0].strip()}")
    built = {path.stem: path for path in expected}
    return ImageSet(board, built["bench"], built.get("selftest"), built.get("test_ota"), built.get("device"))


@dataclass(frozen=True)
class ImageSize:
    """Memory an image takes, from its linked sections.

    Attributes:
        flash_bytes: Code memory: vector table, code, constants and the .data initial values.
        ram_bytes: Static RAM, .data + .bss (the stack comes on top).
        text: Vector table, code and constants.
        data: Initialised data (in flash and in RAM).
        bss: Zero-initialised data.
        stack_bytes: Main stack reserved at the top of RAM (the linker script's STACK_SIZE).
        ram_linked: RAM the image is linked for (its initial stack pointer minus the RAM origin).
    """

    flash_bytes: int
    ram_bytes: int
    text: int
    data: int
    bss: int
    stack_bytes: int
    ram_linked: int


_TEXT_SECTIONS = frozenset({".isr_vector", ".text", ".ARM.exidx"})
_RAM_ORIGIN = 0x2000_0000  # both boards


def image_size(elf: Path) -> ImageSize:
    """Read an image's section sizes (``arm-none-eabi-size -A``) and its stack and RAM (linker symbols).

    Raises:
        EmulatorError: The file is not an ELF the tool can read.
    """
    result = subprocess.run([find_toolchain().size, "-A", str(elf)], capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise EmulatorError(f"arm-none-eabi-size cannot read {elf}: {result.stderr.strip()}")
    sections: dict[str, int] = {}
    for line in result.stdout.splitlines():
        fields = line.split()
        if len(fields) == 3 and fields[1].isdigit():
            sections[fields[0]] = int(fields[1])
    text = sum(size for name, size in sections.items() if name in _TEXT_SECTIONS)
    data, bss = sections.get(".data", 0), sections.get(".bss", 0)
    symbols = symbol_addresses(elf)
    stack_top, stack_bottom = symbols["_estack"], symbols["__heap_limit"]
    return ImageSize(flash_bytes=text + data, ram_bytes=data + bss, text=text, data=data, bss=bss,
                     stack_bytes=stack_top - stack_bottom, ram_linked=stack_top - _RAM_ORIGIN)  # fmt: skip


def symbol_addresses(elf: Path) -> dict[str, int]:
    """Addresses of an image's symbols (``arm-none-eabi-nm``), Thumb bit clear."""
    result = subprocess.run([find_toolchain().nm, str(elf)], capture_output=True, text=True, check=True)
    addresses = {}
    for line in result.stdout.splitlines():
        fields = line.split()
        if len(fields) == 3:
            addresses[fields[2]] = int(fields[0], 16) & ~1
    return addresses


@dataclass(frozen=True)
class QemuResult:
    """A finished QEMU run.

    Attributes:
        returncode: QEMU's exit status: the image's board_exit() code through semihosting.
        stdout: Semihosting file writes to ``:tt`` (newlib's stdout in the rdimon image).
        stderr: The semihosting console (SYS_WRITE0: ``board_puts``) and QEMU's own messages.
        seconds: Wall-clock time of the run.
    """

    returncode: int
    stdout: str
    stderr: str
    seconds: float


def run_qemu(
    board: Board,
    elf: Path,
    *,
    loaders: Sequence[tuple[Path, int]] = (),
    timeout_s: float = 30.0,
    serial: str | None = None,
    uart_input: str | None = None,
    icount: bool = True,
    semihosting_args: Sequence[str] = (),
    extra_args: Sequence[str] = (),
    cwd: Path | None = None,
) -> QemuResult:
    """Run an image in QEMU until it exits through semihosting.

    Args:
        board: The board to emulate.
        elf: The image.
        loaders: (file, address) pairs placed in memory before the reset (``-device loader``).
        timeout_s: Wall-clock limit; QEMU is killed (its process group) when it runs over.
        serial: QEMU ``-serial`` backend for UART0 (e.g. ``tcp:127.0.0.1:PORT,server=on,wait=on``);
            None discards the UART; ``stdio`` connects it to ``uart_input`` and the result's stdout.
        uart_input: Bytes (as text) the UART receives when ``serial`` is ``stdio``.
        icount: Run with ``-icount shift=0`` (1 ns of virtual time per instruction), which makes
            the SysTick instruction counts exact and deterministic.
        semihosting_args: The semihosting command line (argv of rdimon images, ``flash=PATH``).
        extra_args: More QEMU arguments (e.g. ``-singlestep -d exec,nochain -D log``).
        cwd: QEMU's working directory: relative semihosting paths resolve against it.

    Returns:
        The finished run (any exit status).

    Raises:
        EmulatorError: QEMU ran past ``timeout_s``.
    """
    command = [find_toolchain().qemu, "-M", board.machine, "-display", "none", "-monitor", "none"]
    command += ["-serial", serial or "null", "-kernel", str(elf)]
    semihosting = "enable=on,target=native" + "".join(f",arg={arg.replace(',', ',,')}" for arg in semihosting_args)
    command += ["-semihosting-config", semihosting]
    if icount:
        command += ["-icount", "shift=0"]
    for path, address in loaders:
        command += ["-device", f"loader,file={str(path).replace(',', ',,')},addr={address:#x},force-raw=on"]
    command += list(extra_args)
    logger.debug("running %s", " ".join(command))
    started = time.monotonic()
    # its own process group: a timeout kills QEMU and anything it started, by that group's id
    process = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True, cwd=cwd, start_new_session=True)  # fmt: skip
    try:
        stdout, stderr = process.communicate(uart_input, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.communicate()
        raise EmulatorError(f"{elf.name} on {board.name} did not exit within {timeout_s:g} s; QEMU killed") from None
    return QemuResult(process.returncode, stdout, stderr, time.monotonic() - started)


# ---------------------------------------------------------------------------------------------
# The bench input and the measurement


def dsp_tables(n: int) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
    """The periodic Hann window and the FFT twiddles as ``dsp_init_tables`` builds them (double, then float)."""
    i = np.arange(n, dtype=np.float64)
    hann = (0.5 - 0.5 * np.cos(2 * np.pi * i / n)).astype(np.float32)
    k = np.arange(n // 2, dtype=np.float64)
    twiddle = np.empty(n, dtype=np.float32)
    twiddle[0::2] = np.cos(2 * np.pi * k / n)
    twiddle[1::2] = -np.sin(2 * np.pi * k / n)
    return hann, twiddle


def bench_input(
    spec: DspSpec,
    windows: npt.NDArray[np.int16],
    scale: float,
    model: bytes | None = None,
    *,
    model_inputs: npt.NDArray[np.int8] | None = None,
    fixed_point_tables: tuple[bytes, bytes] | None = None,
    calibration_iterations: int = 0,
) -> bytes:
    """Lay out the bench input block (``firmware/c/bench_input.h``, version 1).

    Args:
        spec: The DSP spec; fitted specs make the image compute normalised features.
        windows: int16 samples, shape (n_windows, spec.window_samples).
        scale: Physical units per LSB.
        model: The int8 .tflite to run on each window's features, or None for the DSP alone.
        model_inputs: int8 rows (n_windows, model inputs) to run the model on instead of the
            quantized features (a model the DSP front end does not feed).
        fixed_point_tables: The Hann and twiddle tables of ``dsp_q15`` (bytes as its C code holds
            them), to run the fixed-point front end on each window too.
        calibration_iterations: Iterations of the image's known 2-instruction loop (0: none).

    Returns:
        The block's bytes.
    """
    n = spec.window_samples
    hann, twiddle = dsp_tables(n)
    parts: list[tuple[str, bytes, int]] = [
        ("edges", np.asarray(spec.band_edges, dtype="<u2").tobytes(), 4),
        ("hann", hann.astype("<f4").tobytes(), 4),
        ("twiddle", twiddle.astype("<f4").tobytes(), 4),
        ("samples", np.ascontiguousarray(windows, dtype="<i2").tobytes(), 4),
    ]
    if spec.is_fitted:
        parts += [("mean", np.asarray(spec.mean, dtype="<f4").tobytes(), 4),
                  ("std", np.asarray(spec.std, dtype="<f4").tobytes(), 4)]  # fmt: skip
    if model is not None:
        parts.append(("model", model, _MODEL_ALIGNMENT))
    if model_inputs is not None:
        parts.append(("model_inputs", np.ascontiguousarray(model_inputs, dtype=np.int8).tobytes(), 4))
    if fixed_point_tables is not None:
        parts += [("q15_hann", fixed_point_tables[0], 4), ("q15_twiddle", fixed_point_tables[1], 4)]
    offsets: dict[str, int] = {}
    body = bytearray(_HEADER.size)
    for name, blob, alignment in parts:
        body += bytes(-len(body) % alignment)
        offsets[name] = len(body)
        body += blob
    flags = (_FLAG_NORMALISE if spec.is_fitted else 0) | (_FLAG_INFERENCE if model is not None else 0)
    _HEADER.pack_into(
        body, 0, BENCH_INPUT_MAGIC, BENCH_INPUT_VERSION, _HEADER.size, len(body), n, spec.n_bands,
        windows.shape[0], scale, flags, offsets["edges"], offsets["hann"], offsets["twiddle"],
        offsets.get("mean", 0), offsets.get("std", 0), offsets["samples"], offsets.get("model", 0),
        len(model or b""), calibration_iterations, offsets.get("model_inputs", 0), offsets.get("q15_hann", 0),
        offsets.get("q15_twiddle", 0),
    )  # fmt: skip
    return bytes(body)


@dataclass(frozen=True)
class Measurement:
    """What the bench image measured on an emulated board.

    Attributes:
        board: The board's name.
        dsp_instructions: Instructions of the float DSP front end, per window.
        inference_instructions: Instructions of ``trt_invoke``, per window (0 without a model).
        features: The features the board computed, float32 (n_windows, n_features): normalised
            when the spec is fitted, raw otherwise.
        input_int8: The model input the board quantized from them (n_windows, n_in), or None.
        output_int8: The model output (n_windows, n_out), or None without a model.
        instructions_per_tick: Resolution of each count.
        overhead_instructions: What an empty measurement counts (not subtracted).
        calibration_instructions: The known loop's count, when one was asked for.
        seconds: Wall-clock time of the QEMU run.
        fixed_point_instructions: Instructions of the fixed-point front end (``dspq_raw_features_q16``)
            per window, when it ran.
        fixed_point_features: Its raw features (n_windows, n_features), Q16 converted to float32, or None.
    """

    board: str
    dsp_instructions: tuple[int, ...]
    inference_instructions: tuple[int, ...]
    features: npt.NDArray[np.float32]
    input_int8: npt.NDArray[np.int8] | None
    output_int8: npt.NDArray[np.int8] | None
    instructions_per_tick: int
    overhead_instructions: int
    calibration_instructions: int | None
    seconds: float
    fixed_point_instructions: tuple[int, ...] = ()
    fixed_point_features: npt.NDArray[np.float32] | None = None

    @property
    def dsp_instructions_mean(self) -> float:
        """Mean DSP instructions per window."""
        return float(np.mean(self.dsp_instructions)) if self.dsp_instructions else 0.0

    @property
    def inference_instructions_mean(self) -> float:
        """Mean inference instructions per window."""
        return float(np.mean(self.inference_instructions)) if self.inference_instructions else 0.0


_HEADER_LINE = re.compile(r"bench 1 board=(\S+) instructions_per_tick=(\d+) windows=(\d+) overhead=(\d+)")
_CALIBRATION_LINE = re.compile(r"calibration iterations=(\d+) instructions=(\d+)")
_WINDOW_LINE = re.compile(r"window (\d+) dsp=(\d+) inference=(\d+)")
_ARRAY_LINE = re.compile(r"(features|input|output) (\d+) ([0-9a-f]*)")
_FIXED_POINT_LINE = re.compile(r"q15 (\d+) dsp=(\d+) ([0-9a-f]*)")
_Q16_ONE = 65536.0


def parse_bench_output(console: str, seconds: float = 0.0) -> Measurement:
    """Parse the bench image's console lines (format in ``firmware/c/bench_main.c``).

    Raises:
        EmulatorError: The image reported an error, or its output is incomplete.
    """
    lines = console.splitlines()
    for line in lines:
        if line.startswith("error ") or line.startswith("fault: "):
            raise EmulatorError(f"bench image failed: {line.strip()}")
    header = next((m for m in map(_HEADER_LINE.fullmatch, lines) if m), None)
    if header is None or "done" not in lines:
        raise EmulatorError(f"bench image output incomplete: {(lines or ['no output'])[-1][:200]}")
    calibration = next((m for m in map(_CALIBRATION_LINE.fullmatch, lines) if m), None)
    windows = [m for m in map(_WINDOW_LINE.fullmatch, lines) if m]
    arrays: dict[str, list[bytes]] = {"features": [], "input": [], "output": []}
    for match in filter(None, map(_ARRAY_LINE.fullmatch, lines)):
        arrays[match.group(1)].append(bytes.fromhex(match.group(3)))

    def stacked(blobs: list[bytes], dtype: str) -> npt.NDArray[np.int8] | None:
        return np.stack([np.frombuffer(b, dtype=dtype) for b in blobs]) if blobs else None

    features = stacked(arrays["features"], "<f4")
    fixed_point = [m for m in map(_FIXED_POINT_LINE.fullmatch, lines) if m]
    q16 = [np.frombuffer(bytes.fromhex(m.group(3)), dtype="<i4") for m in fixed_point]
    return Measurement(
        board=header.group(1),
        dsp_instructions=tuple(int(m.group(2)) for m in windows),
        inference_instructions=tuple(int(m.group(3)) for m in windows),
        features=np.zeros((0, 0), np.float32) if features is None else features.astype(np.float32),
        input_int8=stacked(arrays["input"], "i1"),
        output_int8=stacked(arrays["output"], "i1"),
        instructions_per_tick=int(header.group(2)),
        overhead_instructions=int(header.group(4)),
        calibration_instructions=int(calibration.group(2)) if calibration else None,
        seconds=seconds,
        fixed_point_instructions=tuple(int(m.group(2)) for m in fixed_point),
        fixed_point_features=(np.stack(q16) / _Q16_ONE).astype(np.float32) if q16 else None,
    )


def run_bench(
    board: Board | str,
    block: bytes,
    *,
    timeout_s: float = 60.0,
    extra_args: Sequence[str] = (),
) -> Measurement:
    """Run ``bench.elf`` on one bench input block and parse what it printed.

    Raises:
        EmulatorError: The block does not fit the board, the image failed or timed out.
    """
    board = get_board(board) if isinstance(board, str) else board
    if len(block) > board.bench_input_max:
        raise EmulatorError(f"bench input of {len(block)} bytes exceeds the {board.bench_input_max} bytes "
                            f"{board.name} has for it")  # fmt: skip
    bench = build_images(board, only=()).bench
    with tempfile.TemporaryDirectory(prefix="tinymlops-bench-") as tmp:
        path = Path(tmp) / "bench_input.bin"
        path.write_bytes(block)
        result = run_qemu(board, bench, loaders=[(path, board.bench_input_addr)], timeout_s=timeout_s,
                          extra_args=extra_args)  # fmt: skip
    measurement = parse_bench_output(result.stderr, result.seconds)
    if result.returncode != 0:
        raise EmulatorError(f"bench image on {board.name} exited {result.returncode}")
    return measurement


def measure(
    board: Board | str,
    model: bytes | None,
    spec: DspSpec,
    window: npt.ArrayLike,
    scale: float,
    *,
    model_inputs: npt.NDArray[np.int8] | None = None,
    fixed_point: bool = False,
    timeout_s: float = 60.0,
) -> Measurement:
    """Measure the DSP front end and the inference on an emulated board.

    Args:
        board: The board (or its name).
        model: The int8 .tflite whose input is the spec's features, or None for the DSP alone.
        spec: The DSP spec (fitted: the board normalises the features, as the device does).
        window: int16 samples, one window (n,) or several (k, n); counts are per window.
        scale: Physical units per LSB.
        model_inputs: int8 model input rows, one per window, instead of the quantized features.
        fixed_point: Also run the fixed-point front end (``dsp_q15``) on each window.
        timeout_s: Wall-clock limit of the QEMU run.

    Returns:
        The measurement.

    Raises:
        ToolchainMissingError: The cross toolchain or QEMU is missing.
        EmulatorError: Bad input, a failed build or run.
    """
    samples = np.asarray(window)
    if samples.dtype != np.int16:
        raise EmulatorError(f"samples must be int16 as on the wire, got {samples.dtype}")
    samples = samples.reshape(1, -1) if samples.ndim == 1 else samples
    if samples.ndim != 2 or samples.shape[1] != spec.window_samples:
        raise EmulatorError(f"samples must have shape (k, {spec.window_samples}), got {samples.shape}")
    tables = None
    if fixed_point:
        from firmware.dsp_q15 import Q15FrontEnd

        front_end = Q15FrontEnd(spec)  # the tables as its C code builds them, "generated as const"
        tables = (front_end.hann.tobytes(), front_end.twiddle.tobytes())
    block = bench_input(spec, samples, scale, model, model_inputs=model_inputs, fixed_point_tables=tables)
    return run_bench(board, block, timeout_s=timeout_s)


@dataclass(frozen=True)
class Calibration:
    """``board_instructions()`` against independent counts of a known loop.

    Attributes:
        iterations: Loop iterations; the loop is 2 instructions each (subs, bne).
        systick_instructions: ``board_instructions()`` around the loop, as counted on the board.
        overhead_instructions: What an empty ``board_instructions()`` measurement counts.
        singlestep_instructions: Instructions QEMU's ``-singlestep -d exec,nochain`` log shows
            from the first marker function's entry to the second's, or None when not asked.
        instructions_per_tick: Resolution of the SysTick count.
    """

    iterations: int
    systick_instructions: int
    overhead_instructions: int
    singlestep_instructions: int | None
    instructions_per_tick: int


def calibrate(board: Board | str, iterations: int, *, singlestep: bool = False, timeout_s: float = 60.0) -> Calibration:
    """Count a known loop with SysTick and, optionally, with QEMU's per-instruction execution log.

    Raises:
        EmulatorError: The image failed, or the log does not show both markers.
    """
    board = get_board(board) if isinstance(board, str) else board
    spec = DspSpec(window_samples=64, n_bands=4, sample_rate_hz=1024, f_min_hz=16.0)
    block = bench_input(spec, np.zeros((0, spec.window_samples), np.int16), 1.0, calibration_iterations=iterations)
    if not singlestep:
        measured = run_bench(board, block, timeout_s=timeout_s)
        return _calibration(iterations, measured, None)
    with tempfile.TemporaryDirectory(prefix="tinymlops-singlestep-") as tmp:
        log = Path(tmp) / "exec.log"
        measured = run_bench(board, block, timeout_s=timeout_s,
                             extra_args=["-singlestep", "-d", "exec,nochain", "-D", str(log)])  # fmt: skip
        markers = symbol_addresses(build_images(board, only=()).bench)
        counted = _count_between(log, markers["bench_marker_begin"], markers["bench_marker_end"])
    return _calibration(iterations, measured, counted)


def _calibration(iterations: int, measured: Measurement, singlestep: int | None) -> Calibration:
    if measured.calibration_instructions is None:
        raise EmulatorError("bench image printed no calibration line")
    return Calibration(iterations, measured.calibration_instructions, measured.overhead_instructions, singlestep,
                       measured.instructions_per_tick)  # fmt: skip


_TRACE_PC = re.compile(rb"Trace \d+: 0x[0-9a-f]+ \[[0-9a-f]+/([0-9a-f]+)/")


def _count_between(log: Path, begin: int, end: int) -> int:
    """Executed instructions from the first entry at ``begin`` to the first entry at ``end`` after it."""
    count, started = 0, False
    with log.open("rb") as lines:
        for line in lines:
            match = _TRACE_PC.match(line)
            if match is None:
                continue
            pc = int(match.group(1), 16)
            if not started:
                started = pc == begin
            elif pc == end:
                return count
            if started:
                count += 1
    raise EmulatorError(f"the execution log {log.name} does not show both marker functions")
