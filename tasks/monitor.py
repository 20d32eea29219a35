"""The drift monitor: a fleet's live windows over a time window, judged against the champion model.

:func:`monitor_fleet` reads the fleet's live (``source == "mqtt"``) windows in ``[since, until)``
from the lake (labelled imports and the seeded-fault reference set are left out: they are not
what the fleet measures now), computes features with the champion's own DSP spec and scores them
with the champion's int8 model in the real TensorFlow Lite Micro interpreter, in the arena the
bundle records: the exact arithmetic of the devices, without importing TensorFlow. Devices that
only publish drift summaries (``firmware.ota.DriftSummary``: counts, score histogram, feature
moments) are judged from those. The decision rule lives in :mod:`tasks.drift`. The result, a
:class:`MonitorReport`, renders as markdown, as flat metrics for MLflow, as a plot, and as the
Prefect events the monitor flow emits: ``tinymlops.drift.detected`` (retrain) and
``tinymlops.anomaly.alert`` (inspect, no retraining).
"""

from __future__ import annotations

import datetime as dt
import logging
import math
import re
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt
from prefect import task
from prefect.cache_policies import NO_CACHE

from firmware.tflm import TflmRunner
from registry.errors import ModelNotFoundError
from registry.models import ResolvedModel, resolve
from registry.store import configure_experiment, configure_from_settings
from registry.tracking import log_report_run
from tasks.drift import (
    DeviceAssessment,
    FleetAssessment,
    FleetVerdict,
    SummaryStats,
    assess_device,
    assess_device_summary,
    assess_fleet,
    feature_names,
    pooled_feature_drift,
)
from tasks.lake import read_windows
from tasks.train import reconstruction_error
from tinymlops.contracts.dsp import DspSpec, covered, extract_features, resolve_speed
from tinymlops.contracts.events import (
    ALERT_EVENT,
    DRIFT_EVENT,
    AlertPayload,
    DriftPayload,
    MonitorPayload,
    device_resource_id,
    fleet_resource_id,
    model_resource_id,
)
from tinymlops.errors import TinyMLOpsError
from tinymlops.schemas import DriftReference, ModelBundle, registered_model_name
from tinymlops.settings import DriftSettings

if TYPE_CHECKING:
    from matplotlib.figure import Figure

    from firmware.ota import DriftSummary

log = logging.getLogger(__name__)

MONITORING_EXPERIMENT = "tinymlops-monitoring"
MONITORING_DESCRIPTION = (
    "Monitor runs: a fleet's last minutes of live data scored by its champion; the fleet verdict "
    "(ok, fault, drift), per-device anomaly rates and error shifts, pooled feature drift."
)
LIVE_SOURCES = ("mqtt",)
SCORER = "tflite-micro"
_METRIC_KEY = re.compile(r"[^A-Za-z0-9_\-. /]")
_VERDICT_SEVERITY: tuple[FleetVerdict, ...] = ("insufficient_data", "ok", "fault", "data_drift", "mixed")
_VERDICT_COLOURS = {"ok": "#4c9a2a", "drift": "#e08a00", "fault": "#c0392b", "insufficient_data": "#9e9e9e"}


class MonitorError(TinyMLOpsError):
    """The monitor cannot run on these inputs (time window, bundle, lake contents)."""


@dataclass(frozen=True)
class Champion:
    """The deployed model as the monitor runs it: DSP spec, TFLite Micro runner, reference, threshold."""

    spec: DspSpec
    runner: TflmRunner
    reference: DriftReference
    threshold: float
    model_name: str
    target: str
    sha256: str

    @classmethod
    def from_bundle(cls, bundle: ModelBundle) -> Champion:
        """Load a bundle's model into TFLite Micro in its recorded arena, with its spec and drift reference.

        Raises:
            MonitorError: The spec is not fitted, or spec, model and reference disagree in width.
        """
        spec = bundle.dsp_spec()
        reference = bundle.drift_reference()
        runner = TflmRunner(bundle.tflite(), bundle.metadata.arena_bytes)
        meta = bundle.metadata
        if not spec.is_fitted:
            raise MonitorError(f"bundle {bundle.directory}: its DSP spec has no normalisation statistics")
        widths = (spec.n_features, runner.n_features, reference.features.shape[1], meta.n_features)
        if len(set(widths)) != 1:
            raise MonitorError(
                f"bundle {bundle.directory}: feature widths disagree: spec {widths[0]}, model {widths[1]}, "
                f"drift reference {widths[2]}, metadata {widths[3]}"
            )
        return cls(spec, runner, reference, meta.threshold, meta.model_name, meta.target, meta.tflite_sha256)

    def score(
        self, samples: npt.ArrayLike, rpm: npt.ArrayLike | None = None
    ) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.float32]]:
        """Normalised features and reconstruction errors of windows (n, window_samples) in physical units.

        Each window is normalised at its shaft speed ``rpm`` (NaN or None: not known, the spec's
        reference speed); a speed-unaware spec ignores it.
        """
        features = extract_features(samples, self.spec, rpm)
        return features, reconstruction_error(self.runner.predict, features)

    def speed_status(self, rpm: npt.ArrayLike | None, n: int) -> tuple[npt.NDArray[np.bool_], npt.NDArray[np.bool_]]:
        """Per window: scored at the fallback (no usable speed), and at a usable speed the spec does not cover.

        A speed-unaware spec uses no speed and covers every window.
        """
        fallback = resolve_speed(rpm, self.spec, n)[1]
        if not (self.spec.speed_aware and self.spec.speed_coverage_rpm) or rpm is None:
            return fallback, np.zeros(n, dtype=bool)
        speeds = np.broadcast_to(np.asarray(rpm, dtype=np.float64), (n,))
        return fallback, ~fallback & ~covered(speeds, self.spec)

    def feature_labels(self) -> dict[str, str]:
        """Feature name to a readable label: band frequency ranges in Hz."""
        names = feature_names(self.spec.n_features)
        bin_hz = self.spec.sample_rate_hz / self.spec.window_samples
        edges = self.spec.band_edges
        labels = {name: name for name in names}
        for i in range(self.spec.n_bands):
            labels[names[i]] = f"{names[i]} ({edges[i] * bin_hz:.0f}-{edges[i + 1] * bin_hz:.0f} Hz)"
        return labels


