"""Process set-up done by entry points (CLI, tests), never at import time."""

from __future__ import annotations

import logging
import os

from tinymlops.settings import Settings

# The project's top-level packages: their log lines (AUC, budgets, ingest counts, deploy outcomes) also go
# to the Prefect run they are logged in, so the Prefect UI shows them beside Prefect's own.
PROJECT_LOGGERS = ("flows", "tasks", "registry", "tinymlops", "firmware")
_NOISY_LOGGERS = ("amqtt", "transitions", "mlflow", "alembic", "urllib3", "httpx", "tensorflow", "absl")


def configure_prefect_env(settings: Settings) -> None:
    """Point Prefect at the project's home and server before Prefect is first imported.

    Prefect reads its settings from the environment; values the user already set win.
    """
    home = settings.prefect_home.resolve()
    home.mkdir(parents=True, exist_ok=True)
    os.environ.setdefault("PREFECT_HOME", str(home))
    os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")
    os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")
    os.environ.setdefault("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", str(settings.prefect.startup_timeout_s))
    if settings.prefect.api_url:
        os.environ.setdefault("PREFECT_API_URL", settings.prefect.api_url)
    route_project_logs_to_prefect()


def route_project_logs_to_prefect() -> None:
    """Send the project's log records to the Prefect flow or task run they are logged in.

    Prefect attaches its API handler to these loggers when it is first imported; outside a run the
    records only reach the terminal (and Prefect is told not to warn about them).
    """
    os.environ.setdefault("PREFECT_LOGGING_EXTRA_LOGGERS", ",".join(PROJECT_LOGGERS))
    os.environ.setdefault("PREFECT_LOGGING_TO_API_WHEN_MISSING_FLOW", "ignore")


def configure_logging(level: int = logging.INFO) -> None:
    """Log to stderr in one line per record; keep third-party chatter at WARNING."""
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for name in _NOISY_LOGGERS:
        logging.getLogger(name).setLevel(max(level, logging.WARNING))
