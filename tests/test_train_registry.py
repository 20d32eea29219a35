"""The train flow tracks its run in MLflow, registers what fits, and promotes under the written rule."""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow import MlflowClient

from registry.models import aliases_of, resolve
from registry.promotion import decide_promotion, recorded_comparison
from registry.store import configure_from_settings
from tests.conftest import FAST_TRAINING_CONFIG, using_data_dir
from tests.fault_ledger import FaultRecord, record

pytestmark = [pytest.mark.realdata, pytest.mark.slow, pytest.mark.prefect, pytest.mark.mlflow]


def test_training_run_is_tracked_with_lineage(cwru_trained: dict[str, object]) -> None:
    with using_data_dir(Path(str(cwru_trained["data_dir"]))) as settings:
        configure_from_settings(settings)
        run = MlflowClient().get_run(str(cwru_trained["mlflow_run_id"]))
    assert run.data.params["architecture"] == "35-24-8-24-35"
    assert run.data.params["quantization"] == "qat"
    assert run.data.metrics["int8_tflm.auc"] >= 0.99
    assert run.data.tags["dataset.fingerprint"] == cwru_trained["dataset_fingerprint"]
    assert run.data.tags["prefect.flow_run_id"]
    artifacts = {a.path for a in MlflowClient(settings.mlflow_tracking_uri).list_artifacts(run.info.run_id, "plots")}
    assert {"plots/roc.png", "plots/training_loss.png", "plots/reconstruction_error_histogram.png"} <= artifacts


def test_first_models_become_champions_and_load_by_alias(cwru_trained: dict[str, object]) -> None:
    registered = cwru_trained["registered"]
    assert isinstance(registered, list)
    assert {r["model"] for r in registered} == {"vibration-ae-nrf52840", "vibration-ae-rp2040"}
    with using_data_dir(Path(str(cwru_trained["data_dir"]))) as settings:
        configure_from_settings(settings)
        for entry in registered:
            assert entry["promoted"] and entry["champion_before"] is None and entry["refused"] == []
            # the quick config's gates are off (its data cannot back them), the figures are still judged aloud
            assert entry["candidate"]["calibration_windows"] == 15
            assert any(r.startswith("false alarms on ") and "upper bound" in r for r in entry["reasons"])
            champion = resolve(f"{entry['model']}@champion")
            assert champion.version.version == entry["version"]
            assert champion.bundle.metadata.tflite_sha256 == champion.version.tags["tflite_sha256"]


def test_retraining_is_compared_with_the_champion_and_promoted_by_the_rule(cwru_trained: dict[str, object]) -> None:
    from flows.train import train_flow

    with using_data_dir(Path(str(cwru_trained["data_dir"]))) as settings:
        outcome = train_flow(fleet="cwru", targets=["nrf52840"], config_path=str(FAST_TRAINING_CONFIG))
        configure_from_settings(settings)
        (entry,) = outcome["registered"]
        name, version = entry["model"], entry["version"]
        first = next(r for r in cwru_trained["registered"] if r["model"] == name)  # type: ignore[union-attr]
        assert entry["champion_before"] == first["version"]
        candidate_eval, champion_eval = recorded_comparison(MlflowClient().get_model_version(name, version))
        assert candidate_eval is not None and champion_eval is not None
        expected = decide_promotion(candidate_eval, champion_eval, budget_passed=True).allowed
        assert entry["promoted"] == expected
        aliases = aliases_of(name)
        if expected:
            assert aliases["champion"] == version and aliases["previous"] == first["version"]
        else:
            assert aliases["champion"] == first["version"] and aliases["candidate"] == version


def test_a_model_short_of_the_production_gates_stays_a_candidate_with_the_reason(
    cwru_trained: dict[str, object],
) -> None:
    """data/training.yaml's gates keep a model on CWRU's 15 calibration windows a candidate, whatever the champion."""
    from registry.models import register_bundle
    from registry.promotion import promotion_history
    from tasks.datasets import LakeSelection, load_dataset
    from tasks.registration import compare_and_promote
    from tasks.train import load_training_config
    from tinymlops.schemas import load_bundle

    bundles = cwru_trained["bundles"]
    assert isinstance(bundles, dict)
    bundle = load_bundle(Path(bundles["nrf52840"]))
    with using_data_dir(Path(str(cwru_trained["data_dir"]))) as settings:
        configure_from_settings(settings)
        champion_before = aliases_of(bundle.metadata.model_name)["champion"]
        registered = register_bundle(bundle, str(cwru_trained["mlflow_run_id"]), gates_passed=True)
        dataset = load_dataset(
            settings.lake_root, LakeSelection("cwru"), window_samples=settings.sensor.window_samples,
            max_abs_g=settings.sensor.max_abs_g,
        )  # fmt: skip
        outcome = compare_and_promote(
            registered, bundle, dataset, window_seconds=settings.sensor.window_samples / dataset.sample_rate_hz,
            auto_promote=True, gates=load_training_config(settings.training_config).gates,
        )  # fmt: skip
        figures = outcome.candidate_eval
        verdict = "promoted" if outcome.promoted else "stayed candidate"
        record(
            FaultRecord(
                "a model short of the absolute promotion gates (data/training.yaml)", broken_devices=0,
                notes=f"CWRU model registered again as v{registered.version}: {verdict}, champion "
                f"v{aliases_of(registered.name)['champion']} kept; refused: {'; '.join(outcome.refused)}. "
                f"The quick config (gates off, its data cannot back them) promoted the same model: "
                f"{figures['false_positives']:.0f} of {figures['n_normal']:.0f} held-out normal windows flagged, "
                f"upper bound {figures['false_alarm_upper']:.1%}",
            )
        )  # fmt: skip
        assert not outcome.promoted
        assert "too few calibration windows behind the threshold: 15 < minimum 199" in outcome.refused
        assert any(r.startswith("false-alarm rate above the limit: ") for r in outcome.refused)  # 25 windows: >= 11.3 %
        assert aliases_of(registered.name)["champion"] == champion_before
        assert aliases_of(registered.name)["candidate"] == registered.version
        tags = MlflowClient().get_model_version(registered.name, registered.version).tags
        assert tags["promotion_refused"] == "; ".join(outcome.refused)
        last = promotion_history(registered.name)[-1]
        assert (last.action, last.version, last.reason) == ("refuse", registered.version, tags["promotion_refused"])
