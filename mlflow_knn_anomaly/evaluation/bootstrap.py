"""The figures of a bootstrap resample of validation images, without resampling a pixel.

A resample takes image i `counts[i]` times. Its image ROCAUC, pixel ROCAUC and AUPRO equal those
of the resampled images laid one after the other (tests check that against `roc_auc_score` and
`metrics.pro_curve`), but each candidate's pixels are ranked and its regions labelled once, so a
resample costs a small product or a weighted pass instead of a sort, a labelling and a
scikit-learn call. `tuning` runs hundreds of resamples per candidate with them.
"""

from __future__ import annotations

import numpy as np

from .metrics import area_to_limit, pro_parts


class Ranks:
    """ROCAUC of any resample from an (N, N) table computed once: `pairs[i, j]` counts the pairs
    of a positive value of image i above a negative value of image j (ties counting half), so a
    resample's Mann-Whitney U is `counts @ pairs @ counts`."""

    def __init__(self, values: np.ndarray, positive: np.ndarray, image: np.ndarray, n_images: int) -> None:
        above, owner = values[positive], image[positive]
        self.pairs = np.zeros((n_images, n_images))
        for j in range(n_images):
            negatives = np.sort(values[~positive & (image == j)])
            low, high = np.searchsorted(negatives, above, "left"), np.searchsorted(negatives, above, "right")
            self.pairs[:, j] = np.bincount(owner, weights=low + 0.5 * (high - low), minlength=n_images)
        self.positives = np.bincount(image, weights=positive, minlength=n_images)
        self.negatives = np.bincount(image, minlength=n_images) - self.positives

    @classmethod
    def of_scores(cls, scores: np.ndarray, labels: np.ndarray) -> Ranks:
        """Image scores (N,) against labels (N,)."""
        return cls(np.asarray(scores, np.float64), np.asarray(labels, bool), np.arange(len(scores)), len(scores))

    @classmethod
    def of_maps(cls, maps: list[np.ndarray], masks: list[np.ndarray]) -> Ranks:
        """Every pixel of (H, W) maps against their (H, W) masks."""
        values = np.concatenate([np.ravel(m) for m in maps]).astype(np.float64)
        image = np.repeat(np.arange(len(maps)), [np.size(m) for m in maps])
        return cls(values, np.concatenate([np.ravel(m) for m in masks]).astype(bool), image, len(maps))

    def auroc(self, counts: np.ndarray) -> float:
        """ROCAUC of the resample that takes image i `counts[i]` times."""
        c = np.asarray(counts, np.float64)
        return float(c @ self.pairs @ c / ((c @ self.positives) * (c @ self.negatives)))


class ResampledPro:
    """`metrics.pro_curve`'s AUPRO of any resample: normal pixels sorted and regions labelled once."""

    def __init__(self, maps: list[np.ndarray], masks: list[np.ndarray], fpr_limit: float = 0.3, steps: int = 2000):
        normal, image, self.regions, self.region_image = [], [], [], []
        for i, (mask, score) in enumerate(zip(masks, maps)):
            scores, regions = pro_parts(mask, score)
            normal.append(scores)
            image.append(np.full(scores.size, i))
            self.regions += regions
            self.region_image += [i] * len(regions)
        values = np.concatenate(normal)
        order = np.argsort(values, kind="stable")
        self.normal, self.image = values[order], np.concatenate(image)[order]
        self.region_image = np.array(self.region_image, dtype=int)
        self.fpr_limit, self.steps = fpr_limit, steps

    def aupro(self, counts: np.ndarray) -> float:
        """AUPRO@fpr_limit of the resample that takes image i `counts[i]` times."""
        region_weight = counts[self.region_image].astype(np.float64)
        if not region_weight.sum():
            raise ValueError("AUPRO needs at least one anomalous region in the ground-truth masks.")
        below = np.r_[0, np.cumsum(counts[self.image])]  # resampled normal pixels up to each sorted one
        n = int(below[-1])

        def at(position: np.ndarray) -> np.ndarray:  # the resampled sorted normal scores at `position`
            return self.normal[np.searchsorted(below[1:], position, side="right")]

        targets = np.linspace(0.0, self.fpr_limit, self.steps)
        idx = np.clip(n - 1 - np.floor(targets * n).astype(int), 0, n - 1)
        beyond = [at(np.array([max(int(idx.min()) - 1, 0)]))[0], -np.inf]  # past the limit, to interpolate
        thresholds = np.unique(np.concatenate([at(idx), beyond]))[::-1]
        fpr = np.r_[0.0, (n - below[np.searchsorted(self.normal, thresholds, side="right")]) / n]
        found = np.array([1.0 - np.searchsorted(r, thresholds, side="right") / r.size for r in self.regions])
        pro = np.r_[0.0, region_weight @ found / region_weight.sum()]
        return area_to_limit(fpr, pro, self.fpr_limit)[2]


class ResampledFigures:
    """A candidate's validation figures on any resample: image ROCAUC and, with masks, pixel
    ROCAUC and AUPRO.

    Args:
        labels: (N,) anomalous or not.
        scores: (N,) image scores.
        maps: (H, W) anomaly map per image, or None (image labels only).
        masks: (H, W) ground truth per image, or None.
    """

    def __init__(self, labels: np.ndarray, scores: np.ndarray, maps: list | None = None, masks: list | None = None):
        self.image = Ranks.of_scores(scores, labels)
        self.pixel = None if maps is None else Ranks.of_maps(maps, masks)
        self.pro = None if maps is None else ResampledPro(maps, masks)

    def figures(self, counts: np.ndarray) -> dict[str, float]:
        """{"image_auroc"} and, with masks, {"pixel_auroc", "aupro"} of the resample `counts` (N,)."""
        out = {"image_auroc": self.image.auroc(counts)}
        if self.pixel is not None:
            out.update(pixel_auroc=self.pixel.auroc(counts), aupro=self.pro.aupro(counts))
        return out


def stratified_counts(labels: np.ndarray, n_resamples: int, seed: int = 0) -> list[np.ndarray]:
    """`n_resamples` resamples (counts per image, (N,)) drawing the normal and the anomalous images
    apart, each as many times as there are, so that every resample holds both."""
    rng = np.random.default_rng(seed)
    normal, anomalous = np.flatnonzero(~labels), np.flatnonzero(labels)
    return [
        np.bincount(
            np.r_[rng.choice(normal, len(normal)), rng.choice(anomalous, len(anomalous))], minlength=len(labels)
        )
        for _ in range(n_resamples)
    ]
