"""The retraining cooldown turns a burst of claims, from many processes, into one."""

from __future__ import annotations

import datetime as dt
import multiprocessing
from pathlib import Path

import pytest

from tasks.guards import claim_retraining
from tinymlops.errors import ConfigError
from tinymlops.settings import Settings

NOW = dt.datetime(2026, 11, 23, 8, 0, tzinfo=dt.UTC)


def _claim(state_dir: str) -> bool:
    return claim_retraining(Path(state_dir), "plant", dt.timedelta(minutes=30), NOW).granted


def test_a_burst_of_claims_from_many_processes_grants_one(tmp_path: Path) -> None:
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        granted = pool.map(_claim, [str(tmp_path)] * 20)
    assert sum(granted) == 1


def test_cooldown_expires_and_fleets_are_independent(tmp_path: Path) -> None:
    cooldown = dt.timedelta(minutes=30)
    assert claim_retraining(tmp_path, "a", cooldown, NOW).granted
    refused = claim_retraining(tmp_path, "a", cooldown, NOW + dt.timedelta(minutes=10))
    assert not refused.granted and "cooldown ends in 1200 s" in refused.reason
    assert claim_retraining(tmp_path, "b", cooldown, NOW + dt.timedelta(minutes=10)).granted
    assert claim_retraining(tmp_path, "a", cooldown, NOW + dt.timedelta(minutes=31)).granted


def test_a_retraining_with_a_bad_config_fails_before_claiming_the_cooldown(settings: Settings) -> None:
    from flows.retrain import retrain_flow

    with pytest.raises(ConfigError, match=r"nowhere\.yaml"):
        retrain_flow.fn("plant", config_path=str(settings.data_dir / "nowhere.yaml"))
    assert claim_retraining(settings.data_dir / "state", "plant", dt.timedelta(minutes=30)).granted
