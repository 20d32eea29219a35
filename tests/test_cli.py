"""The tinymlops CLI as a user runs it: a real subprocess, real files, real services."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tasks.lake import read_windows
from tests.conftest import cli_env

CLI = [sys.executable, "-m", "tinymlops"]


def run_cli(args: list[str], data_dir: Path, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], env=cli_env(data_dir), capture_output=True, text=True, timeout=timeout)


def test_import_csv_through_the_cli(tmp_path: Path) -> None:
    fs = 25_600
    signal = np.sin(2 * np.pi * 100 * np.arange(fs) / fs)
    path = tmp_path / "pump.csv"  # with the tachometer's rpm beside the signal, one per sample
    np.savetxt(path, np.column_stack([signal, np.full(fs, 1480.0)]), delimiter=",", header="accel,rpm", comments="")
    result = run_cli(["import", str(path), "--fs", str(fs), "--label", "normal", "--device", "pump-1"], tmp_path)
    assert result.returncode == 0, result.stderr
    windows = read_windows(tmp_path / "lake", devices=["pump-1"])
    assert len(windows) == fs // 1024
    assert set(windows.label) == {"normal"}
    assert set(windows.rpm.tolist()) == {1480.0} and np.isnan(windows.load).all()
    np.savez(other := tmp_path / "fan.npz", accel=signal, fs=fs)  # no speed in the file: the options give it
    result = run_cli(["import", str(other), "--device", "fan-1", "--rpm", "2950", "--load", "0.8"], tmp_path)
    assert result.returncode == 0, result.stderr
    fan = read_windows(tmp_path / "lake", devices=["fan-1"])
    assert set(fan.rpm.tolist()) == {2950.0} and set(fan.load.tolist()) == {np.float32(0.8)}


def test_files_of_one_import_follow_each_other_from_start_at_their_own_rate(tmp_path: Path) -> None:
    import datetime as dt

    fs = 12_800  # each file names its rate in a field of its own; resampled to the fleet's 25.6 kHz
    paths = []
    for k in range(2):
        path = tmp_path / f"run-{k}.npz"
        np.savez(path, accel=np.sin(np.arange(fs * (k + 1)) / 7.0), Sampling_Rate=np.float64(fs))
        paths.append(str(path))
    result = run_cli(["import", *paths, "--device", "pump-1", "--start", "2026-03-02T06:00:00"], tmp_path)
    assert result.returncode == 0, result.stderr
    windows = read_windows(tmp_path / "lake", devices=["pump-1"])
    order = np.argsort(windows.seq)
    stamps = windows.timestamp_us[order]
    window_us = 1024 * 1_000_000 // 25_600
    start_us = int(dt.datetime(2026, 3, 2, 6, tzinfo=dt.UTC).timestamp() * 1e6)
    assert len(stamps) == 25_600 // 1024 + 2 * 25_600 // 1024  # 1 s, then 2 s of signal
    assert stamps[0] == start_us
    assert np.all(np.diff(stamps) == window_us)  # one recording: the second file starts where the first ended


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["import", "/nonexistent/file.npz", "--fs", "1000"], "file.npz"),
        (["import", "{bad}", "--fs", "1000"], "NaN"),
        (["simulate", "--devices", "2"], "give --seconds or --windows"),
        (["ingest", "--broker", "http://nowhere"], "invalid MQTT broker URL"),
        (["demo", "--devices", "0"], "devices"),
        (["simulate", "--devices", "2", "--seconds", "1", "--fault", "bogus:0.5"], "unknown fault kind 'bogus'"),
    ],
)
def test_bad_input_gives_one_line_and_nonzero_exit(tmp_path: Path, args: list[str], message: str) -> None:
    bad = tmp_path / "bad.npz"
    np.savez(bad, x=np.array([1.0, np.nan] * 2000))
    args = [str(bad) if a == "{bad}" else a for a in args]
    result = run_cli(args, tmp_path)
    assert result.returncode != 0
    assert message in result.stderr
    assert "Traceback" not in result.stderr
    error_lines = [line for line in result.stderr.splitlines() if line.startswith("error")]
    assert len(error_lines) <= 1


def test_commands_give_the_ephemeral_prefect_server_a_startup_timeout_a_loaded_machine_meets(tmp_path: Path) -> None:
    # Prefect's own 20 s timed out a plain `tinymlops train` on a busy 2-core machine
    probe = (
        "from tinymlops.runtime import configure_prefect_env\n"
        "from tinymlops.settings import get_settings\n"
        "configure_prefect_env(get_settings())\n"
        "from prefect.settings import get_current_settings\n"
        "print(get_current_settings().server.ephemeral.startup_timeout_seconds)\n"
    )
    env = cli_env(tmp_path / "data", TINYMLOPS_PREFECT__STARTUP_TIMEOUT_S="240")
    result = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "240"


def test_config_prints_resolved_values(tmp_path: Path) -> None:
    import json

    env = cli_env(tmp_path / "data", TINYMLOPS_MQTT__PASSWORD="s3cret")
    result = subprocess.run([sys.executable, "-m", "tinymlops", "config"], env=env, capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    shown = json.loads(result.stdout)
    assert shown["lake"]["root"] == str(tmp_path / "data" / "lake")
    assert shown["mlflow"]["tracking_uri"] == f"sqlite:///{tmp_path / 'data' / 'mlflow.db'}"
    assert shown["prefect"]["home"] == str(tmp_path / "data" / "prefect")
    assert shown["prefect"]["api_url"].startswith("none: each command starts a temporary Prefect server")
    assert "s3cret" not in result.stdout and shown["mqtt"]["password"] == "**********"


def test_tables_do_not_wrap_when_the_output_is_not_a_terminal(monkeypatch: pytest.MonkeyPatch) -> None:
    import io

    from rich.table import Table

    from tinymlops.terminal import make_console

    def rendered() -> list[str]:
        console = make_console()
        console.file = io.StringIO()  # not a terminal, as a pipe or a CI log
        table = Table()
        for i in range(10):
            table.add_column(f"column-{i}")
        table.add_row(*(f"value-{i}" for i in range(10)))
        console.print(table)
        return console.file.getvalue().splitlines()

    monkeypatch.delenv("COLUMNS", raising=False)
    lines = rendered()
    assert any("column-0" in line and "column-9" in line for line in lines), lines  # one row: 111 columns wide
    monkeypatch.setenv("COLUMNS", "60")  # the user's own width wins
    assert not any("column-0" in line and "column-9" in line for line in rendered())
