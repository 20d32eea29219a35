"""A recorded machine replays real vibration through the same interface as the simulator."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from firmware.recorded import RecordedMachine
from firmware.sensor import DriftSpec, FaultSpec, OperatingPoint, SimulatorError
from tasks.importers import load_cwru_recordings


def recordings() -> dict[str, np.ndarray]:
    t = np.arange(20_000)
    return {"normal": np.sin(t / 10.0), "inner_race": 5 * np.sin(t / 3.0)}


def test_replays_contiguous_windows_and_switches_on_a_fault() -> None:
    machine = RecordedMachine(recordings(), 25_600, 1024, seed=3)
    first, second = machine.next_window(), machine.next_window()
    normal = recordings()["normal"].astype(np.float32)
    start = int(np.flatnonzero(np.isclose(normal, first[0]) & np.isclose(np.roll(normal, -1), first[1]))[0])
    assert np.allclose(np.concatenate([first, second]), normal[start : start + 2048])
    machine.inject_fault(FaultSpec(kind="inner_race", severity=0.5))
    assert np.abs(machine.next_window()).max() > 4
    machine.clear_faults()
    assert np.abs(machine.next_window()).max() <= 1.0


def test_gain_drift_scales_the_signal_and_other_changes_are_refused() -> None:
    plain = RecordedMachine(recordings(), 25_600, 1024, seed=1)
    drifted = RecordedMachine(recordings(), 25_600, 1024, seed=1)
    drifted.add_drift(DriftSpec(kind="gain", amount=0.3))
    assert np.allclose(drifted.next_window(), 1.3 * plain.next_window(), atol=1e-6)
    with pytest.raises(SimulatorError, match="gain drift only"):
        drifted.add_drift(DriftSpec(kind="speed", amount=0.1))
    with pytest.raises(SimulatorError, match="no 'ball' recording"):
        drifted.inject_fault(FaultSpec(kind="ball", severity=0.5))
    with pytest.raises(SimulatorError, match="operating point"):
        drifted.set_operating_point(OperatingPoint(rpm=1500, load=0.5))


def test_the_tachometer_value_is_the_speed_the_recording_was_made_at() -> None:
    assert RecordedMachine(recordings(), 25_600, 1024).current_rpm is None  # not known unless given
    machine = RecordedMachine(recordings(), 25_600, 1024, rpm=1797.0)
    machine.inject_fault(FaultSpec(kind="inner_race", severity=0.5))
    machine.next_window()
    assert machine.current_rpm == 1797.0


@pytest.mark.realdata
def test_cwru_recordings_replay_at_the_sensor_rate(cwru_dir: Path) -> None:
    recorded = load_cwru_recordings(cwru_dir, target_rate_hz=25_600)
    assert set(recorded) == {"normal", "inner_race", "outer_race", "ball"}
    assert recorded["normal"].size == pytest.approx(243_938 * 8 / 15, abs=2)
    machine = RecordedMachine(recorded, 25_600, 1024)
    window = machine.next_window()
    assert window.shape == (1024,) and 0.01 < float(np.sqrt(np.mean(window**2))) < 1.0
