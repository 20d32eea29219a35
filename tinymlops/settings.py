"""One typed settings object, read from the environment (`TINYMLOPS_` prefix, `__` for sections).

Built lazily by :func:`get_settings`; nothing is read at import time. Defaults give a working
embedded setup with no configuration at all: an MQTT broker started on loopback, MLflow on a
SQLite file, Prefect without a server, everything under ``data/``.
"""

from __future__ import annotations

import functools
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from pydantic import BaseModel, Field, SecretStr
from pydantic_settings import BaseSettings, SettingsConfigDict

REPO_ROOT = Path(__file__).resolve().parent.parent


DEFAULT_MAX_MESSAGE_BYTES = 256 * 1024
"""Largest MQTT payload by default: 8x the largest vibration window (16,384 samples), 64x an OTA chunk."""


class MqttSettings(BaseModel):
    """MQTT broker connection. With no ``url`` an embedded broker is started on loopback."""

    url: str | None = Field(
        default=None, description="Broker URL, mqtt://host:port or mqtts://host:port; unset starts an embedded broker."
    )
    username: str | None = Field(default=None, description="User name for the server-side flows.")
    password: SecretStr | None = Field(
        default=None, description="Password for the server-side flows (environment only)."
    )
    ca_file: Path | None = Field(default=None, description="CA certificate for mqtts:// URLs.")
    client_cert: Path | None = Field(
        default=None, description="Client certificate (PEM) for mqtts:// listeners that require one."
    )
    client_key: Path | None = Field(default=None, description="Private key (PEM) of client_cert.")
    client_id: str = Field(
        default="tinymlops-ingest", description="Client id of the ingest subscriber (persistent session)."
    )
    keepalive_s: int = Field(default=30, ge=5, description="MQTT keep-alive interval.")
    topic_root: str = Field(default="tinymlops", description="First topic level of every topic.")
    embedded_broker: str = Field(
        default="auto", pattern="^(auto|mosquitto|amqtt)$", description="Embedded broker: auto, mosquitto or amqtt."
    )
    max_message_bytes: int = Field(
        default=DEFAULT_MAX_MESSAGE_BYTES,
        ge=1024,
        le=268_435_455,
        description=(
            "Largest MQTT payload: the embedded Mosquitto drops larger publishes (message_size_limit) and the "
            "ingest quarantines only a bounded record of larger ones a broker without the limit delivers."
        ),
    )


DEFAULT_MAX_ABS_G = 2000.0
DEFAULT_IMPORT_MAX_SAMPLES = 1 << 25  # 22 min at 25.6 kHz; 256 MiB as float64, of which the import holds a few copies
DEFAULT_IMPORT_MAX_MAT_MB = 256
"""Largest |sample x scale| in g a real vibration sensor reports (see :attr:`SensorSettings.max_abs_g`)."""


class SensorSettings(BaseModel):
    """The fleet's sensor format: what a valid vibration window looks like."""

    sample_rate_hz: int = Field(default=25_600, gt=0, description="Sensor sampling rate.")
    window_samples: int = Field(default=1024, ge=64, le=16_384, description="Samples per window.")
    max_clipped_fraction: float = Field(
        default=0.01, ge=0, le=1, description="Reject a window with more full-scale samples than this fraction."
    )
    max_clock_skew_s: float = Field(
        default=300.0, gt=0, description="Reject windows time-stamped this far in the future."
    )
    min_timestamp_s: float = Field(
        default=1_577_836_800.0, description="Reject windows time-stamped before this (2020-01-01)."
    )
    max_abs_g: float = Field(
        default=DEFAULT_MAX_ABS_G,
        gt=0,
        le=1e6,
        description=(
            "Physical full scale: reject a window with any sample x scale beyond +/- this many g (and skip such "
            "windows in training). Industrial accelerometers report at most a few hundred to 2,000 g; more is a "
            "corrupt or hostile scale, which a float32 lake could read back as inf."
        ),
    )


class LakeSettings(BaseModel):
    """Where the data lake and its quarantine live."""

    root: Path | None = Field(default=None, description="Lake root; default <data_dir>/lake.")
    quarantine: Path | None = Field(default=None, description="Quarantine root; default <data_dir>/quarantine.")
    dedupe_horizon_days: float = Field(
        default=2,
        gt=0,
        description=(
            "Days of arrivals (ingest time, not the window's timestamp) whose content digests the ingest loads "
            "at start; the keys of the whole lake are always loaded."
        ),
    )
    dedupe_digests_per_stream: int = Field(
        default=8192,
        ge=16,
        description=(
            "Content digests held per device boot epoch (its most recent seqs; 128 KiB each); at least "
            "ingest.batch_windows are held, the most a crash leaves to redeliver."
        ),
    )
    compact_after_minutes: int = Field(
        default=60, ge=0, description="Compact an hour partition's files into one this long after the hour ends."
    )
    import_max_samples: int = Field(
        default=DEFAULT_IMPORT_MAX_SAMPLES,
        ge=1,
        description="Refuse to import a recording longer than this many samples (the import holds it in memory).",
    )
    import_max_mat_mb: int = Field(
        default=DEFAULT_IMPORT_MAX_MAT_MB,
        ge=1,
        description="Refuse to import a .mat file larger than this (MiB): .mat files are read whole, not in chunks.",
    )
    quarantine_prefix_bytes: int = Field(
        default=4096, ge=0, description="Bytes of a rejected payload kept in the quarantine (with its size and sha256)."
    )
    quarantine_max_bytes: int = Field(
        default=256 * 1024 * 1024, ge=1, description="Total size of the quarantine's files; the oldest go past it."
    )


