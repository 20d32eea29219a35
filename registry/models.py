"""The model registry: one registered model per MCU target profile, a version per deployable bundle.

A version is the bundle logged as a pyfunc model (:mod:`registry.pyfunc_model`) in the training
run, registered under :func:`tinymlops.schemas.registered_model_name` of its target. Its tags are
the handful a reviewer or a device-side deployer reads at a glance: the target and fleet, the budget
and gate verdicts (``budget`` names each check's verdict), the ``.tflite`` and bundle sha256, the
dataset fingerprint and the lineage (``lineage.*``: training run, logged model, flow run).
Every measured figure (quality per interpreter, budget checks, MACs) is a metric of the logged model
(:attr:`RegisteredVersion.metrics`), its settings (quantization, threshold, DSP spec) its params.

Aliases (see ``registry/PROMOTION.md``): ``candidate`` is the newest version that passed every
gate, ``champion`` is what devices of that target run, ``previous`` the champion before it.
"What should device X run" is ``resolve(registered_model_name(target) + "@champion")``.

References accepted everywhere: ``NAME`` (the latest version), ``NAME@alias``, ``NAME/version``,
each optionally prefixed with ``models:/``.
"""

from __future__ import annotations

import datetime as dt
import importlib.metadata
import logging
import re
import tempfile
import warnings
from contextlib import suppress
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from registry.errors import (
    ModelArtifactsError,
    ModelIntegrityError,
    ModelNotFoundError,
    RegistryError,
)
from registry.store import first_line, mlflow_client, mlflow_tracking_uri
from tinymlops.errors import TinyMLOpsError
from tinymlops.schemas import ModelBundle, load_bundle, registered_model_name

if TYPE_CHECKING:
    from mlflow import MlflowClient
    from mlflow.entities.model_registry import ModelVersion, RegisteredModel

log = logging.getLogger(__name__)

CANDIDATE = "candidate"
CHAMPION = "champion"
PREVIOUS = "previous"
MODEL_NAME_PREFIX = registered_model_name("")

TAG_TARGET = "target"
TAG_BUDGET_PASSED = "budget_passed"
TAG_GATES_PASSED = "gates_passed"
TAG_SHA256 = "tflite_sha256"
TAG_BUNDLE_DIGEST = "bundle_sha256"
TAG_BUDGET = "budget"
METRIC_TAG_PREFIX = "metric."  # versions registered before the figures moved to the logged model
LINEAGE_TAG_PREFIX = "lineage."

_MAX_TAG_VALUE = 5000
_TAG_KEY_BAD_CHARS = re.compile(r"[^\w.\-/ :]")
_REF = re.compile(r"^(?:models:/)?(?P<name>[\w.-]+)(?:@(?P<alias>[\w-]+)|/(?P<version>\d+))?$")
# What the pyfunc needs at load time: recorded so a served copy gets the same stack.
_PYFUNC_REQUIREMENTS = ("mlflow", "numpy", "pandas", "pydantic", "tensorflow", "tflite-micro")


@dataclass(frozen=True)
class ModelRef:
    """A parsed model reference: a name with at most one of alias or version."""

    name: str
    alias: str | None = None
    version: str | None = None

    @classmethod
    def parse(cls, ref: str) -> ModelRef:
        """Parse ``NAME``, ``NAME@alias`` or ``NAME/version`` (optionally ``models:/``-prefixed).

        Raises:
            ModelNotFoundError: The text is not a model reference.

        """
        match = _REF.match(ref.strip())
        if match is None:
            raise ModelNotFoundError(f"invalid model reference {ref!r}: expected NAME, NAME@ALIAS or NAME/VERSION")
        return cls(match["name"], match["alias"], match["version"])

    def __str__(self) -> str:
        if self.alias:
            return f"{self.name}@{self.alias}"
        if self.version:
            return f"{self.name}/{self.version}"
        return self.name


