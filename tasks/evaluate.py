"""Evaluate anomaly scores: ROC-AUC overall and per fault class, detection at the threshold, false alarms.

The same labelled feature windows are scored by the float tf-keras model, by the int8 model in the
TFLite interpreter and by the same int8 model in TensorFlow Lite Micro (what the device runs), so
the cost of each compression step and any interpreter disagreement show side by side. Targets
without an FPU run the fixed-point front end (``firmware/c/dsp_q15.c``): the deployed model is
then also scored on its features, at the threshold the float features calibrated (the one the
device gets), and held to the same gate.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from functools import partial
from typing import Any

import numpy as np
import numpy.typing as npt
from prefect import task
from prefect.cache_policies import NO_CACHE
from sklearn.metrics import roc_auc_score

from firmware.tflm import TflmRunner, tflite_predict
from tasks.datasets import DatasetSplit
from tasks.rates import DEFAULT_CONFIDENCE, rate_upper_bound
from tasks.train import (
    FeatureSets,
    Float32Array,
    Predictor,
    QualityGateConfig,
    WindowSpeeds,
    calibrate_threshold,
    check_features,
    reconstruction_error,
)
from tinymlops.contracts.dsp import DspSpec, extract_features
from tinymlops.contracts.scoring import is_anomalous
from tinymlops.errors import TinyMLOpsError
from tinymlops.schemas import ModelBundle

log = logging.getLogger(__name__)


class EvaluationError(TinyMLOpsError):
    """Scores or labelled windows cannot be evaluated."""


@dataclass(frozen=True)
class Evaluation:
    """Detection quality of one model on labelled windows.

    A window is flagged as anomalous when its score is strictly above the threshold.

    Attributes:
        threshold: Score threshold used for the detection figures.
        n_normal: Normal windows scored.
        n_fault: Fault windows scored (all classes).
        auc: ROC-AUC of normal against all fault windows.
        auc_by_fault: ROC-AUC of normal against each fault class.
        recall_by_fault: Fraction of each fault class flagged.
        precision: Flagged windows that are faults.
        recall: Fault windows flagged.
        f1: Harmonic mean of precision and recall.
        false_positives: Normal windows flagged.
        false_alarms_per_hour: False positives per hour of normal signal.
        normal_hours: Hours of normal signal scored.
        false_alarm_rate: Fraction of normal windows flagged.
        false_alarm_upper: One-sided Clopper-Pearson upper bound of that fraction at ``confidence``:
            what ``n_normal`` windows can vouch for (0 of 86 windows still allows 3.4 % at 95 %).
        confidence: Confidence of ``false_alarm_upper``.

    """

    threshold: float
    n_normal: int
    n_fault: int
    auc: float
    auc_by_fault: dict[str, float]
    recall_by_fault: dict[str, float]
    precision: float
    recall: float
    f1: float
    false_positives: int
    false_alarms_per_hour: float
    normal_hours: float
    false_alarm_rate: float
    false_alarm_upper: float
    confidence: float

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable dict."""
        return asdict(self)


def _scores(values: npt.ArrayLike, name: str) -> npt.NDArray[np.float64]:
    s = np.asarray(values, dtype=np.float64).ravel()
    if s.size == 0:
        raise EvaluationError(f"no {name} scores to evaluate")
    if not np.isfinite(s).all():
        raise EvaluationError(f"{name} scores contain {int((~np.isfinite(s)).sum())} NaN or infinite values")
    return s


def _auc(normal: npt.NDArray[np.float64], fault: npt.NDArray[np.float64]) -> float:
    labels = np.concatenate([np.zeros(normal.size), np.ones(fault.size)])
    return float(roc_auc_score(labels, np.concatenate([normal, fault])))


