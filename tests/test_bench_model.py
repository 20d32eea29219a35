"""The MLPerf Tiny AD reference (front end, model) and the model benchmark against it on real CWRU data."""

from __future__ import annotations

import itertools
from pathlib import Path

import numpy as np
import pytest

from firmware.tflm import count_macs, op_names
from tasks.mlperf_reference import (
    REFERENCE_HIDDEN,
    ReferenceFrontEnd,
    ReferenceFrontEndError,
    build_reference_feature_sets,
    fit_reference_front_end,
    reference_features,
    reference_layer_sizes,
    reference_raw_features,
    reference_training_config,
    train_reference,
)
from tasks.train import TrainingConfig, TrainingData, build_feature_sets, featurize, load_training_config
from tinymlops.bench_model import BenchDataError, bench_model, quick_training_config
from tinymlops.contracts.dsp import DspSpec
from tinymlops.settings import Settings, get_settings, reset_settings
from tinymlops.targets import load_catalog

RATE = 25_600
WINDOW = 1024
# The MLPerf Tiny AD reference (mlcommons/tiny, benchmark/training/anomaly_detection/keras_model.py).
MLPERF_LAYERS = [640, 128, 128, 128, 128, 8, 128, 128, 128, 128, 640]
MLPERF_MACS = 264_192


def tone(freq_hz: float, n: int = WINDOW) -> np.ndarray:
    return np.sin(2 * np.pi * freq_hz * np.arange(n) / RATE).astype(np.float32)


def noise_windows(n: int, seed: int) -> np.ndarray:
    """Noise windows whose level differs per window, so each window is recognisable from its features."""
    rng = np.random.default_rng(seed)
    levels = np.linspace(0.5, 2.0, n, dtype=np.float32)[:, None]
    return (levels * rng.standard_normal((n, WINDOW))).astype(np.float32)


def test_front_end_cuts_the_window_into_five_frames_of_128_bands() -> None:
    front_end = ReferenceFrontEnd()
    assert front_end.n_features == 640
    assert front_end.frame_starts.tolist() == [0, 192, 384, 576, 768]
    assert front_end.frame_starts[-1] + front_end.frame_samples == WINDOW  # covers the window exactly
    assert front_end.bin_hz == 100.0
    features = reference_raw_features(noise_windows(3, seed=1), front_end)
    assert features.shape == (3, 640) and features.dtype == np.float32


@pytest.mark.parametrize("freq_hz", [300.0, 3_000.0, 12_000.0])
def test_a_pure_tone_peaks_in_its_band_in_every_frame(freq_hz: float) -> None:
    front_end = ReferenceFrontEnd()
    frames = reference_raw_features(tone(freq_hz), front_end).reshape(5, 128)
    band = round(freq_hz / front_end.bin_hz) - 1  # band b is FFT bin b + 1 (DC dropped)
    assert frames.argmax(axis=1).tolist() == [band] * 5


def test_features_are_frame_after_frame_in_time_order() -> None:
    front_end = ReferenceFrontEnd()
    window = 0.001 * noise_windows(1, seed=2)[0]
    window[832:] += tone(3_000.0)[832:]  # a burst after frame 3 ends (576 + 256): only frame 4 holds it
    frames = reference_raw_features(window, front_end).reshape(5, 128)
    burst_band = frames[:, 29]
    assert burst_band[4] > burst_band[:4].max() + 3  # over 1000x the power (log10)


def test_normalisation_is_fitted_on_training_windows_per_band() -> None:
    train = noise_windows(40, seed=3)
    front_end = fit_reference_front_end(train, ReferenceFrontEnd())
    assert len(front_end.mean) == len(front_end.std) == 128
    bands = reference_features(train, front_end).reshape(-1, 128)
    np.testing.assert_allclose(bands.mean(axis=0), 0.0, atol=1e-4)
    np.testing.assert_allclose(bands.std(axis=0), 1.0, atol=1e-3)
    with pytest.raises(ReferenceFrontEndError, match="no normalisation statistics"):
        reference_features(train, ReferenceFrontEnd())


def test_front_end_rejects_bad_windows_and_framing() -> None:
    with pytest.raises(ReferenceFrontEndError, match=r"shape \(n, 1024\)"):
        reference_raw_features(np.zeros((2, 512), dtype=np.float32), ReferenceFrontEnd())
    with pytest.raises(ReferenceFrontEndError, match="span 1088 samples; the window has 1024"):
        ReferenceFrontEnd(hop_samples=208)
    with pytest.raises(ReferenceFrontEndError, match="bands exceed the 128 non-DC bins"):
        ReferenceFrontEnd(n_bands=129)


