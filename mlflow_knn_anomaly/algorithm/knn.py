"""Nearest-neighbour search: faiss for stage 1 (images), batched GEMM for stage 2 (pixels).

faiss's L2 indexes return *squared* distances (`sq_dist`); callers take the square root where the
paper means a distance.
"""

from __future__ import annotations

import logging
import math
import time

import faiss
import numpy as np
import torch

from ..config import IMAGE_INDEXES

# How pixel_knn blocks its GEMM: (query rows, gallery rows) per block, 0 meaning the whole gallery.
# Which is fastest depends on the CPU and on the layer's shape: whole-gallery blocks of 128 queries
# feed the GEMM best, but their (128, M) distance block falls out of cache; a block of 512 x 1024
# stays in it, at the price of more, smaller products. On this project's AMD EPYC (2 threads, a
# busy host) the 512 x 1024 blocks searched the stride-4 and stride-8 layers 2.6x and 2x faster
# and the stride-32 layer 1.3x slower (docs/results/speed.md), so the choice is measured per shape
# on the machine that runs it (`block_shape`), once per process, and logged.
BLOCKS = ((128, 0), (512, 1024))
QUERY_ROWS = 128  # query rows per block of the whole-gallery kernel
# Query rows come in multiples of this (zero rows pad the last block). MKL computes a product of
# fewer than ~12 rows in another summation order, so without it a pixel's distance would depend on
# how many others it was searched with (`refine.py` searches subsets): on an AVX2 host 82 of 1212
# subset searches differed in the last bit from the whole one, none with it.
ROW_ALIGN = 16
_chosen: dict[tuple, tuple[int, int]] = {}
_logger = logging.getLogger(__name__)


