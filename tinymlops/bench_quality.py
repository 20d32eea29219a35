"""Quality benchmark: false alarms at unseen shaft speeds and detection of the smallest faults.

A fleet of simulated machines (firmware.sensor, speed-dependent physics) is trained across a range
of operating speeds, then judged on healthy windows at speeds it never saw (between the trained
ones) and on seeded inner- and outer-race faults of growing severity at every speed. The same
windows go through the project's own training pipeline twice, side by side: with today's
fixed-frequency normalisation (the speed not given) and with the speed-aware one (each window's
tachometer speed given). A third model trained at one speed only shows the problem both address:
the healthy machine at another speed. Thresholds are the split-conformal ones the train flow ships;
false-alarm rates come with their one-sided Clopper-Pearson upper bound. Like the CLI, this module is
part of the application layer on top of flows and tasks.
"""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from firmware.sensor import FaultSpec, MachineSimulator, OperatingPoint
from tasks.rates import rate_upper_bound
from tasks.train import (
    TrainingConfig,
    WindowSpeeds,
    build_feature_sets,
    calibrate_threshold,
    featurize,
    load_training_config,
    reconstruction_error,
    train_autoencoder,
)
from tinymlops.bench import machine_description
from tinymlops.contracts.dsp import DspSpec
from tinymlops.contracts.scoring import is_anomalous
from tinymlops.demo import QUICK_TRAINING_CONFIG
from tinymlops.settings import Settings

log = logging.getLogger(__name__)

TRAIN_RPM = (900.0, 1050.0, 1200.0, 1350.0, 1500.0)
"""The operating speeds the fleet trains on."""
UNSEEN_RPM = (975.0, 1125.0, 1275.0, 1425.0)
"""Healthy speeds inside the trained range that no training window had."""
SINGLE_RPM = 1200.0
"""The speed of the single-speed model (the situation the issue reported)."""
SEVERITIES = (0.15, 0.2, 0.25, 0.3, 0.35, 0.4)
"""Seeded bearing-fault severities, smallest first."""
SMALLEST_SEVERITY = 0.4
"""The smallest seeded fault the fleet must detect at >= 95 % at every speed and kind (the test's figure): at
900 rpm an impact is half as strong as at the simulator's reference speed, and severity 0.4 is the smallest of
:data:`SEVERITIES` both normalisations reach there (measured: 0.35 gives 0.93-0.95)."""
FAULT_KINDS = ("inner_race", "outer_race")
_DIGITS = 4
Windows = npt.NDArray[np.float32]


@dataclass(frozen=True)
class _Sizes:
    machines: int
    train_windows: int  # per machine and trained speed
    test_windows: int  # per machine and unseen speed
    fault_windows: int  # per kind, severity and speed


def _machines(count: int) -> list[MachineSimulator]:
    """The fleet: one simulated machine per seed (its own resonance, harmonics and noise)."""
    return [MachineSimulator(100 + machine) for machine in range(count)]


def _run(machine: MachineSimulator, rpm: float, n: int) -> Windows:
    """The machine's next ``n`` windows at ``rpm``."""
    machine.set_operating_point(OperatingPoint(rpm=rpm, load=0.5))
    return np.stack([machine.next_window() for _ in range(n)])


def _faulty(index: int, fault: FaultSpec, rpm: float, n: int) -> Windows:
    """``n`` windows of fleet machine ``index`` (same physics) with a seeded fault, at ``rpm``."""
    machine = MachineSimulator(100 + index)
    machine.inject_fault(fault)
    return _run(machine, rpm, n)


def _stack(parts: list[tuple[Windows, float]]) -> tuple[Windows, npt.NDArray[np.float32]]:
    windows = np.concatenate([w for w, _ in parts])
    rpm = np.concatenate([np.full(len(w), r, dtype=np.float32) for w, r in parts])
    return windows, rpm


def _machine_rpm(machine: int, rpm: float) -> float:
    """Each machine runs a little off the nominal speed, as a fleet's drives do (+/-2 %)."""
    return rpm * (1 + 0.01 * ((machine % 5) - 2))


