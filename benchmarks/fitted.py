"""What the per-dataset benchmarks share: `--data` / `--threads` and the default detector fitted on
the folder's train images."""

from __future__ import annotations

import argparse
from pathlib import Path

from mlflow_knn_anomaly import SpadeDetector
from mlflow_knn_anomaly.datasets import read_train
from mlflow_knn_anomaly.runtime import configure_threads


def data_parser(doc: str) -> argparse.ArgumentParser:
    """A parser described by the first line of `doc`, with --data (required) and --threads."""
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="an MVTec-layout folder")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: the free cores)")
    return parser


def fitted_detector(args: argparse.Namespace) -> tuple[int, SpadeDetector]:
    """(threads in use, the default detector fitted on <data>/train/good) for parsed `args`."""
    threads = configure_threads(args.threads)
    return threads, SpadeDetector().fit(read_train(args.data))
