"""Train, compress, evaluate and package a model from a test lake, as the train flow does, without Prefect or MLflow.

Imported by test modules only: conftest must not import it (it imports Prefect, which must first see the
logging environment conftest sets).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from firmware.tflm import measure_arena
from tasks.budget import check_parity
from tasks.compress import compress
from tasks.datasets import LakeSelection, load_dataset
from tasks.evaluate import enforce_quality, evaluate_models, score_deployed_model
from tasks.packaging import build_drift_reference, package_for_target
from tasks.train import WindowSpeeds, build_feature_sets, load_training_config, train_autoencoder
from tests.conftest import FAST_TRAINING_CONFIG
from tinymlops.contracts.dsp import DspSpec
from tinymlops.schemas import ModelBundle
from tinymlops.settings import REPO_ROOT
from tinymlops.targets import get_target, load_catalog


def train_and_package(
    lake: Path,
    selection: LakeSelection,
    out: Path,
    *,
    lineage: Mapping[str, str],
    targets: Sequence[str] = ("nrf52840",),
    speed_aware: bool = True,
) -> ModelBundle:
    """The flow's steps on ``selection``, with the quick training config; one bundle per target under ``out``.

    Args:
        lake: The lake to read.
        selection: Its windows to train on.
        out: Where the bundles go (``out/<target>``).
        lineage: Recorded in the bundles.
        targets: MCU targets to package for; the last one's bundle is returned.
        speed_aware: Train on the windows' speeds (False: the speed-unaware spec of a fleet without tachometers).
    """
    dataset = load_dataset(lake, selection, window_samples=1024)
    config = load_training_config(FAST_TRAINING_CONFIG)
    spec = DspSpec(sample_rate_hz=dataset.sample_rate_hz, window_samples=1024)
    speeds = WindowSpeeds(dataset.train_rpm, dataset.test_rpm, dataset.fault_rpm) if speed_aware else None
    features = build_feature_sets(dataset.train_normal, dataset.test_normal, dataset.faults, spec, config, speeds)
    trained = train_autoencoder(features.parts.train, features.parts.validation, config)
    compression = compress(trained.model, features.parts.train, features.parts.validation, config)
    arena = measure_arena(compression.deployable)
    tflm_errors = score_deployed_model(compression.deployable, arena.smallest_working_bytes, features)
    comparison = evaluate_models(
        trained.model,
        compression.deployable,
        features.test_normal,
        features.faults,
        features.parts.calibration,
        percentile=config.threshold_percentile,
        window_seconds=spec.window_samples / spec.sample_rate_hz,
        arena_bytes=arena.smallest_working_bytes,
        tflm_errors=tflm_errors,
    )
    enforce_quality(comparison, config.gates)
    reference = build_drift_reference(features, tflm_errors.calibration, config.threshold_percentile)
    parity = check_parity(compression.deployable, features.test_normal[:64], arena)
    catalog = load_catalog(REPO_ROOT / "data" / "mcu_targets.yaml")
    bundles = [
        package_for_target(
            out,
            target=get_target(target, catalog),
            compression=compression,
            spec=features.spec,
            arena=arena,
            comparison=comparison,
            threshold_percentile=config.threshold_percentile,
            fleet=selection.fleet,
            dataset_fingerprint=dataset.fingerprint,
            trained_span_us=dataset.trained_span_us,
            parity=parity,
            drift_reference=reference,
            lineage=dict(lineage),
        ).bundle
        for target in targets
    ]
    return bundles[-1]
