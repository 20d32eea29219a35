"""Process set-up done by entry points (CLI, tests), never at import time."""

from __future__ import annotations

import logging
import os

from tinymlops.settings import Settings

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


def configure_logging(level: int = logging.INFO) -> None:
    """Log to stderr in one line per record; keep third-party chatter at WARNING."""
    logging.basicConfig(level=level, format="%(asctime)s %(levelname)-7s %(name)s: %(message)s", datefmt="%H:%M:%S")
    for name in _NOISY_LOGGERS:
        logging.getLogger(name).setLevel(max(level, logging.WARNING))
