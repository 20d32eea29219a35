"""Evaluation: metrics on hand-checkable scores, per-model comparison, TFLite and TFLite Micro agreement."""

from __future__ import annotations

import json

import numpy as np
import pytest

from tasks.compress import to_tflite_int8
from tasks.evaluate import EvaluationError, ModelComparison, evaluate_models, evaluate_predictors, evaluate_scores
from tasks.rates import rate_lower_bound, rate_upper_bound
from tasks.train import TrainingConfig, train_autoencoder


def test_metrics_by_hand() -> None:
    normal = [0.1, 0.2, 0.3, 0.4]
    faults = {"inner": [0.5, 0.6], "ball": [0.35, 0.9]}
    ev = evaluate_scores(normal, faults, threshold=0.32, window_seconds=0.04)
    # Flagged: normal 0.4 (one false positive), all four fault windows.
    assert (ev.n_normal, ev.n_fault, ev.false_positives) == (4, 4, 1)
    assert ev.precision == pytest.approx(4 / 5)
    assert ev.recall == pytest.approx(1.0)
    assert ev.f1 == pytest.approx(2 * 0.8 / 1.8)
    assert ev.recall_by_fault == {"inner": 1.0, "ball": 1.0}
    # ball 0.35 beats 3 of 4 normal scores, 0.9 beats all: 7/8; inner beats all; overall 15/16.
    assert ev.auc_by_fault == {"inner": pytest.approx(1.0), "ball": pytest.approx(7 / 8)}
    assert ev.auc == pytest.approx(15 / 16)
    # 4 windows x 0.04 s = 0.16 s of normal signal; one false alarm in it.
    assert ev.normal_hours == pytest.approx(0.16 / 3600)
    assert ev.false_alarms_per_hour == pytest.approx(3600 / 0.16)


def test_false_alarm_upper_bound_is_the_exact_binomial_one() -> None:
    from scipy.stats import binom

    # no false alarm: 1 - (1 - confidence)^(1/n); 0 of 299 vouches for 1.0 %, 0 of 86 only for 3.4 %
    assert rate_upper_bound(0, 299) == pytest.approx(1 - 0.05 ** (1 / 299)) == pytest.approx(0.00997, abs=1e-5)
    assert rate_upper_bound(0, 86) == pytest.approx(0.0343, abs=1e-4)
    # k of n: the rate at which seeing k or fewer has probability 1 - confidence (Clopper-Pearson)
    for k, n, confidence in [(3, 25, 0.95), (8, 70, 0.95), (2, 332, 0.99)]:
        upper = rate_upper_bound(k, n, confidence)
        assert binom.cdf(k, n, upper) == pytest.approx(1 - confidence)
        assert upper > k / n > rate_lower_bound(k, n, confidence)
    assert rate_upper_bound(0, 0) == rate_upper_bound(5, 5) == 1.0
    for bad in [(3, 2, 0.95), (-1, 5, 0.95), (0, 5, 1.0)]:
        with pytest.raises(ValueError, match="must be in"):
            rate_upper_bound(*bad)

    ev = evaluate_scores([0.1, 0.2, 0.3, 0.4], {"f": [0.5]}, threshold=0.32, window_seconds=0.04)
    assert (ev.false_positives, ev.n_normal, ev.confidence) == (1, 4, 0.95)
    assert ev.false_alarm_upper == pytest.approx(rate_upper_bound(1, 4))
    strict = evaluate_scores([0.1, 0.2, 0.3, 0.4], {"f": [0.5]}, threshold=0.32, window_seconds=0.04, confidence=0.99)
    assert strict.false_alarm_upper > ev.false_alarm_upper
    (row,) = ModelComparison({"m": ev}).to_table()
    assert (row["false_alarm_upper"], row["confidence"], row["normal_windows"]) == (
        round(ev.false_alarm_upper, 4),
        0.95,
        4,
    )


def test_score_equal_to_threshold_is_not_flagged() -> None:
    ev = evaluate_scores([1.0, 2.0], {"f": [2.0, 3.0]}, threshold=2.0, window_seconds=1.0)
    assert ev.false_positives == 0
    assert ev.recall == pytest.approx(0.5)
    assert ev.false_alarms_per_hour == 0.0


