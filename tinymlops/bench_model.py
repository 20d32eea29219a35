"""Model benchmark: our int8 autoencoder beside the MLPerf Tiny anomaly-detection reference, in one run.

Both models are trained on the same real CWRU windows (imported into a temporary lake and read
back with the same selection and hold-out), trained and calibrated the same way, and measured the
same way: ROC-AUC of the float, int8 TFLite and int8 TFLite Micro models, int8 flatbuffer bytes,
TFLite Micro arena, MACs counted from the graph, and the budget gate's latency estimate per MCU
target. The wall time of a real train flow run on the same lake is measured too. Like the CLI,
this module is part of the application layer on top of flows and tasks.
"""

from __future__ import annotations

import logging
import os
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from firmware.tflm import ArenaMeasurement, count_macs, measure_arena
from tasks.budget import BudgetReport, validate_budget
from tasks.compress import compress, gzip_size
from tasks.datasets import DatasetSplit, LakeSelection, load_dataset
from tasks.evaluate import ModelComparison, evaluate_models
from tasks.importers import CWRU_GLOB, import_cwru
from tasks.mlperf_reference import (
    ReferenceFeatureSets,
    ReferenceFrontEnd,
    build_reference_feature_sets,
    train_reference,
)
from tasks.train import FeatureSets, TrainingConfig, build_feature_sets, load_training_config, train_autoencoder
from tinymlops.bench import machine_description
from tinymlops.contracts.dsp import DspSpec
from tinymlops.errors import TinyMLOpsError
from tinymlops.settings import Settings, reset_settings
from tinymlops.targets import McuTarget, load_catalog

log = logging.getLogger(__name__)

FLEET = "cwru"
# The benchmark's target: at least this many times fewer bytes and MACs than the reference, at equal or better AUC.
MIN_RATIO = 10.0
# Decimals kept for figures in the result.
_DIGITS = 4


class BenchDataError(TinyMLOpsError):
    """The data the model benchmark needs is missing."""


def quick_training_config(config: TrainingConfig) -> TrainingConfig:
    """A shortened copy of ``config`` for a quick run: fewer epochs everywhere, same pipeline."""
    data = config.model_dump()
    data.update(epochs=min(config.epochs, 20), patience=min(config.patience, 5))
    data["pruning"]["fine_tune_epochs"] = min(config.pruning.fine_tune_epochs, 3)
    data["quantization"]["qat_epochs"] = min(config.quantization.qat_epochs, 3)
    return TrainingConfig.model_validate(data)


@dataclass(frozen=True)
class ModelFigures:
    """What the benchmark measures of one model."""

    int8_model: bytes
    arena: ArenaMeasurement
    macs: int
    comparison: ModelComparison
    budgets: dict[str, BudgetReport]
    pipeline_s: float

    def to_flat(self, prefix: str) -> dict[str, Any]:
        """Flat figures, every key starting with ``prefix``."""
        figures: dict[str, Any] = {
            f"{prefix}int8_model_bytes": len(self.int8_model),
            f"{prefix}int8_model_gzip_bytes": gzip_size(self.int8_model),
            f"{prefix}tflm_arena_bytes": self.arena.smallest_working_bytes,
            f"{prefix}macs": self.macs,
            f"{prefix}auc_float": round(self.comparison["float"].auc, _DIGITS),
            f"{prefix}auc_int8": round(self.comparison["int8_tflite"].auc, _DIGITS),
            f"{prefix}auc_tflm": round(self.comparison["int8_tflm"].auc, _DIGITS),
            f"{prefix}f1_tflm": round(self.comparison["int8_tflm"].f1, _DIGITS),
            f"{prefix}pipeline_s": round(self.pipeline_s, 2),
        }
        for name, report in self.budgets.items():
            figures[f"{prefix}latency_ms_{name}"] = round(report.latency.total_ms, _DIGITS)
            figures[f"{prefix}inference_ms_{name}"] = round(report.latency.inference_ms, _DIGITS)
            figures[f"{prefix}fits_{name}"] = report.passed
        return figures


def _measure(
    float_model: Any,
    int8_model: bytes,
    features: FeatureSets | ReferenceFeatureSets,
    *,
    config: TrainingConfig,
    spec: DspSpec,
    catalog: dict[str, McuTarget],
    started: float,
) -> ModelFigures:
    """Measure one trained model on its own feature sets (ours or the reference's)."""
    arena = measure_arena(int8_model)
    comparison = evaluate_models(
        float_model,
        int8_model,
        features.test_normal,
        features.faults,
        features.parts.calibration,
        percentile=config.threshold_percentile,
        window_seconds=spec.window_samples / spec.sample_rate_hz,
        arena_bytes=arena.smallest_working_bytes,
    )
    pipeline_s = time.perf_counter() - started
    # The DSP terms (latency, buffers, tables) are our front end's for both models: the reference's
    # 5 x 256-point FFTs cost about as much as one 1024-point FFT, so the differences are the model's.
    budgets = {name: validate_budget(int8_model, target, spec, arena) for name, target in catalog.items()}
    return ModelFigures(int8_model, arena, count_macs(int8_model), comparison, budgets, pipeline_s)


def _ours(dataset: DatasetSplit, spec: DspSpec, config: TrainingConfig, catalog: dict[str, McuTarget]) -> ModelFigures:
    """Our pipeline, with the task functions the train flow uses."""
    started = time.perf_counter()
    features = build_feature_sets(dataset.train_normal, dataset.test_normal, dataset.faults, spec, config)
    trained = train_autoencoder(features.parts.train, features.parts.validation, config)
    compression = compress(trained.model, features.parts.train, features.parts.validation, config)
    return _measure(
        trained.model,
        compression.deployable,
        features,
        config=config,
        spec=features.spec,
        catalog=catalog,
        started=started,
    )


