"""What the per-dataset benchmarks share: `--data` / `--threads` / `--set` and the detector (the
default, or with the `--set` changes) fitted on the folder's train images."""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from pathlib import Path

import torch

from mlflow_knn_anomaly import SpadeConfig, SpadeDetector
from mlflow_knn_anomaly.evaluation.datasets import TestSample, read_train
from mlflow_knn_anomaly.runtime import configure_threads


def data_parser(doc: str) -> argparse.ArgumentParser:
    """A parser described by the first line of `doc`, with --data (required) and --threads."""
    parser = argparse.ArgumentParser(description=doc.split("\n")[0])
    parser.add_argument("--data", type=Path, required=True, help="an MVTec-layout folder")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: the free cores)")
    parser.add_argument("--set", nargs="*", default=[], metavar="NAME=VALUE", help="settings changed from the default")
    return parser


def _setting(item: str) -> tuple[str, object]:
    """("k_images", 2) from "k_images=2"; a value that is not JSON stays a string."""
    name, _, value = item.partition("=")
    try:
        return name, json.loads(value)
    except json.JSONDecodeError:
        return name, value


def fitted_detector(args: argparse.Namespace) -> tuple[int, SpadeDetector]:
    """(threads in use, the detector fitted on <data>/train/good) for parsed `args`."""
    threads = configure_threads(args.threads)
    config = SpadeConfig(**dict(_setting(item) for item in args.set))
    return threads, SpadeDetector(config).fit(read_train(args.data))


def layer_searches(det: SpadeDetector, samples: list[TestSample]) -> Iterator[tuple]:
    """What stage 2 searches, image after image and layer after layer: (a row label "name (P x M, C
    ch)", the layer's name, its (C, h, w) features, the (P, C) row-major query, the (M, C) gallery
    of the nearest images, and the image's nearest bank images from stage 1)."""
    counts = det.config.gallery_images()
    for sample in samples:
        inputs, _ = det._prepare([sample.path])
        pooled, features = det.extract(inputs)
        _, nn_indices = det.stage1(pooled)
        for name, fmap in features[0].items():
            c = fmap.shape[0]
            gallery = det.bank.gallery(name, nn_indices[0][: counts[name]])
            query = fmap.float().permute(1, 2, 0).reshape(-1, c).contiguous()
            label = f"{name} ({query.shape[0]} x {gallery.shape[0]}, {c} ch)"
            yield label, name, fmap, query, torch.as_tensor(gallery), nn_indices[0]
