"""``tinymlops models ...`` against a real SQLite MLflow store in a temporary data directory.

Most commands run in-process through Typer's CliRunner on ``models_app``; the error path runs in a
subprocess through ``tinymlops.cli.main`` (with ``models_app`` mounted as the lead mounts it) to
check the one-line message and the exit code a user sees.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest
from typer.testing import CliRunner, Result

from registry.errors import ModelNotFoundError, PromotionError
from registry.models import CANDIDATE, CHAMPION, PREVIOUS, aliases_of, describe, register_bundle
from registry.promotion import (
    AbsoluteGates,
    decide_promotion,
    promotion_history,
    record_comparison,
    record_refusal,
    recorded_comparison,
)
from registry.store import configure_from_settings
from registry.tracking import log_training_run
from tests.conftest import cli_env
from tests.test_registry import FINGERPRINT, catalog_target, make_bundle
from tinymlops.cli_models import console, models_app
from tinymlops.schemas import registered_model_name
from tinymlops.settings import REPO_ROOT, get_settings, reset_settings

pytestmark = pytest.mark.mlflow

TARGET = "nrf52840_cli"
NAME = registered_model_name(TARGET)
# Runs the real entry point with the models sub-app mounted (a no-op mount once tinymlops.cli mounts it).
MAIN_WITH_MODELS = """
from tinymlops.cli import app, main
from tinymlops.cli_models import console, models_app
if not any(group.name == "models" for group in app.registered_groups):
    app.add_typer(models_app, name="models")