def evaluate_scores(
    scores_normal: npt.ArrayLike,
    scores_by_fault: Mapping[str, npt.ArrayLike],
    threshold: float,
    window_seconds: float,
    confidence: float = DEFAULT_CONFIDENCE,
) -> Evaluation:
    """Compute detection metrics from anomaly scores (higher means more anomalous).

    Args:
        scores_normal: Scores of normal windows never used in training or calibration.
        scores_by_fault: Scores of fault windows by fault class.
        threshold: Flag a window when its score is above this.
        window_seconds: Duration of one window, to express false alarms per hour.
        confidence: Confidence of the upper bound of the false-alarm rate.

    Returns:
        The evaluation.

    Raises:
        EvaluationError: No normal or fault scores, non-finite scores, or a non-positive window duration.

    """
    if not window_seconds > 0:
        raise EvaluationError(f"window duration must be positive, got {window_seconds} s")
    if not np.isfinite(threshold):
        raise EvaluationError(f"threshold must be finite, got {threshold}")
    normal = _scores(scores_normal, "normal")
    if not scores_by_fault:
        raise EvaluationError("no fault classes to evaluate against")
    faults = {name: _scores(values, f"fault class {name!r}") for name, values in scores_by_fault.items()}
    every_fault = np.concatenate(list(faults.values()))
    true_positives = int(np.sum(is_anomalous(every_fault, threshold)))
    false_positives = int(np.sum(is_anomalous(normal, threshold)))
    flagged = true_positives + false_positives
    precision = true_positives / flagged if flagged else 0.0
    recall = true_positives / every_fault.size
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    normal_hours = normal.size * window_seconds / 3600.0
    return Evaluation(
        threshold=float(threshold),
        n_normal=int(normal.size),
        n_fault=int(every_fault.size),
        auc=_auc(normal, every_fault),
        auc_by_fault={name: _auc(normal, s) for name, s in faults.items()},
        recall_by_fault={name: float(np.mean(is_anomalous(s, threshold))) for name, s in faults.items()},
        precision=float(precision),
        recall=float(recall),
        f1=float(f1),
        false_positives=false_positives,
        false_alarms_per_hour=false_positives / normal_hours,
        normal_hours=normal_hours,
        false_alarm_rate=false_positives / normal.size,
        false_alarm_upper=rate_upper_bound(false_positives, int(normal.size), confidence),
        confidence=confidence,
    )


@dataclass(frozen=True)
class ModelComparison:
    """Evaluations of several models (by name) on the same labelled windows."""

    evaluations: dict[str, Evaluation]

    def __getitem__(self, name: str) -> Evaluation:
        return self.evaluations[name]

    def to_table(self) -> list[dict[str, Any]]:
        """One row per model with rounded, report-ready columns (for markdown or a rich table)."""
        rows = []
        for name, ev in self.evaluations.items():
            row: dict[str, Any] = {"model": name, "auc": round(ev.auc, 4)}
            row.update({f"auc_{fault}": round(auc, 4) for fault, auc in ev.auc_by_fault.items()})
            row.update(
                {
                    "precision": round(ev.precision, 4),
                    "recall": round(ev.recall, 4),
                    "f1": round(ev.f1, 4),
                    "false_alarms_per_hour": round(ev.false_alarms_per_hour, 1),
                    "false_alarm_rate": round(ev.false_alarm_rate, 4),
                    "false_alarm_upper": round(ev.false_alarm_upper, 4),
                    "confidence": ev.confidence,
                    "normal_windows": ev.n_normal,
                    "threshold": round(ev.threshold, 4),
                }
            )
            rows.append(row)
        return rows

    def to_markdown(self) -> str:
        """Return :meth:`to_table` as a markdown table, one column per model and one row per figure.

        Transposed so that it stays readable at a normal width: a figure per fault class would make
        one row per model wider than a page.
        """
        rows = self.to_table()
        if not rows:
            return ""
        figures = [column for column in rows[0] if column != "model"]
        lines = ["| figure | " + " | ".join(str(row["model"]) for row in rows) + " |", "|" + "---|" * (len(rows) + 1)]
        lines += ["| " + " | ".join([figure, *(str(row.get(figure, "")) for row in rows)]) + " |" for figure in figures]
        return "\n".join(lines)

    def to_dict(self) -> dict[str, dict[str, Any]]:
        """Return a JSON-serialisable dict: model name to evaluation."""
        return {name: ev.to_dict() for name, ev in self.evaluations.items()}

    def to_json(self) -> str:
        """Return :meth:`to_dict` as JSON text."""
        return json.dumps(self.to_dict(), indent=2)


@dataclass(frozen=True)
class FeatureSetErrors:
    """One model's reconstruction errors on a run's calibration, held-out normal and fault features.

    The deployed model's errors in TFLite Micro are computed once per training run
    (:func:`score_deployed_model`) and reused by every step that needs them: the evaluation, the
    fixed-point evaluation's threshold, the drift reference, the MLflow plots and the promotion.
    """

    calibration: Float32Array
    normal: Float32Array
    faults: dict[str, Float32Array]


