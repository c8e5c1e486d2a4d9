"""Is today's normal still the model's normal? Drift of a batch of production images against what
the model kept of its normal images.

Two kinds of evidence, each a two-sample Kolmogorov-Smirnov test (distribution-free, and exact
for the small batches a line sends):
- the batch's stage-1 scores against those of the held-out normal images (`Calibration.
  holdout_scores`): normal has moved, whatever the cause;
- simple statistics of the network inputs (brightness, contrast, sharpness) against the bank
  images' (`FeatureBank.statistics`): the cause is named, a lighting or a focus change.
Past a limit the batch alerts, and `reasons` says which figure crossed it. No MLflow here: the
`monitor` job (`monitoring.py`) logs these figures.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from scipy import ndimage, stats

from ..config import MonitorLimits

STATISTICS = ("brightness", "contrast", "sharpness")
_GRAY = (0.299, 0.587, 0.114)  # ITU-R BT.601 luma


def image_statistics(inputs: list[torch.Tensor]) -> np.ndarray:
    """(N, 3) brightness, contrast and sharpness of network inputs (3, H, W) in [0, 1].

    Each moves with one cause alone: brightness is the mean luma; contrast its coefficient of
    variation (std / mean), which a change of gain leaves as it is; sharpness the variance of its
    Laplacian (Pech-Pacheco et al. 2000, the usual focus measure) over the variance of the luma,
    which gain and offset leave as they are and a blur lowers. They are taken on the network
    input, so they see what the model sees, at the same size for every image.
    """
    rows = []
    for x in inputs:
        gray = np.tensordot(np.asarray(_GRAY, np.float32), x.numpy(), axes=1).astype(np.float64)
        mean, var = gray.mean(), gray.var()
        rows.append((mean, np.sqrt(var) / max(mean, 1e-12), ndimage.laplace(gray).var() / max(var, 1e-12)))
    return np.asarray(rows, dtype=np.float64).reshape(-1, len(STATISTICS))


@dataclass(frozen=True)
class NormalReference:
    """What a batch is compared with.

    Attributes:
        scores: (R,) stage-1 scores of the held-out normal images (none of them in the bank).
        statistics: (M, 3) image statistics of normal images; None when the model kept none.
        statistics_of: "bank" (every bank image), "holdout" (a model saved before the bank kept
            them: the held-out images stand in) or "none" (a model saved without held-out images:
            no drift test runs).
    """

    scores: np.ndarray
    statistics: np.ndarray | None
    statistics_of: str = "bank"


def drift_figures(reference: NormalReference, scores: np.ndarray, statistics: np.ndarray) -> dict[str, float]:
    """KS statistic, p-value and median change of each compared quantity.

    Args:
        reference: the model's normal images.
        scores: (N,) stage-1 scores of the batch.
        statistics: (N, 3) image statistics of the batch (`image_statistics`).

    Returns:
        {"score_ks", "score_p", "score_change", "<statistic>_ks", ...}; a `*_change` is the
        relative change of the batch's median against the reference's (+0.3: 30 % higher).
    """
    pairs = [("score", np.asarray(scores), reference.scores)] if len(reference.scores) else []
    if reference.statistics is not None:
        pairs += [(name, statistics[:, j], reference.statistics[:, j]) for j, name in enumerate(STATISTICS)]
    figures = {}
    for name, batch, normal in pairs:
        test = stats.ks_2samp(batch, normal)
        figures[f"{name}_ks"] = float(test.statistic)
        figures[f"{name}_p"] = float(test.pvalue)
        figures[f"{name}_change"] = float(np.median(batch) / max(float(np.median(normal)), 1e-12) - 1.0)
    return figures


def reasons(figures: dict[str, float], n_images: int, limits: MonitorLimits) -> list[str]:
    """Why a batch alerts (empty: it does not), from `drift_figures` and `anomalous_share`."""
    found = []
    share = figures["anomalous_share"]
    if share > limits.max_anomalous_share:
        found.append(f"anomalous_share {share:.2f} > {limits.max_anomalous_share}")
    if n_images < limits.min_images:
        return found
    for name in ("score", *STATISTICS):
        p = figures.get(f"{name}_p")
        change = figures.get(f"{name}_change", 0.0)
        if p is not None and p < limits.p_value and (name == "score" or abs(change) >= limits.min_change):
            what = "stage-1 score" if name == "score" else name
            found.append(
                f"{what} drift: KS {figures[name + '_ks']:.2f}, p={p:.1e} < {limits.p_value}, median {change:+.0%}"
            )
    return found
