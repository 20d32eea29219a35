"""The UIs a user opens, loaded in a real headless browser: what the project produced is on the pages.

The Prefect UI runs on the session's Prefect database (the one the ``cwru_trained`` train flow reported
to) and the MLflow UI on that run's store, both started by :mod:`tinymlops.services`; Debian's
``chromium`` renders each page headless and the test reads the rendered DOM (again, a few times at most,
while a page is still loading its data). With ``TINYMLOPS_UI_SCREENSHOTS``
set to a folder, it also saves a screenshot of some pages there (the README's, in ``docs/``).
"""

from __future__ import annotations

import asyncio
import html
import os
import re
import shutil
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any
from uuid import UUID

import pytest

from registry.promotion import EVAL_TAG_PREFIX
from tests.conftest import using_data_dir
from tinymlops.schemas import load_bundle
from tinymlops.services import LocalService, mlflow_ui, prefect_server

pytestmark = [pytest.mark.slow, pytest.mark.prefect, pytest.mark.mlflow]

SERVICE_DEADLINE_S = 240.0  # both start at once on a loaded 2-core machine
# Virtual time lets a page's scripts and fetches settle; a page still loading data is rendered again.
VIRTUAL_TIME_MS = 20_000
RENDER_ATTEMPTS = 6  # the automations page once showed its count but not yet its card after 4
PAGE_TIMEOUT_S = 120.0
SCREENSHOTS_ENV = "TINYMLOPS_UI_SCREENSHOTS"
SCREENSHOT_PAGES = {"prefect-flow-run", "prefect-quality-table", "mlflow-run", "mlflow-model-version"}


def chromium() -> str:
    """The headless browser, installed by the README's set-up."""
    path = shutil.which("chromium")
    if path is None:
        pytest.fail("chromium is not installed: run the README's set-up (apt-get install chromium)")
    return path


def _browser(*args: str, virtual_time_ms: int = VIRTUAL_TIME_MS) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--hide-scrollbars",
         f"--virtual-time-budget={virtual_time_ms}", *args],
        capture_output=True, text=True, timeout=PAGE_TIMEOUT_S,
    )  # fmt: skip


def render(url: str) -> str:
    """The page's text after its scripts ran (tags and scripts stripped)."""
    # tall: lists and tables render their rows only once they scroll into view
    dom = _browser("--window-size=1280,3000", "--dump-dom", url).stdout
    body = re.sub(r"<(script|style)\b.*?</\1>", " ", dom, flags=re.S)
    return " ".join(html.unescape(re.sub(r"<[^>]+>", " ", body)).split())


def render_all(pages: dict[str, tuple[str, list[str]]]) -> dict[str, str]:
    """Render pages two at a time until each shows what it should, at most :data:`RENDER_ATTEMPTS` times.

    Args:
        pages: Name to (URL, the texts the page should show).

    Returns:
        Each page's last rendered text.
    """
    texts = dict.fromkeys(pages, "")
    with ThreadPoolExecutor(max_workers=2) as pool:
        for _ in range(RENDER_ATTEMPTS):
            due = [n for n, (_, expected) in pages.items() if not all(e in texts[n] for e in expected)]
            futures = {name: pool.submit(render, pages[name][0]) for name in due}
            texts |= {name: future.result() for name, future in futures.items()}
    folder = os.environ.get(SCREENSHOTS_ENV)
    if folder:
        for name in sorted(SCREENSHOT_PAGES & set(pages)):
            # the pages fade in: a long virtual time, or the screenshot is dimmed
            shot = Path(folder) / f"ui-{name}.png"
            _browser("--window-size=1280,800", f"--screenshot={shot}", pages[name][0], virtual_time_ms=60_000)
    return texts


def missing(pages: dict[str, tuple[str, list[str]]], texts: dict[str, str]) -> dict[str, tuple[list[str], str]]:
    """Per page, the expected texts it does not show, with the start of what it shows."""
    gaps = {name: [e for e in expected if e not in texts[name]] for name, (_, expected) in pages.items()}
    return {name: (gap, texts[name][:300]) for name, gap in gaps.items() if gap}


