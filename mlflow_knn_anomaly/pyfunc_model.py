"""The MLflow flavor: save / log / load a SpadeDetector as an `mlflow.pyfunc` model.

Model input: a DataFrame with a `binary` column `image` of encoded PNG/JPEG/BMP/TIFF bytes (base64
strings over REST). Output: one row per image, in input order, with the columns of `OUTPUT_COLUMNS`.
A row that cannot be decoded gets a non-empty `error` and null results; the other rows still come.
"""

from __future__ import annotations

import base64
import io
import logging
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.exceptions import MlflowException
from mlflow.models import Model, ModelSignature
from mlflow.types import ColSpec, ParamSchema, ParamSpec, Schema
from PIL import Image

from .config import OVERRIDES, check_segment, check_threshold
from .images import load_image
from .runtime import configure_threads, server_workers
from .spade import SpadeDetector
from .version import __version__, serving_versions

_logger = logging.getLogger(__name__)
FLAVOR_NAME = "mlflow_knn_anomaly"
INPUT_COLUMN = "image"
PACKAGE_DIR = Path(__file__).resolve().parent


@dataclass(frozen=True)
class Column:
    """One output column: its MLflow (and Spark) type, pandas dtype, and value for a bad row."""

    name: str
    type: str
    dtype: str
    empty: Any


# The output schema, in column order: the signature, the rows, their dtypes and Spark's schema
# all derive from this table.
OUTPUT = (
    Column("score", "double", "Float64", None),
    Column("normalized_score", "double", "Float64", None),
    Column("is_anomalous", "boolean", "boolean", None),
    Column("segmented", "boolean", "boolean", None),
    Column("mask", "string", "object", ""),
    Column("error", "string", "object", ""),
)
OUTPUT_COLUMNS = tuple(c.name for c in OUTPUT)

SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec("binary", INPUT_COLUMN)]),
    outputs=Schema([ColSpec(c.type, c.name, required=c.empty is not None) for c in OUTPUT]),
    params=ParamSchema(
        [
            ParamSpec("segment", "string", "auto"),
            ParamSpec("image_threshold", "double", None),
            ParamSpec("pixel_threshold", "double", None),
            ParamSpec("return_anomaly_map", "boolean", False),
        ]
    ),
)


# ---- encodings ----------------------------------------------------------------------------------
def encode_mask(mask: np.ndarray) -> str:
    """Base64 PNG of a (H, W) bool mask, 8-bit 0/255."""
    buffer = io.BytesIO()
    Image.fromarray(np.asarray(mask, dtype=np.uint8) * 255, mode="L").save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def decode_mask(text: str) -> np.ndarray:
    """(H, W) bool mask from the `mask` column ("" means not segmented: raises ValueError)."""
    if not text:
        raise ValueError("empty mask: the image was not segmented (use segment='all' to force it).")
    with Image.open(io.BytesIO(base64.b64decode(text))) as image:
        return np.asarray(image.convert("L")) > 127


def encode_anomaly_map(anomaly_map: np.ndarray) -> str:
    """Base64 of a .npy file holding the (H, W) map as float16 (relative precision 4.9e-4), or
    float32 when values exceed float16's range."""
    values = np.asarray(anomaly_map, dtype=np.float32)
    if np.abs(values).max(initial=0.0) < 60000:
        values = values.astype(np.float16)
    buffer = io.BytesIO()
    np.save(buffer, values, allow_pickle=False)
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def decode_anomaly_map(text: str) -> np.ndarray:
    """(H, W) float32 anomaly map from the `anomaly_map` column."""
    return np.load(io.BytesIO(base64.b64decode(text)), allow_pickle=False).astype(np.float32)


