"""The budget gate: a compressed model must fit an MCU target's flash, RAM and latency budgets.

Where QEMU emulates the target's core (the catalog's ``emulated_board``) the figures are
measured on the device firmware itself (:class:`DeviceMeasurement`, from
:func:`firmware.emulator.measure`): latency is the instructions the firmware's DSP front end and
int8 runtime execute on one window, times the core's cycles per instruction, at its clock; flash
is the linked device image plus two model slots (active and staging) and the rest of the
firmware; RAM is the image's static RAM plus the runtime's arena for this model and the
RTOS/network reserve. Elsewhere (a core QEMU cannot run) the figures are estimated: flash is the
model plus the catalog's runtime size and DSP tables, RAM the tensor arena measured in the real
TFLite Micro interpreter plus the DSP buffers, latency MACs x cycles per MAC plus DSP cycles per
sample; the report says which. When inputs are given, the TFLite and TFLite Micro outputs must
also agree within a few LSB.
"""

from __future__ import annotations

import json
import logging
import subprocess
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from firmware.tflm import ArenaMeasurement, ParityReport, TflmRunner, compare_interpreters, count_macs, measure_arena
from tinymlops.contracts.dsp import DspSpec
from tinymlops.errors import TinyMLOpsError
from tinymlops.targets import McuTarget

log = logging.getLogger(__name__)

# TFLite's reference kernels and TFLite Micro round each int8 requantization independently; over the
# autoencoder's four fully connected layers that accumulates to a few LSB on a minority of outputs
# (3 LSB seen on a fully trained model). A wrong kernel or wrong quantization parameters shows as tens.
DEFAULT_PARITY_TOLERANCE_LSB = 4


class BudgetExceededError(TinyMLOpsError):
    """A model does not fit an MCU target; the message names each exceeded limit."""


