"""Training: committed config, splits, featurization, reproducible training, early stopping, threshold."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from tasks.lake import LakeWindows
from tasks.train import (
    TrainingConfig,
    TrainingData,
    TrainingDataError,
    calibrate_threshold,
    calibrated_false_alarm_rate,
    check_features,
    dense_macs,
    dense_params,
    featurize,
    fit_feature_spec,
    load_training_config,
    prepare_training_data,
    reconstruction_error,
    train_autoencoder,
)
from tinymlops.contracts.dsp import DspSpec, raw_features
from tinymlops.errors import ConfigError
from tinymlops.settings import get_settings

# MLPerf Tiny anomaly-detection reference autoencoder: 640-128x4-8-128x4-640.
REFERENCE_LAYERS = [640, 128, 128, 128, 128, 8, 128, 128, 128, 128, 640]


def low_rank_features(n: int, n_features: int = 12, seed: int = 0) -> np.ndarray:
    """Normal-like features: 3 latent factors plus a little noise, float32."""
    rng = np.random.default_rng(seed)
    mixing = np.random.default_rng(99).standard_normal((3, n_features))
    x = rng.standard_normal((n, 3)) @ mixing + 0.1 * rng.standard_normal((n, n_features))
    return x.astype(np.float32)


def tiny_config(**overrides: object) -> TrainingConfig:
    values: dict[str, object] = {"hidden": [6, 3, 6], "epochs": 4, "batch_size": 32, "patience": 3, "seed": 7}
    values.update(overrides)
    return TrainingConfig.model_validate(values)


def sine_windows(n: int, spec: DspSpec, seed: int) -> np.ndarray:
    """Vibration-like windows: a shaft tone of random phase plus broadband noise."""
    rng = np.random.default_rng(seed)
    t = np.arange(spec.window_samples) / spec.sample_rate_hz
    phase = rng.uniform(0, 2 * np.pi, (n, 1))
    return (np.sin(2 * np.pi * 30.0 * t + phase) + 0.2 * rng.standard_normal((n, spec.window_samples))).astype(
        np.float32
    )


# --- configuration -----------------------------------------------------------------------------


def test_committed_config_loads_and_is_10x_smaller_than_mlperf_reference() -> None:
    config = load_training_config(get_settings().training_config)
    assert config.threshold_percentile == pytest.approx(99.5)
    assert config.quantization.mode in ("qat", "ptq")
    layers = [DspSpec().n_features, *config.hidden, DspSpec().n_features]
    assert dense_macs(layers) * 10 <= dense_macs(REFERENCE_LAYERS)
    assert dense_params(layers) * 10 <= dense_params(REFERENCE_LAYERS)


def test_dense_counts_by_hand() -> None:
    assert dense_macs([3, 2, 3]) == 3 * 2 + 2 * 3
    assert dense_params([3, 2, 3]) == (3 * 2 + 2) + (2 * 3 + 3)
    assert dense_macs(REFERENCE_LAYERS) == 264_192


@pytest.mark.parametrize(
    ("text", "field"),
    [
        ("pruning:\n  target_sparsity: 1.5\n", "pruning.target_sparsity"),
        ("quantization:\n  mode: fp16\n", "quantization.mode"),
        ("epochs: 0\n", "epochs"),
        ("hidden: [8, 0, 8]\n", "hidden"),
        ("learning_rte: 0.1\n", "learning_rte"),
        ("pruning:\n  begin_step: 50\n  end_step: 10\n", "pruning"),
    ],
)
def test_invalid_config_names_the_field(tmp_path: Path, text: str, field: str) -> None:
    path = tmp_path / "training.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_training_config(path)
    message = str(info.value)
    assert f": {field}" in message
    assert "\n" not in message


@pytest.mark.parametrize(("text", "words"), [("- a\n- b\n", "must be a mapping"), ("a: [1,\n", "not valid YAML")])
def test_config_that_is_not_a_mapping(tmp_path: Path, text: str, words: str) -> None:
    path = tmp_path / "training.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=words):
        load_training_config(path)


def test_missing_config_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read training config"):
        load_training_config(tmp_path / "nope.yaml")


# --- data split and features -------------------------------------------------------------------


def test_split_is_disjoint_seeded_and_sized() -> None:
    rows = np.arange(100)
    split = TrainingData.split(rows, validation_fraction=0.2, calibration_fraction=0.1, seed=3)
    assert (len(split.train), len(split.validation), len(split.calibration)) == (70, 20, 10)
    parts = [set(split.train), set(split.validation), set(split.calibration)]
    assert set().union(*parts) == set(range(100))
    assert sum(len(p) for p in parts) == 100
    again = TrainingData.split(rows, validation_fraction=0.2, calibration_fraction=0.1, seed=3)
    other = TrainingData.split(rows, validation_fraction=0.2, calibration_fraction=0.1, seed=4)
    assert np.array_equal(split.calibration, again.calibration)
    assert not np.array_equal(split.calibration, other.calibration)


def test_too_few_windows_names_count_and_minimum() -> None:
    with pytest.raises(TrainingDataError, match=r"too few normal windows to train: 20 < minimum 32"):
        TrainingData.split(np.zeros((20, 4)), validation_fraction=0.2, calibration_fraction=0.2, seed=0)


def test_nan_features_are_rejected_with_counts() -> None:
    x = np.zeros((10, 4), dtype=np.float32)
    x[2, 1] = np.nan
    x[5, :2] = np.inf
    with pytest.raises(TrainingDataError, match=r"3 NaN or infinite values in 2 of 10 rows"):
        check_features(x)


def test_train_rejects_too_few_and_nan() -> None:
    config = tiny_config(min_windows=32)
    with pytest.raises(TrainingDataError, match=r"too few training windows: 10 < minimum 32"):
        train_autoencoder(low_rank_features(10), low_rank_features(5), config)
    bad = low_rank_features(64)
    bad[0, 0] = np.nan
    with pytest.raises(TrainingDataError, match="training features contain 1 NaN"):
        train_autoencoder(bad, low_rank_features(8), config)


def test_normalisation_is_fitted_on_train_windows_only() -> None:
    spec = DspSpec()
    windows = np.concatenate([sine_windows(40, spec, seed=1), 3.0 * sine_windows(40, spec, seed=2)])
    config = tiny_config(validation_fraction=0.25, calibration_fraction=0.25)
    features, fitted = prepare_training_data(windows, spec, config)
    assert (len(features.train), len(features.validation), len(features.calibration)) == (40, 20, 20)
    assert features.train.shape[1] == spec.n_features
    # Train features are standardised; the held-out parts use the train statistics, not their own.
    assert np.allclose(features.train.mean(axis=0), 0.0, atol=1e-4)
    split = TrainingData.split(windows, validation_fraction=0.25, calibration_fraction=0.25, seed=config.seed)
    assert np.allclose(fitted.mean, raw_features(split.train, spec).mean(axis=0), atol=1e-5)
    assert not np.allclose(fitted.mean, raw_features(windows, spec).mean(axis=0), atol=1e-3)


def test_featurize_checks_lake_sample_rate() -> None:
    spec = DspSpec()
    samples = sine_windows(4, spec, seed=0)
    n = len(samples)

    def lake(rate: int) -> LakeWindows:
        return LakeWindows(
            samples,
            rate,
            np.array(["f"] * n),
            np.array(["d"] * n),
            np.arange(n),
            np.arange(n),
            np.array([None] * n, dtype=object),
            np.array(["test"] * n, dtype=object),
        )

    fitted = fit_feature_spec(lake(spec.sample_rate_hz), spec)
    assert featurize(lake(spec.sample_rate_hz), fitted).shape == (n, spec.n_features)
    with pytest.raises(TrainingDataError, match="sampled at 12000 Hz but the DSP spec expects 25600 Hz"):
        featurize(lake(12_000), fitted)


# --- errors and threshold ----------------------------------------------------------------------


def test_reconstruction_error_is_row_mse() -> None:
    x = np.array([[1.0, 2.0], [3.0, -1.0]], dtype=np.float32)
    assert np.allclose(reconstruction_error(lambda v: v, x), [0.0, 0.0])
    assert np.allclose(reconstruction_error(np.zeros_like, x), [2.5, 5.0])
    with pytest.raises(TrainingDataError, match="reconstruction has shape"):
        reconstruction_error(lambda v: v[:, :1], x)


def test_threshold_is_the_conformal_order_statistic_of_the_calibration_errors() -> None:
    errors = np.arange(1, 1001, dtype=np.float32)
    threshold = calibrate_threshold(errors, 99.5)
    assert threshold == 996.0  # ceil(1001 * 0.995) = 996th smallest
    assert np.mean(errors > threshold) == pytest.approx(0.004)
    assert calibrated_false_alarm_rate(1000, 99.5) == pytest.approx(5 / 1001)
    assert calibrate_threshold(np.arange(11), 90) == 10.0  # ceil(12 * 0.9) = 11th: the largest
    assert calibrated_false_alarm_rate(11, 90) == pytest.approx(1 / 12)
    assert calibrate_threshold([4.0, 1.0, 3.0], 100) == pytest.approx(4.0)
    with pytest.raises(ValueError, match="percentile"):
        calibrate_threshold(errors, 0)
    with pytest.raises(ValueError, match="calibration windows"):
        calibrated_false_alarm_rate(0, 99)
    with pytest.raises(TrainingDataError, match="NaN"):
        calibrate_threshold([1.0, np.nan], 99)
    with pytest.raises(TrainingDataError, match="no calibration errors"):
        calibrate_threshold([], 99)


@pytest.mark.parametrize("n_calibration", [20, 64, 400])
def test_calibrated_rate_is_what_new_normal_windows_exceed(n_calibration: int) -> None:
    # 4,000 draws of a calibration set: new normal errors exceed the threshold at the promised rate
    # on average (64 windows at the 99.5th percentile promise 1/65, not 0.5%, and deliver it)
    rng = np.random.default_rng(3)
    calibrations = rng.gamma(2.0, size=(4000, n_calibration))
    thresholds = np.array([calibrate_threshold(c, 99.5) for c in calibrations])
    exceed = np.mean(rng.gamma(2.0, size=(4000, 200)) > thresholds[:, None])
    promised = calibrated_false_alarm_rate(n_calibration, 99.5)
    assert exceed == pytest.approx(promised, rel=0.1)
    # at most 1 - p once the calibration set is large enough, else the largest error is the threshold
    assert promised <= 0.005 or np.array_equal(thresholds, calibrations.max(axis=1))


# --- training ----------------------------------------------------------------------------------


def test_training_is_reproducible_for_a_seed_and_learns() -> None:
    x_train, x_val = low_rank_features(256, seed=1), low_rank_features(64, seed=2)
    config = tiny_config(epochs=6, patience=10, learning_rate=0.01)
    first = train_autoencoder(x_train, x_val, config)
    second = train_autoencoder(x_train, x_val, config)
    assert first.history == second.history
    for a, b in zip(first.model.get_weights(), second.model.get_weights(), strict=True):
        assert np.array_equal(a, b)
    other = train_autoencoder(x_train, x_val, tiny_config(epochs=6, patience=10, learning_rate=0.01, seed=8))
    assert other.history["loss"] != first.history["loss"]
    assert first.history["val_loss"][-1] < first.history["val_loss"][0]
    layer_units = [layer.units for layer in first.model.layers]
    assert layer_units == [6, 3, 6, x_train.shape[1]]


def test_early_stopping_stops_and_restores_best_weights() -> None:
    x_train, x_val = low_rank_features(128, seed=1), low_rank_features(64, seed=2)
    # A huge min_delta means no epoch after the first counts as an improvement.
    trained = train_autoencoder(x_train, x_val, tiny_config(epochs=50, patience=2, min_delta=1e3, learning_rate=0.01))
    assert trained.epochs_run == 3
    assert trained.best_epoch == 1
    kept = float(np.mean(reconstruction_error(trained.model, x_val)))
    assert kept == pytest.approx(trained.history["val_loss"][0], rel=1e-4)
    assert kept != pytest.approx(trained.history["val_loss"][-1], rel=1e-4)


def test_threshold_from_trained_model_flags_the_requested_share_of_calibration() -> None:
    x = low_rank_features(600, seed=5)
    split = TrainingData.split(x, validation_fraction=0.1, calibration_fraction=0.5, seed=1)
    trained = train_autoencoder(split.train, split.validation, tiny_config(epochs=3))
    errors = reconstruction_error(trained.model, split.calibration)
    threshold = calibrate_threshold(errors, 99.0)
    assert int(np.sum(errors > threshold)) == 2  # the 298th of 300 (ceil(301 x 0.99)): 2 above
    shifted = x[:50] + 4.0
    assert np.mean(reconstruction_error(trained.model, shifted) > threshold) > 0.9
