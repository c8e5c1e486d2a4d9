"""A resample's figures, computed without resampling pixels, equal those of the resampled images."""

import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from mlflow_knn_anomaly.evaluation import bootstrap, metrics


@pytest.fixture
def validation():
    rng = np.random.default_rng(3)
    maps = [np.round(rng.random((12, 12)), 1) for _ in range(6)]  # rounded: ties across images
    masks = [np.zeros((12, 12), bool) for _ in range(6)]
    for mask, (r, c) in zip(masks[3:], [(2, 2), (6, 1), (1, 7)]):  # three anomalous images, two regions each
        mask[r : r + 3, c : c + 2] = True
        mask[9:11, 9:12] = True
    labels = np.array([False] * 3 + [True] * 3)
    return labels, np.round(rng.random(6), 1), maps, masks


PICK = np.array([0, 0, 2, 3, 5, 5, 5])  # image 1 and image 4 left out, others repeated


def test_resampled_image_and_pixel_auroc_equal_roc_auc_score_on_the_resampled_images(validation):
    labels, scores, maps, masks = validation
    counts = np.bincount(PICK, minlength=6)
    figures = bootstrap.ResampledFigures(labels, scores, maps, masks).figures(counts)
    assert figures["image_auroc"] == pytest.approx(roc_auc_score(labels[PICK], scores[PICK]), abs=1e-12)
    pixels = roc_auc_score(np.concatenate([masks[i].ravel() for i in PICK]),
                           np.concatenate([maps[i].ravel() for i in PICK]))  # fmt: skip
    assert figures["pixel_auroc"] == pytest.approx(pixels, abs=1e-12)


def test_resampled_aupro_equals_the_pro_curve_of_the_resampled_images(validation):
    _, _, maps, masks = validation
    resampled = bootstrap.ResampledPro(maps, masks)
    for pick in (PICK, np.arange(6), np.array([1, 1, 1, 4])):
        expected = metrics.aupro([masks[i] for i in pick], [maps[i] for i in pick])
        assert resampled.aupro(np.bincount(pick, minlength=6)) == pytest.approx(expected, abs=1e-12)
    with pytest.raises(ValueError, match="at least one anomalous region"):
        resampled.aupro(np.bincount([0, 1, 2], minlength=6))


def test_stratified_resamples_are_seeded_and_keep_both_kinds(validation):
    labels = validation[0]
    counts = bootstrap.stratified_counts(labels, 50, seed=0)
    assert all(c[~labels].sum() == 3 and c[labels].sum() == 3 for c in counts)
    assert all((a == b).all() for a, b in zip(counts, bootstrap.stratified_counts(labels, 50, seed=0)))
    assert any((a != b).any() for a, b in zip(counts, bootstrap.stratified_counts(labels, 50, seed=1)))