@dataclass(frozen=True)
class RegisteredVersion:
    """One registered model version as the registry describes it (nothing downloaded)."""

    name: str
    version: str
    aliases: tuple[str, ...]
    tags: dict[str, str]
    run_id: str | None
    source: str
    artifact_uri: str
    description: str
    status: str
    created_at: str
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def uri(self) -> str:
        """The ``models:/NAME/VERSION`` URI (for ``mlflow.pyfunc.load_model``)."""
        return f"models:/{self.name}/{self.version}"

    @property
    def target(self) -> str | None:
        """The MCU target profile."""
        return self.tags.get(TAG_TARGET)

    @property
    def gates_passed(self) -> bool:
        """Whether the version passed the budget gate and every other gate at registration."""
        return self.tags.get(TAG_GATES_PASSED) == "true" and self.tags.get(TAG_BUDGET_PASSED) == "true"

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-serialisable dict."""
        return {**asdict(self), "aliases": list(self.aliases), "uri": self.uri}


@dataclass(frozen=True)
class ResolvedModel:
    """A registered version with its bundle downloaded and verified."""

    ref: str
    version: RegisteredVersion
    bundle: ModelBundle
    model_dir: Path


@dataclass(frozen=True)
class RegisteredModelSummary:
    """One registered model: its aliases and versions."""

    name: str
    description: str
    aliases: dict[str, str]
    latest_version: str | None
    versions: int
    updated_at: str
    tags: dict[str, str] = field(default_factory=dict)


def _iso(ms: int | None) -> str:
    if not ms:
        return ""
    return dt.datetime.fromtimestamp(ms / 1000, tz=dt.UTC).isoformat(timespec="seconds")


def _tag_key(key: str) -> str:
    return _TAG_KEY_BAD_CHARS.sub("_", key)


def _number(value: float) -> str:
    return format(float(value), ".10g")


def _to_registered(mv: ModelVersion, client: MlflowClient) -> RegisteredVersion:
    tags = dict(mv.tags or {})
    return RegisteredVersion(
        name=mv.name,
        version=str(mv.version),
        aliases=tuple(sorted(mv.aliases or ())),
        tags=tags,
        run_id=mv.run_id,
        source=mv.source or "",
        artifact_uri=client.get_model_version_download_uri(mv.name, str(mv.version)),
        description=mv.description or "",
        status=str(mv.status),
        created_at=_iso(mv.creation_timestamp),
        metrics=_figures(client, tags),
    )


def _figures(client: MlflowClient, tags: dict[str, str]) -> dict[str, float]:
    """A version's measured figures: its logged model's metrics (older versions: ``metric.*`` tags)."""
    from mlflow.exceptions import MlflowException

    figures = {}
    for key, value in tags.items():
        if key.startswith(METRIC_TAG_PREFIX):
            with suppress(ValueError):
                figures[key.removeprefix(METRIC_TAG_PREFIX)] = float(value)
    model_id, prefix = tags.get(LINEAGE_TAG_PREFIX + "logged_model_id"), f"{tags.get(TAG_TARGET)}/"
    if model_id:
        try:
            metrics = client.get_logged_model(model_id).metrics or ()
            figures |= {m.key.removeprefix(prefix): float(m.value) for m in metrics if m.key.startswith(prefix)}
        except MlflowException as exc:
            log.warning("cannot read the figures of logged model %s: %s", model_id, first_line(exc))
    return figures


def _error_code(exc: Exception) -> str:
    return str(getattr(exc, "error_code", ""))


def _budget_checks(bundle: ModelBundle) -> list[dict[str, Any]]:
    """The checks of the bundle's budget report (empty where it has none)."""
    try:
        report = bundle.budget()
    except (OSError, ValueError):
        return []
    checks = report.get("checks", []) if isinstance(report, dict) else []
    return [c for c in checks if isinstance(c, dict) and {"name", "passed", "measured", "limit"} <= c.keys()]