def summary_stats(summaries: Sequence[DriftSummary]) -> SummaryStats:
    """Merge one device's drift summaries (``firmware.ota.DriftSummary``) into :class:`SummaryStats`."""
    return SummaryStats.merge(
        [
            SummaryStats(
                windows=s.windows,
                anomalies=s.anomalies,
                score_edges=np.asarray(s.score_edges, dtype=np.float64),
                score_counts=np.asarray(s.score_counts, dtype=np.int64),
                feature_mean=np.asarray(s.feature_mean, dtype=np.float64),
                feature_var=np.asarray(s.feature_var, dtype=np.float64),
                speed_fallback=s.speed_fallback,
            )
            for s in summaries
        ]
    )


def assess_windows(
    samples_by_device: Mapping[str, npt.ArrayLike],
    champion: Champion,
    settings: DriftSettings,
    summaries_by_device: Mapping[str, SummaryStats] | None = None,
    rpm_by_device: Mapping[str, npt.ArrayLike] | None = None,
) -> FleetAssessment:
    """Score each device's windows with the champion and judge devices and fleet (:mod:`tasks.drift`).

    Args:
        samples_by_device: Device id to its windows (n, window_samples), in physical units.
        champion: The deployed model.
        settings: Drift thresholds.
        summaries_by_device: Device id to its merged summaries; used for devices without windows.
        rpm_by_device: Device id to the shaft speed of each of its windows (NaN: not known); a
            device missing here has no speed for any window (scored at the fallback).
    """
    features: dict[str, npt.NDArray[np.float32] | SummaryStats] = {}
    assessments: list[DeviceAssessment] = []
    empty = np.zeros((0, champion.spec.n_features), dtype=np.float32)
    summaries = summaries_by_device or {}
    ref, threshold = champion.reference, champion.threshold
    devices = sorted(set(samples_by_device) | set(summaries))
    for device in devices:
        if device not in samples_by_device:  # known from its summaries only
            features[device] = summaries[device]
            assessments.append(assess_device_summary(device, summaries[device], ref, threshold, settings, len(devices)))
            continue
        samples = np.asarray(samples_by_device[device], dtype=np.float32)
        rpm = (rpm_by_device or {}).get(device)
        x, errors = champion.score(samples, rpm) if len(samples) else (empty, np.zeros(0, dtype=np.float32))
        fallback, uncovered = champion.speed_status(rpm, len(samples))
        features[device] = x[~uncovered]  # the fleet's pooled features: at speeds the champion knows
        assessments.append(
            assess_device(
                device, x, errors, ref, threshold, settings, len(devices), uncovered=uncovered, fallback=fallback
            )
        )
    pooled = pooled_feature_drift(ref.features, features, assessments, settings)
    return assess_fleet(assessments, settings, pooled=pooled)


def _metric_key(key: str) -> str:
    return _METRIC_KEY.sub("_", key)


