"""tinymlops demo --quick end to end, its summary checked against the registry and the devices."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import cli_env, using_data_dir

pytestmark = [pytest.mark.slow, pytest.mark.prefect, pytest.mark.mqtt, pytest.mark.mlflow]


def test_demo_closes_the_loop_and_reports_what_happened(tmp_path: Path) -> None:
    env = cli_env(tmp_path / "data", TINYMLOPS_KEYS_DIR=str(tmp_path / "keys"))
    result = subprocess.run(
        [sys.executable, "-m", "tinymlops", "demo", "--quick", "--devices", "3", "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    summary = json.loads(result.stdout.strip().splitlines()[-1])
    # every service it reports answered: the MLflow UI, awaited in the background, was up by the summary
    assert set(summary["urls"]) == {"MQTT broker", "Prefect UI", "MLflow UI"}

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
