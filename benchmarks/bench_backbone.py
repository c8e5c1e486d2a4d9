"""Backbone time per image by input size and images per forward pass (CPU), and what
`Backbone.extract` does with a batch of four (its pass size follows `CPU_PASS_PIXELS`).

    python benchmarks/bench_backbone.py --threads 2
"""

from __future__ import annotations

import argparse
import time

import torch

from mlflow_knn_anomaly.algorithm.backbones import CPU_PASS_PIXELS, build_backbone
from mlflow_knn_anomaly.config import SpadeConfig
from mlflow_knn_anomaly.runtime import configure_threads


def per_image_ms(backbone, images: torch.Tensor, repeats: int) -> float:
    """Best of `repeats` timed runs after a warm-up, per image."""
    backbone._forward(images)
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        backbone._forward(images)
        times.append(time.perf_counter() - start)
    return 1000 * min(times) / len(images)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--sizes", type=int, nargs="+", default=[256, 320, 384, 512])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    configure_threads(args.threads)
    config = SpadeConfig()
    backbone = build_backbone(config.backbone, config.weights, config.layers)
    print(f"ms per image, {args.threads} threads; CPU_PASS_PIXELS = {CPU_PASS_PIXELS}\n")
    print("| input | 1 per pass | 2 | 4 | 8 | extract(4 images) |\n|---|---|---|---|---|---|")
    for size in args.sizes:
        images = torch.rand(8, 3, size, size, generator=torch.Generator().manual_seed(0))
        cells = [f"{per_image_ms(backbone, images[:n], args.repeats):.1f}" for n in (1, 2, 4, 8)]
        backbone.extract(images[:4])
        start = time.perf_counter()
        backbone.extract(images[:4])
        whole = 1000 * (time.perf_counter() - start) / 4
        print(f"| {size} x {size} | " + " | ".join(cells) + f" | {whole:.1f} |", flush=True)


if __name__ == "__main__":
    main()
