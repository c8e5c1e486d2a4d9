"""update_bank against a full build: time, and whether the updated detector scores the same.

    python benchmarks/bench_update_bank.py --threads 2 --data ../shared/data/mvtec_bottle --first 0.7

(a) a full build on every image of <data>/train/good; (b) a build on the first `--first` of the
sorted images, then `SpadeDetector.update` with the rest (what `update_bank` runs). Prints the
seconds of each step and, for (a) and (b), image ROCAUC, pixel ROCAUC and AUPRO@0.3 on <data>/test
with their differences (b) - (a).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

from mlflow_knn_anomaly import SpadeConfig, SpadeDetector
from mlflow_knn_anomaly.evaluation.datasets import read_train
from mlflow_knn_anomaly.evaluation.evaluate import evaluate
from mlflow_knn_anomaly.runtime import configure_threads

METRICS = {"image ROCAUC": "image_auroc", "pixel ROCAUC": "pixel_auroc", "AUPRO@0.3": "aupro"}


def timed(step, *args):
    """(result, seconds) of `step(*args)`."""
    start = time.perf_counter()
    result = step(*args)
    return result, time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--first", type=float, default=0.7, help="share of the sorted images built first")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    threads = configure_threads(args.threads)
    images = read_train(args.data)
    cut = round(args.first * len(images))
    full, full_s = timed(SpadeDetector(SpadeConfig()).fit, images)
    partial, partial_s = timed(SpadeDetector(SpadeConfig()).fit, images[:cut])
    updated, update_s = timed(partial.update, images[cut:])
    print(f"data={args.data} threads={threads} images={len(images)} first={cut} added={len(images) - cut}")
    print("| step | images | seconds | bank images | held out |")
    print("|---|---|---|---|---|")
    for name, detector, n, seconds in (
        ("(a) full build", full, len(images), full_s),
        ("(b) build on the first part", partial, cut, partial_s),
        ("(b) update with the rest", updated, len(images) - cut, update_s),
    ):
        print(f"| {name} | {n} | {seconds:.1f} | {detector.bank.n_images} | {len(detector.holdout)} |")
    scores = {name: evaluate(d, args.data, per_type_pixels=False).metrics for name, d in (("a", full), ("b", updated))}
    print("\n| metric | (a) full build | (b) build + update | (b) - (a) |")
    print("|---|---|---|---|")
    for label, key in METRICS.items():
        a, b = scores["a"][key], scores["b"][key]
        print(f"| {label} | {a:.4f} | {b:.4f} | {b - a:+.5f} |")


if __name__ == "__main__":
    main()
