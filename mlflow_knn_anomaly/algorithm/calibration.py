"""What `fit` learns from normal images held out of the bank: thresholds, score statistics and a
stage-1 gate calibrated for recall on synthetic anomalies.

No real defect is needed. Each held-out normal image is turned into synthetic anomalies of the
families CutPaste (Li et al. 2021) and DRAEM (Zavrtanik et al. 2021) use: a patch cut from another
normal image and pasted elsewhere, a textured blob, and a thin scratch. The gate is the highest
stage-1 score that still passes `gate_recall` of them; where stage 1 cannot tell them from normal
images, that gate opens for (nearly) every image, and where it can, normal images skip stage 2.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter
from sklearn.metrics import roc_auc_score


@dataclass(frozen=True)
class Calibration:
    """The fitted state of a detector (scikit-learn's trailing-underscore attributes): saved with
    the model, logged as metrics, recomputed by every fit, never a user option.

    Attributes:
        image_threshold: image-score control limit of the held-out normal images.
        pixel_threshold: control limit of their anomaly-map maxima (the mask threshold).
        gate_threshold: two_stage: the stage-1 score from which an image goes to stage 2.
        knn_mean, knn_std: held-out stage-1 score statistics.
        map_mean, map_std: held-out map-score statistics; with knn_* they put a stage-1 score on
            the map's scale (z-scores).
        layer_scales: per pyramid layer, the held-out mean pixel distance (`normalize_layers`).
        gate_normal_share: share of held-out normal images that pass the gate (the expected
            share of normal images sent to stage 2); None for models saved before the gate.
        gate_synthetic_auroc: stage-1 ROCAUC, held-out normal images against their synthetic
            anomalies; None for models saved before the gate.
        holdout_scores: the held-out images' stage-1 scores, what monitoring compares a batch's
            with (`drift`); None for models saved before monitoring.
    """

    image_threshold: float
    pixel_threshold: float
    gate_threshold: float
    knn_mean: float
    knn_std: float
    map_mean: float
    map_std: float
    layer_scales: tuple[float, ...]
    gate_normal_share: float | None = None
    gate_synthetic_auroc: float | None = None
    holdout_scores: tuple[float, ...] | None = None

    def to_dict(self) -> dict:
        scores = None if self.holdout_scores is None else list(self.holdout_scores)
        return {**dataclasses.asdict(self), "layer_scales": list(self.layer_scales), "holdout_scores": scores}

    @classmethod
    def from_dict(cls, data: dict) -> Calibration:
        scores = data.get("holdout_scores")
        return cls(
            **{
                **data,
                "layer_scales": tuple(float(x) for x in data["layer_scales"]),
                "holdout_scores": None if scores is None else tuple(float(x) for x in scores),
            }
        )

    def metrics(self) -> dict[str, float]:
        """The scalar fields, as MLflow metrics (`calibration.<name>`)."""
        return {
            f"calibration.{k}": float(v)
            for k, v in dataclasses.asdict(self).items()
            if isinstance(v, (int, float)) and v is not None
        }


def control_limit(values: np.ndarray, sigmas: float) -> float:
    """mean + sigmas * std: stable with the few images a hold-out has, where a high quantile would
    just be the maximum of a handful of scores."""
    return float(values.mean() + sigmas * _std(values))


def score_stats(knn: np.ndarray, map_scores: np.ndarray) -> dict[str, float]:
    return {
        "knn_mean": float(knn.mean()),
        "knn_std": _std(knn),
        "map_mean": float(map_scores.mean()),
        "map_std": _std(map_scores),
    }


def _std(values: np.ndarray) -> float:
    return max(float(np.std(values, ddof=1)), 1e-12)  # identical hold-out images have std 0


def recall_gate(normal: np.ndarray, synthetic: np.ndarray, recall: float) -> dict[str, float]:
    """The stage-1 gate that passes at least `recall` of the synthetic anomalies.

    Args:
        normal: (N,) stage-1 scores of held-out normal images.
        synthetic: (S,) stage-1 scores of synthetic anomalies made from them.
        recall: share of `synthetic` that must score at or above the gate; 1.0 opens it for all.

    Returns:
        gate_threshold, gate_normal_share (share of `normal` at or above it) and
        gate_synthetic_auroc.
    """
    if recall >= 1.0:
        gate = 0.0  # scores are distances: every image passes
    else:
        ranked = np.sort(synthetic)
        gate = float(ranked[math.floor((1.0 - recall) * len(ranked) + 1e-9)])
    labels = np.r_[np.zeros(len(normal)), np.ones(len(synthetic))]
    return {
        "gate_threshold": gate,
        "gate_normal_share": float(np.mean(normal >= gate)),
        "gate_synthetic_auroc": float(roc_auc_score(labels, np.r_[normal, synthetic])),
    }


# ---- synthetic anomalies ------------------------------------------------------------------------
# The families' sizes below are CutPaste's and DRAEM's; the gate uses them at a quarter of that
# (a cut-paste of 0.1-0.9 % of the image, a blob of 1.5-6 % of the side across, a scratch of
# 4-11 % of the side): large defects pass any gate, the small ones that stage 1 barely sees are
# those it must not drop. Measured on the five shared sets: benchmarks/studies/gate_calibration.md.
DEFECT_SCALE = 0.25


def synthetic_anomalies(images: list[Image.Image], seed: int = 0, scale: float = DEFECT_SCALE) -> list[Image.Image]:
    """Three synthetic anomalies per normal image: cut-paste, textured blob, thin scratch.

    Sizes follow each image's shorter side, times `scale`, so small and large images get
    comparable defects. Deterministic for a given `seed` and image list.
    """
    rng = np.random.default_rng(seed)
    out = []
    for i, image in enumerate(images):
        donor = images[(i + 1) % len(images)]
        out += [cut_paste(image, donor, rng, scale), blob(image, rng, scale), scratch(image, rng, scale)]
    return out


def cut_paste(image: Image.Image, donor: Image.Image, rng: np.random.Generator, scale: float = 1.0) -> Image.Image:
    """A rectangle of 2-15 % of the area (aspect 0.3-3.3, as CutPaste) cut from `donor` and pasted
    at another place, slightly brightened or darkened."""
    w, h = image.size
    area = rng.uniform(0.02, 0.15) * w * h * scale**2
    aspect = math.exp(rng.uniform(math.log(0.3), math.log(3.3)))
    pw = int(np.clip(round(math.sqrt(area * aspect)), 2, w - 1))
    ph = int(np.clip(round(math.sqrt(area / aspect)), 2, h - 1))
    source = donor.resize((w, h)) if donor.size != image.size else donor
    x0, y0 = rng.integers(0, w - pw + 1), rng.integers(0, h - ph + 1)
    patch = np.asarray(source.crop((x0, y0, x0 + pw, y0 + ph)), dtype=np.float32)
    patch = np.clip(patch * rng.uniform(0.8, 1.2), 0, 255).astype(np.uint8)
    out = image.copy()
    out.paste(Image.fromarray(patch), (int(rng.integers(0, w - pw + 1)), int(rng.integers(0, h - ph + 1))))
    return out


def blob(image: Image.Image, rng: np.random.Generator, scale: float = 1.0) -> Image.Image:
    """An ellipse of smoothed noise (3-12 % of the shorter side across), blended in with a soft edge."""
    w, h = image.size
    side = min(w, h)
    rx, ry = (max(2.0, rng.uniform(0.03, 0.12) * side * scale) for _ in range(2))
    cx, cy = rng.uniform(rx, w - rx), rng.uniform(ry, h - ry)
    mask = Image.new("L", (w, h), 0)
    ImageDraw.Draw(mask).ellipse((cx - rx, cy - ry, cx + rx, cy + ry), fill=255)
    alpha = np.asarray(mask.filter(ImageFilter.GaussianBlur(max(1.0, min(rx, ry) / 4))), np.float32) / 255
    noise = Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).filter(ImageFilter.GaussianBlur(1.5))
    texture = np.asarray(noise, np.float32)
    blend = alpha[..., None] * rng.uniform(0.5, 1.0)
    mixed = (1 - blend) * np.asarray(image, np.float32) + blend * texture
    return Image.fromarray(np.clip(mixed, 0, 255).astype(np.uint8))


def scratch(image: Image.Image, rng: np.random.Generator, scale: float = 1.0) -> Image.Image:
    """A thin polyline (1-3 % of the shorter side wide, 15-45 % long), darker or brighter than
    the image around it."""
    w, h = image.size
    side = min(w, h)
    length = rng.uniform(0.15, 0.45) * side * scale
    angle = rng.uniform(0, math.pi)
    x, y = rng.uniform(0.1 * w, 0.9 * w), rng.uniform(0.1 * h, 0.9 * h)
    points = [(x, y)]
    for _ in range(3):
        angle += rng.normal(0, 0.3)
        x, y = x + math.cos(angle) * length / 3, y + math.sin(angle) * length / 3
        points.append((float(np.clip(x, 0, w - 1)), float(np.clip(y, 0, h - 1))))
    level = int(np.mean(np.asarray(image)))
    colour = int(level * 0.3) if rng.random() < 0.5 else int(level + 0.7 * (255 - level))
    out = image.copy()
    width = max(1, round(rng.uniform(0.01, 0.03) * side * scale))
    ImageDraw.Draw(out).line(points, fill=(colour,) * 3, width=width, joint="curve")
    return out
