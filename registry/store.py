"""Where MLflow keeps runs, models and artifacts: configured explicitly, checked before use.

MLflow 3.17 refuses a ``file:`` store without ``MLFLOW_ALLOW_FILE_STORE``, so the default is a SQLite
database with a local artifact root (see :class:`tinymlops.settings.MlflowSettings`). Against an
``http(s)://`` tracking server the server's ``/health`` is probed first with a short timeout, and
MLflow's own HTTP retries are bounded (it retries 7 times with exponential backoff by default,
minutes of silence when the server is down); values set in the environment win.
"""

from __future__ import annotations

import logging
import os
import re
import urllib.error
import urllib.request
from pathlib import Path
from typing import TYPE_CHECKING

from registry.errors import RegistryUnavailableError

if TYPE_CHECKING:
    from mlflow import MlflowClient

    from tinymlops.settings import Settings

log = logging.getLogger(__name__)

DEFAULT_TIMEOUT_S = 5.0
# MLflow keeps an experiment's description in this tag (the UI's "Description" box).
EXPERIMENT_DESCRIPTION_TAG = "mlflow.note.content"
TRAINING_EXPERIMENT_DESCRIPTION = (
    "Training runs of the vibration anomaly autoencoder: the data selection, quality per interpreter "
    "(float, int8 TFLite, TFLite Micro), sizes and each MCU target's budget; each run logs one bundle "
    "per target, registered as vibration-ae-<target>."
)
# Bounded HTTP behaviour for the MLflow client; environment values set by the user are kept.
_MLFLOW_ENV_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "60",
    # No network beyond the tracking server: MLflow's usage telemetry stays off.
    "MLFLOW_DISABLE_TELEMETRY": "true",
}
_SCHEME = re.compile(r"^[A-Za-z][A-Za-z0-9+.-]+:")


def is_http_uri(uri: str) -> bool:
    """Whether a tracking URI names an MLflow tracking server (``http://`` or ``https://``)."""
    return uri.lower().startswith(("http://", "https://"))


