"""The MLflow flavor: save / log / load a SpadeDetector as an `mlflow.pyfunc` model.

Model input: a DataFrame with a `binary` column `image` of encoded PNG/JPEG/BMP/TIFF bytes (base64
strings over REST) and, for a line model (several part types), a string column `category` naming
each row's part type. Output: one row per image, in input order, with the columns of
`OUTPUT_COLUMNS`. A row that cannot be decoded, or that names an unknown category, gets a
non-empty `error` and null results; the other rows still come. Rows of one request may mix
categories: they are run as one batch per category. Every row names the model version that
answered it (`model_version`: `bottle/3` when the server follows an alias, see `follow`, else the
MLflow model id of the model loaded).
"""

from __future__ import annotations

import base64
import io
import logging
import os
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

from ..algorithm.images import load_image
from ..algorithm.line import LineDetector, is_line
from ..algorithm.regions import encode_regions, min_area_pixels
from ..algorithm.spade import SpadeDetector
from ..config import OVERRIDES, check_segment, check_threshold
from ..runtime import configure_threads, server_workers, threads_kept
from ..version import __version__, serving_versions
from .capture import CaptureSettings, CaptureWriter
from .follow import FOLLOW_VARIABLE, Follower, Served, follow_seconds
from .shadow import SHADOW_VARIABLE, Shadow, shadow_rate

_logger = logging.getLogger(__name__)
FLAVOR_NAME = "mlflow_knn_anomaly"
INPUT_COLUMN = "image"
CATEGORY_COLUMN = "category"
PACKAGE_DIR = Path(__file__).resolve().parents[1]  # the whole package travels with the model


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
    Column("regions", "string", "object", ""),
    Column("category", "string", "object", ""),
    Column("error", "string", "object", ""),
    Column("model_version", "string", "object", ""),
)
OUTPUT_COLUMNS = tuple(c.name for c in OUTPUT)

