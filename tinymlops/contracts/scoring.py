"""The anomaly score of a window and the anomaly decision, defined once.

A window's score is the mean squared difference between its normalised features and the
autoencoder's reconstruction of them. The arithmetic is the firmware's
(``score_window`` in ``firmware/c/device_main.c``): each difference and its square in float32,
their mean accumulated in float64. Training, evaluation, the drift monitor, the MLflow pyfunc
model and the simulated device all score through this module, so a threshold calibrated in
training means the same on every side; the C loop stays in C and its parity tests compare with
this module.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt


def anomaly_scores(features: npt.ArrayLike, reconstructions: npt.ArrayLike) -> npt.NDArray[np.float64]:
    """Score windows: the mean squared reconstruction error of each row.

    Args:
        features: Normalised features (n, F), or one window (F,); taken as float32.
        reconstructions: The model's reconstructions, the same shape; taken as float32.

    Returns:
        float64 array (n,): differences and squares in float32, the mean accumulated in float64.

    Raises:
        ValueError: The shapes differ.
    """
    x = np.atleast_2d(np.asarray(features, dtype=np.float32))
    r = np.atleast_2d(np.asarray(reconstructions, dtype=np.float32))
    if r.shape != x.shape:
        raise ValueError(f"reconstruction has shape {r.shape}, expected {x.shape}")
    return np.mean((x - r) ** 2, axis=1, dtype=np.float64)


def is_anomalous(scores: npt.ArrayLike, threshold: float) -> npt.NDArray[np.bool_]:
    """The anomaly decision: a score strictly above the model's threshold."""
    return np.asarray(scores) > threshold
