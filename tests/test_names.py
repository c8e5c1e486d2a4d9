"""A user's folder names reach MLflow keys by one rule (issue 35): defect types and categories with
`+`, parentheses, `&`, `#`, spaces, dots, non-ASCII letters or a reserved name are evaluated,
monitored, tuned and promoted, and `names.json` maps every key part back to its name."""

import json
import shutil
from pathlib import Path

import mlflow
import pytest
from mlflow import MlflowClient

from mlflow_knn_anomaly import SpadeConfig
from mlflow_knn_anomaly.config import TuneSettings
from mlflow_knn_anomaly.evaluation import tuning
from mlflow_knn_anomaly.evaluation.datasets import make_synthetic
from mlflow_knn_anomaly.mlops import jobs, monitoring, tune_job
from mlflow_knn_anomaly.mlops.names import check_keys, key_part

SMALL = SpadeConfig(k_images=3, batch_size=4)
AWKWARD = (
    "chip_around_edge_and_corner+small_cracks",
    "crack (hair) & #2",
    "défaut.rayure",
    "mean",
    "a" * 140,
)


def _renamed_defects(root: Path, names: tuple[str, str, str]) -> Path:
    """The synthetic set's three defect types renamed (test and ground_truth folders)."""
    for old, new in zip(("scratch", "spot", "contamination"), names):
        for split in ("test", "ground_truth"):
            (root / split / old).rename(root / split / new)
    return root


def test_plain_names_are_kept_and_every_other_name_gets_a_distinct_valid_part():
    assert key_part("broken_large") == "broken_large" and key_part("bent-lead2") == "bent-lead2"
    parts = [key_part(n) for n in (*AWKWARD, "a+b", "a&b", "a_b", "a b", "A+B")]
    assert len(set(parts)) == len(parts)
    for name, part in zip(AWKWARD, parts):
        assert part != name and "." not in part and len(part) <= 109
    assert key_part("a+b") == key_part("a+b")  # a rule, not a counter: the same name, the same key
    check_keys([f"{p}.{q}.stage2_share_anomalous" for p in parts for q in parts], "test")


def test_keys_that_mlflow_would_refuse_fail_before_any_work():
    with pytest.raises(ValueError, match=r"evaluation data: MLflow cannot log.*Rename"):
        check_keys(["ok.image_auroc", "a+b.image_auroc"], "evaluation data")
    with pytest.raises(ValueError, match="at most 250"):
        check_keys(["x" * 251], "evaluation data")


def test_evaluate_and_tune_on_defect_types_mlflow_cannot_name(tracking, tmp_path, monkeypatch):
    names = AWKWARD[:3]
    data = _renamed_defects(make_synthetic(tmp_path / "part", seed=5, n_train=20, n_test_good=9, n_per_defect=4,
                                           size=96), names)  # fmt: skip
    _, version = jobs.build_bank(str(data), SMALL, "part")
    figures = jobs.evaluate(f"models:/part/{version}", str(data))
    for name in names:
        assert f"{key_part(name)}.image_auroc" in figures and f"{key_part(name)}.aupro" in figures
    run_id = tracking.get_model_version("part", version).tags["eval.run_id"]
    table = mlflow.artifacts.load_dict(f"runs:/{run_id}/names.json")
    assert table["defect_types"] == {key_part(n): n for n in ("good", *names)}
    assert f"{key_part(names[0])}.image_auroc" in tracking.get_run(run_id).data.metrics

    monkeypatch.setattr(tuning, "GRID", {"resize": (96,), "feature_pool": (3, 1), "score_fusion": ("mean",)})
    result = tune_job.tune(str(data), "tuned", SMALL.replace(resize=96), TuneSettings(min_images=5))
    assert "tune.tuned.aupro" in tracking.get_model_version("tuned", result["version"]).tags


def test_a_line_of_awkward_category_names_builds_evaluates_promotes_and_is_monitored(tracking, tmp_path):
    root = tmp_path / "plant"
    categories = ("bolt+nut (M8)", "mean")
    for seed, name in enumerate(categories):
        make_synthetic(root / name, seed=seed, n_train=14, n_test_good=3, n_per_defect=2, size=96)
    decision = jobs.lifecycle(str(root), SMALL, "line", "aupro", 0.0)
    assert decision.promoted
    tags = tracking.get_model_version("line", "1").tags
    assert tags["line.categories"] == ",".join(key_part(c) for c in categories)
    for name in categories:
        assert f"eval.{key_part(name)}.aupro" in tags
    run = tracking.get_run(tags["eval.run_id"])
    assert "mean.aupro" in run.data.metrics and f"{key_part('mean')}.aupro" in run.data.metrics
    table = mlflow.artifacts.load_dict(f"runs:/{run.info.run_id}/names.json")
    assert table["categories"] == {key_part(c): c for c in categories}

    batch = tmp_path / "today"
    for name in categories:
        shutil.copytree(root / name / "test" / "good", batch / name)
    found = monitoring.monitor("models:/line@champion", str(batch))
    assert any(key.startswith(f"{key_part(categories[0])}.") for key in found["figures"])
    (monitored,) = MlflowClient().search_runs(
        [mlflow.get_experiment_by_name("line-monitoring").experiment_id], max_results=1
    )
    assert f"monitor.{key_part(categories[0])}.anomalous_share" in monitored.data.metrics
    assert json.loads(json.dumps(found["figures"]))  # plain figures, loggable as they are