def version_tags(bundle: ModelBundle, run_id: str, model_id: str, *, gates_passed: bool) -> dict[str, str]:
    """The registry tags of a bundle's version: target, verdicts, figures, integrity and lineage."""
    from registry.pyfunc_model import bundle_digest

    meta = bundle.metadata
    checks = _budget_checks(bundle)
    tags = {
        TAG_TARGET: meta.target,
        "fleet": meta.fleet,
        TAG_BUDGET_PASSED: str(meta.budget_passed).lower(),
        TAG_GATES_PASSED: str(gates_passed and meta.budget_passed).lower(),
        TAG_BUDGET: ", ".join(f"{c['name']} {'pass' if c['passed'] else 'FAIL'}" for c in checks) or "no checks",
        TAG_SHA256: meta.tflite_sha256,
        TAG_BUNDLE_DIGEST: bundle_digest(bundle.directory),
        "dataset_fingerprint": meta.dataset_fingerprint,
    }
    tags.update({_tag_key(LINEAGE_TAG_PREFIX + k): str(v)[:_MAX_TAG_VALUE] for k, v in meta.lineage.items()})
    tags[LINEAGE_TAG_PREFIX + "mlflow_run_id"] = run_id
    tags[LINEAGE_TAG_PREFIX + "logged_model_id"] = model_id
    return tags


def log_figures(client: MlflowClient, bundle: ModelBundle, run_id: str, model_id: str) -> None:
    """Record the bundle's figures on its logged model: measured values as metrics, settings as params.

    The metrics are keyed ``<target>/<figure>``: they land in the training run too, which holds a bundle
    per target, and the MLflow UI groups them by target there.
    """
    from mlflow.entities import Metric

    meta = bundle.metadata
    stamp = int(dt.datetime.now(tz=dt.UTC).timestamp() * 1000)
    figures = {**meta.metrics, "tflite_bytes": meta.tflite_bytes, "arena_bytes": meta.arena_bytes, "macs": meta.macs}
    metrics = [
        Metric(_tag_key(f"{meta.target}/{key}"), float(value), stamp, 0, model_id=model_id, run_id=run_id)
        for key, value in figures.items()
    ]
    for start in range(0, len(metrics), 1000):  # MLflow's batch limit
        client.log_batch(run_id, metrics=metrics[start : start + 1000], synchronous=True)
    client.log_model_params(
        model_id,
        {
            "quantization": meta.quantization,
            "sparsity": _number(meta.sparsity),
            "threshold": _number(meta.threshold),
            "threshold_percentile": _number(meta.threshold_percentile),
            "n_features": str(meta.n_features),
            "dsp_spec_version": str(meta.dsp_spec_version),
            "bundle_format_version": str(meta.format_version),
            "bundle_created_at": meta.created_at,
        },
    )


def _requirements() -> list[str]:
    pins = []
    for dist in _PYFUNC_REQUIREMENTS:
        try:
            pins.append(f"{dist}=={importlib.metadata.version(dist)}")
        except importlib.metadata.PackageNotFoundError:
            pins.append(dist)
    return pins


def _log_pyfunc(bundle: ModelBundle, run_id: str, model_id: str) -> None:
    """Log the bundle as a pyfunc model into the LoggedModel ``model_id`` of run ``run_id``."""
    import mlflow.pyfunc
    from mlflow.models import Model, ModelSignature
    from mlflow.types import ColSpec, Schema

    from registry.pyfunc_model import BUNDLE_ARTIFACT, ENTRY_FILE, OUTPUT_COLUMNS

    # Outputs only: the input is any 2-D numeric array or DataFrame, validated by the model itself
    # (an input schema would make MLflow refuse float64 windows).
    signature = ModelSignature(
        outputs=Schema([ColSpec("double", OUTPUT_COLUMNS[0]), ColSpec("boolean", OUTPUT_COLUMNS[1])])
    )
    with warnings.catch_warnings():
        # No input example on purpose: MLflow would run the model at logging time to validate it.
        # The warning text starts with a colour code, hence the leading ".*".
        warnings.filterwarnings("ignore", message=r".*An input example was not provided", category=UserWarning)
        # Model.log rather than mlflow.pyfunc.log_model: it takes the run explicitly, so an unrelated
        # active run (or none) cannot capture the model.
        Model.log(
            artifact_path=None,
            flavor=mlflow.pyfunc,
            run_id=run_id,
            model_id=model_id,
            python_model=str(ENTRY_FILE),
            artifacts={BUNDLE_ARTIFACT: str(bundle.directory)},
            pip_requirements=_requirements(),
            signature=signature,
            metadata={"target": bundle.metadata.target, TAG_SHA256: bundle.metadata.tflite_sha256},
        )


