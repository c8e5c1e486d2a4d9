"""End-to-end CPU throughput: bank building and predict, with and without segmentation.

    python benchmarks/bench_throughput.py --data ../shared/data/mvtec_bottle [--threads 2] [--profile]

Build: feature extraction images/s per batch size (inference mode, decoding included).
Predict: per-image latency at batch 1 from encoded bytes (decoding included) for segment="none"
(stage 1), "auto" (the default gate) and "all"; and images/s at batch 16.
--profile prints the top of a cProfile of predict(segment="all").
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import time
from pathlib import Path

import numpy as np

from mlflow_knn_anomaly import SpadeConfig, SpadeDetector
from mlflow_knn_anomaly.algorithm.images import prepare
from mlflow_knn_anomaly.evaluation.datasets import make_synthetic, read_test, read_train
from mlflow_knn_anomaly.runtime import configure_threads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, default=None, help="MVTec-layout folder (default: synthetic)")
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--config", default="{}", help="SpadeConfig fields as JSON")
    parser.add_argument("--profile", action="store_true")
    args = parser.parse_args()
    import json

    threads = configure_threads(args.threads)
    root = args.data or make_synthetic(Path("/tmp/mka-synthetic"), seed=0)
    config = SpadeConfig(**json.loads(args.config))
    train, test = read_train(root), read_test(root)
    print(f"data={root} threads={threads} config={args.config}")

    detector = SpadeDetector(config)
    print("| build batch size | images/s |\n|---|---|")
    for batch in (1, 2, 4, 8, 16, 32):
        start = time.perf_counter()
        for i in range(0, len(train), batch):
            inputs, _ = prepare(train[i : i + batch], config.resize, config.crop, config.keep_aspect)
            detector.extract(inputs)
        print(f"| {batch} | {len(train) / (time.perf_counter() - start):.1f} |", flush=True)

    start = time.perf_counter()
    detector.fit(train)
    print(f"fit (extraction + calibration) of {len(train)} images: {time.perf_counter() - start:.1f} s")

    blobs = [s.path.read_bytes() for s in test]
    print("| predict | segment | ms/image p50 | ms/image p95 | images/s | share segmented |\n|---|---|---|---|---|---|")
    for segment in ("none", "auto", "all"):
        latencies, segmented = [], 0
        for blob in blobs:
            t = time.perf_counter()
            segmented += int(detector.predict([blob], segment=segment).segmented[0])
            latencies.append(1000 * (time.perf_counter() - t))
        start = time.perf_counter()
        for i in range(0, len(blobs), 16):
            detector.predict(blobs[i : i + 16], segment=segment)
        rate = len(blobs) / (time.perf_counter() - start)
        p50, p95 = np.percentile(latencies, [50, 95])
        print(
            f"| batch 1 / 16 | {segment} | {p50:.0f} | {p95:.0f} | {rate:.1f} | {segmented / len(blobs):.2f} |",
            flush=True,
        )

    if args.profile:
        profiler = cProfile.Profile()
        profiler.enable()
        detector.predict(blobs[:20], segment="all")
        profiler.disable()
        pstats.Stats(profiler).sort_stats("cumulative").print_stats(18)


if __name__ == "__main__":
    main()
