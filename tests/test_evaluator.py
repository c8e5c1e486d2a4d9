"""The `knn_anomaly` MLflow evaluator: `mlflow.models.evaluate` on a DataFrame of images, labels and
masks logs the evaluate job's metrics and plots, and `mlflow.validate_evaluation_results` gates on them."""

import mlflow
import numpy as np
import pandas as pd
import pytest
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from mlflow.models import MetricThreshold
from mlflow.models.evaluation.validation import ModelValidationFailedException

from mlflow_knn_anomaly import SpadeConfig, SpadeDetector, log_model
from mlflow_knn_anomaly.evaluation.datasets import read_train
from mlflow_knn_anomaly.evaluation.evaluate import LabelledImage, evaluate_samples, read_samples
from mlflow_knn_anomaly.mlops import registry
from mlflow_knn_anomaly.mlops.evaluator import EVALUATOR_NAME, MODEL_TYPE, frame_from_folder, samples_from_frame

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def tracking(tmp_path_factory):
    uri = f"sqlite:///{tmp_path_factory.mktemp('tracking') / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    yield uri
    mlflow.set_tracking_uri(None)


@pytest.fixture(scope="module")
def frame(synthetic_root):
    """Every second test image of the synthetic set (all four types), as the evaluator's DataFrame."""
    return frame_from_folder(synthetic_root).iloc[::2].reset_index(drop=True)


@pytest.fixture(scope="module")
def results(tracking, fitted, synthetic_root, frame):
    """Model "parts": v1 with random weights (the worse, and @champion), v2 the default (a better
    candidate); each evaluated through MLflow, v1 by its alias."""
    worse = SpadeDetector(SpadeConfig(weights="random")).fit(read_train(synthetic_root))
    for detector in (worse, fitted):
        with mlflow.start_run():
            log_model(detector, name="model", registered_model_name="parts")
    MlflowClient().set_registered_model_alias("parts", "champion", "1")
    return {
        uri: mlflow.models.evaluate(uri, frame, model_type=MODEL_TYPE, evaluators=[EVALUATOR_NAME])
        for uri in ("models:/parts@champion", "models:/parts/2")
    }


def test_the_evaluator_logs_the_metrics_of_a_folder_evaluation_and_the_plots(results, fitted, synthetic_root):
    assert EVALUATOR_NAME in mlflow.models.list_evaluators()  # found through the entry point
    result = results["models:/parts/2"]
    folder = evaluate_samples(fitted, read_samples(synthetic_root)[::2])  # the same images, read from disk
    expected = {k: v for k, v in folder.metrics.items() if not k.startswith("seconds")}
    assert {k: result.metrics[k] for k in expected} == pytest.approx(expected, rel=1e-9)
    for kind in ("scratch", "spot", "contamination"):
        assert result.metrics[f"{kind}.aupro"] == pytest.approx(folder.per_type[kind]["aupro"], rel=1e-9)
    assert {"knn_image_auroc", "map_image_auroc", "stage2_share", "pixel_f1_threshold", "aupro"} <= set(result.metrics)
    regions = {"region_recall", "false_regions_per_normal_image", "false_regions_per_anomalous_image"}
    assert regions <= set(result.metrics) and {f"spot.{k}" for k in regions} <= set(result.metrics)
    assert 0.5 <= result.metrics["region_recall"] <= 1.0
    logged = {a.path for a in MlflowClient().list_artifacts(result.run_id, "plots")}
    assert logged == {"plots/image_roc.png", "plots/pro_curve.png", "plots/overlays.png"}
    assert result.artifacts["overlays"].content.size[0] > 0  # a real PNG behind the returned artifact


def test_metrics_are_linked_to_the_logged_model_and_the_dataset_even_through_an_alias(results, frame):
    client = MlflowClient()
    digest = mlflow.data.from_pandas(frame).digest
    for uri, result in results.items():
        model_id = registry.model_ref(uri).model_id
        linked = {m.key: m for m in client.get_logged_model(model_id).metrics if m.run_id == result.run_id}
        assert linked["aupro"].value == pytest.approx(result.metrics["aupro"])
        assert linked["aupro"].dataset_digest == digest