def score_feature_sets(
    predict: Predictor, normal: npt.ArrayLike, faults: Mapping[str, npt.ArrayLike], calibration: npt.ArrayLike
) -> FeatureSetErrors:
    """Score the calibration, normal and fault features with one predictor."""
    return FeatureSetErrors(
        calibration=reconstruction_error(predict, calibration),
        normal=reconstruction_error(predict, normal),
        faults={fault: reconstruction_error(predict, x) for fault, x in faults.items()},
    )


def score_deployed_model(int8_model: bytes, arena_bytes: int, features: FeatureSets) -> FeatureSetErrors:
    """The deployed model's errors in TFLite Micro (in its measured arena) on the run's feature sets."""
    runner = TflmRunner(int8_model, arena_bytes)
    return score_feature_sets(runner.predict, features.test_normal, features.faults, features.parts.calibration)


def _feature_set_scorer(
    normal: npt.ArrayLike, faults: Mapping[str, npt.ArrayLike], calibration: npt.ArrayLike
) -> Callable[[Predictor], FeatureSetErrors]:
    """Check the feature sets once; return a function scoring them with a predictor."""
    x_normal = check_features(normal, name="normal features")
    x_faults = {name: check_features(x, name=f"{name} features") for name, x in faults.items()}
    x_calibration = check_features(calibration, name="calibration features")
    return partial(score_feature_sets, normal=x_normal, faults=x_faults, calibration=x_calibration)


def evaluate_predictors(
    predictors: Mapping[str, Predictor],
    normal: npt.ArrayLike,
    faults: Mapping[str, npt.ArrayLike],
    calibration: npt.ArrayLike,
    *,
    percentile: float,
    window_seconds: float,
    confidence: float = DEFAULT_CONFIDENCE,
) -> ModelComparison:
    """Score the same windows with each predictor, each with its own threshold from calibration windows.

    Args:
        predictors: Name to a callable mapping features (n, F) to reconstructions.
        normal: Held-out normal features (neither trained on nor used for calibration).
        faults: Fault features by fault class.
        calibration: Held-out normal features that set each model's threshold.
        percentile: Threshold percentile of the calibration errors.
        window_seconds: Duration of one window.
        confidence: Confidence of the upper bound of the false-alarm rate.

    Returns:
        The evaluations by predictor name.

    """
    score = _feature_set_scorer(normal, faults, calibration)
    errors = {name: score(predict) for name, predict in predictors.items()}
    return evaluate_errors(errors, percentile=percentile, window_seconds=window_seconds, confidence=confidence)


def evaluate_errors(
    errors: Mapping[str, FeatureSetErrors],
    *,
    percentile: float,
    window_seconds: float,
    confidence: float = DEFAULT_CONFIDENCE,
) -> ModelComparison:
    """Evaluate models from their errors on the same windows, each at the threshold its calibration errors set.

    Args:
        errors: Name to the model's errors on the calibration, normal and fault features.
        percentile: Threshold percentile of the calibration errors.
        window_seconds: Duration of one window.
        confidence: Confidence of the upper bound of the false-alarm rate.
    """
    evaluations = {}
    for name, scored in errors.items():
        threshold = calibrate_threshold(scored.calibration, percentile)
        evaluations[name] = evaluate_scores(scored.normal, scored.faults, threshold, window_seconds, confidence)
        log.info(
            "%s: AUC %.4f, F1 %.4f at threshold %.4g", name, evaluations[name].auc, evaluations[name].f1, threshold
        )
    return ModelComparison(evaluations)


def evaluate_models(
    float_model: Any,
    int8_model: bytes,
    normal: npt.ArrayLike,
    faults: Mapping[str, npt.ArrayLike],
    calibration: npt.ArrayLike,
    *,
    percentile: float,
    window_seconds: float,
    arena_bytes: int | None = None,
    extra_tflite: Mapping[str, bytes] | None = None,
    confidence: float = DEFAULT_CONFIDENCE,
    tflm_errors: FeatureSetErrors | None = None,
) -> ModelComparison:
    """Evaluate the float model, the int8 model in TFLite and the int8 model in TFLite Micro.

    Args:
        float_model: The float tf-keras autoencoder.
        int8_model: The int8 TFLite flatbuffer to deploy.
        normal: Held-out normal features.
        faults: Fault features by fault class.
        calibration: Held-out normal features that set each model's threshold.
        percentile: Threshold percentile of the calibration errors.
        window_seconds: Duration of one window.
        arena_bytes: TFLite Micro tensor arena (default ten times the model size).
        extra_tflite: Further TFLite models to score the same way (for example the dynamic-range one).
        confidence: Confidence of the upper bound of the false-alarm rate.
        tflm_errors: The int8 model's errors in TFLite Micro on these same sets, when the run has
            them already (:func:`score_deployed_model`); scored here otherwise.

    Returns:
        Evaluations named ``float``, ``int8_tflite`` and ``int8_tflm``.

    """
    score = _feature_set_scorer(normal, faults, calibration)
    if tflm_errors is None:
        tflm_errors = score(TflmRunner(int8_model, arena_bytes).predict)
    errors = {
        "float": score(float_model),
        "int8_tflite": score(partial(tflite_predict, int8_model)),
        "int8_tflm": tflm_errors,
    }
    errors |= {name: score(partial(tflite_predict, model)) for name, model in (extra_tflite or {}).items()}
    return evaluate_errors(errors, percentile=percentile, window_seconds=window_seconds, confidence=confidence)


