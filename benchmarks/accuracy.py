"""Accuracy of every option tried, on MVTec-layout folders, as a markdown table.

    python benchmarks/accuracy.py --threads 2 --variants default pool1   # the five shared sets
    python benchmarks/accuracy.py --threads 2 --data ../shared/data/mvtec_bottle --variants sigma4

Image score = the one the product reports (score_mode); "all-map" scores every image by its
anomaly map (what the gate must not lose against). Pixel metrics over every test image
(segment="all"), at each image's own resolution and (@256) with maps and masks resized to
256 x 256 as anomalib evaluates them; "–" where the set has image-level labels only. Variants are
changes to the default SpadeConfig. Predict times are per image in segment="auto" (the product
default) over up to 30 normal and 30 anomalous test images, and in segment="none" (stage 1 only).
"""

from __future__ import annotations

import argparse
import json
import math
import time
from pathlib import Path

import numpy as np

from mlflow_knn_anomaly import SpadeConfig, SpadeDetector
from mlflow_knn_anomaly.evaluation.datasets import read_test, read_train
from mlflow_knn_anomaly.evaluation.evaluate import evaluate
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
    "sigma1": {"sigma": 1.0},
    "sigma4": {"sigma": 4.0},
    "mean": {"layer_combine": "mean"},
    "same_gallery": {"scale_gallery": False},
    "paper": {"keep_aspect": False, "crop": 224, "feature_pool": 1, "score_mode": "knn", **PREVIOUS},
    "squash": {"keep_aspect": False},
    "r288": {"resize": 288, "score_margin": 18},
    "gate_open": {"gate_recall": 1.0},
    "gate_0.95": {"gate_recall": 0.95},
    "gate_0.9": {"gate_recall": 0.9},
    "stage1_pyramid": {"stage1_feature": "pyramid"},
    "gallery_last": {"gallery_feature": "last"},
    "fusion_max": {"score_fusion": "max"},
    "fusion_mean": {"score_fusion": "mean"},
    "map_weight1": {"map_weight": 1.0},
    "map_maximum": {"score_top": 0.0, "map_weight": 2.0},  # the image score of stop 21
    "fusion_map": {"score_fusion": "map"},
    "reduce16": {"reduce_channels": 16},
    "pool1": {"feature_pool": 1},
    "pool1_sigma4": {"feature_pool": 1, "sigma": 4.0},
    "k2": {"k_images": 2},
    "k3": {"k_images": 3},
    "k10": {"k_images": 10},
    "kappa3": {"kappa": 3},
    "margin8": {"score_margin": 8},
    "margin32": {"score_margin": 32},
    "r224": {"resize": 224, "score_margin": 14},
    "r320": {"resize": 320, "score_margin": 20},
    "r384": {"resize": 384, "score_margin": 24},
    "lite1": {"backbone": "efficientnet_lite1"},
    "lite2": {"backbone": "efficientnet_lite2"},
}
COLUMNS = (
    "image AUROC",
    "all-map AUROC",
    "stage-1 AUROC",
    "pixel AUROC",
    "AUPRO@0.3",
    "pixel AUROC@256",
    "AUPRO@256",
    "normal to stage 2",
    "anomalous to stage 2",
    "synthetic stage-1 AUROC",
    "fit s",
    "ms/img normal",
    "ms/img anomalous",
    "ms/img stage 1",
)
METRIC_OF = {
    "image AUROC": "image_auroc",
    "all-map AUROC": "map_image_auroc",
    "stage-1 AUROC": "knn_image_auroc",
    "pixel AUROC": "pixel_auroc",
    "AUPRO@0.3": "aupro",
    "pixel AUROC@256": "pixel_auroc_256",
    "AUPRO@256": "aupro_256",
    "normal to stage 2": "stage2_share_normal",
    "anomalous to stage 2": "stage2_share_anomalous",
}
TIMED_IMAGES = 30
DUMP: Path | None = None
PER_TYPE = False
SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
SHARED_SETS = [
    SHARED / name for name in ("mvtec_bottle", "magnetic_tile", "mpdd_metal_plate", "mvtec_transistor", "elpv")
]


def per_image_ms(detector: SpadeDetector, paths: list[Path], segment: str) -> float:
    start = time.perf_counter()
    detector.predict(paths, segment=segment)
    return 1000 * (time.perf_counter() - start) / len(paths)


def spread(items: list, n: int) -> list:
    """Up to n items spread evenly over the list."""
    return items[:: max(1, len(items) // n)][:n]


def run(data: Path, name: str) -> dict[str, float]:
    config = SpadeConfig(**VARIANTS[name])
    start = time.perf_counter()
    detector = SpadeDetector(config).fit(read_train(data))
    fit_seconds = time.perf_counter() - start
    evaluation = evaluate(detector, data, per_type_pixels=PER_TYPE)
    samples = read_test(data)
    if DUMP:  # per-image scores, to study the gate and the score fusion without recomputing maps
        DUMP.mkdir(parents=True, exist_ok=True)
        np.savez(
            DUMP / f"{data.name}__{name}.npz",
            labels=np.array([s.is_anomalous for s in samples]),
            types=np.array([s.defect_type for s in samples]),
            knn=evaluation.knn_scores,
            map=evaluation.map_scores,
            scores=evaluation.scores,
            calibration=json.dumps(detector.calibration.to_dict()),
        )
    normal = spread([s.path for s in samples if not s.is_anomalous], TIMED_IMAGES)
    anomalous = spread([s.path for s in samples if s.is_anomalous], TIMED_IMAGES)
    row = {column: evaluation.metrics.get(key, math.nan) for column, key in METRIC_OF.items()}
    return {
        **row,
        "synthetic stage-1 AUROC": detector.calibration.gate_synthetic_auroc,
        "fit s": fit_seconds,
        "ms/img normal": per_image_ms(detector, normal, "auto"),
        "ms/img anomalous": per_image_ms(detector, anomalous, "auto"),
        "ms/img stage 1": per_image_ms(detector, normal + anomalous, "none"),
        "per_type": evaluation.per_type,
    }


def cell(column: str, value: float) -> str:
    if math.isnan(value):
        return "–"
    return f"{value:.0f}" if column.startswith(("fit", "ms")) else f"{value:.4f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", nargs="+", type=Path, default=SHARED_SETS, help="default: the five shared sets")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--per-type", action="store_true", help="also print pixel AUROC / AUPRO per defect type")
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/accuracy_five.md"))
    parser.add_argument("--dump", type=Path, default=None, help="write per-image scores here (.npz)")
    args = parser.parse_args()
    global DUMP, PER_TYPE
    DUMP, PER_TYPE = args.dump, args.per_type
    threads = configure_threads(args.threads)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    if not args.out.exists():
        args.out.write_text(
            "| data | variant | settings | " + " | ".join(COLUMNS) + " |\n" + "|---" * (len(COLUMNS) + 3) + "|\n"
        )
    for name in args.variants:
        for data in args.data:
            row = run(data, name)
            cells = [cell(c, row[c]) for c in COLUMNS]
            line = f"| {data.name} | {name} | `{json.dumps(VARIANTS[name])}` | " + " | ".join(cells) + " |"
            print(line, f"(threads={threads})", flush=True)
            if args.per_type:  # each defect type with the normal test images, at own resolution
                print({k: {m: round(v, 3) for m, v in f.items()} for k, f in row["per_type"].items()}, flush=True)
            with args.out.open("a") as handle:
                handle.write(line + "\n")


if __name__ == "__main__":
    main()
