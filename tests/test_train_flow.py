"""The train flow end to end on the real CWRU recordings, in real Prefect, TFLite Micro and gcc."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from firmware.tflm import TflmRunner
from tasks.packaging import PackagedTarget, enforce_some_target_fits
from tasks.rates import rate_upper_bound
from tasks.train import calibrated_false_alarm_rate
from tests.conftest import POISONED_WINDOW, using_data_dir
from tinymlops.contracts.dsp import DspSpec
from tinymlops.schemas import load_bundle

pytestmark = [pytest.mark.realdata, pytest.mark.slow, pytest.mark.prefect]


def test_train_flow_meets_the_quality_targets_on_cwru(cwru_trained: dict[str, object]) -> None:
    evaluation = cwru_trained["evaluation"]
    assert isinstance(evaluation, dict)
    assert evaluation["int8_tflite"]["auc"] >= 0.99
    assert evaluation["float"]["auc"] - evaluation["int8_tflite"]["auc"] <= 0.01
    assert abs(evaluation["int8_tflm"]["auc"] - evaluation["int8_tflite"]["auc"]) <= 0.01
    # rp2040 runs the fixed-point front end: the deployed model is gated on its features too
    fixed_point = evaluation["int8_tflm_q15"]
    assert fixed_point["auc"] >= 0.99 and abs(fixed_point["auc"] - evaluation["int8_tflm"]["auc"]) <= 0.01
    assert fixed_point["threshold"] == evaluation["int8_tflm"]["threshold"]  # the one the device is sent


def test_train_flow_skips_and_names_a_poisoned_lake_window(cwru_trained: dict[str, object]) -> None:
    """One window whose samples read back as inf (issue 13) is skipped and reported, not fatal."""
    device, seq = POISONED_WINDOW
    skipped = cwru_trained["skipped_windows"]
    assert isinstance(skipped, dict)
    assert skipped["count"] == 1
    (first,) = skipped["first"]
    assert (first["device"], first["seq"]) == (device, seq)
    assert first["reason"].startswith("non-finite samples")
    counts = cwru_trained["counts"]
    assert isinstance(counts, dict) and counts["skipped_unusable"] == 1


def test_train_flow_writes_a_verified_bundle_per_target(cwru_trained: dict[str, object], tmp_path: Path) -> None:
    bundles = cwru_trained["bundles"]
    assert isinstance(bundles, dict)
    assert set(bundles) == {"nrf52840", "rp2040"}
    for target, directory in bundles.items():
        bundle = load_bundle(Path(directory))
        meta = bundle.metadata
        assert meta.target == target
        assert meta.budget_passed
        assert meta.model_name == f"vibration-ae-{target}"
        assert meta.tflite_bytes < 32_768
        spec = DspSpec.from_json(bundle.dsp_spec_json())
        assert spec.is_fitted and spec.n_features == meta.n_features
        # the bundle's model runs in TFLite Micro in exactly the arena the bundle records
        runner = TflmRunner(bundle.tflite(), meta.arena_bytes)
        assert runner.n_features == meta.n_features
        # the generated C array is valid C
        obj = tmp_path / f"{target}.o"
        compiled = subprocess.run(
            [
                "gcc",
                "-std=c11",
                "-Wall",
                "-Wextra",
                "-Werror",
                "-c",
                str(bundle.c_source_path),
                "-I",
                str(bundle.directory),
                "-o",
                str(obj),
            ],
            capture_output=True,
            text=True,
        )
        assert compiled.returncode == 0, compiled.stderr
        assert f"alignas(16) const unsigned char g_{meta.c_name}_model_data[]" in bundle.c_source_path.read_text()


def test_a_model_that_fits_no_target_is_rejected_with_each_limit(cwru_trained: dict[str, object]) -> None:
    from tasks.budget import BudgetExceededError, validate_budget
    from tinymlops.targets import McuTarget, load_catalog

    bundles = cwru_trained["bundles"]
    assert isinstance(bundles, dict)
    bundle = load_bundle(Path(bundles["nrf52840"]))
    nrf = load_catalog()["nrf52840"]
    tiny = McuTarget.model_validate(
        {
            **nrf.model_dump(),
            "name": "tiny",
            "sram_bytes": 64 * 1024,
            "ram_reserve_bytes": 60 * 1024,
            "latency_budget_ms": 0.1,
        }
    )
    report = validate_budget(bundle.tflite(), tiny, DspSpec.from_json(bundle.dsp_spec_json()))
    assert not report.passed
    with pytest.raises(BudgetExceededError, match=r"tiny: .*ram [\d,]+ B > [\d,]+ B.*latency [\d.]+ ms > 0.100 ms"):
        enforce_some_target_fits([PackagedTarget("tiny", report, bundle)])


def test_evaluate_cli_scores_a_bundle_on_the_lake(cwru_trained: dict[str, object], tmp_path: Path) -> None:
    import json
    import sys

    from tests.conftest import cli_env

    bundles = cwru_trained["bundles"]
    assert isinstance(bundles, dict)
    env = cli_env(Path(str(cwru_trained["data_dir"])))
    out = tmp_path / "evaluation.json"
    args = [
        sys.executable,
        "-m",
        "tinymlops",
        "-q",
        "evaluate",
        "--model",
        bundles["rp2040"],
        "--data",
        "fleet=cwru",
        "--output",
        str(out),
        "--json",
    ]
    result = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    report = json.loads(result.stdout.strip().splitlines()[-1])
    assert report == json.loads(out.read_text())
    assert set(report["evaluations"]) == {"float", "int8_tflite", "int8_tflm"}
    assert report["evaluations"]["int8_tflm"]["auc"] >= 0.99
    assert set(report["evaluations"]["int8_tflm"]["auc_by_fault"]) == {"ball", "inner_race", "outer_race"}

    # --holdout scores exactly the normal windows the train flow held out (its time-ordered test tail)
    held = subprocess.run([*args[:-1], "--holdout", "--json"], env=env, capture_output=True, text=True, timeout=300)
    assert held.returncode == 0, held.stderr
    held_out = json.loads(held.stdout.strip().splitlines()[-1])["evaluations"]["int8_tflm"]
    counts = cwru_trained["counts"]
    assert isinstance(counts, dict)
    assert held_out["n_normal"] == counts["test_normal"] < report["evaluations"]["int8_tflm"]["n_normal"]
    assert held_out["false_alarm_rate"] == held_out["false_positives"] / held_out["n_normal"]
    # with the upper confidence bound of that rate: what so few windows can vouch for
    assert held_out["confidence"] == 0.95
    assert held_out["false_alarm_upper"] == pytest.approx(
        rate_upper_bound(held_out["false_positives"], counts["test_normal"])
    )
    outcome_evaluation = cwru_trained["evaluation"]
    assert isinstance(outcome_evaluation, dict)  # train --json carries per-class figures and the bound too
    deployed = outcome_evaluation["int8_tflm"]
    assert set(deployed["recall_by_fault"]) == {"ball", "inner_race", "outer_race"}
    assert deployed["n_normal"] == counts["test_normal"] and deployed["confidence"] == 0.95
    assert deployed["false_alarm_upper"] == pytest.approx(
        rate_upper_bound(deployed["false_positives"], deployed["n_normal"])
    )

    bad = subprocess.run([*args[:-4], "fleet=nosuchfleet"], env=env, capture_output=True, text=True, timeout=300)
    assert bad.returncode == 1
    assert bad.stderr.strip().startswith("error: no normal windows in the lake")


def test_bundle_carries_the_drift_reference(cwru_trained: dict[str, object]) -> None:
    bundles = cwru_trained["bundles"]
    assert isinstance(bundles, dict)
    bundle = load_bundle(Path(bundles["nrf52840"]))
    reference = bundle.drift_reference()
    assert reference.features.shape[1] == bundle.metadata.n_features
    assert abs(float(reference.features.mean())) < 0.5  # normalised on the training part
    n = len(reference.errors)
    # the rate its calibration set can promise: 1 - percentile with enough windows, more with few
    assert reference.expected_anomaly_rate == pytest.approx(calibrated_false_alarm_rate(n, 99.5))
    # the threshold is one of the calibration errors, with the promised share (n + 1) x rate - 1 above it
    above = int((reference.errors > bundle.metadata.threshold).sum())
    assert above == round((n + 1) * reference.expected_anomaly_rate) - 1


def test_the_runs_tflm_errors_give_the_figures_of_the_bundle_scored_afresh(cwru_trained: dict[str, object]) -> None:
    """The flow scores its model in TFLite Micro once and reuses the errors; each bundle scored anew agrees exactly."""
    from tasks.datasets import LakeSelection, load_dataset
    from tasks.evaluate import evaluate_bundle
    from tasks.train import WindowSpeeds

    bundles, registered, evaluation = cwru_trained["bundles"], cwru_trained["registered"], cwru_trained["evaluation"]
    assert isinstance(bundles, dict) and isinstance(registered, list) and isinstance(evaluation, dict)
    with using_data_dir(Path(str(cwru_trained["data_dir"]))) as settings:
        dataset = load_dataset(
            settings.lake_root, LakeSelection("cwru"), window_samples=settings.sensor.window_samples,
            max_abs_g=settings.sensor.max_abs_g,
        )  # fmt: skip
        window_seconds = settings.sensor.window_samples / dataset.sample_rate_hz
    assert len(registered) == len(bundles) == 2
    by_name = {bundle.metadata.model_name: bundle for bundle in map(load_bundle, map(Path, bundles.values()))}
    for entry in registered:
        bundle = by_name[entry["model"]]
        candidate = entry["candidate"]
        afresh = evaluate_bundle(
            bundle, dataset.test_normal, dataset.faults, window_seconds=window_seconds,
            speeds=WindowSpeeds(test=dataset.test_rpm, faults=dataset.fault_rpm), confidence=candidate["confidence"],
        )["int8_tflm"]  # fmt: skip
        assert afresh.threshold == evaluation["int8_tflm"]["threshold"] == bundle.metadata.threshold
        assert (afresh.auc, afresh.f1, afresh.false_positives, afresh.n_normal, afresh.false_alarm_upper) == (
            candidate["auc_int8"], candidate["f1"], candidate["false_positives"], candidate["n_normal"],
            candidate["false_alarm_upper"],
        )  # fmt: skip
        assert afresh.recall_by_fault == evaluation["int8_tflm"]["recall_by_fault"]
