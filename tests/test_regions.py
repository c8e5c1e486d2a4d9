import math

import numpy as np
import pytest

from mlflow_knn_anomaly.algorithm.regions import (
    Region,
    RegionCounts,
    decode_regions,
    encode_regions,
    find_regions,
    min_area_pixels,
    region_counts,
    region_metrics,
)


def two_blobs() -> np.ndarray:
    """A 10x12 map, threshold 2.0: a 2x3 blob (peak 3.0) and a 3x2 blob (peak 4.0)."""
    amap = np.zeros((10, 12), dtype=np.float32)
    amap[1:3, 1:4] = 2.0
    amap[2, 3] = 3.0
    amap[6:9, 7:9] = 4.0
    return amap


def test_two_blobs_give_exact_boxes_areas_and_peaks_highest_first():
    amap = two_blobs()
    regions, mask = find_regions(amap, 2.0)
    assert regions == [
        Region(x=7, y=6, width=2, height=3, area=6, peak=2.0),
        Region(x=1, y=1, width=3, height=2, area=6, peak=1.5),
    ]
    np.testing.assert_array_equal(mask, amap >= 2.0)
    assert mask.dtype == bool


def test_diagonal_pixels_form_one_region():
    amap = np.zeros((5, 5))
    amap[[0, 1, 2], [0, 1, 2]] = 1.0
    regions, _ = find_regions(amap, 1.0)
    assert regions == [Region(x=0, y=0, width=3, height=3, area=3, peak=1.0)]


def test_ties_break_by_area_then_top_then_left():
    amap = np.zeros((8, 8))
    amap[0, 5] = 1.0  # single pixel, top right
    amap[5:7, 0:2] = 1.0  # 4 pixels: larger, listed first
    amap[0, 0] = 1.0  # single pixel, top left
    amap[3, 3] = 1.0  # single pixel, lower
    regions, _ = find_regions(amap, 1.0)
    assert [(r.x, r.y, r.area) for r in regions] == [(0, 5, 4), (0, 0, 1), (5, 0, 1), (3, 3, 1)]


@pytest.mark.parametrize("min_region_area", [2, 2.4, 0.02, 0.06])  # 100 pixels: shares give 2 and 6 pixels
def test_min_region_area_drops_speck_from_regions_and_mask(min_region_area):
    amap = np.zeros((10, 10))
    amap[1:3, 1:4] = 5.0  # 6 pixels, kept (6 >= 6 too)
    amap[8, 8] = 9.0  # 1-pixel speck with the highest value
    regions, mask = find_regions(amap, 1.0, min_region_area)
    assert regions == [Region(x=1, y=1, width=3, height=2, area=6, peak=5.0)]
    assert not mask[8, 8]
    assert mask.sum() == 6


def test_min_region_area_larger_than_every_region_leaves_nothing():
    amap = two_blobs()
    regions, mask = find_regions(amap, 2.0, 7)
    assert regions == []
    assert mask.shape == amap.shape and not mask.any()


def test_roi_excludes_a_blob():
    amap = two_blobs()
    roi = np.ones(amap.shape, dtype=bool)
    roi[5:, 6:] = False
    regions, mask = find_regions(amap, 2.0, roi=roi)
    assert regions == [Region(x=1, y=1, width=3, height=2, area=6, peak=1.5)]
    assert not mask[5:, 6:].any()


def test_no_region_encodes_as_empty_list():
    regions, mask = find_regions(np.zeros((4, 4)), 1.0)
    assert regions == [] and not mask.any()
    assert encode_regions(regions) == "[]"
    assert decode_regions("[]") == []


@pytest.mark.parametrize(
    "kwargs",
    [{"pixel_threshold": 0.0}, {"pixel_threshold": math.nan}, {"roi": np.ones((3, 3), dtype=bool)}],
)
def test_find_regions_rejects_bad_inputs(kwargs):
    args = {"anomaly_map": np.zeros((4, 4)), "pixel_threshold": 1.0, **kwargs}
    with pytest.raises(ValueError):
        find_regions(**args)


def test_min_area_pixels_reads_pixels_and_shares():
    assert min_area_pixels(3.6, 10, 10) == 4
    assert min_area_pixels(0.0, 10, 10) == 0
    assert min_area_pixels(0.07, 10, 10) == 7  # not 8, though 0.07 * 100 = 7.000000000000001
    assert min_area_pixels(0.045, 10, 10) == 5  # 4.5 pixels, ceil'd


@pytest.mark.parametrize("bad", [-1, -0.1, math.nan, math.inf, "5"])
def test_invalid_min_region_area_raises(bad):
    with pytest.raises(ValueError, match="min_region_area"):
        min_area_pixels(bad, 10, 10)
    with pytest.raises(ValueError, match="min_region_area"):
        find_regions(np.zeros((4, 4)), 1.0, bad)


def test_encode_is_compact_ordered_and_rounds_peak():
    text = encode_regions([Region(x=1, y=2, width=3, height=4, area=5, peak=1.234567)])
    assert text == '[{"x":1,"y":2,"width":3,"height":4,"area":5,"peak":1.2346}]'


def test_encode_decode_round_trip():
    regions, _ = find_regions(two_blobs(), 2.0)
    assert decode_regions(encode_regions(regions)) == regions
    odd = [Region(x=0, y=0, width=1, height=1, area=1, peak=1.0 / 3)]
    assert decode_regions(encode_regions(odd))[0].peak == pytest.approx(0.3333)


