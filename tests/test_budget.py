from __future__ import annotations

import json

import pytest

from firmware.tflm import ArenaMeasurement, measure_arena
from tasks.budget import (
    DEFAULT_PARITY_TOLERANCE_LSB,
    BudgetExceededError,
    BudgetReport,
    check_parity,
    dsp_buffer_bytes,
    dsp_table_bytes,
    validate_budget,
)
from tasks.packaging import PackagedTarget, enforce_some_target_fits
from tests.int8_model import dense_macs, int8_autoencoder, sample_features
from tinymlops.contracts.dsp import DspSpec
from tinymlops.targets import McuTarget, get_target, load_catalog

DSP = DspSpec()


@pytest.fixture(scope="module")
def model() -> bytes:
    return int8_autoencoder()


@pytest.fixture(scope="module")
def arena(model: bytes) -> ArenaMeasurement:
    return measure_arena(model)


@pytest.fixture(scope="module")
def nrf_report(model: bytes, arena: ArenaMeasurement) -> BudgetReport:
    parity = check_parity(model, sample_features(100, seed=5), arena)
    return validate_budget(model, get_target("nrf52840", load_catalog()), DSP, arena, parity)


def refuse(report: BudgetReport) -> None:
    """The flow's gate on one target's report (it reads only the reports, not the bundles)."""
    enforce_some_target_fits([PackagedTarget(report.target, report, bundle=None)])  # type: ignore[arg-type]


def _tiny_target() -> McuTarget:
    return McuTarget(
        name="tiny",
        description="a target nothing fits",
        core="Arm Cortex-M0+",
        clock_hz=1_000_000,
        sram_bytes=4096,
        flash_bytes=8192,
        firmware_flash_reserve_bytes=1024,
        runtime_flash_bytes=1024,
        ram_reserve_bytes=512,
        cycles_per_mac_int8=20.0,
        cycles_per_mac_int8_cmsis_nn=20.0,
        uses_optimized_kernels=False,
        dsp_cycles_per_sample=100.0,
        latency_budget_ms=1.0,
    )


def test_tiny_model_passes_nrf52840_with_the_measured_figures(
    model: bytes, arena: ArenaMeasurement, nrf_report: BudgetReport
) -> None:
    target = get_target("nrf52840", load_catalog())
    report = nrf_report
    assert report.passed and report.target == "nrf52840"
    assert [c.name for c in report.checks] == ["flash", "ram", "latency", "parity"]
    assert report.flash.model_bytes == len(model)
    # Hann and twiddle tables (1024 float32 each), 33 uint16 band edges, 35 float32 means and stds
    assert dsp_table_bytes(DSP) == 2 * 1024 * 4 + 33 * 2 + 2 * 35 * 4
    assert report.flash.total_bytes == (
        len(model) + target.runtime_flash_bytes + target.firmware_flash_reserve_bytes + dsp_table_bytes(DSP)
    )
    assert report.ram.arena_bytes == arena.smallest_working_bytes
    assert report.ram.arena_reported_bytes == arena.reported_bytes
    # int16 window, float32 FFT work buffer, 35 float32 features
    assert dsp_buffer_bytes(DSP) == 1024 * 2 + 1024 * 4 + 35 * 4
    assert report.ram.total_bytes == arena.smallest_working_bytes + dsp_buffer_bytes(DSP) + target.ram_reserve_bytes
    assert report.latency.macs == dense_macs()
    assert report.latency.inference_ms == pytest.approx(dense_macs() * target.cycles_per_mac * 1000 / 64e6)
    assert report.latency.inference_ms_optimized < report.latency.inference_ms_reference
    assert report.latency.dsp_ms == pytest.approx(target.dsp_cycles_per_sample * 1024 * 1000 / 64e6)
    assert report.parity is not None and report.parity.max_abs_lsb <= 2
    assert report.passed and not report.failures
    refuse(report)  # a fitting target raises nothing


def test_tiny_model_fits_every_catalog_target(model: bytes, arena: ArenaMeasurement) -> None:
    for target in load_catalog().values():
        report = validate_budget(model, target, DSP, arena)
        assert report.passed, report.to_markdown()
        assert all(check.margin > 0 for check in report.checks)


def test_too_small_target_fails_and_error_names_each_limit(model: bytes, arena: ArenaMeasurement) -> None:
    report = validate_budget(model, _tiny_target(), DSP, arena)
    assert not report.passed
    assert [c.name for c in report.failures] == ["flash", "ram", "latency"]
    with pytest.raises(BudgetExceededError) as info:
        refuse(report)
    message = str(info.value)
    assert "\n" not in message and "model fits no target: tiny: " in message
    assert f"flash {report.flash.total_bytes:,} B > 8,192 B" in message
    assert f"ram {report.ram.total_bytes:,} B > 4,096 B" in message
    assert f"latency {report.latency.total_ms:.3f} ms > 1.000 ms" in message


def test_parity_gate_fails_when_tolerance_is_exceeded(model: bytes, arena: ArenaMeasurement) -> None:
    target = get_target("nrf52840", load_catalog())
    parity = check_parity(model, sample_features(100, seed=5), arena)
    report = validate_budget(model, target, DSP, arena, parity, parity_tolerance_lsb=-1)
    assert [c.name for c in report.failures] == ["parity"]
    with pytest.raises(BudgetExceededError, match=r"parity \d+ LSB > -1 LSB"):
        refuse(report)


def test_budget_measures_the_arena_when_not_given(model: bytes, arena: ArenaMeasurement) -> None:
    report = validate_budget(model, get_target("rp2040", load_catalog()), DSP)
    assert report.ram.arena_bytes == arena.smallest_working_bytes
    assert not report.latency.optimized_kernels
    assert report.latency.inference_ms == report.latency.inference_ms_reference


def test_markdown_and_json_carry_the_figures(nrf_report: BudgetReport) -> None:
    report = nrf_report
    markdown = report.to_markdown()
    assert "| check | measured | limit | margin | verdict |" in markdown
    assert "nrf52840" in markdown and "PASS" in markdown
    for check in report.checks:
        row = f"| {check.name} | {check.format(check.measured)} | {check.format(check.limit)} |"
        assert row in markdown
    assert f"{report.ram.arena_bytes:,} B" in markdown and f"{report.latency.macs:,} MACs" in markdown
    data = json.loads(report.to_json())
    assert data["passed"] is True and data["target"] == "nrf52840"
    assert data["ram"]["arena_bytes"] == report.ram.arena_bytes
    assert data["flash"]["total_bytes"] == report.flash.total_bytes
    assert data["latency"]["total_ms"] == pytest.approx(report.latency.total_ms)
    assert report.parity is not None and data["parity"]["max_abs_lsb"] == report.parity.max_abs_lsb
    assert {c["name"]: c["limit"] for c in data["checks"]} == {
        "flash": 1_048_576,
        "ram": 262_144,
        "latency": 20.0,
        "parity": DEFAULT_PARITY_TOLERANCE_LSB,
    }


def test_failed_report_markdown_marks_failures(model: bytes, arena: ArenaMeasurement) -> None:
    markdown = validate_budget(model, _tiny_target(), DSP, arena).to_markdown()
    assert "FAIL" in markdown and markdown.count("**FAIL**") == 3
