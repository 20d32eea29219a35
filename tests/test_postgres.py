"""Scale-out path: train -> register -> deploy with Prefect and MLflow both on PostgreSQL.

PostgreSQL comes from Debian's packages (``scripts/setup.sh`` installs it where missing); the test
starts its own cluster on a free loopback port and drives the real CLI in subprocesses.
"""

from __future__ import annotations

import glob
import os
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.conftest import cli_env
from tinymlops.mqtt import MosquittoBroker, free_port
from tinymlops.services import prefect_server

pytestmark = [pytest.mark.slow, pytest.mark.prefect, pytest.mark.mlflow, pytest.mark.mqtt, pytest.mark.realdata]


def pg_binary(name: str) -> str:
    found = sorted(glob.glob(f"/usr/lib/postgresql/*/bin/{name}")) or [shutil.which(name) or ""]
    if not found[-1]:
        pytest.fail(f"PostgreSQL's {name} is not installed: run the README's set-up (apt-get install postgresql)")
    return found[-1]


def as_postgres(command: list[str]) -> list[str]:
    """initdb and postgres refuse to run as root: drop to the postgres user there."""
    return ["runuser", "-u", "postgres", "--", *command] if os.geteuid() == 0 else command


def psql(address: str, database: str, query: str) -> str:
    """Run one query and return its unaligned, tuples-only output."""
    host, port = address.split(":")
    command = ["psql", "-h", host, "-p", port, "-U", "postgres", "-d", database, "-tAc", query]
    return subprocess.run(command, capture_output=True, text=True, check=True).stdout.strip()


@pytest.fixture(scope="module")
def postgres() -> Iterator[str]:
    # pytest's temporary directories are private to root; the postgres user needs its own.
    root = Path(tempfile.mkdtemp(prefix="tinymlops-postgres-"))
    data, sockets = root / "data", root / "sockets"
    sockets.mkdir()
    if os.geteuid() == 0:
        shutil.chown(root, "postgres")
        shutil.chown(sockets, "postgres")
    port = free_port()
    subprocess.run(
        as_postgres([pg_binary("initdb"), "-D", str(data), "-A", "trust", "-U", "postgres"]),
        check=True,
        capture_output=True,
    )
    subprocess.run(
        as_postgres(
            [
                pg_binary("pg_ctl"),
                "-D",
                str(data),
                "-l",
                str(root / "log"),
                "-w",
                "start",
                "-o",
                f"-p {port} -h 127.0.0.1 -k {sockets}",
            ]
        ),
        check=True,
        capture_output=True,
    )
    try:
        for database in ("prefect", "mlflow"):
            psql(f"127.0.0.1:{port}", "postgres", f"CREATE DATABASE {database}")
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run(as_postgres([pg_binary("pg_ctl"), "-D", str(data), "-m", "fast", "stop"]), capture_output=True)
        shutil.rmtree(root, ignore_errors=True)


def test_train_register_deploy_with_prefect_and_mlflow_on_postgresql(
    postgres: str, cwru_dir: Path, tmp_path: Path, mosquitto: MosquittoBroker
) -> None:
    from firmware.device_fleet import DeviceFleet
    from tasks.deploy import KeyStore
    from tinymlops.targets import load_catalog

    server = prefect_server(
        tmp_path / "prefect", tmp_path / "logs", database_url=f"postgresql+asyncpg://postgres@{postgres}/prefect"
    ).start()
    try:
        env = cli_env(
            tmp_path / "data",
            TINYMLOPS_MLFLOW__TRACKING_URI=f"postgresql://postgres@{postgres}/mlflow",
            TINYMLOPS_MLFLOW__ARTIFACT_ROOT=str(tmp_path / "artifacts"),
            TINYMLOPS_KEYS_DIR=str(tmp_path / "keys"),
            TINYMLOPS_CWRU_DIR=str(cwru_dir),
            PREFECT_API_URL=f"{server.url}/api",
        )

        def cli(*args: str) -> subprocess.CompletedProcess[str]:
            result = subprocess.run(
                [sys.executable, "-m", "tinymlops", "-q", *args], env=env, capture_output=True, text=True, timeout=600
            )
            assert result.returncode == 0, f"{args}: {result.stderr[-3000:]}"
            return result

        cli("import-cwru", "--fleet", "cwru")
        cli("train", "--fleet", "cwru", "--target", "nrf52840", "--config", "data/training_quick.yaml", "--json")
        cli("keys", "init")
        store = KeyStore(tmp_path / "keys")
        with DeviceFleet("cwru", 2, load_catalog()["nrf52840"], store.keyring(), mosquitto.address) as fleet:
            deployed = cli(
                "deploy",
                "vibration-ae-nrf52840@champion",
                "--fleet",
                "cwru",
                "--broker",
                mosquitto.address.url,
                "--json",
            )
            statuses = fleet.statuses()
        assert {s.state for s in statuses.values() if s} == {"active"}
        assert '"outcome": "deployed"' in deployed.stdout

        # both services kept their state in PostgreSQL
        tables = psql(postgres, "mlflow", "SELECT name FROM registered_models").split()
        assert "vibration-ae-nrf52840" in tables
        runs = psql(postgres, "prefect", "SELECT count(*) FROM flow_run WHERE state_type = 'COMPLETED'")
        assert int(runs) >= 2  # train and deploy (with their subflows)
    finally:
        server.stop()