@pytest.fixture(scope="module")
def services(cwru_trained: dict[str, Any], tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """A Prefect server (UI) on the session's Prefect database and the MLflow UI on the trained store."""
    from prefect.settings import PREFECT_API_DATABASE_CONNECTION_URL

    from flows.deployments import runner_deployments

    home = tmp_path_factory.mktemp("ui-services")
    # The deployments and the drift automation, as `tinymlops serve` registers them.
    deployment_ids = [deployment.apply() for deployment in runner_deployments()]
    with using_data_dir(Path(str(cwru_trained["data_dir"]))) as settings:
        mlflow = mlflow_ui(settings.mlflow_tracking_uri, settings.mlflow_artifact_root, home / "logs")
    # Another view of the database the session's server writes: API and UI only, no second scheduler.
    prefect = prefect_server(home, home / "logs", database_url=PREFECT_API_DATABASE_CONNECTION_URL.value(),
                             run_services=False)  # fmt: skip
    started: list[LocalService] = []
    try:
        for service in (mlflow, prefect):
            started.append(service.launch())
        deadline = time.monotonic() + SERVICE_DEADLINE_S
        for service in started:
            assert service.wait_healthy(max(1.0, deadline - time.monotonic())), (
                f"{service.name}: see {service.log_file}"
            )
        yield {"prefect": prefect, "mlflow": mlflow, "deployment_ids": deployment_ids, **cwru_trained}
    finally:
        for service in started:
            service.stop(timeout_s=5.0)
        asyncio.run(_delete_deployments(deployment_ids))  # no trigger may act on the session's other tests


async def _delete_deployments(ids: list[Any]) -> None:
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        for deployment_id in ids:
            await client.delete_resource_owned_automations(f"prefect.deployment.{deployment_id}")
            await client.delete_deployment(deployment_id)


async def _train_run_and_its_logs(trained: dict[str, Any]) -> tuple[Any, list[Any]]:
    """The session's CWRU train flow run (named by its bundles' lineage: other tests train too) and its logs."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId

    lineage = load_bundle(Path(trained["bundles"]["nrf52840"])).metadata.lineage
    async with get_client() as client:
        run = await client.read_flow_run(UUID(lineage["prefect_flow_run_id"]))
        logs = await client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[run.id])))
        return run, logs


async def _artifact_id(key: str, flow_run_id: Any) -> Any:
    """The artifact ``key`` of one flow run (the key's latest may come from another test's run)."""
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import ArtifactFilter, ArtifactFilterFlowRunId, ArtifactFilterKey

    async with get_client() as client:
        (artifact,) = await client.read_artifacts(
            artifact_filter=ArtifactFilter(
                key=ArtifactFilterKey(any_=[key]), flow_run_id=ArtifactFilterFlowRunId(any_=[flow_run_id])
            )
        )
        return artifact.id


def test_prefect_ui_shows_the_runs_their_logs_artifacts_deployments_and_the_trigger(services: dict[str, Any]) -> None:
    train_run, logs = asyncio.run(_train_run_and_its_logs(services))
    # The project's own log lines reach the run's logs, not only Prefect's "Finished in state" lines.
    # (Tests log at WARNING; the CLI at INFO, so there the AUC, budgets and counts arrive too.)
    project_logs = [entry for entry in logs if entry.name.split(".")[0] in {"flows", "tasks", "registry", "tinymlops"}]
    skipped = next(entry for entry in project_logs if "skipped 1 unusable lake windows" in entry.message)
    assert skipped.name == "tasks.datasets" and skipped.task_run_id is not None
    ingest_id = services["deployment_ids"][0]
    quality_id = asyncio.run(_artifact_id("training-quality-cwru", train_run.id))
    url = services["prefect"].url
    pages = {
        "prefect-runs": (f"{url}/runs", [train_run.name]),
        # the project's log line beside Prefect's, with the logger that wrote it
        "prefect-flow-run": (f"{url}/runs/flow-run/{train_run.id}", [skipped.message[:40], "tasks.datasets"]),
        "prefect-artifacts": (f"{url}/artifacts", ["training-report-cwru", "training-quality-cwru"]),
        # the quality table artifact: a row per interpreter
        "prefect-quality-table": (f"{url}/artifacts/artifact/{quality_id}", list(services["evaluation"])),
        # a deployment with its description, tags and schedule
        "prefect-deployment": (
            f"{url}/deployments/deployment/{ingest_id}?tab=Description",
            ["ingest-scheduled", "nine minutes of every ten", "scheduled", "Every 10 minutes"],
        ),
        "prefect-automations": (
            f"{url}/automations",
            ["retrain-on-drift", "retrain that fleet on its drifted devices", "Run deployment"],
        ),
    }
    texts = render_all(pages)
    assert not any("Can't connect to Server API" in text for text in texts.values())
    assert not missing(pages, texts)
    deployments = asyncio.run(_deployments())
    assert {d.name for d in deployments} >= {
        "ingest-scheduled", "monitor-scheduled", "retrain-on-drift", "train-manual", "deploy-manual", "full-loop-manual"
    }  # fmt: skip
    assert all(d.description and "tinymlops" in d.tags for d in deployments)


async def _deployments() -> list[Any]:
    from prefect.client.orchestration import get_client

    async with get_client() as client:
        return list(await client.read_deployments())


def test_mlflow_ui_shows_the_experiment_the_training_run_and_the_models_with_aliases(services: dict[str, Any]) -> None:
    from mlflow import MlflowClient

    from registry.models import describe
    from registry.store import configure_from_settings

    with using_data_dir(Path(str(services["data_dir"]))):
        experiment_id = configure_from_settings()
        experiment = MlflowClient().get_experiment(experiment_id)
        champion = describe("vibration-ae-nrf52840@champion")
    url = services["mlflow"].url
    description = experiment.tags["mlflow.note.content"]
    assert description.startswith("Training runs of the vibration anomaly autoencoder")
    pages = {
        "mlflow-experiments": (f"{url}/#/experiments", [experiment.name]),
        "mlflow-experiment": (f"{url}/#/experiments/{experiment_id}", [description[:40]]),
        "mlflow-run": (f"{url}/#/experiments/{experiment_id}/runs/{services['mlflow_run_id']}", [services["run"]]),
        "mlflow-models": (f"{url}/#/models", ["vibration-ae-nrf52840", "vibration-ae-rp2040", "champion"]),
        "mlflow-model-version": (
            f"{url}/#/models/{champion.name}/versions/{champion.version}",
            ["champion", champion.tags["tflite_sha256"]],
        ),
    }
    texts = render_all(pages)
    assert not missing(pages, texts)
    # a handful of tags; beside them the promotion record (PROMOTION.md): the comparison, who promoted it and why
    record = {tag for tag in champion.tags if tag.startswith((EVAL_TAG_PREFIX, "promot"))}
    assert len(set(champion.tags) - record) <= 12, sorted(champion.tags)
