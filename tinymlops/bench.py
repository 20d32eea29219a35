"""Benchmarks: each figure is measured beside a baseline in the same run, and reported as a ratio.

Like the CLI, this module is part of the application layer on top of flows and tasks.
"""

from __future__ import annotations

import json
import logging
import platform
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from firmware.codec import encode
from firmware.fleet import VirtualFleet
from tasks.ingest import IngestConfig, ensure_subscription, run_ingest
from tinymlops.contracts.topics import FleetTopics
from tinymlops.mqtt import BrokerAddress, MosquittoBroker, connect, make_client
from tinymlops.settings import Settings

log = logging.getLogger(__name__)


def machine_description() -> dict[str, Any]:
    """Describe the machine the figures were measured on."""
    import os

    return {
        "machine": platform.machine(),
        "processor": platform.processor() or platform.machine(),
        "cpus": os.cpu_count(),
        "python": platform.python_version(),
        "system": f"{platform.system()} {platform.release()}",
    }


def _drain_raw(address: BrokerAddress, client_id: str, topic: str, expected: int, timeout_s: float) -> float:
    """Time a bare paho subscriber (auto-ack) receiving ``expected`` queued messages."""
    done = threading.Event()
    count = 0

    def on_message(*_args: Any) -> None:
        nonlocal count
        count += 1
        if count >= expected:
            done.set()

    client = make_client(address, client_id, clean_session=False)
    client.on_message = on_message
    start = time.perf_counter()
    connect(client, address)
    client.subscribe(topic, qos=1)
    finished = done.wait(timeout_s)
    elapsed = time.perf_counter() - start
    client.disconnect()
    client.loop_stop()
    if not finished:
        raise RuntimeError(f"bare subscriber received {count} of {expected} messages in {timeout_s:.0f} s")
    return elapsed


def _publish(address: BrokerAddress, payloads: list[tuple[str, bytes]]) -> None:
    client = make_client(address, "bench-publisher")
    connect(client, address)
    infos = [client.publish(t, p, qos=1) for t, p in payloads]
    for info in infos:
        info.wait_for_publish(timeout=120)
    client.disconnect()
    client.loop_stop()


def bench_ingest(settings: Settings, *, quick: bool = False) -> dict[str, Any]:
    """Measure ingest throughput (MQTT -> validated -> Parquet lake) against a bare subscriber.

    A fleet of 40 simulated sensors publishes windows at QoS 1 into two persistent sessions on a
    Mosquitto broker: one for the ingest, one for a bare paho subscriber. Each consumer then
    drains the same queued stream on its own, timed from connect to the last message handled.

    Args:
        settings: Sensor format and ingest batching.
        quick: A reduced run (CI).

    Returns:
        Figures: samples per second for both, their ratio, and the run's size.
    """
    n_devices, per_device = (40, 25) if quick else (40, 500)
    fleet = VirtualFleet(
        "bench", n_devices, sample_rate_hz=settings.sensor.sample_rate_hz, window_samples=settings.sensor.window_samples
    )
    payloads = []
    for _ in range(per_device):
        now_us = time.time_ns() // 1000
        payloads += [(node.topic, encode(node.next_window(now_us))) for node in fleet.nodes]
    total = len(payloads)
    samples = total * settings.sensor.window_samples
    broker = MosquittoBroker().start()
    try:
        with tempfile.TemporaryDirectory(prefix="tinymlops-bench-") as tmp:
            root = Path(tmp)
            config = IngestConfig(
                fleet="bench",
                lake_root=root / "lake",
                quarantine_root=root / "quarantine",
                sensor=settings.sensor,
                mqtt=settings.mqtt.model_copy(update={"client_id": "bench-ingest"}),
                batch_windows=settings.ingest.batch_windows,
                flush_interval_s=settings.ingest.flush_interval_s,
            )
            topic = FleetTopics("bench", settings.mqtt.topic_root).all_devices("vibration")
            ensure_subscription(broker.address, config)
            raw_session = make_client(broker.address, "bench-raw", clean_session=False)
            connect(raw_session, broker.address)
            raw_session.subscribe(topic, qos=1)
            time.sleep(0.2)
            raw_session.disconnect()
            raw_session.loop_stop()
            _publish(broker.address, payloads)

            raw_s = _drain_raw(broker.address, "bench-raw", topic, total, timeout_s=600)
            start = time.perf_counter()
            stats = run_ingest(broker.address, config, max_windows=total, seconds=600)
            ingest_s = time.perf_counter() - start
            if stats.accepted != total:
                raise RuntimeError(f"ingest accepted {stats.accepted} of {total} windows")
    finally:
        broker.stop()
    ingest_rate = samples / ingest_s
    raw_rate = samples / raw_s
    return {
        "ingest_samples_per_s": round(ingest_rate),
        "raw_subscriber_samples_per_s": round(raw_rate),
        "ingest_to_raw_ratio": round(ingest_rate / raw_rate, 3),
        "ingest_windows": total,
        "ingest_files_written": stats.files_written,
        "window_samples": settings.sensor.window_samples,
        "sensors_at_sensor_rate": round(ingest_rate / settings.sensor.sample_rate_hz, 1),
    }


