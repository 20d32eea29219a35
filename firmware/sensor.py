"""Virtual vibration sensor: the physics of a rotating machine on a rolling-element bearing.

One :class:`MachineSimulator` stands for one machine with an accelerometer. Its signal is built
from what a real rig shows, not white noise:

* shaft harmonics 1x/2x/3x whose amplitudes grow with load and speed; imbalance adds a strong
  1x, misalignment a strong 2x and some 3x;
* bearing defects as impulse trains at the kinematic defect frequencies (BPFO, BPFI, 2x BSF)
  that excite a lightly damped structural resonance (3-4 kHz), so every impact rings; inner-race
  impacts are amplitude-modulated by the shaft rotation (the defect passes through the load
  zone), ball impacts by the cage (FTF); impact times slip randomly by about 1% of a period;
* broadband Gaussian noise plus low-level resonance "roughness"; wear raises both, and both grow with
  speed (the machine's rolling, flow and windage noise over a constant sensor noise floor).

The shaft phase, the resonance filter state and impacts that fall past a window's end are kept
between windows, so consecutive windows form one continuous signal. Everything is vectorised:
one 1024-sample window costs about 0.1 ms, so hundreds of nodes run in real time in one process.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal, Protocol

import numpy as np
import numpy.typing as npt
from scipy import signal

from tinymlops.errors import TinyMLOpsError

FaultKind = Literal["inner_race", "outer_race", "ball", "imbalance", "misalignment"]
DriftKind = Literal["wear", "speed", "gain"]
FAULT_KINDS: tuple[str, ...] = ("inner_race", "outer_race", "ball", "imbalance", "misalignment")
DRIFT_KINDS: tuple[str, ...] = ("wear", "speed", "gain")
BEARING_FAULTS: tuple[str, ...] = ("inner_race", "outer_race", "ball")

Float32Array = npt.NDArray[np.float32]
Float64Array = npt.NDArray[np.float64]

_REF_SHAFT_HZ = 1797.0 / 60.0  # amplitudes below are calibrated at the CWRU rig's speed
_HEALTHY_HARMONICS_G = (0.06, 0.03, 0.015)  # 1x, 2x, 3x at full load and reference speed
_IMBALANCE_G = 0.5  # extra 1x at severity 1
_MISALIGNMENT_G = (0.08, 0.35, 0.12)  # extra 1x, 2x, 3x at severity 1
_IMPACT_G = 2.5  # peak of one impact's ringing at severity 1, full load, reference speed
_DAMPING = 0.05  # resonance damping ratio: impacts ring for about 1 ms
_SLIP = 0.01  # standard deviation of impact timing, fraction of the defect period
_IMPACT_SPREAD = 0.1  # standard deviation of impact strength, relative
_BALL_INNER_CONTACT = 0.5  # a ball defect hits the inner race weaker than the outer race
_WEAR_RESONANCE_GAIN = 3.0  # wear raises the resonance roughness this much faster than broadband
# Speed dependence of the healthy machine's broadband vibration (rolling, flow and windage noise grows with speed,
# the sensor's own noise does not): noise power = sensor share + machine share x speed^3, 1 at the reference speed.
# Roughness excitation of the rolling contact grows in proportion to speed. Without these, speed only moved
# three weak shaft lines and a model trained at one speed passed every other (real rigs flag 84-100 %).
_SENSOR_NOISE_POWER_SHARE = 0.1
_MACHINE_NOISE_SPEED_EXPONENT = 3.0


class SimulatorError(TinyMLOpsError):
    """A simulator parameter is out of range."""


@dataclass(frozen=True)
class BearingGeometry:
    """Rolling-element bearing geometry; the default is the SKF 6205-2RS of the CWRU drive end.

    Attributes:
        n_balls: Number of rolling elements.
        ball_diameter_mm: Ball diameter d.
        pitch_diameter_mm: Pitch diameter D.
        contact_angle_deg: Contact angle.

    """

    n_balls: int = 9
    ball_diameter_mm: float = 7.94
    pitch_diameter_mm: float = 39.04
    contact_angle_deg: float = 0.0

    def __post_init__(self) -> None:
        if self.n_balls < 3:
            raise SimulatorError(f"bearing needs at least 3 balls, got {self.n_balls}")
        if not 0 < self.ball_diameter_mm < self.pitch_diameter_mm:
            raise SimulatorError(
                f"ball diameter {self.ball_diameter_mm} mm must be in (0, pitch diameter {self.pitch_diameter_mm} mm)"
            )
        if not 0 <= self.contact_angle_deg < 90:
            raise SimulatorError(f"contact angle {self.contact_angle_deg} deg must be in [0, 90)")

    @property
    def _ratio(self) -> float:
        return self.ball_diameter_mm / self.pitch_diameter_mm * math.cos(math.radians(self.contact_angle_deg))

    def bpfo(self, shaft_hz: float) -> float:
        """Ball pass frequency, outer race: impacts per second on an outer-race defect."""
        return self.n_balls / 2 * shaft_hz * (1 - self._ratio)

    def bpfi(self, shaft_hz: float) -> float:
        """Ball pass frequency, inner race: impacts per second on an inner-race defect."""
        return self.n_balls / 2 * shaft_hz * (1 + self._ratio)

    def bsf(self, shaft_hz: float) -> float:
        """Ball spin frequency, (D/2d)(1-(d/D cos a)^2) f: CWRU's convention (70.6 Hz at 1797 rpm).

        A ball defect strikes both races once per ball revolution, so its impacts come at 2x BSF.
        """
        return self.pitch_diameter_mm / (2 * self.ball_diameter_mm) * shaft_hz * (1 - self._ratio**2)

    def ftf(self, shaft_hz: float) -> float:
        """Fundamental train (cage) frequency."""
        return shaft_hz / 2 * (1 - self._ratio)

    def impact_hz(self, kind: str, shaft_hz: float) -> float:
        """Impact rate of a bearing defect: BPFI, BPFO, or 2x BSF for a ball defect."""
        rates = {"inner_race": self.bpfi, "outer_race": self.bpfo, "ball": lambda f: 2 * self.bsf(f)}
        if kind not in rates:
            raise SimulatorError(f"{kind!r} is not a bearing defect, expected one of {BEARING_FAULTS}")
        return rates[kind](shaft_hz)


@dataclass(frozen=True)
class OperatingPoint:
    """Shaft speed and load.

    Attributes:
        rpm: Shaft speed in revolutions per minute.
        load: Load as a fraction of rated, 0..1.

    """

    rpm: float
    load: float

    def __post_init__(self) -> None:
        if not 0 < self.rpm <= 60_000:
            raise SimulatorError(f"rpm {self.rpm} must be in (0, 60000]")
        if not 0 <= self.load <= 1:
            raise SimulatorError(f"load {self.load} must be in [0, 1]")


@dataclass(frozen=True)
class FaultSpec:
    """A machine fault that appears at ``onset_s`` (simulator time) and stays.

    Attributes:
        kind: Bearing defect (inner_race, outer_race, ball) or shaft fault (imbalance, misalignment).
        severity: 0 (none) .. 1 (severe).
        onset_s: Simulator time the fault appears.

    """

    kind: FaultKind
    severity: float
    onset_s: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in FAULT_KINDS:
            raise SimulatorError(f"unknown fault kind {self.kind!r}, expected one of {FAULT_KINDS}")
        if not 0 <= self.severity <= 1:
            raise SimulatorError(f"fault severity {self.severity} must be in [0, 1]")
        if self.onset_s < 0:
            raise SimulatorError(f"fault onset {self.onset_s} s must be >= 0")


@dataclass(frozen=True)
class DriftSpec:
    """A slow change of the machine or sensor, ramping linearly from ``onset_s`` over ``ramp_s``.

    Attributes:
        kind: ``wear`` raises broadband noise by (1 + amount) and the resonance roughness faster;
            ``speed`` shifts the shaft speed by ``amount`` (fraction); ``gain`` multiplies the
            sensor gain by (1 + amount).
        amount: Size of the drift once fully ramped in.
        onset_s: Simulator time the drift starts.
        ramp_s: Duration of the linear ramp; 0 is a step.

    """

    kind: DriftKind
    amount: float
    onset_s: float = 0.0
    ramp_s: float = 0.0

    def __post_init__(self) -> None:
        if self.kind not in DRIFT_KINDS:
            raise SimulatorError(f"unknown drift kind {self.kind!r}, expected one of {DRIFT_KINDS}")
        if self.kind == "wear" and self.amount < 0:
            raise SimulatorError(f"wear drift amount {self.amount} must be >= 0")
        if self.amount <= -1:
            raise SimulatorError(f"{self.kind} drift amount {self.amount} must be > -1")
        if self.onset_s < 0 or self.ramp_s < 0:
            raise SimulatorError(f"drift onset {self.onset_s} s and ramp {self.ramp_s} s must be >= 0")

    def level(self, t_s: Float64Array) -> Float64Array:
        """Drift amount in effect at each time."""
        if self.ramp_s == 0:
            return np.where(t_s >= self.onset_s, self.amount, 0.0)
        return self.amount * np.clip((t_s - self.onset_s) / self.ramp_s, 0.0, 1.0)


def _broadband_gain(speed: float) -> float:
    """Broadband noise amplitude relative to the reference speed (speed = shaft speed / reference)."""
    share = _SENSOR_NOISE_POWER_SHARE
    return math.sqrt(share + (1 - share) * speed**_MACHINE_NOISE_SPEED_EXPONENT)


def quantize(x: Float32Array, full_scale_g: float = 16.0) -> tuple[npt.NDArray[np.int16], float]:
    """Convert a window in g to int16 counts as the sensor's ADC does, saturating at full scale.

    Args:
        x: Samples in g.
        full_scale_g: The value that maps to 32767 counts.

    Returns:
        The int16 samples and the scale (g per count, full_scale_g / 32767).

    """
    if not full_scale_g > 0:
        raise SimulatorError(f"full scale {full_scale_g} g must be > 0")
    scale = full_scale_g / 32767
    counts = np.clip(np.rint(np.asarray(x, dtype=np.float64) / scale), -32768, 32767)
    return counts.astype(np.int16), scale


class VibrationSource(Protocol):
    """What a sensor node or device needs from its machine: windows, faults and drift."""

    sample_rate_hz: int
    window_samples: int

    def next_window(self) -> Float32Array:
        """The next window in g."""
        ...

    def inject_fault(self, fault: FaultSpec) -> None:
        """Make the machine faulty."""
        ...

    def add_drift(self, drift: DriftSpec) -> None:
        """Make the machine or its sensor drift."""
        ...

    def set_operating_point(self, operating_point: OperatingPoint) -> None:
        """Change speed and load."""
        ...

    @property
    def current_rpm(self) -> float | None:
        """The shaft speed a tachometer reports for the next window (None: the source cannot know it)."""
        ...


class MachineSimulator:
    """One machine with an accelerometer, producing contiguous windows in g.

    Args:
        seed: Seeds this machine's own random generator (its resonance, phases and noise).
        sample_rate_hz: Sensor sampling rate.
        window_samples: Samples per window.
        operating_point: Initial speed and load; default 1797 rpm at half load.
        geometry: Bearing geometry.
        resonance_hz: Structural resonance the bearing impacts excite; default drawn in
            [3000, 4000) Hz from the seed.
        noise_g: Standard deviation of the broadband noise.
        roughness_g: Standard deviation of the resonance's response to bearing surface roughness.

    """

    def __init__(
        self,
        seed: int,
        sample_rate_hz: int = 25_600,
        window_samples: int = 1024,
        operating_point: OperatingPoint | None = None,
        geometry: BearingGeometry | None = None,
        resonance_hz: float | None = None,
        noise_g: float = 0.05,
        roughness_g: float = 0.03,
    ) -> None:
        if sample_rate_hz <= 0 or window_samples <= 0:
            raise SimulatorError(f"sample rate {sample_rate_hz} Hz and window {window_samples} must be > 0")
        if noise_g < 0 or roughness_g < 0:
            raise SimulatorError(f"noise {noise_g} g and roughness {roughness_g} g must be >= 0")
        self._rng = np.random.default_rng(seed)
        self.sample_rate_hz = sample_rate_hz
        self.window_samples = window_samples
        self.geometry = geometry or BearingGeometry()
        self.operating_point = operating_point or OperatingPoint(rpm=1797.0, load=0.5)
        self.resonance_hz = float(self._rng.uniform(3000.0, 4000.0) if resonance_hz is None else resonance_hz)
        if not 0 < self.resonance_hz < 0.45 * sample_rate_hz:
            raise SimulatorError(f"resonance {self.resonance_hz} Hz must be in (0, {0.45 * sample_rate_hz}) Hz")
        self.noise_g = noise_g
        self.roughness_g = roughness_g
        # machine-to-machine spread of the healthy harmonics, and their phases
        self._harmonic_spread = self._rng.uniform(0.8, 1.2, size=3)
        self._harmonic_phase = self._rng.uniform(0, 2 * np.pi, size=3)
        self._load_zone_phase = float(self._rng.uniform(0, 2 * np.pi))
        self._b, self._a, self._roughness_gain = self._resonator()
        self._zi = np.zeros(2)
        self._n = 0  # samples produced so far: the clock
        self._shaft_cycles = 0.0  # shaft phase in revolutions at the next sample, never wrapped
        self._pending_pos = np.zeros(0)  # impacts delayed past the last window, in samples from its end
        self._pending_amp = np.zeros(0)
        self._faults: list[FaultSpec] = []
        self._drifts: list[DriftSpec] = []

    def _resonator(self) -> tuple[Float64Array, Float64Array, float]:
        """Two-pole resonator whose unit-impulse response peaks near 1, and its white-noise gain."""
        w_n = 2 * np.pi * self.resonance_hz / self.sample_rate_hz
        r = math.exp(-_DAMPING * w_n)
        theta = w_n * math.sqrt(1 - _DAMPING**2)
        b = np.array([math.sin(theta)])
        a = np.array([1.0, -2 * r * math.cos(theta), r * r])
        impulse = np.zeros(4096)
        impulse[0] = 1.0
        gain = float(np.sqrt(np.sum(signal.lfilter(b, a, impulse) ** 2)))
        return b, a, gain

    @property
    def time_s(self) -> float:
        """Simulator time of the next sample, in seconds."""
        return self._n / self.sample_rate_hz

    @property
    def faults(self) -> tuple[FaultSpec, ...]:
        """Faults injected so far."""
        return tuple(self._faults)

    @property
    def drifts(self) -> tuple[DriftSpec, ...]:
        """Drifts added so far."""
        return tuple(self._drifts)

    @property
    def current_rpm(self) -> float:
        """The shaft speed of the next window, as a tachometer reports it: read it before :meth:`next_window`.

        The operating point's rpm times the speed drift in effect at the window's centre (a linear
        ramp's mean over the window), so it follows ``set_operating_point`` and ``speed`` drift alike.
        """
        centre_s = np.asarray([(self._n + self.window_samples / 2) / self.sample_rate_hz])
        return float(self.operating_point.rpm * (1 + np.sum(self._drift_level("speed", centre_s))))

    def set_operating_point(self, operating_point: OperatingPoint) -> None:
        """Change speed and load from the next window on; the shaft phase stays continuous."""
        self.operating_point = operating_point

    def inject_fault(self, fault: FaultSpec) -> None:
        """Add a fault; it shows from its onset time on."""
        self._faults.append(fault)

    def add_drift(self, drift: DriftSpec) -> None:
        """Add a drift; it ramps in from its onset time on."""
        self._drifts.append(drift)

    def clear_faults(self) -> None:
        """Remove every fault (a repaired machine); drifts stay."""
        self._faults.clear()

    def _drift_level(self, kind: str, t_s: Float64Array) -> Float64Array | float:
        levels = [d.level(t_s) for d in self._drifts if d.kind == kind]
        return np.sum(levels, axis=0) if levels else 0.0

    def next_window(self) -> Float32Array:
        """Produce the next window of acceleration in g and advance the clock by its duration."""
        n, fs = self.window_samples, self.sample_rate_hz
        t = (self._n + np.arange(n)) / fs
        shaft_hz = self.operating_point.rpm / 60 * (1 + self._drift_level("speed", t))
        # shaft revolutions at every sample and one past the end, integrated so speed changes keep phase
        cycles = np.empty(n + 1)
        cycles[0] = 0.0
        np.cumsum(np.broadcast_to(shaft_hz, (n,)) / fs, out=cycles[1:])
        cycles += self._shaft_cycles
        mean_hz = (cycles[-1] - cycles[0]) * fs / n
        speed = mean_hz / _REF_SHAFT_HZ
        load = self.operating_point.load

        x = self._harmonics(t, cycles[:-1], speed, load)
        excitation = self._impacts(cycles, mean_hz, speed, load)
        wear = self._drift_level("wear", t)
        roughness = self._rng.standard_normal(n) * (self.roughness_g / self._roughness_gain) * speed
        excitation += roughness * (1 + _WEAR_RESONANCE_GAIN * wear)
        ringing, self._zi = signal.lfilter(self._b, self._a, excitation, zi=self._zi)
        x += ringing
        x += self._rng.standard_normal(n) * self.noise_g * _broadband_gain(speed) * (1 + wear)
        x *= 1 + self._drift_level("gain", t)

        self._n += n
        self._shaft_cycles = float(cycles[-1])
        return x.astype(np.float32)

    def _harmonics(self, t: Float64Array, cycles: Float64Array, speed: float, load: float) -> Float64Array:
        """Shaft 1x/2x/3x lines: residual imbalance and misalignment plus faults, with onset steps."""
        base = np.asarray(_HEALTHY_HARMONICS_G) * self._harmonic_spread * (0.4 + 0.6 * load) * speed**2
        amps = np.broadcast_to(base[:, None], (3, t.size))
        for fault in self._faults:
            if fault.kind == "imbalance":
                extra = np.array([_IMBALANCE_G * speed**2, 0.0, 0.0])
            elif fault.kind == "misalignment":
                extra = np.asarray(_MISALIGNMENT_G) * (0.4 + 0.6 * load) * speed**2
            else:
                continue
            amps = amps + extra[:, None] * fault.severity * (t >= fault.onset_s)
        phases = 2 * np.pi * np.arange(1, 4)[:, None] * cycles[None, :] + self._harmonic_phase[:, None]
        result: Float64Array = np.sum(amps * np.cos(phases), axis=0)
        return result

    def _impacts(self, cycles: Float64Array, mean_hz: float, speed: float, load: float) -> Float64Array:
        """Bearing impacts of this window as an impulse sequence (the resonance turns it into ringing)."""
        n, fs = self.window_samples, self.sample_rate_hz
        positions, amplitudes = [self._pending_pos], [self._pending_amp]
        for fault in self._faults:
            if fault.kind not in BEARING_FAULTS:
                continue
            ratio = self.geometry.impact_hz(fault.kind, 1.0)
            # impacts happen when the defect phase (ratio x shaft revolutions) crosses an integer
            k = np.arange(math.floor(ratio * cycles[0]) + 1, math.floor(ratio * cycles[-1]) + 1)
            pos = np.interp(k / ratio, cycles, np.arange(n + 1.0))
            keep = (self._n + pos) / fs >= fault.onset_s
            k, pos = k[keep], pos[keep]
            if not k.size:
                continue
            at = k / ratio  # shaft revolutions at each impact
            if fault.kind == "inner_race":
                modulation = 0.6 + 0.4 * np.cos(2 * np.pi * at + self._load_zone_phase)
            elif fault.kind == "ball":
                cage = self.geometry.ftf(1.0) * at
                modulation = (0.6 + 0.4 * np.cos(2 * np.pi * cage)) * np.where(k % 2 == 0, 1.0, _BALL_INNER_CONTACT)
            else:
                modulation = np.ones(k.size)
            # slip: a random delay of 0..6 sigma (a constant 3 sigma lag is invisible), never early
            period = fs / (ratio * mean_hz)
            delay = (np.clip(self._rng.standard_normal(k.size), -3, 3) + 3) * _SLIP * period
            spread = 1 + _IMPACT_SPREAD * self._rng.standard_normal(k.size)
            positions.append(pos + delay)
            amplitudes.append(_IMPACT_G * fault.severity * (0.6 + 0.4 * load) * speed * modulation * spread)
        pos_all, amp_all = np.concatenate(positions), np.concatenate(amplitudes)
        index = np.rint(pos_all).astype(np.int64)
        now = index < n
        self._pending_pos, self._pending_amp = pos_all[~now] - n, amp_all[~now]
        return np.bincount(index[now], weights=amp_all[now], minlength=n).astype(np.float64)
