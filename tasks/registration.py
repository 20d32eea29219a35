"""Track a training run in MLflow, register its bundles, and promote under the written rule.

Registration is one atomic step per bundle (the registry undoes a half-done one), so its Prefect
task may retry safely when the tracking store is briefly unavailable. Promotion compares the
candidate with the current champion on the same held-out windows, scored in the same run at each
bundle's own threshold (the champion by :func:`tasks.evaluate.evaluate_bundle`, the candidate from
the run's own TFLite Micro errors on those windows, or by the same function when it has none), and
holds the candidate to the absolute gates of the training config (calibration windows, false-alarm upper bound).
"""

from __future__ import annotations

import logging
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from prefect import task
from prefect.cache_policies import NO_CACHE

from registry.errors import ModelNotFoundError
from registry.models import RegisteredVersion, register_bundle, resolve
from registry.promotion import AbsoluteGates, decide_promotion, promote, record_comparison, record_refusal
from registry.store import configure_from_settings
from registry.tracking import log_training_run, plot_error_histogram, plot_roc, plot_training_loss
from tasks.compress import CompressionResult
from tasks.datasets import DatasetSplit, LakeSelection
from tasks.evaluate import Evaluation, FeatureSetErrors, ModelComparison, evaluate_bundle, evaluate_scores
from tasks.packaging import PackagedTarget
from tasks.train import FeatureSets, QualityGateConfig, TrainedModel, TrainingConfig, WindowSpeeds, reconstruction_error
from tinymlops.schemas import ModelBundle

log = logging.getLogger(__name__)

PROMOTION_ACTOR = "train-flow"


def training_params(config: TrainingConfig, features: FeatureSets, compression: CompressionResult) -> dict[str, Any]:
    """The parameters of a training run, as MLflow shows them."""
    layers = [features.spec.n_features, *config.hidden, features.spec.n_features]
    return {
        "architecture": "-".join(str(n) for n in layers),
        "epochs_max": config.epochs,
        "batch_size": config.batch_size,
        "learning_rate": config.learning_rate,
        "patience": config.patience,
        "threshold_percentile": config.threshold_percentile,
        "seed": config.seed,
        "target_sparsity": config.pruning.target_sparsity,
        "quantization": compression.quantization,
        "dsp_spec_version": features.spec.version,
        "dsp_n_bands": features.spec.n_bands,
        "dsp_window_samples": features.spec.window_samples,
        "dsp_sample_rate_hz": features.spec.sample_rate_hz,
    }


def training_metrics(
    comparison: ModelComparison, compression: CompressionResult, packaged: list[PackagedTarget], epochs_run: int
) -> dict[str, Any]:
    """The figures of a training run: quality per interpreter, sizes, and per target the budget."""
    metrics: dict[str, Any] = {"epochs_run": epochs_run, "sparsity": compression.sparsity}
    for name, evaluation in comparison.evaluations.items():
        metrics[name] = {
            "auc": evaluation.auc,
            "f1": evaluation.f1,
            "false_alarms_per_hour": evaluation.false_alarms_per_hour,
        }
    metrics["bytes"] = {row.name: row.raw_bytes for row in compression.sizes}
    metrics["gzip_bytes"] = {row.name: row.gzip_bytes for row in compression.sizes}
    for item in packaged:
        metrics[item.target] = {check.name: check.measured for check in item.report.checks}
        metrics[item.target]["fits"] = float(item.passed)
    if packaged:
        metrics["arena_bytes"] = packaged[0].bundle.metadata.arena_bytes
        metrics["macs"] = packaged[0].bundle.metadata.macs
    return metrics


def training_plots(
    trained: TrainedModel, features: FeatureSets, tflm_errors: FeatureSetErrors, threshold: float
) -> dict[str, Any]:
    """Reconstruction-error histogram (deployed model), ROC of float and deployed model, training loss.

    Args:
        trained: The float model and its training history.
        features: The run's feature sets (the float model is scored on them).
        tflm_errors: The deployed model's errors in TFLite Micro on the same sets.
        threshold: The deployed threshold.
    """
    normal, faults = tflm_errors.normal, tflm_errors.faults
    all_faults = np.concatenate(list(faults.values()))
    float_normal = reconstruction_error(trained.model, features.test_normal)
    float_faults = np.concatenate([reconstruction_error(trained.model, x) for x in features.faults.values()])
    return {
        "reconstruction_error_histogram": plot_error_histogram(normal, faults, threshold),
        "roc": plot_roc({"float": (float_normal, float_faults), "int8 TFLite Micro": (normal, all_faults)}),
        "training_loss": plot_training_loss(trained.history),
    }


