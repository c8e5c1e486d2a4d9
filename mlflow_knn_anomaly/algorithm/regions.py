"""Defect regions read off a finished anomaly map (connected components at or above the pixel
threshold), their JSON encoding, and region-level recall and false regions against ground truth.

Components are 8-connected (a 3x3 structure): a diagonal scratch is one defect, which
4-connectivity would split into a chain of single pixels.
"""

from __future__ import annotations

import json
import math
import numbers
from dataclasses import asdict, dataclass, field

import numpy as np
from scipy import ndimage

_EIGHT_CONNECTED = np.ones((3, 3), dtype=bool)
_TYPES = {"x": int, "y": int, "width": int, "height": int, "area": int, "peak": (int, float)}
_EXPECTED = "a JSON list of objects with keys x, y, width, height, area (integers) and peak (number)"
# Defect sizes, as shares of the image's area: recall per bin (line cameras' defects are the smallest).
SIZE_BINS = (
    ("lt_0p05pct", 0.0, 0.0005),
    ("0p05_0p2pct", 0.0005, 0.002),
    ("0p2_1pct", 0.002, 0.01),
    ("ge_1pct", 0.01, math.inf),
)


@dataclass(frozen=True)
class Region:
    """One connected defect region of an image.

    Attributes:
        x, y: column and row of the bounding box's top-left pixel.
        width, height: bounding-box size in pixels.
        area: pixels in the connected component (<= width * height).
        peak: the region's highest map value divided by the pixel threshold (1.0 = the threshold).
    """

    x: int
    y: int
    width: int
    height: int
    area: int
    peak: float

    def to_dict(self) -> dict[str, int | float]:
        """The fields as a dict, keys in the order x, y, width, height, area, peak."""
        return asdict(self)


def min_area_pixels(min_region_area: float, height: int, width: int) -> int:
    """The smallest region kept, in pixels.

    Args:
        min_region_area: >= 1: pixels (rounded); in [0, 1): a share of the image's height * width.
        height: the image's height in pixels.
        width: the image's width in pixels.
    """
    if not isinstance(min_region_area, numbers.Real) or not math.isfinite(min_region_area) or min_region_area < 0:
        expected = "a finite number >= 0 (pixels when >= 1, a share of the image's area below 1)"
        raise ValueError(f"min_region_area must be {expected}; got {min_region_area!r}.")
    if min_region_area >= 1:
        return int(round(min_region_area))
    # Rounding first keeps float noise from adding a pixel: 0.07 * 100 is 7.000000000000001.
    return math.ceil(round(min_region_area * height * width, 6))


def find_regions(
    anomaly_map: np.ndarray, pixel_threshold: float, min_region_area: float = 0.0, roi: np.ndarray | None = None
) -> tuple[list[Region], np.ndarray]:
    """The 8-connected regions where the map reaches the pixel threshold.

    Args:
        anomaly_map: (H, W) anomaly map of one image.
        pixel_threshold: flag pixels with map >= this value; must be finite and > 0.
        min_region_area: smaller regions are dropped (see `min_area_pixels`).
        roi: optional (H, W) bool region of interest; pixels outside it are never flagged.

    Returns:
        The regions, highest peak first (ties: larger area, then top-most, then left-most), and the
        (H, W) bool mask of their pixels (dropped regions are absent from both).
    """
    amap = np.asarray(anomaly_map)
    if amap.ndim != 2:
        raise ValueError(f"anomaly_map must be a (H, W) array; got shape {amap.shape}.")
    if not math.isfinite(pixel_threshold) or pixel_threshold <= 0:
        raise ValueError(f"pixel_threshold must be a finite number > 0; got {pixel_threshold!r}.")
    min_px = min_area_pixels(min_region_area, *amap.shape)
    mask = amap >= pixel_threshold
    if roi is not None:
        roi = np.asarray(roi)
        if roi.shape != amap.shape or roi.dtype != bool:
            raise ValueError(f"roi must be a bool array of the map's shape {amap.shape}; got {roi.dtype} {roi.shape}.")
        mask &= roi

    labels, n = ndimage.label(mask, structure=_EIGHT_CONNECTED)
    if n == 0:
        return [], mask
    # Per-label figures from the flagged pixels only: ndimage.maximum is ~10x slower, and
    # maximum.at is only fast when both sides share a dtype (hence the float64 values).
    flagged = np.flatnonzero(labels)
    label_of = labels.ravel()[flagged]
    areas = np.bincount(label_of, minlength=n + 1)
    peaks = np.full(n + 1, -np.inf)
    np.maximum.at(peaks, label_of, amap.ravel()[flagged].astype(np.float64))
    keep = areas >= min_px
    keep[0] = False  # label 0 is the background
    ids = np.flatnonzero(keep)
    if ids.size == 0:
        return [], np.zeros_like(mask)
    if ids.size < n:
        mask = keep[labels]
    peaks /= pixel_threshold
    boxes = ndimage.find_objects(labels)
    regions = []
    for i in ids:  # one step per region, not per pixel
        rows, cols = boxes[i - 1]  # slices of Python ints
        width, height = cols.stop - cols.start, rows.stop - rows.start
        regions.append(Region(cols.start, rows.start, width, height, int(areas[i]), float(peaks[i])))
    regions.sort(key=lambda r: (-r.peak, -r.area, r.y, r.x))
    return regions, mask