@dataclass(frozen=True)
class MonitorReport:
    """One monitor run over one fleet and time window.

    Attributes:
        fleet: Fleet name.
        since: Start of the window (inclusive).
        until: End of the window (exclusive).
        model_name: Registered model name of the champion.
        target: MCU target profile of the champion's bundle.
        model_sha256: sha256 of the champion's int8 model.
        threshold: The champion's anomaly threshold.
        expected_anomaly_rate: False-alarm rate the champion expects on normal data.
        assessment: Device and fleet verdicts.
        settings: Thresholds the verdicts were made with.
        windows_live: Live windows scored.
        windows_excluded: Windows in the time range left out (imports, reference sets).
        summaries_used: Device summaries that judged devices without windows in the lake.
        summaries_ignored: Summaries left out: another model or threshold, outside the window, or
            of a device whose windows were scored.
        feature_labels: Feature name to readable label (band frequency ranges).
        speed_coverage_rpm: Speed intervals the champion trained on (empty: a speed-unaware champion).
        scorer: The interpreter that computed the reconstruction errors.
        created_at: When the report was made (UTC, ISO 8601).
    """

    fleet: str
    since: dt.datetime
    until: dt.datetime
    model_name: str
    target: str
    model_sha256: str
    threshold: float
    expected_anomaly_rate: float
    assessment: FleetAssessment
    settings: DriftSettings
    windows_live: int
    windows_excluded: int
    summaries_used: int = 0
    summaries_ignored: int = 0
    feature_labels: dict[str, str] = field(default_factory=dict)
    speed_coverage_rpm: tuple[tuple[float, float], ...] = ()
    scorer: str = SCORER
    created_at: str = field(default_factory=lambda: dt.datetime.now(tz=dt.UTC).isoformat())

    @property
    def verdict(self) -> FleetVerdict:
        """The fleet verdict."""
        return self.assessment.verdict

    @property
    def drift_detected(self) -> bool:
        """Whether the fleet's data drifted: emit :data:`DRIFT_EVENT` (retraining)."""
        return self.assessment.drift_detected

    @property
    def fault_devices(self) -> list[str]:
        """Devices whose anomalies carry a fault signature."""
        return self.assessment.fault_devices

    @property
    def alert_devices(self) -> list[str]:
        """Devices to alert about: emit :data:`ALERT_EVENT` when not empty."""
        return self.assessment.alert_devices

    @property
    def devices(self) -> tuple[DeviceAssessment, ...]:
        """Every device's assessment."""
        return self.assessment.devices

    def fleet_metrics(self) -> dict[str, float]:
        """Fleet-level figures (flat, numeric)."""
        devices = self.devices
        scored = sum(a.n_windows for a in devices)
        metrics = {
            "fleet.devices": float(len(devices)),
            "fleet.judged_devices": float(len(self.assessment.judged_devices)),
            "fleet.drift_devices": float(len(self.assessment.drift_devices)),
            "fleet.new_operating_point_devices": float(len(self.assessment.new_operating_point_devices)),
            "fleet.speed_fallback_windows": float(sum(a.speed_fallback for a in devices)),
            "fleet.speed_uncovered_windows": float(sum(a.speed_uncovered for a in devices)),
            "fleet.fault_devices": float(len(self.fault_devices)),
            "fleet.insufficient_devices": float(len(self.assessment.insufficient_devices)),
            "fleet.windows": float(self.windows_live),
            "fleet.windows_excluded": float(self.windows_excluded),
            "fleet.summaries_used": float(self.summaries_used),
            "fleet.anomaly_rate": sum(a.anomalies for a in devices) / scored if scored else 0.0,
            "fleet.drift_detected": float(self.drift_detected),
            "fleet.alert": float(bool(self.alert_devices)),
        }
        pooled = self.assessment.pooled
        if pooled is not None:
            metrics |= {
                "fleet.pooled_drifted_features": float(pooled.n_drifted),
                "fleet.pooled_max_psi": pooled.max_psi,
                "fleet.pooled_max_ks": pooled.max_ks,
            }
        return metrics

    def device_metrics(self, device: DeviceAssessment) -> dict[str, float]:
        """One device's figures (flat, numeric), keys prefixed ``device.<id>.``."""
        prefix = f"device.{device.device}."
        metrics = {
            "windows": float(device.n_windows),
            "anomaly_rate": device.anomaly_rate,
            "anomaly_rate_lower": device.anomaly_rate_lower,
            "abnormal": float(device.abnormal),
            "speed_fallback": float(device.speed_fallback),
            "speed_uncovered": float(device.speed_uncovered),
            "new_operating_point": float(device.new_operating_point),
        }
        if device.error_shift is not None:
            metrics |= {"error_ks": device.error_shift.ks, "error_median_ratio": device.error_shift.median_ratio}
        if device.features is not None:
            metrics |= {"drifted_features": float(device.features.n_drifted), "max_psi": device.features.max_psi}
        if device.shape is not None:
            metrics |= {
                "impulsive_fraction": device.shape.impulsive_fraction,
                "periodic_fraction": device.shape.periodic_fraction,
            }
        return {_metric_key(prefix + key): value for key, value in metrics.items()}

    def metrics(self) -> dict[str, float]:
        """Every figure as a flat dict for MLflow: fleet level, per device, pooled PSI per feature."""
        metrics = self.fleet_metrics()
        for device in self.devices:
            metrics |= self.device_metrics(device)
        pooled = self.assessment.pooled
        if pooled is not None:
            for name, psi, ks in zip(pooled.names, pooled.psi, pooled.ks, strict=True):
                metrics[f"pooled.psi.{name}"] = float(psi)
                metrics[f"pooled.ks.{name}"] = float(ks)
        return metrics

    def device_table(self) -> list[dict[str, Any]]:
        """One row per device: its verdict and the figures behind it (a table artifact in the Prefect UI)."""
        return [
            {
                "device": d.device,
                "verdict": d.verdict,
                "drift kind": d.drift_kind,
                "source": d.source,
                "windows": d.n_windows,
                "no usable speed": d.speed_fallback,
                "uncovered speed": d.speed_uncovered,
                "anomaly rate": round(d.anomaly_rate, 4),
                "limit": round(d.anomaly_rate_limit, 4),
                "error KS": round(d.error_shift.ks, 3) if d.error_shift else None,
                "error median ratio": round(d.error_shift.median_ratio, 3) if d.error_shift else None,
                "waveform shape": d.shape.kind if d.shape else None,
                "features off reference": f"{d.features.n_drifted}/{len(d.features.names)}" if d.features else None,
            }
            for d in self.devices
        ]

    def to_dict(self) -> dict[str, Any]:
        """JSON-serialisable form of the whole report."""
        return {
            "fleet": self.fleet,
            "since": self.since.isoformat(),
            "until": self.until.isoformat(),
            "model_name": self.model_name,
            "target": self.target,
            "model_sha256": self.model_sha256,
            "threshold": self.threshold,
            "expected_anomaly_rate": self.expected_anomaly_rate,
            "scorer": self.scorer,
            "windows_live": self.windows_live,
            "windows_excluded": self.windows_excluded,
            "summaries_used": self.summaries_used,
            "summaries_ignored": self.summaries_ignored,
            "created_at": self.created_at,
            "drift_detected": self.drift_detected,
            "drift_kind": self.assessment.kind,
            "speed_coverage_rpm": [list(interval) for interval in self.speed_coverage_rpm],
            "alert_devices": self.alert_devices,
            "settings": self.settings.model_dump(),
            "assessment": self.assessment.to_dict(),
        }

    def to_markdown(self) -> str:
        """Fleet verdict with its reasons, a table per device, the drifted pooled features, the settings."""
        a = self.assessment
        lines = [
            f"# Drift monitor: fleet `{self.fleet}`",
            "",
            f"Window {self.since.isoformat()} to {self.until.isoformat()}: {self.windows_live} live windows "
            f"({self.windows_excluded} other windows left out), {self.summaries_used} device summaries "
            f"({self.summaries_ignored} left out). Champion `{self.model_name}` ({self.target}, "
            f"sha256 {self.model_sha256[:12]}), threshold {self.threshold:.4g}, expected false-alarm rate "
            f"{self.expected_anomaly_rate:.2%}, scored in {self.scorer}.",
            "",
            f"## Fleet verdict: **{a.verdict}**",
            "",
        ]
        lines += [f"- {reason}" for reason in a.reasons]
        if self.drift_detected:
            lines.append(f"- the fleet's data drifted ({a.kind}): retraining is due")
        if self.alert_devices:
            lines.append(f"- alert, no retraining for: {', '.join(self.alert_devices)}")
        lines += [
            "",
            "## Devices",
            "",
            "| device | verdict | source | windows | anomaly rate (lower bound) | limit | error KS "
            "| error median ratio | waveform shape | features off the fleet reference | no usable speed "
            "| uncovered speed |",
            "|---|---|---|---|---|---|---|---|---|---|---|---|",
        ]
        for d in self.devices:
            ks = f"{d.error_shift.ks:.2f}" if d.error_shift else "-"
            ratio = f"{d.error_shift.median_ratio:.2f}" if d.error_shift else "-"
            shape = d.shape.kind if d.shape else "-"
            off = f"{d.features.n_drifted}/{len(d.features.names)}" if d.features else "-"
            lines.append(
                f"| {d.device} | {d.verdict} | {d.source} | {d.n_windows} | {d.anomaly_rate:.1%} "
                f"({d.anomaly_rate_lower:.1%}) | {d.anomaly_rate_limit:.1%} | {ks} | {ratio} | {shape} | {off} "
                f"| {d.speed_fallback} | {d.speed_uncovered} |"
            )
        lines += [
            "",
            f"A device is judged on its anomaly rate (its lower bound at 1 - 0.01/{len(self.devices)} against the "
            "limit: at most 1% of runs of a healthy fleet flag any device), its error shift "
            "and its waveform shape; features off the fleet reference are shown, not judged: one healthy "
            "machine is a sub-population of the pooled reference. Fleet-wide feature drift is judged on the "
            "pooled ok devices. "
            + (
                "Windows are scored at their shaft speed; speeds the champion trained on: "
                + ", ".join(f"{low:.0f}-{high:.0f} rpm" for low, high in self.speed_coverage_rpm)
                + " (5% margin). A device with more than half of its windows outside is at a new operating "
                "point (drift, no alert); otherwise its uncovered windows are left out. Windows without a "
                "usable speed are scored at the reference speed and counted."
                if self.speed_coverage_rpm
                else "The champion is speed-unaware: windows are scored without their shaft speed."
            ),
        ]
        flagged = [d for d in self.devices if d.verdict != "ok"]
        if flagged:
            lines += ["", "## Why", ""]
            for d in flagged:
                lines.append(f"**{d.device}** ({d.verdict})")
                lines.append("")
                lines += [f"- {reason}" for reason in d.reasons]
                lines.append("")
        if a.pooled is not None:
            order = np.argsort(-a.pooled.psi, kind="stable")[:10]
            lines += [
                "",
                f"## Pooled features of the ok devices ({a.pooled.n_rows} windows), largest PSI first",
                "",
                "| feature | PSI | KS | drifted |",
                "|---|---|---|---|",
            ]
            for i in order:
                name = a.pooled.names[i]
                lines.append(
                    f"| {self.feature_labels.get(name, name)} | {a.pooled.psi[i]:.3f} | {a.pooled.ks[i]:.3f} "
                    f"| {'yes' if a.pooled.drifted[i] else 'no'} |"
                )
        lines += ["", "## Settings", "", "| setting | value |", "|---|---|"]
        lines += [f"| {key} | {value} |" for key, value in self.settings.model_dump().items()]
        return "\n".join(lines) + "\n"


