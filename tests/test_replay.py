"""``tinymlops replay``: a user's recording enters the fleet as a live sensor's stream."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from scipy.signal import resample_poly

from tasks.ingest import ensure_subscription, run_ingest
from tasks.lake import read_windows
from tests.conftest import cli_env
from tests.test_ingest import config_for
from tinymlops.mqtt import MosquittoBroker

pytestmark = pytest.mark.mqtt


def test_a_recording_replayed_as_a_device_is_ingested_as_its_live_windows(
    tmp_path: Path, mosquitto: MosquittoBroker
) -> None:
    config = config_for(tmp_path)  # fleet f1, 25.6 kHz
    ensure_subscription(mosquitto.address, config)
    rng = np.random.default_rng(4)
    recording = 3.0 * np.sin(2 * np.pi * 160 * np.arange(48_000) / 48_000) + rng.normal(0, 0.2, 48_000)
    path = tmp_path / "motor.npz"
    np.savez(path, accel=recording, fs=np.float64(48_000))  # 1 s at 48 kHz: 25 windows at 25.6 kHz

    args = [sys.executable, "-m", "tinymlops", "replay", str(path), "--device", "motor-7", "--fleet", "f1",
            "--speed", "0", "--broker", mosquitto.address.url, "--rpm", "1450"]  # fmt: skip
    result = subprocess.run(args, env=cli_env(tmp_path / "data"), capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "replayed 25 windows" in result.stdout

    stats = run_ingest(mosquitto.address, config, seconds=30, max_windows=25)
    assert stats.accepted == 25
    lake = read_windows(tmp_path / "lake", fleet="f1", devices=["motor-7"])
    assert sorted(lake.seq.tolist()) == list(range(25)) and set(lake.source) == {"mqtt"}
    assert set(lake.rpm.tolist()) == {1450.0}  # the tachometer value on the wire, kept by the ingest
    expected = resample_poly(recording, 8, 15)[: 25 * 1024].reshape(25, 1024)
    stored = lake.samples[np.argsort(lake.seq)]
    step = 16.0 / 32767  # the sensor range: 16 g (the recording's peak is ~3.8 g)
    assert np.max(np.abs(stored - expected)) <= step / 2 + 1e-6

    bad = subprocess.run([*args[:6], "no/such"], env=cli_env(tmp_path / "data"), capture_output=True, text=True)
    assert (
        bad.returncode == 1
        and bad.stderr.strip() == "error: invalid device id 'no/such': expected 1-64 characters of A-Z a-z 0-9 _ -"
    )
