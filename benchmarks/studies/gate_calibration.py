"""How the size of the synthetic anomalies and `gate_recall` set the stage-1 gate, judged on the
real test anomalies (per-image scores dumped by accuracy.py --dump; no stage 2 is recomputed).

    python benchmarks/accuracy.py --threads 1 --variants default --dump /tmp/scores
    python benchmarks/studies/gate_calibration.py --dump /tmp/scores mvtec_transistor elpv

For each set: the bank and its held-out images are rebuilt as `fit` does, the synthetic anomalies
are made at each size scale, and the gate at each recall is applied to the dumped test scores.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from mlflow_knn_anomaly import SpadeConfig, SpadeDetector
from mlflow_knn_anomaly.algorithm.calibration import recall_gate, synthetic_anomalies
from mlflow_knn_anomaly.algorithm.images import load_image
from mlflow_knn_anomaly.algorithm.spade import split_holdout
from mlflow_knn_anomaly.evaluation.datasets import read_train
from mlflow_knn_anomaly.evaluation.metrics import image_auroc
from mlflow_knn_anomaly.runtime import configure_threads

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("sets", nargs="+")
    parser.add_argument("--dump", type=Path, required=True)
    parser.add_argument("--scales", nargs="+", type=float, default=[1.0, 0.5, 0.25])
    parser.add_argument("--recalls", nargs="+", type=float, default=[0.98, 0.99])
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    configure_threads(args.threads)
    print("| data | scale | gate_recall | synthetic stage-1 AUROC | normal / anomalous test images past the gate "
          "| image AUROC (map) | image AUROC (mean fusion) |\n|---|---|---|---|---|---|---|")  # fmt: skip
    for name in args.sets:
        scores = np.load(args.dump / f"{name}__default.npz")
        stats = json.loads(str(scores["calibration"]))
        labels = scores["labels"].astype(bool)
        detector = SpadeDetector(SpadeConfig())
        bank_items, holdout = split_holdout(read_train(SHARED / name), detector.config)
        detector.use_bank(detector.build_bank(bank_items))
        images = [load_image(item) for item in holdout]
        normal = detector.stage1_scores(images)
        z_knn = (scores["knn"] - stats["knn_mean"]) / stats["knn_std"]
        z_map = (scores["map"] - stats["map_mean"]) / stats["map_std"]
        for scale in args.scales:
            synthetic = detector.stage1_scores(synthetic_anomalies(images, scale=scale))
            for recall in args.recalls:
                gate = recall_gate(normal, synthetic, recall)
                passed = scores["knn"] >= gate["gate_threshold"]
                auroc_map = image_auroc(labels, np.where(passed, z_map, z_knn))
                auroc_mean = image_auroc(labels, np.where(passed, (z_map + z_knn) / 2, z_knn))
                print(
                    f"| {name} | {scale} | {recall} | {gate['gate_synthetic_auroc']:.3f} | "
                    f"{passed[~labels].mean():.2f} / {passed[labels].mean():.3f} | "
                    f"{auroc_map:.4f} | {auroc_mean:.4f} |",
                    flush=True,
                )


if __name__ == "__main__":
    main()