def log_training(
    *,
    run_name: str,
    config: TrainingConfig,
    selection: LakeSelection,
    dataset: DatasetSplit,
    features: FeatureSets,
    trained: TrainedModel,
    compression: CompressionResult,
    comparison: ModelComparison,
    tflm_errors: FeatureSetErrors,
    packaged: list[PackagedTarget],
    flow_run_id: str | None,
) -> str:
    """Log one training run to MLflow with its parameters, metrics, plots, Keras model and bundles.

    ``tflm_errors`` are the deployed model's errors in TFLite Micro on the run's feature sets.

    Returns:
        The MLflow run id.
    """
    experiment_id = configure_from_settings()
    plots = training_plots(trained, features, tflm_errors, packaged[0].bundle.metadata.threshold)
    with tempfile.TemporaryDirectory(prefix="tinymlops-keras-") as tmp:
        keras_path = Path(tmp) / "autoencoder.keras"
        trained.model.save(keras_path)
        run_id = log_training_run(
            experiment_id,
            params=training_params(config, features, compression),
            metrics=training_metrics(comparison, compression, packaged, trained.epochs_run),
            dataset_fingerprint=dataset.fingerprint,
            lake_selection={**selection.to_dict(), "counts": dataset.counts},
            plots=plots,
            bundles=[item.bundle for item in packaged],
            keras_model_path=keras_path,
            history=trained.history,
            tags={"fleet": selection.fleet, "train_run": run_name},
            flow_run_id=flow_run_id,
            run_name=run_name,
        )
    log.info("training run %s logged to MLflow as %s", run_name, run_id)
    return run_id


@dataclass(frozen=True)
class PromotionOutcome:
    """What happened to one registered version.

    ``refused`` lists why the rule keeps it a candidate (empty when it allows the promotion).
    """

    model_name: str
    version: str
    promoted: bool
    champion_version: str | None
    candidate_eval: dict[str, float]
    champion_eval: dict[str, float] | None
    reasons: tuple[str, ...]
    refused: tuple[str, ...] = ()

    def to_dict(self) -> dict[str, Any]:
        """Plain dict for reports."""
        return {
            "model": self.model_name,
            "version": self.version,
            "promoted": self.promoted,
            "champion_before": self.champion_version,
            "candidate": self.candidate_eval,
            "champion": self.champion_eval,
            "reasons": list(self.reasons),
            "refused": list(self.refused),
        }


def _bundle_figures(
    bundle: ModelBundle,
    normal: npt.NDArray[np.float32],
    faults: dict[str, npt.NDArray[np.float32]],
    window_seconds: float,
    speeds: WindowSpeeds,
    confidence: float,
) -> dict[str, float]:
    deployed = evaluate_bundle(
        bundle, normal, faults, window_seconds=window_seconds, speeds=speeds, confidence=confidence
    )
    return _figures(deployed["int8_tflm"])


def _figures(tflm: Evaluation) -> dict[str, float]:
    """The promotion rule's figures of a model's TFLite Micro evaluation."""
    return {
        "auc_int8": tflm.auc,
        "false_alarms_per_hour": tflm.false_alarms_per_hour,
        "f1": tflm.f1,
        "false_alarm_upper": tflm.false_alarm_upper,
        "false_positives": tflm.false_positives,
        "n_normal": tflm.n_normal,
        "confidence": tflm.confidence,
    }