def test_separable_scores_give_auc_one_and_identical_give_half() -> None:
    rng = np.random.default_rng(0)
    normal = rng.uniform(0, 1, 500)
    separable = evaluate_scores(normal, {"a": normal + 2.0}, threshold=1.5, window_seconds=0.04)
    assert separable.auc == 1.0 and separable.f1 == 1.0 and separable.false_positives == 0
    identical = evaluate_scores(normal, {"a": normal.copy()}, threshold=1.5, window_seconds=0.04)
    assert identical.auc == pytest.approx(0.5)
    same_distribution = evaluate_scores(normal, {"a": rng.uniform(0, 1, 500)}, threshold=0.5, window_seconds=0.04)
    assert abs(same_distribution.auc - 0.5) < 0.06
    # Nothing flagged: precision is defined as 0, not a division error.
    none_flagged = evaluate_scores(normal, {"a": normal}, threshold=5.0, window_seconds=0.04)
    assert (none_flagged.precision, none_flagged.recall, none_flagged.f1) == (0.0, 0.0, 0.0)


@pytest.mark.parametrize(
    ("normal", "faults", "threshold", "seconds", "message"),
    [
        ([], {"a": [1.0]}, 0.5, 1.0, "no normal scores"),
        ([0.1], {}, 0.5, 1.0, "no fault classes"),
        ([0.1], {"a": []}, 0.5, 1.0, "no fault class 'a' scores"),
        ([0.1, np.nan], {"a": [1.0]}, 0.5, 1.0, "normal scores contain 1 NaN"),
        ([0.1], {"a": [1.0]}, 0.5, 0.0, "window duration must be positive"),
        ([0.1], {"a": [1.0]}, float("nan"), 1.0, "threshold must be finite"),
    ],
)
def test_bad_scores_raise(normal: list[float], faults: dict, threshold: float, seconds: float, message: str) -> None:
    with pytest.raises(EvaluationError, match=message):
        evaluate_scores(normal, faults, threshold, seconds)


def subspace_features(n: int, seed: int, fault: bool = False) -> np.ndarray:
    """Normal rows live in the first 3 of 6 dimensions; fault rows also have energy in the rest."""
    rng = np.random.default_rng(seed)
    x = np.zeros((n, 6), dtype=np.float32)
    x[:, :3] = rng.standard_normal((n, 3))
    if fault:
        x[:, 3:] = 2.0 * rng.standard_normal((n, 3))
    return x


def test_evaluate_predictors_calibrates_each_model_and_serialises() -> None:
    def projector(x: np.ndarray) -> np.ndarray:  # reconstructs the normal subspace perfectly
        return np.concatenate([x[:, :3], np.zeros_like(x[:, 3:])], axis=1)

    def zeros(x: np.ndarray) -> np.ndarray:  # reconstructs nothing: error is the row energy
        return np.zeros_like(x)

    comparison = evaluate_predictors(
        {"projector": projector, "zeros": zeros},
        subspace_features(200, seed=1),
        {"fault": subspace_features(100, seed=2, fault=True)},
        subspace_features(200, seed=3),
        percentile=99.0,
        window_seconds=0.04,
    )
    assert comparison["projector"].auc == 1.0
    assert comparison["projector"].threshold == 0.0
    assert comparison["zeros"].auc < 0.99
    assert comparison["zeros"].threshold > 0.0
    table = comparison.to_table()
    assert [row["model"] for row in table] == ["projector", "zeros"]
    assert table[0]["auc_fault"] == 1.0
    markdown = comparison.to_markdown()
    assert markdown.startswith("| figure | projector | zeros |")  # a column per model: narrow with many faults
    assert f"| auc_fault | 1.0 | {table[1]['auc_fault']} |" in markdown
    assert json.loads(comparison.to_json())["zeros"]["auc"] == pytest.approx(comparison["zeros"].auc)
    assert ModelComparison({}).to_markdown() == ""


def test_float_tflite_and_tflm_agree() -> None:
    """The int8 model scores the same in the TFLite interpreter and in TFLite Micro."""
    config = TrainingConfig.model_validate({"hidden": [8, 3, 8], "epochs": 30, "learning_rate": 0.02, "seed": 1})
    train, val = subspace_features(256, seed=1), subspace_features(64, seed=2)
    model = train_autoencoder(train, val, config).model
    int8_model = to_tflite_int8(model, train[:100])
    comparison = evaluate_models(
        model,
        int8_model,
        subspace_features(100, seed=3),
        {"fault": subspace_features(60, seed=4, fault=True)},
        subspace_features(100, seed=5),
        percentile=99.0,
        window_seconds=0.04,
    )
    assert list(comparison.evaluations) == ["float", "int8_tflite", "int8_tflm"]
    assert comparison["float"].auc > 0.95
    assert abs(comparison["float"].auc - comparison["int8_tflite"].auc) <= 0.02
    assert abs(comparison["int8_tflite"].auc - comparison["int8_tflm"].auc) <= 0.01
    assert comparison["int8_tflm"].threshold == pytest.approx(comparison["int8_tflite"].threshold, rel=0.05)