def register_bundle(bundle: ModelBundle, run_id: str, *, gates_passed: bool) -> RegisteredVersion:
    """Register a bundle as a new version of its target's model; all or nothing.

    The bundle is checked again (every file, the ``.tflite`` sha256), logged as a pyfunc model in
    run ``run_id`` and registered with its tags. The ``candidate`` alias moves to the new version
    only when ``gates_passed`` and the bundle's own budget verdict are both true. If any step
    after the logging fails, the version, a registered model created here and the logged model
    are deleted again, so no dangling version or alias remains.

    Args:
        bundle: The bundle (see :func:`tinymlops.schemas.write_bundle`).
        run_id: The training run that produced it (see :func:`registry.tracking.log_training_run`).
        gates_passed: Whether the model passed every gate of the training flow (quality, parity,
            budget).

    Returns:
        The registered version.

    Raises:
        BundleError: The bundle is incomplete or its model was modified.
        RegistryError: The run does not exist, the bundle names the wrong model, or a registry
            call failed (nothing is left registered).

    """
    from mlflow.exceptions import MlflowException

    bundle = load_bundle(bundle.directory, verify=True)
    meta = bundle.metadata
    name = registered_model_name(meta.target)
    if meta.model_name != name:
        raise RegistryError(f"bundle {bundle.directory} names model {meta.model_name!r}; target model is {name!r}")
    client = mlflow_client()
    try:
        run = client.get_run(run_id)
    except MlflowException as exc:
        if _error_code(exc) == "RESOURCE_DOES_NOT_EXIST":
            raise RegistryError(f"training run {run_id} not found in {mlflow_tracking_uri()}") from None
        raise RegistryError(f"cannot read training run {run_id}: {first_line(exc)}") from exc
    candidate = gates_passed and meta.budget_passed
    model_id: str | None = None
    created_model = False
    version: str | None = None
    try:
        _remove_orphaned_logged_models(client, run.info.experiment_id, run_id, meta.target, name)
        logged = client.create_logged_model(
            run.info.experiment_id,
            name=f"bundle-{meta.target}",
            source_run_id=run_id,
            tags={TAG_TARGET: meta.target, TAG_SHA256: meta.tflite_sha256},
            model_type="tinymlops-bundle",
        )
        model_id = logged.model_id
        _log_pyfunc(bundle, run_id, model_id)
        log_figures(client, bundle, run_id, model_id)
        try:
            client.create_registered_model(
                name,
                tags={TAG_TARGET: meta.target},
                description=f"int8 vibration anomaly autoencoder for the {meta.target} MCU profile; "
                f"aliases: {CHAMPION} (what devices run), {CANDIDATE}, {PREVIOUS}",
            )
            created_model = True
        except MlflowException as exc:
            if _error_code(exc) != "RESOURCE_ALREADY_EXISTS":
                raise
        mv = client.create_model_version(
            name,
            source=f"models:/{model_id}",
            run_id=run_id,
            model_id=model_id,
            tags=version_tags(bundle, run_id, model_id, gates_passed=gates_passed),
            description=f"{meta.target}: {meta.tflite_bytes:,} B int8 ({meta.quantization}), arena "
            f"{meta.arena_bytes:,} B, {meta.macs:,} MACs, budget {'pass' if meta.budget_passed else 'FAIL'}",
            await_creation_for=60,
        )
        version = str(mv.version)
        if mv.status != "READY":
            raise RegistryError(f"{name}/{version} is {mv.status} after registration, not READY")
        if candidate:
            client.set_registered_model_alias(name, CANDIDATE, version)
        registered = _to_registered(client.get_model_version(name, version), client)
    except BaseException as exc:
        _undo_registration(client, name, version, created_model, model_id)
        if isinstance(exc, TinyMLOpsError) or not isinstance(exc, Exception):
            raise
        raise RegistryError(
            f"registering {bundle.directory} as {name} failed (nothing registered): {first_line(exc)}"
        ) from exc
    log.info(
        "registered %s/%s (%s)%s", name, version, meta.target, f", alias {CANDIDATE}" if candidate else ", no alias"
    )
    return registered