# ---- the pyfunc model ---------------------------------------------------------------------------
class SpadePyfuncModel:
    """What `mlflow.pyfunc.load_model` returns inside: validates rows and params, then predicts."""

    def __init__(self, detector: SpadeDetector) -> None:
        self.detector = detector

    def get_raw_model(self) -> SpadeDetector:
        """The native detector (`mlflow.pyfunc.load_model(uri).get_raw_model()`)."""
        return self.detector

    def predict(self, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        """Score a batch; a request that cannot be read raises MlflowException (HTTP 400 when served)."""
        if not isinstance(model_input, pd.DataFrame) or INPUT_COLUMN not in model_input.columns:
            got = list(model_input.columns) if isinstance(model_input, pd.DataFrame) else type(model_input).__name__
            raise MlflowException.invalid_parameter_value(
                f"expected a DataFrame with a column '{INPUT_COLUMN}' of encoded image bytes; got {got}."
            )
        try:
            options = _check_params(params or {})
        except ValueError as exc:
            raise MlflowException.invalid_parameter_value(str(exc)) from None
        rows: list[dict[str, Any]] = [{c.name: c.empty for c in OUTPUT} for _ in range(len(model_input))]
        good, images = [], []
        for i, value in enumerate(model_input[INPUT_COLUMN].tolist()):
            try:
                images.append(load_image(_as_bytes(value)))
                good.append(i)
            except (ValueError, TypeError) as exc:
                rows[i]["error"] = str(exc)
        if images:
            prediction = self.detector.predict(
                images,
                segment=options["segment"],
                image_threshold=options["image_threshold"],
                pixel_threshold=options["pixel_threshold"],
            )
            for j, i in enumerate(good):
                rows[i].update(
                    score=float(prediction.scores[j]),
                    normalized_score=float(prediction.normalized_scores[j]),
                    is_anomalous=bool(prediction.is_anomalous[j]),
                    segmented=bool(prediction.segmented[j]),
                    mask=encode_mask(prediction.masks[j]) if prediction.segmented[j] else "",
                )
                if options["return_anomaly_map"]:
                    rows[i]["anomaly_map"] = (
                        encode_anomaly_map(prediction.anomaly_maps[j]) if prediction.segmented[j] else ""
                    )
        columns = list(OUTPUT_COLUMNS) + (["anomaly_map"] if options["return_anomaly_map"] else [])
        return pd.DataFrame(rows, columns=columns).astype({c.name: c.dtype for c in OUTPUT})


def _as_bytes(value: object) -> bytes:
    if isinstance(value, (bytes, bytearray)):
        return bytes(value)
    if isinstance(value, str):
        try:
            return base64.b64decode(value, validate=True)
        except ValueError as exc:
            raise ValueError("image string is not valid base64; send base64-encoded image file bytes.") from exc
    raise TypeError(f"image cell of type {type(value).__name__}; expected encoded image bytes.")


def _check_params(params: dict[str, Any]) -> dict[str, Any]:
    known = {spec.name for spec in SIGNATURE.params.params}
    unknown = sorted(set(params) - known)
    if unknown:
        raise ValueError(f"unknown params {unknown}; valid params: {sorted(known)}.")
    options = {"segment": "auto", "image_threshold": None, "pixel_threshold": None, "return_anomaly_map": False}
    options.update({k: v for k, v in params.items() if v is not None})
    check_segment(options["segment"])
    for name in OVERRIDES:
        check_threshold(name, options[name])
    if not isinstance(options["return_anomaly_map"], (bool, np.bool_)):
        raise ValueError(f"return_anomaly_map={options['return_anomaly_map']!r} must be true or false.")
    return options


def _load_pyfunc(data_path: str) -> SpadePyfuncModel:
    """MLflow's loader hook: `data_path` is the saved detector directory inside the model."""
    # Server workers share the free cores (`mlflow models serve -w N`); MLFLOW_KNN_ANOMALY_THREADS
    # overrides it all.
    workers = server_workers()
    threads = configure_threads(workers=workers)
    _log_to_stderr_unless_configured()
    _logger.info("mlflow-knn-anomaly: %d threads per process, %d worker process(es)", threads, workers)
    return SpadePyfuncModel(SpadeDetector.load(data_path))


def _log_to_stderr_unless_configured() -> None:
    """MLflow's scoring server sets up logging for `mlflow` and uvicorn only, so this package's INFO
    lines (the thread sizing a server operator needs) would be dropped: send them to stderr, in
    MLflow's format, unless the application has configured logging itself."""
    package = logging.getLogger(__package__)
    if package.handlers or logging.getLogger().handlers:
        return
    handler = logging.StreamHandler()
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%Y/%m/%d %H:%M:%S"))
    package.addHandler(handler)
    package.setLevel(logging.INFO)


# ---- save / log / load ----------------------------------------------------------------------------
def example_image_bytes(size: int = 64) -> bytes:
    """A small real PNG (a synthetic part) used as the model's input example."""
    from .datasets import normal_part

    buffer = io.BytesIO()
    Image.fromarray(normal_part(np.random.default_rng(0), size)).save(buffer, format="PNG")
    return buffer.getvalue()


def save_model(
    detector: SpadeDetector,
    path: str | Path,
    mlflow_model: Model | None = None,
    pip_requirements: list[str] | None = None,
    metadata: dict[str, Any] | None = None,
) -> None:
    """Save as an MLflow model directory: detector data, the pyfunc loader, this flavor, MLmodel."""
    with tempfile.TemporaryDirectory() as tmp:
        data = detector.save(Path(tmp) / "detector")
        mlflow_model = mlflow_model or Model()
        if metadata:
            mlflow_model.metadata = {**(mlflow_model.metadata or {}), **metadata}
        mlflow_model.add_flavor(FLAVOR_NAME, data="data/detector", package_version=__version__)
        mlflow.pyfunc.save_model(
            path=str(path),
            loader_module=f"{__package__}.pyfunc_model",
            data_path=str(data),
            code_paths=[str(PACKAGE_DIR)],
            mlflow_model=mlflow_model,
            signature=SIGNATURE,
            input_example=pd.DataFrame({INPUT_COLUMN: [example_image_bytes()]}),
            pip_requirements=pip_requirements or default_pip_requirements(),
        )


def default_pip_requirements() -> list[str]:
    """The pinned public packages a serving environment needs (the package's own code travels along)."""
    return [f"{name}=={version}" for name, version in serving_versions().items()]


def log_model(
    detector: SpadeDetector, name: str = "model", registered_model_name: str | None = None, **kwargs: Any
) -> mlflow.models.model.ModelInfo:
    """Log the detector as a model of the active run (and register it when a name is given)."""
    return Model.log(
        artifact_path=None,
        name=name,
        flavor=sys.modules[__name__],
        registered_model_name=registered_model_name,
        detector=detector,
        **kwargs,
    )


def load_model(model_uri: str) -> SpadeDetector:
    """The native SpadeDetector of a logged or registered model (e.g. "models:/NAME@champion")."""
    try:
        local = Path(mlflow.artifacts.download_artifacts(model_uri))
    except MlflowException as exc:
        raise ValueError(f"cannot load {model_uri}: {exc.message} Check the model name, version or alias.") from exc
    conf = Model.load(str(local)).flavors.get(FLAVOR_NAME)
    if conf is None:
        raise ValueError(f"{model_uri} is not a {FLAVOR_NAME} model (its MLmodel lacks that flavor).")
    return SpadeDetector.load(local / conf["data"])
