"""Could the input size be chosen per dataset at fit time, from synthetic anomalies? A study.

    python benchmarks/studies/resize_from_synthetic.py --threads 2    # the five shared sets, ~13 min

For each set and each `resize`, fits the detector (defaults otherwise), makes the product's
synthetic anomalies from its held-out normal images (`calibration.synthetic_anomalies`: cut-paste,
blob, scratch) and segments the normals and the anomalies (segment="all"). The ground truth of an
anomaly is the set of pixels the synthesis changed. Prints, per set and size, the synthetic image
ROCAUC (the product's score), pixel ROCAUC and AUPRO@0.3: the size a `resize="auto"` would pick.
Compare with the real test sets at 256 and 384 (benchmarks/studies/resize_from_synthetic.md).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np

from mlflow_knn_anomaly import SpadeConfig, SpadeDetector
from mlflow_knn_anomaly.algorithm.calibration import synthetic_anomalies
from mlflow_knn_anomaly.algorithm.images import to_rgb
from mlflow_knn_anomaly.evaluation import metrics
from mlflow_knn_anomaly.evaluation.datasets import read_train
from mlflow_knn_anomaly.runtime import configure_threads

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"
SETS = ("mvtec_bottle", "magnetic_tile", "mpdd_metal_plate", "mvtec_transistor", "elpv")


def changed(original, made) -> np.ndarray:
    """(H, W) bool: the pixels the synthesis changed."""
    a = np.asarray(to_rgb(original), dtype=np.int16)
    b = np.asarray(to_rgb(made), dtype=np.int16)
    return np.abs(a - b).max(axis=2) > 0


def figures(root: Path, resize: int) -> dict[str, float]:
    config = SpadeConfig(resize=resize, score_margin=SpadeConfig().score_margin * resize // 256)
    detector = SpadeDetector(config).fit(read_train(root))
    normal = detector.holdout
    made = synthetic_anomalies(normal)
    originals = [image for image in normal for _ in range(3)]  # three anomalies per normal image
    prediction = detector.predict(normal + made, segment="all")
    labels = np.r_[np.zeros(len(normal)), np.ones(len(made))]
    masks = [np.zeros(m.shape, bool) for m in prediction.anomaly_maps[: len(normal)]]
    masks += [changed(o, m) for o, m in zip(originals, made)]
    return {
        "image": metrics.image_auroc(labels, prediction.scores),
        "pixel": metrics.pixel_auroc(masks, prediction.anomaly_maps),
        "aupro": metrics.aupro(masks, prediction.anomaly_maps),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", nargs="+", type=Path, default=[SHARED / name for name in SETS])
    parser.add_argument("--sizes", nargs="+", type=int, default=[256, 384])
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    configure_threads(args.threads)
    print("| data | resize | synthetic image ROCAUC | pixel ROCAUC | AUPRO@0.3 |\n|---|---|---|---|---|")
    for data in args.data:
        for size in args.sizes:
            f = figures(data, size)
            print(f"| {data.name} | {size} | {f['image']:.4f} | {f['pixel']:.4f} | {f['aupro']:.4f} |", flush=True)


if __name__ == "__main__":
    main()
