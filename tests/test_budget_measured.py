"""The budget gate on measured figures: the device firmware's instruction counts on the emulated cores."""

from __future__ import annotations

import pytest

from firmware.tflm import ArenaMeasurement, measure_arena
from tasks.budget import BudgetExceededError, DeviceMeasurement, measure_on_device, validate_budget
from tasks.packaging import PackagedTarget, enforce_some_target_fits
from tests.int8_model import int8_autoencoder
from tinymlops.contracts.dsp import DspSpec
from tinymlops.targets import McuTarget, load_catalog

pytestmark = pytest.mark.slow

DSP = DspSpec()


@pytest.fixture(scope="module")
def model() -> bytes:
    return int8_autoencoder()


@pytest.fixture(scope="module")
def arena(model: bytes) -> ArenaMeasurement:
    return measure_arena(model)


@pytest.fixture(scope="module")
def catalog() -> dict[str, McuTarget]:
    return load_catalog()


@pytest.fixture(scope="module")
def m4(model: bytes, catalog: dict[str, McuTarget]) -> DeviceMeasurement:
    measurement, why = measure_on_device(model, catalog["nrf52840"], DSP)
    assert measurement is not None, why
    return measurement


def test_m4f_latency_is_the_measured_instructions_at_the_clock(
    model: bytes, arena: ArenaMeasurement, catalog: dict[str, McuTarget], m4: DeviceMeasurement
) -> None:
    target = catalog["nrf52840"]
    assert m4.board == "mps2-an386" and m4.dsp_arithmetic == "f32"
    # the target: DSP + inference under 150,000 instructions per window on the M4F
    assert 0 < m4.inference_instructions < m4.dsp_instructions
    assert m4.dsp_instructions + m4.inference_instructions < 150_000
    report = validate_budget(model, target, DSP, arena, measurement=m4)
    latency = report.latency
    assert latency.method == "measured" and latency.board == "mps2-an386"
    ms_per_instruction = target.cycles_per_instruction * 1000 / target.clock_hz
    assert latency.dsp_ms == pytest.approx(m4.dsp_instructions * ms_per_instruction)
    assert latency.inference_ms == pytest.approx(m4.inference_instructions * ms_per_instruction)
    # flash: two model slots, the linked image and the rest of the firmware; RAM: the firmware's arena
    assert report.flash.model_slots == 2 and report.flash.runtime_bytes == m4.image_flash_bytes
    assert report.flash.total_bytes == 2 * len(model) + m4.image_flash_bytes + target.firmware_flash_reserve_bytes
    assert report.ram.arena_bytes == m4.arena_bytes > 0
    assert report.ram.total_bytes == m4.arena_bytes + m4.image_ram_bytes + target.ram_reserve_bytes
    assert report.passed
    markdown = report.to_markdown()
    assert "measured on QEMU mps2-an386" in markdown and f"{m4.dsp_instructions:,} instructions" in markdown


def test_measurement_is_deterministic(model: bytes, catalog: dict[str, McuTarget], m4: DeviceMeasurement) -> None:
    again, _ = measure_on_device(model, catalog["stm32l4r5"], DSP)
    assert again == m4  # same core, same firmware, same inputs: -icount counts the same


def test_rp2040_fits_only_with_the_fixed_point_front_end(
    model: bytes, arena: ArenaMeasurement, catalog: dict[str, McuTarget]
) -> None:
    rp2040 = catalog["rp2040"]
    q15, why = measure_on_device(model, rp2040, DSP)
    assert q15 is not None, why
    assert q15.board == "microbit" and q15.dsp_arithmetic == "q15"
    assert validate_budget(model, rp2040, DSP, arena, measurement=q15).passed

    # the same core with the float front end on software float: the gate says it does not fit
    with_float = rp2040.model_copy(update={"dsp_arithmetic": "f32"})
    f32, _ = measure_on_device(model, with_float, DSP)
    assert f32 is not None and f32.dsp_instructions > 5 * q15.dsp_instructions
    report = validate_budget(model, with_float, DSP, arena, measurement=f32)
    assert [check.name for check in report.failures] == ["latency"]
    with pytest.raises(BudgetExceededError, match=r"rp2040: latency \d+\.\d+ ms > 20\.000 ms"):
        enforce_some_target_fits([PackagedTarget("rp2040", report, bundle=None)])  # type: ignore[arg-type]


def test_a_core_qemu_cannot_run_keeps_the_estimate_and_says_so(
    model: bytes, arena: ArenaMeasurement, catalog: dict[str, McuTarget]
) -> None:
    esp32s3 = catalog["esp32s3"]
    measurement, why = measure_on_device(model, esp32s3, DSP)
    assert measurement is None and "Xtensa" in why
    report = validate_budget(model, esp32s3, DSP, arena, estimate_note=why)
    assert report.latency.method == "estimated"
    assert f"latency (estimated: {why})" in report.to_markdown()
