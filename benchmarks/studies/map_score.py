"""The map-based image score swept over `score_top` x `map_weight` on the five sets, one fit each.

    python benchmarks/studies/map_score.py --threads 2          # ~7 min on 2 cores
    python benchmarks/studies/map_score.py --threads 2 --tops 0 0.005 --weights 2 5

Fits the default detector once per set and keeps every held-out and test image's anomaly map on
its network input (`segment="all"`). Each (top, weight) pair then re-scores them as `predict`
does: the map score is the mean of the top share of the map inside the score margin (`top=0`:
the maximum), its held-out statistics are recalibrated, the fitted gate passes the same images,
and `score_fusion="mean"` weighs the map's z-score `weight` times stage 1's. Prints one markdown
row per pair: image ROCAUC per set and the five-set mean. Pixel metrics do not depend on these
two settings.
"""

from __future__ import annotations

import argparse
import itertools
from pathlib import Path

import numpy as np

from mlflow_knn_anomaly import SpadeConfig, SpadeDetector
from mlflow_knn_anomaly.algorithm import anomaly_map
from mlflow_knn_anomaly.algorithm.calibration import score_stats
from mlflow_knn_anomaly.algorithm.spade import fuse_scores
from mlflow_knn_anomaly.evaluation.datasets import read_test, read_train
from mlflow_knn_anomaly.evaluation.metrics import image_auroc
from mlflow_knn_anomaly.runtime import configure_threads

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"
SETS = ("mvtec_bottle", "magnetic_tile", "mpdd_metal_plate", "mvtec_transistor", "elpv")


def input_maps(detector: SpadeDetector, images: list) -> tuple[np.ndarray, list[np.ndarray]]:
    """(N,) stage-1 scores and the N anomaly maps on the network input."""
    knn, maps = [], []
    for inputs, geometries in detector._batches(images, None):
        pooled, features = detector.extract(inputs)
        scores, nn_indices = detector.stage1(pooled)
        knn += list(scores)
        maps += [detector.stage2(features[i], nn_indices[i], g.input_shape) for i, g in enumerate(geometries)]
    return np.asarray(knn, dtype=np.float32), maps


def rescore(fitted: dict, top: float, weight: float) -> float:
    """Image ROCAUC of one set at (top, weight)."""
    margin = fitted["detector"].config.score_margin
    held_map = np.array([anomaly_map.map_score(m, margin, top) for m in fitted["held_maps"]])
    test_map = np.array([anomaly_map.map_score(m, margin, top) for m in fitted["test_maps"]])
    stats = score_stats(fitted["held_knn"], held_map)
    knn = fitted["test_knn"]
    candidates = knn >= fitted["detector"].calibration.gate_threshold
    return image_auroc(fitted["labels"], fuse_scores(knn, test_map, candidates, stats, "mean", weight))


def fit(root: Path) -> dict:
    detector = SpadeDetector(SpadeConfig()).fit(read_train(root))
    samples = read_test(root)
    held_knn, held_maps = input_maps(detector, detector.holdout)
    test_knn, test_maps = input_maps(detector, [s.path for s in samples])
    labels = np.array([s.is_anomalous for s in samples])
    return dict(
        detector=detector, held_knn=held_knn, held_maps=held_maps, test_knn=test_knn, test_maps=test_maps, labels=labels
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", nargs="+", type=Path, default=[SHARED / name for name in SETS])
    parser.add_argument("--tops", nargs="+", type=float, default=[0.0, 0.002, 0.003, 0.004, 0.005, 0.0075, 0.01])
    parser.add_argument("--weights", nargs="+", type=float, default=[1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0])
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    configure_threads(args.threads)
    fitted = {root.name: fit(root) for root in args.data}
    print("| score_top | map_weight | " + " | ".join(fitted) + " | mean |")
    print("|---" * (len(fitted) + 3) + "|")
    for top, weight in itertools.product(args.tops, args.weights):
        aurocs = [rescore(f, top, weight) for f in fitted.values()]
        cells = " | ".join(f"{a:.4f}" for a in aurocs)
        print(f"| {top:g} | {weight:g} | {cells} | {np.mean(aurocs):.4f} |", flush=True)


if __name__ == "__main__":
    main()
