"""tinymlops demo --quick end to end, its summary checked against the registry and the devices."""

from __future__ import annotations

import json
import queue
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from tests.conftest import cli_env, using_data_dir

pytestmark = [pytest.mark.slow, pytest.mark.prefect, pytest.mark.mqtt, pytest.mark.mlflow]


def _summary_line(process: subprocess.Popen[str], deadline_s: float) -> dict[str, Any]:
    """The --json summary line the demo prints once its loop is done (it then keeps running)."""
    lines: queue.Queue[str] = queue.Queue()
    stdout = process.stdout
    assert stdout is not None

    def pump() -> None:
        for line in stdout:
            lines.put(line)

    threading.Thread(target=pump, daemon=True).start()
    deadline = time.monotonic() + deadline_s
    seen: list[str] = []
    while time.monotonic() < deadline:
        try:
            line = lines.get(timeout=1.0)
        except queue.Empty:
            assert process.poll() is None, "".join(seen[-40:])
            continue
        seen.append(line)
        if line.startswith("{"):
            return dict(json.loads(line))
    raise AssertionError("no summary within the deadline:\n" + "".join(seen[-40:]))


def _answers(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=10) as response:
            return bool(response.status == 200)
    except OSError:
        return False


def test_demo_closes_the_loop_and_reports_what_happened(tmp_path: Path) -> None:
    env = cli_env(tmp_path / "data", TINYMLOPS_KEYS_DIR=str(tmp_path / "keys"))
    with (tmp_path / "stderr.log").open("w") as errors:
        process = subprocess.Popen(
            [sys.executable, "-m", "tinymlops", "demo", "--quick", "--devices", "3", "--json", "--keep-running"],
            env=env, stdout=subprocess.PIPE, stderr=errors, text=True,
        )  # fmt: skip
        try:
            summary = _summary_line(process, 900)
            # --keep-running: the summary comes once the loop is done, and every service it names still answers
            assert set(summary["urls"]) == {"MQTT broker", "Prefect UI", "MLflow UI"}
            assert _answers(summary["urls"]["Prefect UI"] + "/api/health")
            assert _answers(summary["urls"]["MLflow UI"] + "/health")
            process.send_signal(signal.SIGINT)  # Ctrl-C stops them
            assert process.wait(120) in (0, 130)
            assert not _answers(summary["urls"]["MLflow UI"] + "/health")
        finally:
            if process.poll() is None:
                process.kill()
                process.wait()

    # a fault on one machine: an alert naming it, no retraining
    (fault,) = summary["alerts"]
    assert fault["verdict"] == "fault"
    assert fault["alerted devices"] == fault["injected on"]
    assert fault["events"] == "tinymlops.anomaly.alert"
    # a gain drift on every machine: a drift event, a retraining that promoted new champions
    drift, after = summary["drift"]
    assert "tinymlops.drift.detected" in drift["events"]
    (retraining,) = summary["retrainings"]
    assert retraining["state"] == "Completed" and retraining["retrained"]
    assert "tinymlops.drift.detected" not in after["events"]

    # the models the summary reports are the registry's champions, and every device runs them
    from registry.models import resolve
    from registry.store import configure_from_settings

    with using_data_dir(Path(summary["data_dir"])) as settings:
        configure_from_settings(settings)
        for row in summary["models"]:
            champion = resolve(f"vibration-ae-{row['target']}@champion")
            assert f"v{champion.version.version}" == row["champion"] == "v2"
            assert champion.bundle.metadata.tflite_bytes == row["bytes"]
    # 3 simulated devices per profile and, beside them, the device firmware on QEMU (setup installs it)
    assert len(summary["devices"]) == 7
    assert {d["state"] for d in summary["devices"]} == {"active"}
    (firmware,) = [d for d in summary["devices"] if "(mps2-an386)" in d["firmware"]]
    assert firmware["profile"] == "nrf52840" and firmware["inference instr"] > 0
    assert len({d["manifest"] for d in summary["devices"] if d["profile"] == "nrf52840"}) == 1
