"""Could `score_fusion` be chosen per dataset at fit time, from synthetic anomalies? A study.

    python benchmarks/studies/fusion_from_synthetic.py --threads 2    # the five shared sets, ~6 min

Fits the default detector on each set, then scores its held-out normal images and anomalies made
from them by both stages (segment="all"): the product's synthetic families at the gate's size and
at CutPaste's (x1), and two global changes (the image flipped upside down, rotated by 90 degrees).
Prints, per family, the ROCAUC of each fusion between the held-out normals and those anomalies:
the fusion an "auto" setting would pick. Compare with the real test sets' choice
(`score_fusion.py`, benchmarks/studies/score_fusion.md).
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
from PIL import ImageOps

from mlflow_knn_anomaly import SpadeDetector
from mlflow_knn_anomaly.algorithm.calibration import synthetic_anomalies
from mlflow_knn_anomaly.algorithm.spade import fuse_scores
from mlflow_knn_anomaly.evaluation.datasets import read_train
from mlflow_knn_anomaly.evaluation.metrics import image_auroc
from mlflow_knn_anomaly.runtime import configure_threads

SHARED = Path(__file__).resolve().parents[3] / "shared" / "data"
SETS = ("mvtec_bottle", "magnetic_tile", "mpdd_metal_plate", "mvtec_transistor", "elpv")
FUSIONS = ("map", "mean", "max")


def families(holdout: list) -> dict[str, list]:
    return {
        "synthetic (gate size)": synthetic_anomalies(holdout),
        "synthetic x1": synthetic_anomalies(holdout, scale=1.0),
        "flipped": [ImageOps.flip(image) for image in holdout],
        "rotated 90": [image.rotate(90) for image in holdout],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", nargs="+", type=Path, default=[SHARED / name for name in SETS])
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    configure_threads(args.threads)
    print("| data | anomalies | " + " | ".join(f"ROCAUC, {f}" for f in FUSIONS) + " |\n|---|---|---|---|---|")
    for data in args.data:
        detector = SpadeDetector().fit(read_train(data))
        stats = detector.calibration.to_dict()
        normal = detector.predict(detector.holdout, segment="all")
        for family, images in families(detector.holdout).items():
            made = detector.predict(images, segment="all")
            labels = np.r_[np.zeros(len(normal.scores)), np.ones(len(made.scores))]
            cells = []
            for fusion in FUSIONS:
                scores = [
                    fuse_scores(p.knn_scores, p.map_scores, np.ones(len(p.scores), bool), stats, fusion, 1.0)
                    for p in (normal, made)
                ]
                cells.append(f"{image_auroc(labels, np.concatenate(scores)):.3f}")
            print(f"| {data.name} | {family} | " + " | ".join(cells) + " |", flush=True)


if __name__ == "__main__":
    main()
