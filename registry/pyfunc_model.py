"""The registered model as an MLflow pyfunc: raw vibration windows in, reconstruction error and anomaly flag out.

Its artifacts are the whole bundle directory (the int8 ``.tflite``, the C model arrays, the DSP spec
with normalisation statistics, ``bundle.json``, the reports), so a registered version carries
exactly what a device is flashed with. :meth:`VibrationAnomalyModel.load_context` refuses a model
whose ``.tflite`` no longer matches the sha256 in its ``bundle.json`` before it scores anything;
:func:`registry.models.resolve` also checks every file against the registration's tags.

Scoring uses the one DSP front end (:func:`tinymlops.contracts.dsp.extract_features`) and the int8 model in
the TFLite interpreter (:func:`firmware.tflm.tflite_predict`), with the same error as training:
the mean squared difference between the normalised features and their reconstruction.

The model is logged as code (``registry/pyfunc_entry.py``), not pickled: loading a version runs
this module's class from the installed ``registry`` package.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd
from mlflow.pyfunc.model import PythonModel

from firmware.tflm import tflite_predict
from registry.errors import ModelArtifactsError, ModelInputError, ModelIntegrityError
from tinymlops.contracts.dsp import extract_features
from tinymlops.contracts.scoring import anomaly_scores, is_anomalous
from tinymlops.schemas import METADATA_FILE, BundleError, ModelBundle, load_bundle, sha256_hex

BUNDLE_ARTIFACT = "bundle"
"""Name of the pyfunc artifact that holds the bundle directory (see :func:`bundle_dir_of`)."""
ENTRY_FILE = Path(__file__).with_name("pyfunc_entry.py")
"""The models-from-code file MLflow logs and runs at load time."""
OUTPUT_COLUMNS = ("reconstruction_error", "anomaly")
RPM_COLUMN = "rpm"
"""Optional input column: the shaft speed of each window (rpm)."""


def bundle_digest(directory: Path) -> str:
    """sha256 over every file of a bundle directory: one ``relative/path<NUL>sha256`` line per file, sorted."""
    lines = [
        f"{path.relative_to(directory).as_posix()}\0{sha256_hex(path.read_bytes())}\n"
        for path in sorted(directory.rglob("*"))
        if path.is_file()
    ]
    return sha256_hex("".join(lines).encode())


def open_verified_bundle(
    directory: Path,
    expected_sha256: str | None = None,
    expected_digest: str | None = None,
    *,
    what: str = "model",
) -> ModelBundle:
    """Load a bundle that came back from the artifact store and check it is the one that was registered.

    Args:
        directory: The downloaded bundle directory.
        expected_sha256: The ``.tflite`` sha256 recorded at registration; ``bundle.json`` must
            agree with it as well as the file itself. The file is always checked against
            ``bundle.json``.
        expected_digest: The :func:`bundle_digest` recorded at registration: no file of the
            bundle (DSP spec, C arrays, threshold in ``bundle.json``) may differ.
        what: How to name the model in error messages (e.g. ``vibration-ae-nrf52840/3``).

    Raises:
        ModelArtifactsError: ``bundle.json`` or another bundle file is missing or unreadable.
        ModelIntegrityError: A file does not match what was registered.

    """
    try:
        bundle = load_bundle(directory, verify=False)
    except BundleError as exc:
        raise ModelArtifactsError(f"{what}: {exc}") from None
    if not bundle.tflite_path.is_file():
        raise ModelArtifactsError(f"{what}: artifacts in {directory} have no {bundle.tflite_path.name}")
    digest = sha256_hex(bundle.tflite_path.read_bytes())
    recorded = bundle.metadata.tflite_sha256
    if expected_sha256 is not None and recorded != expected_sha256:
        raise ModelIntegrityError(
            f"{what}: {METADATA_FILE} records sha256 {recorded[:16]}… but {expected_sha256[:16]}… was registered"
        )
    if digest != recorded:
        raise ModelIntegrityError(
            f"{what}: {bundle.tflite_path} has sha256 {digest[:16]}…, registered {recorded[:16]}… (modified?)"
        )
    try:
        bundle = load_bundle(directory, verify=True)
    except BundleError as exc:
        raise ModelArtifactsError(f"{what}: {exc}") from None
    if expected_digest is not None and (actual := bundle_digest(directory)) != expected_digest:
        raise ModelIntegrityError(
            f"{what}: bundle files digest {actual[:16]}…, registered {expected_digest[:16]}… (a file was modified)"
        )
    return bundle


def bundle_dir_of(model_dir: Path) -> Path:
    """The bundle directory inside a logged pyfunc model directory, as its ``MLmodel`` file records it.

    Raises:
        ModelArtifactsError: The directory is not a pyfunc model with a bundle artifact.

    """
    import yaml

    mlmodel = model_dir / "MLmodel"
    try:
        flavor = yaml.safe_load(mlmodel.read_text())["flavors"]["python_function"]
        relative = flavor["artifacts"][BUNDLE_ARTIFACT]["path"]
    except (OSError, yaml.YAMLError, KeyError, TypeError) as exc:
        raise ModelArtifactsError(
            f"{model_dir} is not a pyfunc model with a {BUNDLE_ARTIFACT!r} artifact: {exc}"
        ) from None
    return model_dir / relative


def windows_array(model_input: Any, window_samples: int) -> npt.NDArray[np.float32]:
    """Turn pyfunc input (2-D array, DataFrame of samples, or one column of sequences) into float32 (n, samples).

    Raises:
        ModelInputError: The input is not numeric windows of ``window_samples`` finite samples.

    """
    if isinstance(model_input, pd.DataFrame):
        if model_input.shape[1] == 1 and model_input.dtypes.iloc[0] == np.dtype(object):
            values: Any = [np.asarray(v, dtype=np.float32) for v in model_input.iloc[:, 0]]
        else:
            values = model_input.to_numpy()
    else:
        values = model_input
    try:
        x = np.asarray(values, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise ModelInputError(f"model input is not numeric windows: {exc}") from None
    if x.ndim == 1 and x.size == window_samples:
        x = x[None, :]
    if x.ndim != 2 or x.shape[1] != window_samples:
        raise ModelInputError(f"model input must have shape (n, {window_samples}) raw samples in g, got {x.shape}")
    if not np.isfinite(x).all():
        raise ModelInputError(f"model input has {int((~np.isfinite(x)).sum())} NaN or infinite samples")
    return x


class VibrationAnomalyModel(PythonModel):
    """Score raw vibration windows with a registered bundle: DSP features, int8 autoencoder, threshold."""

    def load_context(self, context: Any) -> None:
        """Load and verify the bundle artifact.

        Raises:
            ModelArtifactsError: The bundle artifact is missing or incomplete.
            ModelIntegrityError: The ``.tflite`` does not match the sha256 in its ``bundle.json``.

        """
        if BUNDLE_ARTIFACT not in context.artifacts:
            raise ModelArtifactsError(f"pyfunc model has no {BUNDLE_ARTIFACT!r} artifact")
        bundle = open_verified_bundle(Path(context.artifacts[BUNDLE_ARTIFACT]))
        self.bundle = bundle
        self.model = bundle.tflite()
        self.spec = bundle.dsp_spec()
        if not self.spec.is_fitted or self.spec.n_features != bundle.metadata.n_features:
            raise ModelArtifactsError(
                f"{bundle.directory}: DSP spec has {len(self.spec.mean)} normalisation statistics, "
                f"the model expects {bundle.metadata.n_features} features"
            )
        self.threshold = bundle.metadata.threshold

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        """Score windows (n, window_samples) in g: a DataFrame or a 2-D array (MLflow passes either through).

        A DataFrame may carry each window's shaft speed in an ``rpm`` column: a speed-aware model
        normalises each window at its speed; without it (or NaN) the model's reference speed is used.

        Returns:
            One row per window: ``reconstruction_error`` (float) and ``anomaly`` (error above the
            bundle's threshold).

        Raises:
            ModelInputError: The input does not have the spec's window length or is not finite.

        """
        rpm = None
        if isinstance(model_input, pd.DataFrame) and RPM_COLUMN in model_input.columns:
            rpm = model_input[RPM_COLUMN].to_numpy(dtype=np.float64, na_value=np.nan)
            model_input = model_input.drop(columns=[RPM_COLUMN])
        windows = windows_array(model_input, self.spec.window_samples)
        features = extract_features(windows, self.spec, rpm)
        reconstruction = tflite_predict(self.model, features)
        errors = anomaly_scores(features, reconstruction)
        return pd.DataFrame({OUTPUT_COLUMNS[0]: errors, OUTPUT_COLUMNS[1]: is_anomalous(errors, self.threshold)})
