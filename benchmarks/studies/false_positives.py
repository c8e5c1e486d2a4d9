"""Where the false positives behind AUPRO come from, on an MVTec-layout folder.

    python benchmarks/studies/false_positives.py --threads 2 --data ../shared/data/magnetic_tile

AUPRO@0.3 integrates the per-region overlap up to a false-positive rate of 0.3 over the normal
pixels of every test image. This fits the default detector, takes the map threshold where that
rate is reached, and splits the normal pixels above it by kind of image (normal vs defective) and
by distance to the image border; it also prints, per defect type, the stage-1 (global feature)
image AUROC beside the mean share of the image the defect covers. A high stage-1 AUROC for
defects that cover a tiny share of the image means the defective images differ from the normal
ones as a whole, not only at the defect.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from mlflow_knn_anomaly import SpadeConfig, SpadeDetector
from mlflow_knn_anomaly.evaluation import metrics
from mlflow_knn_anomaly.evaluation.datasets import read_train
from mlflow_knn_anomaly.evaluation.evaluate import evaluate
from mlflow_knn_anomaly.runtime import configure_threads

FPR_LIMIT = 0.3
BANDS = ((0.0, 0.03), (0.03, 0.1), (0.1, 0.2), (0.2, 0.5))  # distance to the border / side length


def border_distance(height: int, width: int) -> np.ndarray:
    """(H, W) distance of each pixel to the nearest border, as a share of that side."""
    ys = np.minimum(np.arange(height), np.arange(height)[::-1]) / height
    xs = np.minimum(np.arange(width), np.arange(width)[::-1]) / width
    return np.minimum(ys[:, None], xs[None, :])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    configure_threads(args.threads)
    detector = SpadeDetector(SpadeConfig()).fit(read_train(args.data))
    evaluation = evaluate(detector, args.data)

    labels = np.array([s.is_anomalous for s in evaluation.samples])
    kinds = np.array([s.defect_type for s in evaluation.samples])
    values, bands, defective = [], [], []
    for label, score_map, truth in zip(labels, evaluation.anomaly_maps, evaluation.gt_masks):
        normal = ~truth
        values.append(score_map[normal])
        bands.append(border_distance(*score_map.shape)[normal])
        defective.append(np.full(int(normal.sum()), label))
    value, band, defect = np.concatenate(values), np.concatenate(bands), np.concatenate(defective)
    threshold = np.quantile(value, 1.0 - FPR_LIMIT)
    above = value > threshold
    print(f"{args.data.name}: map threshold at pooled FPR {FPR_LIMIT}: {threshold:.4g}")
    print("| normal pixels of | share of normal pixels | FPR there |")
    print("|---|---|---|")
    for name, keep in (("normal images", ~defect), ("defective images", defect)):
        print(f"| {name} | {keep.mean():.3f} | {above[keep].mean():.3f} |")
    print("\n| border band (share of side) | share of normal pixels | FPR, normal images | FPR, defective images |")
    print("|---|---|---|---|")
    for low, high in BANDS:
        keep = (band >= low) & (band < high)
        print(
            f"| {low:.2f}-{high:.2f} | {keep.mean():.3f} | {above[keep & ~defect].mean():.3f} "
            f"| {above[keep & defect].mean():.3f} |"
        )

    print("\n| defect type | images | stage-1 image AUROC vs normal | mean defect share of the image |")
    print("|---|---|---|---|")
    for kind in sorted(set(kinds) - {"good"}):
        keep = (kinds == kind) | ~labels
        share = np.mean([t.mean() for t, k in zip(evaluation.gt_masks, kinds) if k == kind])
        auroc = metrics.image_auroc(labels[keep], evaluation.knn_scores[keep])
        print(f"| {kind} | {int((kinds == kind).sum())} | {auroc:.3f} | {share:.4f} |")


if __name__ == "__main__":
    main()
