"""A recording played back as a live sensor: its windows published over MQTT in real time (or faster).

A user's own recording enters the fleet exactly as a sensor's stream does: the ingest stores it as
live data and the monitor judges it, so a recording of a machine can be watched by the whole loop.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from firmware.boot import next_boot_epoch
from firmware.codec import VibrationWindow, encode
from firmware.sensor import quantize
from tinymlops.mqtt import BrokerAddress, connect, make_client

log = logging.getLogger(__name__)

# A sensor's range is fixed: the recording's peak plus headroom, never below a common 16 g part.
MIN_FULL_SCALE_G = 16.0


@dataclass(frozen=True)
class ReplayStats:
    """What a replay published.

    Attributes:
        windows: Windows published (and acknowledged by the broker, QoS 1).
        seconds: Wall time of the replay.
        full_scale_g: The range the windows were quantised to.
    """

    windows: int
    seconds: float
    full_scale_g: float


def replay(
    signal: npt.ArrayLike,
    address: BrokerAddress,
    *,
    topic: str,
    device_id: str,
    sample_rate_hz: int,
    window_samples: int,
    speed: float = 1.0,
    stop: threading.Event | None = None,
    boot_epoch: int | None = None,
    rpm: float | Sequence[float | None] | None = None,
) -> ReplayStats:
    """Publish a recording as consecutive windows of one sensor, paced at ``speed`` x real time.

    Args:
        signal: The recording in g, at ``sample_rate_hz``; a trailing part shorter than a window is dropped.
        address: Broker.
        topic: The sensor's vibration topic.
        device_id: The id in every window.
        sample_rate_hz: The fleet's sensor rate.
        window_samples: Samples per window.
        speed: Playback speed; 0 publishes as fast as the broker takes them.
        stop: Stop early when set.
        boot_epoch: Boot epoch of the windows (default :func:`firmware.boot.next_boot_epoch`): every
            replay is a new boot of the sensor, its seqs start at 0 again without reusing a key.
        rpm: The machine's shaft speed, sent as the tachometer value: one for the recording, or one per
            window (None: not known).

    Raises:
        ValueError: ``speed`` is negative, the recording is shorter than one window, or ``rpm`` gives
            another number of windows.
    """
    if not speed >= 0:
        raise ValueError(f"speed must be >= 0, got {speed}")
    samples = np.asarray(signal, dtype=np.float32).ravel()
    n_windows = samples.size // window_samples
    if n_windows == 0:
        raise ValueError(f"the recording has {samples.size} samples, one window needs {window_samples}")
    rpms = [rpm] * n_windows if rpm is None or isinstance(rpm, float | int) else list(rpm)
    if len(rpms) != n_windows:
        raise ValueError(f"{len(rpms)} rpm values for a recording of {n_windows} windows")
    full_scale_g = max(MIN_FULL_SCALE_G, float(np.abs(samples).max()) * 1.05)
    window_s = window_samples / sample_rate_hz
    epoch = next_boot_epoch(sender=device_id) if boot_epoch is None else boot_epoch
    client = make_client(address, f"tinymlops-replay-{device_id}")
    connect(client, address)
    started = time.monotonic()
    published = 0
    try:
        for seq in range(n_windows):
            if stop is not None and stop.is_set():
                break
            counts, scale = quantize(samples[seq * window_samples : (seq + 1) * window_samples], full_scale_g)
            window = VibrationWindow(
                device_id, seq, time.time_ns() // 1000, sample_rate_hz, scale, counts, epoch, rpms[seq]
            )
            client.publish(topic, encode(window), qos=1).wait_for_publish(timeout=60)
            published += 1
            if speed > 0:
                pause = started + (seq + 1) * window_s / speed - time.monotonic()
                if pause > 0:
                    (stop or threading.Event()).wait(pause)
    finally:
        client.disconnect()
        client.loop_stop()
    seconds = time.monotonic() - started
    log.info("replayed %d windows as %s in %.1f s (%g x real time)", published, device_id, seconds, speed)
    return ReplayStats(published, seconds, full_scale_g)