def _check_window(since: dt.datetime, until: dt.datetime) -> None:
    if since.tzinfo is None or until.tzinfo is None:
        raise MonitorError(f"monitor window {since.isoformat()} to {until.isoformat()} must be timezone-aware")
    if since >= until:
        raise MonitorError(f"monitor window starts {since.isoformat()}, not before its end {until.isoformat()}")


def _judged(device: str, devices: Collection[str] | None, exclude: Collection[str]) -> bool:
    return (devices is None or device in devices) and device not in exclude


def monitor_fleet(
    lake_root: Path,
    fleet: str,
    bundle: ModelBundle,
    *,
    since: dt.datetime,
    until: dt.datetime,
    settings: DriftSettings,
    sources: Collection[str] = LIVE_SOURCES,
    summaries: Sequence[DriftSummary] = (),
    devices: Collection[str] | None = None,
    exclude: Collection[str] = (),
) -> MonitorReport:
    """Judge a fleet's live windows in ``[since, until)`` against the champion bundle.

    Devices that published drift summaries but have no live windows in the lake (nodes that
    score on board and do not stream raw windows) are judged from their summaries: those of the
    champion (same model name and threshold) whose period ends inside the window.

    Args:
        lake_root: Lake root.
        fleet: Fleet name.
        bundle: The champion's bundle (model, DSP spec, threshold, drift reference).
        since: Start of the window (timezone-aware, inclusive).
        until: End of the window (exclusive).
        settings: Drift thresholds.
        sources: Lake ``source`` values that count as live data.
        summaries: Drift summaries the fleet's devices published (``firmware.ota.DriftSummary``).
        devices: Judge only these devices (None: all); the others' windows and summaries are not counted.
        exclude: Devices not to judge (judged against another champion).

    Returns:
        The report; ``report.drift_detected`` and ``report.alert_devices`` say which event is due.

    Raises:
        MonitorError: Bad time window, a bundle whose parts disagree, or windows at another sample rate.
        LakeError: The lake cannot be read.
    """
    _check_window(since, until)
    champion = Champion.from_bundle(bundle)
    windows = read_windows(lake_root, fleet=fleet, start=since, end=until, window_samples=champion.spec.window_samples)
    if devices is not None or exclude:
        windows = windows.select(np.asarray([_judged(str(d), devices, exclude) for d in windows.device], dtype=bool))
        summaries = [s for s in summaries if _judged(s.device, devices, exclude)]
    live = windows.select(np.asarray([source in sources for source in windows.source], dtype=bool))
    if len(live) and live.sample_rate_hz != champion.spec.sample_rate_hz:
        raise MonitorError(
            f"fleet {fleet} windows are sampled at {live.sample_rate_hz} Hz, "
            f"the champion's DSP spec at {champion.spec.sample_rate_hz} Hz"
        )
    samples = {str(device): live.samples[live.device == device] for device in np.unique(live.device)}
    rpm = {str(device): live.rpm[live.device == device] for device in np.unique(live.device)}
    usable: dict[str, list[DriftSummary]] = {}
    for summary in summaries:
        if (
            summary.device not in samples
            and summary.model == champion.model_name
            and math.isclose(summary.threshold, champion.threshold, rel_tol=1e-6)
            and since.timestamp() <= summary.end_ts < until.timestamp()
        ):
            usable.setdefault(summary.device, []).append(summary)
    used = sum(len(group) for group in usable.values())
    merged = {device: summary_stats(group) for device, group in usable.items()}
    assessment = assess_windows(samples, champion, settings, merged, rpm)
    report = MonitorReport(
        fleet=fleet,
        since=since,
        until=until,
        model_name=champion.model_name,
        target=champion.target,
        model_sha256=champion.sha256,
        threshold=champion.threshold,
        expected_anomaly_rate=champion.reference.expected_anomaly_rate,
        assessment=assessment,
        settings=settings,
        windows_live=len(live),
        windows_excluded=len(windows) - len(live),
        summaries_used=used,
        summaries_ignored=len(summaries) - used,
        feature_labels=champion.feature_labels(),
        speed_coverage_rpm=champion.spec.speed_coverage_rpm,
    )
    log.info(
        "monitor %s %s..%s: %s (%d live windows, %d devices; drift %s, alert %s)",
        fleet,
        since.isoformat(),
        until.isoformat(),
        report.verdict,
        report.windows_live,
        len(report.devices),
        report.assessment.drift_devices,
        report.alert_devices,
    )
    return report


