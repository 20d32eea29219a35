"""Boot epochs of simulated sensors: a new value on every start, so a seq restarting at 0 stays unique.

A real device keeps a boot counter in flash and increments it on every start (see
firmware/VIBRATION_FORMAT.md). A simulator has no flash: it takes the next value of a counter file
when it has one (``tinymlops simulate``), else its start time in seconds, and never gives one
device (or fleet) the same value twice in one process, so two starts within one second still differ.
"""

from __future__ import annotations

import fcntl
import os
import threading
import time
from pathlib import Path

from firmware.codec import MAX_EPOCH

_lock = threading.Lock()
_last_epoch: dict[str, int] = {}


def next_boot_epoch(counter: Path | None = None, *, sender: str = "") -> int:
    """Return a boot epoch greater than every one this process (and the counter file) gave the sender.

    Args:
        counter: A file holding the last epoch handed out, shared by every start of a simulator
            (created if missing; read and rewritten under an exclusive ``flock``).
        sender: The device (or fleet) starting: each counts on its own, so a process starting
            hundreds of devices does not run their epochs ahead of the clock.

    Returns:
        max(start time in UNIX seconds, the last epoch handed out + 1), at most 2**32 - 1.
    """
    with _lock:
        epoch = max(int(time.time()), _last_epoch.get(sender, 0) + 1)
        if counter is not None:
            counter.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(counter, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX)
                text = os.pread(fd, 32, 0).decode(errors="replace").strip()
                stored = int(text) if text.isdigit() else 0
                epoch = max(epoch, stored + 1)
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"{epoch}\n".encode(), 0)
                os.fsync(fd)
            finally:
                os.close(fd)  # releases the lock
        if epoch > MAX_EPOCH:
            raise OverflowError(f"boot epoch {epoch} does not fit the u32 header field")
        _last_epoch[sender] = epoch
        return epoch
