"""Experiment tracking: one MLflow run per training, with everything needed to audit or repeat it.

A run records the parameters (architecture, sparsity, quantization mode, threshold percentile,
DSP spec version, seed, ...), the metrics (AUC, F1, false alarms of the float, int8 and TFLite
Micro models; sizes; arena; MACs; per-target latency), the per-epoch loss curves, the dataset
fingerprint (a tag and an MLflow dataset input describing the lake selection), the plots and the
artifacts: the Keras model, every bundle's files under ``bundles/<target>/`` and any reports.
Monitoring runs (:func:`log_report_run`) and over-the-air deployment runs
(:func:`log_deployment_run`) are logged here too. Every run is written with
:class:`mlflow.MlflowClient` calls on an explicit run id, so it neither needs nor disturbs an
active fluent run.
"""

from __future__ import annotations

import json
import logging
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from registry.errors import RegistryError
from registry.store import first_line, mlflow_client
from tinymlops.errors import TinyMLOpsError
from tinymlops.schemas import ModelBundle

if TYPE_CHECKING:
    from matplotlib.figure import Figure
    from mlflow import MlflowClient

log = logging.getLogger(__name__)

TAG_DATASET_FINGERPRINT = "dataset.fingerprint"
TAG_FLOW_RUN_ID = "prefect.flow_run_id"
_MAX_PARAM_VALUE = 6000
_BAD_KEY_CHARS = re.compile(r"[^\w.\-/ :]")


