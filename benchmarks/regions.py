"""Defect regions on the shared sets with masks: region figures per `min_region_area`, and their cost.

    python benchmarks/regions.py --threads 2

Per set (default: MVTec bottle, Magnetic Tile, MPDD metal_plate), the default detector is fitted
on train/good and every test image is segmented once (`evaluate_samples`, so image ROCAUC, pixel
ROCAUC and AUPRO are the product's own figures, read off the maps and independent of the regions).
The regions are then read off those maps at the calibrated pixel threshold for each
`min_region_area` of the grid: region recall (a ground-truth region counts as found when the
predicted pixels cover 30 % of it, `regions.region_metrics`), false regions per normal and per
anomalous image. Cost: p50 of the pyfunc's predict, one image per call, segment="all", with the
regions against the same calls with region finding replaced by a bare threshold (alternating calls).
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import mlflow
import numpy as np
import pandas as pd

from mlflow_knn_anomaly import SpadeDetector, save_model
from mlflow_knn_anomaly.algorithm import spade
from mlflow_knn_anomaly.algorithm.regions import find_regions, region_metrics
from mlflow_knn_anomaly.evaluation.datasets import read_train
from mlflow_knn_anomaly.evaluation.evaluate import evaluate_samples, read_samples
from mlflow_knn_anomaly.mlops import pyfunc_model
from mlflow_knn_anomaly.runtime import configure_threads

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
SETS = ("mvtec_bottle", "magnetic_tile", "mpdd_metal_plate")
GRID = (0.0, 0.0002, 0.0005, 0.001, 0.002, 0.005)


def region_table(name: str, detector: SpadeDetector) -> list[dict]:
    samples = read_samples(SHARED / name)
    result = evaluate_samples(detector, samples)
    pixel_t = detector.thresholds()[1]
    m = result.metrics
    print(f"{name}: image ROCAUC {m['image_auroc']:.4f}, pixel ROCAUC {m['pixel_auroc']:.4f}, "
          f"AUPRO {m['aupro']:.4f} (the same for every min_region_area: read off the same maps)")  # fmt: skip
    rows = []
    for area in GRID:
        masks = [find_regions(amap, pixel_t, area)[1] for amap in result.anomaly_maps]
        rows.append({"set": name, "min_region_area": area, **region_metrics(masks, result.gt_masks)})
    return rows


def cost(name: str, detector: SpadeDetector, calls: int, threads: int) -> tuple[float, float]:
    """(p50 ms with regions, p50 ms with a bare threshold) of one-image pyfunc calls."""
    with tempfile.TemporaryDirectory() as tmp:
        save_model(detector, Path(tmp) / "model")
        model = mlflow.pyfunc.load_model(str(Path(tmp) / "model"))
        configure_threads(threads)  # the loader sized threads for serving, to the cores free at load
        images = [s.image.read_bytes() for s in read_samples(SHARED / name) if s.is_anomalous][:calls]
        real_find, real_encode = spade.find_regions, pyfunc_model.encode_regions
        timings = {True: [], False: []}
        for i, image in enumerate(images * 2):
            with_regions = i % 2 == 0
            if not with_regions:
                spade.find_regions = lambda amap, t, area, roi=None: ([], amap >= t)
                pyfunc_model.encode_regions = lambda regions: "[]"
            start = time.perf_counter()
            model.predict(pd.DataFrame({"image": [image]}), params={"segment": "all"})
            timings[with_regions].append(1000 * (time.perf_counter() - start))
            spade.find_regions, pyfunc_model.encode_regions = real_find, real_encode
        return float(np.median(timings[True])), float(np.median(timings[False]))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--sets", nargs="*", default=list(SETS))
    parser.add_argument("--calls", type=int, default=20, help="one-image calls per variant for the cost")
    args = parser.parse_args()
    threads = configure_threads(args.threads)
    print(f"{threads} threads\n")
    rows, costs = [], {}
    for name in args.sets:
        detector = SpadeDetector().fit(read_train(SHARED / name))
        rows += region_table(name, detector)
        costs[name] = cost(name, detector, args.calls, threads)
    print("\n| set | min_region_area | region recall | false regions / normal image | / anomalous image "
          "| predicted regions |\n|---|---|---|---|---|---|")  # fmt: skip
    for r in rows:
        print(f"| {r['set']} | {r['min_region_area']:g} | {r['region_recall']:.3f} "
              f"| {r['false_regions_per_normal_image']:.3f} | {r['false_regions_per_anomalous_image']:.3f} "
              f"| {r['n_pred_regions']:.0f} |")  # fmt: skip
    print("\n| set | predict p50 ms, with regions | with a bare threshold | regions' share |\n|---|---|---|---|")
    for name, (with_regions, bare) in costs.items():
        print(f"| {name} | {with_regions:.1f} | {bare:.1f} | {(with_regions - bare) / bare:+.1%} |")


if __name__ == "__main__":
    main()
