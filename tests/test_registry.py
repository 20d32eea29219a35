"""MLflow tracking, registry, promotion and the pyfunc model against a real SQLite store (one per module).

Bundles are real: the small int8 autoencoder of ``tests/int8_model.py``, a DSP spec fitted on
synthetic normal vibration, the TFLite Micro arena measured, budgets validated against real
catalog targets (and a tiny one nothing fits), C arrays rendered. Each test registers under its
own target name (a copy of a catalog target), so tests do not depend on each other's aliases.
"""

from __future__ import annotations

import datetime as dt
import functools
import json
import socket
import time
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import mlflow
import numpy as np
import numpy.typing as npt
import pandas as pd
import pytest
from mlflow import MlflowClient
from sklearn.metrics import roc_auc_score

from firmware.carray import model_to_c
from firmware.tflm import ArenaMeasurement, count_macs, measure_arena, tflite_predict
from registry.errors import (
    ModelArtifactsError,
    ModelInputError,
    ModelIntegrityError,
    ModelNotFoundError,
    PromotionError,
    RegistryError,
    RegistryUnavailableError,
)
from registry.models import (
    CANDIDATE,
    CHAMPION,
    PREVIOUS,
    aliases_of,
    describe,
    list_models,
    register_bundle,
    resolve,
)
from registry.promotion import (
    AUC_TOLERANCE,
    AbsoluteGates,
    decide_promotion,
    promote,
    promotion_history,
    record_comparison,
    record_refusal,
    recorded_comparison,
    rollback,
)
from registry.pyfunc_model import bundle_dir_of
from registry.store import configure_mlflow
from registry.tracking import log_training_run, plot_error_histogram, plot_roc, plot_training_loss
from tasks.budget import validate_budget
from tests.int8_model import int8_autoencoder
from tinymlops.contracts.dsp import DspSpec, extract_features, raw_features
from tinymlops.contracts.scoring import anomaly_scores
from tinymlops.schemas import (
    BundleError,
    BundleMetadata,
    DriftReference,
    ModelBundle,
    load_bundle,
    registered_model_name,
    sha256_hex,
    write_bundle,
)
from tinymlops.targets import McuTarget, get_target, load_catalog

pytestmark = pytest.mark.mlflow

SAMPLE_RATE = 25_600
WINDOW = 1024
FINGERPRINT = sha256_hex(b"registry test windows")


# ---------------------------------------------------------------- real bundles


def normal_windows(n: int, seed: int) -> npt.NDArray[np.float32]:
    """Healthy-machine-like windows: shaft harmonics near 30 Hz with random phases plus a low noise floor (g)."""
    rng = np.random.default_rng(seed)
    t = np.arange(WINDOW) / SAMPLE_RATE
    rows = []
    for _ in range(n):
        f0 = 29.95 * rng.uniform(0.97, 1.03)
        row = sum(
            rng.uniform(0.05, 0.2) / k * np.sin(2 * np.pi * k * f0 * t + rng.uniform(0, 2 * np.pi)) for k in (1, 2, 3)
        )
        rows.append(row + rng.normal(0, 0.03, WINDOW))
    return np.asarray(rows, dtype=np.float32)


def noise_windows(n: int, seed: int) -> npt.NDArray[np.float32]:
    """Strong broadband noise (3 g RMS): far outside anything the spec was fitted on."""
    return np.random.default_rng(seed).normal(0, 3.0, (n, WINDOW)).astype(np.float32)


def reconstruction_errors(model: bytes, spec: DspSpec, windows: npt.NDArray[np.float32]) -> npt.NDArray[np.float64]:
    features = extract_features(windows, spec)
    return anomaly_scores(features, tflite_predict(model, features))


@dataclass(frozen=True)
class Assets:
    model: bytes
    spec: DspSpec
    arena: ArenaMeasurement
    threshold: float
    drift_reference: DriftReference
    metrics: dict[str, float]
    evaluation: dict[str, float]