class QualityGateError(TinyMLOpsError):
    """The evaluated model misses a quality limit; the message lists each measured value and its limit."""


def quality_failures(comparison: ModelComparison, gates: QualityGateConfig) -> list[str]:
    """Return one line per quality limit the comparison misses (empty when it passes).

    Args:
        comparison: Evaluations named ``float``, ``int8_tflite`` and ``int8_tflm`` on the same windows,
            and :data:`FIXED_POINT_EVALUATION` when a target runs the fixed-point front end.
        gates: The limits.
    """
    auc_float = comparison["float"].auc
    auc_int8 = comparison["int8_tflite"].auc
    auc_tflm = comparison["int8_tflm"].auc
    failures = []
    if auc_int8 < gates.min_auc_int8:
        failures.append(f"int8 ROC-AUC {auc_int8:.4f} < {gates.min_auc_int8:.4f}")
    if auc_float - auc_int8 > gates.max_auc_loss_int8:
        failures.append(f"AUC loss float->int8 {auc_float - auc_int8:.4f} > {gates.max_auc_loss_int8:.4f}")
    if abs(auc_int8 - auc_tflm) > gates.max_auc_gap_tflm:
        failures.append(f"AUC gap TFLite vs TFLM {abs(auc_int8 - auc_tflm):.4f} > {gates.max_auc_gap_tflm:.4f}")
    if FIXED_POINT_EVALUATION in comparison.evaluations:
        auc_q15 = comparison[FIXED_POINT_EVALUATION].auc
        if auc_q15 < gates.min_auc_int8:
            failures.append(f"int8 ROC-AUC on fixed-point features {auc_q15:.4f} < {gates.min_auc_int8:.4f}")
        if abs(auc_tflm - auc_q15) > gates.max_auc_gap_tflm:
            failures.append(
                f"AUC gap float vs fixed-point features {abs(auc_tflm - auc_q15):.4f} > {gates.max_auc_gap_tflm:.4f}"
            )
    return failures


FIXED_POINT_EVALUATION = "int8_tflm_q15"


def evaluate_fixed_point(
    int8_model: bytes,
    normal_windows: npt.ArrayLike,
    fault_windows: Mapping[str, npt.ArrayLike],
    spec: DspSpec,
    *,
    threshold: float,
    window_seconds: float,
    arena_bytes: int | None = None,
    speeds: WindowSpeeds | None = None,
) -> Evaluation:
    """Score the deployed model in TFLite Micro on the fixed-point front end's features.

    Args:
        int8_model: The int8 TFLite flatbuffer to deploy.
        normal_windows: Held-out normal windows (physical units).
        fault_windows: Fault windows by fault class.
        spec: The fitted DSP spec.
        threshold: The threshold the device is sent (calibrated on the float features' errors in TFLite Micro).
        window_seconds: Duration of one window.
        arena_bytes: TFLite Micro tensor arena.
        speeds: Shaft speed of the normal (``test``) and fault windows, NaN where not known.

    Returns:
        The evaluation named :data:`FIXED_POINT_EVALUATION`.
    """
    from firmware.dsp_q15 import features_q15

    speeds = speeds or WindowSpeeds()
    predict = TflmRunner(int8_model, arena_bytes).predict
    normal = check_features(features_q15(normal_windows, spec, rpm=speeds.test), name="normal features")
    faults = {
        name: check_features(features_q15(windows, spec, rpm=speeds.faults.get(name)), name=f"{name} features")
        for name, windows in fault_windows.items()
    }
    evaluation = evaluate_scores(
        reconstruction_error(predict, normal),
        {name: reconstruction_error(predict, x) for name, x in faults.items()},
        threshold,
        window_seconds,
    )
    log.info(
        "%s: AUC %.4f, F1 %.4f at threshold %.4g", FIXED_POINT_EVALUATION, evaluation.auc, evaluation.f1, threshold
    )
    return evaluation


