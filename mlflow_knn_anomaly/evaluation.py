"""Evaluate a fitted detector on an MVTec-layout test set (no MLflow here)."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from . import metrics
from .datasets import TestSample, read_test
from .spade import SpadeDetector

ANOMALIB_SIZE = 256


@dataclass(frozen=True)
class Evaluation:
    """Metrics of one test set.

    Attributes:
        metrics: headline figures: image_auroc, pixel_auroc, aupro, thresholds, stage-2 share...
        per_type: {defect type: the same figures, that type's images plus the normal ones}.
        samples: the test samples, in order; scores (N,) as reported, knn_scores (N,) of stage 1,
            maps and gt_masks (H_i, W_i) per sample.
    """

    metrics: dict[str, float]
    per_type: dict[str, dict[str, float]]
    samples: list[TestSample]
    scores: np.ndarray
    knn_scores: np.ndarray
    maps: list[np.ndarray]
    gt_masks: list[np.ndarray]
    pro: metrics.ProCurve
    extra: dict[str, object] = field(default_factory=dict)


def evaluate(detector: SpadeDetector, root: str | Path) -> Evaluation:
    """Score and segment every test image of `root` and compute the metrics.

    Every image is segmented (segment="all") so that the pixel metrics cover all of them; the
    image score is the one the product reports in segment="auto" mode. Pixel metrics are at each
    image's own resolution, and also (`*_256`) with maps and masks resized to 256 x 256 as
    anomalib evaluates them.
    """
    samples = read_test(root)
    paths = [s.path for s in samples]
    start = time.perf_counter()
    prediction = detector.predict(paths, segment="all")
    seconds = time.perf_counter() - start
    gt = [s.mask(m.shape[1], m.shape[0]) for s, m in zip(samples, prediction.maps)]
    labels = np.array([s.is_anomalous for s in samples])
    headline = _figures(labels, prediction.scores, gt, prediction.maps)
    # anomalib's protocol: maps and masks squashed to 256 x 256 (a user's images rarely are square).
    gt_256 = [metrics.resize_mask(g, ANOMALIB_SIZE) for g in gt]
    maps_256 = [metrics.resize_map(m, ANOMALIB_SIZE) for m in prediction.maps]
    headline["pixel_auroc_256"] = metrics.pixel_auroc(gt_256, maps_256)
    headline["aupro_256"] = metrics.aupro(gt_256, maps_256)
    headline["knn_image_auroc"] = metrics.image_auroc(labels, prediction.knn_scores)
    headline["stage2_share"] = float(np.mean(prediction.candidates))
    headline["seconds_per_image_all_segmented"] = seconds / len(samples)
    per_type = {}
    for kind in sorted({s.defect_type for s in samples} - {"good"}):
        keep = [i for i, s in enumerate(samples) if s.defect_type in (kind, "good")]
        per_type[kind] = _figures(
            labels[keep], prediction.scores[keep], [gt[i] for i in keep], [prediction.maps[i] for i in keep]
        )
    return Evaluation(
        metrics=headline,
        per_type=per_type,
        samples=samples,
        scores=prediction.scores,
        knn_scores=prediction.knn_scores,
        maps=prediction.maps,
        gt_masks=gt,
        pro=metrics.pro_curve(gt, prediction.maps),
    )


def _figures(labels: np.ndarray, scores: np.ndarray, gt: list[np.ndarray], maps: list[np.ndarray]) -> dict[str, float]:
    image_t, image_f1 = metrics.f1_optimal_threshold(labels, scores)
    truth = np.concatenate([g.ravel() for g in gt])
    flat = np.concatenate([m.ravel() for m in maps])
    pixel_t, pixel_f1 = metrics.f1_optimal_threshold(truth, flat)
    return {
        "image_auroc": metrics.image_auroc(labels, scores),
        "pixel_auroc": metrics.pixel_auroc(gt, maps),
        "aupro": metrics.aupro(gt, maps),
        "image_f1_threshold": image_t,
        "image_f1": image_f1,
        "pixel_f1_threshold": pixel_t,
        "pixel_f1": pixel_f1,
    }