def test_reference_is_split_on_the_same_windows_as_ours() -> None:
    config = TrainingConfig(seed=7)
    windows = noise_windows(60, seed=4)
    faults = {"loud": 3 * noise_windows(5, seed=5)}
    reference = build_reference_feature_sets(windows, windows[:6], faults, ReferenceFrontEnd(), config)
    ours = build_feature_sets(windows, windows[:6], faults, DspSpec(), config)
    rows = TrainingData.split(
        np.arange(len(windows)),
        validation_fraction=config.validation_fraction,
        calibration_fraction=config.calibration_fraction,
        seed=config.seed,
    )
    for part in ("train", "validation", "calibration"):
        picked = windows[getattr(rows, part)]
        np.testing.assert_array_equal(getattr(reference.parts, part), reference_features(picked, reference.front_end))
        np.testing.assert_array_equal(getattr(ours.parts, part), featurize(picked, ours.spec))
    assert reference.faults["loud"].shape == (5, 640)


def test_reference_model_has_the_mlperf_layers_and_macs() -> None:
    assert reference_layer_sizes() == MLPERF_LAYERS
    assert sum(a * b for a, b in itertools.pairwise(MLPERF_LAYERS)) == MLPERF_MACS
    config = TrainingConfig(epochs=2, patience=1, seed=1)
    reference_config = reference_training_config(config)
    assert reference_config.hidden == list(REFERENCE_HIDDEN)
    assert reference_config.quantization.mode == "ptq"
    assert (reference_config.epochs, reference_config.seed) == (config.epochs, config.seed)

    windows = noise_windows(48, seed=6)
    features = build_reference_feature_sets(windows, windows[:4], {}, ReferenceFrontEnd(), config)
    reference = train_reference(features, config)
    kernels = [w.shape for w in reference.model.get_weights() if w.ndim == 2]
    assert kernels == list(itertools.pairwise(MLPERF_LAYERS))
    assert op_names(reference.int8_model) == ["FULLY_CONNECTED"] * 10
    assert count_macs(reference.int8_model) == MLPERF_MACS


def test_quick_config_only_shortens_training() -> None:
    config = load_training_config(get_settings().training_config)
    quick = quick_training_config(config)
    assert quick.epochs <= 20 and quick.patience <= 5
    assert quick.pruning.fine_tune_epochs <= 3 and quick.quantization.qat_epochs <= 3
    same = ("hidden", "seed", "validation_fraction", "calibration_fraction", "threshold_percentile")
    assert all(getattr(quick, name) == getattr(config, name) for name in same)


def test_missing_cwru_recordings_are_named(settings: Settings, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    empty = tmp_path / "no-cwru"
    empty.mkdir()
    monkeypatch.setenv("TINYMLOPS_CWRU_DIR", str(empty))
    reset_settings()
    with pytest.raises(BenchDataError, match=f"not found in {empty}"):
        bench_model(get_settings(), quick=True)


@pytest.mark.slow
@pytest.mark.realdata
@pytest.mark.prefect
def test_quick_benchmark_beats_the_reference_on_cwru(
    settings: Settings, cwru_dir: Path, prefect_harness: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TINYMLOPS_CWRU_DIR", str(cwru_dir))
    reset_settings()
    figures = bench_model(get_settings(), quick=True)

    targets = list(load_catalog(settings.targets.catalog))
    required = [
        "train_flow_s", "int8_model_bytes", "tflm_arena_bytes", "macs", "auc_float", "auc_int8", "auc_tflm",
        "reference_int8_model_bytes", "reference_auc_int8", "reference_macs", "reference_tflm_arena_bytes",
        "reference_auc_float", "reference_auc_tflm", "bytes_ratio", "macs_ratio", "targets_met",
        *(f"{prefix}latency_ms_{name}" for prefix in ("", "reference_") for name in targets),
    ]  # fmt: skip
    assert [key for key in required if key not in figures] == []
    assert figures["quick"] is True and isinstance(figures["targets_met"], bool)
    assert figures["train_flow_s"] > 0
    for key in ("auc_float", "auc_int8", "auc_tflm"):
        assert 0.0 <= figures[key] <= 1.0 and 0.0 <= figures[f"reference_{key}"] <= 1.0
    # The graphs are what the configurations say: ours 35-24-8-24-35, the reference MLPerf's.
    assert figures["macs"] == 35 * 24 + 24 * 8 + 8 * 24 + 24 * 35
    assert figures["reference_macs"] == MLPERF_MACS
    assert figures["bytes_ratio"] >= 10 and figures["macs_ratio"] >= 10
    assert figures["bytes_ratio"] == pytest.approx(
        figures["reference_int8_model_bytes"] / figures["int8_model_bytes"], abs=0.01
    )
    assert 0 < figures["tflm_arena_bytes"] < figures["reference_tflm_arena_bytes"]
    for name in targets:
        assert 0 < figures[f"latency_ms_{name}"] < figures[f"reference_latency_ms_{name}"]
