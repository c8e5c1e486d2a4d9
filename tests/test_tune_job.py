"""The `tune` job through MLflow: nested candidate runs, the choice registered with its `tune.*`
tags and evaluated on the test split only, no test image read before that, and a line tuned
category by category."""

import builtins
import json
import pathlib

import numpy as np
import PIL.Image
import pytest

from mlflow_knn_anomaly import SpadeConfig, SpadeDetector
from mlflow_knn_anomaly.config import TuneSettings
from mlflow_knn_anomaly.evaluation import tuning
from mlflow_knn_anomaly.evaluation.datasets import make_synthetic, read_train
from mlflow_knn_anomaly.mlops import registry, tune_job

SETTINGS = {"resize", "feature_pool", "score_fusion"}


def _part(root, seed):
    return make_synthetic(root, seed=seed, n_train=20, n_test_good=17, n_per_defect=6, size=96)


def _sealed(monkeypatch, paths):
    """Reading any of `paths` fails until `tune_job.jobs.evaluate` (the final evaluation) starts."""
    sealed = {str(p.resolve()) for p in paths}
    state = {"open": False}

    def guard(target):
        if (
            not state["open"]
            and isinstance(target, (str, pathlib.Path))
            and str(pathlib.Path(target).resolve()) in sealed
        ):
            raise PermissionError(f"{target} is in the test split: read before the final evaluation")

    real_open, real_image_open, real_read_bytes = builtins.open, PIL.Image.open, pathlib.Path.read_bytes
    monkeypatch.setattr(builtins, "open", lambda f, *a, **k: (guard(f), real_open(f, *a, **k))[1])
    monkeypatch.setattr(PIL.Image, "open", lambda f, *a, **k: (guard(f), real_image_open(f, *a, **k))[1])
    monkeypatch.setattr(pathlib.Path, "read_bytes", lambda self: (guard(self), real_read_bytes(self))[1])
    evaluate = tune_job.jobs.evaluate

    def final(*args, **kwargs):
        state["open"] = True
        return evaluate(*args, **kwargs)

    monkeypatch.setattr(tune_job.jobs, "evaluate", final)
    return state


def test_tune_compares_candidates_registers_the_choice_and_reads_no_test_image_before_the_end(
    tracking, tmp_path, monkeypatch
):
    # The real grid's shape (two input sizes, two poolings, two fusions) at test-sized inputs.
    monkeypatch.setattr(tuning, "GRID", {"resize": (128, 192), "feature_pool": (3, 1), "score_fusion": ("mean", "map")})
    part = _part(tmp_path / "disc", 2)
    split = tuning.split_test(part, 0.3, seed=0)
    test_files = [s.path for s in split.test] + [s.mask_path for s in split.test if s.mask_path]
    state = _sealed(monkeypatch, test_files)
    result = tune_job.tune(str(part), "disc", SpadeConfig(resize=128))
    assert state["open"]  # the final evaluation ran, and nothing of the test split was read before it
    assert result["version"] == "1" and set(result["choices"]["disc"]) == SETTINGS
    (parent,) = tracking.search_runs(["0"], filter_string="tags.mlflow.runName = 'tune'")
    children = tracking.search_runs(["0"], filter_string=f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
    candidates = [c for c in children if c.info.run_name.startswith("candidate")]
    # Staged: every pooling and fusion at 128, then 192 with the pooling 128 preferred: 3 builds, not 4.
    assert len(candidates) == 6
    assert len({(c.data.params["resize"], c.data.params["feature_pool"]) for c in candidates}) == 3
    for child in candidates:
        assert set(child.data.params) >= SETTINGS and "val.aupro" in child.data.metrics
        assert ("bootstrap_win_rate" in child.data.metrics) == (child.data.params["is_default"] == "False")
    assert sum(c.data.tags["tune.chosen"] == "true" for c in candidates) == 1
    tags = tracking.get_model_version("disc", "1").tags
    assert tags["tune.validation_digest"] == split.digest
    assert json.loads(tags["tune.settings"]) == result["choices"]["disc"]
    assert tags["tune.validation.validation_defects"] == "6" and tags["tune.validation.test_images"] == "24"
    for metric in ("image_auroc", "aupro"):
        assert float(tags[f"tune.default.{metric}"]) == pytest.approx(
            result["test"]["disc"]["default"][metric], abs=1e-6
        )
        assert tags[f"tune.tuned.{metric}"] == tags[f"eval.{metric}"]  # the evaluator's figures on the test split
    assert registry.promote("disc", "1", "aupro", 0.0).promoted  # a version like any other


def test_a_line_is_tuned_per_category_and_promote_compares_it_with_the_champion(tracking, tmp_path, monkeypatch):
    monkeypatch.setattr(tuning, "GRID", {"resize": (128,), "feature_pool": (3, 1), "score_fusion": ("mean",)})
    _part(tmp_path / "plant" / "disc", 2)
    _part(tmp_path / "plant" / "ring", 3)
    thin = TuneSettings(min_images=50)  # too few validation images: the defaults are kept
    result = tune_job.tune(str(tmp_path / "plant"), "plant", SpadeConfig(resize=128), thin)
    default = {"resize": 128, "feature_pool": 3, "score_fusion": "mean"}
    assert result["choices"] == {"disc": default, "ring": default}
    tags = tracking.get_model_version("plant", result["version"]).tags
    assert tags["line.categories"] == "disc,ring"
    for category in ("disc", "ring"):
        assert "fewer than min_images=50" in tags[f"tune.{category}.reason"]
        assert tags[f"tune.{category}.tuned.aupro"] == tags[f"eval.{category}.aupro"]
        assert tags[f"tune.{category}.default.aupro"] == tags[f"tune.{category}.tuned.aupro"]
    assert registry.promote("plant", result["version"], "aupro", 0.0).promoted
    again = tune_job.tune(str(tmp_path / "plant"), "plant", SpadeConfig(resize=128), thin)
    champion = tracking.get_model_version("plant", result["version"]).tags
    assert (
        champion["eval.data_digest"] == tracking.get_model_version("plant", again["version"]).tags["eval.data_digest"]
    )
    decision = registry.promote("plant", again["version"], "aupro", 0.0)  # the same split: comparable
    assert not decision.promoted and "eval" not in decision.reason.lower()[:20]


def test_shared_backbone_outputs_give_the_same_model_as_a_fit_of_its_own(tmp_path):
    images = read_train(_part(tmp_path / "disc", 4))[:12]
    config = SpadeConfig(resize=128)
    shared = tune_job.SharedFeatures(SpadeDetector(config).backbone)
    SpadeDetector(config, backbone=shared).fit(images)  # feature_pool=3 fills the kept outputs
    reused = SpadeDetector(config.replace(feature_pool=1), backbone=shared).fit(images)
    alone = SpadeDetector(config.replace(feature_pool=1)).fit(images)
    for layer, rows in alone.bank.features.items():
        np.testing.assert_array_equal(reused.bank.features[layer], rows)
    assert reused.calibration == alone.calibration
