import numpy as np
import pytest

from mlflow_knn_anomaly.evaluation import metrics


def test_image_auroc_hand_computed():
    # Pairs (anomalous, normal): (0.9>0.1) (0.9>0.8) (0.4>0.1) (0.4<0.8) -> 3 of 4.
    assert metrics.image_auroc([1, 1, 0, 0], [0.9, 0.4, 0.1, 0.8]) == pytest.approx(0.75)


def test_pixel_auroc_pools_all_pixels():
    masks = [np.array([[1, 0]]), np.array([[0, 0]])]
    maps = [np.array([[0.9, 0.2]]), np.array([[0.1, 0.95]])]
    # Anomalous pixel 0.9 beats normals 0.2 and 0.1, loses to 0.95 -> 2 of 3.
    assert metrics.pixel_auroc(masks, maps) == pytest.approx(2 / 3)


def test_aupro_hand_computed():
    # 10 normal pixels scored 0..9 and two regions: region A = {9.5, 9.5} is found before any
    # false positive; region B = {0.5} only once FPR reaches 0.9, beyond the 0.3 limit.
    # So PRO = 0.5 for every FPR in [0, 0.3] and AUPRO@0.3 = 0.5.
    mask = np.zeros((1, 15), dtype=bool)
    mask[0, 10:12] = True
    mask[0, 13] = True
    scores = np.zeros((1, 15))
    scores[0, :10] = np.arange(10)
    scores[0, 10:12] = 9.5
    scores[0, 12] = -1.0  # a normal pixel separating the regions
    scores[0, 13] = 0.5
    scores[0, 14] = -1.0
    curve = metrics.pro_curve([mask], [scores])
    assert curve.aupro == pytest.approx(0.5, abs=1e-3)
    assert curve.fpr[-1] == pytest.approx(0.3)


def test_aupro_perfect_and_inverted():
    mask = np.zeros((8, 8), dtype=bool)
    mask[2:4, 2:4] = True
    assert metrics.aupro([mask], [mask.astype(float)]) == pytest.approx(1.0)
    inverted = np.where(mask, 0.0, 1.0 + np.arange(64).reshape(8, 8))  # every normal pixel outranks it
    assert metrics.aupro([mask], [inverted]) == pytest.approx(0.0)


def test_aupro_needs_a_region():
    with pytest.raises(ValueError, match="at least one anomalous region"):
        metrics.aupro([np.zeros((2, 2), bool)], [np.zeros((2, 2))])


def test_f1_optimal_threshold_hand_computed():
    threshold, f1 = metrics.f1_optimal_threshold([0, 0, 1, 1, 0], [0.1, 0.2, 0.7, 0.9, 0.8])
    # t=0.7 flags 0.7, 0.8, 0.9: P=2/3, R=1 -> F1=0.8 (best; t=0.9 gives P=1, R=0.5 -> 0.667).
    assert threshold == pytest.approx(0.7) and f1 == pytest.approx(0.8)


def test_resizing_to_anomalib_resolution_keeps_the_region_in_place():
    mask = np.zeros((100, 300), bool)
    mask[40:60, 200:260] = True
    small = metrics.resize_mask(mask, 256)
    assert small.shape == (256, 256) and small.dtype == bool
    assert small[128, 196] and not small[128, 60]
    score = metrics.resize_map(mask.astype(np.float32), 256)
    assert score.shape == (256, 256)
    assert metrics.pixel_auroc([small], [score]) > 0.99
