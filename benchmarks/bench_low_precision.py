"""Would a low-precision candidate pass with exact fp32 re-ranking speed up stage 2's pixel kNN here?

    python benchmarks/bench_low_precision.py --threads 2

Per stage-2 layer shape of the default model (`SpadeConfig()`) on one image (query pixels; gallery
rows of its `gallery_images()`, before capping at the bank; channels), on random features: the
exact fp32 search (`pixel_knn`); a bf16 GEMM + min alone (no re-ranking: the floor of any bf16
pass); and the bf16 pass that keeps the `--candidates` nearest per pixel and re-ranks them in fp32
(exact distances for those only), with the share of pixels whose true nearest neighbour was among
the candidates. Best of 5 runs.
"""

from __future__ import annotations

import argparse
import time

import torch
from bench_stage2 import cpu

from mlflow_knn_anomaly import SpadeConfig
from mlflow_knn_anomaly.algorithm.backbone_specs import BACKBONES
from mlflow_knn_anomaly.algorithm.knn import PixelGallery, pixel_knn
from mlflow_knn_anomaly.runtime import configure_threads

CONFIG = SpadeConfig()  # the default model: its pyramid, input size and per-layer galleries
ROWS = 128


def best_ms(fn, *args, runs: int = 5) -> float:
    fn(*args)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        fn(*args)
        times.append(time.perf_counter() - start)
    return 1000 * min(times)


def bf16_min(query: torch.Tensor, gallery_t: torch.Tensor) -> torch.Tensor:
    """Approximate ||g||^2 - 2 q.g minimum per query row, bf16 GEMM."""
    return torch.cat([(query[i : i + ROWS] @ gallery_t).amin(dim=1) for i in range(0, query.shape[0], ROWS)])


def bf16_rerank(query: torch.Tensor, gallery: torch.Tensor, query_b: torch.Tensor, gallery_t: torch.Tensor, r: int):
    """Nearest distances from the r bf16 candidates per query, re-ranked in fp32; and the candidates."""
    blocks = range(0, query.shape[0], ROWS)
    candidates = torch.cat([(query_b[i : i + ROWS] @ gallery_t).topk(r, dim=1, largest=False).indices for i in blocks])
    exact = (gallery[candidates] - query[:, None, :]).pow(2).sum(dim=2)  # (P, r)
    return exact.amin(dim=1).sqrt(), candidates


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--candidates", type=int, default=4)
    args = parser.parse_args()
    threads = configure_threads(args.threads)
    print(f"CPU: {cpu()}; {threads} threads; torch {torch.__version__}\n")
    r = args.candidates
    print(f"| layer | pixels x gallery x C | fp32 exact ms | bf16 GEMM+min ms | bf16 top-{r} + fp32 re-rank ms "
          "| true NN among candidates |")  # fmt: skip
    print("|---|---|---|---|---|---|")
    generator = torch.Generator().manual_seed(0)
    spec = BACKBONES[CONFIG.backbone]
    for name, images in CONFIG.gallery_images().items():
        stride, c = spec.layer(name).stride, spec.layer(name).channels
        p = (CONFIG.input_size // stride) ** 2
        query = torch.rand(p, c, generator=generator)
        gallery = torch.rand(images * p, c, generator=generator)
        ext = PixelGallery(gallery).extended.t().contiguous().bfloat16()  # rows of [g, ||g||^2]
        query_b = torch.cat([-2 * query, torch.ones(p, 1)], dim=1).bfloat16()
        exact_ms = best_ms(pixel_knn, query, gallery, 1)
        min_ms = best_ms(bf16_min, query_b, ext)
        rerank_ms = best_ms(bf16_rerank, query, gallery, query_b, ext, r)
        truth = torch.cdist(query, gallery).argmin(dim=1)
        _, candidates = bf16_rerank(query, gallery, query_b, ext, r)
        recall = float((candidates == truth[:, None]).any(dim=1).float().mean())
        print(f"| {name} (stride {stride}) | {p} x {images * p} x {c} | {exact_ms:.1f} | {min_ms:.1f} "
              f"| {rerank_ms:.1f} | {recall:.4f} |")  # fmt: skip


if __name__ == "__main__":
    main()