def encode_regions(regions: list[Region]) -> str:
    """Compact JSON list of the regions (peak rounded to 4 decimals); "[]" for none."""
    items = [{**r.to_dict(), "peak": round(r.peak, 4)} for r in regions]
    return json.dumps(items, separators=(",", ":"))


def decode_regions(text: str) -> list[Region]:
    """The regions `encode_regions` wrote.

    Raises:
        ValueError: on "" (the image was not segmented) or text that is not `encode_regions` output.
    """
    if text == "":
        raise ValueError("empty regions: the image was not segmented (use segment='all' to force it).")
    try:
        items = json.loads(text)
    except (TypeError, json.JSONDecodeError) as err:
        raise ValueError(f"regions must be {_EXPECTED}; got unparsable text {text[:80]!r} ({err}).") from None
    if not isinstance(items, list):
        raise ValueError(f"regions must be {_EXPECTED}; got a JSON {type(items).__name__}.")
    return [_region_from(item, i) for i, item in enumerate(items)]


def _region_from(item: object, i: int) -> Region:
    if not isinstance(item, dict) or (missing := [k for k in _TYPES if k not in item]):
        what = f"missing keys {missing}" if isinstance(item, dict) else f"a {type(item).__name__}"
        raise ValueError(f"regions must be {_EXPECTED}; item {i} is {what}.")
    bad = [k for k, kind in _TYPES.items() if isinstance(item[k], bool) or not isinstance(item[k], kind)]
    if bad:
        raise ValueError(f"regions must be {_EXPECTED}; item {i} has {', '.join(f'{k}={item[k]!r}' for k in bad)}.")
    return Region(**{k: item[k] for k in _TYPES if k != "peak"}, peak=float(item["peak"]))


@dataclass(frozen=True)
class RegionCounts:
    """Region-level counts of one test image.

    Attributes:
        n_gt: ground-truth regions (8-connected components of the gt mask).
        n_found: of those, the ones the prediction found (see `region_counts`).
        n_pred: predicted regions (8-connected components of the predicted mask).
        n_false: of those, the ones that overlap no ground-truth pixel.
        gt_shares, gt_found: per ground-truth region, its share of the image's area and whether it
            was found.
    """

    n_gt: int
    n_found: int
    n_pred: int
    n_false: int
    gt_shares: tuple[float, ...] = field(default=(), compare=False)
    gt_found: tuple[bool, ...] = field(default=(), compare=False)


