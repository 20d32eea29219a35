"""Retraining guard rails: at most one retraining per fleet per cooldown, claimed atomically.

A storm of drift events must give one retraining, not fifty. The Prefect deployment adds a
concurrency limit of one; this claim adds the cooldown, and holds across processes and servers
that share the data directory (a file lock around a small JSON state file).
"""

from __future__ import annotations

import datetime as dt
import fcntl
import json
import logging
from dataclasses import dataclass
from pathlib import Path

from prefect import task
from prefect.cache_policies import NO_CACHE

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RetrainClaim:
    """Permission to retrain a fleet now, or why not."""

    fleet: str
    granted: bool
    reason: str
    last_started: dt.datetime | None


def claim_retraining(
    state_dir: Path, fleet: str, cooldown: dt.timedelta, now: dt.datetime | None = None
) -> RetrainClaim:
    """Claim the fleet's retraining slot unless one was claimed within the cooldown.

    Args:
        state_dir: Directory of the guard state (shared by every process of the deployment).
        fleet: Fleet to retrain.
        cooldown: Minimum time between two retrainings of the fleet.
        now: Current time (default: now).
    """
    now = now or dt.datetime.now(tz=dt.UTC)
    state_dir.mkdir(parents=True, exist_ok=True)
    state_file = state_dir / f"retrain-{fleet}.json"
    with open(state_dir / f"retrain-{fleet}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        state = json.loads(state_file.read_text()) if state_file.exists() else {}
        last = dt.datetime.fromisoformat(state["last_started"]) if "last_started" in state else None
        if last is not None and now - last < cooldown:
            wait = cooldown - (now - last)
            reason = f"fleet {fleet} was retrained at {last:%H:%M:%S}; cooldown ends in {wait.total_seconds():.0f} s"
            log.info("retraining skipped: %s", reason)
            return RetrainClaim(fleet, False, reason, last)
        state_file.write_text(json.dumps({"last_started": now.isoformat()}))
    return RetrainClaim(fleet, True, "no retraining within the cooldown", last)


@task(name="claim-retraining", cache_policy=NO_CACHE)
def claim_retraining_task(state_dir: Path, fleet: str, cooldown_minutes: float) -> RetrainClaim:
    """Prefect task: :func:`claim_retraining`."""
    return claim_retraining(state_dir, fleet, dt.timedelta(minutes=cooldown_minutes))