def plot(report: MonitorReport) -> Figure:
    """Per-device anomaly rate and error shift (bars coloured by verdict), and the pooled PSI per feature."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    devices = report.devices
    names = [d.device for d in devices]
    colours = [_VERDICT_COLOURS[d.verdict] for d in devices]
    x = np.arange(len(devices))
    fig = Figure(figsize=(max(8.0, 0.45 * len(devices) + 3.0), 9.0), layout="constrained")
    FigureCanvasAgg(fig)
    rate_ax, error_ax, psi_ax = fig.subplots(3, 1)
    fig.suptitle(f"Fleet {report.fleet}: {report.verdict} ({report.since:%Y-%m-%d %H:%M} to {report.until:%H:%M} UTC)")

    fig.legend(
        handles=[Patch(color=c, label=v) for v, c in _VERDICT_COLOURS.items()],
        loc="outside lower center",
        ncols=len(_VERDICT_COLOURS),
        fontsize="small",
    )
    limit = report.settings.anomaly_rate_factor * report.expected_anomaly_rate
    rate_ax.bar(x, [d.anomaly_rate for d in devices], color=colours)
    rate_ax.axhline(limit, color="black", linestyle="--", linewidth=1, label=f"limit {limit:.1%}")
    rate_ax.set_ylabel("anomaly rate")
    error_ax.bar(x, [d.error_shift.ks if d.error_shift else 0.0 for d in devices], color=colours)
    error_ax.axhline(
        report.settings.error_shift_threshold,
        color="black",
        linestyle="--",
        linewidth=1,
        label=f"limit {report.settings.error_shift_threshold:g}",
    )
    error_ax.set_ylabel("error shift (KS)")
    for ax in (rate_ax, error_ax):
        ax.set_ylim(0, 1.05)
        ax.set_xticks(x, names, rotation=60, ha="right", fontsize="small")
        ax.legend(loc="upper left", fontsize="small")

    pooled = report.assessment.pooled
    if pooled is None:
        psi_ax.text(0.5, 0.5, "too few ok devices for a pooled comparison", ha="center", va="center")
        psi_ax.set_axis_off()
    else:
        feature_x = np.arange(len(pooled.names))
        psi_ax.bar(feature_x, pooled.psi, color=np.where(pooled.drifted, "#c0392b", "#4a6fa5"))
        psi_ax.axhline(
            report.settings.psi_threshold,
            color="black",
            linestyle="--",
            linewidth=1,
            label=f"limit {report.settings.psi_threshold:g} (red: drifted, KS too)",
        )
        psi_ax.set_xticks(feature_x, pooled.names, rotation=90, fontsize="x-small")
        psi_ax.set_ylabel("pooled PSI (ok devices)")
        psi_ax.set_ylim(0, 1.3 * max(report.settings.psi_threshold, pooled.max_psi))
        psi_ax.legend(loc="upper right", fontsize="small")
    return fig


def _payload_base(report: MonitorReport, champion_version: str | None) -> MonitorPayload:
    return {
        "fleet": report.fleet,
        "verdict": report.verdict,
        "since": report.since.isoformat(),
        "until": report.until.isoformat(),
        "model_name": report.model_name,
        "model_sha256": report.model_sha256,
        "champion_version": champion_version,
        "reasons": list(report.assessment.reasons),
    }


def _resource(report: MonitorReport, champion_version: str | None) -> dict[str, str]:
    return {
        "prefect.resource.id": fleet_resource_id(report.fleet),
        "prefect.resource.name": report.fleet,
        "tinymlops.fleet": report.fleet,
        "tinymlops.model": report.model_name,
        "tinymlops.champion-version": champion_version or "",
    }


def _related_model(report: MonitorReport, champion_version: str | None) -> dict[str, str]:
    return {
        "prefect.resource.id": model_resource_id(report.model_name, champion_version),
        "prefect.resource.role": "model",
        "prefect.resource.name": report.model_name,
    }


def drift_event(report: MonitorReport, champion_version: str | None) -> dict[str, Any]:
    """Keyword arguments of ``prefect.events.emit_event`` announcing the fleet's data drift.

    The payload says the drift's ``kind`` (``new operating point`` or ``data drift``), names the
    devices whose data a retraining should use (judged, not alerted about), the alerted ones it must
    leave out, and the devices at new operating points.

    Raises:
        MonitorError: The report found no drift.
    """
    if not report.drift_detected:
        raise MonitorError(f"fleet {report.fleet} verdict is {report.verdict}: no drift to announce")
    a = report.assessment
    alerted = set(a.alert_devices)
    payload: DriftPayload = {
        **_payload_base(report, champion_version),
        "kind": a.kind,
        "devices": [d for d in a.judged_devices if d not in alerted],
        "drift_devices": a.drift_devices,
        "new_operating_point_devices": a.new_operating_point_devices,
        "exclude_devices": a.alert_devices,
        "metrics": report.fleet_metrics(),
        "pooled_drifted_features": a.pooled.drifted_names() if a.pooled else [],
    }
    return {
        "event": DRIFT_EVENT,
        "resource": _resource(report, champion_version),
        "related": [_related_model(report, champion_version)],
        "payload": payload,
    }


def fleet_verdict(reports: Sequence[MonitorReport]) -> FleetVerdict:
    """The verdict of a fleet judged by several champions: the worst of its reports' (fault and drift: mixed)."""
    verdicts = {report.verdict for report in reports}
    if {"fault", "data_drift"} <= verdicts:
        return "mixed"
    return max(verdicts, key=_VERDICT_SEVERITY.index)