def _reference(
    dataset: DatasetSplit, spec: DspSpec, config: TrainingConfig, catalog: dict[str, McuTarget]
) -> ModelFigures:
    """The MLPerf Tiny AD reference on the same windows."""
    started = time.perf_counter()
    front_end = ReferenceFrontEnd(sample_rate_hz=spec.sample_rate_hz, window_samples=spec.window_samples)
    features = build_reference_feature_sets(
        dataset.train_normal, dataset.test_normal, dataset.faults, front_end, config
    )
    reference = train_reference(features, config)
    return _measure(
        reference.model,
        reference.int8_model,
        features,
        config=config,
        spec=spec,
        catalog=catalog,
        started=started,
    )


@contextmanager
def _data_dir(data_dir: Path) -> Iterator[None]:
    """Point the process settings at another data directory (and its lake) while the block runs."""
    names = ("TINYMLOPS_DATA_DIR", "TINYMLOPS_LAKE__ROOT")
    saved = {name: os.environ.get(name) for name in names}
    os.environ["TINYMLOPS_DATA_DIR"] = str(data_dir)
    os.environ["TINYMLOPS_LAKE__ROOT"] = str(data_dir / "lake")
    reset_settings()
    try:
        yield
    finally:
        for name, value in saved.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value
        reset_settings()


def _time_train_flow(data_dir: Path, config: TrainingConfig) -> tuple[float, dict[str, Any]]:
    """Run the real train flow on the temporary lake; return its wall time and its result."""
    from flows.train import train_flow

    config_path = data_dir / "training.yaml"
    config_path.write_text(yaml.safe_dump(config.model_dump(), sort_keys=False), encoding="utf-8")
    with _data_dir(data_dir):
        started = time.perf_counter()
        outcome = train_flow(fleet=FLEET, config_path=str(config_path))
        elapsed = time.perf_counter() - started
    log.info("train flow on the CWRU lake: %.1f s", elapsed)
    return elapsed, outcome


def _check_cwru(cwru_dir: Path) -> None:
    if not any(cwru_dir.glob(CWRU_GLOB)):
        raise BenchDataError(
            f"CWRU recordings ({CWRU_GLOB}) not found in {cwru_dir}: set TINYMLOPS_CWRU_DIR to their directory"
        )


def bench_model(settings: Settings, *, quick: bool) -> dict[str, Any]:
    """Benchmark our int8 model against the MLPerf Tiny AD reference on the real CWRU recordings.

    Args:
        settings: CWRU directory, sensor format and MCU target catalog.
        quick: Fewer epochs for both models and the flow (see :func:`quick_training_config`).

    Returns:
        Flat figures: ours unprefixed and the reference's prefixed ``reference_``, each with
        ``int8_model_bytes`` (and gzip), ``tflm_arena_bytes``, ``macs``, ``auc_float``/``auc_int8``/
        ``auc_tflm``, ``f1_tflm`` (at the calibrated threshold: AUC saturates on CWRU), ``pipeline_s``
        (train, compress, evaluate), ``latency_ms_<target>`` (DSP plus inference), ``inference_ms_<target>``
        and ``fits_<target>`` (the whole budget gate);
        ``bytes_ratio`` and ``macs_ratio`` (reference / ours), ``targets_met``, ``train_flow_s`` (the
        real train flow on the same lake, a temporary Prefect server's start included when no server
        is configured) and the machine.

    Raises:
        BenchDataError: The CWRU recordings are missing.
    """
    _check_cwru(settings.cwru_dir)
    config = load_training_config(settings.training_config)
    if quick:
        config = quick_training_config(config)
    catalog = load_catalog(settings.targets.catalog)
    window = settings.sensor.window_samples
    with tempfile.TemporaryDirectory(prefix="tinymlops-bench-model-") as tmp:
        data_dir = Path(tmp) / "data"
        import_cwru(
            settings.cwru_dir,
            lake_root=data_dir / "lake",
            fleet=FLEET,
            target_rate_hz=settings.sensor.sample_rate_hz,
            window_samples=window,
        )
        dataset = load_dataset(data_dir / "lake", LakeSelection(FLEET), window_samples=window)
        spec = DspSpec(sample_rate_hz=dataset.sample_rate_hz, window_samples=window)
        ours = _ours(dataset, spec, config, catalog)
        reference = _reference(dataset, spec, config, catalog)
        train_flow_s, outcome = _time_train_flow(data_dir, config)

    bytes_ratio = len(reference.int8_model) / len(ours.int8_model)
    macs_ratio = reference.macs / ours.macs
    auc_ok = all(ours.comparison[name].auc >= reference.comparison[name].auc for name in ("int8_tflite", "int8_tflm"))
    figures = {
        "quick": quick,
        "train_flow_s": round(train_flow_s, 2),
        "train_flow_epochs": outcome["epochs"],
        **ours.to_flat(""),
        **reference.to_flat("reference_"),
        "bytes_ratio": round(bytes_ratio, 2),
        "macs_ratio": round(macs_ratio, 2),
        "targets_met": bytes_ratio >= MIN_RATIO and macs_ratio >= MIN_RATIO and auc_ok,
        "dataset_windows": sum(dataset.counts.values()),
        **machine_description(),
    }
    log.info(
        "model benchmark: %.1fx fewer bytes, %.1fx fewer MACs, int8 AUC %.4f vs %.4f: target %s",
        bytes_ratio,
        macs_ratio,
        ours.comparison["int8_tflite"].auc,
        reference.comparison["int8_tflite"].auc,
        "met" if figures["targets_met"] else "missed",
    )
    return figures
