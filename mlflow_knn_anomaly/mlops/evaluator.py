"""An MLflow model evaluator for anomaly detection, registered as the plugin `knn_anomaly`.

    mlflow.models.evaluate(model_uri, data=frame, model_type="anomaly-detection", evaluators=["knn_anomaly"])

`frame` has a column `image` of encoded image bytes (what the model's REST input takes), a label
column `label` (true or 1: anomalous; or name it with `targets=`), optionally `defect_type` (for
per-type figures) and `mask` (encoded mask image bytes at the image's size, pixels above 127 are
defect; None for normal images). It logs what the `evaluate` job logs: the metrics of
`evaluation.evaluate_samples` (pixel metrics only with masks), per-type figures as
`<type>.<metric>` (a folder name becomes a key part by `names.key_part`; names.json maps each key
part back to its name), and plots/image_roc.png, plots/pro_curve.png (with masks), plots/overlays.png.
Metrics are linked to the logged model and the evaluation dataset, so
`mlflow.validate_evaluation_results` can gate a candidate against a baseline on any of them.
Column names can be changed through the evaluator's config (keys `image_col`, `label_col`,
`mask_col`, `defect_type_col`, `category_col`): `evaluators="knn_anomaly", evaluator_config={"image_col":
"picture"}`, or with a list of evaluators, `evaluator_config={"knn_anomaly": {"image_col": "picture"}}`.

A line model (several part types) needs a `category` column: each category is evaluated with its own
detector, its figures logged as `<category>.<metric>` (plots under plots/<category>/, the category
as a key part), and each metric's mean over the categories that have it as `mean.<metric>`, with
`mean.<metric>.n_categories` saying how many (categories with image labels only have no pixel metrics).
"""

from __future__ import annotations

import posixpath
import time
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt
import numpy as np
import pandas as pd
from mlflow import MlflowClient
from mlflow.entities import Metric
from mlflow.exceptions import MlflowException
from mlflow.models.evaluation import EvaluationResult, ModelEvaluator
from mlflow.models.evaluation.artifacts import ImageEvaluationArtifact

from ..algorithm.line import LineDetector
from ..algorithm.spade import SpadeDetector
from ..evaluation.datasets import NORMAL, read_mask, read_test
from ..evaluation.evaluate import Evaluation, LabelledImage, evaluate_samples
from ..evaluation.plots import overlay_grid, pro_curve_figure, roc_figure
from .names import MEAN, NAMES_ARTIFACT, check_keys, key_part, names_table, prefixed

MODEL_TYPE = "anomaly-detection"
EVALUATOR_NAME = "knn_anomaly"
ANOMALOUS = "anomalous"  # the defect type of an anomalous row without a `defect_type` column
COLUMNS = {
    "image_col": "image",
    "label_col": "label",
    "mask_col": "mask",
    "defect_type_col": "defect_type",
    "category_col": "category",
}
LONGEST_KEY = "false_regions_per_anomalous_image"  # the longest metric name a defect type or category prefixes
NO_PIXEL_METRICS = "absent: image-level labels only (no masks were given)"


