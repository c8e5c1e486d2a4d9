"""Stage-2 pixel kNN: ours (GEMM) against the SPADE-pytorch reference and against plain torch.mm.

For the default backbone's pyramid and WideResNet-50-2-shaped layers (random features: timing
does not depend on the values), per query image with a gallery of K images:
our time, the reference's time and the ratio; the max relative difference of the maps; and our
GFLOP/s as a share of a plain `torch.mm` of the same GEMM (our roofline on this machine).

    python benchmarks/bench_pixel_knn.py [--threads N] [--k-images 5] [--queries 3]
"""

from __future__ import annotations

import argparse
import time
from functools import partial

import torch
from reference_spade import reference_pixel_min_distance

from mlflow_knn_anomaly.algorithm.knn import pixel_knn
from mlflow_knn_anomaly.runtime import configure_threads

# (name, channels, side of the map at a 224 input); feature_pool does not change the shapes.
SHAPES = {
    "efficientnet_lite0": [("blocks.1", 24, 56), ("blocks.2", 40, 28), ("blocks.4", 112, 14)],
    "wide_resnet50_2": [("layer1", 256, 56), ("layer2", 512, 28), ("layer3", 1024, 14)],
}


def best_of(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--k-images", type=int, default=5)
    parser.add_argument("--queries", type=int, default=3, help="query images timed (best of)")
    args = parser.parse_args()
    threads = configure_threads(args.threads)
    print(f"threads={threads} k_images={args.k_images}")
    header = (
        "| backbone | layer | C | gallery | ours ms | reference ms | speed-up | max rel diff | GFLOP/s "
        "| share of torch.mm | share of peak GEMM |"
    )
    print(header)
    print("|---" * (header.count("|") - 1) + "|")
    gen = torch.Generator().manual_seed(0)
    square = torch.randn(1024, 1024, generator=gen)
    peak = 2 * 1024**3 / best_of(partial(torch.mm, square, square), 5) / 1e9
    print(f"peak GEMM (1024^3 torch.mm, compute-bound): {peak:.1f} GFLOP/s")
    for backbone, layers in SHAPES.items():
        total = {"ours": 0.0, "ref": 0.0, "mm": 0.0}
        for name, c, side in layers:
            query = torch.randn(c, side, side, generator=gen)
            gallery = torch.randn(args.k_images, c, side, side, generator=gen)
            q = query.permute(1, 2, 0).reshape(-1, c).contiguous()
            g = gallery.permute(0, 2, 3, 1).reshape(-1, c).contiguous()
            ours_map = pixel_knn(q, g, 1).view(side, side)
            ref_map = reference_pixel_min_distance(query, gallery)
            rel = float(((ours_map - ref_map).abs() / ref_map.abs().clamp_min(1e-6)).max())
            t_ours = best_of(partial(pixel_knn, q, g, 1), args.queries)
            t_ref = best_of(partial(reference_pixel_min_distance, query, gallery), 1 if c > 200 else args.queries)
            t_mm = best_of(partial(torch.mm, q, g.t().contiguous()), args.queries)
            flops = 2.0 * q.shape[0] * g.shape[0] * c
            total["ours"] += t_ours
            total["ref"] += t_ref
            total["mm"] += t_mm
            print(
                f"| {backbone} | {name} | {c} | {g.shape[0]} | {t_ours * 1e3:.1f} | {t_ref * 1e3:.0f} | "
                f"{t_ref / t_ours:.0f}x | {rel:.1e} | {flops / t_ours / 1e9:.1f} | {t_mm / t_ours:.0%} | "
                f"{flops / t_ours / 1e9 / peak:.0%} |"
            )
        print(
            f"| {backbone} | all layers | | | {total['ours'] * 1e3:.1f} | {total['ref'] * 1e3:.0f} | "
            f"{total['ref'] / total['ours']:.0f}x | | | {total['mm'] / total['ours']:.0%} | |"
        )


if __name__ == "__main__":
    main()
