"""Stage 2 searched exhaustively only where it matters: the bounds hold, and what predict reports
is the exhaustive search's."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mlflow_knn_anomaly import SpadeConfig, SpadeDetector
from mlflow_knn_anomaly.algorithm.knn import pixel_knn
from mlflow_knn_anomaly.algorithm.refine import window_bounds
from mlflow_knn_anomaly.evaluation.datasets import read_test, read_train


def _exact(fmap: torch.Tensor, gallery: torch.Tensor, kappa: int) -> torch.Tensor:
    c = fmap.shape[0]
    return pixel_knn(fmap.permute(1, 2, 0).reshape(-1, c), gallery, kappa)


@pytest.mark.parametrize("kappa", [1, 3])
def test_window_bounds_never_undercut_the_exhaustive_search(kappa):
    generator = torch.Generator().manual_seed(0)
    fmap = torch.rand(8, 6, 5, generator=generator)
    images = [torch.rand(30, 8, generator=generator) for _ in range(3)]
    images.append(torch.rand(12, 8, generator=generator))  # another size: no window, still in the gallery
    gallery = torch.cat(images)
    rows = np.array([len(x) for x in images])
    bound = window_bounds(fmap, gallery, rows, kappa)
    exact = _exact(fmap, gallery, kappa)
    assert bound.shape == exact.shape
    assert (bound >= exact - 1e-5).all()
    assert (bound > exact + 1e-3).any()  # random features: the window does not always hold the nearest


def test_a_window_holding_the_query_itself_bounds_it_exactly():
    fmap = torch.rand(4, 5, 7, generator=torch.Generator().manual_seed(1))
    same_place = fmap.permute(1, 2, 0).reshape(-1, 4)
    bound = window_bounds(fmap, same_place, np.array([35]), kappa=1)
    np.testing.assert_allclose(bound.numpy(), 0.0, atol=1e-6)


def test_no_gallery_image_of_the_query_size_gives_no_bound():
    fmap = torch.rand(4, 5, 7)
    assert window_bounds(fmap, torch.rand(20, 4), np.array([20]), kappa=1) is None


@pytest.fixture(scope="module")
def pair(synthetic_root):
    """The same fitted detector with the refined (default) and the exhaustive stage 2."""
    refined = SpadeDetector(SpadeConfig(k_images=3)).fit(read_train(synthetic_root))
    exact = SpadeDetector(refined.config.replace(exact_maps=True), backbone=refined.backbone)
    exact.use_bank(refined.bank)
    exact.calibration, exact.holdout = refined.calibration, refined.holdout
    return refined, exact


@pytest.mark.parametrize("pixel_threshold", [None, 0.5])  # the calibrated one, and a low override
def test_without_maps_predict_reports_what_the_exhaustive_search_reports(pair, synthetic_root, pixel_threshold):
    refined, exact = pair
    paths = [s.path for s in read_test(synthetic_root)][::3]  # normal and anomalous images
    a = refined.predict(paths, segment="all", pixel_threshold=pixel_threshold, return_maps=False)
    b = exact.predict(paths, segment="all", pixel_threshold=pixel_threshold)
    # The same top-share values, summed in another order (np.partition's): within float64 rounding.
    np.testing.assert_allclose(a.scores, b.scores, rtol=1e-6)
    np.testing.assert_array_equal(a.is_anomalous, b.is_anomalous)
    assert all(m is None for m in a.anomaly_maps)
    for mask_a, mask_b in zip(a.masks, b.masks, strict=True):
        np.testing.assert_array_equal(mask_a, mask_b)  # bit for bit: see knn.ROW_ALIGN
    assert [[(r.x, r.y, r.width, r.height) for r in x] for x in a.regions] == [
        [(r.x, r.y, r.width, r.height) for r in x] for x in b.regions
    ]


def test_the_refined_map_is_exact_where_it_reaches_the_threshold_and_a_bound_elsewhere(pair, synthetic_root):
    refined, exact = pair
    threshold = 0.5 * refined.calibration.pixel_threshold  # low: the maps reach it over large areas
    for sample in read_test(synthetic_root)[::3]:
        inputs, geometries = refined._prepare([sample.path])
        pooled, features = refined.extract(inputs)
        _, nn_indices = refined.stage1(pooled)
        size = geometries[0].input_shape
        bounded, _ = refined.refined_stage2(features[0], nn_indices[0], size, threshold)
        full = exact.stage2(features[0], nn_indices[0], size)
        reached = full >= threshold
        np.testing.assert_allclose(bounded[reached], full[reached], rtol=1e-4)
        assert (bounded >= full - 1e-3 * threshold).all()


def test_a_returned_map_is_always_exact(pair, synthetic_root, monkeypatch):
    refined, exact = pair
    from mlflow_knn_anomaly.algorithm import refine

    path = read_test(synthetic_root)[-1].path
    expected = exact.predict([path], segment="all").anomaly_maps[0]
    monkeypatch.setattr(refine, "refined_map", lambda *a, **k: pytest.fail("a returned map must be searched whole"))
    np.testing.assert_array_equal(refined.predict([path], segment="all").anomaly_maps[0], expected)


def test_a_normal_image_skips_most_of_the_exhaustive_search(pair, synthetic_root):
    refined, _ = pair
    normal = next(s.path for s in read_test(synthetic_root) if not s.is_anomalous)
    inputs, geometries = refined._prepare([normal])
    pooled, features = refined.extract(inputs)
    _, nn_indices = refined.stage1(pooled)
    size = geometries[0].input_shape
    _, searched = refined.refined_stage2(features[0], nn_indices[0], size, refined.calibration.pixel_threshold)
    assert set(searched) == set(refined.config.pyramid)
    assert searched[refined.config.pyramid[0]] < 0.5  # the finest layer: most of stage 2's work


def test_exact_maps_searches_every_pixel(pair, synthetic_root, monkeypatch):
    _, exact = pair
    from mlflow_knn_anomaly.algorithm import refine

    monkeypatch.setattr(refine, "refined_map", lambda *a, **k: pytest.fail("exact_maps=True must not refine"))
    exact.predict([read_test(synthetic_root)[0].path], segment="all", return_maps=False)
