"""Figures for the MLflow UI: image ROC, PRO curve, and an overlay grid."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from sklearn.metrics import roc_curve  # noqa: E402

from ..algorithm.images import load_image  # noqa: E402
from .evaluate import Evaluation  # noqa: E402


def roc_figure(result: Evaluation) -> plt.Figure:
    labels = [s.is_anomalous for s in result.samples]
    fpr, tpr, _ = roc_curve(labels, result.scores)
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.plot(fpr, tpr, label=f"AUROC {result.metrics['image_auroc']:.4f}")
    ax.plot([0, 1], [0, 1], ":", color="gray")
    ax.set(xlabel="false-positive rate", ylabel="true-positive rate", title="image ROC")
    ax.legend(loc="lower right")
    fig.tight_layout()
    return fig


def pro_curve_figure(result: Evaluation) -> plt.Figure:
    fig, ax = plt.subplots(figsize=(4, 4))
    ax.plot(result.pro.fpr, result.pro.pro, label=f"AUPRO@0.3 {result.pro.aupro:.4f}")
    ax.set(xlabel="false-positive rate", ylabel="per-region overlap", title="PRO curve", xlim=(0, 0.3), ylim=(0, 1))
    ax.legend(loc="lower right")
    fig.tight_layout()
    return fig


def overlay_grid(result: Evaluation, per_type: int = 2) -> plt.Figure:
    """Rows of image | ground truth | heat map with the defect regions' boxes and peaks | mask, for a
    few images of every type (the ground truth panel is blank for image-level labels). Boxes and
    mask are what the model returns (its pixel threshold, `min_region_area`)."""
    picks: dict[str, list[int]] = {}
    for i, sample in enumerate(result.samples):
        if len(picks.setdefault(sample.defect_type, [])) < per_type:
            picks[sample.defect_type].append(i)
    rows = [i for indices in picks.values() for i in indices]
    fig, axes = plt.subplots(len(rows), 4, figsize=(8, 2 * len(rows)), squeeze=False)
    vmax = max(float(result.anomaly_maps[i].max()) for i in rows)
    for r, i in enumerate(rows):
        picture = np.asarray(load_image(result.samples[i].image))
        score_map = result.anomaly_maps[i]
        truth = result.gt_masks[i] if result.has_masks else np.zeros(score_map.shape, dtype=bool)
        panels = (picture, truth, score_map, result.masks[i])
        for c, (panel, title) in enumerate(zip(panels, ("image", "ground truth", "heat map, regions", "mask"))):
            ax = axes[r, c]
            if c == 2:
                ax.imshow(picture)
                ax.imshow(panel, cmap="jet", alpha=0.5, vmin=0, vmax=vmax)
                _draw_regions(ax, result.regions[i])
            else:
                ax.imshow(panel, cmap=None if c == 0 else "gray")
            ax.set_axis_off()
            if r == 0:
                ax.set_title(title, fontsize=9)
        axes[r, 0].text(2, 12, result.samples[i].defect_type, color="yellow", fontsize=8)
    fig.tight_layout()
    return fig


def _draw_regions(ax: plt.Axes, regions: list, most: int = 5) -> None:
    """Each region's box, labelled with its peak (1.0 = the pixel threshold), the highest first."""
    for region in regions[:most]:
        box = plt.Rectangle((region.x - 0.5, region.y - 0.5), region.width, region.height, fill=False, color="white")
        ax.add_patch(box)
        ax.text(region.x, region.y - 2, f"{region.peak:.2f}", color="white", fontsize=6, va="bottom")
