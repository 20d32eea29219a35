"""``tinymlops bench firmware``: the device firmware measured on the emulated cores, beside its baselines.

Per core (QEMU ``mps2-an386``: Cortex-M4F; ``microbit``: Cortex-M0, the RP2040's instruction set):
instructions per window of the DSP front end (float, and fixed point on the M0) and of one
inference of the project's model in the firmware's int8 runtime; the MLPerf Tiny anomaly-detection
reference model (640-128x4-8-128x4-640) in the same runtime beside its published 10.05 ms on the
120 MHz NUCLEO-L4R5ZI; the linked images' flash and RAM; an over-the-air deployment through the
UART gateway and a real Mosquitto, beside a simulated device on the same broker. Baselines in the
same run: the catalog's cycles-per-MAC estimate and the simulated device's host figures.
"""

from __future__ import annotations

import logging
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from firmware.sensor import MachineSimulator
from firmware.tflm import TflmRunner, count_macs, measure_arena
from tasks.budget import measurement_window, validate_budget
from tasks.compress import to_tflite_int8
from tasks.mlperf_reference import REFERENCE_HIDDEN
from tasks.train import build_autoencoder, load_training_config
from tinymlops.bench import machine_description
from tinymlops.contracts.dsp import DspSpec, extract_features, raw_features
from tinymlops.settings import Settings
from tinymlops.targets import McuTarget, load_catalog

log = logging.getLogger(__name__)

# MLPerf Tiny v0.5 closed division, anomaly detection, NUCLEO-L4R5ZI (Cortex-M4 at 120 MHz), TFLite
# Micro reference kernels: the published latency of the reference model.
REFERENCE_PUBLISHED_MS = 10.05
REFERENCE_PUBLISHED_CLOCK_HZ = 120_000_000
M4_INSTRUCTION_TARGET = 150_000
FULL_SCALE_G = 16.0
_REFERENCE_FEATURES = 640


def _int8_model(n_features: int, hidden: list[int] | tuple[int, ...], seed: int) -> bytes:
    """An int8 dense autoencoder of the given shape (untrained: instruction counts depend on shapes only)."""
    model = build_autoencoder(n_features, hidden, seed)
    representative = np.random.default_rng(seed).standard_normal((64, n_features)).astype(np.float32)
    return to_tflite_int8(model, representative)


def _fitted_spec(settings: Settings) -> DspSpec:
    """The fleet's DSP spec, normalised on simulated normal windows (the device normalises as after training)."""
    spec = DspSpec(sample_rate_hz=settings.sensor.sample_rate_hz, window_samples=settings.sensor.window_samples)
    machine = MachineSimulator(seed=7, sample_rate_hz=spec.sample_rate_hz, window_samples=spec.window_samples)
    windows = np.stack([machine.next_window() for _ in range(64)])
    return spec.fitted(raw_features(windows, spec))


def _host_device_ms(model: bytes, spec: DspSpec, windows: npt.NDArray[np.int16], scale: float) -> tuple[float, float]:
    """The simulated device's per-window DSP and inference times on this host (medians)."""
    runner = TflmRunner(model, measure_arena(model).smallest_working_bytes)
    dsp_ms, inference_ms = [], []
    for window in np.tile(windows, (10, 1)):
        t0 = time.perf_counter()
        features = extract_features(window.astype(np.float32) * scale, spec)
        t1 = time.perf_counter()
        runner.predict(features)
        inference_ms.append((time.perf_counter() - t1) * 1e3)
        dsp_ms.append((t1 - t0) * 1e3)
    return statistics.median(dsp_ms), statistics.median(inference_ms)


def _ms(instructions: float, target: McuTarget) -> float:
    return instructions * target.cycles_per_instruction * 1000.0 / target.clock_hz


