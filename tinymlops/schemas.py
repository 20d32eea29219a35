"""Schemas shared across layers: the model bundle that training produces and everything downstream reads.

A bundle is a directory, one per target MCU profile, holding what a device needs (the int8
``.tflite``, its DSP spec with normalisation statistics, the threshold) and the evidence that it
is fit to run there (budget report, evaluation). ``bundle.json`` carries the sha256 of the
``.tflite``; :func:`load_bundle` refuses a bundle whose model does not match it.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from pydantic import BaseModel, Field, ValidationError

from tinymlops.contracts.dsp import DspSpec
from tinymlops.errors import TinyMLOpsError

BUNDLE_FORMAT_VERSION = 1
TFLITE_FILE = "model.tflite"
FLOAT_TFLITE_FILE = "model_float.tflite"
DSP_SPEC_FILE = "dsp_spec.json"
METADATA_FILE = "bundle.json"
BUDGET_JSON_FILE = "budget.json"
BUDGET_MD_FILE = "budget.md"
EVALUATION_FILE = "evaluation.json"
DRIFT_REFERENCE_FILE = "drift_reference.npz"


class BundleError(TinyMLOpsError):
    """A model bundle is missing files or fails its integrity check."""


def sha256_hex(data: bytes) -> str:
    """Hex sha256 of bytes."""
    return hashlib.sha256(data).hexdigest()


def registered_model_name(target: str) -> str:
    """Name of the registered model for one MCU target profile."""
    return f"vibration-ae-{target}"


class BundleMetadata(BaseModel):
    """What a bundle is and where it came from."""

    format_version: int = BUNDLE_FORMAT_VERSION
    model_name: str = Field(description="Registered model name, one per target profile.")
    target: str = Field(description="MCU target profile (catalog key).")
    fleet: str = Field(description="Fleet whose data trained it.")
    threshold: float = Field(description="Anomaly threshold on the reconstruction error (normalised features).")
    threshold_percentile: float
    dsp_spec_version: int
    tflite_sha256: str
    tflite_bytes: int
    arena_bytes: int = Field(description="Smallest working TFLite Micro tensor arena, measured.")
    macs: int
    n_features: int
    c_name: str = Field(description="C identifier of the generated arrays: files <c_name>_model_data.c/.h.")
    quantization: str = Field(description="ptq or qat")
    sparsity: float
    budget_passed: bool
    dataset_fingerprint: str = Field(description="sha256 over the training windows and the lake selection.")
    trained_span_us: dict[str, tuple[int, int]] = Field(
        default_factory=dict,
        description="Per device, the first and last timestamp (us) of the windows it trained on (train, "
        "validation and calibration): windows outside are held out (`evaluate --holdout`).",
    )
    created_at: str = Field(default_factory=lambda: dt.datetime.now(tz=dt.UTC).isoformat())
    metrics: dict[str, float] = Field(default_factory=dict, description="Evaluation and size figures.")
    lineage: dict[str, str] = Field(default_factory=dict, description="Run ids, flow run ids, lake selection.")


@dataclass(frozen=True)
class DriftReference:
    """The training reference a drift monitor compares live data with.

    Attributes:
        features: A sample of the normalised training features (rows, n_features).
        errors: Reconstruction errors of the deployed model on held-out normal (calibration) windows.
        expected_anomaly_rate: Fraction of normal windows expected above the threshold (false alarms).
    """

    features: npt.NDArray[np.float32]
    errors: npt.NDArray[np.float32]
    expected_anomaly_rate: float


@dataclass(frozen=True)
class ModelBundle:
    """A bundle directory on disk, with its metadata loaded."""

    directory: Path
    metadata: BundleMetadata

    @property
    def tflite_path(self) -> Path:
        """The int8 model."""
        return self.directory / TFLITE_FILE

    @property
    def dsp_spec_path(self) -> Path:
        """The DSP front-end spec with normalisation statistics."""
        return self.directory / DSP_SPEC_FILE

    def tflite(self) -> bytes:
        """Read the model bytes, verified against the recorded sha256."""
        data = self.tflite_path.read_bytes()
        digest = sha256_hex(data)
        if digest != self.metadata.tflite_sha256:
            recorded = self.metadata.tflite_sha256
            raise BundleError(f"{self.tflite_path}: sha256 {digest[:16]}… does not match the recorded {recorded[:16]}…")
        return data

    @property
    def c_source_path(self) -> Path:
        """Generated C source holding the model array (TFLM convention)."""
        return self.directory / f"{self.metadata.c_name}_model_data.c"

    @property
    def c_header_path(self) -> Path:
        """Generated C header declaring the model array and its size."""
        return self.directory / f"{self.metadata.c_name}_model_data.h"

    def float_tflite(self) -> bytes | None:
        """The float32 TFLite model the int8 one was quantized from, when the bundle carries it."""
        path = self.directory / FLOAT_TFLITE_FILE
        return path.read_bytes() if path.is_file() else None

    def dsp_spec_json(self) -> str:
        """The DSP spec as JSON text, as stored in the bundle."""
        return self.dsp_spec_path.read_text()

    def dsp_spec(self) -> DspSpec:
        """The DSP front-end spec the model was trained with, parsed."""
        return DspSpec.from_json(self.dsp_spec_json())

    def drift_reference(self) -> DriftReference:
        """What the model was trained on, for the drift monitor."""
        with np.load(self.directory / DRIFT_REFERENCE_FILE) as data:
            return DriftReference(
                features=data["features"],
                errors=data["errors"],
                expected_anomaly_rate=float(data["expected_anomaly_rate"]),
            )

    def evaluation(self) -> dict[str, Any]:
        """The evaluation report."""
        data: dict[str, Any] = json.loads((self.directory / EVALUATION_FILE).read_text())
        return data

    def budget(self) -> dict[str, Any]:
        """The budget report."""
        data: dict[str, Any] = json.loads((self.directory / BUDGET_JSON_FILE).read_text())
        return data


def write_bundle(
    directory: Path,
    *,
    tflite: bytes,
    dsp_spec_json: str,
    metadata: BundleMetadata,
    c_source: str,
    c_header: str,
    budget_json: str,
    budget_markdown: str,
    evaluation: dict[str, Any],
    drift_reference: DriftReference,
    float_tflite: bytes | None = None,
) -> ModelBundle:
    """Write a bundle atomically: into a temporary sibling directory, then renamed into place.

    Raises:
        BundleError: The recorded sha256 does not match ``tflite``, or the directory already exists.
    """
    if sha256_hex(tflite) != metadata.tflite_sha256:
        raise BundleError(f"metadata sha256 does not match the model bytes for {metadata.model_name}")
    if directory.exists():
        raise BundleError(f"bundle directory {directory} already exists")
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{directory.name}-", dir=directory.parent))
    try:
        (tmp / TFLITE_FILE).write_bytes(tflite)
        if float_tflite is not None:
            (tmp / FLOAT_TFLITE_FILE).write_bytes(float_tflite)
        (tmp / DSP_SPEC_FILE).write_text(dsp_spec_json)
        (tmp / f"{metadata.c_name}_model_data.c").write_text(c_source)
        (tmp / f"{metadata.c_name}_model_data.h").write_text(c_header)
        (tmp / BUDGET_JSON_FILE).write_text(budget_json)
        (tmp / BUDGET_MD_FILE).write_text(budget_markdown)
        (tmp / EVALUATION_FILE).write_text(json.dumps(evaluation, indent=2, sort_keys=True))
        np.savez(
            tmp / DRIFT_REFERENCE_FILE,
            features=drift_reference.features,
            errors=drift_reference.errors,
            expected_anomaly_rate=np.float64(drift_reference.expected_anomaly_rate),
        )
        (tmp / METADATA_FILE).write_text(metadata.model_dump_json(indent=2))
        os.replace(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ModelBundle(directory, metadata)


def load_bundle(directory: Path, *, verify: bool = True) -> ModelBundle:
    """Load a bundle directory; with ``verify``, check every file exists and the model's sha256.

    Raises:
        BundleError: A file is missing, the metadata is invalid, or the model was modified.
    """
    meta_path = directory / METADATA_FILE
    if not meta_path.is_file():
        raise BundleError(f"{directory} is not a model bundle: {METADATA_FILE} is missing")
    try:
        metadata = BundleMetadata.model_validate_json(meta_path.read_text())
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"]) or "<root>"
        raise BundleError(f"{meta_path}: invalid bundle metadata: {field}: {first['msg']}") from None
    bundle = ModelBundle(directory, metadata)
    if verify:
        names = (TFLITE_FILE, DSP_SPEC_FILE, BUDGET_JSON_FILE, EVALUATION_FILE, DRIFT_REFERENCE_FILE)
        required = [directory / name for name in names]
        required += [bundle.c_source_path, bundle.c_header_path]
        missing = [path.name for path in required if not path.is_file()]
        if missing:
            raise BundleError(f"bundle {directory} is missing {', '.join(missing)}")
        bundle.tflite()
    return bundle
