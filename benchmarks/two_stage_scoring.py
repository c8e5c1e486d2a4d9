"""How to combine the two stages into one image score, measured offline on one set of maps.

    python benchmarks/two_stage_scoring.py ../shared/data/magnetic_tile

Fits the default detector, segments the held-out normal images and every test image once, then
compares image ROCAUC of: the stage-1 score; the map maximum (with and without a border margin
of 16/256 of each side); and two ways of mixing them behind a stage-1 gate at
mean + c x std of the held-out stage-1 scores: a linear rescale of the gate onto the image
threshold ("lin-mix", an earlier design) and z-scores of held-out normals ("z-mix", the design
used by score_mode="two_stage").
"""

from __future__ import annotations

import sys

import numpy as np

from mlflow_knn_anomaly import SpadeConfig, SpadeDetector
from mlflow_knn_anomaly.datasets import read_test, read_train
from mlflow_knn_anomaly.metrics import image_auroc
from mlflow_knn_anomaly.runtime import configure_threads
from mlflow_knn_anomaly.spade import split_holdout


def main(root: str) -> None:
    configure_threads()
    config = SpadeConfig()
    train = read_train(root)
    detector = SpadeDetector(config).fit(train)
    _, holdout = split_holdout(train, config)

    def scores(paths):
        prediction = detector.predict(paths, segment="all")
        maxima = np.array([m.max() for m in prediction.anomaly_maps])
        inner = []
        for m in prediction.anomaly_maps:
            dy, dx = int(m.shape[0] * 16 / 256), int(m.shape[1] * 16 / 256)
            inner.append(m[dy : m.shape[0] - dy, dx : m.shape[1] - dx].max())
        return prediction.knn_scores, maxima, np.array(inner)

    hk, hm, hmm = scores(holdout)
    samples = read_test(root)
    y = np.array([s.is_anomalous for s in samples])
    tk, tm, tmm = scores([s.path for s in samples])
    print(
        f"{root}: stage 1 {image_auroc(y, tk):.4f}, map max {image_auroc(y, tm):.4f}, "
        f"map max with margin {image_auroc(y, tmm):.4f}"
    )
    print("| map score | c | stage-2 share | z-mix | lin-mix |\n|---|---|---|---|---|")
    for name, h_map, t_map in (("max", hm, tm), ("max with margin", hmm, tmm)):
        z_knn = (tk - hk.mean()) / hk.std(ddof=1)
        z_map = (t_map - h_map.mean()) / h_map.std(ddof=1)
        for c in (-1.0, -0.5, 0.0, 1.0):
            candidate = z_knn >= c
            z_mix = np.where(candidate, z_map, z_knn)
            lin_mix = np.where(
                candidate, t_map / (h_map.mean() + 3 * h_map.std(ddof=1)), tk / (hk.mean() + c * hk.std(ddof=1))
            )
            print(
                f"| {name} | {c} | {candidate.mean():.2f} | "
                f"{image_auroc(y, z_mix):.4f} | {image_auroc(y, lin_mix):.4f} |"
            )


if __name__ == "__main__":
    main(sys.argv[1])
