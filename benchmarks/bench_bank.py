"""Bank storage: float16 vs float32 accuracy and size, and the logged model's size and load time.

python benchmarks/bench_bank.py --data ../shared/data/mvtec_bottle [--config '{"crop": 0}']
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import mlflow

from mlflow_knn_anomaly import SpadeConfig, SpadeDetector, save_model
from mlflow_knn_anomaly.evaluation.datasets import read_train
from mlflow_knn_anomaly.evaluation.evaluate import evaluate
from mlflow_knn_anomaly.runtime import configure_threads


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--config", default="{}", help="SpadeConfig fields as JSON")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    threads = configure_threads(args.threads)
    base = json.loads(args.config)
    print(f"data={args.data} threads={threads} config={args.config}")
    print("| bank dtype | image AUROC | pixel AUROC | AUPRO@0.3 | bank MB | bytes per normal image |")
    print("|---|---|---|---|---|---|")
    detectors = {}
    for dtype in ("float32", "float16"):
        detector = SpadeDetector(SpadeConfig(**{**base, "bank_dtype": dtype})).fit(read_train(args.data))
        m = evaluate(detector, args.data).metrics
        bank = detector.bank
        print(
            f"| {dtype} | {m['image_auroc']:.4f} | {m['pixel_auroc']:.4f} | {m['aupro']:.4f} | "
            f"{bank.nbytes / 2**20:.1f} | {bank.nbytes / bank.n_images:,.0f} |",
            flush=True,
        )
        detectors[dtype] = detector
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "model"
        save_model(detectors["float16"], path)
        size = sum(f.stat().st_size for f in path.rglob("*") if f.is_file())
        start = time.perf_counter()
        mlflow.pyfunc.load_model(str(path))
        load = time.perf_counter() - start
        print(f"model directory (float16 bank, {detectors['float16'].bank.n_images} images): {size / 2**20:.1f} MB")
        print(f"mlflow.pyfunc.load_model: {load:.2f} s (sha256 of every artifact verified)")


if __name__ == "__main__":
    main()
