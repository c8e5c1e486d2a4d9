"""Evaluate a fitted detector on a labelled test set (no MLflow here).

The test set is a list of `LabelledImage` (images in memory or on disk, their labels and optional
masks), read from an MVTec-layout folder by `read_samples` or built by the caller (the MLflow
evaluator builds it from a DataFrame). Sets with pixel masks get image and pixel metrics; sets
with image-level labels only get the image metrics, and their pixel metrics are absent (not an error).
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..algorithm.images import ImageLike
from ..algorithm.regions import Region, region_metrics
from ..algorithm.spade import Prediction, SpadeDetector
from . import metrics
from .datasets import NORMAL, read_mask, read_test

ANOMALIB_SIZE = 256
PIXEL_METRICS = ("pixel_auroc", "aupro", "pixel_f1_threshold", "pixel_f1", "pixel_auroc_256", "aupro_256")


@dataclass(frozen=True)
class LabelledImage:
    """One test image and its ground truth.

    Attributes:
        image: a path or encoded bytes (anything `SpadeDetector.predict` takes).
        defect_type: "good" for a normal image, else the kind of defect.
        mask: (H, W) bool defect pixels at the image's own size; None for a normal image, or for
            every image of a set with image-level labels only.
    """

    image: ImageLike
    defect_type: str
    mask: np.ndarray | None = None

    @property
    def is_anomalous(self) -> bool:
        return self.defect_type != NORMAL


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
        masks, regions: per sample, the (H_i, W_i) mask and the defect regions the model returns
            (at its pixel threshold and `min_region_area`).
    """

    metrics: dict[str, float]
    per_type: dict[str, dict[str, float]]
    samples: list[LabelledImage]
    scores: np.ndarray
    knn_scores: np.ndarray
    map_scores: np.ndarray
    anomaly_maps: list[np.ndarray]
    gt_masks: list[np.ndarray] | None
    pro: metrics.ProCurve | None
    masks: list[np.ndarray]
    regions: list[list[Region]]

    @property
    def has_masks(self) -> bool:
        return self.gt_masks is not None


def read_samples(root: str | Path) -> list[LabelledImage]:
    """The test set of an MVTec-layout folder (`read_test`), masks decoded."""
    return [
        LabelledImage(s.path, s.defect_type, None if s.mask_path is None else read_mask(s.mask_path))
        for s in read_test(root)
    ]


def evaluate(
    detector: SpadeDetector, root: str | Path, progress: bool = False, per_type_pixels: bool = True
) -> Evaluation:
    """`evaluate_samples` on the test set of an MVTec-layout folder."""
    return evaluate_samples(detector, read_samples(root), progress=progress, per_type_pixels=per_type_pixels)


def evaluate_samples(
    detector: SpadeDetector, samples: Sequence[LabelledImage], progress: bool = False, per_type_pixels: bool = True
) -> Evaluation:
    """Score and segment every test image and compute the metrics.

    Every image is segmented (segment="all"); the image score is the one the product reports in
    segment="auto" mode. With masks, the region figures of `regions.region_metrics` (recall of the
    ground-truth regions, false regions per normal and per anomalous image) are read off the masks
    the model returns. Pixel metrics are at each image's own resolution, and also (`*_256`) with
    maps and masks resized to 256 x 256 as anomalib evaluates them. They need a mask for every
    anomalous image; with none at all, only the image metrics are computed. Without
    `per_type_pixels` the per-type figures leave out the pixel metrics (each a pass over every pixel).

    Raises:
        ValueError: some anomalous images have masks and others not, or a mask is not its image's size.
    """
    samples = list(samples)
    with_masks = _check_masks(samples)
    start = time.perf_counter()
    prediction = detector.predict([s.image for s in samples], segment="all", progress=progress)
    seconds = time.perf_counter() - start
    maps = prediction.anomaly_maps
    labels = np.array([s.is_anomalous for s in samples])
    gt = _ground_truth(samples, maps) if with_masks else None
    valid = None if all(r is None for r in prediction.rois) else prediction.rois  # the inspection regions
    if gt is not None and valid is not None:
        gt = [g & v for g, v in zip(gt, valid)]  # a defect outside the ROI is not one to find
    pro = None if gt is None else metrics.pro_curve(gt, maps, valid=valid)
    headline = _figures(labels, prediction.scores, gt, maps, pro, valid)
    if gt is not None:
        square = all(m.shape == (ANOMALIB_SIZE, ANOMALIB_SIZE) for m in maps)  # the protocol changes nothing
        headline.update(
            {"pixel_auroc_256": headline["pixel_auroc"], "aupro_256": headline["aupro"]}
            if square
            else _anomalib_protocol(gt, maps, valid)
        )
        headline.update(region_metrics(prediction.masks, gt))
    headline.update(_stage_figures(labels, prediction))
    headline["seconds_per_image_all_segmented"] = seconds / len(samples)
    per_type = _per_type(samples, labels, prediction.scores, gt if per_type_pixels else None, maps, valid)
    if gt is not None:  # region figures are cheap: per type even without the per-type pixel metrics
        for kind, figures in per_type.items():
            keep = [i for i, s in enumerate(samples) if s.defect_type in (kind, NORMAL)]
            figures.update(region_metrics([prediction.masks[i] for i in keep], [gt[i] for i in keep]))
    return Evaluation(
        metrics=headline,
        per_type=per_type,
        samples=samples,
        scores=prediction.scores,
        knn_scores=prediction.knn_scores,
        map_scores=prediction.map_scores,
        anomaly_maps=maps,
        gt_masks=gt,
        pro=pro,
        masks=prediction.masks,
        regions=prediction.regions,
    )


