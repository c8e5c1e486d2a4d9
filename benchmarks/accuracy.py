"""Accuracy of every option tried, on MVTec-layout folders, as a markdown table.

    python benchmarks/accuracy.py --data ../shared/data/mvtec_bottle ../shared/data/magnetic_tile \
        --variants default squash paper --threads 2 --out benchmarks/results/accuracy.md

Image score = the one the product reports (score_mode). Pixel metrics over every test image
(segment="all"), at each image's own resolution and (@256) with maps and masks resized to
256 x 256 as anomalib evaluates them. Variants are changes to the default SpadeConfig.
Predict times are per image, over up to 60 test images spread evenly, in segment="auto"
(the product default) and segment="none" (stage 1 only).
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

LITE0_STRIDES_4_TO_16 = ["blocks.1", "blocks.2", "blocks.4"]
LITE0_STRIDES_8_TO_32 = ["blocks.2", "blocks.4", "blocks.6"]
# The defaults before v0.3: strides 4-16, the paper's average of the layers, one gallery, sigma 4.
PREVIOUS = {"layers": LITE0_STRIDES_4_TO_16, "layer_combine": "mean", "scale_gallery": False, "sigma": 4.0}
VARIANTS: dict[str, dict] = {
    "default": {},
    "default_knn": {"score_mode": "knn"},
    "previous_default": PREVIOUS,
    "strides_4_to_16": {"layers": LITE0_STRIDES_4_TO_16, "sigma": 4.0},
    "strides_4_to_16_mean": {"layers": LITE0_STRIDES_4_TO_16, "sigma": 4.0, "layer_combine": "mean"},
    "strides_4_to_16_same_gallery": {"layers": LITE0_STRIDES_4_TO_16, "sigma": 4.0, "scale_gallery": False},
    "strides_8_to_32": {"layers": LITE0_STRIDES_8_TO_32},
    "sigma4": {"sigma": 4.0},
    "mean": {"layer_combine": "mean"},
    "same_gallery": {"scale_gallery": False},
    "paper": {"keep_aspect": False, "crop": 224, "feature_pool": 1, "score_mode": "knn", **PREVIOUS},
    "squash": {"keep_aspect": False},
    "r288": {"resize": 288, "score_margin": 18},
    "candidate_-0.5": {"candidate_sigmas": -0.5},
    "reduce16": {"reduce_channels": 16},
    "pool1": {"feature_pool": 1},
    "k3": {"k_images": 3},
    "k10": {"k_images": 10},
    "kappa3": {"kappa": 3},
    "r224": {"resize": 224, "score_margin": 14},
    "r320": {"resize": 320, "score_margin": 20},
    "lite1": {"backbone": "efficientnet_lite1"},
    "lite2": {"backbone": "efficientnet_lite2"},
}
COLUMNS = (
    "image AUROC",
    "stage-1 AUROC",
    "pixel AUROC",
    "AUPRO@0.3",
    "pixel AUROC@256",
    "AUPRO@256",
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
    evaluation = evaluate(detector, data)
    figures = evaluation.metrics
    samples = read_test(data)
    step = max(1, len(samples) // 60)
    paths = [s.path for s in samples[::step]]
    return {
        "image AUROC": figures["image_auroc"],
        "stage-1 AUROC": figures["knn_image_auroc"],
        "pixel AUROC": figures["pixel_auroc"],
        "AUPRO@0.3": figures["aupro"],
        "pixel AUROC@256": figures["pixel_auroc_256"],
        "AUPRO@256": figures["aupro_256"],
        "stage-2 share": figures["stage2_share"],
        "fit s": fit_seconds,
        "ms/img auto": per_image_ms(detector, paths, "auto"),
        "ms/img stage 1": per_image_ms(detector, paths, "none"),
        "per_type": {kind: (f["pixel_auroc"], f["aupro"]) for kind, f in evaluation.per_type.items()},
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", nargs="+", type=Path, required=True)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--per-type", action="store_true", help="also print pixel AUROC / AUPRO per defect type")
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
            if args.per_type:  # each defect type with the normal test images, at own resolution
                print({kind: (round(p, 3), round(a, 3)) for kind, (p, a) in row["per_type"].items()}, flush=True)
            with args.out.open("a") as handle:
                handle.write(line + "\n")


if __name__ == "__main__":
    main()
