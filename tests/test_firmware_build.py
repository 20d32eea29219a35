"""The Cortex-M images built with arm-none-eabi-gcc and run in QEMU: sizes, OTA tests, counts, parity.

Measured here (December 2026; QEMU 7.2, -icount shift=0, GCC 12.2 -O2): the float DSP front end
takes about 114,600 instructions per 1024-sample window on the M4F and 4.07 M on the M0 (software
float), the fixed-point one (dsp_q15.c) 281,700 and 529,500; the 35-16-8-16-35 int8 autoencoder
9,400-12,100 on the M4F and about 21,000 on the M0 (depending on the tinyrt revision). SysTick
agrees with QEMU's per-instruction execution log within one tick (40 instructions on mps2-an386,
62.5 on microbit), and two runs count exactly the same.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from firmware import emulator
from firmware.emulator import BOARDS, C_DIR, EmulatorError, ToolchainMissingError
from tinymlops.contracts.dsp import DspSpec, extract_features, raw_features

SCALE = 0.002  # physical units per LSB
FEATURE_ATOL = 2e-5
LOOP_ITERATIONS = 20_000


def _windows(n_windows: int, n: int = 1024, seed: int = 0) -> np.ndarray:
    """Shaft lines, a harmonic and noise, quantized to int16 as on the wire."""
    rng = np.random.default_rng(seed)
    t = np.arange(n) / 25_600
    rows = []
    for i in range(n_windows):
        f0 = 40.0 + 35.0 * i
        x = 4000 * np.sin(2 * np.pi * f0 * t) + 900 * np.sin(2 * np.pi * 7.3 * f0 * t) + rng.normal(0, 250, n)
        rows.append(np.clip(np.round(x), -32768, 32767).astype(np.int16))
    return np.stack(rows)


@pytest.fixture(scope="module")
def toolchain() -> emulator.Toolchain:
    try:
        return emulator.find_toolchain()
    except ToolchainMissingError as exc:
        pytest.fail(f"{exc} (the README's set-up installs it)")


@pytest.fixture(scope="module")
def images(toolchain: emulator.Toolchain) -> dict[str, emulator.ImageSet]:
    # not device.elf: its sources are another piece of work, tested with it
    return {name: emulator.build_images(name, [i for i in BOARDS[name].images if i != "device"]) for name in BOARDS}


def test_missing_tool_is_one_line_naming_the_package(monkeypatch: pytest.MonkeyPatch) -> None:
    real_which = shutil.which
    monkeypatch.setattr(shutil, "which", lambda tool: None if tool == "qemu-system-arm" else real_which(tool))
    with pytest.raises(ToolchainMissingError, match="install the Debian package qemu-system-arm") as raised:
        emulator.find_toolchain()
    assert "\n" not in str(raised.value)


def test_cli_build_without_the_toolchain_fails_with_one_line(tmp_path: Path) -> None:
    env = {**os.environ, "PATH": str(tmp_path), "TINYMLOPS_DATA_DIR": str(tmp_path / "data")}
    result = subprocess.run([sys.executable, "-m", "tinymlops", "firmware", "build"], capture_output=True, text=True,
                            env=env, timeout=60, check=False)  # fmt: skip
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == ["error: make not found on PATH: install the Debian package make"]


def test_bench_input_layout_is_aligned_and_versioned() -> None:
    spec = DspSpec()
    block = emulator.bench_input(spec, _windows(2), SCALE, model=b"\x01" * 100)
    header = emulator._HEADER.unpack_from(block)
    magic, version, header_bytes, total, n, n_bands, n_windows = header[:7]
    assert (magic, version, header_bytes, total) == (0x49424D54, 1, emulator._HEADER.size, len(block))
    assert (n, n_bands, n_windows) == (1024, 32, 2)
    offsets = header[9:16]
    assert all(offset % 4 == 0 for offset in offsets) and header[15] % 16 == 0
    assert block[header[15] : header[15] + header[16]] == b"\x01" * 100


@pytest.mark.slow
def test_both_boards_build_with_sane_sizes(images: dict[str, emulator.ImageSet]) -> None:
    for name, image_set in images.items():
        for image, elf in image_set.images().items():
            size = emulator.image_size(elf)
            assert size.flash_bytes == size.text + size.data and size.ram_bytes == size.data + size.bss
            assert 1_000 < size.text < 1024 * 1024, (name, image, size)
            assert size.ram_bytes + size.stack_bytes <= size.ram_linked, (name, image, size)
            # linked for the part's RAM (256 KiB modelled on mps2-an386); the unit-test image has 4 MiB
            expected_ram = 4 * 1024 * 1024 if image == "test_ota" else {"mps2-an386": 256, "microbit": 16}[name] * 1024
            assert size.ram_linked == expected_ram and size.stack_bytes >= 2048, (name, image, size)


@pytest.mark.slow
def test_ota_receiver_unit_tests_pass_on_the_emulated_m4f(images: dict[str, emulator.ImageSet]) -> None:
    elf = images["mps2-an386"].require("test_ota")
    result = emulator.run_qemu(BOARDS["mps2-an386"], elf, semihosting_args=["test_ota", "vectors"], cwd=C_DIR,
                               timeout_s=60, icount=False)  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    summary = re.search(r"(\d+) passed, (\d+) failed", result.stdout)
    assert summary is not None, result.stdout[-2000:]
    assert int(summary.group(1)) > 50 and int(summary.group(2)) == 0


@pytest.mark.slow
@pytest.mark.parametrize("board", list(BOARDS))
def test_board_uart_and_persistent_flash(board: str, images: dict[str, emulator.ImageSet], tmp_path: Path) -> None:
    """board_selftest.c: the UART echoes a line; on mps2-an386 a flash write survives a restart via its file."""
    target = BOARDS[board]
    flash = tmp_path / "flash.img"
    flash.write_bytes(bytes(target.flash_size))
    counts = []
    for _ in range(2):
        loaders = [(flash, target.flash_base)] if target.flash_base is not None else []
        result = emulator.run_qemu(target, images[board].require("selftest"), serial="stdio", uart_input="hello uart\n",
                                   loaders=loaders, semihosting_args=["selftest", "flash=flash.img"], cwd=tmp_path,
                                   timeout_s=30)  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert result.stdout == f"HELLO UART\n{board} uart ok\n"
        counts += re.findall(r"flash count=(\d+)", result.stderr)
    if target.flash_base is None:
        assert counts == []  # no flash: the write is refused (checked in the image)
    else:
        assert counts == ["0", "1"]
        assert flash.read_bytes()[0x80000:0x80008] == b"FLST\x02\x00\x00\x00"


@pytest.mark.slow
@pytest.mark.parametrize("board", list(BOARDS))
def test_a_fault_is_reported_and_exits_non_zero(board: str, images: dict[str, emulator.ImageSet]) -> None:
    result = emulator.run_qemu(BOARDS[board], images[board].require("selftest"), serial="stdio", uart_input="fault\n",
                               timeout_s=30)  # fmt: skip
    assert result.returncode == 3
    assert re.search(r"fault: ipsr=00000003 pc=[0-9a-f]{8} lr=[0-9a-f]{8}", result.stderr), result.stderr


@pytest.mark.slow
def test_a_hung_image_is_killed_at_the_timeout(images: dict[str, emulator.ImageSet]) -> None:
    started = time.monotonic()
    with pytest.raises(EmulatorError, match="did not exit within"):
        # -S: the CPU never starts, so the image never exits
        emulator.run_qemu(BOARDS["microbit"], images["microbit"].require("bench"), timeout_s=1, extra_args=["-S"])
    assert time.monotonic() - started < 10


@pytest.mark.slow
@pytest.mark.parametrize("board", list(BOARDS))
def test_instruction_counts_are_deterministic_and_agree_with_the_execution_log(
    board: str, images: dict[str, emulator.ImageSet]
) -> None:
    first = emulator.calibrate(board, LOOP_ITERATIONS)
    second = emulator.calibrate(board, LOOP_ITERATIONS, singlestep=True)
    assert first.systick_instructions == second.systick_instructions
    assert first.instructions_per_tick == int(np.ceil(BOARDS[board].instructions_per_tick))
    # the log counts the loop (2 instructions per iteration) and the marker calls around it
    assert second.singlestep_instructions is not None
    assert 0 <= second.singlestep_instructions - 2 * LOOP_ITERATIONS <= 8
    # SysTick counts the same span plus one empty measurement's overhead, to one tick
    difference = second.systick_instructions - second.overhead_instructions - second.singlestep_instructions
    assert abs(difference) <= second.instructions_per_tick, second


@pytest.mark.slow
@pytest.mark.parametrize("board", list(BOARDS))
def test_dsp_features_on_the_board_match_the_numpy_reference(board: str, images: dict[str, emulator.ImageSet]) -> None:
    from firmware.dsp_q15 import raw_features_q15

    spec = DspSpec()
    windows = _windows(3)
    measured = emulator.measure(board, None, spec, windows, SCALE, fixed_point=True)
    reference = raw_features(windows * np.float32(SCALE), spec)
    np.testing.assert_allclose(measured.features, reference, atol=FEATURE_ATOL, rtol=0)
    assert measured.inference_instructions == (0, 0, 0) and measured.output_int8 is None
    again = emulator.measure(board, None, spec, windows, SCALE, fixed_point=True)
    assert again.dsp_instructions == measured.dsp_instructions  # deterministic under -icount
    assert again.fixed_point_instructions == measured.fixed_point_instructions
    low, high = {"mps2-an386": (60_000, 250_000), "microbit": (1_000_000, 10_000_000)}[board]
    assert all(low < count < high for count in measured.dsp_instructions), measured.dsp_instructions
    # the fixed-point front end: bit for bit the host build of the same C, far cheaper without an FPU
    assert measured.fixed_point_features is not None
    np.testing.assert_array_equal(measured.fixed_point_features, raw_features_q15(windows, spec, scale=SCALE))
    if board == "microbit":
        assert max(measured.fixed_point_instructions) * 4 < min(measured.dsp_instructions)


@pytest.fixture(scope="module")
def int8_model() -> bytes:
    from tests.int8_model import int8_autoencoder

    return int8_autoencoder()


@pytest.mark.slow
@pytest.mark.parametrize("board", list(BOARDS))
def test_inference_on_the_board_equals_tflite_micro(
    board: str, images: dict[str, emulator.ImageSet], int8_model: bytes
) -> None:
    from firmware.tflm import TflmRunner
    from firmware.tinyrt import NativeRuntime

    windows = _windows(4, seed=3)
    spec = DspSpec().fitted(raw_features(_windows(40, seed=4) * np.float32(SCALE), DspSpec()))
    measured = emulator.measure(board, int8_model, spec, windows, SCALE)
    reference = extract_features(windows * np.float32(SCALE), spec)
    # normalised features: the raw tolerance scaled by 1 / std
    tolerance = np.broadcast_to(FEATURE_ATOL / np.asarray(spec.std, dtype=np.float32) + 1e-6, reference.shape)
    np.testing.assert_array_less(np.abs(measured.features - reference), tolerance)
    assert measured.input_int8 is not None and measured.output_int8 is not None
    np.testing.assert_array_equal(measured.output_int8, TflmRunner(int8_model).predict_int8(measured.input_int8))
    np.testing.assert_array_equal(measured.output_int8, NativeRuntime(int8_model).predict_int8(measured.input_int8))
    assert all(count > 1_000 for count in measured.inference_instructions)


def test_flash_region_and_bench_input_do_not_overlap_the_image() -> None:
    board = BOARDS["mps2-an386"]
    linker_script = Path(C_DIR / "boards" / "mps2-an386.ld").read_text()
    assert "LENGTH = 1M" in linker_script  # image below the bench input at 1 MiB
    assert board.flash_base is not None
    assert board.bench_input_addr + board.bench_input_max <= board.flash_base