# (figure key, what it is, target) for the README's table; the values come from bench/results.json.
README_FIGURES: tuple[tuple[str, str, str], ...] = (
    ("ingest_samples_per_s", "ingest MQTT -> validated -> Parquet lake, samples/s", ">= 1,000,000"),
    ("raw_subscriber_samples_per_s", "bare paho subscriber draining the same stream, samples/s", "baseline"),
    ("ingest_to_raw_ratio", "ingest / bare subscriber", ">= 0.5"),
    ("int8_model_bytes", "deployed int8 model, bytes", ""),
    ("reference_int8_model_bytes", "MLPerf Tiny AD reference int8, bytes", "baseline"),
    ("bytes_ratio", "reference / ours, bytes", ">= 10"),
    ("macs", "MACs per inference (ours)", ""),
    ("macs_ratio", "reference / ours, MACs", ">= 10"),
    ("tflm_arena_bytes", "TFLite Micro tensor arena, bytes (measured)", ""),
    ("auc_float", "ROC-AUC on CWRU, float", ""),
    ("auc_int8", "ROC-AUC on CWRU, int8 TFLite", ">= 0.99"),
    ("auc_tflm", "ROC-AUC on CWRU, int8 TFLite Micro", ">= 0.99"),
    ("reference_auc_int8", "ROC-AUC on CWRU, reference int8", "<= ours"),
    ("train_flow_s", "wall time of a full train flow, s", ""),
    ("far_other_speed_single", "false alarms, model of one speed (1,200 rpm) at other speeds", "the problem"),
    ("far_unseen_speed_fixed", "false alarms at unseen speeds in 900-1,500 rpm, fixed-frequency features", ""),
    ("far_unseen_speed_fixed_upper", "the same, 95 % upper bound", "<= 0.01"),
    ("far_unseen_speed_aware", "false alarms at unseen speeds in 900-1,500 rpm, speed-aware features", ""),
    ("far_unseen_speed_aware_upper", "the same, 95 % upper bound", "<= 0.01"),
    ("det_severity_0.2_speed_fixed", "detection of severity-0.2 bearing faults, worst speed, fixed", ""),
    ("det_severity_0.2_speed_aware", "the same, speed-aware", ">= fixed"),
    ("det_smallest_fault_speed_fixed", "detection of the smallest seeded fault (0.4), worst speed, fixed", ""),
    ("det_smallest_fault_speed_aware", "the same, speed-aware", ">= 0.95"),
    ("deploy_latency_ms_p50", "deployment latency p50 (manifest -> active), ms", "< 50"),
    ("deploy_latency_ms_p95", "deployment latency p95, ms", ""),
    ("load_latency_ms_p50", "loading latency p50 (device), ms", ""),
    ("inference_latency_ms_p50", "inference latency p50 (device), ms", ""),
    ("fleet_1000_update_s", "update 1,000 devices, s", "< 30"),
    ("bare_broker_fleet_1000_s", "bare broker delivering the same bytes to 1,000, s", "baseline"),
    ("fleet_1000_to_bare_ratio", "fleet update / bare broker", "<= 3"),
    ("drift_onset_to_event_s", "drift onset -> drift event, s", ""),
    ("drift_event_to_active_s", "drift event -> retrained model active on every device, s", "< 120"),
    ("m4_dsp_instructions", "firmware on QEMU Cortex-M4F: DSP front end, instructions per window", ""),
    ("m4_inference_instructions", "firmware on QEMU Cortex-M4F: one inference (int8 runtime), instructions", ""),
    ("m4_latency_ms_nrf52840", "nRF52840 (64 MHz) DSP + inference from the counts, ms", "< 20"),
    ("estimated_latency_ms_nrf52840", "nRF52840 cycles-per-MAC estimate, ms", "baseline"),
    ("m0_dsp_instructions", "firmware on QEMU Cortex-M0: q15 DSP front end, instructions per window", ""),
    ("m0_dsp_f32_instructions", "firmware on QEMU Cortex-M0: float DSP on software float, instructions", "baseline"),
    ("m0_inference_instructions", "firmware on QEMU Cortex-M0: one inference, instructions", ""),
    ("m0_latency_ms_rp2040", "RP2040 (133 MHz) q15 DSP + inference from the counts, ms", "< 20"),
    ("m0_latency_ms_rp2040_f32_dsp", "RP2040 with the float DSP, ms", "baseline"),
    ("m4_image_flash_bytes", "device image (M4F) flash, bytes", ""),
    ("m4_image_ram_bytes", "device image (M4F) static RAM with two 48 KiB arenas, bytes", ""),
    ("reference_m4_inference_instructions", "MLPerf AD reference in our runtime on the M4F, instructions", ""),
    ("reference_m4_ms_at_120mhz", "the same at 120 MHz from the counts, ms", "published 10.05"),
    ("emulated_deploy_latency_ms_p50", "OTA into the emulated device via UART gateway, p50 ms", ""),
    ("simulated_deploy_latency_ms_p50", "the same into a simulated device, p50 ms", "baseline"),
)