class ImageIndex:
    """Stage-1 index over pooled features: `fit / search`, returning (sq_dist, nn_indices)."""

    def __init__(self, kind: str = "flat") -> None:
        if kind not in IMAGE_INDEXES:
            raise ValueError(f"image_index={kind!r} is not one of {list(IMAGE_INDEXES)}.")
        self.kind = kind
        self.index: faiss.Index | None = None

    def fit(self, pooled: np.ndarray) -> ImageIndex:
        """Index the (N, D) pooled features of the bank."""
        vectors = np.ascontiguousarray(pooled, dtype=np.float32)
        n, d = vectors.shape
        if self.kind == "flat":
            index = faiss.IndexFlatL2(d)
        elif self.kind == "hnsw":
            index = faiss.IndexHNSWFlat(d, 32)
            index.hnsw.efSearch = 128
        else:
            nlist = max(1, min(4096, int(math.sqrt(n))))
            index = faiss.IndexIVFFlat(faiss.IndexFlatL2(d), d, nlist)
            index.train(vectors)
            index.nprobe = min(nlist, 16)
        index.add(vectors)
        self.index = index
        return self

    def search(self, query: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """The k nearest bank images of each query.

        Args:
            query: (Q, D) pooled features.
            k: neighbours wanted; must not exceed the bank size.

        Returns:
            sq_dist (Q, k) squared L2 distances, ascending, and nn_indices (Q, k).
        """
        if self.index is None:
            raise RuntimeError("ImageIndex.search called before fit.")
        if k > self.index.ntotal:
            raise ValueError(f"k_images={k} exceeds the {self.index.ntotal} images in the bank.")
        sq_dist, nn_indices = self.index.search(np.ascontiguousarray(query, dtype=np.float32), k)
        return np.maximum(sq_dist, 0.0), nn_indices


class PixelGallery:
    """A gallery prepared once for several `pixel_knn` calls: its (M, C) features with their squared
    norms as an extra column, `extended` (M, C + 1)."""

    def __init__(self, gallery: torch.Tensor | None, extended: torch.Tensor | None = None) -> None:
        if extended is None:
            m, c = gallery.shape
            extended = torch.empty(m, c + 1, dtype=gallery.dtype, device=gallery.device)
            extended[:, :c] = gallery
            torch.linalg.vector_norm(gallery, dim=1, out=extended[:, c]).pow_(2)
        self.extended = extended

    @property
    def features(self) -> torch.Tensor:
        """(M, C) the gallery features (a view)."""
        return self.extended[:, :-1]

    def rows(self, index: torch.Tensor) -> PixelGallery:
        """The gallery of the (M',) int64 rows `index`, in that order (one copy, norms included)."""
        return PixelGallery(None, self.extended.index_select(0, index.to(self.extended.device)))


def pixel_knn(
    query: torch.Tensor, gallery: torch.Tensor | PixelGallery, kappa: int, block: tuple[int, int] | None = None
) -> torch.Tensor:
    """Mean distance of each query feature to its `kappa` nearest gallery features (exact).

    Squared distances are ||q||^2 + ||g||^2 - 2 q.g. One GEMM per block gives the last two terms
    at once: each gallery row gains its squared norm as an extra column and each query row a
    matching 1 (so no pass adds the norms to the block). Blocks cover every query and gallery row,
    so no remainder is dropped and memory stays bounded; ||q||^2 is constant along a row, so it is
    added after the min.

    Args:
        query: (P, C) float32 query pixel features.
        gallery: (M, C) float32 gallery pixel features, or a `PixelGallery` of them.
        kappa: neighbours averaged (kappa=1 in the paper).
        block: (query rows, gallery rows; 0 for all) per GEMM block; None: `block_shape`'s choice.

    Returns:
        (P,) float32 mean L2 distances.
    """
    gallery_ext = (gallery if isinstance(gallery, PixelGallery) else PixelGallery(gallery)).extended
    m = gallery_ext.shape[0]
    if kappa > m:
        raise ValueError(f"kappa={kappa} exceeds the {m} gallery features.")
    rows, cols = block or block_shape(query.shape[0], m, query.shape[1], query.device)
    rows = QUERY_ROWS if cols == 0 else rows
    cols = cols or m
    # Row-major whatever the caller's layout, so that ||q||^2 sums each row in one order.
    query = query.contiguous()
    p = query.shape[0]
    query_ext = torch.zeros(p + (-p) % ROW_ALIGN, query.shape[1] + 1, dtype=query.dtype, device=query.device)
    torch.mul(query, -2.0, out=query_ext[:p, :-1])
    query_ext[:p, -1] = 1.0
    tiles = [gallery_ext[start : start + cols].t() for start in range(0, gallery_ext.shape[0], cols)]
    q_sq = query.pow(2).sum(dim=1, keepdim=True)
    out = torch.empty(p, dtype=torch.float32, device=query.device)
    for start in range(0, p, rows):
        block_rows = query_ext[start : start + rows]  # a multiple of ROW_ALIGN rows
        nearest = None
        for tile in tiles:
            partial = block_rows @ tile  # ||g||^2 - 2 q.g
            if kappa == 1:
                best = partial.amin(dim=1, keepdim=True)
                nearest = best if nearest is None else torch.minimum(nearest, best, out=nearest)
            else:
                best = partial.topk(min(kappa, partial.shape[1]), dim=1, largest=False).values
                both = best if nearest is None else torch.cat([nearest, best], dim=1)
                nearest = both.topk(min(kappa, both.shape[1]), dim=1, largest=False).values
        nearest = nearest[: min(rows, p - start)]
        out[start : start + rows] = (nearest + q_sq[start : start + rows]).clamp_min_(0.0).sqrt_().mean(dim=1)
    return out


def block_shape(p: int, m: int, c: int, device: torch.device) -> tuple[int, int]:
    """The fastest of BLOCKS for a (P, C) query against an (M, C) gallery on `device`, measured on
    random features of about that shape (M rounded up to a power of two) the first time it is asked."""
    # Query counts of 512 and more share a choice (measured at 2048 or fewer), smaller ones another.
    key = (p >= 512, 1 << max(0, m - 1).bit_length(), c, device.type, torch.get_num_threads())
    if key not in _chosen:
        if p * m < 1 << 22:  # a small search: not worth measuring
            _chosen[key] = BLOCKS[0]
        else:
            generator = torch.Generator().manual_seed(0)
            query = torch.rand(2048 if p >= 512 else p, c, generator=generator).to(device)
            gallery = torch.rand(m, c, generator=generator).to(device)
            seconds = {block: _best_time(query, gallery, block) for block in BLOCKS}
            _chosen[key] = min(seconds, key=seconds.get)
            _logger.info(
                "pixel kNN of %d x %d x %d on %s: blocks %s (%s)", p, m, c, device.type, _chosen[key],
                ", ".join(f"{b}: {1000 * t:.1f} ms" for b, t in seconds.items()),
            )  # fmt: skip
    return _chosen[key]


def _best_time(query: torch.Tensor, gallery: torch.Tensor, block: tuple[int, int]) -> float:
    """Best of three timed runs after a warm-up."""
    times = []
    for run in range(4):
        start = time.perf_counter()
        pixel_knn(query, gallery, 1, block)
        if query.device.type == "cuda":
            torch.cuda.synchronize()
        if run:
            times.append(time.perf_counter() - start)
    return min(times)
