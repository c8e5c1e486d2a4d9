"""Spark batch scoring throughput against in-process predict on the same images.

    python benchmarks/bench_spark.py --data ../shared/data/mvtec_bottle
    deploy/services.sh start spark && . mlflow-team/client.env   # a standalone master, 2 one-core workers
    python benchmarks/bench_spark.py --data ../shared/data/mvtec_bottle --master local[2] "$SPARK_MASTER_URL"

Fits the default detector on <data>/train/good, saves it as an MLflow model, then scores
<data>/test in process and on each master in turn. The per-job overhead is the time of a Spark
job over a single image, once the executors are warm.
"""

from __future__ import annotations

import argparse
import shutil
import tempfile
import time
from pathlib import Path

from mlflow_knn_anomaly import SpadeDetector, save_model
from mlflow_knn_anomaly.evaluation.datasets import read_test, read_train
from mlflow_knn_anomaly.mlops.spark import score, session
from mlflow_knn_anomaly.runtime import configure_threads


def bench_master(master: str, model: Path, one: Path, test: Path, tmp: Path) -> tuple[int, float, float]:
    """(rows, seconds for the test set, seconds for one image) on one Spark master, warm."""
    spark = session(master)
    try:
        score(spark, str(model), str(one), str(tmp / "warm.parquet"))  # JVMs and Python workers warm
        start = time.perf_counter()
        score(spark, str(model), str(one), str(tmp / "one.parquet"))
        overhead = time.perf_counter() - start
        start = time.perf_counter()
        rows = score(spark, str(model), str(test), str(tmp / "all.parquet"))
        return rows, time.perf_counter() - start, overhead
    finally:
        spark.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--data", type=Path, required=True)
    parser.add_argument("--master", nargs="+", default=["local[2]"], help="one or more Spark masters")
    parser.add_argument("--threads", type=int, default=None, help="in-process threads (default: the free cores)")
    args = parser.parse_args()
    configure_threads(args.threads)  # torch's own default, every core, crawls on a busy machine
    detector = SpadeDetector().fit(read_train(args.data))
    paths = [s.path for s in read_test(args.data)]
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        save_model(detector, tmp / "model")
        one = tmp / "one"
        one.mkdir()
        shutil.copy(paths[0], one / paths[0].name)
        results = {m: bench_master(m, tmp / "model", one, args.data / "test", tmp) for m in args.master}
    start = time.perf_counter()
    detector.predict(paths)
    local_seconds = time.perf_counter() - start
    print(f"| in-process predict (segment=auto) | {len(paths) / local_seconds:.1f} images/s |")
    for master, (rows, seconds, overhead) in results.items():
        print(f"| Spark {master}, spark_udf | {rows / seconds:.1f} images/s ({rows} images, {seconds:.1f} s) |")
        print(f"| Spark {master}: a job over 1 image (per-job overhead) | {overhead:.1f} s |")


if __name__ == "__main__":
    main()
