"""Evaluate a fitted detector on an MVTec-layout test set (no MLflow here).

Sets with pixel masks (<root>/ground_truth) get image and pixel metrics; sets with image-level
labels only get the image metrics, and their pixel metrics are absent (not an error).
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from . import metrics
from .datasets import TestSample, has_masks, read_test
from .spade import SpadeDetector

ANOMALIB_SIZE = 256
PIXEL_METRICS = ("pixel_auroc", "aupro", "pixel_f1_threshold", "pixel_f1", "pixel_auroc_256", "aupro_256")


@dataclass(frozen=True)
class Evaluation:
    """Metrics of one test set.

    Attributes:
        metrics: headline figures: image_auroc (the reported score), knn_image_auroc (stage 1
            alone), map_image_auroc (every image scored by its map), the F1-optimal thresholds,
            the stage-2 shares and, with masks, the pixel metrics of `PIXEL_METRICS`.
        per_type: {defect type: the same figures, that type's images plus the normal ones}.
        samples: the test samples, in order; scores, knn_scores and map_scores (N,): as reported, of
            stage 1, and of the anomaly map.
        anomaly_maps: (H_i, W_i) per sample. gt_masks and pro: None without masks.
    """

    metrics: dict[str, float]
    per_type: dict[str, dict[str, float]]
    samples: list[TestSample]
    scores: np.ndarray
    knn_scores: np.ndarray
    map_scores: np.ndarray
    anomaly_maps: list[np.ndarray]
    gt_masks: list[np.ndarray] | None
    pro: metrics.ProCurve | None

    @property
    def has_masks(self) -> bool:
        return self.gt_masks is not None


def evaluate(
    detector: SpadeDetector, root: str | Path, progress: bool = False, per_type_pixels: bool = True
) -> Evaluation:
    """Score and segment every test image of `root` and compute the metrics.

    Every image is segmented (segment="all"), so that the pixel metrics cover all of them and the
    map score of every image is known; the image score is the one the product reports in
    segment="auto" mode. Pixel metrics are at each image's own resolution, and also (`*_256`) with
    maps and masks resized to 256 x 256 as anomalib evaluates them. Without `per_type_pixels` the
    per-type figures leave out the pixel metrics (each a pass over every pixel).
    """
    samples = read_test(root)
    start = time.perf_counter()
    prediction = detector.predict([s.path for s in samples], segment="all", progress=progress)
    seconds = time.perf_counter() - start
    maps = prediction.anomaly_maps
    labels = np.array([s.is_anomalous for s in samples])
    gt = [s.mask(m.shape[1], m.shape[0]) for s, m in zip(samples, maps)] if has_masks(root) else None
    headline = _figures(labels, prediction.scores, gt, maps)
    if gt is not None:
        headline.update(_anomalib_protocol(gt, maps))
    headline["knn_image_auroc"] = metrics.image_auroc(labels, prediction.knn_scores)
    headline["map_image_auroc"] = metrics.image_auroc(labels, prediction.map_scores)
    headline["stage2_share"] = float(np.mean(prediction.candidates))
    headline["stage2_share_normal"] = float(np.mean(prediction.candidates[~labels]))
    headline["stage2_share_anomalous"] = float(np.mean(prediction.candidates[labels]))
    headline["seconds_per_image_all_segmented"] = seconds / len(samples)
    per_type = {}
    for kind in sorted({s.defect_type for s in samples} - {"good"}):
        keep = [i for i, s in enumerate(samples) if s.defect_type in (kind, "good")]
        per_type[kind] = _figures(
            labels[keep],
            prediction.scores[keep],
            [gt[i] for i in keep] if gt is not None and per_type_pixels else None,
            [maps[i] for i in keep],
        )
    return Evaluation(
        metrics=headline,
        per_type=per_type,
        samples=samples,
        scores=prediction.scores,
        knn_scores=prediction.knn_scores,
        map_scores=prediction.map_scores,
        anomaly_maps=maps,
        gt_masks=gt,
        pro=None if gt is None else metrics.pro_curve(gt, maps),
    )


def _anomalib_protocol(gt: list[np.ndarray], maps: list[np.ndarray]) -> dict[str, float]:
    """Pixel metrics with maps and masks squashed to 256 x 256, as anomalib evaluates them."""
    gt_256 = [metrics.resize_mask(g, ANOMALIB_SIZE) for g in gt]
    maps_256 = [metrics.resize_map(m, ANOMALIB_SIZE) for m in maps]
    return {"pixel_auroc_256": metrics.pixel_auroc(gt_256, maps_256), "aupro_256": metrics.aupro(gt_256, maps_256)}


def _figures(
    labels: np.ndarray, scores: np.ndarray, gt: list[np.ndarray] | None, maps: list[np.ndarray]
) -> dict[str, float]:
    image_t, image_f1 = metrics.f1_optimal_threshold(labels, scores)
    figures = {"image_auroc": metrics.image_auroc(labels, scores), "image_f1_threshold": image_t, "image_f1": image_f1}
    if gt is None:
        return figures
    truth = np.concatenate([g.ravel() for g in gt])
    flat = np.concatenate([m.ravel() for m in maps])
    pixel_t, pixel_f1 = metrics.f1_optimal_threshold(truth, flat)
    return {
        **figures,
        "pixel_auroc": metrics.pixel_auroc(gt, maps),
        "aupro": metrics.aupro(gt, maps),
        "pixel_f1_threshold": pixel_t,
        "pixel_f1": pixel_f1,
    }