def compare_and_promote(
    registered: RegisteredVersion,
    bundle: ModelBundle,
    dataset: DatasetSplit,
    *,
    window_seconds: float,
    auto_promote: bool,
    gates: QualityGateConfig,
    candidate_errors: FeatureSetErrors | None = None,
) -> PromotionOutcome:
    """Evaluate candidate and champion on the same held-out windows, record it, and promote if the rule allows.

    The rule keeps a candidate that misses the absolute gates, whatever the champion does; each
    refusal is recorded on the version (``promotion_refused`` tag and a ``refuse`` record).

    Args:
        registered: The newly registered candidate version.
        bundle: Its bundle.
        dataset: The run's held-out normal and fault windows.
        window_seconds: Duration of one window.
        auto_promote: Promote when the rule allows; otherwise only record the comparison.
        gates: The training config's gates (false-alarm limit, its confidence, minimum calibration windows).
        candidate_errors: The bundle's model's errors in TFLite Micro on these held-out windows'
            features, when the training run has them (:func:`tasks.evaluate.score_deployed_model`);
            otherwise the bundle is evaluated here, as the champion is.
    """
    name = registered.name
    speeds = WindowSpeeds(test=dataset.test_rpm, faults=dataset.fault_rpm)
    confidence = gates.false_alarm_confidence
    absolute = AbsoluteGates(gates.max_false_alarm_rate, gates.min_calibration_windows)
    if candidate_errors is None:
        candidate = _bundle_figures(bundle, dataset.test_normal, dataset.faults, window_seconds, speeds, confidence)
    else:
        threshold = bundle.metadata.threshold
        candidate = _figures(
            evaluate_scores(candidate_errors.normal, candidate_errors.faults, threshold, window_seconds, confidence)
        )
    candidate["calibration_windows"] = len(bundle.drift_reference().errors)  # the windows the threshold came from
    champion_version: str | None = None
    champion: dict[str, float] | None = None
    try:
        current = resolve(f"{name}@champion")
    except ModelNotFoundError:
        current = None
    if current is not None:
        champion_version = current.version.version
        champion = _bundle_figures(
            current.bundle, dataset.test_normal, dataset.faults, window_seconds, speeds, confidence
        )
    record_comparison(
        name,
        registered.version,
        candidate_eval=candidate,
        champion_eval=champion,
        champion_version=champion_version,
        gates=absolute,
    )
    decision = decide_promotion(candidate, champion, budget_passed=registered.gates_passed, gates=absolute)
    promoted = False
    if decision.allowed and auto_promote:
        promote(
            name,
            registered.version,
            candidate_eval=candidate,
            champion_eval={**champion, "version": champion_version} if champion is not None else None,
            actor=PROMOTION_ACTOR,
            reason="; ".join(decision.reasons),
            gates=absolute,
        )
        promoted = True
    elif not decision.allowed:
        record_refusal(name, registered.version, decision, actor=PROMOTION_ACTOR)
    log.info(
        "%s v%s: %s (%s)",
        name,
        registered.version,
        "promoted to champion" if promoted else "stays candidate",
        "; ".join(decision.reasons),
    )
    return PromotionOutcome(
        name,
        registered.version,
        promoted,
        champion_version,
        candidate,
        champion,
        decision.reasons,
        decision.failures,
    )


@task(name="log-training-run", retries=2, retry_delay_seconds=3, cache_policy=NO_CACHE)
def log_training_task(**kwargs: Any) -> str:
    """Prefect task: :func:`log_training` (a failed attempt leaves a FAILED run, nothing registered)."""
    return log_training(**kwargs)


@task(
    name="register-bundle",
    task_run_name="register-{bundle.metadata.target}",
    retries=2,
    retry_delay_seconds=3,
    cache_policy=NO_CACHE,
)
def register_bundle_task(bundle: ModelBundle, run_id: str, gates_passed: bool) -> RegisteredVersion:
    """Prefect task: register one bundle atomically (safe to retry)."""
    return register_bundle(bundle, run_id, gates_passed=gates_passed)


@task(name="compare-and-promote", task_run_name="promote-{registered.name}", cache_policy=NO_CACHE)
def compare_and_promote_task(
    registered: RegisteredVersion,
    bundle: ModelBundle,
    dataset: DatasetSplit,
    window_seconds: float,
    auto_promote: bool,
    gates: QualityGateConfig,
    candidate_errors: FeatureSetErrors | None = None,
) -> PromotionOutcome:
    """Prefect task: :func:`compare_and_promote`."""
    return compare_and_promote(
        registered,
        bundle,
        dataset,
        window_seconds=window_seconds,
        auto_promote=auto_promote,
        gates=gates,
        candidate_errors=candidate_errors,
    )