def bench_ota(model: bytes, spec: DspSpec, target: McuTarget, deployments: int) -> dict[str, float]:
    """Deploy ``deployments`` signed versions to one emulated and one simulated device on a real Mosquitto.

    Returns:
        p50 of the deploy latency (manifest to ``active``) and of the loading latency per kind of device.
    """
    from firmware.device import DeviceConfig, DeviceRuntime
    from firmware.emulated import EmulatedDevice
    from firmware.gateway import GatewayConfig
    from firmware.ota import DeviceStatus
    from firmware.signing import KeyRing, ManifestSigner, generate_keypair
    from tasks.ota_publisher import ModelPublisher
    from tinymlops.contracts.topics import FleetTopics
    from tinymlops.mqtt import MosquittoBroker

    private, public = generate_keypair()
    keyring = KeyRing({"bench": public})
    signer = ManifestSigner(private, "bench")
    topics = FleetTopics("bench")
    arena = measure_arena(model).smallest_working_bytes
    emulated_ms: dict[str, list[float]] = {"deploy": [], "load": []}
    simulated_ms: dict[str, list[float]] = {"deploy": [], "load": []}
    broker = MosquittoBroker().start()
    try:
        with tempfile.TemporaryDirectory(prefix="tinymlops-bench-fw-") as tmp:
            emulated = EmulatedDevice(
                "emu-bench", "bench", target, keyring, broker.address, state_dir=Path(tmp) / "emu",
                config=GatewayConfig(window_interval_s=None),
            )  # fmt: skip
            simulated = DeviceRuntime("sim-bench", "bench", target, keyring, broker.address, config=DeviceConfig())
            with emulated, simulated, ModelPublisher(broker.address, topics, signer) as publisher:
                gateway = emulated.gateway
                if gateway is None:
                    raise RuntimeError("the emulated device started without its gateway")
                for version in range(1, deployments + 1):

                    def is_active(status: DeviceStatus, version: int = version) -> bool:
                        return status.state == "active" and status.version == version

                    for device_id in ("emu-bench", "sim-bench"):
                        publisher.deploy(model, name="vibration-ae", version=version, target=target.name,
                                         dsp_spec=spec, threshold=1.0, arena_bytes=arena, device=device_id)  # fmt: skip
                    active = gateway.wait_for(is_active, 120)
                    sim = simulated.wait_for(is_active, 60)
                    emulated_ms["deploy"].append(active.latency_ms["deploy_ms"])
                    emulated_ms["load"].append(active.latency_ms["load_ms"])
                    simulated_ms["deploy"].append(sim.latency_ms["deploy_ms"])
                    simulated_ms["load"].append(sim.latency_ms["load_ms"])
    finally:
        broker.stop()
    return {
        "emulated_deploy_latency_ms_p50": round(statistics.median(emulated_ms["deploy"]), 1),
        "emulated_load_latency_ms_p50": round(statistics.median(emulated_ms["load"]), 3),
        "simulated_deploy_latency_ms_p50": round(statistics.median(simulated_ms["deploy"]), 1),
        "simulated_load_latency_ms_p50": round(statistics.median(simulated_ms["load"]), 3),
        "ota_deployments": deployments,
        "ota_model_bytes": len(model),
    }