main()
"""


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Path]:
    """A data directory with a training run and three registered versions of one target (1 is champion)."""
    root = tmp_path_factory.mktemp("cli-models")
    data = root / "data"
    previous = mlflow.get_tracking_uri()
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("TINYMLOPS_DATA_DIR", str(data))
        reset_settings()
        experiment_id = configure_from_settings(get_settings())
        run_id = log_training_run(
            experiment_id, params={"seed": 0}, metrics={}, dataset_fingerprint=FINGERPRINT, lake_selection={}
        )
        target = catalog_target("nrf52840", TARGET)
        for label in ("v1", "v2", "v3"):
            register_bundle(make_bundle(root / "bundles", target, label=label), run_id, gates_passed=True)
        yield data
    reset_settings()
    mlflow.set_tracking_uri(previous)
    mlflow.set_registry_uri(previous)


@pytest.fixture
def runner(data_dir: Path, monkeypatch: pytest.MonkeyPatch) -> CliRunner:
    monkeypatch.setenv("TINYMLOPS_DATA_DIR", str(data_dir))
    monkeypatch.setattr(console, "width", 250)  # tables on one line each, as in a wide terminal
    reset_settings()
    return CliRunner()


def invoke(runner: CliRunner, *args: str) -> Result:
    return runner.invoke(models_app, list(args))


def run_main(data_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", MAIN_WITH_MODELS, "models", *args],
        capture_output=True, text=True, env=cli_env(data_dir), cwd=REPO_ROOT, timeout=120, check=False,
    )  # fmt: skip


def test_list_shows_models_with_aliases(runner: CliRunner) -> None:
    result = invoke(runner, "list", "--json")
    assert result.exit_code == 0, result.output
    (row,) = [r for r in json.loads(result.stdout) if r["model"] == NAME]
    assert (row["versions"], row["latest"], row[CANDIDATE], row[CHAMPION]) == (3, "3", "3", "")
    table = invoke(runner, "list")
    assert table.exit_code == 0 and NAME in table.stdout


def test_show_gives_version_tags_metrics_and_artifacts(runner: CliRunner) -> None:
    result = invoke(runner, "show", f"{NAME}/2", "--json")
    assert result.exit_code == 0, result.output
    shown = json.loads(result.stdout)
    assert shown["version"] == "2" and shown["aliases"] == [] and shown["tags"]["target"] == TARGET
    assert shown["tags"]["lineage.label"] == "v2" and shown["tags"]["budget_passed"] == "true"
    assert 0 <= shown["metrics"]["auc_int8_tflite"] <= 1
    assert shown["artifact_uri"].startswith("file://") and shown["uri"] == f"models:/{NAME}/2"
    table = invoke(runner, "show", f"{NAME}@candidate")
    assert table.exit_code == 0, table.output
    assert "auc_int8_tflite" in table.stdout and "tflite_sha256" in table.stdout and "artifacts" in table.stdout


def test_promote_needs_a_recorded_comparison_or_force_with_reason_and_rollback_restores(
    runner: CliRunner, data_dir: Path
) -> None:
    first = invoke(runner, "promote", f"{NAME}/1", "--actor", "alice")  # no champion yet: the budget gate suffices
    assert first.exit_code == 0, first.output
    assert "champion is now version 1" in first.stdout

    refused = invoke(runner, "promote", f"{NAME}/2")
    assert refused.exit_code == 1 and isinstance(refused.exception, PromotionError)
    assert "--force --reason" in str(refused.exception)
    no_reason = invoke(runner, "promote", f"{NAME}/2", "--force")
    assert no_reason.exit_code == 1 and "needs a reason" in str(no_reason.exception)
    assert aliases_of(NAME) == {CHAMPION: "1", CANDIDATE: "3"}

    # The train flow's same-run comparison on the version: promotion without --force.
    record_comparison(
        NAME, "2", candidate_eval={"auc_int8": 0.99, "false_alarms_per_hour": 10.0},
        champion_eval={"auc_int8": 0.99, "false_alarms_per_hour": 10.0}, champion_version="1",
    )  # fmt: skip
    compared = invoke(runner, "promote", f"{NAME}/2", "--actor", "bob")
    assert compared.exit_code == 0, compared.output
    assert aliases_of(NAME) == {CHAMPION: "2", PREVIOUS: "1", CANDIDATE: "3"}

    # The recorded comparison was with version 1, no longer the champion: stale, refused.
    record_comparison(
        NAME, "3", candidate_eval={"auc_int8": 0.99, "false_alarms_per_hour": 10.0},
        champion_eval={"auc_int8": 0.99, "false_alarms_per_hour": 10.0}, champion_version="1",
    )  # fmt: skip
    stale = invoke(runner, "promote", f"{NAME}@candidate")
    assert stale.exit_code == 1 and "champion is now 2" in str(stale.exception)
    forced = invoke(runner, "promote", f"{NAME}@candidate", "--force", "--reason", "field test", "--actor", "carol")
    assert forced.exit_code == 0, forced.output
    assert aliases_of(NAME) == {CHAMPION: "3", PREVIOUS: "2"}

    back = invoke(runner, "rollback", NAME, "--reason", "too many alarms", "--actor", "dave")
    assert back.exit_code == 0, back.output
    assert "champion is back to version 2" in back.stdout
    assert aliases_of(NAME) == {CHAMPION: "2"}
    assert [(r.action, r.version, r.actor, r.forced) for r in promotion_history(NAME)] == [
        ("promote", "1", "alice", False), ("promote", "2", "bob", False),
        ("promote", "3", "carol", True), ("rollback", "2", "dave", False),
    ]  # fmt: skip
    shown = json.loads(invoke(runner, "show", f"{NAME}/3", "--json").stdout)
    assert [p["reason"] for p in shown["promotions"]] == ["field test"]
    assert shown["tags"]["rolled_back_reason"] == "too many alarms"

    usage = invoke(runner, "rollback", NAME)  # --reason is required
    assert usage.exit_code == 2


def test_promote_applies_the_recorded_absolute_gates_and_show_gives_the_refusal(runner: CliRunner) -> None:
    champion = aliases_of(NAME)[CHAMPION]
    figures = {"auc_int8": 0.999, "false_alarms_per_hour": 0.0, "false_alarm_upper": 0.034, "false_positives": 0,
               "n_normal": 86, "confidence": 0.95, "calibration_windows": 300}  # fmt: skip
    gates = AbsoluteGates(max_false_alarm_rate=0.02, min_calibration_windows=199)
    record_comparison(NAME, "1", candidate_eval=figures, champion_eval={"auc_int8": 0.9, "false_alarms_per_hour": 9.0},
                      champion_version=champion, gates=gates)  # fmt: skip
    forced = invoke(runner, "promote", f"{NAME}/1", "--force", "--reason", "it beats the champion")
    assert forced.exit_code == 1 and isinstance(forced.exception, PromotionError)
    assert "false-alarm rate above the limit: 0 of 86" in str(forced.exception)
    assert "not even forced" in str(forced.exception)
    assert aliases_of(NAME)[CHAMPION] == champion

    candidate, champion_eval = recorded_comparison(describe(f"{NAME}/1"))
    record_refusal(NAME, "1", decide_promotion(candidate, champion_eval, True, gates), actor="train-flow")
    shown = json.loads(invoke(runner, "show", f"{NAME}/1", "--json").stdout)
    assert shown["promotions"][-1]["action"] == "refuse"
    assert shown["tags"]["promotion_refused"].startswith("false-alarm rate above the limit: 0 of 86")
    assert "refuse" in invoke(runner, "show", f"{NAME}/1").stdout


def test_bad_references_are_one_line_errors_with_exit_1(runner: CliRunner, data_dir: Path) -> None:
    cases = {
        ("show", "vibration-ae-nowhere@champion"): "no registered model 'vibration-ae-nowhere'",
        ("show", f"{NAME}@production"): f"{NAME} has no version with alias 'production'",
        ("promote", "not a ref"): "invalid model reference 'not a ref'",
        ("rollback", "vibration-ae-nowhere", "--reason", "x"): "no registered model 'vibration-ae-nowhere'",
    }
    for args, message in cases.items():
        result = invoke(runner, *args)
        assert result.exit_code == 1 and isinstance(result.exception, ModelNotFoundError), result.output
        assert str(result.exception).startswith(message) and "\n" not in str(result.exception)

    # What a user sees: the real entry point prints one line and exits 1, no traceback.
    proc = run_main(data_dir, "show", "vibration-ae-nowhere@champion")
    assert proc.returncode == 1, proc.stderr
    assert proc.stderr.strip() == "error: no registered model 'vibration-ae-nowhere'"


def test_the_demos_store_is_found_with_data_dir_and_a_read_creates_no_store(data_dir: Path, tmp_path: Path) -> None:
    home = tmp_path / "data"
    home.mkdir()
    (home / "demo").symlink_to(data_dir, target_is_directory=True)  # as `tinymlops demo` leaves it: data/demo
    empty = subprocess.run([sys.executable, "-m", "tinymlops", "models", "list"], capture_output=True, text=True,
                           env=cli_env(home), timeout=120)  # fmt: skip
    assert empty.returncode == 0, empty.stderr
    assert f"no model store at {home / 'mlflow.db'}" in empty.stdout
    assert f"tinymlops --data-dir {home / 'demo'} models list" in " ".join(empty.stdout.split())
    assert not (home / "mlflow.db").exists()
    found = subprocess.run([sys.executable, "-m", "tinymlops", "--data-dir", str(home / "demo"), "models", "list",
                            "--json"], capture_output=True, text=True, env=cli_env(home), timeout=120)  # fmt: skip
    assert found.returncode == 0, found.stderr
    assert [row["model"] for row in json.loads(found.stdout)] == [NAME]