SIGNATURE = ModelSignature(
    inputs=Schema([ColSpec("binary", INPUT_COLUMN), ColSpec("string", CATEGORY_COLUMN, required=False)]),
    outputs=Schema([ColSpec(c.type, c.name, required=c.empty is not None) for c in OUTPUT]),
    params=ParamSchema(
        [
            ParamSpec("segment", "string", "auto"),
            ParamSpec("image_threshold", "double", None),
            ParamSpec("pixel_threshold", "double", None),
            ParamSpec("min_region_area", "double", None),
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
    """What `mlflow.pyfunc.load_model` returns inside: validates rows and params, then predicts.

    Args:
        model: a single detector, or a line model (several categories).
        category: a single detector's part type, when known (rows naming another are errors).
        version: what each row's `model_version` says (a model id, or NAME/VERSION).
        follower: keeps the model on the version a registry alias names (`follow.Follower`).
        capture: writes each answered row away, off the request path (`capture.CaptureWriter`).
        shadow: scores a sample of the answered rows with a challenger, off the request path.
    """

    def __init__(
        self,
        model: SpadeDetector | LineDetector,
        category: str | None = None,
        version: str = "",
        follower: Follower | None = None,
        capture: CaptureWriter | None = None,
        shadow: Shadow | None = None,
    ) -> None:
        self._served = Served(model, version, category)
        self.follower = follower
        self.capture, self.shadow = capture, shadow

    @property
    def served(self) -> Served:
        """The version answering requests now (the follower's, when following an alias)."""
        return self.follower.served if self.follower is not None else self._served

    @property
    def model(self) -> SpadeDetector | LineDetector:
        return self.served.model

    def get_raw_model(self) -> SpadeDetector | LineDetector:
        """The native model (`mlflow.pyfunc.load_model(uri).get_raw_model()`)."""
        return self.model

    def predict(self, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> pd.DataFrame:
        """Score a batch; a request that cannot be read raises MlflowException (HTTP 400 when served)."""
        if not isinstance(model_input, pd.DataFrame) or INPUT_COLUMN not in model_input.columns:
            got = list(model_input.columns) if isinstance(model_input, pd.DataFrame) else type(model_input).__name__
            raise MlflowException.invalid_parameter_value(
                f"expected a DataFrame with a column '{INPUT_COLUMN}' of encoded image bytes; got {got}."
            )
        served = self.served  # read once: one version answers the whole request
        try:
            options = _check_params(params or {})
            categories = _categories(served, model_input)
        except ValueError as exc:
            raise MlflowException.invalid_parameter_value(str(exc)) from None
        rows: list[dict[str, Any]] = [
            {**{c.name: c.empty for c in OUTPUT}, "model_version": served.version} for _ in range(len(model_input))
        ]
        groups, raw = _group_rows(served, model_input[INPUT_COLUMN].tolist(), categories, rows)
        if self.follower is not None:
            self.follower.used_categories.update(k for k in groups if k)
        for key, (indices, images) in groups.items():
            detector = served.model.detector(key) if isinstance(served.model, LineDetector) else served.model
            prediction = detector.predict(
                images,
                segment=options["segment"],
                image_threshold=options["image_threshold"],
                pixel_threshold=options["pixel_threshold"],
                min_region_area=options["min_region_area"],
                return_maps=options["return_anomaly_map"],
            )
            for j, i in enumerate(indices):
                rows[i].update(_row(prediction, j, options["return_anomaly_map"]))
        for sink in (self.capture, self.shadow):  # both only queue: their threads do the work
            if sink is not None:
                sink.submit(raw, rows)
        columns = list(OUTPUT_COLUMNS) + (["anomaly_map"] if options["return_anomaly_map"] else [])
        return pd.DataFrame(rows, columns=columns).astype({c.name: c.dtype for c in OUTPUT})


def _group_rows(
    served: Served, values: list[object], categories: list[object], rows: list[dict[str, Any]]
) -> tuple[dict[str, tuple[list[int], list[Image.Image]]], list[bytes | None]]:
    """The decodable rows grouped by the detector that scores them, {key: (row indices, images)},
    and each row's image bytes (None where unreadable: what capture keeps); a bad row gets its
    `category` and `error` in `rows`."""
    groups: dict[str, tuple[list[int], list[Image.Image]]] = {}
    raw: list[bytes | None] = [None] * len(rows)
    for i, (value, category) in enumerate(zip(values, categories)):
        rows[i]["category"] = category if isinstance(category, str) else ""
        try:
            detector_key = _check_row_category(served, category)
            raw[i] = _as_bytes(value)
            image = load_image(raw[i])
        except (ValueError, TypeError) as exc:
            rows[i]["error"] = str(exc)
            continue
        members = groups.setdefault(detector_key, ([], []))
        members[0].append(i)
        members[1].append(image)
    return groups, raw


def _categories(served: Served, frame: pd.DataFrame) -> list[object]:
    """Each row's `category` cell ("" where absent or null); a line model needs the column."""
    if CATEGORY_COLUMN not in frame.columns:
        if isinstance(served.model, LineDetector):
            raise ValueError(
                f"this is a line model of {len(served.model.categories)} part types: send a string column "
                f"'{CATEGORY_COLUMN}' naming each row's, one of {list(served.model.categories)}."
            )
        return [""] * len(frame)
    column = frame[CATEGORY_COLUMN]
    if pd.api.types.is_numeric_dtype(column) or pd.api.types.is_bool_dtype(column):
        raise ValueError(f"column '{CATEGORY_COLUMN}' holds {column.dtype} values; send category names as strings.")
    return ["" if value is None or (isinstance(value, float) and np.isnan(value)) else value for value in column]


def _check_row_category(served: Served, category: object) -> str:
    """The key of the detector that scores a row; ValueError (a row error) when there is none."""
    if not isinstance(category, str):
        raise ValueError(f"category of type {type(category).__name__}; send the category name as a string.")
    if isinstance(served.model, LineDetector):
        return served.model.check_category(category)
    if category not in ("", served.category):
        held = f"part type {served.category!r}" if served.category else "one unnamed part type"
        raise ValueError(f"unknown category {category!r}: this model holds {held}; send that, or no category.")
    return ""


def _row(prediction, j: int, with_map: bool) -> dict[str, Any]:
    """Output fields of image j of a `Prediction`."""
    segmented = bool(prediction.segmented[j])
    row = {
        "score": float(prediction.scores[j]),
        "normalized_score": float(prediction.normalized_scores[j]),
        "is_anomalous": bool(prediction.is_anomalous[j]),
        "segmented": segmented,
        "mask": encode_mask(prediction.masks[j]) if segmented else "",
        "regions": encode_regions(prediction.regions[j]) if segmented else "",
    }
    if with_map:
        row["anomaly_map"] = encode_anomaly_map(prediction.anomaly_maps[j]) if segmented else ""
    return row


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
    options.setdefault("min_region_area", None)
    check_segment(options["segment"])
    for name in OVERRIDES:
        check_threshold(name, options[name])
    if options["min_region_area"] is not None:
        min_area_pixels(options["min_region_area"], 1, 1)  # raises with what to pass
    if not isinstance(options["return_anomaly_map"], (bool, np.bool_)):
        raise ValueError(f"return_anomaly_map={options['return_anomaly_map']!r} must be true or false.")
    return options


def _load_pyfunc(data_path: str) -> SpadePyfuncModel:
    """MLflow's loader hook: `data_path` is the saved detector (or line) directory inside the model."""
    # Server workers share the free cores (`mlflow models serve -w N`); MLFLOW_KNN_ANOMALY_THREADS
    # overrides it all.
    workers = server_workers()
    threads = configure_threads(workers=workers)
    _log_to_stderr_unless_configured()
    _logger.info("mlflow-knn-anomaly: %d threads per process, %d worker process(es)", threads, workers)
    mlmodel = Path(data_path).parents[1] / "MLmodel"
    saved = Model.load(str(mlmodel)) if mlmodel.is_file() else None  # absent: a bare detector folder
    model_id = getattr(saved, "model_id", None)
    if is_line(data_path):
        model, category = LineDetector.load(data_path), None
        _logger.info("mlflow-knn-anomaly: line model of %d categories %s", len(model.categories), model.categories)
    else:  # a model saved before categories existed has none
        model, category = SpadeDetector.load(data_path), saved and saved.flavors.get(FLAVOR_NAME, {}).get("category")
    extras = _serving_extras()
    follow = os.environ.get(FOLLOW_VARIABLE)
    if not follow:
        return SpadePyfuncModel(model, category, model_id or "", **extras)
    follower = Follower(follow, Served(model, model_id or "", category), model_id, load_served, follow_seconds())
    _logger.info("mlflow-knn-anomaly: following %s, checked every %.0f s", follow, follower.seconds)
    return SpadePyfuncModel(model, category, follower=follower.start(), **extras)


def _serving_extras() -> dict[str, Any]:
    """Request capture and a shadow challenger, as the environment asks (`capture`, `shadow`)."""
    settings = CaptureSettings.from_environ()
    capture = None if settings is None else CaptureWriter(settings)
    if capture is not None:
        _logger.info("mlflow-knn-anomaly: capturing %.0f %% of the rows to %s", 100 * settings.rate, settings.location)
    challenger = os.environ.get(SHADOW_VARIABLE)
    shadow = Shadow(challenger, shadow_rate(), load_served) if challenger else None
    if shadow is not None:
        _logger.info("mlflow-knn-anomaly: %s scores %.0f %% of the rows in the shadow", challenger, 100 * shadow.rate)
    return {"capture": capture, "shadow": shadow}


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
    from ..evaluation.datasets import normal_part

    buffer = io.BytesIO()
    Image.fromarray(normal_part(np.random.default_rng(0), size)).save(buffer, format="PNG")
    return buffer.getvalue()


def save_model(
    detector: SpadeDetector | LineDetector,
    path: str | Path,
    mlflow_model: Model | None = None,
    pip_requirements: list[str] | None = None,
    metadata: dict[str, Any] | None = None,
    category: str | None = None,
) -> None:
    """Save as an MLflow model directory: detector data, the pyfunc loader, this flavor, MLmodel.

    Args:
        detector: a single detector, or a line model.
        category: a single detector's part type (a request naming another gets a row error).
    """
    line = isinstance(detector, LineDetector)
    if line and category is not None:
        raise ValueError("category names a single detector's part type; a line model names its own.")
    with tempfile.TemporaryDirectory() as tmp:
        data = detector.save(Path(tmp) / ("line" if line else "detector"))
        mlflow_model = mlflow_model or Model()
        if metadata:
            mlflow_model.metadata = {**(mlflow_model.metadata or {}), **metadata}
        flavor = {"categories": list(detector.categories)} if line else {"category": category}
        mlflow_model.add_flavor(FLAVOR_NAME, data=f"data/{data.name}", package_version=__version__, **flavor)
        example = {INPUT_COLUMN: [example_image_bytes()]}
        if line:
            example[CATEGORY_COLUMN] = [detector.categories[0]]
        mlflow.pyfunc.save_model(
            path=str(path),
            loader_module=f"{__package__}.pyfunc_model",
            data_path=str(data),
            code_paths=[str(PACKAGE_DIR)],
            mlflow_model=mlflow_model,
            signature=SIGNATURE,
            input_example=pd.DataFrame(example),
            pip_requirements=pip_requirements or default_pip_requirements(),
        )


def default_pip_requirements() -> list[str]:
    """The pinned public packages a serving environment needs (the package's own code travels along)."""
    return [f"{name}=={version}" for name, version in serving_versions().items()]


def log_model(
    detector: SpadeDetector | LineDetector, name: str = "model", registered_model_name: str | None = None, **kwargs: Any
) -> mlflow.models.model.ModelInfo:
    """Log the detector as a model of the active run (and register it when a name is given)."""
    with threads_kept():  # MLflow loads the logged model to validate its serving input: see `threads_kept`
        return Model.log(
            artifact_path=None,
            name=name,
            flavor=sys.modules[__name__],
            registered_model_name=registered_model_name,
            detector=detector,
            **kwargs,
        )


def load_model(model_uri: str) -> SpadeDetector | LineDetector:
    """The native model of a logged or registered model (e.g. "models:/NAME@champion"): a
    SpadeDetector, or a LineDetector for a line model."""
    return load_served(model_uri)[0]


def load_served(model_uri: str, dst: str | None = None) -> tuple[SpadeDetector | LineDetector, str | None]:
    """(the native model, a single detector's saved category) of a model downloaded (into `dst`,
    else MLflow's temporary folder), every artifact verified."""
    try:
        local = Path(mlflow.artifacts.download_artifacts(model_uri, dst_path=dst))
    except MlflowException as exc:
        raise ValueError(f"cannot load {model_uri}: {exc.message} Check the model name, version or alias.") from exc
    conf = Model.load(str(local)).flavors.get(FLAVOR_NAME)
    if conf is None:
        raise ValueError(f"{model_uri} is not a {FLAVOR_NAME} model (its MLmodel lacks that flavor).")
    data = local / conf["data"]
    return (LineDetector.load(data), None) if is_line(data) else (SpadeDetector.load(data), conf.get("category"))


def model_flavor(model_uri: str) -> dict[str, Any]:
    """This flavor's MLmodel entry of a model (only the MLmodel file is fetched).

    MLflow's `Model.load` resolves every URI form itself; appending "/MLmodel" to a `models:/m-<id>`
    URI would read the logged model's id as a registered model's name."""
    try:
        return Model.load(model_uri.rstrip("/")).flavors.get(FLAVOR_NAME) or {}
    except MlflowException as exc:
        raise ValueError(f"cannot load {model_uri}: {exc.message} Check the model name, version or alias.") from exc


def model_category(model_uri: str) -> str | None:
    """A single detector's saved category (None for a line model or a model saved without one)."""
    return model_flavor(model_uri).get("category")


def model_categories(model_uri: str) -> list[str] | None:
    """A line model's categories; None for a single-category model."""
    return model_flavor(model_uri).get("categories")
