"""Anomaly-detection metrics (numpy / scikit-learn): image and pixel ROCAUC, AUPRO, F1 thresholds."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from scipy.ndimage import label
from sklearn.metrics import auc, precision_recall_curve, roc_auc_score, roc_curve


def image_auroc(labels: np.ndarray, scores: np.ndarray) -> float:
    """ROCAUC of image scores (N,) against labels (N,), 1 = anomalous."""
    return float(roc_auc_score(np.asarray(labels, dtype=int), np.asarray(scores, dtype=np.float64)))


def pixel_auroc(masks: list[np.ndarray], maps: list[np.ndarray]) -> float:
    """ROCAUC over every pixel of every image; masks and maps are (H_i, W_i) pairs."""
    return float(roc_auc_score(*_pixels(masks, maps)))


def _pixels(masks: list[np.ndarray], maps: list[np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    """Every pixel's (bool truth, float32 score), the images one after the other."""
    truth = np.concatenate([np.asarray(m, dtype=bool).ravel() for m in masks])
    return truth, np.concatenate([np.asarray(s, dtype=np.float32).ravel() for s in maps])


def pixel_roc_figures(masks: list[np.ndarray], maps: list[np.ndarray]) -> dict[str, float]:
    """Over every pixel of every image: ROCAUC, and the F1-optimal threshold (flag score >= t) and
    its F1, from one ROC curve (one sort of the pixels instead of one per figure).

    Returns:
        {"pixel_auroc", "pixel_f1_threshold", "pixel_f1"}.
    """
    truth, scores = _pixels(masks, maps)
    fpr, tpr, thresholds = roc_curve(truth, scores, drop_intermediate=False)
    positives = truth.sum()
    tp, fp = tpr * positives, fpr * (truth.size - positives)
    f1 = 2 * tp / np.maximum(2 * tp + fp + (positives - tp), 1e-12)  # 2PR/(P+R) in counts
    best = int(np.argmax(f1[1:])) + 1  # the first point is "flag nothing" (threshold +inf)
    threshold, best_f1 = float(thresholds[best]), float(f1[best])
    return {"pixel_auroc": float(auc(fpr, tpr)), "pixel_f1_threshold": threshold, "pixel_f1": best_f1}


@dataclass(frozen=True)
class ProCurve:
    """Per-region overlap against false-positive rate.

    Attributes:
        fpr: (T,) ascending false-positive rates on normal pixels, from 0 to the limit.
        pro: (T,) mean overlap of the ground-truth regions at the same thresholds.
        aupro: area under the curve up to the limit, divided by the limit (1.0 is perfect).
    """

    fpr: np.ndarray
    pro: np.ndarray
    aupro: float


def pro_curve(
    masks: list[np.ndarray],
    maps: list[np.ndarray],
    fpr_limit: float = 0.3,
    steps: int = 2000,
    valid: list[np.ndarray] | None = None,
) -> ProCurve:
    """The MVTec AD per-region-overlap (PRO) curve, normalised area up to `fpr_limit`.

    Each connected region (8-connectivity) of every ground-truth mask counts once, whatever its
    size; the FPR is over all normal pixels. Thresholds are taken at `steps` evenly spaced FPRs
    (finer than anomalib's default), and the curve is interpolated linearly at the limit. With
    `valid`, (H_i, W_i) bool per image (an inspection region), only its pixels count at all.
    """
    normal_scores, regions = [], []
    for i, (mask, score) in enumerate(zip(masks, maps)):
        normal, found = pro_parts(mask, score, None if valid is None else valid[i])
        normal_scores.append(normal)
        regions += found
    if not regions:
        raise ValueError("AUPRO needs at least one anomalous region in the ground-truth masks.")
    normal = np.sort(np.concatenate(normal_scores))
    n = normal.size
    # Flag score > t with t at normal scores: each point is the best PRO reachable at its FPR.
    targets = np.linspace(0.0, fpr_limit, steps)
    idx = np.clip(n - 1 - np.floor(targets * n).astype(int), 0, n - 1)
    beyond = [normal[max(int(idx.min()) - 1, 0)], -np.inf]  # points past the limit, to interpolate
    thresholds = np.unique(np.concatenate([normal[idx], beyond]))[::-1]
    fpr = np.concatenate([[0.0], (n - np.searchsorted(normal, thresholds, side="right")) / n])
    pro = np.mean([1.0 - np.searchsorted(r, thresholds, side="right") / r.size for r in regions], axis=0)
    return ProCurve(*area_to_limit(fpr, np.concatenate([[0.0], pro]), fpr_limit))


def pro_parts(
    mask: np.ndarray, score: np.ndarray, inside: np.ndarray | None = None
) -> tuple[np.ndarray, list[np.ndarray]]:
    """One image's part of a PRO curve: the scores of its normal pixels, and per connected region
    (8-connectivity) of its (H, W) `mask` the region's sorted scores; only pixels `inside` count."""
    inside = np.ones(np.shape(mask), dtype=bool) if inside is None else np.asarray(inside, dtype=bool)
    mask = np.asarray(mask, dtype=bool) & inside
    score = np.asarray(score, dtype=np.float64)
    labelled, n = label(mask, structure=np.ones((3, 3)))
    return score[~mask & inside], [np.sort(score[labelled == r]) for r in range(1, n + 1)]


def area_to_limit(fpr: np.ndarray, pro: np.ndarray, fpr_limit: float) -> tuple[np.ndarray, np.ndarray, float]:
    """A PRO curve (T,) cut at `fpr_limit` (interpolated linearly there), and its area divided by the limit."""
    keep = fpr <= fpr_limit
    fpr_cut, pro_cut = fpr[keep], pro[keep]
    if fpr_cut[-1] < fpr_limit:
        j = int(np.argmax(~keep))
        f0, f1, p0, p1 = fpr[j - 1], fpr[j], pro[j - 1], pro[j]
        fpr_cut = np.append(fpr_cut, fpr_limit)
        pro_cut = np.append(pro_cut, p0 + (p1 - p0) * (fpr_limit - f0) / (f1 - f0))
    return fpr_cut, pro_cut, float(np.trapezoid(pro_cut, fpr_cut) / fpr_limit)


def aupro(masks: list[np.ndarray], maps: list[np.ndarray], fpr_limit: float = 0.3) -> float:
    """Normalised area under the PRO curve up to `fpr_limit` (AUPRO@0.3 by default)."""
    return pro_curve(masks, maps, fpr_limit).aupro


def f1_optimal_threshold(labels: np.ndarray, scores: np.ndarray) -> tuple[float, float]:
    """The threshold (flag score >= t) that maximises F1, and that F1."""
    precision, recall, thresholds = precision_recall_curve(np.asarray(labels, dtype=int), np.asarray(scores))
    f1 = 2 * precision[:-1] * recall[:-1] / np.maximum(precision[:-1] + recall[:-1], 1e-12)
    best = int(np.argmax(f1))
    return float(thresholds[best]), float(f1[best])


def resize_map(score_map: np.ndarray, size: int) -> np.ndarray:
    """A (H, W) anomaly map resized bilinearly to (size, size)."""
    source = torch.from_numpy(np.asarray(score_map, dtype=np.float32))[None, None]
    return F.interpolate(source, size=(size, size), mode="bilinear", align_corners=False)[0, 0].numpy()


def resize_mask(mask: np.ndarray, size: int) -> np.ndarray:
    """A (H, W) boolean mask resized to (size, size) by nearest neighbour."""
    image = Image.fromarray(np.asarray(mask, dtype=np.uint8) * 255)
    return np.asarray(image.resize((size, size), Image.NEAREST)) > 127