def _stage_figures(labels: np.ndarray, prediction: Prediction) -> dict[str, float]:
    """Each stage's own image ROCAUC, and the shares of images the gate sent to stage 2."""
    return {
        "knn_image_auroc": metrics.image_auroc(labels, prediction.knn_scores),
        "map_image_auroc": metrics.image_auroc(labels, prediction.map_scores),
        "stage2_share": float(np.mean(prediction.candidates)),
        "stage2_share_normal": float(np.mean(prediction.candidates[~labels])),
        "stage2_share_anomalous": float(np.mean(prediction.candidates[labels])),
    }


def _per_type(
    samples: list[LabelledImage],
    labels: np.ndarray,
    scores: np.ndarray,
    gt: list[np.ndarray] | None,
    maps: list[np.ndarray],
    valid: list[np.ndarray] | None = None,
) -> dict[str, dict[str, float]]:
    """The figures of each defect type against all normal images (pixel figures only with `gt`)."""
    per_type = {}
    for kind in sorted({s.defect_type for s in samples} - {NORMAL}):
        keep = [i for i, s in enumerate(samples) if s.defect_type in (kind, NORMAL)]
        kept_gt = None if gt is None else [gt[i] for i in keep]
        kept_valid = None if valid is None else [valid[i] for i in keep]
        per_type[kind] = _figures(labels[keep], scores[keep], kept_gt, [maps[i] for i in keep], None, kept_valid)
    return per_type


def _anomalib_protocol(
    gt: list[np.ndarray], maps: list[np.ndarray], valid: list[np.ndarray] | None = None
) -> dict[str, float]:
    """Pixel metrics with maps and masks squashed to 256 x 256, as anomalib evaluates them."""
    gt_256 = [metrics.resize_mask(g, ANOMALIB_SIZE) for g in gt]
    maps_256 = [metrics.resize_map(m, ANOMALIB_SIZE) for m in maps]
    valid_256 = None if valid is None else [metrics.resize_mask(v, ANOMALIB_SIZE) for v in valid]
    pixels = _inside(gt_256, maps_256, valid_256)
    return {
        "pixel_auroc_256": metrics.pixel_auroc(*pixels),
        "aupro_256": metrics.pro_curve(gt_256, maps_256, valid=valid_256).aupro,
    }


def _inside(
    gt: list[np.ndarray], maps: list[np.ndarray], valid: list[np.ndarray] | None
) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The pixels that count: every one, or those inside each image's inspection region."""
    if valid is None:
        return gt, maps
    return [g[v] for g, v in zip(gt, valid)], [m[v] for m, v in zip(maps, valid)]


def _check_masks(samples: list[LabelledImage]) -> bool:
    """Whether the set has pixel labels: a mask for every anomalous image (checked before any work)."""
    if all(s.mask is None for s in samples):
        return False
    missing = [_name(s, i) for i, s in enumerate(samples) if s.is_anomalous and s.mask is None]
    if missing:
        raise ValueError(
            f"{len(missing)} anomalous test images have no mask ({', '.join(missing[:5])}); give every "
            "anomalous image a mask, or none at all to evaluate with image-level labels only."
        )
    return True


def _ground_truth(samples: list[LabelledImage], maps: list[np.ndarray]) -> list[np.ndarray]:
    """Per image, its (H, W) bool mask; all False for a normal image without one."""
    gt = []
    for i, (sample, score_map) in enumerate(zip(samples, maps)):
        mask = np.zeros(score_map.shape, dtype=bool) if sample.mask is None else np.asarray(sample.mask, dtype=bool)
        if mask.shape != score_map.shape:
            raise ValueError(
                f"the mask of {_name(sample, i)} is {mask.shape[1]}x{mask.shape[0]} pixels, its image "
                f"{score_map.shape[1]}x{score_map.shape[0]}; masks must be at their image's own size."
            )
        gt.append(mask)
    return gt


def _name(sample: LabelledImage, index: int) -> str:
    return str(sample.image) if isinstance(sample.image, (str, Path)) else f"row {index}"


def _figures(
    labels: np.ndarray,
    scores: np.ndarray,
    gt: list[np.ndarray] | None,
    maps: list[np.ndarray],
    pro: metrics.ProCurve | None = None,
    valid: list[np.ndarray] | None = None,
) -> dict[str, float]:
    """Image figures, and pixel figures with `gt` (AUPRO from `pro` when it is already computed),
    over the pixels inside `valid` (inspection regions) when given."""
    image_t, image_f1 = metrics.f1_optimal_threshold(labels, scores)
    figures = {"image_auroc": metrics.image_auroc(labels, scores), "image_f1_threshold": image_t, "image_f1": image_f1}
    if gt is None:
        return figures
    aupro = (pro or metrics.pro_curve(gt, maps, valid=valid)).aupro
    return {**figures, **metrics.pixel_roc_figures(*_inside(gt, maps, valid)), "aupro": aupro}
