"""Package a compressed model per MCU target: budget validation, C arrays, the model bundle, reports."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from prefect import task
from prefect.cache_policies import NO_CACHE

from firmware.carray import model_to_c
from firmware.tflm import ArenaMeasurement, ParityReport, count_macs, measure_arena
from tasks.budget import BudgetExceededError, BudgetReport, check_parity, measure_on_device, validate_budget
from tasks.compress import CompressionResult
from tasks.evaluate import ModelComparison
from tasks.train import FeatureSets, QualityGateConfig, calibrated_false_alarm_rate
from tinymlops.contracts.dsp import DspSpec
from tinymlops.schemas import (
    BundleMetadata,
    DriftReference,
    ModelBundle,
    registered_model_name,
    sha256_hex,
    write_bundle,
)
from tinymlops.targets import McuTarget

log = logging.getLogger(__name__)

DEPLOYED_EVALUATION = "int8_tflm"


@dataclass(frozen=True)
class PackagedTarget:
    """The outcome for one target: its budget report and the bundle written for it."""

    target: str
    report: BudgetReport
    bundle: ModelBundle

    @property
    def passed(self) -> bool:
        """Whether the model fits this target."""
        return self.report.passed


def model_metrics(comparison: ModelComparison, compression: CompressionResult) -> dict[str, float]:
    """Flat metrics of a model: quality of each interpreter and artifact sizes."""
    metrics: dict[str, float] = {}
    for name, evaluation in comparison.evaluations.items():
        metrics[f"auc_{name}"] = evaluation.auc
        metrics[f"f1_{name}"] = evaluation.f1
        metrics[f"false_alarms_per_hour_{name}"] = evaluation.false_alarms_per_hour
    for row in compression.sizes:
        metrics[f"bytes_{row.name}"] = row.raw_bytes
        metrics[f"gzip_bytes_{row.name}"] = row.gzip_bytes
    metrics["sparsity"] = compression.sparsity
    return metrics


def build_drift_reference(
    features: FeatureSets,
    calibration_errors: npt.NDArray[np.float32],
    percentile: float,
    *,
    max_rows: int = 2000,
    seed: int = 0,
) -> DriftReference:
    """Sample the training features; keep the deployed model's errors on the calibration windows.

    Args:
        features: The run's feature sets.
        calibration_errors: The deployed model's errors in TFLite Micro on the calibration features
            (:attr:`tasks.evaluate.FeatureSetErrors.calibration`).
        percentile: Threshold percentile; with the calibration size it sets the expected false-alarm rate.
        max_rows: At most this many training rows are kept.
        seed: Seed of the row sample.
    """
    train = features.parts.train
    rows = np.sort(np.random.default_rng(seed).choice(len(train), size=min(max_rows, len(train)), replace=False))
    expected = calibrated_false_alarm_rate(len(calibration_errors), percentile)
    return DriftReference(train[rows], calibration_errors, expected_anomaly_rate=expected)


def package_for_target(
    out_dir: Path,
    *,
    target: McuTarget,
    compression: CompressionResult,
    spec: DspSpec,
    arena: ArenaMeasurement,
    comparison: ModelComparison,
    threshold_percentile: float,
    fleet: str,
    dataset_fingerprint: str,
    trained_span_us: dict[str, tuple[int, int]],
    parity: ParityReport,
    drift_reference: DriftReference,
    lineage: dict[str, str],
) -> PackagedTarget:
    """Validate the deployable model against one target's budget and write its bundle.

    The bundle is written whether or not the budget passes: its report says why it does not fit,
    and only passing bundles are registered.

    Args:
        out_dir: Directory of this run's bundles; the bundle goes to ``out_dir/<target>``.
        target: The MCU target.
        compression: The compressed models (the deployable one is packaged).
        spec: Fitted DSP spec.
        arena: Measured TFLite Micro arena of the deployable model.
        comparison: Evaluations on the held-out set (the TFLM one sets the threshold).
        threshold_percentile: Percentile the threshold was calibrated at.
        fleet: Fleet whose data trained the model.
        dataset_fingerprint: Content hash of the training data and selection.
        trained_span_us: Per device, the time span of the windows the model trained on.
        parity: The model's TFLite vs TFLite Micro comparison (:func:`tasks.budget.check_parity`).
        drift_reference: Training reference for the drift monitor.
        lineage: Run ids and other provenance.
    """
    model = compression.deployable
    measurement, estimate_note = measure_on_device(model, target, spec)
    report = validate_budget(
        model,
        target,
        spec,
        arena=arena,
        parity=parity,
        measurement=measurement,
        estimate_note=estimate_note,
    )
    c_name = f"vibration_ae_{target.name}"
    c_source, c_header = model_to_c(model, c_name)
    deployed = comparison[DEPLOYED_EVALUATION]
    metrics = model_metrics(comparison, compression)
    metrics.update({f"budget_{check.name}": float(check.measured) for check in report.checks})
    if measurement is not None:
        metrics.update(
            device_dsp_instructions=float(measurement.dsp_instructions),
            device_inference_instructions=float(measurement.inference_instructions),
            device_arena_bytes=float(measurement.arena_bytes),
        )
    metadata = BundleMetadata(
        model_name=registered_model_name(target.name),
        target=target.name,
        fleet=fleet,
        threshold=deployed.threshold,
        threshold_percentile=threshold_percentile,
        dsp_spec_version=spec.version,
        tflite_sha256=sha256_hex(model),
        tflite_bytes=len(model),
        arena_bytes=arena.smallest_working_bytes,
        macs=count_macs(model),
        n_features=spec.n_features,
        c_name=c_name,
        quantization=compression.quantization,
        sparsity=compression.sparsity,
        budget_passed=report.passed,
        dataset_fingerprint=dataset_fingerprint,
        trained_span_us=trained_span_us,
        metrics=metrics,
        lineage=lineage,
    )
    bundle = write_bundle(
        out_dir / target.name,
        tflite=model,
        dsp_spec_json=spec.to_json(),
        metadata=metadata,
        c_source=c_source,
        c_header=c_header,
        budget_json=report.to_json(),
        budget_markdown=report.to_markdown(),
        evaluation=comparison.to_dict(),
        drift_reference=drift_reference,
        float_tflite=compression.pruned_float_model,
    )
    log.info("%s: budget %s, bundle %s", target.name, "passed" if report.passed else "FAILED", bundle.directory)
    return PackagedTarget(target.name, report, bundle)


def training_report_markdown(
    *,
    fleet: str,
    counts: dict[str, int],
    calibration_windows: int,
    gates: QualityGateConfig,
    comparison: ModelComparison,
    compression: CompressionResult,
    arena: ArenaMeasurement,
    packaged: list[PackagedTarget],
    promotions: list[dict[str, Any]] | None = None,
    extra: dict[str, Any] | None = None,
) -> str:
    """The report of one training run: data, quality per interpreter, sizes, the budget per target, promotions.

    Args:
        fleet: The fleet trained.
        counts: Windows per set.
        calibration_windows: Normal windows of the training part that set the threshold.
        gates: The quality and promotion gates (the false-alarm limit is quoted beside the bound).
        comparison: Evaluations on the held-out windows.
        compression: The compressed models.
        arena: The measured TFLite Micro arena.
        packaged: The bundle and budget report per target.
        promotions: What happened to each registered version (:meth:`PromotionOutcome.to_dict`).
        extra: Further ``key: value`` lines.
    """
    deployed = comparison[DEPLOYED_EVALUATION]
    lines = [f"# Training run for fleet `{fleet}`", ""]
    lines += ["## Data", "", "| set | windows |", "|---|---|"]
    lines += [f"| {name} | {count} |" for name, count in counts.items()]
    lines += [f"| calibration (threshold, part of train_normal) | {calibration_windows} |"]
    lines += ["", "## Quality on held-out windows", "", comparison.to_markdown(), ""]
    lines += [
        f"False alarms of the deployed model: {deployed.false_positives} of {deployed.n_normal} held-out normal "
        f"windows, one-sided Clopper-Pearson upper bound {deployed.false_alarm_upper:.2%} at "
        f"{deployed.confidence:.0%} confidence. Promotion needs at most {gates.max_false_alarm_rate:.2%} and at least "
        f"{gates.min_calibration_windows} calibration windows (this run: {calibration_windows}).",
        "",
    ]
    lines += ["## Sizes", "", "| model | raw bytes | gzip bytes |", "|---|---|---|"]
    lines += [f"| {row.name} | {row.raw_bytes:,} | {row.gzip_bytes:,} |" for row in compression.sizes]
    arena_text = f"TFLite Micro arena {arena.smallest_working_bytes:,} B (allocator report {arena.reported_bytes:,} B)"
    lines += ["", f"Sparsity {compression.sparsity:.1%}, quantization `{compression.quantization}`, {arena_text}.", ""]
    for item in packaged:
        verdict = "fits" if item.passed else "does NOT fit"
        lines += [f"## {item.target}: {verdict}", "", item.report.to_markdown(), ""]
    if promotions:
        lines += ["## Promotion", ""]
        for outcome in promotions:
            verdict = "champion" if outcome["promoted"] else "stays candidate"
            lines.append(f"- {outcome['model']} v{outcome['version']}: {verdict}: {'; '.join(outcome['reasons'])}")
        lines.append("")
    for key, value in (extra or {}).items():
        lines.append(f"- {key}: {value}")
    return "\n".join(lines) + "\n"


# The Prefect layer: the same functions, run as tasks (tests call the functions).
measure_arena_task = task(name="measure-tflm-arena", retries=1, cache_policy=NO_CACHE)(measure_arena)
check_parity_task = task(name="check-parity", cache_policy=NO_CACHE)(check_parity)
build_drift_reference_task = task(name="build-drift-reference", cache_policy=NO_CACHE)(build_drift_reference)
package_for_target_task = task(name="package-for-target", task_run_name="package-{target.name}", cache_policy=NO_CACHE)(
    package_for_target
)


def enforce_some_target_fits(packaged: list[PackagedTarget]) -> None:
    """Raise :class:`BudgetExceededError` naming each target's exceeded limits when no target fits."""
    if any(item.passed for item in packaged):
        return
    parts = [
        f"{item.target}: "
        + ", ".join(f"{c.name} {c.format(c.measured)} > {c.format(c.limit)}" for c in item.report.failures)
        for item in packaged
    ]
    raise BudgetExceededError("model fits no target: " + "; ".join(parts))
