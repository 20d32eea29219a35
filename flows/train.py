"""Train flow: lake -> features -> autoencoder -> compression -> evaluation -> budget per target -> bundles."""

from __future__ import annotations

import datetime as dt
import uuid
from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact, create_table_artifact
from prefect.runtime import flow_run

from tasks.compress import compress_task
from tasks.datasets import Accumulation, LakeSelection, load_dataset_task, skipped_summary
from tasks.evaluate import (
    enforce_quality,
    evaluate_fixed_point_task,
    evaluate_models_task,
    score_deployed_model_task,
    with_fixed_point,
)
from tasks.packaging import (
    build_drift_reference_task,
    check_parity_task,
    enforce_some_target_fits,
    measure_arena_task,
    package_for_target_task,
    training_report_markdown,
)
from tasks.registration import compare_and_promote_task, log_training_task, register_bundle_task
from tasks.train import WindowSpeeds, build_feature_sets_task, load_training_config, train_autoencoder_task
from tinymlops.contracts.dsp import DspSpec
from tinymlops.settings import get_settings
from tinymlops.targets import get_target, load_catalog

PARITY_ROWS = 64


@flow(name="train")
def train_flow(
    fleet: str | None = None,
    targets: list[str] | None = None,
    devices: list[str] | None = None,
    start: dt.datetime | None = None,
    end: dt.datetime | None = None,
    config_path: str | None = None,
    register_models: bool = True,
    promote: bool = True,
    accumulate: Accumulation | None = None,
) -> dict[str, Any]:
    """Train, compress and validate a model for each target MCU, writing one bundle per target.

    Args:
        fleet: Fleet whose lake windows to train on (default: settings).
        targets: MCU target names from the catalog (default: settings).
        devices: Only these devices' windows.
        start: Only windows from this time.
        end: Only windows before this time.
        config_path: Training configuration (default: the ``training_config`` setting, ``data/training.yaml``).
        register_models: Log the run to MLflow and register every bundle that fits its target.
        promote: Promote a registered version to champion when the promotion rule allows it.
        accumulate: Also train on the windows this champion trained on, balanced per operating
            point and bounded (a retraining that adds to what the model covers).

    Returns:
        Run id, bundle directories per target, budget verdicts, the evaluation figures, the lake
        windows skipped as unusable (a count and the first few, each with device, seq and reason),
        the lake selection (with the accumulation's champion, spans and speed intervals) and the
        normal windows per operating point.
    """
    settings = get_settings().overridden(fleet=fleet, targets=targets, training_config=config_path)
    fleet = settings.fleet
    config = load_training_config(settings.training_config)
    catalog = load_catalog(settings.targets.catalog)
    mcu_targets = [get_target(name, catalog) for name in settings.targets.default]
    selection = LakeSelection(fleet, tuple(devices) if devices else None, start, end, accumulate=accumulate)
    run_name = f"train-{dt.datetime.now(tz=dt.UTC):%Y%m%dT%H%M%S}-{uuid.uuid4().hex[:6]}"
    lineage = {"train_run": run_name, "prefect_flow_run_id": str(flow_run.id or "")}

    dataset = load_dataset_task(
        settings.lake_root, selection, settings.sensor.window_samples, settings.sensor.max_abs_g
    )
    skipped = skipped_summary(dataset.skipped)
    if accumulate is not None:
        lineage |= accumulate.lineage(dataset.balance)
    spec = DspSpec(sample_rate_hz=dataset.sample_rate_hz, window_samples=settings.sensor.window_samples)
    speeds = WindowSpeeds(train=dataset.train_rpm, test=dataset.test_rpm, faults=dataset.fault_rpm)
    features = build_feature_sets_task(dataset.train_normal, dataset.test_normal, dataset.faults, spec, config, speeds)
    window_seconds = spec.window_samples / spec.sample_rate_hz
    trained = train_autoencoder_task(features, config)
    compression = compress_task(trained.model, features.parts.train, features.parts.validation, config)
    arena = measure_arena_task(compression.deployable)
    # The deployed model in TFLite Micro, scored once on every feature set; each step below reuses it.
    tflm_errors = score_deployed_model_task(compression.deployable, arena.smallest_working_bytes, features)
    comparison = evaluate_models_task(
        trained.model,
        compression.deployable,
        features,
        percentile=config.threshold_percentile,
        window_seconds=window_seconds,
        arena_bytes=arena.smallest_working_bytes,
        extra_tflite={
            "float32_tflite": compression.float_model,
            "dynamic_range_tflite": compression.dynamic_range_model,
            "int8_unpruned_tflite": compression.int8_model,
        },
        confidence=config.gates.false_alarm_confidence,
        tflm_errors=tflm_errors,
    )
    if any(target.dsp_arithmetic == "q15" for target in mcu_targets):
        fixed_point = evaluate_fixed_point_task(
            compression.deployable,
            dataset,
            features.spec,
            threshold=comparison["int8_tflm"].threshold,
            window_seconds=window_seconds,
            arena_bytes=arena.smallest_working_bytes,
        )
        comparison = with_fixed_point(comparison, fixed_point)
    enforce_quality(comparison, config.gates)
    drift_reference = build_drift_reference_task(features, tflm_errors.calibration, config.threshold_percentile)
    parity = check_parity_task(compression.deployable, features.test_normal[:PARITY_ROWS], arena)
    run_dir = settings.data_dir / "models" / fleet / run_name
    packaged = [
        package_for_target_task(
            run_dir,
            target=target,
            compression=compression,
            spec=features.spec,
            arena=arena,
            comparison=comparison,
            threshold_percentile=config.threshold_percentile,
            fleet=fleet,
            dataset_fingerprint=dataset.fingerprint,
            trained_span_us=dataset.trained_span_us,
            parity=parity,
            drift_reference=drift_reference,
            lineage=lineage,
        )
        for target in mcu_targets
    ]
    mlflow_run_id = None
    promotions = []
    if register_models:
        mlflow_run_id = log_training_task(
            run_name=run_name,
            config=config,
            selection=selection,
            dataset=dataset,
            features=features,
            trained=trained,
            compression=compression,
            comparison=comparison,
            tflm_errors=tflm_errors,
            packaged=packaged,
            flow_run_id=lineage["prefect_flow_run_id"],
        )
        for item in packaged:
            if item.passed:
                registered = register_bundle_task(item.bundle, mlflow_run_id, True)
                promotions.append(
                    compare_and_promote_task(
                        registered, item.bundle, dataset, window_seconds, promote, config.gates, tflm_errors
                    ).to_dict()
                )
    create_markdown_artifact(
        training_report_markdown(
            fleet=fleet,
            counts=dataset.counts,
            calibration_windows=len(features.parts.calibration),
            gates=config.gates,
            comparison=comparison,
            compression=compression,
            arena=arena,
            packaged=packaged,
            promotions=promotions,
            extra={
                "run": run_name,
                "bundles": str(run_dir),
                "MLflow run id": mlflow_run_id,
                **{f"skipped {w['device']} seq {w['seq']}": w["reason"] for w in skipped["first"]},
            },
        ),
        key=f"training-report-{fleet}".lower(),
        description=f"Training run {run_name}",
    )
    create_table_artifact(
        comparison.to_table(),
        key=f"training-quality-{fleet}".lower(),
        description=f"Training run {run_name}: quality on held-out windows, one row per interpreter",
    )
    enforce_some_target_fits(packaged)
    return {
        "run": run_name,
        "fleet": fleet,
        "epochs": trained.epochs_run,
        "bundles": {item.target: str(item.bundle.directory) for item in packaged},
        "budget_passed": {item.target: item.passed for item in packaged},
        "evaluation": {
            name: {
                "auc": e.auc,
                "f1": e.f1,
                "false_alarms_per_hour": e.false_alarms_per_hour,
                "false_alarm_rate": e.false_alarm_rate,
                "false_alarm_upper": e.false_alarm_upper,
                "confidence": e.confidence,
                "false_positives": e.false_positives,
                "n_normal": e.n_normal,
                "threshold": e.threshold,
                "auc_by_fault": e.auc_by_fault,
                "recall_by_fault": e.recall_by_fault,
            }
            for name, e in comparison.evaluations.items()
        },
        "sizes": compression.size_table(),
        "arena_bytes": arena.smallest_working_bytes,
        "dataset_fingerprint": dataset.fingerprint,
        "counts": dataset.counts,
        "selection": selection.to_dict(),
        "operating_points": dataset.balance,
        "skipped_windows": skipped,
        "mlflow_run_id": mlflow_run_id,
        "registered": promotions,
    }
