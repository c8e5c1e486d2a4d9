"""Whether an exact search pruned by a projected lower bound beats the plain GEMM, per pyramid layer.

    python benchmarks/studies/projected_bound.py --threads 2 --data ../shared/data/mvtec_bottle

For an orthonormal basis P of the bank's leading principal directions (d of them), and features
centred on the bank's mean, `[P q, |q - P q|] . [P g, |g - P g|] >= q . g` (Cauchy-Schwarz on the
residuals), so a GEMM in d + 1 dimensions gives a lower bound of every squared distance. The search
then takes each query's exact distance to the gallery feature of lowest bound as an upper bound, and
computes exactly only the pairs whose lower bound does not exceed it: the same nearest distance
(up to float rounding), with d + 1 instead of C + 1 columns in the GEMM but a gather per pair. On the
real features of 6 test images (spread over the test set) of the default detector, every pixel of
each layer; medians of 3 runs, ms.
"""

from __future__ import annotations

import sys
import time
from collections import defaultdict
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from fitted import data_parser, fitted_detector, layer_searches  # noqa: E402

from mlflow_knn_anomaly.algorithm.knn import PixelGallery, pixel_knn  # noqa: E402
from mlflow_knn_anomaly.evaluation.datasets import read_test  # noqa: E402

ROWS = 128  # query rows per block


def projected(gallery: torch.Tensor, mean: torch.Tensor, basis: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The gallery's lower-bound columns [P g, |residual|, |g|^2], centred on `mean`."""
    centred = gallery - mean
    proj = centred @ basis.T
    sq = centred.pow(2).sum(1)
    residual = (sq - proj.pow(2).sum(1)).clamp_min_(0).sqrt_()
    return torch.cat([proj, residual[:, None], sq[:, None]], 1).t().contiguous(), mean, basis


def pruned_knn(query: torch.Tensor, gallery: torch.Tensor, bound: tuple[torch.Tensor, ...]) -> torch.Tensor:
    """(P,) nearest distances of `query` (P, C) in `gallery` (M, C), pruned by the projected bound."""
    columns, mean, basis = bound
    centred = query - mean
    proj = centred @ basis.T
    sq = centred.pow(2).sum(1)
    residual = (sq - proj.pow(2).sum(1)).clamp_min_(0).sqrt_()
    ext = torch.cat([proj * -2, residual[:, None] * -2, torch.ones(len(query), 1)], 1)
    out = torch.empty(len(query))
    for start in range(0, len(query), ROWS):
        lower = ext[start : start + ROWS] @ columns + sq[start : start + ROWS, None]  # squared lower bounds
        block = query[start : start + ROWS]
        upper = (block - gallery[lower.argmin(1)]).pow_(2).sum(1)
        slack = 1e-4 * (sq[start : start + ROWS] + 1.0)  # float rounding in the bound's GEMM
        qi, gi = (lower <= (upper + slack)[:, None]).nonzero(as_tuple=True)
        exact = (block[qi] - gallery[gi]).pow_(2).sum(1)
        out[start : start + ROWS] = upper.scatter_reduce_(0, qi, exact, "amin").sqrt_()
    return out


def timed(fn, *args, runs: int = 3):
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        out = fn(*args)
        times.append(1000 * (time.perf_counter() - start))
    return float(np.median(times)), out


def main() -> None:
    args = data_parser(__doc__).parse_args()
    threads, det = fitted_detector(args)
    bases = {}
    for name, feats in det.bank.features.items():
        sample = torch.from_numpy(np.array(feats[:: max(1, len(feats) // 20000)], dtype=np.float32))
        mean = sample.mean(0)
        bases[name] = (mean, torch.linalg.svd(sample - mean, full_matrices=False)[2])
    tests = read_test(args.data)
    tests = [tests[i] for i in np.linspace(0, len(tests) - 1, 6).round().astype(int)]
    rows: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for label, name, _, query, gallery, _ in layer_searches(det, tests):
        c = query.shape[1]
        row = rows[label]
        ms, exact = timed(pixel_knn, query, PixelGallery(gallery), 1)
        row["exact GEMM ms"].append(ms)
        mean, vt = bases[name]
        for d in (16, 32):
            if d >= c:
                continue
            ms, got = timed(pruned_knn, query, gallery, projected(gallery, mean, vt[:d].contiguous()))
            row[f"pruned, d={d}, ms"].append(ms)
            row[f"pruned, d={d}, largest difference"].append(float((got - exact).abs().max()))
    names = list(rows)
    keys = list(dict.fromkeys(k for n in names for k in rows[n]))
    print(f"{args.data.name}: {len(tests)} test images, {threads} threads\n")
    print("| | " + " | ".join(names) + " |\n|---" + "|---" * len(names) + "|")
    for key in keys:
        cells = [f"{np.median(rows[n][key]):.3g}" if key in rows[n] else "–" for n in names]
        print(f"| {key} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