@functools.cache
def assets() -> Assets:
    """The model, a spec fitted on normal windows, its measured arena and a calibrated threshold (built once)."""
    model = int8_autoencoder()
    spec = DspSpec(sample_rate_hz=SAMPLE_RATE, window_samples=WINDOW)
    spec = spec.fitted(raw_features(normal_windows(300, seed=1), spec))
    calibration = normal_windows(100, seed=2)
    calibration_errors = reconstruction_errors(model, spec, calibration)
    threshold = float(np.percentile(calibration_errors, 99.5))
    drift = DriftReference(extract_features(calibration, spec), calibration_errors.astype(np.float32), 0.005)
    normal = reconstruction_errors(model, spec, normal_windows(60, seed=3))
    fault = reconstruction_errors(model, spec, noise_windows(20, seed=4))
    labels = np.r_[np.zeros(normal.size), np.ones(fault.size)]
    auc = float(roc_auc_score(labels, np.r_[normal, fault]))
    hours = normal.size * WINDOW / SAMPLE_RATE / 3600
    far = float(np.sum(normal > threshold) / hours)
    metrics = {"auc_int8_tflite": auc, "false_alarms_per_hour_int8_tflite": far, "bytes_int8": float(len(model))}
    evaluation = {"auc_int8": auc, "false_alarms_per_hour": far}
    return Assets(model, spec, measure_arena(model), threshold, drift, metrics, evaluation)


def catalog_target(base: str, name: str) -> McuTarget:
    """A catalog target under another name: its budget, a registered model of its own."""
    return get_target(base, load_catalog()).model_copy(update={"name": name})


def tiny_target(name: str) -> McuTarget:
    """A target nothing fits (RAM and flash far too small)."""
    return McuTarget(
        name=name, description="a target nothing fits", core="Arm Cortex-M0+", clock_hz=1_000_000,
        sram_bytes=4096, flash_bytes=8192, firmware_flash_reserve_bytes=1024, runtime_flash_bytes=1024,
        ram_reserve_bytes=512, cycles_per_mac_int8=20.0, cycles_per_mac_int8_cmsis_nn=20.0,
        uses_optimized_kernels=False, dsp_cycles_per_sample=100.0, latency_budget_ms=1.0,
    )  # fmt: skip


def make_bundle(
    root: Path, target: McuTarget, *, label: str = "a", lineage: dict[str, str] | None = None
) -> ModelBundle:
    """Write a real bundle for ``target`` under ``root/<target>-<label>`` (budget validated, C arrays rendered)."""
    a = assets()
    report = validate_budget(a.model, target, a.spec, arena=a.arena)
    c_name = f"vibration_ae_{target.name}"
    c_source, c_header = model_to_c(a.model, c_name)
    metadata = BundleMetadata(
        model_name=registered_model_name(target.name),
        target=target.name,
        fleet="test",
        threshold=a.threshold,
        threshold_percentile=99.5,
        dsp_spec_version=a.spec.version,
        tflite_sha256=sha256_hex(a.model),
        tflite_bytes=len(a.model),
        arena_bytes=a.arena.smallest_working_bytes,
        macs=count_macs(a.model),
        n_features=a.spec.n_features,
        c_name=c_name,
        quantization="ptq",
        sparsity=0.0,
        budget_passed=report.passed,
        dataset_fingerprint=FINGERPRINT,
        metrics={**a.metrics, **{f"budget_{c.name}": float(c.measured) for c in report.checks}},
        lineage={"label": label, **(lineage or {})},
    )
    return write_bundle(
        root / f"{target.name}-{label}",
        tflite=a.model,
        dsp_spec_json=a.spec.to_json(),
        metadata=metadata,
        c_source=c_source,
        c_header=c_header,
        budget_json=report.to_json(),
        budget_markdown=report.to_markdown(),
        evaluation={"int8_tflite": a.evaluation},
        drift_reference=a.drift_reference,
    )


# ---------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def experiment_id(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """One SQLite store and artifact root for the module; the previous tracking URI is restored afterwards."""
    root = tmp_path_factory.mktemp("mlflow")
    previous = mlflow.get_tracking_uri()
    yield configure_mlflow(f"sqlite:///{root / 'mlflow.db'}", str(root / "mlartifacts"), "registry-test")
    mlflow.set_tracking_uri(previous)
    mlflow.set_registry_uri(previous)


@pytest.fixture(scope="module")
def bundle_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("bundles")


@pytest.fixture(scope="module")
def run_id(experiment_id: str, bundle_root: Path) -> str:
    """A logged training run with two bundles, plots, a report and a history."""
    a = assets()
    bundles = [make_bundle(bundle_root, catalog_target(t, t), label="run") for t in ("nrf52840", "stm32l4r5")]
    report = bundle_root / "evaluation.json"
    report.write_text(json.dumps({"int8_tflite": a.evaluation}))
    normal = reconstruction_errors(a.model, a.spec, normal_windows(30, seed=5))
    fault = reconstruction_errors(a.model, a.spec, noise_windows(10, seed=6))
    history = {"loss": [1.0, 0.6, 0.4], "val_loss": [1.1, 0.7, 0.5]}
    return log_training_run(
        experiment_id,
        params={"architecture": [16, 8, 16], "quantization": {"mode": "ptq"}, "threshold_percentile": 99.5,
                "dsp_spec_version": a.spec.version, "seed": 0, "sparsity": 0.0},
        metrics={"int8": {"auc": a.metrics["auc_int8_tflite"]}, "arena_bytes": a.arena.smallest_working_bytes,
                 "note": "not a number"},
        dataset_fingerprint=FINGERPRINT,
        lake_selection={"fleet": "test", "windows": 400, "devices": ["node-0001"], "until": dt.datetime(2026, 11, 1)},
        plots={"error_histogram": plot_error_histogram(normal, fault, a.threshold),
               "roc": plot_roc({"int8": (normal, fault)}), "loss": plot_training_loss(history)},
        bundles=bundles,
        artifacts={"reports": report},
        history=history,
        tags={"fleet": "test"},
        flow_run_id="flow-run-123",
        run_name="registry-test",
    )  # fmt: skip


