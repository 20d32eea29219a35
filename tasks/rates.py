"""Exact (Clopper-Pearson) one-sided confidence bounds of a rate: ``k`` events out of ``n`` trials.

One place for the bounds the project judges rates by: the canary's anomaly rate (lower bound:
is it significantly above its limit?) and a model's false-alarm rate on held-out normal windows
(upper bound: is it below its limit with confidence?). The bounds are exact binomial, never
narrower than the confidence asks for, which matters for the few events small sets hold.
"""

from __future__ import annotations

DEFAULT_CONFIDENCE = 0.95


def rate_lower_bound(anomalies: int, windows: int, confidence: float = DEFAULT_CONFIDENCE) -> float:
    """One-sided Clopper-Pearson lower bound of a rate: ``anomalies`` out of ``windows`` (0 when none)."""
    if anomalies <= 0 or windows <= 0:
        return 0.0
    from scipy.stats import beta

    return float(beta.ppf(1.0 - confidence, anomalies, windows - anomalies + 1))


def rate_upper_bound(events: int, trials: int, confidence: float = DEFAULT_CONFIDENCE) -> float:
    """One-sided Clopper-Pearson upper bound of a rate: ``events`` out of ``trials``.

    With no events it is ``1 - (1 - confidence) ** (1 / trials)`` (0 of 299 at 95 %: 1.0 %); with
    no trials nothing is known and the bound is 1.

    Raises:
        ValueError: ``events`` outside ``[0, trials]`` or ``confidence`` outside (0, 1).
    """
    if not 0 < confidence < 1:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if not 0 <= events <= trials:
        raise ValueError(f"events must be in [0, trials], got {events} of {trials}")
    if trials == 0 or events >= trials:
        return 1.0
    from scipy.stats import beta

    return float(beta.ppf(confidence, events + 1, trials - events))
