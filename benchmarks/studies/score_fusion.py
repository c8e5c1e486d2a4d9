"""Image-score fusions of the two stages, from per-image scores dumped by accuracy.py --dump.

    python benchmarks/accuracy.py --threads 2 --variants default --dump /tmp/scores
    python benchmarks/studies/score_fusion.py /tmp/scores

Scores are z-scores of the held-out normal images (stage 1: knn, stage 2: map). An image past the
gate is scored by the fusion; the others by their stage-1 z-score (as the product does).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from mlflow_knn_anomaly.evaluation.metrics import image_auroc

FUSIONS = {
    "map (product)": lambda zk, zm: zm,
    "max(map, knn)": lambda zk, zm: np.maximum(zm, zk),
    "mean(map, knn)": lambda zk, zm: (zm + zk) / 2,
    "knn": lambda zk, zm: zk,
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("folder", type=Path)
    args = parser.parse_args()
    names = [f"{f}, {g}" for g in ("gate", "gate open") for f in FUSIONS if f != "knn"]
    print("| data | variant | gate passes (normal / anomalous) | " + " | ".join(names) + " | knn |")
    print("|---" * (len(names) + 4) + "|")
    for dump in sorted(args.folder.glob("*.npz")):
        d = np.load(dump)
        cal = json.loads(str(d["calibration"]))
        labels = d["labels"].astype(bool)
        z_knn = (d["knn"] - cal["knn_mean"]) / cal["knn_std"]
        z_map = (d["map"] - cal["map_mean"]) / cal["map_std"]
        gate = d["knn"] >= cal["gate_threshold"]
        cells = [
            f"{image_auroc(labels, np.where(passed, f(z_knn, z_map), z_knn)):.4f}"
            for passed in (gate, np.ones_like(gate))
            for name, f in FUSIONS.items()
            if name != "knn"
        ]
        data, variant = dump.stem.split("__")
        passes = f"{gate[~labels].mean():.2f} / {gate[labels].mean():.2f}"
        print(f"| {data} | {variant} | {passes} | " + " | ".join(cells) + f" | {image_auroc(labels, z_knn):.4f} |")


if __name__ == "__main__":
    main()
