"""The deployment benchmark, quick: real Mosquitto, real TFLite Micro devices, bare paho beside them."""

from __future__ import annotations

import pytest

from tinymlops.bench_deploy import TARGET_P50_MS, bench_deploy
from tinymlops.settings import Settings

pytestmark = [pytest.mark.mqtt, pytest.mark.slow]


def test_quick_bench_deploy_figures_are_complete_and_sane(settings: Settings) -> None:
    figures = bench_deploy(settings, quick=True)
    assert 0 < figures["model_bytes"] < 32 * 1024 and figures["chunk_bytes"] == 1024
    assert figures["chunks"] == -(-figures["model_bytes"] // figures["chunk_bytes"])
    assert figures["deployments"] == 5
    p50, p95 = figures["deploy_latency_ms_p50"], figures["deploy_latency_ms_p95"]
    assert 0 < p50 <= p95 < 5_000
    # the device's own figures fit inside what the server measured end to end
    assert 0 < figures["load_latency_ms_p50"] < figures["device_deploy_latency_ms_p50"] <= p95 + 1
    assert 0 < figures["inference_latency_ms_p50"] < figures["device_deploy_latency_ms_p50"]
    # reported apart; not compared in time with the repeats: whether the first load probes the arena in a
    # subprocess depends on whether the server's reference outputs (same process) already did
    assert figures["load_latency_ms_first"] > 0
    for n in (1, 50, 200):
        assert figures[f"fleet_{n}_update_s"] > 0 and figures[f"bare_broker_fleet_{n}_s"] > 0
        assert figures[f"fleet_{n}_to_bare_ratio"] > 0
    ratio = figures["fleet_200_update_s"] / figures["bare_broker_fleet_200_s"]
    assert figures["fleet_200_to_bare_ratio"] == pytest.approx(ratio, rel=0.05)
    assert figures["fleet_200_update_s"] > figures["fleet_1_update_s"]
    targets = figures["targets_met"]
    assert targets[f"deploy_latency_p50_under_{TARGET_P50_MS:g}_ms"] == (p50 < TARGET_P50_MS)
    assert set(targets) == {
        "deploy_latency_p50_under_50_ms", "fleet_200_under_30_s", "fleet_200_within_3x_bare_broker",
    }  # fmt: skip
    assert figures["machine"]["cpus"] >= 1