def _flatten(data: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested mappings become dotted keys (``pruning.target_sparsity``)."""
    flat: dict[str, Any] = {}
    for key, value in data.items():
        name = _BAD_KEY_CHARS.sub("_", f"{prefix}{key}")
        if isinstance(value, Mapping):
            flat.update(_flatten(value, f"{name}."))
        else:
            flat[name] = value
    return flat


def _param_value(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (list, tuple)) else str(value)
    return text[:_MAX_PARAM_VALUE]


def _metric_values(metrics: Mapping[str, Any]) -> dict[str, float]:
    out = {}
    for key, value in _flatten(metrics).items():
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
            log.debug("metric %s is not a number (%r): not logged", key, value)
            continue
        out[key] = float(value)
    return out


def log_training_run(
    experiment_id: str,
    *,
    params: Mapping[str, Any],
    metrics: Mapping[str, Any],
    dataset_fingerprint: str,
    lake_selection: Mapping[str, Any],
    plots: Mapping[str, Figure] | None = None,
    bundles: Sequence[ModelBundle] = (),
    artifacts: Mapping[str, Path] | None = None,
    keras_model_path: Path | None = None,
    history: Mapping[str, Sequence[float]] | None = None,
    tags: Mapping[str, str] | None = None,
    flow_run_id: str | None = None,
    run_name: str | None = None,
) -> str:
    """Log one training run and return its id; the run ends FINISHED, or FAILED if logging fails.

    Args:
        experiment_id: The experiment (:func:`registry.store.configure_mlflow` returns it).
        params: Parameters; nested mappings are flattened to dotted names, lists logged as JSON.
        metrics: Final figures; nested mappings flattened (``int8.auc``), non-numbers skipped.
        dataset_fingerprint: sha256 of the training windows and lake selection (run tag
            ``dataset.fingerprint`` and the digest of the dataset input).
        lake_selection: What was read from the lake (fleet, devices, time range, counts): logged
            as ``lake_selection.json`` and as the dataset input's source.
        plots: Figures by name, logged as ``plots/<name>.png``.
        bundles: Bundles logged file by file under ``bundles/<target>/``.
        artifacts: Extra files or directories by destination folder in the run (e.g.
            ``{"reports": Path("evaluation.json")}``).
        keras_model_path: The float Keras model (file or SavedModel directory), under ``keras_model/``.
        history: Per-epoch series (``loss``, ``val_loss``) logged as metrics ``train.<name>`` by step.
        tags: Extra run tags.
        flow_run_id: The Prefect flow run, tagged ``prefect.flow_run_id``.
        run_name: Run name shown in the UI.

    Returns:
        The run id.

    Raises:
        RegistryError: A file to log is missing or MLflow refused a call (the run is marked FAILED).

    """
    from mlflow.entities import Dataset, DatasetInput, InputTag, Metric, Param
    from mlflow.utils.mlflow_tags import MLFLOW_DATASET_CONTEXT

    client = mlflow_client()
    run_tags = {TAG_DATASET_FINGERPRINT: dataset_fingerprint, **(tags or {})}
    if flow_run_id:
        run_tags[TAG_FLOW_RUN_ID] = flow_run_id
    try:
        run = client.create_run(experiment_id, tags=run_tags, run_name=run_name)
    except Exception as exc:
        raise RegistryError(f"cannot create a run in experiment {experiment_id}: {first_line(exc)}") from exc
    run_id = run.info.run_id
    try:
        stamp = run.info.start_time
        param_list = [Param(k, _param_value(v)) for k, v in _flatten(params).items()]
        metric_list = [Metric(k, v, stamp, 0) for k, v in _metric_values(metrics).items()]
        for series, values in (history or {}).items():
            metric_list += [Metric(f"train.{series}", float(v), stamp, step) for step, v in enumerate(values, 1)]
        for start in range(0, max(len(param_list), len(metric_list)), 100):  # MLflow caps a batch at 100 params
            client.log_batch(run_id, metrics=metric_list[start : start + 100], params=param_list[start : start + 100])
        selection_json = json.dumps(lake_selection, default=str, sort_keys=True)  # times and paths as text
        client.log_text(run_id, selection_json, "lake_selection.json")
        dataset = Dataset(
            name=str(lake_selection.get("fleet", "lake")),
            digest=dataset_fingerprint[:36],
            source_type="tinymlops-lake",
            source=selection_json,
        )
        client.log_inputs(run_id, [DatasetInput(dataset, [InputTag(MLFLOW_DATASET_CONTEXT, "training")])])
        for name, figure in (plots or {}).items():
            client.log_figure(run_id, figure, f"plots/{name}.png")
        for bundle in bundles:
            _log_path(client, run_id, bundle.directory, f"bundles/{bundle.metadata.target}")
        for folder, path in (artifacts or {}).items():
            _log_path(client, run_id, path, folder)
        if keras_model_path is not None:
            _log_path(client, run_id, keras_model_path, "keras_model")
    except BaseException as exc:
        client.set_terminated(run_id, "FAILED")
        if isinstance(exc, TinyMLOpsError) or not isinstance(exc, Exception):
            raise
        raise RegistryError(f"logging training run {run_id} failed: {first_line(exc)}") from exc
    client.set_terminated(run_id, "FINISHED")
    log.info("logged training run %s (%d params, %d metrics)", run_id, len(param_list), len(metric_list))
    return str(run_id)


def _log_path(client: MlflowClient, run_id: str, path: Path, folder: str) -> None:
    if path.is_dir():
        client.log_artifacts(run_id, str(path), folder)
    elif path.is_file():
        client.log_artifact(run_id, str(path), folder)
    else:
        raise RegistryError(f"cannot log {path} to run {run_id}: no such file or directory")


def _new_figure(width: float = 6.4, height: float = 4.0) -> Figure:
    """A figure on the Agg canvas, outside pyplot's global state (nothing to close, no display needed)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(width, height), layout="constrained")
    FigureCanvasAgg(figure)
    return figure


def plot_error_histogram(
    normal_errors: npt.ArrayLike, fault_errors: npt.ArrayLike | Mapping[str, npt.ArrayLike], threshold: float
) -> Figure:
    """Histogram of reconstruction errors, normal against fault windows, with the threshold (log x axis)."""
    normal = np.asarray(normal_errors, dtype=np.float64).ravel()
    faults = (
        {k: np.asarray(v, dtype=np.float64).ravel() for k, v in fault_errors.items()}
        if isinstance(fault_errors, Mapping)
        else {"fault": np.asarray(fault_errors, dtype=np.float64).ravel()}
    )
    every = np.concatenate([normal, *faults.values(), [threshold]])
    positive = every[np.isfinite(every) & (every > 0)]
    low, high = (positive.min(), positive.max()) if positive.size else (1e-6, 1.0)
    bins = np.geomspace(low, high * (1 + 1e-9) if high > low else low * 10, 60).tolist()
    figure = _new_figure()
    ax = figure.add_subplot()
    ax.hist(normal, bins=bins, alpha=0.6, label=f"normal (n={normal.size})")
    for name, values in faults.items():
        ax.hist(values, bins=bins, alpha=0.5, label=f"{name} (n={values.size})")
    ax.axvline(threshold, color="black", linestyle="--", label=f"threshold {threshold:.3g}")
    ax.set_xscale("log")
    ax.set_xlabel("reconstruction error (normalised features)")
    ax.set_ylabel("windows")
    ax.legend(fontsize="small")
    return figure


def plot_roc(scores: Mapping[str, tuple[npt.ArrayLike, npt.ArrayLike]]) -> Figure:
    """ROC curves of several models on the same windows: model name to (normal scores, fault scores)."""
    from sklearn.metrics import roc_auc_score, roc_curve

    figure = _new_figure(5.0, 5.0)
    ax = figure.add_subplot()
    for name, (normal, fault) in scores.items():
        n = np.asarray(normal, dtype=np.float64).ravel()
        f = np.asarray(fault, dtype=np.float64).ravel()
        labels = np.concatenate([np.zeros(n.size), np.ones(f.size)])
        values = np.concatenate([n, f])
        fpr, tpr, _ = roc_curve(labels, values)
        ax.plot(fpr, tpr, label=f"{name} (AUC {roc_auc_score(labels, values):.4f})")
    ax.plot([0, 1], [0, 1], color="grey", linestyle=":", linewidth=1)
    ax.set_xlabel("false positive rate")
    ax.set_ylabel("true positive rate")
    ax.legend(loc="lower right", fontsize="small")
    return figure


def plot_training_loss(history: Mapping[str, Sequence[float]]) -> Figure:
    """Per-epoch loss curves (``loss``, ``val_loss``, ...) on a log y axis."""
    figure = _new_figure()
    ax = figure.add_subplot()
    for name, values in history.items():
        series = [float(v) for v in values]
        ax.plot(range(1, len(series) + 1), series, label=name)
    finite = [float(v) for values in history.values() for v in values if math.isfinite(float(v)) and float(v) > 0]
    if finite:
        ax.set_yscale("log")
    ax.set_xlabel("epoch")
    ax.set_ylabel("loss (MSE)")
    ax.legend(fontsize="small")
    return figure


def log_report_run(
    experiment_id: str,
    *,
    run_name: str,
    params: Mapping[str, Any],
    metrics: Mapping[str, Any],
    markdown: str,
    figure: Figure | None = None,
    tags: Mapping[str, str] | None = None,
    flow_run_id: str | None = None,
) -> str:
    """Log a finished monitoring or deployment run: parameters, flat metrics, a report and a plot.

    Returns:
        The run id.

    Raises:
        RegistryError: MLflow refused a call (the run is marked FAILED).
    """
    from mlflow.entities import Metric, Param
    from mlflow.exceptions import MlflowException

    client = mlflow_client()
    all_tags = {**(tags or {}), **({"prefect.flow_run_id": flow_run_id} if flow_run_id else {})}
    run = client.create_run(experiment_id, run_name=run_name, tags=all_tags)
    run_id = run.info.run_id
    try:
        now = int(run.info.start_time)
        values = {k: v for k, v in _metric_values(metrics).items() if math.isfinite(v)}
        client.log_batch(
            run_id,
            metrics=[Metric(k, v, now, 0) for k, v in values.items()],
            params=[Param(k, _param_value(v)) for k, v in _flatten(params).items()],
        )
        client.log_text(run_id, markdown, "report.md")
        if figure is not None:
            client.log_figure(run_id, figure, "plots/report.png")
    except MlflowException as exc:
        client.set_terminated(run_id, "FAILED")
        raise RegistryError(f"cannot log run {run_name!r}: {first_line(exc)}") from exc
    client.set_terminated(run_id, "FINISHED")
    return str(run_id)


def log_deployment_run(
    experiment_id: str,
    *,
    run_name: str,
    tags: Mapping[str, str],
    params: Mapping[str, Any],
    metrics: Mapping[str, float],
    markdown: str,
    report: Mapping[str, Any],
    flow_run_id: str | None = None,
) -> str:
    """Log one over-the-air deployment: its figures and its report as ``deployment_report.md`` and ``.json``.

    Args:
        experiment_id: The deployments experiment (:func:`registry.store.configure_experiment`).
        run_name: Run name shown in the UI.
        tags: Run tags (outcome, model sha256, target).
        params: Parameters, logged as text.
        metrics: Figures (device counts, latencies, canary rates), logged at the run's start time.
        markdown: The report as markdown.
        report: The report as a JSON-serialisable mapping.
        flow_run_id: The Prefect flow run, tagged ``prefect.flow_run_id``.

    Returns:
        The run id.

    Raises:
        RegistryError: MLflow refused to log (the run is marked FAILED).
    """
    from mlflow.entities import Metric, Param

    client = mlflow_client()
    run_tags = {**tags, **({TAG_FLOW_RUN_ID: flow_run_id} if flow_run_id else {})}
    run = client.create_run(experiment_id, tags=run_tags, run_name=run_name)
    run_id = run.info.run_id
    stamp = run.info.start_time
    try:
        client.log_batch(
            run_id,
            metrics=[Metric(k, v, stamp, 0) for k, v in metrics.items()],
            params=[Param(k, str(v)) for k, v in params.items()],
        )
        client.log_text(run_id, markdown, "deployment_report.md")
        client.log_dict(run_id, dict(report), "deployment_report.json")
    except Exception as exc:
        client.set_terminated(run_id, "FAILED")
        raise RegistryError(f"logging deployment run {run_id} failed: {first_line(exc)}") from exc
    client.set_terminated(run_id, "FINISHED")
    return str(run_id)
