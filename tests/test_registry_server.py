"""The registry through a real ``mlflow server`` (SQLite backend, proxied artifact store), as in a deployment.

Only the tracking URI changes (``http://...``); the artifacts go through the server to its
``--artifacts-destination``, so this client never writes the artifact store directly.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient

from registry.models import CANDIDATE, CHAMPION, PREVIOUS, aliases_of, register_bundle, resolve
from registry.promotion import promote, rollback
from registry.store import configure_mlflow
from registry.tracking import log_training_run
from tests.test_registry import FINGERPRINT, catalog_target, make_bundle, noise_windows, normal_windows

pytestmark = [pytest.mark.mlflow, pytest.mark.slow]

START_TIMEOUT_S = 120


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, Path]]:
    """A real MLflow server on a free loopback port: (URL, its artifact destination); stopped by process group."""
    root = tmp_path_factory.mktemp("mlflow-server")
    artifacts = root / "artifacts"
    url = f"http://127.0.0.1:{free_port()}"
    log_path = root / "server.log"
    command = [
        sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", url.rsplit(":", 1)[1],
        "--backend-store-uri", f"sqlite:///{root / 'server.db'}", "--artifacts-destination", str(artifacts),
        "--workers", "1",
    ]  # fmt: skip
    with log_path.open("w") as log:
        # Own session: the server's worker processes are stopped with it, by its process group.
        proc = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "MLFLOW_DISABLE_TELEMETRY": "true"},
        )  # fmt: skip
    previous = mlflow.get_tracking_uri()
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                pytest.fail(f"mlflow server exited with {proc.returncode}: {log_path.read_text()[-2000:]}")
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"mlflow server not healthy after {START_TIMEOUT_S} s: {log_path.read_text()[-2000:]}")
            time.sleep(0.5)
        yield url, artifacts
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        mlflow.set_tracking_uri(previous)
        mlflow.set_registry_uri(previous)


def test_register_promote_load_and_rollback_through_a_tracking_server(server: tuple[str, Path], tmp_path: Path) -> None:
    url, artifact_destination = server
    experiment_id = configure_mlflow(url, None, "server-test")
    assert MlflowClient().get_experiment(experiment_id).artifact_location.startswith("mlflow-artifacts:")
    target = catalog_target("nrf52840", "nrf_server")
    bundles = [make_bundle(tmp_path / "bundles", target, label=label) for label in ("v1", "v2")]
    run_id = log_training_run(
        experiment_id, params={"seed": 0}, metrics={"auc": 1.0}, dataset_fingerprint=FINGERPRINT,
        lake_selection={"fleet": "test"}, bundles=bundles[:1],
    )  # fmt: skip
    assert MlflowClient().get_run(run_id).data.tags["dataset.fingerprint"] == FINGERPRINT

    v1, v2 = (register_bundle(bundle, run_id, gates_passed=True) for bundle in bundles)
    name = v1.name
    assert aliases_of(name) == {CANDIDATE: v2.version}
    stored = {p.name for p in artifact_destination.rglob("*") if p.is_file()}
    assert {"model.tflite", "bundle.json", "MLmodel", "vibration_ae_nrf_server_model_data.c"} <= stored

    promote(name, v1.version, candidate_eval=None, champion_eval=None, actor="test")
    figures = {"auc_int8": 0.99, "false_alarms_per_hour": 5.0}
    promote(name, v2.version, candidate_eval=figures, champion_eval={**figures, "version": v1.version}, actor="test")
    assert aliases_of(name) == {CHAMPION: v2.version, PREVIOUS: v1.version}

    champion = resolve(f"{name}@champion", tmp_path / "champion")
    assert champion.bundle.metadata.lineage["label"] == "v2"
    model = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    scored = model.predict(np.concatenate([normal_windows(10, seed=21), noise_windows(2, seed=22)]))
    errors = scored["reconstruction_error"].to_numpy()
    assert errors[10:].min() > 10 * np.median(errors[:10]) and scored["anomaly"].iloc[10:].all()

    rollback(name, actor="test", reason="server round trip")
    assert aliases_of(name) == {CHAMPION: v1.version}
    assert resolve(f"{name}@champion", tmp_path / "rolled-back").bundle.metadata.lineage["label"] == "v1"