def fleet_drift_event(reports: Sequence[tuple[MonitorReport, str | None]]) -> dict[str, Any]:
    """One drift event for a fleet judged by several champions (one report per MCU profile).

    The retraining trains the whole fleet once, so the fleet gets one event: that of the first
    report that found drift, its device lists joined with the other reports' (devices to train on,
    drifted, at new operating points, left out) and their reasons.

    Args:
        reports: Each report with its champion's registered version.

    Raises:
        MonitorError: No report found drift.
    """
    drifted = [i for i, (report, _) in enumerate(reports) if report.drift_detected]
    if not drifted:
        raise MonitorError(f"fleet {reports[0][0].fleet if reports else '?'}: no report found drift")
    event = drift_event(*reports[drifted[0]])
    payload = event["payload"]
    lists = ("devices", "drift_devices", "new_operating_point_devices", "exclude_devices")
    for i, (report, version) in enumerate(reports):
        if i == drifted[0]:
            continue
        if report.drift_detected:
            other = drift_event(report, version)
            event["related"] += other["related"]
            payload["reasons"] += other["payload"]["reasons"]
            additions = {key: other["payload"][key] for key in lists}
        else:  # judged healthy or alerted under its own champion: train on the first, leave out the others
            alerted = set(report.alert_devices)
            additions = {
                "devices": [d for d in report.assessment.judged_devices if d not in alerted],
                "exclude_devices": sorted(alerted),
            }
        for key, devices in additions.items():
            payload[key] = sorted({*payload[key], *devices})
    return event