class _Scorer:
    """One trained model: features at the model's spec, errors, threshold."""

    def __init__(self, windows: npt.NDArray[np.float32], rpm: npt.NDArray[np.float32] | None, config: TrainingConfig):
        spec = DspSpec()
        features = build_feature_sets(windows, windows[:1], {}, spec, config, WindowSpeeds(train=rpm))
        self.spec = features.spec
        self.trained = train_autoencoder(features.parts.train, features.parts.validation, config)
        errors = reconstruction_error(self.trained.model, features.parts.calibration)
        self.threshold = calibrate_threshold(errors, config.threshold_percentile)
        self.aware = rpm is not None

    def alarms(self, windows: npt.NDArray[np.float32], rpm: float) -> npt.NDArray[np.bool_]:
        speeds = np.full(len(windows), rpm, dtype=np.float32) if self.aware else None
        errors = reconstruction_error(self.trained.model, featurize(windows, self.spec, speeds))
        return is_anomalous(errors, self.threshold)


def _rate(alarms: list[npt.NDArray[np.bool_]]) -> tuple[float, float, int]:
    flat = np.concatenate(alarms)
    k, n = int(flat.sum()), int(flat.size)
    return k / n, rate_upper_bound(k, n), n


def bench_quality(settings: Settings, *, quick: bool = False) -> dict[str, Any]:
    """Train fixed-frequency, speed-aware and single-speed models on one simulated fleet and judge them.

    Args:
        settings: Resolved settings: the training configuration (a quick run uses data/training_quick.yaml).
        quick: Fewer machines, windows and epochs (CI).

    Returns:
        Figures: ``far_unseen_speed_fixed``/``_aware`` (false-alarm rate on healthy windows at unseen
        speeds inside the range) with ``_upper`` bounds, ``far_other_speed_single`` (a model trained at
        one speed, healthy windows at the unseen speeds), ``det_smallest_fault_speed_fixed``/``_aware``
        (lowest detection over speeds and kinds at :data:`SMALLEST_SEVERITY`), the detection at every
        severity, and the windows behind them.
    """
    sizes = _Sizes(4, 100, 125, 40) if quick else _Sizes(6, 160, 200, 80)
    # the quick configuration trains as well here (measured: detection within one window of 40) in half the time
    config = load_training_config(QUICK_TRAINING_CONFIG if quick else settings.training_config)
    started = time.perf_counter()
    fleet = _machines(sizes.machines)
    trained = [
        (_run(machine, _machine_rpm(m, rpm), sizes.train_windows), _machine_rpm(m, rpm))
        for rpm in TRAIN_RPM
        for m, machine in enumerate(fleet)
    ]
    windows, rpm = _stack(trained)
    single_windows, single_rpm = _stack([(w, r) for w, r in trained if abs(r / SINGLE_RPM - 1) < 0.05])
    models = {
        "fixed": _Scorer(windows, None, config),
        "aware": _Scorer(windows, rpm, config),
        "single": _Scorer(single_windows, single_rpm, config),
    }
    healthy = {  # the same machines later on, at speeds none of them trained at
        speed: [
            (_run(machine, _machine_rpm(m, speed), sizes.test_windows), _machine_rpm(m, speed))
            for m, machine in enumerate(fleet)
        ]
        for speed in UNSEEN_RPM
    }
    figures: dict[str, Any] = {}
    for name, model in models.items():
        key = "far_other_speed_single" if name == "single" else f"far_unseen_speed_{name}"
        rate, upper, n = _rate([model.alarms(w, r) for parts in healthy.values() for w, r in parts])
        figures |= {key: round(rate, _DIGITS), f"{key}_upper": round(upper, _DIGITS)}
        figures["far_unseen_speed_windows"] = n
    for severity in (0.2, SMALLEST_SEVERITY) if quick else SEVERITIES:
        for name in ("fixed", "aware"):
            lowest = 1.0
            for speed in (*TRAIN_RPM, *UNSEEN_RPM):
                for k, kind in enumerate(FAULT_KINDS):
                    fault = FaultSpec(kind, severity)  # type: ignore[arg-type]
                    index = k % sizes.machines
                    at = _machine_rpm(index, speed)
                    alarms = models[name].alarms(_faulty(index, fault, at, sizes.fault_windows), at)
                    lowest = min(lowest, float(alarms.mean()))
            figures[f"det_severity_{severity:g}_speed_{name}"] = round(lowest, _DIGITS)
            if severity == SMALLEST_SEVERITY:
                figures[f"det_smallest_fault_speed_{name}"] = round(lowest, _DIGITS)
    figures |= {
        "quality_smallest_severity": SMALLEST_SEVERITY,
        "quality_trained_rpm": list(TRAIN_RPM),
        "quality_unseen_rpm": list(UNSEEN_RPM),
        "quality_machines": sizes.machines,
        "quality_seconds": round(time.perf_counter() - started, 1),
        **machine_description(),
    }
    log.info("quality benchmark: %s", figures)
    return figures