@dataclass(frozen=True)
class BudgetCheck:
    """One gate item: a measured figure against its limit (lower is better)."""

    name: str
    measured: float
    limit: float
    unit: str

    @property
    def passed(self) -> bool:
        """Whether the measured figure is within the limit."""
        return self.measured <= self.limit

    @property
    def margin(self) -> float:
        """Headroom left (negative when exceeded)."""
        return self.limit - self.measured

    def format(self, value: float) -> str:
        """Format a value of this check with its unit."""
        if self.unit == "B":
            return f"{value:,.0f} B"
        if self.unit == "ms":
            return f"{value:.3f} ms"
        return f"{value:g} {self.unit}"

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable dict including the verdict and margin."""
        return {**asdict(self), "margin": self.margin, "passed": self.passed}


@dataclass(frozen=True)
class DeviceMeasurement:
    """What the device firmware measured for one model on an emulated core.

    Attributes:
        board: QEMU board it ran on.
        dsp_arithmetic: The DSP front end measured (``f32`` or ``q15``).
        dsp_instructions: Instructions of the DSP front end per window.
        inference_instructions: Instructions of one inference in the firmware's int8 runtime.
        image_flash_bytes: Flash of the linked device image (code, constants, initialised data).
        image_ram_bytes: Static RAM of the linked device image without its tensor arena buffer.
        arena_bytes: Tensor arena the firmware's runtime needs for this model.
    """

    board: str
    dsp_arithmetic: str
    dsp_instructions: int
    inference_instructions: int
    image_flash_bytes: int
    image_ram_bytes: int
    arena_bytes: int


@dataclass(frozen=True)
class FlashUsage:
    """Flash use in bytes; ``model_slots`` copies of the model (the firmware keeps an active and a staging slot)."""

    model_bytes: int
    runtime_bytes: int
    firmware_reserve_bytes: int
    dsp_table_bytes: int
    limit_bytes: int
    model_slots: int = 1

    @property
    def total_bytes(self) -> int:
        """Everything that has to fit in flash."""
        return (
            self.model_bytes * self.model_slots
            + self.runtime_bytes
            + self.firmware_reserve_bytes
            + self.dsp_table_bytes
        )


@dataclass(frozen=True)
class RamUsage:
    """RAM use in bytes; the arena is the smallest working one (the allocator's report is kept for reference)."""

    arena_bytes: int
    arena_reported_bytes: int
    dsp_buffer_bytes: int
    reserve_bytes: int
    limit_bytes: int

    @property
    def total_bytes(self) -> int:
        """Everything that has to fit in SRAM."""
        return self.arena_bytes + self.dsp_buffer_bytes + self.reserve_bytes


@dataclass(frozen=True)
class LatencyEstimate:
    """Per-window latency: DSP front end plus one inference, measured on the emulated core or estimated.

    The cycles-per-MAC figures are always given for comparison; with ``method == "measured"``
    the DSP and inference times come from the instruction counts instead.
    """

    macs: int
    optimized_kernels: bool
    inference_ms_reference: float
    inference_ms_optimized: float
    dsp_ms: float
    budget_ms: float
    method: str = "estimated"
    board: str | None = None
    cycles_per_instruction: float | None = None
    dsp_instructions: int | None = None
    inference_instructions: int | None = None
    inference_ms_measured: float | None = None
    note: str = ""

    @property
    def inference_ms(self) -> float:
        """Inference time: measured, else with the kernels the target uses."""
        if self.inference_ms_measured is not None:
            return self.inference_ms_measured
        return self.inference_ms_optimized if self.optimized_kernels else self.inference_ms_reference

    @property
    def total_ms(self) -> float:
        """DSP plus inference."""
        return self.dsp_ms + self.inference_ms


@dataclass(frozen=True)
class BudgetReport:
    """Result of validating one model against one MCU target."""

    target: str
    flash: FlashUsage
    ram: RamUsage
    latency: LatencyEstimate
    checks: tuple[BudgetCheck, ...]
    parity: ParityReport | None = None

    @property
    def passed(self) -> bool:
        """Whether every check passed."""
        return all(check.passed for check in self.checks)

    @property
    def failures(self) -> list[BudgetCheck]:
        """The checks that failed."""
        return [check for check in self.checks if not check.passed]

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable dict with totals, checks and the verdict."""
        return {
            "target": self.target,
            "passed": self.passed,
            "flash": {**asdict(self.flash), "total_bytes": self.flash.total_bytes},
            "ram": {**asdict(self.ram), "total_bytes": self.ram.total_bytes},
            "latency": {
                **asdict(self.latency),
                "inference_ms": self.latency.inference_ms,
                "total_ms": self.latency.total_ms,
            },
            "parity": None if self.parity is None else self.parity.to_dict(),
            "checks": [check.to_dict() for check in self.checks],
        }

    def to_json(self) -> str:
        """Return the report as JSON text."""
        return json.dumps(self.to_dict(), indent=2)

    def to_markdown(self) -> str:
        """Return a Markdown table (check | measured | limit | margin | verdict) with the breakdown below."""
        lines = [
            f"### MCU budget: {self.target} — {'PASS' if self.passed else 'FAIL'}",
            "",
            "| check | measured | limit | margin | verdict |",
            "|---|---:|---:|---:|---|",
        ]
        for check in self.checks:
            share = f" ({check.margin / check.limit:+.1%})" if check.limit else ""
            margin = ("+" if check.margin >= 0 else "-") + check.format(abs(check.margin)) + share
            verdict = "pass" if check.passed else "**FAIL**"
            measured, limit = check.format(check.measured), check.format(check.limit)
            lines.append(f"| {check.name} | {measured} | {limit} | {margin} | {verdict} |")
        f, r, t = self.flash, self.ram, self.latency
        kernels = "optimised" if t.optimized_kernels else "reference"
        if t.method == "measured":
            lines += [
                "",
                f"- flash: {f.model_slots} model slots x {f.model_bytes:,} B + device image {f.runtime_bytes:,} B "
                f"(linked, {t.board}) + rest of the firmware {f.firmware_reserve_bytes:,} B",
                f"- RAM: tensor arena {r.arena_bytes:,} B (firmware runtime; host TFLM smallest working "
                f"{r.arena_reported_bytes:,} B) + device image static RAM {r.dsp_buffer_bytes:,} B "
                f"+ RTOS/network {r.reserve_bytes:,} B",
                f"- latency (measured on QEMU {t.board}, {t.cycles_per_instruction} cycles per instruction): "
                f"DSP {t.dsp_instructions:,} instructions {t.dsp_ms:.3f} ms + inference "
                f"{t.inference_instructions:,} instructions {t.inference_ms:.3f} ms; cycles-per-MAC model for "
                f"{t.macs:,} MACs: reference {t.inference_ms_reference:.3f} ms, optimised "
                f"{t.inference_ms_optimized:.3f} ms",
            ]
        else:
            lines += [
                "",
                f"- flash: model {f.model_bytes:,} B + TFLM runtime {f.runtime_bytes:,} B + firmware "
                f"{f.firmware_reserve_bytes:,} B + DSP tables {f.dsp_table_bytes:,} B",
                f"- RAM: tensor arena {r.arena_bytes:,} B (smallest working, host TFLM; allocator report "
                f"{r.arena_reported_bytes:,} B) + DSP buffers {r.dsp_buffer_bytes:,} B "
                f"+ RTOS/network {r.reserve_bytes:,} B",
                f"- latency (estimated{': ' + t.note if t.note else ''}): DSP {t.dsp_ms:.3f} ms + {t.macs:,} MACs "
                f"with {kernels} kernels {t.inference_ms:.3f} ms (reference {t.inference_ms_reference:.3f} ms, "
                f"optimised {t.inference_ms_optimized:.3f} ms)",
            ]
        if self.parity is not None:
            p = self.parity
            lines.append(
                f"- parity: TFLite vs TFLM max {p.max_abs_lsb} LSB, {p.fraction_differing:.2%} of outputs differ "
                f"over {p.n} inputs"
            )
        return "\n".join(lines) + "\n"


# Windows measured per model: counts are averaged over them (each has one SysTick tick of resolution).
_MEASURED_WINDOWS = 3
# Symbols of the statically reserved tensor arenas in the images (device_main.c keeps two engines:
# the active model and a candidate loaded beside it until the swap; bench_main.c one).
_ARENA_SYMBOLS = {"device": ("arenas", 2), "bench": ("arena", 1)}


def measurement_window(spec: DspSpec, n_windows: int = _MEASURED_WINDOWS) -> npt.NDArray[np.int16]:
    """Deterministic int16 windows (broadband vibration at about a tenth of full scale) to measure on."""
    rng = np.random.default_rng(20261203)
    return np.clip(rng.normal(0.0, 3000.0, (n_windows, spec.window_samples)), -32768, 32767).astype(np.int16)


def measure_on_device(model: bytes, target: McuTarget, dsp: DspSpec) -> tuple[DeviceMeasurement | None, str]:
    """Run the model and the target's DSP front end in the device firmware on the target's emulated core.

    Args:
        model: The int8 .tflite flatbuffer.
        target: The MCU target (its ``emulated_board``, ``dsp_arithmetic``).
        dsp: The DSP front end the model is fed by.

    Returns:
        The measurement, or None and why the figures have to be estimated (no QEMU board for the core,
        toolchain or QEMU not installed).

    Raises:
        TinyMLOpsError: The firmware could not be built or run, or rejected the model.
    """
    if target.emulated_board is None:
        return None, f"QEMU emulates no {target.core}"
    from firmware import emulator, tinyrt

    try:
        images = emulator.build_images(target.emulated_board)
    except emulator.ToolchainMissingError as exc:
        log.warning("budget %s: latency estimated, not measured: %s", target.name, exc)
        return None, str(exc)
    fixed_point = target.dsp_arithmetic == "q15"
    measured = emulator.measure(
        images.board, model, dsp, measurement_window(dsp), 16.0 / 32768.0, fixed_point=fixed_point
    )
    dsp_counts = measured.fixed_point_instructions if fixed_point else measured.dsp_instructions
    image_name = "device" if images.device is not None else "bench"
    elf = images.device if images.device is not None else images.bench
    size = emulator.image_size(elf)
    symbol, copies = _ARENA_SYMBOLS[image_name]
    arena_bytes = tinyrt.arena_required(model)
    static_ram = size.ram_bytes + size.stack_bytes - _symbol_size(elf, symbol) + (copies - 1) * arena_bytes
    return (
        DeviceMeasurement(
            board=images.board.name,
            dsp_arithmetic=target.dsp_arithmetic,
            dsp_instructions=round(float(np.mean(dsp_counts))),
            inference_instructions=round(measured.inference_instructions_mean),
            image_flash_bytes=size.flash_bytes,
            image_ram_bytes=static_ram,
            arena_bytes=arena_bytes,
        ),
        "",
    )


def _symbol_size(elf: Path, name: str) -> int:
    """Size of one symbol of an image (``arm-none-eabi-nm -S``)."""
    from firmware.emulator import EmulatorError, find_toolchain

    listing = subprocess.run([find_toolchain().nm, "-S", str(elf)], capture_output=True, text=True, check=True)
    for line in listing.stdout.splitlines():
        fields = line.split()
        if len(fields) == 4 and fields[3] == name:
            return int(fields[1], 16)
    raise EmulatorError(f"{elf.name} has no symbol {name!r}: its static arena cannot be accounted for")


def dsp_buffer_bytes(dsp: DspSpec) -> int:
    """RAM of the device DSP front end (firmware/c/dsp_features.h): int16 window, float32 work buffer, features."""
    return dsp.window_samples * 2 + dsp.window_samples * 4 + dsp.n_features * 4


def dsp_table_bytes(dsp: DspSpec) -> int:
    """Flash of the DSP's const tables (firmware/c/dsp_features.h): Hann, twiddles, band edges, mean and std."""
    return dsp.window_samples * 4 * 2 + (dsp.n_bands + 1) * 2 + dsp.n_features * 4 * 2


def validate_budget(
    model: bytes,
    target: McuTarget,
    dsp: DspSpec,
    arena: ArenaMeasurement | None = None,
    parity: ParityReport | None = None,
    parity_tolerance_lsb: int = DEFAULT_PARITY_TOLERANCE_LSB,
    measurement: DeviceMeasurement | None = None,
    estimate_note: str = "",
) -> BudgetReport:
    """Check a model against one MCU target's flash, RAM and latency budgets.

    Args:
        model: The int8 .tflite flatbuffer.
        target: The MCU target.
        dsp: The DSP front end the model is fed by.
        arena: A measurement of this model's arena (measured in TFLite Micro when not given).
        parity: This model's TFLite vs TFLite Micro comparison (:func:`check_parity`, measured once per
            model, whatever the target); when given, the outputs must agree within ``parity_tolerance_lsb``.
        parity_tolerance_lsb: Largest allowed output difference in quantization steps.
        measurement: The firmware's figures on the emulated core (:func:`measure_on_device`);
            None estimates latency, flash and RAM from the catalog.
        estimate_note: Why the figures are estimated (shown in the report).

    Returns:
        The report; :func:`tasks.packaging.enforce_some_target_fits` turns reports that all failed into an error.

    """
    arena = arena or measure_arena(model)
    macs = count_macs(model)
    ms_per_cycle = 1000.0 / target.clock_hz
    estimate = LatencyEstimate(
        macs=macs,
        optimized_kernels=target.uses_optimized_kernels,
        inference_ms_reference=macs * target.cycles_per_mac_int8 * ms_per_cycle,
        inference_ms_optimized=macs * target.cycles_per_mac_int8_cmsis_nn * ms_per_cycle,
        dsp_ms=target.dsp_cycles_per_sample * dsp.window_samples * ms_per_cycle,
        budget_ms=target.latency_budget_ms,
        note=estimate_note,
    )
    if measurement is None:
        flash = FlashUsage(
            model_bytes=len(model),
            runtime_bytes=target.runtime_flash_bytes,
            firmware_reserve_bytes=target.firmware_flash_reserve_bytes,
            dsp_table_bytes=dsp_table_bytes(dsp),
            limit_bytes=target.flash_bytes,
        )
        ram = RamUsage(
            arena_bytes=arena.smallest_working_bytes,
            arena_reported_bytes=arena.reported_bytes,
            dsp_buffer_bytes=dsp_buffer_bytes(dsp),
            reserve_bytes=target.ram_reserve_bytes,
            limit_bytes=target.sram_bytes,
        )
        latency = estimate
    else:
        m = measurement
        ms_per_instruction = target.cycles_per_instruction * ms_per_cycle
        flash = FlashUsage(
            model_bytes=len(model),
            runtime_bytes=m.image_flash_bytes,
            firmware_reserve_bytes=target.firmware_flash_reserve_bytes,
            dsp_table_bytes=0,  # in the linked image
            limit_bytes=target.flash_bytes,
            model_slots=2,
        )
        ram = RamUsage(
            arena_bytes=m.arena_bytes,
            arena_reported_bytes=arena.smallest_working_bytes,
            dsp_buffer_bytes=m.image_ram_bytes,
            reserve_bytes=target.ram_reserve_bytes,
            limit_bytes=target.sram_bytes,
        )
        latency = replace(
            estimate,
            method="measured",
            board=m.board,
            cycles_per_instruction=target.cycles_per_instruction,
            dsp_instructions=m.dsp_instructions,
            inference_instructions=m.inference_instructions,
            dsp_ms=m.dsp_instructions * ms_per_instruction,
            inference_ms_measured=m.inference_instructions * ms_per_instruction,
            note="",
        )
    checks = [
        BudgetCheck("flash", flash.total_bytes, flash.limit_bytes, "B"),
        BudgetCheck("ram", ram.total_bytes, ram.limit_bytes, "B"),
        BudgetCheck("latency", latency.total_ms, latency.budget_ms, "ms"),
    ]
    if parity is not None:
        checks.append(BudgetCheck("parity", parity.max_abs_lsb, parity_tolerance_lsb, "LSB"))
    report = BudgetReport(target.name, flash, ram, latency, tuple(checks), parity)
    log.info(
        "budget %s: %s (%s)",
        target.name,
        "pass" if report.passed else "FAIL",
        ", ".join(f"{c.name} {c.format(c.measured)}/{c.format(c.limit)}" for c in checks),
    )
    return report


def check_parity(model: bytes, inputs: npt.NDArray[np.float32], arena: ArenaMeasurement) -> ParityReport:
    """Compare TFLite and TFLite Micro (in the measured arena) outputs of a model on float32 feature rows."""
    return compare_interpreters(model, inputs, TflmRunner(model, arena.smallest_working_bytes))