def alert_event(report: MonitorReport, champion_version: str | None = None) -> dict[str, Any]:
    """Keyword arguments of ``prefect.events.emit_event`` alerting about abnormal devices (no retraining).

    Raises:
        MonitorError: The report has no device to alert about.
    """
    devices = report.alert_devices
    if not devices:
        raise MonitorError(f"fleet {report.fleet} verdict is {report.verdict}: no device to alert about")
    by_id = {d.device: d for d in report.devices}
    metrics = report.fleet_metrics()
    details = {}
    for device in devices:
        assessment = by_id[device]
        metrics |= report.device_metrics(assessment)
        details[device] = {
            "verdict": assessment.verdict,
            "anomaly_rate": assessment.anomaly_rate,
            "waveform_shape": assessment.shape.kind if assessment.shape else None,
            "reasons": list(assessment.reasons),
        }
    related = [_related_model(report, champion_version)] + [
        {
            "prefect.resource.id": device_resource_id(report.fleet, device),
            "prefect.resource.role": "device",
            "prefect.resource.name": device,
        }
        for device in devices
    ]
    payload: AlertPayload = {
        **_payload_base(report, champion_version),
        "devices": devices,
        "device_details": details,
        "metrics": metrics,
    }
    return {
        "event": ALERT_EVENT,
        "resource": _resource(report, champion_version),
        "related": related,
        "payload": payload,
    }


monitor_fleet_task = task(name="monitor-fleet", cache_policy=NO_CACHE)(monitor_fleet)