def _sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (``sqlite:////abs`` is absolute), None for other URIs."""
    if not uri.startswith("sqlite:///"):
        return None
    path = uri[len("sqlite:///") :].split("?", 1)[0]
    return Path(path) if path and path != ":memory:" else None


def _as_uri(location: str) -> str:
    """An artifact location as a URI: plain paths become absolute ``file://`` URIs."""
    if _SCHEME.match(location):
        return location
    return Path(location).expanduser().resolve().as_uri()


def check_tracking(uri: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    """Check that a tracking URI can be used, without MLflow's long retries.

    An ``http(s)://`` server must answer ``GET /health`` within ``timeout_s``; for a SQLite
    store the database's directory is created if missing.

    Raises:
        RegistryUnavailableError: One line naming the URI and why it cannot be used.

    """
    if is_http_uri(uri):
        health = uri.rstrip("/") + "/health"
        try:
            with urllib.request.urlopen(health, timeout=timeout_s) as response:
                status = response.status
        except urllib.error.HTTPError as exc:
            status = exc.code
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise RegistryUnavailableError(
                f"MLflow tracking server {uri} does not answer within {timeout_s:g} s: {reason}"
            ) from None
        if status != 200:
            raise RegistryUnavailableError(
                f"MLflow tracking server {uri} is not healthy: GET /health gave HTTP {status}"
            )
        return
    path = _sqlite_path(uri)
    if path is not None:
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise RegistryUnavailableError(f"MLflow store {uri}: cannot create {path.parent}: {exc.strerror}") from None


def configure_mlflow(
    tracking_uri: str,
    artifact_root: str | None,
    experiment: str,
    *,
    timeout_s: float = DEFAULT_TIMEOUT_S,
    description: str = "",
) -> str:
    """Point MLflow at a tracking store and make sure the experiment exists.

    Args:
        tracking_uri: ``sqlite:///...``, ``http(s)://host:port``, or any URI MLflow accepts. It is
            also used as the registry URI.
        artifact_root: Root under which a new experiment stores its artifacts
            (``<root>/<experiment>``; a plain path becomes a ``file://`` URI). None lets the store
            choose, which is right for an ``mlflow server`` that serves artifacts itself.
        experiment: Experiment name; created if missing.
        timeout_s: How long a tracking server may take to answer the health probe.
        description: What the experiment holds (the MLflow UI shows it), set where it has none yet.

    Returns:
        The experiment id, also made the active experiment of the fluent API.

    Raises:
        RegistryUnavailableError: The store does not answer or cannot be used, or the experiment
            was deleted.

    """
    for name, value in _MLFLOW_ENV_DEFAULTS.items():
        os.environ.setdefault(name, value)
    check_tracking(tracking_uri, timeout_s)
    import mlflow
    from mlflow.exceptions import MlflowException

    mlflow.set_tracking_uri(tracking_uri)
    mlflow.set_registry_uri(tracking_uri)
    client = mlflow.MlflowClient()
    try:
        found = client.get_experiment_by_name(experiment)
        if found is None:
            location = None
            if artifact_root:
                folder = re.sub(r"[^\w.-]", "_", experiment)
                location = _as_uri(artifact_root).rstrip("/") + "/" + folder
            try:
                experiment_id = client.create_experiment(experiment, artifact_location=location)
                log.info("created MLflow experiment %r (artifacts: %s)", experiment, location or "store default")
            except MlflowException as exc:
                if exc.error_code != "RESOURCE_ALREADY_EXISTS":  # another process created it meanwhile
                    raise
                found = client.get_experiment_by_name(experiment)
                if found is None:
                    raise
                experiment_id = found.experiment_id
        elif found.lifecycle_stage == "deleted":
            raise RegistryUnavailableError(
                f"MLflow experiment {experiment!r} in {tracking_uri} is deleted: restore it or set another experiment"
            )
        else:
            experiment_id = found.experiment_id
        if description and (found is None or not found.tags.get(EXPERIMENT_DESCRIPTION_TAG)):
            client.set_experiment_tag(experiment_id, EXPERIMENT_DESCRIPTION_TAG, description)
        mlflow.set_experiment(experiment_id=experiment_id)
    except MlflowException as exc:
        raise RegistryUnavailableError(f"MLflow store {tracking_uri} is unusable: {first_line(exc)}") from exc
    return str(experiment_id)


def configure_from_settings(settings: Settings | None = None, *, timeout_s: float = DEFAULT_TIMEOUT_S) -> str:
    """:func:`configure_mlflow` from the project settings; returns the experiment id.

    With a tracking server (``http(s)://``) only an explicitly set artifact root is passed on:
    the default local one would be a path on this machine, not the server's.
    """
    if settings is None:
        from tinymlops.settings import get_settings

        settings = get_settings()
    uri = settings.mlflow_tracking_uri
    artifact_root = settings.mlflow.artifact_root if is_http_uri(uri) else settings.mlflow_artifact_root
    return configure_mlflow(
        uri, artifact_root, settings.mlflow.experiment, timeout_s=timeout_s, description=TRAINING_EXPERIMENT_DESCRIPTION
    )


def configure_experiment(
    name: str, settings: Settings | None = None, *, timeout_s: float = DEFAULT_TIMEOUT_S, description: str = ""
) -> str:
    """Like :func:`configure_from_settings`, for another experiment (monitoring, deployments)."""
    if settings is None:
        from tinymlops.settings import get_settings

        settings = get_settings()
    uri = settings.mlflow_tracking_uri
    artifact_root = settings.mlflow.artifact_root if is_http_uri(uri) else settings.mlflow_artifact_root
    return configure_mlflow(uri, artifact_root, name, timeout_s=timeout_s, description=description)


def mlflow_client() -> MlflowClient:
    """A client for the configured tracking and registry URIs."""
    from mlflow import MlflowClient

    return MlflowClient()


def mlflow_tracking_uri() -> str:
    """The tracking URI MLflow uses now (for messages)."""
    import mlflow

    return str(mlflow.get_tracking_uri())


def first_line(exc: BaseException) -> str:
    """The first non-empty line of an exception's message (MLflow's are often multi-line)."""
    for line in str(exc).splitlines():
        if line.strip():
            return line.strip()
    return type(exc).__name__
