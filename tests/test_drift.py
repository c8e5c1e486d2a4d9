"""Drift statistics: what each image statistic measures, the KS figures, when a batch alerts, and
what a model keeps for monitoring (and what an older model falls back to)."""

import json

import numpy as np
import pytest
import torch
from PIL import Image, ImageEnhance, ImageFilter

from mlflow_knn_anomaly import SpadeDetector
from mlflow_knn_anomaly.algorithm.artifacts import BANK_DIR, CONFIG_FILE, sha256
from mlflow_knn_anomaly.algorithm.drift import NormalReference, drift_figures, image_statistics, reasons
from mlflow_knn_anomaly.config import MonitorLimits
from mlflow_knn_anomaly.evaluation.datasets import read_test


def _input(image: Image.Image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255).permute(2, 0, 1)


def test_each_statistic_moves_with_what_it_names(synthetic_root):
    image = Image.open(read_test(synthetic_root)[0].path).convert("RGB")
    base, darker, blurred, flat = image_statistics(
        [_input(image), _input(ImageEnhance.Brightness(image).enhance(0.7)),
         _input(image.filter(ImageFilter.GaussianBlur(2))), _input(Image.new("RGB", image.size, (90, 90, 90)))]
    )  # fmt: skip
    assert darker[0] == pytest.approx(0.7 * base[0], rel=0.02)  # brightness: the mean luma
    assert darker[1] == pytest.approx(base[1], rel=0.02)  # contrast and sharpness do not see a gain
    assert darker[2] == pytest.approx(base[2], rel=0.02)
    assert blurred[2] < 0.5 * base[2]  # sharpness: a blur of 2 px halves it or more
    assert blurred[0] == pytest.approx(base[0], rel=0.01)
    assert flat[0] == pytest.approx(90 / 255, abs=1e-4) and flat[1] == pytest.approx(0, abs=1e-6) and flat[2] == 0


def test_ks_figures_are_quiet_on_the_same_distribution_and_name_a_shift():
    rng = np.random.default_rng(0)
    reference = NormalReference(rng.normal(1, 0.1, 40), rng.normal([0.5, 0.2, 0.01], 0.01, (200, 3)))
    same = drift_figures(reference, rng.normal(1, 0.1, 10), rng.normal([0.5, 0.2, 0.01], 0.01, (10, 3)))
    assert min(same[f"{k}_p"] for k in ("score", "brightness", "contrast", "sharpness")) > 1e-3
    shifted = drift_figures(reference, rng.normal(1, 0.1, 10), rng.normal([0.65, 0.2, 0.01], 0.01, (10, 3)))
    assert shifted["brightness_ks"] == 1.0 and shifted["brightness_p"] < 1e-6
    assert shifted["brightness_change"] == pytest.approx(0.3, abs=0.02)
    figures = {**shifted, "anomalous_share": 0.0}
    (why,) = reasons(figures, 10, MonitorLimits())
    assert why.startswith("brightness drift: KS 1.00") and "median +29%" in why


def test_reasons_count_anomalies_and_small_batches_run_no_drift_test():
    figures = {"anomalous_share": 0.3, "score_p": 1e-9, "score_ks": 1.0, "score_change": 2.0}
    assert reasons(figures, 10, MonitorLimits()) == [
        "anomalous_share 0.30 > 0.1",
        "stage-1 score drift: KS 1.00, p=1.0e-09 < 0.001, median +200%",
    ]
    assert reasons(figures, 3, MonitorLimits()) == ["anomalous_share 0.30 > 0.1"]
    assert reasons({**figures, "anomalous_share": 0.1}, 3, MonitorLimits()) == []


@pytest.mark.parametrize(
    "limits, message",
    [({"p_value": 0}, "p_value=0 must be in"), ({"max_anomalous_share": 1.5}, "max_anomalous_share=1.5"),
     ({"min_images": 1}, "min_images=1 must be at least 2")],
)  # fmt: skip
def test_bad_limits_say_what_is_expected(limits, message):
    with pytest.raises(ValueError, match=message):
        MonitorLimits(**limits)


def test_a_model_keeps_what_monitoring_needs_and_an_older_one_falls_back(fitted, saved_detector, tmp_path):
    assert fitted.bank.statistics.shape == (fitted.bank.n_images, 3)
    reference = fitted.normal_reference()
    assert reference.statistics_of == "bank"
    np.testing.assert_array_equal(reference.scores, fitted.stage1_scores(fitted.holdout).astype(np.float64))
    loaded = SpadeDetector.load(saved_detector).normal_reference()
    np.testing.assert_array_equal(loaded.scores, reference.scores)
    np.testing.assert_array_equal(loaded.statistics, reference.statistics)
    # A model saved before monitoring: no bank statistics, no held-out scores.
    old = tmp_path / "old"
    old.mkdir()
    for path in saved_detector.rglob("*"):
        target = old / path.relative_to(saved_detector)
        if path.is_dir():
            target.mkdir(exist_ok=True)
        elif path.name != "statistics.npy":
            target.write_bytes(path.read_bytes())
    manifest = json.loads((old / BANK_DIR / "manifest.json").read_text())
    for key in ("shapes", "dtypes"):
        manifest[key].pop("statistics")
    (old / BANK_DIR / "manifest.json").write_text(json.dumps(manifest))
    record = json.loads((old / CONFIG_FILE).read_text())
    record["calibration"].pop("holdout_scores")
    record["sha256"] = {k: v for k, v in record["sha256"].items() if not k.endswith("statistics.npy")}
    record["sha256"][f"{BANK_DIR}/manifest.json"] = sha256(old / BANK_DIR / "manifest.json")
    (old / CONFIG_FILE).write_text(json.dumps(record))
    fallback = SpadeDetector.load(old).normal_reference()
    assert fallback.statistics_of == "holdout" and len(fallback.statistics) == len(fitted.holdout)
    np.testing.assert_allclose(fallback.scores, reference.scores, rtol=1e-6)
    np.testing.assert_allclose(fallback.statistics, fitted.image_statistics(fitted.holdout))