class IngestSettings(BaseModel):
    """Batching of the MQTT ingest: a batch is written, then acknowledged."""

    batch_windows: int = Field(default=5000, ge=1, description="Write a batch once it holds this many windows.")
    flush_interval_s: float = Field(default=1.0, gt=0, description="Write a batch at least this often.")
    max_queued_bytes: int = Field(
        default=64 * 1024 * 1024,
        ge=1024,
        description=(
            "Bytes of received messages held before they are written; past it the ingest stops reading from the "
            "broker, which keeps the rest unacknowledged."
        ),
    )


class MlflowSettings(BaseModel):
    """MLflow tracking and registry."""

    tracking_uri: str | None = Field(default=None, description="Tracking URI; default sqlite:///<data_dir>/mlflow.db.")
    artifact_root: str | None = Field(default=None, description="Artifact root; default <data_dir>/mlartifacts.")
    experiment: str = Field(default="tinymlops", description="Experiment for training runs.")


class PrefectSettings(BaseModel):
    """Prefect orchestration."""

    api_url: str | None = Field(default=None, description="Prefect API URL; unset runs flows without a server.")
    home: Path | None = Field(default=None, description="PREFECT_HOME; default <data_dir>/prefect.")
    startup_timeout_s: int = Field(
        default=180,
        ge=1,
        description="Wait this long for the ephemeral Prefect server a command starts without api_url "
        "(Prefect's 20 s is missed on a loaded 2-core machine).",
    )


class TargetSettings(BaseModel):
    """MCU targets: the committed catalog and which ones a training run is validated for."""

    catalog: Path = Field(default=REPO_ROOT / "data" / "mcu_targets.yaml", description="MCU target catalog (YAML).")
    default: list[str] = Field(default_factory=lambda: ["nrf52840", "stm32l4r5"], description="Targets to build for.")


class DriftSettings(BaseModel):
    """Drift monitoring thresholds and retraining guard rails."""

    psi_threshold: float = Field(
        default=0.25, gt=0, description="Population stability index above which a feature drifted."
    )
    ks_threshold: float = Field(
        default=0.3, gt=0, le=1, description="Kolmogorov-Smirnov statistic above which a feature drifted."
    )
    min_drifted_features: int = Field(
        default=3, ge=1, description="Drifted features that make a device's data drifted."
    )
    error_shift_threshold: float = Field(
        default=0.3,
        gt=0,
        le=1,
        description="KS statistic of reconstruction errors against the reference that counts as drift.",
    )
    anomaly_rate_factor: float = Field(
        default=5.0, gt=1, description="Anomaly rate above this multiple of the expected false-alarm rate is abnormal."
    )
    fleet_fraction: float = Field(
        default=0.5, gt=0, le=1, description="Fraction of devices drifting together that makes it fleet data drift."
    )
    min_windows: int = Field(default=30, ge=5, description="Fewest windows per device before it is judged.")
    window_minutes: float = Field(default=10.0, gt=0, description="How far back each monitor run looks.")
    cooldown_minutes: float = Field(default=30.0, ge=0, description="At most one retraining per fleet in this period.")
    retrain_max_windows: int = Field(
        default=4000,
        ge=100,
        description="Most normal windows a retraining trains on (its champion's and the new ones), an equal "
        "share per operating point.",
    )