def _remove_orphaned_logged_models(
    client: MlflowClient, experiment_id: str, run_id: str, target: str, name: str
) -> None:
    """Delete this run's logged bundles of ``target`` that no version uses.

    They are what an attempt left when the tracking server died before its clean-up could
    reach it; the retry removes them, so a run never keeps a logged bundle that is not registered.
    """
    leftovers = client.search_logged_models(
        [experiment_id], filter_string=f"source_run_id = '{run_id}' AND name = 'bundle-{target}'"
    )
    if not leftovers:
        return
    # The version's own model_id is not returned by every store; the lineage tag always is.
    used = {
        mv.tags.get(LINEAGE_TAG_PREFIX + "logged_model_id") for mv in client.search_model_versions(f"name='{name}'")
    }
    for logged in leftovers:
        if logged.model_id not in used:
            client.delete_logged_model(logged.model_id)
            log.info("removed logged model %s, left unregistered by a failed registration", logged.model_id)


def _undo_registration(
    client: MlflowClient, name: str, version: str | None, created_model: bool, model_id: str | None
) -> None:
    """Remove what a failed registration created; a failing clean-up step is logged, not raised."""
    steps: list[tuple[str, Any]] = []
    if version is not None:
        steps.append((f"delete {name}/{version}", lambda: client.delete_model_version(name, version)))
    if created_model:

        def drop_empty_model() -> None:
            if not client.search_model_versions(f"name='{name}'"):
                client.delete_registered_model(name)

        steps.append((f"delete registered model {name}", drop_empty_model))
    if model_id is not None:
        steps.append((f"delete logged model {model_id}", lambda: client.delete_logged_model(model_id)))
    for what, step in steps:
        try:
            step()
        except Exception as exc:  # keep undoing the rest; the original error is what the caller sees
            log.warning("clean-up after a failed registration: %s failed: %s", what, first_line(exc))


def get_version(ref: str | ModelRef, client: MlflowClient | None = None) -> RegisteredVersion:
    """Look up the version a reference names.

    Raises:
        ModelNotFoundError: No such registered model, version, or no version has the alias.

    """
    from mlflow.exceptions import MlflowException

    parsed = ref if isinstance(ref, ModelRef) else ModelRef.parse(ref)
    client = client or mlflow_client()
    try:
        registered = client.get_registered_model(parsed.name)
    except MlflowException as exc:
        if _error_code(exc) == "RESOURCE_DOES_NOT_EXIST":
            raise ModelNotFoundError(f"no registered model {parsed.name!r}") from None
        raise RegistryError(f"cannot read registered model {parsed.name!r}: {first_line(exc)}") from exc
    aliases = dict(registered.aliases or {})
    if parsed.alias is not None:
        if parsed.alias not in aliases:
            known = ", ".join(f"{a}->{v}" for a, v in sorted(aliases.items())) or "none"
            raise ModelNotFoundError(f"{parsed.name} has no version with alias {parsed.alias!r} (aliases: {known})")
        version = str(aliases[parsed.alias])
    elif parsed.version is not None:
        version = parsed.version
    else:
        versions = [v for v in _all_versions(client, parsed.name) if v.status == "READY"]
        if not versions:
            raise ModelNotFoundError(f"registered model {parsed.name} has no versions")
        version = str(max(int(v.version) for v in versions))
    try:
        mv = client.get_model_version(parsed.name, version)
    except MlflowException as exc:
        if _error_code(exc) == "RESOURCE_DOES_NOT_EXIST":
            raise ModelNotFoundError(f"{parsed.name} has no version {version}") from None
        raise RegistryError(f"cannot read {parsed.name}/{version}: {first_line(exc)}") from exc
    return _to_registered(mv, client)


def _all_versions(client: MlflowClient, name: str) -> list[ModelVersion]:
    versions: list[ModelVersion] = []
    token = None
    while True:
        page = client.search_model_versions(f"name='{name}'", max_results=1000, page_token=token)
        versions.extend(page)
        token = page.token
        if not token:
            return versions


