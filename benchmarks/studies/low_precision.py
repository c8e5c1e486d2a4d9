"""Whether a low-precision pass pays for stage 2's pixel search on this CPU, per pyramid layer.

    python benchmarks/studies/low_precision.py --threads 2 --data ../shared/data/mvtec_bottle

On the real features of a few test images and their galleries (the default detector), per layer:
the exhaustive fp32 search (`knn.pixel_knn`); a bf16 GEMM pass that keeps each pixel's `c`
best candidates and re-ranks them exactly in fp32 (time, and the share of pixels whose distance
then differs from the exact one by more than 0.1 %); the certified upper bound a bf16 pass can
give (its rounding error bounded, as `refine.py` would need), as a ratio to the exact distance;
the 3 x 3 window bound that `refine.py` uses instead; and one 128-row block of the GEMM alone in
fp32, bf16 and int8 (`torch._int_mm`). Times are medians of 7 runs, interleaved per image.
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

from mlflow_knn_anomaly.algorithm.knn import pixel_knn  # noqa: E402
from mlflow_knn_anomaly.algorithm.refine import window_bounds  # noqa: E402
from mlflow_knn_anomaly.evaluation.datasets import read_test  # noqa: E402

UNIT = 2.0**-8  # bf16's unit roundoff


def timed(fn, *args, runs: int = 7):
    fn(*args)
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        out = fn(*args)
        times.append(1000 * (time.perf_counter() - start))
    return float(np.median(times)), out


def _augmented(query: torch.Tensor, gallery: torch.Tensor, dtype: torch.dtype):
    """Centred [-2q, 1] and [g, ||g||^2]: one GEMM gives ||g||^2 - 2 q.g."""
    mean = gallery.mean(dim=0, keepdim=True)
    q, g = query - mean, gallery - mean
    a = torch.cat([q * -2.0, torch.ones(len(q), 1)], dim=1).to(dtype)
    b = torch.cat([g, g.pow(2).sum(1, keepdim=True)], dim=1).to(dtype).t().contiguous()
    return q, g, a, b


def bf16_rerank(query: torch.Tensor, gallery: torch.Tensor, c: int) -> torch.Tensor:
    """bf16 candidates, the c best re-ranked exactly."""
    _, _, a, b = _augmented(query, gallery, torch.bfloat16)
    out = torch.empty(len(query))
    for start in range(0, len(query), 128):
        rows = slice(start, start + 128)
        best = (a[rows] @ b).topk(c, dim=1, largest=False, sorted=False).indices
        out[rows] = (gallery[best] - query[rows, None]).pow(2).sum(-1).amin(1).sqrt()
    return out


def bf16_bound(query: torch.Tensor, gallery: torch.Tensor) -> torch.Tensor:
    """An upper bound of the nearest distance from one bf16 pass: the rounding of the inputs and of
    the bf16 result bounded by 3.2 u (2 ||q|| G + G^2), G the largest centred gallery norm."""
    q, g, a, b = _augmented(query, gallery, torch.bfloat16)
    q_sq = q.pow(2).sum(1)
    big = g.pow(2).sum(1).max().sqrt()
    out = torch.empty(len(query))
    for start in range(0, len(query), 128):
        out[start : start + 128] = (a[start : start + 128] @ b).amin(1).float()
    return (out + q_sq + 3.2 * UNIT * (2 * q_sq.sqrt() * big + big * big)).clamp_min(0).sqrt()


def gemm_block(query: torch.Tensor, gallery: torch.Tensor) -> dict[str, float]:
    """ms of one 128-row block of the distance GEMM (and its row minimum) per precision."""
    block = query[:128].contiguous()
    a32 = torch.cat([block, torch.ones(len(block), 1)], dim=1)
    b32 = torch.cat([gallery, gallery.pow(2).sum(1, keepdim=True)], dim=1).t().contiguous()
    scale = max(float(a32.abs().max()), float(b32[:-1].abs().max())) / 127
    a8, b8 = (
        (a32 / scale).round().clamp(-127, 127).to(torch.int8),
        (b32[:-1] / scale).round().clamp(-127, 127).to(torch.int8),
    )
    a8 = a8[:, :-1].contiguous()
    width = -(-a8.shape[1] // 8) * 8  # _int_mm wants the inner size a multiple of 8
    a8 = torch.nn.functional.pad(a8, (0, width - a8.shape[1])).contiguous()
    b8 = torch.nn.functional.pad(b8, (0, 0, 0, width - b8.shape[0])).contiguous()
    a16, b16 = a32.bfloat16(), b32.bfloat16()
    return {
        "fp32": timed(lambda: (a32 @ b32).amin(1))[0],
        "bf16": timed(lambda: (a16 @ b16).amin(1))[0],
        "int8": timed(lambda: torch._int_mm(a8, b8).amin(1))[0],
    }


def main() -> None:
    parser = data_parser(__doc__)
    parser.add_argument("--images", type=int, default=3)
    args = parser.parse_args()
    threads, det = fitted_detector(args)
    cfg = det.config
    tests = [s for s in read_test(args.data) if s.is_anomalous][: args.images]
    rows: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(list))
    for label, name, fmap, query, gallery, nearest in layer_searches(det, tests):
        row = rows[label]
        ms, exact = timed(pixel_knn, query, gallery, 1)
        row["exact fp32 ms"].append(ms)
        for k in (2, 8):
            ms, approx = timed(bf16_rerank, query, gallery, k)
            row[f"bf16 + re-rank {k} ms"].append(ms)
            row[f"bf16 + re-rank {k}: share wrong"].append(
                float(((approx - exact).abs() > 1e-3 * exact).float().mean())
            )
        row["bf16 certified bound / exact (median)"].append(
            float((bf16_bound(query, gallery) / exact.clamp_min(1e-6)).median())
        )
        k_nearest = nearest[: cfg.k_images]
        window = window_bounds(fmap, det.bank.gallery(name, k_nearest), det.bank.image_rows(name, k_nearest), 1)
        row["window bound / exact (median)"].append(float((window / exact.clamp_min(1e-6)).median()))
        for kind, ms in gemm_block(query, gallery).items():
            row[f"one 128-row GEMM block, {kind} ms"].append(ms)
    names = list(rows)
    print(f"{args.data.name}: {len(tests)} anomalous test images, {threads} threads\n")
    print("| | " + " | ".join(names) + " |\n|---" * 1 + "|---" * len(names) + "|")
    for key in rows[names[0]]:
        print(f"| {key} | " + " | ".join(f"{np.median(rows[n][key]):.3g}" for n in names) + " |")


if __name__ == "__main__":
    main()
