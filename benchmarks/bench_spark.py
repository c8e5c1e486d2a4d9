"""Spark batch scoring throughput on local[2] against in-process predict on the same images.

    python benchmarks/bench_spark.py --data ../shared/data/mvtec_bottle

Fits the default detector on <data>/train/good, saves it as an MLflow model, then scores
<data>/test both ways. The per-job overhead is the time of a Spark job over a single image.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from mlflow_knn_anomaly import SpadeDetector, save_model
from mlflow_knn_anomaly.datasets import read_test, read_train
from mlflow_knn_anomaly.spark import score, session


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--master", default="local[2]")
    args = parser.parse_args()
    detector = SpadeDetector().fit(read_train(args.data))
    paths = [s.path for s in read_test(args.data)]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        save_model(detector, tmp / "model")
        one = tmp / "one"
        one.mkdir()
        shutil.copy(paths[0], one / paths[0].name)
        spark = session(args.master)
        score(spark, str(tmp / "model"), str(one), str(tmp / "warm.parquet"))  # JVM and workers warm
        start = time.perf_counter()
        score(spark, str(tmp / "model"), str(one), str(tmp / "one.parquet"))
        overhead = time.perf_counter() - start
        start = time.perf_counter()
        rows = score(spark, str(tmp / "model"), str(args.data / "test"), str(tmp / "all.parquet"))
        spark_seconds = time.perf_counter() - start
        spark.stop()
    start = time.perf_counter()
    detector.predict(paths)
    local_seconds = time.perf_counter() - start
    print(f"| in-process predict (segment=auto) | {len(paths) / local_seconds:.1f} images/s |")
    print(
        f"| Spark {args.master}, spark_udf | {rows / spark_seconds:.1f} images/s "
        f"({rows} images, {spark_seconds:.1f} s) |"
    )
    print(f"| Spark job over 1 image (per-job overhead, model load included) | {overhead:.1f} s |")


if __name__ == "__main__":
    main()