def resolve_champion(model_ref: str) -> ResolvedModel:
    """Resolve the model a fleet's devices should be running, from the registry (verified)."""
    configure_from_settings()
    return resolve(model_ref)


@task(name="resolve-champion", retries=2, retry_delay_seconds=3, cache_policy=NO_CACHE)
def resolve_champion_task(model_ref: str) -> ResolvedModel:
    """Prefect task: :func:`resolve_champion`."""
    return resolve_champion(model_ref)


@dataclass(frozen=True)
class ProfileChampion:
    """The champion that judges the devices of one MCU profile.

    Attributes:
        profile: The profile whose champion this is.
        champion: The resolved model.
        devices: The devices it judges; None for the fallback (first target's) champion: every
            device no other group judges.
        fallbacks: Devices judged by the fallback champion although they announced another
            profile, and why.
        chosen_by: Why it judges every device, when it was named rather than found by profile.
    """

    profile: str
    champion: ResolvedModel
    devices: frozenset[str] | None
    fallbacks: dict[str, str] = field(default_factory=dict)
    chosen_by: str = ""


def champions_by_profile(
    profiles: Mapping[str, str], fallback_profile: str, resolve_ref: Callable[[str], ResolvedModel] = resolve_champion
) -> list[ProfileChampion]:
    """One champion per announced MCU profile, the fallback profile's first.

    A device of a profile without a champion is judged by the fallback profile's champion, with
    the reason recorded; so is a device whose profile is unknown (see :func:`judging_reasons`).

    Args:
        profiles: Device id to its announced MCU profile.
        fallback_profile: The profile whose champion judges the rest (the first default target).
        resolve_ref: Resolves ``NAME@alias`` to the registered model.

    Raises:
        RegistryError: The fallback champion cannot be resolved, or the registry failed.
    """
    fallback = resolve_ref(f"{registered_model_name(fallback_profile)}@champion")
    by_profile: dict[str, set[str]] = {}
    for device, profile in profiles.items():
        by_profile.setdefault(profile, set()).add(device)
    groups: list[ProfileChampion] = []
    fallbacks: dict[str, str] = {}
    for profile, devices in sorted(by_profile.items()):
        if profile == fallback_profile:
            continue
        try:
            champion = resolve_ref(f"{registered_model_name(profile)}@champion")
        except ModelNotFoundError as exc:
            reason = f"no champion for its profile {profile} ({exc}): judged by the {fallback_profile} champion"
            fallbacks |= dict.fromkeys(devices, reason)
            continue
        groups.append(ProfileChampion(profile, champion, frozenset(devices)))
    return [ProfileChampion(fallback_profile, fallback, None, fallbacks), *groups]


def judging_reasons(
    group: ProfileChampion, report: MonitorReport, profiles: Mapping[str, str]
) -> dict[str, dict[str, str | None]]:
    """Per judged device of a report: its announced profile, the champion that judged it, and why that one."""
    model = f"{group.champion.version.name}/{group.champion.version.version}"
    judged: dict[str, dict[str, str | None]] = {}
    for device in (d.device for d in report.devices):
        profile = profiles.get(device)
        if group.chosen_by:
            reason = group.chosen_by
        elif device in group.fallbacks:
            reason = group.fallbacks[device]
        elif profile is None:
            reason = f"profile unknown (no announcement): judged by the {group.profile} champion"
        else:
            reason = f"the champion of its profile {profile}"
        judged[device] = {"profile": profile, "model": model, "reason": reason}
    return judged


def log_monitoring(report: MonitorReport, champion: ResolvedModel, flow_run_id: str | None) -> str:
    """Log one monitor run to the MLflow experiment ``tinymlops-monitoring``; returns the run id."""
    import matplotlib.pyplot as plt

    experiment_id = configure_experiment(MONITORING_EXPERIMENT, description=MONITORING_DESCRIPTION)
    figure = plot(report)
    try:
        return log_report_run(
            experiment_id,
            run_name=f"monitor-{report.fleet}-{report.until:%Y%m%dT%H%M%S}",
            params={
                "fleet": report.fleet,
                "model": champion.version.name,
                "model_version": champion.version.version,
                "since": report.since.isoformat(),
                "until": report.until.isoformat(),
            },
            metrics={**report.metrics(), **report.fleet_metrics()},
            markdown=report.to_markdown(),
            figure=figure,
            tags={"fleet": report.fleet, "verdict": report.verdict},
            flow_run_id=flow_run_id,
        )
    finally:
        plt.close(figure)


@task(name="log-monitoring-run", retries=2, retry_delay_seconds=3, cache_policy=NO_CACHE)
def log_monitoring_task(report: MonitorReport, champion: ResolvedModel, flow_run_id: str | None) -> str:
    """Prefect task: :func:`log_monitoring`."""
    return log_monitoring(report, champion, flow_run_id)