class SpadeEvaluator(ModelEvaluator):
    """Evaluates a `mlflow_knn_anomaly` model; MLflow calls it for model_type="anomaly-detection"."""

    @classmethod
    def can_evaluate(cls, *, model_type: str | None, evaluator_config: dict, **kwargs: Any) -> bool:
        return model_type == MODEL_TYPE

    def evaluate(
        self,
        *,
        model_type: str,
        dataset: Any,
        run_id: str,
        evaluator_config: dict,
        model: Any = None,
        extra_metrics: list | None = None,
        custom_artifacts: list | None = None,
        predictions: str | None = None,
        model_id: str | None = None,
        **kwargs: Any,
    ) -> EvaluationResult:
        """Score the dataset with the model's detector, log metrics (linked to the model and the
        dataset) and plots to `run_id`, and return them."""
        if extra_metrics or custom_artifacts:
            raise MlflowException.invalid_parameter_value(
                f"the {EVALUATOR_NAME} evaluator computes its own metrics and plots; pass no extra_metrics "
                "or custom_artifacts."
            )
        detector = _detector(model)
        config = _columns(evaluator_config or {})
        client = MlflowClient()
        model_id = model_id or getattr(model, "model_id", None)
        _log_names(client, run_id, dataset.features_data, config)  # before the work, not after it
        if isinstance(detector, LineDetector):
            figures, artifacts = self._evaluate_line(client, run_id, detector, dataset, config)
        else:
            samples = samples_from_frame(dataset.features_data, dataset.labels_data, config)
            result = evaluate_samples(detector, samples, progress=True)  # a bar only on a terminal
            figures = flat_metrics(result)
            if not result.has_masks:
                client.set_tag(run_id, "pixel_metrics", NO_PIXEL_METRICS)
            artifacts = _log_plots(client, run_id, result)
        _log_metrics(client, run_id, figures, model_id, dataset)
        return EvaluationResult(metrics=figures, artifacts=artifacts, run_id=run_id)

    def _evaluate_line(self, client, run_id: str, line: LineDetector, dataset, config: dict[str, str]):
        """Every category of the frame with its own detector: prefixed figures, their means, plots."""
        features, labels = dataset.features_data, dataset.labels_data
        column = config["category_col"]
        if column not in features.columns:
            raise MlflowException.invalid_parameter_value(
                f"a line model is evaluated per category: the data needs a column '{column}' naming each row's "
                f"category, one of {list(line.categories)}."
            )
        figures, artifacts, per_category = {}, {}, {}
        for category in dict.fromkeys(features[column]):
            try:
                detector = line.detector(category)
            except ValueError as exc:
                raise MlflowException.invalid_parameter_value(f"evaluation data: {exc}") from None
            rows = np.flatnonzero((features[column] == category).to_numpy())
            part = features.iloc[rows].reset_index(drop=True)
            samples = samples_from_frame(part, None if labels is None else np.asarray(labels)[rows], config)
            result = evaluate_samples(detector, samples, progress=True)
            per_category[category] = flat_metrics(result)
            figures.update({prefixed(category, k): v for k, v in per_category[category].items()})
            plots = _log_plots(client, run_id, result, folder=f"plots/{key_part(category)}")
            artifacts.update({f"{key_part(category)}/{name}": artifact for name, artifact in plots.items()})
        figures.update(category_means(per_category))
        return figures, artifacts


def category_means(per_category: dict[str, dict[str, float]]) -> dict[str, float]:
    """`mean.<metric>` over the categories that have each headline metric, and how many they are."""
    means = {}
    for key in dict.fromkeys(k for figures in per_category.values() for k in figures if "." not in k):
        values = [figures[key] for figures in per_category.values() if key in figures]
        means[f"{MEAN}.{key}"] = float(np.mean(values))
        means[f"{MEAN}.{key}.n_categories"] = float(len(values))
    return means


def _log_names(client: MlflowClient, run_id: str, features: pd.DataFrame, config: dict[str, str]) -> None:
    """Check that every key the data's names make can be logged, then log names.json {kind: {key part: name}}."""
    table = {
        kind: names_table(str(n) for n in dict.fromkeys(features[config[column]]))
        for kind, column in (("defect_types", "defect_type_col"), ("categories", "category_col"))
        if config[column] in features.columns
    }
    categories, types = (list(table.get(kind, {}).values()) or [None] for kind in ("categories", "defect_types"))
    check_keys((prefixed(c, prefixed(t, LONGEST_KEY)) for c in categories for t in types), "evaluation data")
    client.log_dict(run_id, table, NAMES_ARTIFACT)


def _columns(evaluator_config: dict) -> dict[str, str]:
    """Column names: the defaults, with those the evaluator_config renames (a misspelt key is an error)."""
    unknown = sorted(set(evaluator_config) - set(COLUMNS))
    if unknown:
        raise MlflowException.invalid_parameter_value(
            f"unknown evaluator_config keys {unknown} for {EVALUATOR_NAME}; valid keys: {sorted(COLUMNS)}."
        )
    return {**COLUMNS, **evaluator_config}


def _detector(model: Any) -> SpadeDetector | LineDetector:
    """The native detector (or line) inside a loaded pyfunc model; any other model is refused."""
    if model is None:
        raise MlflowException.invalid_parameter_value(
            f"the {EVALUATOR_NAME} evaluator scores the images itself: pass the model, not predictions."
        )
    try:
        detector = model.get_raw_model()
    except (AttributeError, NotImplementedError):
        detector = None
    if not isinstance(detector, (SpadeDetector, LineDetector)):
        raise MlflowException.invalid_parameter_value(
            f"the {EVALUATOR_NAME} evaluator evaluates mlflow_knn_anomaly models; this model's pyfunc "
            "gives no SpadeDetector (get_raw_model)."
        )
    return detector


