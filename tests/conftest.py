"""Shared fixtures: isolated settings, a real Mosquitto broker, the CWRU recordings."""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pytest

from tinymlops.mqtt import MosquittoBroker
from tinymlops.settings import REPO_ROOT, Settings, get_settings, reset_settings

REQUIRE_CWRU_ENV = "TINYMLOPS_REQUIRE_CWRU"
FAST_TRAINING_CONFIG = REPO_ROOT / "data" / "training_quick.yaml"
"""The quick training configuration the tests train with."""


def pytest_configure(config: pytest.Config) -> None:
    """As the CLI does before Prefect is first imported: the project's log lines go to the Prefect runs."""
    from tinymlops.runtime import route_project_logs_to_prefect

    route_project_logs_to_prefect()


@pytest.fixture
def settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Settings]:
    """Settings whose data directory is a fresh temporary directory."""
    monkeypatch.setenv("TINYMLOPS_DATA_DIR", str(tmp_path / "data"))
    reset_settings()
    yield get_settings()
    reset_settings()


@pytest.fixture
def mosquitto() -> Iterator[MosquittoBroker]:
    """A real Mosquitto on a free loopback port, stopped by pid afterwards."""
    if MosquittoBroker.executable() is None:
        pytest.fail("mosquitto is not installed: run the README's set-up (apt-get install mosquitto)")
    broker = MosquittoBroker().start()
    yield broker
    broker.stop()


@pytest.fixture(scope="session")
def cwru_dir() -> Path:
    """The real CWRU recordings; skip with a reason where absent, fail when CI requires them."""
    path = Path(os.environ.get("TINYMLOPS_CWRU_DIR", REPO_ROOT.parent / "shared" / "data" / "cwru"))
    if not (path / "1797_Normal.npz").exists():
        reason = f"CWRU recordings not found at {path} (set TINYMLOPS_CWRU_DIR)"
        if os.environ.get(REQUIRE_CWRU_ENV) == "1":
            pytest.fail(f"{reason}; {REQUIRE_CWRU_ENV}=1 requires them")
        pytest.skip(reason)
    return path


@pytest.fixture(scope="session")
def prefect_harness(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """A real Prefect API (temporary database and server) for the whole session."""
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ["PREFECT_HOME"] = str(tmp_path_factory.mktemp("prefect-home"))
    from prefect.testing.utilities import prefect_test_harness

    with prefect_test_harness(server_startup_timeout=120):
        yield


def cli_env(data_dir: Path, **extra: str) -> dict[str, str]:
    """Environment for running the CLI in a subprocess against a temporary data directory."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("TINYMLOPS_", "PREFECT_"))}
    env.update({"TINYMLOPS_DATA_DIR": str(data_dir), "PREFECT_SERVER_ANALYTICS_ENABLED": "false", **extra})
    return env


POISONED_WINDOW = ("poisoned-node", 7)


@pytest.fixture(scope="session")
def cwru_trained(
    cwru_dir: Path, prefect_harness: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[dict[str, object]]:
    """The real CWRU recordings imported into a lake and trained once per session by the train flow.

    The lake also holds one poisoned window (:data:`POISONED_WINDOW`, scale 3e38, written past the
    ingest's validation as older data would be), which the flow must skip and report.
    Yields the flow's outcome, plus ``data_dir``; the run's bundles stay on disk for the session.
    """
    from firmware.codec import VibrationWindow
    from flows.train import train_flow
    from tasks.importers import import_cwru
    from tasks.lake import WindowBatch, write_windows

    data_dir = tmp_path_factory.mktemp("cwru-data")
    with using_data_dir(data_dir):
        settings = get_settings()
        import_cwru(cwru_dir, lake_root=settings.lake_root, fleet="cwru")
        device, seq = POISONED_WINDOW
        poisoned = WindowBatch()
        samples = np.full(settings.sensor.window_samples, 1000, np.int16)
        timestamp_us = int(time.time() * 1e6)
        poisoned.append(
            "cwru", VibrationWindow(device, seq, timestamp_us, settings.sensor.sample_rate_hz, 3e38, samples)
        )
        write_windows(settings.lake_root, poisoned)
        outcome = train_flow(fleet="cwru", targets=["nrf52840", "rp2040"], config_path=str(FAST_TRAINING_CONFIG))
    yield {**outcome, "data_dir": data_dir}


@contextmanager
def using_data_dir(data_dir: Path) -> Iterator[Settings]:
    """Point the settings at another data directory for the duration of the block."""
    previous = os.environ.get("TINYMLOPS_DATA_DIR")
    os.environ["TINYMLOPS_DATA_DIR"] = str(data_dir)
    reset_settings()
    try:
        yield get_settings()
    finally:
        if previous is None:
            os.environ.pop("TINYMLOPS_DATA_DIR", None)
        else:
            os.environ["TINYMLOPS_DATA_DIR"] = previous
        reset_settings()


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Print the fault-injection table (tests/fault_ledger.py) when fault tests ran."""
    from tests.fault_ledger import write_summary

    write_summary(terminalreporter)