def bench_table_markdown(figures: dict[str, Any]) -> str:
    """The README's benchmark table, made from a ``bench/results.json``."""

    def shown(value: Any) -> str:
        if isinstance(value, float):
            return f"{value:,.3f}" if abs(value) < 100 else f"{value:,.0f}"
        return f"{value:,}" if isinstance(value, int) else str(value)

    lines = ["| figure | value | target |", "|---|---|---|"]
    lines += [
        f"| {text} (`{key}`) | {shown(figures.get(key, 'not measured'))} | {target} |"
        for key, text, target in README_FIGURES
    ]
    machine = f"{figures.get('cpus')} CPUs, {figures.get('processor')}, {figures.get('system')}"
    lines += ["", f"Measured on {machine}, Python {figures.get('python')}; `quick` = {figures.get('quick')}."]
    return "\n".join(lines) + "\n"


README_BENCH_START, README_BENCH_END = "<!-- bench-table:start -->\n", "<!-- bench-table:end -->"


def render_readme_table(results: Path, readme: Path) -> None:
    """Rewrite the README's benchmark table (between its markers) from a results file."""
    figures = json.loads(results.read_text())
    text = readme.read_text()
    start = text.index(README_BENCH_START) + len(README_BENCH_START)
    readme.write_text(text[:start] + bench_table_markdown(figures) + text[text.index(README_BENCH_END) :])
