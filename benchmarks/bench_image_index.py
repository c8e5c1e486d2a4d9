"""Stage-1 image index at scale: flat (exact) vs HNSW vs IVF on synthetic pooled features.

    python benchmarks/bench_image_index.py --sizes 1000 10000 100000 1000000 --plot benchmarks/results/image_index.png

Vectors are 1280-d (EfficientNet-Lite0's pooled feature), drawn around 1000 random centres so that
neighbourhoods exist (uniform noise has none). Reports build time, query latency (one query at a
time, median over `--queries`), index memory (serialised size) and recall@K against flat.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import faiss
import numpy as np

from mlflow_knn_anomaly.algorithm.knn import ImageIndex
from mlflow_knn_anomaly.runtime import configure_threads


def vectors(n: int, d: int, rng: np.random.Generator, centres: np.ndarray) -> np.ndarray:
    out = np.empty((n, d), np.float32)
    for start in range(0, n, 100_000):
        m = min(100_000, n - start)
        out[start : start + m] = centres[rng.integers(0, len(centres), m)] + rng.normal(0, 0.3, (m, d))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sizes", nargs="+", type=int, default=[1000, 10_000, 100_000, 1_000_000])
    parser.add_argument("--dim", type=int, default=1280)
    parser.add_argument("--k", type=int, default=5)
    parser.add_argument("--queries", type=int, default=200)
    parser.add_argument("--hnsw-max", type=int, default=100_000, help="largest bank to build HNSW for")
    parser.add_argument("--kinds", nargs="+", default=["flat", "hnsw", "ivf"], choices=["flat", "hnsw", "ivf"])
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--plot", type=Path, default=Path("benchmarks/results/image_index.png"))
    args = parser.parse_args()
    threads = configure_threads(args.threads)
    rng = np.random.default_rng(0)
    centres = rng.normal(0, 1, (1000, args.dim)).astype(np.float32)
    query = vectors(args.queries, args.dim, rng, centres)
    print(f"threads={threads} dim={args.dim} k={args.k}")
    print("| bank size | index | build s | query ms (p50) | memory MB | recall@K |")
    print("|---|---|---|---|---|---|")
    results: dict[str, list[tuple[int, float, float]]] = {}
    for n in args.sizes:
        bank = vectors(n, args.dim, rng, centres)
        exact = None
        for kind in dict.fromkeys(["flat", *args.kinds]):  # flat is the recall reference
            if kind == "hnsw" and n > args.hnsw_max:
                print(f"| {n} | hnsw | not built (> --hnsw-max {args.hnsw_max}) | | | |")
                continue
            start = time.perf_counter()
            index = ImageIndex(kind).fit(bank)
            build = time.perf_counter() - start
            latencies = []
            found = np.empty((len(query), args.k), np.int64)
            for i in range(len(query)):
                t = time.perf_counter()
                _, found[i] = index.search(query[i : i + 1], args.k)
                latencies.append(time.perf_counter() - t)
            if kind == "flat":
                exact = found
            recall = np.mean([len(set(a) & set(e)) / args.k for a, e in zip(found, exact)])
            memory = faiss.serialize_index(index.index).nbytes / 2**20
            p50 = 1000 * float(np.median(latencies))
            results.setdefault(kind, []).append((n, p50, recall))
            print(f"| {n} | {kind} | {build:.1f} | {p50:.2f} | {memory:.0f} | {recall:.3f} |", flush=True)
            del index
        del bank
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5, 4))
    for kind, rows in results.items():
        sizes, p50s, recalls = zip(*rows)
        ax.loglog(sizes, p50s, "o-", label=kind)
        for n, p50, recall in rows:
            ax.annotate(f"{recall:.2f}", (n, p50), fontsize=7, textcoords="offset points", xytext=(3, 3))
    ax.set(
        xlabel="bank size (images)",
        ylabel="query latency p50 (ms)",
        title=f"stage-1 index, d={args.dim}, recall@{args.k}",
    )
    ax.legend()
    fig.tight_layout()
    args.plot.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(args.plot, dpi=120)
    print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