def test_decode_of_empty_text_says_not_segmented():
    with pytest.raises(ValueError, match=r"not segmented \(use segment='all' to force it\)"):
        decode_regions("")


@pytest.mark.parametrize(
    "text",
    [
        "[{",  # not JSON
        '{"x": 1}',  # not a list
        "[1]",  # not an object
        '[{"x":1,"y":2,"width":3,"height":4,"area":5}]',  # no peak
        '[{"x":1.5,"y":2,"width":3,"height":4,"area":5,"peak":1}]',  # x not an integer
    ],
)
def test_decode_of_malformed_text_raises(text):
    with pytest.raises(ValueError, match="JSON list of objects with keys x, y, width, height, area"):
        decode_regions(text)


def test_region_metrics_hand_computed():
    # Anomalous image: gt A is a thin vertical scratch (column 2, rows 1..8: 8 pixels); the
    # predicted region is wider (columns 1..3, rows 1..4: 12 pixels) and covers 4 of its 8 pixels:
    # coverage 0.5 >= 0.3 -> found, though IoU = 4 / (8 + 12 - 4) = 0.25. Gt B (2x2) is missed.
    gt_a = np.zeros((10, 10), dtype=bool)
    gt_a[1:9, 2] = True
    gt_a[8:10, 7:9] = True
    pred_a = np.zeros((10, 10), dtype=bool)
    pred_a[1:5, 1:4] = True
    # Normal image 1: one false region; normal image 2: nothing predicted.
    pred_n1 = np.zeros((10, 10), dtype=bool)
    pred_n1[5, 5:7] = True
    empty = np.zeros((10, 10), dtype=bool)

    assert region_counts(pred_a, gt_a) == RegionCounts(n_gt=2, n_found=1, n_pred=1, n_false=0)
    figures = region_metrics([pred_a, pred_n1, empty], [gt_a, empty, empty])
    assert figures == {
        "region_recall": 0.5,
        "false_regions_per_normal_image": 0.5,  # (1 + 0) / 2
        "false_regions_per_anomalous_image": 0.0,
        "n_gt_regions": 2.0,
        "n_pred_regions": 2.0,
        # by size: the scratch (8 of 100 pixels) and the blob (4) are both >= 1 % of the image
        "n_gt_regions_lt_0p05pct": 0.0,
        "n_gt_regions_0p05_0p2pct": 0.0,
        "n_gt_regions_0p2_1pct": 0.0,
        "n_gt_regions_ge_1pct": 2.0,
        "region_recall_ge_1pct": 0.5,
    }
    # With IoU alone (coverage rule out of reach), the scratch is missed.
    assert region_metrics([pred_a], [gt_a], min_coverage=1.0)["region_recall"] == 0.0


def test_region_found_by_iou_when_coverage_rule_is_strict():
    # gt: 4 pixels; pred: 3 of them plus 1 outside -> coverage 0.75, IoU 3 / 5 = 0.6 >= 0.5.
    gt = np.zeros((4, 6), dtype=bool)
    gt[1, 1:5] = True
    pred = np.zeros((4, 6), dtype=bool)
    pred[1, 2:6] = True
    assert region_counts(pred, gt, min_coverage=0.9).n_found == 1
    pred[1, 2] = False  # 2 of 4 covered, IoU 2 / 5 = 0.4
    assert region_counts(pred, gt, min_coverage=0.9).n_found == 0


def test_region_metrics_nan_without_gt_regions_or_image_kinds():
    pred = np.zeros((3, 3), dtype=bool)
    pred[0, 0] = True
    figures = region_metrics([pred], [np.zeros((3, 3), dtype=bool)])
    assert math.isnan(figures["region_recall"])
    assert math.isnan(figures["false_regions_per_anomalous_image"])
    assert figures["false_regions_per_normal_image"] == 1.0


def test_region_metrics_rejects_mismatched_inputs():
    with pytest.raises(ValueError):
        region_metrics([np.zeros((3, 3), dtype=bool)], [])
    with pytest.raises(ValueError):
        region_metrics([np.zeros((3, 3), dtype=bool)], [np.zeros((3, 4), dtype=bool)])
    with pytest.raises(ValueError, match="min_coverage"):
        region_metrics([], [], min_coverage=0.0)


def test_recall_is_binned_by_the_defect_share_of_the_image():
    # A 100 x 100 image: defects of 4 px (0.04 %), 10 px (0.1 %), 50 px (0.5 %) and 200 px (2 %).
    gt = np.zeros((100, 100), dtype=bool)
    gt[0, 0:4] = True
    gt[10, 0:10] = True
    gt[20:25, 0:10] = True
    gt[40:60, 0:10] = True
    pred = np.zeros_like(gt)
    pred[10, 0:10] = True  # only the 0.1 % defect is found
    pred[40:42, 0:10] = True  # 20 of 200 px: 10 %, under the 30 % coverage rule
    figures = region_metrics([pred], [gt])
    assert [figures[f"n_gt_regions_{b}"] for b in ("lt_0p05pct", "0p05_0p2pct", "0p2_1pct", "ge_1pct")] == [1, 1, 1, 1]
    assert figures["region_recall_lt_0p05pct"] == 0.0 and figures["region_recall_0p05_0p2pct"] == 1.0
    assert figures["region_recall_0p2_1pct"] == 0.0 and figures["region_recall_ge_1pct"] == 0.0
    assert figures["region_recall"] == 0.25