class Settings(BaseSettings):
    """All tinymlops settings."""

    model_config = SettingsConfigDict(env_prefix="TINYMLOPS_", env_nested_delimiter="__", extra="ignore")

    data_dir: Path = Field(default=REPO_ROOT / "data", description="Root of the lake and local stores.")
    fleet: str = Field(default="demo", pattern=r"^[A-Za-z0-9_-]{1,64}$", description="Default fleet name.")
    keys_dir: Path | None = Field(
        default=None,
        description="OTA signing key directory; default ~/.config/tinymlops/keys (outside the repository).",
    )
    cwru_dir: Path = Field(default=REPO_ROOT.parent / "shared" / "data" / "cwru", description="CWRU recordings.")
    training_config: Path = Field(
        default=REPO_ROOT / "data" / "training.yaml",
        description="Training configuration of a flow given none (the drift-triggered retraining included).",
    )
    mqtt: MqttSettings = Field(default_factory=MqttSettings)
    sensor: SensorSettings = Field(default_factory=SensorSettings)
    lake: LakeSettings = Field(default_factory=LakeSettings)
    ingest: IngestSettings = Field(default_factory=IngestSettings)
    mlflow: MlflowSettings = Field(default_factory=MlflowSettings)
    prefect: PrefectSettings = Field(default_factory=PrefectSettings)
    targets: TargetSettings = Field(default_factory=TargetSettings)
    drift: DriftSettings = Field(default_factory=DriftSettings)

    @property
    def lake_root(self) -> Path:
        """Resolved lake root."""
        return self.lake.root or self.data_dir / "lake"

    @property
    def quarantine_root(self) -> Path:
        """Resolved quarantine root."""
        return self.lake.quarantine or self.data_dir / "quarantine"

    @property
    def mlflow_tracking_uri(self) -> str:
        """Resolved MLflow tracking URI."""
        return self.mlflow.tracking_uri or f"sqlite:///{(self.data_dir / 'mlflow.db').resolve()}"

    @property
    def mlflow_artifact_root(self) -> str:
        """Resolved MLflow artifact root."""
        return self.mlflow.artifact_root or (self.data_dir / "mlartifacts").resolve().as_uri()

    @property
    def prefect_home(self) -> Path:
        """Resolved PREFECT_HOME."""
        return self.prefect.home or self.data_dir / "prefect"

    @property
    def resolved_keys_dir(self) -> Path:
        """Where the OTA signing key lives: ``keys_dir``, else ``$XDG_CONFIG_HOME/tinymlops/keys`` (~/.config)."""
        if self.keys_dir is not None:
            return self.keys_dir.expanduser()
        config_home = os.environ.get("XDG_CONFIG_HOME") or str(Path.home() / ".config")
        return Path(config_home).expanduser() / "tinymlops" / "keys"

    def overridden(
        self,
        *,
        fleet: str | None = None,
        broker_url: str | None = None,
        targets: Sequence[str] | None = None,
        training_config: str | Path | None = None,
    ) -> Settings:
        """These settings with a run's parameters in their place; a parameter left None or empty keeps the setting.

        Flows and CLI commands call it once at their start and pass what they resolved down to the tasks.
        """
        update: dict[str, Any] = {}
        if fleet:
            update["fleet"] = fleet
        if broker_url:
            update["mqtt"] = self.mqtt.model_copy(update={"url": broker_url})
        if targets:
            update["targets"] = self.targets.model_copy(update={"default": list(targets)})
        if training_config:
            update["training_config"] = Path(training_config)
        return self.model_copy(update=update)

    def resolved(self) -> dict[str, Any]:
        """Every setting as JSON values, with the defaults that derive from others filled in; secrets masked."""
        values: dict[str, Any] = json.loads(self.model_dump_json())
        values["keys_dir"] = str(self.resolved_keys_dir)
        values["lake"].update(root=str(self.lake_root), quarantine=str(self.quarantine_root))
        values["mlflow"].update(tracking_uri=self.mlflow_tracking_uri, artifact_root=self.mlflow_artifact_root)
        values["prefect"]["home"] = str(self.prefect_home)
        values["prefect"]["api_url"] = self.prefect.api_url or os.environ.get(
            "PREFECT_API_URL", "none: each command starts a temporary Prefect server"
        )
        if not self.mqtt.url:
            values["mqtt"]["url"] = f"none: an embedded {self.mqtt.embedded_broker} broker, or the announced one"
        return values


@functools.cache
def get_settings() -> Settings:
    """Return the process-wide settings, read from the environment on first use."""
    return Settings()


def reset_settings() -> None:
    """Forget the cached settings so the next :func:`get_settings` reads the environment again."""
    get_settings.cache_clear()


def settings_reference_markdown() -> str:
    """Return the configuration reference as a markdown table: variable, default, meaning."""
    rows: list[tuple[str, str, str]] = []

    def walk(model: type[BaseModel], prefix: str) -> None:
        for name, info in model.model_fields.items():
            annotation = info.annotation
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                walk(annotation, f"{prefix}{name.upper()}__")
                continue
            default = info.get_default(call_default_factory=True)
            if isinstance(default, Path):
                default = os.path.relpath(default, REPO_ROOT)  # the checkout's location is not part of the default
            shown = "(unset)" if default is None else f"`{default}`"
            rows.append((f"`{prefix}{name.upper()}`", shown, info.description or ""))

    walk(Settings, "TINYMLOPS_")
    lines = ["| variable | default | meaning |", "|---|---|---|"]
    lines += [f"| {var} | {default} | {meaning} |" for var, default, meaning in rows]
    return "\n".join(lines) + "\n"