def with_fixed_point(comparison: ModelComparison, fixed_point: Evaluation) -> ModelComparison:
    """The comparison with the fixed-point evaluation added (the quality gate then checks it too)."""
    return ModelComparison({**comparison.evaluations, FIXED_POINT_EVALUATION: fixed_point})


def enforce_quality(comparison: ModelComparison, gates: QualityGateConfig) -> None:
    """Raise :class:`QualityGateError` naming every missed limit with its measured value."""
    failures = quality_failures(comparison, gates)
    if failures:
        raise QualityGateError("model fails the quality gate: " + "; ".join(failures))


@task(name="evaluate-fixed-point", cache_policy=NO_CACHE)
def evaluate_fixed_point_task(
    int8_model: bytes,
    dataset: DatasetSplit,
    spec: DspSpec,
    *,
    threshold: float,
    window_seconds: float,
    arena_bytes: int,
) -> Evaluation:
    """Prefect task: the deployed model on the fixed-point features of the held-out windows."""
    return evaluate_fixed_point(
        int8_model,
        dataset.test_normal,
        dataset.faults,
        spec,
        threshold=threshold,
        window_seconds=window_seconds,
        arena_bytes=arena_bytes,
        speeds=WindowSpeeds(test=dataset.test_rpm, faults=dataset.fault_rpm),
    )


@task(name="evaluate-models", cache_policy=NO_CACHE)
def evaluate_models_task(
    float_model: Any,
    int8_model: bytes,
    features: FeatureSets,
    *,
    percentile: float,
    window_seconds: float,
    arena_bytes: int,
    extra_tflite: Mapping[str, bytes] | None = None,
    confidence: float = DEFAULT_CONFIDENCE,
    tflm_errors: FeatureSetErrors | None = None,
) -> ModelComparison:
    """Prefect task: evaluate float, int8 TFLite and int8 TFLite Micro on the held-out features."""
    return evaluate_models(
        float_model,
        int8_model,
        features.test_normal,
        features.faults,
        features.parts.calibration,
        percentile=percentile,
        window_seconds=window_seconds,
        arena_bytes=arena_bytes,
        extra_tflite=extra_tflite,
        confidence=confidence,
        tflm_errors=tflm_errors,
    )


score_deployed_model_task = task(name="score-deployed-model", cache_policy=NO_CACHE)(score_deployed_model)


def evaluate_bundle(
    bundle: ModelBundle,
    normal: npt.ArrayLike,
    faults: Mapping[str, npt.ArrayLike],
    *,
    window_seconds: float,
    speeds: WindowSpeeds | None = None,
    confidence: float = DEFAULT_CONFIDENCE,
) -> ModelComparison:
    """Evaluate a bundle's models on labelled windows, at the threshold the bundle ships with.

    Evaluates the int8 model in TFLite and in TFLite Micro (in the bundle's arena), and the float
    model when the bundle carries it. The DSP front end is the bundle's own fitted spec.

    Args:
        bundle: A verified model bundle.
        normal: Normal windows (n, window_samples) in g.
        faults: Fault windows by class.
        window_seconds: Duration of one window.
        speeds: Shaft speed of the normal (``test``) and fault windows, NaN where not known.
        confidence: Confidence of the upper bound of the false-alarm rate.
    """
    speeds = speeds or WindowSpeeds()
    spec = bundle.dsp_spec()
    x_normal = extract_features(normal, spec, speeds.test)
    x_faults = {name: extract_features(rows, spec, speeds.faults.get(name)) for name, rows in faults.items()}
    int8 = bundle.tflite()
    predictors: dict[str, Predictor] = {}
    float_model = bundle.float_tflite()
    if float_model is not None:
        predictors["float"] = partial(tflite_predict, float_model)
    predictors["int8_tflite"] = partial(tflite_predict, int8)
    predictors["int8_tflm"] = TflmRunner(int8, bundle.metadata.arena_bytes).predict
    threshold = bundle.metadata.threshold
    return ModelComparison(
        {
            name: evaluate_scores(
                reconstruction_error(predict, x_normal),
                {fault: reconstruction_error(predict, x) for fault, x in x_faults.items()},
                threshold,
                window_seconds,
                confidence,
            )
            for name, predict in predictors.items()
        }
    )
