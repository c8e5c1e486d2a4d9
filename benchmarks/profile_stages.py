"""Where the time of one image goes, stage by stage (decoding to the encoded mask), in ms/image.

    python benchmarks/profile_stages.py --threads 2 --data ../shared/data/mvtec_bottle
    PYTHONPATH=<an older checkout> python benchmarks/profile_stages.py ...   # the same table for it

Fits the default detector on the folder's train images, then times each step of `predict` by hand
on its test images, one image at a time (the serving shape): decode, preprocessing, backbone,
stage-1 search; and for segmenting: gallery assembly and the pixel kNN per layer, combining the
layers (upsampling), smoothing, the map score, resizing to the image, the mask and its PNG
encoding. Steps run in the order `predict` runs them, on the same tensors.
"""

from __future__ import annotations

import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch
from fitted import data_parser, fitted_detector
from PIL import Image
from scipy.ndimage import gaussian_filter

from mlflow_knn_anomaly import SpadeDetector
from mlflow_knn_anomaly.algorithm import anomaly_map
from mlflow_knn_anomaly.algorithm.images import load_image, prepare
from mlflow_knn_anomaly.algorithm.knn import pixel_knn
from mlflow_knn_anomaly.evaluation.datasets import read_test
from mlflow_knn_anomaly.mlops.pyfunc_model import encode_mask


class Clock:
    """Accumulates wall time per step name."""

    def __init__(self) -> None:
        self.ms: dict[str, float] = defaultdict(float)

    def __call__(self, name: str, fn, *args):
        start = time.perf_counter()
        result = fn(*args)
        self.ms[name] += 1000 * (time.perf_counter() - start)
        return result


def profile_image(det: SpadeDetector, path: Path, clock: Clock) -> None:
    cfg = det.config
    image = clock("decode", lambda: load_image(path.read_bytes()))
    inputs, geometries = clock("preprocess", prepare, [image], cfg.resize, cfg.crop, cfg.keep_aspect)
    pooled, features = clock("backbone", det.extract, inputs)
    _, nn_indices = clock("stage-1 search", det.stage1, pooled)
    counts = cfg.gallery_images()
    distances = {}
    for name, fmap in features[0].items():
        gallery = clock("gallery assembly", det.bank.gallery, name, nn_indices[0][: counts[name]])
        c, h, w = fmap.shape
        pixels = fmap.float().permute(1, 2, 0).reshape(-1, c)
        distances[name] = clock(f"pixel kNN {name} ({c} ch)", pixel_knn, pixels, gallery, cfg.kappa).view(1, 1, h, w)
    size = geometries[0].input_shape
    scales = det.calibration.layer_scales if cfg.normalize_layers else None
    combine = anomaly_map.combine_layers
    raw = clock("combine layers (upsample)", combine, distances, size, cfg.layer_combine, 0.0, scales)
    smooth = clock("smooth", gaussian_filter, raw, cfg.sigma)
    clock("map score", anomaly_map.map_score, smooth, cfg.score_margin, cfg.score_top)
    full = clock("resize to image", geometries[0].to_image, torch.from_numpy(np.ascontiguousarray(smooth)))
    mask = clock("mask", lambda: full >= det.calibration.pixel_threshold)
    clock("mask PNG encoding", encode_mask, mask)


STAGE1 = ("decode", "preprocess", "backbone", "stage-1 search")


def main() -> None:
    parser = data_parser(__doc__)
    parser.add_argument("--images", type=int, default=30)
    args = parser.parse_args()
    threads, det = fitted_detector(args)
    paths = [s.path for s in read_test(args.data)]
    paths = [paths[i] for i in np.linspace(0, len(paths) - 1, min(args.images, len(paths))).round().astype(int)]
    profile_image(det, paths[0], Clock())  # warm-up
    clock = Clock()
    with torch.inference_mode():
        for path in paths:
            profile_image(det, path, clock)
    n = len(paths)
    with Image.open(paths[0]) as first:
        print(f"{args.data.name}: {n} test images ({first.size[0]}x{first.size[1]}), {threads} threads, ms/image")
    print("| step | ms/image |\n|---|---|")
    for name, ms in clock.ms.items():
        print(f"| {name} | {ms / n:.1f} |")
    stage1 = sum(clock.ms[k] for k in STAGE1) / n
    stage2 = sum(v for k, v in clock.ms.items() if k not in STAGE1) / n
    print(f"| **stage 1 (decode to search)** | **{stage1:.1f}** |")
    print(f"| **stage 2 (gallery to encoded mask)** | **{stage2:.1f}** |")
    print(f"| **segmenting / stage 1 only** | **{(stage1 + stage2) / stage1:.2f}x** |")


if __name__ == "__main__":
    main()
