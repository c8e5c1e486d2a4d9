"""Accuracy of every option tried, on MVTec-layout folders, as a markdown table.

    python benchmarks/accuracy.py --data ../shared/data/mvtec_bottle ../shared/data/magnetic_tile \
        --variants paper crop0 crop0_two_stage --out benchmarks/results/accuracy.md

Image score = the one the product reports (score_mode). Pixel metrics over every test image
(segment="all"), at each image's own resolution. Predict times are per image, over up to 60 test
images spread evenly, in segment="auto" (the product default) and segment="none" (stage 1 only).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from mlflow_knn_anomaly import SpadeConfig, SpadeDetector
from mlflow_knn_anomaly.datasets import read_test, read_train
from mlflow_knn_anomaly.evaluation import evaluate
from mlflow_knn_anomaly.runtime import configure_threads

VARIANTS: dict[str, dict] = {
    "default": {},
    "default_knn": {"score_mode": "knn"},
    "default_candidate_-0.5": {"candidate_sigmas": -0.5},
    "default_reduce16": {"reduce_channels": 16},
    "default_reduce8": {"reduce_channels": 8},
    "paper": {"crop": 224, "feature_pool": 1, "score_mode": "knn"},
    "paper_pool3": {"crop": 224, "feature_pool": 3, "score_mode": "knn"},
    "crop0": {"crop": 0, "score_mode": "knn"},
    "default_pool1": {"feature_pool": 1},
    "default_k10": {"k_images": 10},
    "default_kappa3": {"kappa": 3},
    "default_r224": {"resize": 224, "score_margin": 14},
    "default_r320": {"resize": 320, "score_margin": 20},
    "default_lite2": {"backbone": "efficientnet_lite2"},
}
COLUMNS = (
    "image AUROC",
    "stage-1 AUROC",
    "pixel AUROC",
    "AUPRO@0.3",
    "stage-2 share",
    "fit s",
    "ms/img auto",
    "ms/img stage 1",
)


def per_image_ms(detector: SpadeDetector, paths: list[Path], segment: str) -> float:
    start = time.perf_counter()
    detector.predict(paths, segment=segment)
    return 1000 * (time.perf_counter() - start) / len(paths)


def run(data: Path, name: str) -> dict[str, float]:
    config = SpadeConfig(**VARIANTS[name])
    start = time.perf_counter()
    detector = SpadeDetector(config).fit(read_train(data))
    fit_seconds = time.perf_counter() - start
    figures = evaluate(detector, data).metrics
    samples = read_test(data)
    step = max(1, len(samples) // 60)
    paths = [s.path for s in samples[::step]]
    return {
        "image AUROC": figures["image_auroc"],
        "stage-1 AUROC": figures["knn_image_auroc"],
        "pixel AUROC": figures["pixel_auroc"],
        "AUPRO@0.3": figures["aupro"],
        "stage-2 share": figures["stage2_share"],
        "fit s": fit_seconds,
        "ms/img auto": per_image_ms(detector, paths, "auto"),
        "ms/img stage 1": per_image_ms(detector, paths, "none"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", nargs="+", type=Path, required=True)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/accuracy.md"))
    args = parser.parse_args()
    threads = configure_threads(args.threads)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if not args.out.exists():
        args.out.write_text(
            "| data | variant | settings | " + " | ".join(COLUMNS) + " |\n" + "|---" * (len(COLUMNS) + 3) + "|\n"
        )
    for data in args.data:
        for name in args.variants:
            row = run(data, name)
            cells = [
                f"{row[c]:.4f}" if "AUROC" in c or "AUPRO" in c or "share" in c else f"{row[c]:.0f}" for c in COLUMNS
            ]
            line = f"| {data.name} | {name} | `{json.dumps(VARIANTS[name])}` | " + " | ".join(cells) + " |"
            print(line, f"(threads={threads})", flush=True)
            with args.out.open("a") as handle:
                handle.write(line + "\n")


if __name__ == "__main__":
    main()
