"""Throughput on a stream of inspection images: 95 % normal, 5 % anomalous (test images, repeated).

    python benchmarks/bench_stream.py --threads 2 --data ../shared/data/mvtec_bottle

Reports images/s and ms/image (decoding included) for stage 1 only (segment="none"), the
default gate (segment="auto") and segmenting every image (segment="all"), each with the maps
returned and (0.5.0 on) without them, as serving returns masks and regions, plus ms/image on the
normal and on the anomalous test images alone with the default gate. Runs with any release of
the package on PYTHONPATH (the API used is `SpadeDetector().fit(paths)` and `predict(paths, segment=...)`).
"""

from __future__ import annotations

import inspect
import time
from pathlib import Path

from fitted import data_parser, fitted_detector

from mlflow_knn_anomaly import SpadeDetector
from mlflow_knn_anomaly.evaluation.datasets import read_test


def stream(normal: list[Path], anomalous: list[Path], length: int) -> list[Path]:
    """`length` images, every 20th anomalous, the rest normal, each list cycled."""
    return [anomalous[i // 20 % len(anomalous)] if i % 20 == 19 else normal[i % len(normal)] for i in range(length)]


def ms_per_image(detector: SpadeDetector, paths: list[Path], segment: str, **options) -> float:
    detector.predict(paths[:4], segment=segment, **options)  # warm-up
    start = time.perf_counter()
    detector.predict(paths, segment=segment, **options)
    return 1000 * (time.perf_counter() - start) / len(paths)


def main() -> None:
    parser = data_parser(__doc__)
    parser.add_argument("--length", type=int, default=100)
    args = parser.parse_args()
    threads, detector = fitted_detector(args)
    samples = read_test(args.data)
    normal = [s.path for s in samples if not s.is_anomalous]
    anomalous = [s.path for s in samples if s.is_anomalous]
    paths = stream(normal, anomalous, args.length)
    print(f"{args.data.name}, {threads} threads, {len(paths)} images (95 % normal)")
    print("| mode | ms/image | images/s |\n|---|---|---|")
    maps = [True] + ([False] if "return_maps" in inspect.signature(detector.predict).parameters else [])
    for segment in ("none", "auto", "all"):
        for return_maps in maps if segment != "none" else [True]:
            options = {} if return_maps else {"return_maps": False}
            ms = ms_per_image(detector, paths, segment, **options)
            label = f"segment={segment}" + ("" if return_maps else ", no maps (what serving returns)")
            print(f"| {label} | {ms:.1f} | {1000 / ms:.1f} |", flush=True)
    for name, group in (("normal", normal), ("anomalous", anomalous)):
        print(f"| default gate, {name} test images only | {ms_per_image(detector, group[:40], 'auto'):.1f} | |")


if __name__ == "__main__":
    main()