def region_counts(pred_mask: np.ndarray, gt_mask: np.ndarray, min_coverage: float = 0.3) -> RegionCounts:
    """Compare one image's predicted regions with its ground-truth regions.

    A ground-truth region is found when predicted pixels cover at least `min_coverage` of its area,
    or some single predicted region has IoU >= 0.5 with it. Coverage is the main rule because a thin
    scratch's predicted region is wider than the scratch, so its IoU stays low although it is found;
    IoU >= 0.5 implies coverage >= 0.5, so the IoU rule only adds findings when min_coverage > 0.5.

    Args:
        pred_mask: (H, W) bool, the predicted mask (the one `find_regions` returns).
        gt_mask: (H, W) bool, the ground-truth mask.
        min_coverage: share of a ground-truth region's pixels that must be predicted, in (0, 1].
    """
    _check_coverage(min_coverage)
    pred, gt = np.asarray(pred_mask, dtype=bool), np.asarray(gt_mask, dtype=bool)
    if pred.shape != gt.shape or pred.ndim != 2:
        raise ValueError(f"pred and gt masks must be (H, W) of one shape; got {pred.shape} and {gt.shape}.")
    gt_labels, n_gt = ndimage.label(gt, structure=_EIGHT_CONNECTED)
    pred_labels, n_pred = ndimage.label(pred, structure=_EIGHT_CONNECTED)
    # (n_gt + 1, n_pred + 1) pixel counts of every (gt label, pred label) pair; row/column 0 = outside.
    joint = np.bincount(
        gt_labels.ravel() * (n_pred + 1) + pred_labels.ravel(), minlength=(n_gt + 1) * (n_pred + 1)
    ).reshape(n_gt + 1, n_pred + 1)
    gt_area, pred_area = joint.sum(axis=1)[1:], joint.sum(axis=0)[1:]
    inter = joint[1:, 1:]
    coverage = inter.sum(axis=1) / np.maximum(gt_area, 1)
    found = coverage >= min_coverage
    if n_gt and n_pred:
        iou = inter / (gt_area[:, None] + pred_area[None, :] - inter)
        found |= iou.max(axis=1) >= 0.5
    n_false = int(np.count_nonzero(inter.sum(axis=0) == 0))
    shares = tuple(float(a) / gt.size for a in gt_area)
    return RegionCounts(n_gt, int(found.sum()), n_pred, n_false, shares, tuple(bool(f) for f in found))


def region_metrics(
    pred_masks: list[np.ndarray], gt_masks: list[np.ndarray], min_coverage: float = 0.3
) -> dict[str, float]:
    """Region-level recall and false regions over a test set (rules in `region_counts`).

    Args:
        pred_masks: per image, the (H, W) bool predicted mask.
        gt_masks: per image, the (H, W) bool ground truth (all False for a normal image).
        min_coverage: share of a ground-truth region that must be predicted for it to count as found.

    Returns:
        {"region_recall" (found / all gt regions; NaN without any), "false_regions_per_normal_image",
        "false_regions_per_anomalous_image" (means; NaN without such images), "n_gt_regions",
        "n_pred_regions", and the recall by defect size of `recall_by_size`}.
    """
    if len(pred_masks) != len(gt_masks):
        raise ValueError(f"need one predicted mask per gt mask; got {len(pred_masks)} and {len(gt_masks)}.")
    _check_coverage(min_coverage)
    counts = [region_counts(p, g, min_coverage) for p, g in zip(pred_masks, gt_masks)]
    n_gt = sum(c.n_gt for c in counts)
    normal = [c.n_false for c in counts if c.n_gt == 0]
    anomalous = [c.n_false for c in counts if c.n_gt > 0]
    return {
        "region_recall": sum(c.n_found for c in counts) / n_gt if n_gt else math.nan,
        "false_regions_per_normal_image": float(np.mean(normal)) if normal else math.nan,
        "false_regions_per_anomalous_image": float(np.mean(anomalous)) if anomalous else math.nan,
        "n_gt_regions": float(n_gt),
        "n_pred_regions": float(sum(c.n_pred for c in counts)),
        **recall_by_size(counts),
    }


def recall_by_size(counts: list[RegionCounts]) -> dict[str, float]:
    """Per `SIZE_BINS` bin: `n_gt_regions_<bin>`, and `region_recall_<bin>` where it holds any region."""
    shares = np.array([s for c in counts for s in c.gt_shares])
    found = np.array([f for c in counts for f in c.gt_found], dtype=bool)
    figures = {}
    for name, low, high in SIZE_BINS:
        inside = (shares >= low) & (shares < high)
        figures[f"n_gt_regions_{name}"] = float(inside.sum())
        if inside.any():
            figures[f"region_recall_{name}"] = float(found[inside].mean())
    return figures


def _check_coverage(min_coverage: float) -> None:
    if not 0 < min_coverage <= 1:
        raise ValueError(f"min_coverage must be a share of a region's area in (0, 1]; got {min_coverage!r}.")