def describe(ref: str) -> RegisteredVersion:
    """Describe the version a reference names: aliases, tags, figures, artifact location (no download)."""
    return get_version(ref)


def resolve(ref: str, dst_dir: Path | None = None) -> ResolvedModel:
    """Resolve a reference to a version and download its bundle, verified.

    Args:
        ref: ``NAME``, ``NAME@alias`` or ``NAME/version``.
        dst_dir: Where to download the model (an empty or missing directory); default a new
            temporary directory that the caller owns.

    Returns:
        The version and its bundle; the bundle's ``.tflite`` matches the sha256 tag recorded at
        registration and its ``bundle.json``.

    Raises:
        ModelNotFoundError: Unknown model or version, or an alias no version has.
        ModelArtifactsError: The artifacts cannot be downloaded or are incomplete.
        ModelIntegrityError: The downloaded model does not match the registered sha256.

    """
    from mlflow.artifacts import download_artifacts
    from mlflow.exceptions import MlflowException

    from registry.pyfunc_model import bundle_dir_of, open_verified_bundle

    version = get_version(ref)
    what = f"{version.name}/{version.version}"
    expected = version.tags.get(TAG_SHA256)
    if not expected:
        raise ModelIntegrityError(f"{what} has no {TAG_SHA256} tag: it was not registered by tinymlops")
    if dst_dir is None:
        dst_dir = Path(tempfile.mkdtemp(prefix=f"tinymlops-{version.name}-{version.version}-"))
    dst_dir.mkdir(parents=True, exist_ok=True)
    try:
        local = Path(download_artifacts(artifact_uri=version.uri, dst_path=str(dst_dir)))
    except (MlflowException, OSError) as exc:
        raise ModelArtifactsError(
            f"{what}: cannot download its artifacts from {version.artifact_uri}: {first_line(exc)}"
        ) from exc
    bundle_dir = bundle_dir_of(local)
    if not bundle_dir.is_dir():
        raise ModelArtifactsError(f"{what}: artifacts at {version.artifact_uri} have no bundle directory")
    bundle = open_verified_bundle(bundle_dir, expected, version.tags.get(TAG_BUNDLE_DIGEST), what=what)
    log.info("resolved %s to %s (%s)", ref, what, bundle_dir)
    return ResolvedModel(ref=ref, version=version, bundle=bundle, model_dir=local)


def list_models() -> list[RegisteredModelSummary]:
    """Every tinymlops registered model (``vibration-ae-*``) with its aliases and version count."""
    from mlflow.exceptions import MlflowException

    client = mlflow_client()
    models: list[RegisteredModel] = []
    token = None
    try:
        while True:
            page = client.search_registered_models(
                filter_string=f"name LIKE '{MODEL_NAME_PREFIX}%'", max_results=1000, page_token=token
            )
            models.extend(page)
            token = page.token
            if not token:
                break
    except MlflowException as exc:
        raise RegistryError(f"cannot list registered models: {first_line(exc)}") from exc
    summaries = []
    for rm in sorted(models, key=lambda m: m.name):
        versions = _all_versions(client, rm.name)
        summaries.append(
            RegisteredModelSummary(
                name=rm.name,
                description=rm.description or "",
                aliases={alias: str(v) for alias, v in sorted((rm.aliases or {}).items())},
                latest_version=str(max(int(v.version) for v in versions)) if versions else None,
                versions=len(versions),
                updated_at=_iso(rm.last_updated_timestamp),
                tags=dict(rm.tags or {}),
            )
        )
    return summaries


def aliases_of(name: str) -> dict[str, str]:
    """Alias to version of a registered model.

    Raises:
        ModelNotFoundError: No such registered model.

    """
    from mlflow.exceptions import MlflowException

    try:
        registered = mlflow_client().get_registered_model(name)
    except MlflowException as exc:
        if _error_code(exc) == "RESOURCE_DOES_NOT_EXIST":
            raise ModelNotFoundError(f"no registered model {name!r}") from None
        raise RegistryError(f"cannot read registered model {name!r}: {first_line(exc)}") from exc
    return {alias: str(v) for alias, v in (registered.aliases or {}).items()}
