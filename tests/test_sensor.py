"""The virtual sensor's physics: defect frequencies, envelope spectra, shaft lines, drift, continuity."""

from __future__ import annotations

import time

import numpy as np
import pytest
from scipy import signal

from firmware.sensor import (
    BearingGeometry,
    DriftSpec,
    FaultSpec,
    MachineSimulator,
    OperatingPoint,
    SimulatorError,
    quantize,
)

FS = 25_600
N_WINDOWS = 16  # 16 x 1024 samples: 1.5625 Hz bins
SHAFT_HZ = 1797 / 60
GEOMETRY = BearingGeometry()


def run(sim: MachineSimulator, n_windows: int = N_WINDOWS) -> np.ndarray:
    return np.concatenate([sim.next_window() for _ in range(n_windows)])


def spectrum(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    centred = x - x.mean()
    return np.fft.rfftfreq(x.size, 1 / FS), np.abs(np.fft.rfft(centred * np.hanning(x.size)))


def envelope_spectrum(x: np.ndarray, resonance_hz: float) -> tuple[np.ndarray, np.ndarray]:
    """Hilbert envelope of the band around the resonance, then its spectrum."""
    sos = signal.butter(4, [resonance_hz - 1000, resonance_hz + 1000], "bandpass", fs=FS, output="sos")
    envelope = np.abs(signal.hilbert(signal.sosfiltfilt(sos, x)))
    return spectrum(envelope)


def line(freqs: np.ndarray, spec: np.ndarray, f_hz: float) -> float:
    """Largest magnitude within one bin of f_hz."""
    i = int(np.argmin(np.abs(freqs - f_hz)))
    return float(spec[i - 1 : i + 2].max())


def peak_to_median(freqs: np.ndarray, spec: np.ndarray, f_hz: float) -> float:
    return line(freqs, spec, f_hz) / float(np.median(spec[(freqs > 5) & (freqs < 1000)]))


DEFECT_HZ = {
    "inner_race": GEOMETRY.bpfi(SHAFT_HZ),
    "outer_race": GEOMETRY.bpfo(SHAFT_HZ),
    "ball": 2 * GEOMETRY.bsf(SHAFT_HZ),  # a ball defect strikes both races once per ball revolution
}


def test_defect_frequencies_match_cwru_readme() -> None:
    assert GEOMETRY.bpfi(SHAFT_HZ) == pytest.approx(162.2, abs=0.1)
    assert GEOMETRY.bpfo(SHAFT_HZ) == pytest.approx(107.4, abs=0.1)
    assert GEOMETRY.bsf(SHAFT_HZ) == pytest.approx(70.6, abs=0.1)
    assert GEOMETRY.ftf(SHAFT_HZ) == pytest.approx(11.9, abs=0.1)
    assert GEOMETRY.impact_hz("ball", SHAFT_HZ) == pytest.approx(2 * 70.6, abs=0.2)


@pytest.mark.parametrize("seed", [0, 7])
@pytest.mark.parametrize("kind", ["inner_race", "outer_race", "ball"])
def test_envelope_spectrum_of_a_bearing_defect_peaks_at_its_frequency(kind: str, seed: int) -> None:
    sim = MachineSimulator(seed)
    sim.inject_fault(FaultSpec(kind, severity=0.3))  # type: ignore[arg-type]
    freqs, spec = envelope_spectrum(run(sim), sim.resonance_hz)
    band = (freqs > 20) & (freqs < 400)
    bin_hz = freqs[1]
    assert abs(freqs[band][np.argmax(spec[band])] - DEFECT_HZ[kind]) <= bin_hz
    assert peak_to_median(freqs, spec, DEFECT_HZ[kind]) > 10
    if kind == "ball":  # the weaker inner-race strike leaves a line at BSF itself
        assert peak_to_median(freqs, spec, GEOMETRY.bsf(SHAFT_HZ)) > 5


@pytest.mark.parametrize("seed", [0, 7])
def test_healthy_envelope_spectrum_has_no_defect_peak(seed: int) -> None:
    sim = MachineSimulator(seed)
    freqs, spec = envelope_spectrum(run(sim), sim.resonance_hz)
    for f_hz in [*DEFECT_HZ.values(), GEOMETRY.bsf(SHAFT_HZ)]:
        assert peak_to_median(freqs, spec, f_hz) < 5


@pytest.mark.parametrize(("kind", "order"), [("imbalance", 1), ("misalignment", 2)])
def test_shaft_faults_raise_their_harmonic(kind: str, order: int) -> None:
    healthy, faulty = MachineSimulator(3), MachineSimulator(3)
    faulty.inject_fault(FaultSpec(kind, severity=0.5))  # type: ignore[arg-type]
    freqs, spec_h = spectrum(run(healthy))
    _, spec_f = spectrum(run(faulty))
    gain = {h: line(freqs, spec_f, h * SHAFT_HZ) / line(freqs, spec_h, h * SHAFT_HZ) for h in (1, 2)}
    assert gain[order] > 3
    assert gain[order] > 2 * gain[3 - order]


def one_x_line(sim: MachineSimulator) -> float:
    freqs, spec = spectrum(run(sim))
    band = (freqs > 5) & (freqs < 1.5 * sim.operating_point.rpm / 60 * 1.2)
    return float(freqs[band][np.argmax(spec[band])])


@pytest.mark.parametrize("rpm", [1200.0, 2400.0])
def test_changing_rpm_moves_the_1x_line(rpm: float) -> None:
    sim = MachineSimulator(5)
    run(sim, 2)
    sim.set_operating_point(OperatingPoint(rpm=rpm, load=0.8))
    assert abs(one_x_line(sim) - rpm / 60) <= FS / (N_WINDOWS * 1024)


def test_speed_drift_shifts_the_1x_line() -> None:
    sim = MachineSimulator(5, operating_point=OperatingPoint(rpm=1800, load=0.8))
    sim.add_drift(DriftSpec("speed", amount=0.2))
    assert abs(one_x_line(sim) - 1.2 * 30.0) <= FS / (N_WINDOWS * 1024)


def test_current_rpm_is_the_operating_point_times_the_speed_drift_of_the_next_window() -> None:
    sim = MachineSimulator(5, operating_point=OperatingPoint(rpm=1800, load=0.8))
    assert sim.current_rpm == 1800.0
    window_s = 1024 / FS
    sim.add_drift(DriftSpec("speed", amount=0.2, onset_s=2 * window_s, ramp_s=4 * window_s))
    readings = []
    for _ in range(8):
        readings.append(sim.current_rpm)  # read before the window, as a publisher does
        sim.next_window()
    # the ramp's value at each window's centre: 0 for the first two, then +0.05/window from half a step in
    expected = [1800.0, 1800.0, 1800 * 1.025, 1800 * 1.075, 1800 * 1.125, 1800 * 1.175, 1800 * 1.2, 1800 * 1.2]
    assert readings == pytest.approx(expected)
    sim.set_operating_point(OperatingPoint(rpm=900, load=0.5))
    assert sim.current_rpm == pytest.approx(900 * 1.2)


def test_gain_drift_scales_rms() -> None:
    plain, drifted = MachineSimulator(11), MachineSimulator(11)
    for sim in (plain, drifted):
        sim.inject_fault(FaultSpec("outer_race", 0.4))
    drifted.add_drift(DriftSpec("gain", amount=0.25))
    ratio = np.sqrt(np.mean(run(drifted) ** 2) / np.mean(run(plain) ** 2))
    assert ratio == pytest.approx(1.25, rel=1e-5)


def test_gain_drift_ramps_linearly() -> None:
    plain, drifted = MachineSimulator(2), MachineSimulator(2)
    drifted.add_drift(DriftSpec("gain", amount=1.0, onset_s=0.2, ramp_s=0.4))
    x, y = run(plain, 25), run(drifted, 25)  # 1.0 s
    t = np.arange(x.size) / FS
    expected = 1 + np.clip((t - 0.2) / 0.4, 0, 1)
    np.testing.assert_allclose(y, x * expected, rtol=1e-5, atol=1e-6)


def test_wear_raises_high_frequency_level() -> None:
    fresh, worn = MachineSimulator(4), MachineSimulator(4)
    worn.add_drift(DriftSpec("wear", amount=1.0))
    freqs, spec_fresh = spectrum(run(fresh))
    _, spec_worn = spectrum(run(worn))
    high = freqs > 2000
    assert np.sum(spec_worn[high] ** 2) > 3 * np.sum(spec_fresh[high] ** 2)
    low = (freqs > 10) & (freqs < 120)  # the shaft lines do not wear
    assert np.sum(spec_worn[low] ** 2) < 1.5 * np.sum(spec_fresh[low] ** 2)


def test_same_seed_reproduces_and_other_seed_differs() -> None:
    sims = [MachineSimulator(seed) for seed in (42, 42, 43)]
    for sim in sims:
        sim.inject_fault(FaultSpec("inner_race", 0.5))
        sim.add_drift(DriftSpec("wear", 0.3, ramp_s=0.1))
    a, b, c = (run(sim, 4) for sim in sims)
    np.testing.assert_array_equal(a, b)
    assert not np.allclose(a, c)
    assert sims[0].resonance_hz == sims[1].resonance_hz != sims[2].resonance_hz
    assert a.dtype == np.float32


def pure_harmonic(window_samples: int) -> MachineSimulator:
    sim = MachineSimulator(8, window_samples=window_samples, noise_g=0.0, roughness_g=0.0)
    sim.inject_fault(FaultSpec("misalignment", 0.6))
    return sim


def test_windows_are_one_continuous_signal() -> None:
    long = pure_harmonic(4096).next_window()
    short = run(pure_harmonic(1024), 4)
    np.testing.assert_allclose(short, long, atol=1e-6)


def test_rpm_change_keeps_phase_continuous() -> None:
    sim = pure_harmonic(1024)
    first = sim.next_window()
    sim.set_operating_point(OperatingPoint(rpm=2400, load=sim.operating_point.load))
    # every shaft line scales with speed squared: undo that, and the waveform must run on smoothly
    second = sim.next_window() * (1797 / 2400) ** 2
    max_step = max(np.abs(np.diff(first)).max(), np.abs(np.diff(second)).max())
    assert abs(second[0] - first[-1]) <= max_step
    assert np.abs(second - first).max() > 10 * max_step  # the frequency did change


def test_fault_appears_at_its_onset() -> None:
    healthy, faulty = MachineSimulator(9), MachineSimulator(9)
    faulty.inject_fault(FaultSpec("inner_race", 0.5, onset_s=0.2))
    x, y = run(healthy, 10), run(faulty, 10)  # 0.4 s
    onset = int(0.2 * FS)
    np.testing.assert_array_equal(x[:onset], y[:onset])
    assert np.sqrt(np.mean(y[onset:] ** 2)) > 1.5 * np.sqrt(np.mean(x[onset:] ** 2))


def test_clock_and_magnitudes() -> None:
    sim = MachineSimulator(1)
    x = run(sim, 5)
    assert sim.time_s == pytest.approx(5 * 1024 / FS)
    assert 0.05 <= float(np.sqrt(np.mean(x**2))) <= 0.3  # healthy RMS in g


def test_quantize_saturates_and_round_trips() -> None:
    x = np.array([0.0, 1.2345, -3.3, 15.9, 40.0, -40.0], dtype=np.float32)
    counts, scale = quantize(x, full_scale_g=16.0)
    assert counts.dtype == np.int16
    assert scale == pytest.approx(16.0 / 32767)
    assert counts[-2] == 32767 and counts[-1] == -32768
    assert np.all(np.abs(counts[:4] * scale - x[:4]) <= scale)
    window = MachineSimulator(0).next_window()
    counts, scale = quantize(window)
    assert np.abs(counts * scale - window).max() <= scale


def test_invalid_parameters_are_rejected() -> None:
    with pytest.raises(SimulatorError, match="severity"):
        FaultSpec("ball", 1.5)
    with pytest.raises(SimulatorError, match="unknown fault kind"):
        FaultSpec("rotor_bar", 0.5)  # type: ignore[arg-type]
    with pytest.raises(SimulatorError, match="load"):
        OperatingPoint(rpm=1800, load=2.0)
    with pytest.raises(SimulatorError, match="gain drift amount"):
        DriftSpec("gain", -1.0)
    with pytest.raises(SimulatorError, match="full scale"):
        quantize(np.zeros(4, dtype=np.float32), full_scale_g=0.0)


def test_one_window_costs_well_under_a_millisecond() -> None:
    """Measured about 0.1 ms healthy, 0.15 ms with a fault and two drifts (shared 2-core host)."""
    sim = MachineSimulator(0)
    sim.inject_fault(FaultSpec("ball", 0.5))
    sim.add_drift(DriftSpec("wear", 0.5, ramp_s=10.0))
    sim.add_drift(DriftSpec("speed", 0.05, ramp_s=10.0))
    run(sim, 10)
    costs = []
    for _ in range(200):
        start = time.perf_counter()
        sim.next_window()
        costs.append(time.perf_counter() - start)
    assert float(np.median(costs)) < 1e-3