def register(bundle_root: Path, run_id: str, target: McuTarget, label: str, *, gates: bool = True) -> str:
    return register_bundle(make_bundle(bundle_root, target, label=label), run_id, gates_passed=gates).version


def artifact_dir(version_tags: dict[str, str]) -> Path:
    """The registered bundle's directory inside the local artifact store."""
    location = MlflowClient().get_logged_model(version_tags["lineage.logged_model_id"]).artifact_location
    return bundle_dir_of(Path(urllib.parse.unquote(urllib.parse.urlparse(location).path)))


# ---------------------------------------------------------------- tracking


def test_training_run_records_params_metrics_plots_artifacts_and_dataset(run_id: str) -> None:
    client = MlflowClient()
    run = client.get_run(run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["architecture"] == "[16, 8, 16]"
    assert run.data.params["quantization.mode"] == "ptq"
    assert run.data.params["threshold_percentile"] == "99.5"
    assert run.data.metrics["int8.auc"] == pytest.approx(assets().metrics["auc_int8_tflite"])
    assert run.data.metrics["arena_bytes"] == assets().arena.smallest_working_bytes
    assert "note" not in run.data.metrics
    assert [m.value for m in client.get_metric_history(run_id, "train.val_loss")] == [1.1, 0.7, 0.5]
    assert run.data.tags["dataset.fingerprint"] == FINGERPRINT
    assert run.data.tags["prefect.flow_run_id"] == "flow-run-123"
    assert run.inputs is not None
    (dataset_input,) = run.inputs.dataset_inputs
    assert dataset_input.dataset.digest == FINGERPRINT[:36]
    assert json.loads(dataset_input.dataset.source)["windows"] == 400
    selection = json.loads(Path(client.download_artifacts(run_id, "lake_selection.json")).read_text())
    assert selection["until"] == "2026-11-01 00:00:00" and selection["devices"] == ["node-0001"]

    def files(path: str = "") -> set[str]:
        out = set()
        for info in client.list_artifacts(run_id, path):
            out |= files(info.path) if info.is_dir else {info.path}
        return out

    logged = files()
    expected = {
        "plots/error_histogram.png", "plots/roc.png", "plots/loss.png", "lake_selection.json",
        "reports/evaluation.json", "bundles/nrf52840/model.tflite", "bundles/nrf52840/bundle.json",
        "bundles/stm32l4r5/budget.md", "bundles/stm32l4r5/vibration_ae_stm32l4r5_model_data.c",
    }  # fmt: skip
    assert expected <= logged
    png = Path(client.download_artifacts(run_id, "plots/roc.png"))
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    tflite = Path(client.download_artifacts(run_id, "bundles/nrf52840/model.tflite"))
    assert tflite.read_bytes() == assets().model


def test_failed_run_logging_marks_the_run_failed(experiment_id: str, tmp_path: Path) -> None:
    with pytest.raises(RegistryError, match="no such file"):
        log_training_run(
            experiment_id, params={}, metrics={}, dataset_fingerprint=FINGERPRINT, lake_selection={},
            artifacts={"reports": tmp_path / "missing.json"}, run_name="broken",
        )  # fmt: skip
    (run,) = MlflowClient().search_runs([experiment_id], "attributes.run_name = 'broken'")
    assert run.info.status == "FAILED"


# ---------------------------------------------------------------- registration


def test_two_targets_give_two_registered_models_with_tags(run_id: str, bundle_root: Path) -> None:
    versions = {}
    for base in ("nrf52840", "stm32l4r5"):
        target = catalog_target(base, f"{base}_reg")
        bundle = make_bundle(bundle_root, target)
        versions[base] = (bundle, register_bundle(bundle, run_id, gates_passed=True))
    names = {m.name: m for m in list_models()}
    for bundle, version in versions.values():
        meta = bundle.metadata
        assert version.name == registered_model_name(meta.target) and version.name in names
        assert names[version.name].aliases == {CANDIDATE: version.version}
        assert version.aliases == (CANDIDATE,) and version.gates_passed and version.run_id == run_id
        tags = version.tags
        assert tags["target"] == meta.target and tags["budget_passed"] == "true"
        assert tags["tflite_sha256"] == sha256_hex(assets().model)
        assert version.metrics["arena_bytes"] == assets().arena.smallest_working_bytes
        assert tags["dataset_fingerprint"] == FINGERPRINT
        assert tags["lineage.mlflow_run_id"] == run_id and tags["lineage.label"] == "a"
        assert "ram pass" in tags["budget"]
        # a handful of tags a reviewer reads at a glance (the UI stacks every tag); figures are metrics
        assert len(tags) <= 11, sorted(tags)
        assert not any(key.startswith(("metric.", "budget.")) for key in tags)
        assert version.metrics["auc_int8_tflite"] == pytest.approx(meta.metrics["auc_int8_tflite"])
        assert version.metrics["budget_flash"] == meta.metrics["budget_flash"]
        assert version.metrics["macs"] == count_macs(assets().model)
        logged = MlflowClient().get_logged_model(tags["lineage.logged_model_id"])
        assert logged.params["dsp_spec_version"] == str(assets().spec.version)
        assert {m.key for m in logged.metrics} >= {f"{meta.target}/auc_int8_tflite", f"{meta.target}/budget_flash"}
    assert versions["nrf52840"][1].name != versions["stm32l4r5"][1].name


def test_gate_failing_versions_never_get_candidate_or_champion(run_id: str, bundle_root: Path) -> None:
    tiny = tiny_target("tiny_gate")
    over_budget = register_bundle(make_bundle(bundle_root, tiny), run_id, gates_passed=True)
    assert over_budget.tags["budget_passed"] == "false" and not over_budget.gates_passed
    assert over_budget.aliases == ()
    assert "ram FAIL" in over_budget.tags["budget"]
    with pytest.raises(PromotionError, match="not even forced"):
        promote(over_budget.name, over_budget.version, candidate_eval=None, champion_eval=None,
                actor="test", reason="I insist", force=True)  # fmt: skip

    target = catalog_target("nrf52840", "nrf_quality_gate")
    failed_quality = register_bundle(make_bundle(bundle_root, target), run_id, gates_passed=False)
    assert failed_quality.tags["budget_passed"] == "true" and failed_quality.tags["gates_passed"] == "false"
    assert aliases_of(failed_quality.name) == {}
    with pytest.raises(PromotionError, match="failed its gates"):
        promote(failed_quality.name, failed_quality.version, candidate_eval=None, champion_eval=None,
                actor="test", reason="forced", force=True)  # fmt: skip
    assert aliases_of(failed_quality.name) == {}


def test_registration_failing_midway_leaves_no_version_or_alias(
    run_id: str, bundle_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    client = MlflowClient()
    target = catalog_target("nrf52840", "nrf_midway")
    name = registered_model_name(target.name)
    first = register(bundle_root, run_id, target, "v1")
    promote(name, first, candidate_eval=None, champion_eval=None, actor="test")
    logged_before = {
        m.model_id for m in client.search_logged_models([MlflowClient().get_run(run_id).info.experiment_id])
    }

    def fail(*args: object, **kwargs: object) -> None:
        raise RuntimeError("injected alias failure")

    monkeypatch.setattr(MlflowClient, "set_registered_model_alias", fail)
    with pytest.raises(RegistryError, match=r"nothing registered.*injected alias failure"):
        register(bundle_root, run_id, target, "v2")
    monkeypatch.undo()
    assert [str(v.version) for v in client.search_model_versions(f"name='{name}'")] == [first]
    assert aliases_of(name) == {CHAMPION: first}
    logged_after = {m.model_id for m in client.search_logged_models([client.get_run(run_id).info.experiment_id])}
    assert logged_after == logged_before  # the logged model of the failed attempt is gone too

    # A brand-new registered model created by a failed registration disappears with it.
    fresh = catalog_target("stm32l4r5", "stm_midway")
    monkeypatch.setattr(MlflowClient, "set_registered_model_alias", fail)
    with pytest.raises(RegistryError, match="injected"):
        register(bundle_root, run_id, fresh, "v1")
    monkeypatch.undo()
    with pytest.raises(ModelNotFoundError, match="no registered model"):
        aliases_of(registered_model_name(fresh.name))


def test_bundle_modified_or_vanished_before_registration_is_refused(run_id: str, bundle_root: Path) -> None:
    target = catalog_target("nrf52840", "nrf_vanished")
    bundle = make_bundle(bundle_root, target)
    (bundle.directory / "model.tflite").write_bytes(b"TFL3 not the registered model")
    with pytest.raises(BundleError, match="does not match"):
        register_bundle(bundle, run_id, gates_passed=True)
    gone = make_bundle(bundle_root, target, label="gone")
    for path in gone.directory.iterdir():
        path.unlink()
    gone.directory.rmdir()
    with pytest.raises(BundleError, match="not a model bundle"):
        register_bundle(gone, run_id, gates_passed=True)
    with pytest.raises(ModelNotFoundError):
        aliases_of(registered_model_name(target.name))


def test_registration_needs_an_existing_run(experiment_id: str, bundle_root: Path) -> None:
    bundle = make_bundle(bundle_root, catalog_target("nrf52840", "nrf_no_run"))
    with pytest.raises(RegistryError, match="training run 0123456789abcdef not found in sqlite:///"):
        register_bundle(bundle, "0123456789abcdef", gates_passed=True)


# ---------------------------------------------------------------- promotion


def test_promotion_rule() -> None:
    champion = {"auc_int8": 0.990, "false_alarms_per_hour": 100.0}
    assert decide_promotion({"auc_int8": 0.990, "false_alarms_per_hour": 100.0}, champion, True).allowed
    within = decide_promotion(
        {"auc_int8": 0.990 - AUC_TOLERANCE + 1e-6, "false_alarms_per_hour": 109.0}, champion, True
    )
    assert within.allowed and not within.failures
    lower_auc = decide_promotion({"auc_int8": 0.984, "false_alarms_per_hour": 90.0}, champion, True)
    assert not lower_auc.allowed and any("AUC" in f for f in lower_auc.failures)
    more_alarms = decide_promotion({"auc_int8": 0.999, "false_alarms_per_hour": 111.0}, champion, True)
    assert not more_alarms.allowed and any("false alarms" in f for f in more_alarms.failures)
    # at a low rate the absolute tolerance (1/h) applies
    low_rate = {**champion, "false_alarms_per_hour": 1.0}
    assert decide_promotion({"auc_int8": 0.99, "false_alarms_per_hour": 1.9}, low_rate, True).allowed
    assert not decide_promotion({"auc_int8": 0.999, "false_alarms_per_hour": 1.0}, champion, False).allowed
    assert decide_promotion(None, None, True).allowed
    assert not decide_promotion(None, champion, True).allowed
    broken = decide_promotion({"auc_int8": float("nan"), "false_alarms_per_hour": 1.0}, champion, True)
    assert not broken.allowed and any("nan" in f for f in broken.failures)


GATES = AbsoluteGates(max_false_alarm_rate=0.02, min_calibration_windows=199)


def held_out(false_positives: int, n_normal: int, calibration_windows: int = 250) -> dict[str, float]:
    """A candidate's figures: it beats the champion below, whatever its own false alarms."""
    from tasks.rates import rate_upper_bound

    return {
        "auc_int8": 0.999,
        "false_alarms_per_hour": 0.0,
        "false_alarm_upper": rate_upper_bound(false_positives, n_normal),
        "false_positives": false_positives,
        "n_normal": n_normal,
        "confidence": 0.95,
        "calibration_windows": calibration_windows,
    }


def test_absolute_gates_refuse_a_model_that_beats_the_champion() -> None:
    champion = {"auc_int8": 0.90, "false_alarms_per_hour": 500.0}  # a poor champion: the gates still hold
    # 0 of 86 held-out windows: the bound (3.4 %) is above the 2 % limit although nothing was flagged
    too_few_windows = decide_promotion(held_out(0, 86), champion, True, GATES)
    assert not too_few_windows.allowed
    assert too_few_windows.blocking == (
        "false-alarm rate above the limit: 0 of 86 held-out normal windows flagged, upper bound 3.42% at 95% "
        "confidence > limit 2.00%",
    )
    assert not decide_promotion(held_out(3, 332), None, True, GATES).allowed  # no champion: the gates still hold
    small_calibration = decide_promotion(held_out(0, 400, calibration_windows=15), champion, True, GATES)
    assert small_calibration.blocking == ("too few calibration windows behind the threshold: 15 < minimum 199",)
    within = decide_promotion(held_out(2, 332), champion, True, GATES)  # 2 of 332: 1.88 %
    assert within.allowed and not within.failures
    assert "false alarms on 2 of 332 held-out normal windows: upper bound 1.88% at 95% confidence <= limit 2.00%" in (
        within.reasons
    )
    assert "250 calibration windows (minimum 199)" in within.reasons
    assert decide_promotion(None, None, True, GATES).blocking == (
        "no held-out evaluation of the candidate to check the absolute gates with",
    )
    assert decide_promotion(held_out(3, 332), None, True).allowed  # no gates (a version from before them)


def test_promote_moves_aliases_records_and_rolls_back(run_id: str, bundle_root: Path) -> None:
    client = MlflowClient()
    target = catalog_target("nrf52840", "nrf_promo")
    name = registered_model_name(target.name)
    v1, v2, v3 = (register(bundle_root, run_id, target, label) for label in ("v1", "v2", "v3"))
    assert aliases_of(name) == {CANDIDATE: v3}  # the newest gate-passing version

    first = promote(name, v1, candidate_eval=None, champion_eval=None, actor="alice")
    assert first.rule_passed and first.from_version is None
    assert aliases_of(name) == {CANDIDATE: v3, CHAMPION: v1}

    good = {"auc_int8": 0.99, "false_alarms_per_hour": 50.0}
    worse = {"auc_int8": 0.97, "false_alarms_per_hour": 50.0}
    with pytest.raises(PromotionError, match=r"refused: int8 AUC 0\.9700 vs champion 0\.9900"):
        promote(name, v2, candidate_eval=worse, champion_eval={**good, "version": v1}, actor="bob")
    with pytest.raises(PromotionError, match="champion is now"):
        promote(name, v2, candidate_eval=good, champion_eval={**good, "version": v3}, actor="bob")
    with pytest.raises(PromotionError, match="no evaluation of the current champion"):
        promote(name, v2, candidate_eval=good, champion_eval=None, actor="bob")
    with pytest.raises(PromotionError, match="needs a reason"):
        promote(name, v2, candidate_eval=worse, champion_eval=good, actor="bob", force=True)
    assert aliases_of(name) == {CANDIDATE: v3, CHAMPION: v1}

    forced = promote(name, v2, candidate_eval=worse, champion_eval=good, actor="bob", reason="hotfix", force=True)
    assert forced.forced and not forced.rule_passed and forced.from_version == v1
    assert aliases_of(name) == {CANDIDATE: v3, CHAMPION: v2, PREVIOUS: v1}

    promote(name, v3, candidate_eval=good, champion_eval={**good, "version": v2}, actor="carol")
    assert aliases_of(name) == {CHAMPION: v3, PREVIOUS: v2}  # candidate pointed at v3: removed
    tags = client.get_model_version(name, v3).tags
    assert tags["promoted_by"] == "carol" and tags["promoted_from"] == v2 and tags["promotion_forced"] == "false"
    assert "int8 AUC 0.9900 vs champion 0.9900" in tags["promotion_rule"]
    assert client.get_model_version(name, v2).tags["promotion_reason"] == "hotfix"
    with pytest.raises(PromotionError, match="already the champion"):
        promote(name, v3, candidate_eval=good, champion_eval=good, actor="carol")

    back = rollback(name, actor="dave", reason="field false alarms")
    assert (back.version, back.from_version) == (v2, v3)
    assert aliases_of(name) == {CHAMPION: v2}
    assert client.get_model_version(name, v3).tags["rolled_back_reason"] == "field false alarms"
    assert client.get_model_version(name, v2).tags["restored_by"] == "dave"
    with pytest.raises(PromotionError, match="no previous champion"):
        rollback(name, actor="dave", reason="again")
    with pytest.raises(PromotionError, match="needs a reason"):
        rollback(name, actor="dave", reason=" ")

    history = promotion_history(name)
    assert [(r.action, r.version, r.actor, r.forced) for r in history] == [
        ("promote", v1, "alice", False), ("promote", v2, "bob", True),
        ("promote", v3, "carol", False), ("rollback", v2, "dave", False),
    ]  # fmt: skip


def test_recorded_comparison_round_trips_through_version_tags(run_id: str, bundle_root: Path) -> None:
    target = catalog_target("nrf52840", "nrf_compare")
    name = registered_model_name(target.name)
    version = register(bundle_root, run_id, target, "v1")
    assert recorded_comparison(describe(f"{name}/{version}")) == (None, None)
    record_comparison(
        name,
        version,
        candidate_eval={"auc_int8": 0.98, "false_alarms_per_hour": 12.5},
        champion_eval={"auc_int8": 0.97, "false_alarms_per_hour": 20.0},
        champion_version="7",
    )
    candidate, champion = recorded_comparison(describe(f"{name}/{version}"))
    assert candidate == {"auc_int8": "0.98", "false_alarms_per_hour": "12.5"}
    assert champion == {"auc_int8": "0.97", "false_alarms_per_hour": "20.0", "version": "7"}
    assert decide_promotion(candidate, champion, True).allowed


def test_a_version_short_of_the_gates_is_refused_even_forced_and_the_refusal_recorded(
    run_id: str, bundle_root: Path
) -> None:
    target = catalog_target("nrf52840", "nrf_gates")
    name = registered_model_name(target.name)
    version = register(bundle_root, run_id, target, "v1")
    figures = held_out(5, 120)
    record_comparison(name, version, candidate_eval=figures, champion_eval=None, champion_version=None, gates=GATES)
    recorded = describe(f"{name}/{version}")
    candidate, _ = recorded_comparison(recorded)
    assert AbsoluteGates.from_tags(recorded.tags) == GATES  # what `models promote` applies
    assert candidate is not None and candidate["false_positives"] == "5" and candidate["n_normal"] == "120"
    decision = decide_promotion(candidate, None, True, GATES)
    assert not decision.allowed
    for force in (False, True):
        with pytest.raises(
            PromotionError, match=r"refused: false-alarm rate above the limit: 5 of 120 .*not even forced"
        ):
            promote(name, version, candidate_eval=candidate, champion_eval=None, actor="eve", force=force,
                    reason="field test", gates=GATES)  # fmt: skip
    assert CHAMPION not in aliases_of(name)

    record_refusal(name, version, decision, actor="train-flow")
    (refusal,) = promotion_history(name)
    assert (refusal.action, refusal.version, refusal.rule_passed) == ("refuse", version, False)
    assert refusal.reason.startswith("false-alarm rate above the limit: 5 of 120 held-out normal windows flagged")
    assert describe(f"{name}/{version}").tags["promotion_refused"] == refusal.reason


# ---------------------------------------------------------------- resolve and load


@pytest.fixture(scope="module")
def champion(run_id: str, bundle_root: Path) -> tuple[str, str, str]:
    """A model with versions 1 (champion) and 2 (candidate): (name, champion version, latest version)."""
    target = catalog_target("nrf52840", "nrf_serve")
    name = registered_model_name(target.name)
    v1 = register(bundle_root, run_id, target, "v1")
    promote(name, v1, candidate_eval=None, champion_eval=None, actor="test")
    v2 = register(bundle_root, run_id, target, "v2")
    return name, v1, v2


def test_resolve_by_alias_version_and_name_gives_verified_bundles(
    champion: tuple[str, str, str], tmp_path: Path
) -> None:
    name, v1, v2 = champion
    by_alias = resolve(f"{name}@champion", tmp_path / "alias")
    assert by_alias.version.version == v1 and CHAMPION in by_alias.version.aliases
    assert by_alias.bundle.tflite() == assets().model
    assert by_alias.bundle.metadata.lineage["label"] == "v1"
    assert DspSpec.from_json(by_alias.bundle.dsp_spec_json()) == assets().spec
    assert load_bundle(by_alias.bundle.directory).metadata == by_alias.bundle.metadata
    assert resolve(f"{name}/{v1}", tmp_path / "version").bundle.metadata.lineage["label"] == "v1"
    latest = resolve(name, tmp_path / "latest")
    assert latest.version.version == v2 and latest.bundle.metadata.lineage["label"] == "v2"
    assert resolve(f"models:/{name}@candidate", tmp_path / "uri").version.version == v2
    shown = describe(f"{name}@champion")
    assert shown.version == v1 and shown.artifact_uri.startswith("file://") and shown.uri == f"models:/{name}/{v1}"


def test_pyfunc_by_alias_scores_raw_windows(champion: tuple[str, str, str]) -> None:
    name, _, _ = champion
    model = mlflow.pyfunc.load_model(f"models:/{name}@champion")
    normal = normal_windows(40, seed=11)
    noise = noise_windows(5, seed=12)
    scored = model.predict(np.concatenate([normal, noise]))
    assert list(scored.columns) == ["reconstruction_error", "anomaly"] and len(scored) == 45
    errors = scored["reconstruction_error"].to_numpy()
    expected = reconstruction_errors(assets().model, assets().spec, np.concatenate([normal, noise]))
    np.testing.assert_array_equal(errors, expected)  # the one scorer, as the device scores
    assert errors[40:].min() > 10 * np.median(errors[:40])
    assert scored["anomaly"].iloc[40:].all()
    assert scored["anomaly"].iloc[:40].mean() < 0.2
    assert (scored["anomaly"] == (errors > assets().threshold)).all()
    as_frame = model.predict(pd.DataFrame(noise[:2]))
    assert as_frame["anomaly"].all()
    with pytest.raises(ModelInputError, match=r"shape \(n, 1024\)"):
        model.predict(np.zeros((2, 512), dtype=np.float32))


def test_tampered_artifacts_are_refused_at_resolve_and_load(run_id: str, bundle_root: Path, tmp_path: Path) -> None:
    target = catalog_target("nrf52840", "nrf_tamper")
    name = registered_model_name(target.name)
    version = register(bundle_root, run_id, target, "v1")
    promote(name, version, candidate_eval=None, champion_eval=None, actor="test")
    stored = artifact_dir(describe(f"{name}/{version}").tags)
    resolve(f"{name}@champion", tmp_path / "before")  # intact: resolves

    c_file = next(stored.glob("*_model_data.c"))
    c_file.write_text(c_file.read_text().replace("0x", "0X", 1))
    with pytest.raises(ModelIntegrityError, match="digest"):
        resolve(f"{name}@champion", tmp_path / "c-file")

    tflite = stored / "model.tflite"
    data = bytearray(tflite.read_bytes())
    data[len(data) // 2] ^= 0xFF
    tflite.write_bytes(bytes(data))
    with pytest.raises(ModelIntegrityError, match=r"model\.tflite has sha256"):
        resolve(f"{name}@champion", tmp_path / "tflite")
    with pytest.raises(ModelIntegrityError, match="modified"):
        mlflow.pyfunc.load_model(f"models:/{name}@champion")


def test_missing_artifacts_are_reported(run_id: str, bundle_root: Path, tmp_path: Path) -> None:
    target = catalog_target("nrf52840", "nrf_missing")
    name = registered_model_name(target.name)
    version = register(bundle_root, run_id, target, "v1")
    stored = artifact_dir(describe(f"{name}/{version}").tags)
    (stored / "dsp_spec.json").unlink()
    with pytest.raises(ModelArtifactsError, match=r"missing dsp_spec\.json"):
        resolve(f"{name}/{version}", tmp_path)


def test_bad_references_give_one_line_errors(champion: tuple[str, str, str], run_id: str, bundle_root: Path) -> None:
    name, _, _ = champion
    cases = {
        "vibration-ae-nowhere@champion": "no registered model 'vibration-ae-nowhere'",
        f"{name}@production": "has no version with alias 'production'",
        f"{name}/99": "has no version 99",
        "not a ref": "invalid model reference",
    }
    for ref, message in cases.items():
        with pytest.raises(ModelNotFoundError) as info:
            resolve(ref)
        assert message in str(info.value) and "\n" not in str(info.value)
    without_champion = catalog_target("nrf52840", "nrf_no_champion")
    register(bundle_root, run_id, without_champion, "v1")
    with pytest.raises(ModelNotFoundError, match="no version with alias 'champion' \\(aliases: candidate->1\\)"):
        resolve(registered_model_name(without_champion.name) + "@champion")


def test_unanswering_tracking_server_fails_fast_with_one_line(experiment_id: str) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    uri = f"http://127.0.0.1:{port}"
    before = mlflow.get_tracking_uri()
    started = time.perf_counter()
    with pytest.raises(RegistryUnavailableError) as info:
        configure_mlflow(uri, None, "anything", timeout_s=2)
    assert time.perf_counter() - started < 5
    assert uri in str(info.value) and "does not answer" in str(info.value) and "\n" not in str(info.value)
    assert mlflow.get_tracking_uri() == before  # the working configuration is untouched


def test_registration_and_load_timings(run_id: str, bundle_root: Path, capsys: pytest.CaptureFixture[str]) -> None:
    target = catalog_target("stm32l4r5", "stm_timing")
    bundle = make_bundle(bundle_root, target)
    started = time.perf_counter()
    version = register_bundle(bundle, run_id, gates_passed=True)
    register_s = time.perf_counter() - started
    promote(version.name, version.version, candidate_eval=None, champion_eval=None, actor="test")
    started = time.perf_counter()
    resolved = resolve(f"{version.name}@champion")
    resolve_s = time.perf_counter() - started
    started = time.perf_counter()
    mlflow.pyfunc.load_model(f"models:/{version.name}@champion")
    load_s = time.perf_counter() - started
    assert resolved.bundle.metadata.tflite_sha256 == bundle.metadata.tflite_sha256
    assert register_s < 30 and resolve_s < 30 and load_s < 30
    with capsys.disabled():
        print(f"\nregister {register_s:.2f} s, resolve@champion {resolve_s:.2f} s, pyfunc load@champion {load_s:.2f} s")
