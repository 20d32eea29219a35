"""Local services the demo starts on loopback: a Prefect server and the MLflow UI.

Each runs as a child process in its own process group, started on a free port, awaited on its
health endpoint, and stopped by its process group (the Prefect server forks workers).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path

from tinymlops.errors import TinyMLOpsError
from tinymlops.mqtt import free_port

log = logging.getLogger(__name__)


class ServiceError(TinyMLOpsError):
    """A local service did not start."""


class LocalService:
    """A child process serving HTTP on loopback.

    Args:
        name: Shown in messages.
        command: The command line; ``{port}`` is replaced by the chosen port.
        health_path: Path answering 200 once the service is up.
        env: Extra environment.
        log_file: Where its output goes.
        port: Port to use (default: a free one).
    """

    def __init__(
        self,
        name: str,
        command: list[str],
        health_path: str,
        env: dict[str, str],
        log_file: Path,
        port: int | None = None,
    ) -> None:
        self.name = name
        self.port = port or free_port()
        self._command = [part.replace("{port}", str(self.port)) for part in command]
        self._health = health_path
        self._env = {**os.environ, **env}
        self.log_file = log_file
        self._process: subprocess.Popen[bytes] | None = None
        self._healthy = threading.Event()

    @property
    def url(self) -> str:
        """Base URL."""
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout_s: float = 90.0) -> LocalService:
        """Launch and wait until the health endpoint answers.

        Raises:
            ServiceError: It exited or did not answer in time (it is stopped); the message points at its log.
        """
        self.launch()
        try:
            if self.wait_healthy(timeout_s):
                return self
        except BaseException:  # a stop signal while waiting: the caller has no handle to stop it yet
            self.stop()
            raise
        self.stop()
        raise ServiceError(
            f"{self.name} did not answer on {self.url}{self._health} in {timeout_s:.0f} s; see {self.log_file}"
        )

    def launch(self) -> LocalService:
        """Start the process without waiting for it (await it with :meth:`wait_healthy`)."""
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_file, "wb") as out:
            self._process = subprocess.Popen(
                self._command, stdout=out, stderr=subprocess.STDOUT, env=self._env, start_new_session=True
            )
        return self

    @property
    def healthy(self) -> bool:
        """Whether the health endpoint answered 200 (set by :meth:`wait_healthy`)."""
        return self._healthy.is_set()

    def wait_healthy(self, timeout_s: float) -> bool:
        """Poll the health endpoint until it answers 200 (True) or ``timeout_s`` passes (False; it keeps running).

        Raises:
            ServiceError: It was not launched, or the process exited.
        """
        process = self._process
        if process is None:
            raise ServiceError(f"{self.name} is not running")
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if process.poll() is not None:
                raise ServiceError(f"{self.name} exited with code {process.returncode}; see {self.log_file}")
            try:
                with urllib.request.urlopen(self.url + self._health, timeout=2) as response:
                    if response.status == 200:
                        if not self._healthy.is_set():
                            log.info("%s is up at %s (pid %d)", self.name, self.url, process.pid)
                        self._healthy.set()
                        return True
            except (urllib.error.URLError, OSError):
                pass
            time.sleep(0.3)
        return False

    def stop(self, timeout_s: float = 15.0) -> None:
        """Stop the whole process group: SIGINT (graceful), then SIGTERM, then SIGKILL."""
        process, self._process = self._process, None
        self._healthy.clear()
        if process is None or process.poll() is not None:
            return
        for sig, wait_s in ((signal.SIGINT, timeout_s), (signal.SIGTERM, 5.0), (signal.SIGKILL, 5.0)):
            try:
                os.killpg(process.pid, sig)
            except ProcessLookupError:
                return
            try:
                process.wait(wait_s)
                return
            except subprocess.TimeoutExpired:
                continue


def prefect_server(
    home: Path,
    log_dir: Path,
    port: int | None = None,
    database_url: str | None = None,
    *,
    run_services: bool = True,
) -> LocalService:
    """A Prefect server (API and UI): its database under ``home``, or ``database_url`` (PostgreSQL for teams).

    The UI is told the server's own address: left alone it calls ``127.0.0.1:4200`` and shows nothing.
    ``run_services=False`` serves only the API and UI (a second view of a database another server runs).
    """
    port = port or free_port()
    env = {
        "PREFECT_HOME": str(home),
        "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
        "PREFECT_SERVER_UI_ENABLED": "true",
        "PREFECT_SERVER_UI_API_URL": f"http://127.0.0.1:{port}/api",
    }
    if database_url:
        env["PREFECT_API_DATABASE_CONNECTION_URL"] = database_url
    command = [sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port", str(port)]
    if not run_services:
        command.append("--no-services")
    return LocalService("Prefect server", command, "/api/health", env, log_dir / "prefect-server.log", port)


def mlflow_ui(tracking_uri: str, artifact_root: str, log_dir: Path, port: int | None = None) -> LocalService:
    """The MLflow UI over the embedded store."""
    command = [
        sys.executable,
        "-m",
        "mlflow",
        "ui",
        "--host",
        "127.0.0.1",
        "--port",
        "{port}",
        "--backend-store-uri",
        tracking_uri,
        "--default-artifact-root",
        artifact_root,
    ]
    return LocalService(
        "MLflow UI", command, "/health", {"MLFLOW_ENABLE_TELEMETRY": "false"}, log_dir / "mlflow-ui.log", port
    )