def test_validate_evaluation_results_passes_a_better_candidate_and_fails_a_worse_one(results):
    champion, candidate = results["models:/parts@champion"], results["models:/parts/2"]
    gate = {
        "aupro": MetricThreshold(min_absolute_change=0.001, greater_is_better=True),
        "image_auroc": MetricThreshold(threshold=0.9, greater_is_better=True),
    }
    mlflow.validate_evaluation_results(gate, candidate_result=candidate, baseline_result=champion)
    with pytest.raises(ModelValidationFailedException, match="aupro"):
        mlflow.validate_evaluation_results(gate, candidate_result=champion, baseline_result=candidate)


def test_image_level_labels_only_give_image_metrics_without_pixel_ones(results, frame):
    subset = frame.drop(columns="mask").iloc[::2].reset_index(drop=True)
    result = mlflow.models.evaluate(
        "models:/parts/2", subset, targets="label", model_type=MODEL_TYPE, evaluators=[EVALUATOR_NAME]
    )
    assert "image_auroc" in result.metrics and "knn_image_auroc" in result.metrics
    assert not {"pixel_auroc", "aupro", "scratch.aupro"} & set(result.metrics)
    assert set(result.artifacts) == {"image_roc", "overlays"}
    assert MlflowClient().get_run(result.run_id).data.tags["pixel_metrics"].startswith("absent")


def test_samples_from_a_frame_carry_labels_types_and_decoded_masks(frame):
    samples = samples_from_frame(frame, None)
    assert [s.defect_type for s in samples] == list(frame["defect_type"])
    assert all((s.mask is not None) == s.is_anomalous for s in samples)
    assert all(s.mask.any() for s in samples if s.is_anomalous)
    untyped = samples_from_frame(frame[["image", "label"]], None)
    assert {s.defect_type for s in untyped} == {"good", "anomalous"}


@pytest.mark.parametrize(
    ("columns", "labels", "message"),
    [
        ({"picture": [b"x"], "label": [1]}, None, r"lacks the column\(s\) \['image'\]"),
        ({"image": [b"x"]}, None, r"lacks the column\(s\) \['label'\]"),
        ({"image": [b"x"], "label": [0], "defect_type": ["crack"]}, None, "contradicts defect type 'crack'"),
        ({"image": [b"x"], "mask": ["not bytes"]}, np.array([1]), "expected encoded mask image bytes"),
        ({"image": [b"x"], "mask": [b"not a png"]}, np.array([1]), "row 0: the mask cannot be decoded"),
    ],
    ids=["no-image", "no-label", "label-vs-type", "mask-type", "mask-undecodable"],
)
def test_unusable_frames_are_clear_errors(columns, labels, message):
    with pytest.raises(MlflowException, match=message):
        samples_from_frame(pd.DataFrame(columns), labels)


def test_masks_for_only_some_anomalous_images_fail_before_any_work(fitted):
    mask = np.zeros((8, 8), dtype=bool)
    samples = [LabelledImage(b"a", "crack", mask), LabelledImage(b"b", "crack", None), LabelledImage(b"c", "good")]
    with pytest.raises(ValueError, match=r"1 anomalous test images have no mask \(row 1\)"):
        evaluate_samples(fitted, samples)


def test_evaluator_config_renames_columns_and_refuses_unknown_keys(results, frame):
    renamed = pd.concat([frame[frame["label"]].iloc[:1], frame[~frame["label"]].iloc[:2]])
    renamed = renamed.rename(columns={"image": "picture"}).reset_index(drop=True)
    result = mlflow.models.evaluate(
        "models:/parts/2", renamed, model_type=MODEL_TYPE, evaluators=EVALUATOR_NAME,
        evaluator_config={"image_col": "picture"},
    )  # fmt: skip
    assert "aupro" in result.metrics
    with pytest.raises(MlflowException, match=r"unknown evaluator_config keys \['image_column'\]"):
        mlflow.models.evaluate(
            "models:/parts/2", renamed, model_type=MODEL_TYPE, evaluators=EVALUATOR_NAME,
            evaluator_config={"image_column": "picture"},
        )  # fmt: skip


def test_a_model_of_another_flavor_is_refused(tracking, frame):
    with pytest.raises(MlflowException, match="evaluates mlflow_knn_anomaly models"):
        mlflow.models.evaluate(lambda df: df, frame.iloc[:2], model_type=MODEL_TYPE, evaluators=[EVALUATOR_NAME])
