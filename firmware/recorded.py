"""A sensor that replays recorded vibration (for example the CWRU test rig) instead of simulating it.

It stands in for :class:`~firmware.sensor.MachineSimulator` wherever the fleet and the device
runtime use one: ``next_window()``, ``sample_rate_hz``, ``window_samples``, faults and drift, and
the recording's shaft speed as the tachometer value (``current_rpm``).
A fault switches the replay to the recording of that fault class; sensor-gain drift scales the
signal as the simulator does. Recordings are given already at the sensor's rate.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np
import numpy.typing as npt

from firmware.sensor import DriftSpec, FaultSpec, OperatingPoint, SimulatorError

Float32Array = npt.NDArray[np.float32]
NORMAL = "normal"


class RecordedMachine:
    """Replays contiguous windows of recorded vibration, looping, from a seeded start offset.

    Args:
        recordings: Signal in g per class (``normal`` and fault classes such as ``inner_race``).
        sample_rate_hz: Rate of the recordings (the fleet's sensor rate).
        window_samples: Samples per window.
        seed: Chooses where in each recording this machine starts, so machines differ.
        rpm: Shaft speed the recordings were made at (None: not known), reported as the tachometer value.
    """

    def __init__(
        self,
        recordings: Mapping[str, npt.ArrayLike],
        sample_rate_hz: int,
        window_samples: int,
        seed: int = 0,
        rpm: float | None = None,
    ) -> None:
        self._recordings = {name: np.asarray(x, dtype=np.float32).ravel() for name, x in recordings.items()}
        if NORMAL not in self._recordings:
            raise SimulatorError(f"a recorded machine needs a {NORMAL!r} recording, got {sorted(self._recordings)}")
        short = [name for name, x in self._recordings.items() if x.size < 2 * window_samples]
        if short:
            raise SimulatorError(f"recordings shorter than two windows: {', '.join(short)}")
        self.sample_rate_hz = sample_rate_hz
        self.window_samples = window_samples
        rng = np.random.default_rng(seed)
        self._position = {name: int(rng.integers(0, x.size - window_samples)) for name, x in self._recordings.items()}
        self._playing = NORMAL
        self._drifts: list[DriftSpec] = []
        self._n = 0
        self._rpm = rpm

    @property
    def current_rpm(self) -> float | None:
        """The speed the recordings were made at (a recording cannot change speed), None when not known."""
        return self._rpm

    @property
    def time_s(self) -> float:
        """Seconds of signal produced so far."""
        return self._n / self.sample_rate_hz

    def next_window(self) -> Float32Array:
        """The next window of the recording being played, in g, with the sensor gain drift applied."""
        signal = self._recordings[self._playing]
        start = self._position[self._playing]
        if start + self.window_samples > signal.size:
            start = 0
        window = signal[start : start + self.window_samples].copy()
        self._position[self._playing] = start + self.window_samples
        t = self.time_s + np.arange(self.window_samples) / self.sample_rate_hz
        gain = 1.0 + sum((d.level(t) for d in self._drifts), np.zeros(self.window_samples))
        self._n += self.window_samples
        return (window * gain).astype(np.float32)

    def inject_fault(self, fault: FaultSpec) -> None:
        """Replay the recording of this fault class from now on."""
        if fault.kind not in self._recordings:
            raise SimulatorError(f"no {fault.kind!r} recording to replay; recorded: {sorted(self._recordings)}")
        self._playing = fault.kind

    def clear_faults(self) -> None:
        """Replay the normal recording again."""
        self._playing = NORMAL

    def add_drift(self, drift: DriftSpec) -> None:
        """Apply sensor-gain drift (a recording cannot change its machine's speed or wear)."""
        if drift.kind != "gain":
            raise SimulatorError(f"a recorded machine supports gain drift only, not {drift.kind!r}")
        self._drifts.append(drift)

    def set_operating_point(self, operating_point: OperatingPoint) -> None:
        """A recording has the operating point it was recorded at."""
        raise SimulatorError(f"a recorded machine cannot change its operating point to {operating_point}")
