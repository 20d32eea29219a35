"""The one anomaly scorer: the arithmetic of the firmware's loop, and the strict threshold."""

from __future__ import annotations

import numpy as np
import pytest

from tinymlops.contracts.scoring import anomaly_scores, is_anomalous


def test_differences_are_float32_as_in_the_firmware_and_summed_in_float64() -> None:
    # firmware/c/device_main.c: float d = feature - reconstruction; sum += (double)(d * d).
    # 1 - 2**-30 rounds to 1 in float32: the device's score is exactly 1, a float64 difference is not.
    assert anomaly_scores(np.float32([[1.0]]), np.float32([[2.0**-30]]))[0] == 1.0
    rng = np.random.default_rng(0)
    x, r = rng.normal(size=(50, 35)).astype(np.float32), rng.normal(size=(50, 35)).astype(np.float32)
    scores = anomaly_scores(x, r)
    assert scores.dtype == np.float64 and scores.shape == (50,)
    firmware_loop = [sum(float(d * d) for d in row_x - row_r) / 35 for row_x, row_r in zip(x, r, strict=True)]
    np.testing.assert_allclose(scores, firmware_loop, rtol=1e-13)
    assert anomaly_scores(x[0], r[0]).shape == (1,)  # one window is a batch of one


def test_shapes_must_agree() -> None:
    with pytest.raises(ValueError, match=r"reconstruction has shape \(2, 3\), expected \(2, 4\)"):
        anomaly_scores(np.zeros((2, 4), np.float32), np.zeros((2, 3), np.float32))


def test_a_window_is_anomalous_only_strictly_above_the_threshold() -> None:
    assert is_anomalous(np.array([0.5, 1.0, 1.5]), 1.0).tolist() == [False, False, True]