def bench_firmware(settings: Settings, *, quick: bool) -> dict[str, Any]:
    """Measure the firmware on both emulated cores and compare it with the estimates and the simulated device.

    Args:
        settings: Sensor format and MCU target catalog.
        quick: Fewer OTA deployments.

    Returns:
        Flat figures (``m4_*``, ``m0_*``, ``reference_*``, ``estimated_*``, ``simulated_*``,
        ``emulated_*``), the targets and whether they were met, and the machine.

    Raises:
        ToolchainMissingError: The cross toolchain or QEMU is not installed.
        ConfigError: The MCU target catalog is missing or invalid.
    """
    from firmware import emulator, tinyrt

    catalog = load_catalog(settings.targets.catalog)
    emulator.find_toolchain()  # before minutes of model building: one line naming a missing tool
    nrf, stm, rp2040 = catalog["nrf52840"], catalog["stm32l4r5"], catalog["rp2040"]
    spec = _fitted_spec(settings)
    config = load_training_config(settings.training_config)
    ours = _int8_model(spec.n_features, config.hidden, config.seed)
    reference = _int8_model(_REFERENCE_FEATURES, REFERENCE_HIDDEN, config.seed)
    windows = measurement_window(spec)
    scale = FULL_SCALE_G / 32768.0

    m4 = emulator.measure("mps2-an386", ours, spec, windows, scale)
    m0 = emulator.measure("microbit", ours, spec, windows, scale, fixed_point=True)
    reference_inputs = np.random.default_rng(1).integers(-128, 128, (len(windows), _REFERENCE_FEATURES), dtype=np.int8)
    reference_m4 = emulator.measure("mps2-an386", reference, spec, windows, scale, model_inputs=reference_inputs)
    m4_images, m0_images = emulator.build_images("mps2-an386"), emulator.build_images("microbit")
    assert m4_images.device is not None, "device_main.c is part of the firmware"
    m4_device = emulator.image_size(m4_images.device)
    m0_bench = emulator.image_size(m0_images.bench)

    m4_dsp, m4_inference = m4.dsp_instructions_mean, m4.inference_instructions_mean
    m0_dsp_q15 = float(np.mean(m0.fixed_point_instructions))
    m0_dsp_f32, m0_inference = m0.dsp_instructions_mean, m0.inference_instructions_mean
    reference_instructions = reference_m4.inference_instructions_mean
    estimate = {name: validate_budget(ours, target, spec).latency for name, target in (("m4", nrf), ("m0", rp2040))}
    host_dsp_ms, host_inference_ms = _host_device_ms(ours, spec, windows, scale)
    rp2040_ms = _ms(m0_dsp_q15 + m0_inference, rp2040)
    figures: dict[str, Any] = {
        "quick": quick,
        "model_macs": count_macs(ours),
        "model_bytes": len(ours),
        "model_arena_bytes": tinyrt.arena_required(ours),
        "model_tflm_arena_bytes": measure_arena(ours).smallest_working_bytes,
        "m4_dsp_instructions": round(m4_dsp),
        "m4_inference_instructions": round(m4_inference),
        "m4_instructions_per_mac": round(m4_inference / count_macs(ours), 2),
        "m4_latency_ms_nrf52840": round(_ms(m4_dsp + m4_inference, nrf), 3),
        "m4_latency_ms_stm32l4r5": round(_ms(m4_dsp + m4_inference, stm), 3),
        "estimated_latency_ms_nrf52840": round(estimate["m4"].total_ms, 3),
        "m0_dsp_instructions": round(m0_dsp_q15),
        "m0_dsp_f32_instructions": round(m0_dsp_f32),
        "m0_inference_instructions": round(m0_inference),
        "m0_latency_ms_rp2040": round(rp2040_ms, 3),
        "m0_latency_ms_rp2040_f32_dsp": round(_ms(m0_dsp_f32 + m0_inference, rp2040), 3),
        "estimated_latency_ms_rp2040": round(estimate["m0"].total_ms, 3),
        "m4_image_flash_bytes": m4_device.flash_bytes,
        "m4_image_ram_bytes": m4_device.ram_bytes,
        "m0_image_flash_bytes": m0_bench.flash_bytes,
        "m0_image_ram_bytes": m0_bench.ram_bytes,
        "reference_model_macs": count_macs(reference),
        "reference_m4_inference_instructions": round(reference_instructions),
        "reference_m4_instructions_per_mac": round(reference_instructions / count_macs(reference), 2),
        "reference_m4_ms_at_120mhz": round(_ms(reference_instructions, stm), 3),
        "reference_published_ms": REFERENCE_PUBLISHED_MS,
        # what the published figure implies per instruction of our runtime (TFLM's reference kernels
        # execute more instructions per MAC, so this is an upper bound on our cycles per instruction)
        "reference_implied_cycles_per_instruction": round(
            REFERENCE_PUBLISHED_MS * 1e-3 * REFERENCE_PUBLISHED_CLOCK_HZ / reference_instructions, 2
        ),
        "simulated_host_dsp_ms": round(host_dsp_ms, 4),
        "simulated_host_inference_ms": round(host_inference_ms, 4),
        **bench_ota(ours, spec, nrf, 3 if quick else 8),
    }
    figures["targets_met"] = m4_dsp + m4_inference < M4_INSTRUCTION_TARGET and rp2040_ms <= rp2040.latency_budget_ms
    figures.update(machine_description())
    log.info(
        "firmware benchmark: M4F %d + %d instructions per window, RP2040 %.2f ms of %.0f ms: targets %s",
        round(m4_dsp),
        round(m4_inference),
        rp2040_ms,
        rp2040.latency_budget_ms,
        "met" if figures["targets_met"] else "missed",
    )
    return figures