def samples_from_frame(
    features: pd.DataFrame, labels: np.ndarray | None, config: dict[str, str] = COLUMNS
) -> list[LabelledImage]:
    """Labelled images from an evaluation DataFrame (see the module docstring for its columns).

    Args:
        features: the frame (without the targets column when `targets=` named it).
        labels: the targets column, or None to read `config["label_col"]` from `features`.

    Raises:
        MlflowException: a column is missing, or a mask cell is not encoded image bytes.
    """
    needed = [config["image_col"]] + ([config["label_col"]] if labels is None else [])
    missing = [name for name in needed if name not in features.columns]
    if missing:
        raise MlflowException.invalid_parameter_value(
            f"the evaluation data lacks the column(s) {missing}; it has {list(features.columns)}. Give an "
            "image column of encoded image bytes and a label column (1 = anomalous), or name them in "
            "evaluator_config (image_col, label_col) or with targets=."
        )
    flags = np.asarray(features[config["label_col"]] if labels is None else labels).astype(bool)
    kinds = features.get(config["defect_type_col"])
    masks = features.get(config["mask_col"])
    samples = []
    for i, (image, anomalous) in enumerate(zip(features[config["image_col"]], flags)):
        kind = str(kinds.iloc[i]) if kinds is not None else (ANOMALOUS if anomalous else NORMAL)
        if anomalous == (kind == NORMAL):
            raise MlflowException.invalid_parameter_value(
                f"row {i}: label {bool(anomalous)} contradicts defect type {kind!r} ('{NORMAL}' means normal)."
            )
        samples.append(LabelledImage(image, kind, None if masks is None else _mask(masks.iloc[i], i)))
    return samples


def _mask(value: Any, row: int) -> np.ndarray | None:
    """A mask cell: None, NaN (pandas' missing value) or b"" for no mask, else encoded image bytes."""
    if value is None or (isinstance(value, float) and np.isnan(value)):
        return None
    if not isinstance(value, (bytes, bytearray)):
        raise MlflowException.invalid_parameter_value(
            f"row {row}: mask of type {type(value).__name__}; expected encoded mask image bytes or None."
        )
    if not value:
        return None
    try:
        return read_mask(value)
    except OSError as exc:
        raise MlflowException.invalid_parameter_value(f"row {row}: the mask cannot be decoded ({exc}).") from None


def flat_metrics(result: Evaluation) -> dict[str, float]:
    """The headline metrics and, per defect type, `<type>.<metric>`."""
    per_type = {prefixed(kind, k): v for kind, figures in result.per_type.items() for k, v in figures.items()}
    return {**result.metrics, **per_type}


def _log_metrics(client: MlflowClient, run_id: str, figures: dict[str, float], model_id: str | None, dataset) -> None:
    """Metrics linked to the logged model and the evaluation dataset (MLflow 3 model lineage)."""
    now = int(time.time() * 1000)
    entries = [
        Metric(
            key,
            float(value),
            now,
            0,
            model_id=model_id,
            dataset_name=dataset.name,
            dataset_digest=dataset.digest,
            run_id=run_id,
        )
        for key, value in figures.items()
    ]
    client.log_batch(run_id, metrics=entries)


def _log_plots(
    client: MlflowClient, run_id: str, result: Evaluation, folder: str = "plots"
) -> dict[str, ImageEvaluationArtifact]:
    """<folder>/image_roc.png, <folder>/pro_curve.png (with masks), <folder>/overlays.png."""
    figures = {"image_roc": roc_figure(result), "overlays": overlay_grid(result)}
    if result.has_masks:
        figures["pro_curve"] = pro_curve_figure(result)
    root = client.get_run(run_id).info.artifact_uri
    artifacts = {}
    for name, figure in figures.items():
        path = f"{folder}/{name}.png"
        client.log_figure(run_id, figure, path)
        plt.close(figure)
        artifacts[name] = ImageEvaluationArtifact(uri=posixpath.join(root, path))
    return artifacts


def frame_from_folder(root: str | Path) -> pd.DataFrame:
    """The evaluation DataFrame of an MVTec-layout folder's test set: image and mask bytes, label,
    defect type (no mask column for a set with image-level labels only)."""
    tests = read_test(root)
    frame = pd.DataFrame(
        {
            "image": [s.path.read_bytes() for s in tests],
            "label": [s.is_anomalous for s in tests],
            "defect_type": [s.defect_type for s in tests],
        }
    )
    if any(s.mask_path is not None for s in tests):
        frame["mask"] = [None if s.mask_path is None else s.mask_path.read_bytes() for s in tests]
    return frame
