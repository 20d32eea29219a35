"""Detection quality on the real CWRU bearing recordings, float against int8 against TFLite Micro.

Windows (25.6 kHz, 1024 samples): normal train 251 (hop 256), validation 24, calibration 37 and
test 62 (hop 512, each from its own contiguous time segment); faults 127 inner race, 126 outer
race, 127 ball (hop 1024). Measured with the committed ``data/training.yaml`` (35-24-8-24-35, 50%
pruning, pruning-preserving QAT) on the 2-core development machine, about 20 s:

    model         AUC     inner   outer   ball    F1      false alarms   threshold
    float         1.0000  1.0000  1.0000  1.0000  1.0000  0 of 62        1.830
    int8_tflite   1.0000  1.0000  1.0000  1.0000  1.0000  0 of 62        1.832
    int8_tflm     1.0000  1.0000  1.0000  1.0000  1.0000  0 of 62        1.832

CWRU at this load is easy for this front end: the smallest fault-window error is 37.8x the
threshold for the float model and 53.4x for int8 (ball faults closest), so AUC saturates at 1.0
and the 0.01 gates can only catch a gross regression. The deployed model is 5,664 bytes (2,860
gzip) with 50.0% of its weights zero.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
import pytest
from scipy.signal import resample_poly

from firmware.tflm import op_names
from tasks.compress import compress
from tasks.evaluate import evaluate_models
from tasks.train import featurize, fit_feature_spec, load_training_config, train_autoencoder
from tinymlops.contracts.dsp import DspSpec
from tinymlops.settings import get_settings

log = logging.getLogger(__name__)

SENSOR_RATE_HZ = 25_600
WINDOW = 1024
FAULT_FILES = {"inner_race": "1797_IR_7_DE48", "outer_race": "1797_OR6_7_DE48", "ball": "1797_B_7_DE48"}
# Contiguous time segments of the normal recording (fractions of its length): windows never cross them.
TRAIN, VALIDATION, CALIBRATION, TEST = (0.0, 0.5), (0.5, 0.6), (0.6, 0.75), (0.75, 1.0)


def drive_end_at_sensor_rate(cwru_dir: Path, name: str) -> np.ndarray:
    """The drive-end channel of a 48 kHz recording, resampled to the fleet's 25.6 kHz (8/15)."""
    with np.load(cwru_dir / f"{name}.npz") as data:
        de = np.asarray(data["DE"], dtype=np.float64).ravel()
    return resample_poly(de, 8, 15).astype(np.float32)


def windows(signal: np.ndarray, hop: int) -> np.ndarray:
    starts = range(0, len(signal) - WINDOW + 1, hop)
    return np.stack([signal[s : s + WINDOW] for s in starts])


def segment(signal: np.ndarray, span: tuple[float, float]) -> np.ndarray:
    return signal[int(span[0] * len(signal)) : int(span[1] * len(signal))]


@pytest.mark.slow
@pytest.mark.realdata
def test_int8_and_tflm_detect_cwru_faults_as_well_as_float(cwru_dir: Path) -> None:
    config = load_training_config(get_settings().training_config)
    normal = drive_end_at_sensor_rate(cwru_dir, "1797_Normal")
    # Overlapping windows inside the training segments; the test segment is never trained or calibrated on.
    parts = {
        "train": windows(segment(normal, TRAIN), hop=256),
        "validation": windows(segment(normal, VALIDATION), hop=512),
        "calibration": windows(segment(normal, CALIBRATION), hop=512),
        "test": windows(segment(normal, TEST), hop=512),
    }
    spec = fit_feature_spec(parts["train"], DspSpec(sample_rate_hz=SENSOR_RATE_HZ, window_samples=WINDOW))
    x = {name: featurize(w, spec) for name, w in parts.items()}
    faults = {
        name: featurize(windows(drive_end_at_sensor_rate(cwru_dir, file), hop=WINDOW), spec)
        for name, file in FAULT_FILES.items()
    }

    trained = train_autoencoder(x["train"], x["validation"], config)
    result = compress(trained.model, x["train"], x["validation"], config)
    comparison = evaluate_models(
        trained.model,
        result.deployable,
        x["test"],
        faults,
        x["calibration"],
        percentile=config.threshold_percentile,
        window_seconds=WINDOW / SENSOR_RATE_HZ,
    )
    log.info("CWRU quality:\n%s\nsizes: %s", comparison.to_markdown(), result.size_table())

    float_ev, int8_ev, tflm_ev = comparison["float"], comparison["int8_tflite"], comparison["int8_tflm"]
    assert len(x["test"]) >= 50 and all(len(f) >= 100 for f in faults.values())
    assert int8_ev.auc >= 0.99
    assert min(int8_ev.auc_by_fault.values()) >= 0.99
    assert float_ev.auc - int8_ev.auc <= 0.01
    assert abs(tflm_ev.auc - int8_ev.auc) <= 0.01
    assert int8_ev.recall >= 0.95
    assert tflm_ev.recall >= 0.95
    assert int8_ev.false_positives <= 2
    assert result.sparsity == pytest.approx(config.pruning.target_sparsity, abs=0.02)
    assert set(op_names(result.deployable)) == {"FULLY_CONNECTED"}
