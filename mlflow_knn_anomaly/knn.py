"""Nearest-neighbour search: faiss for stage 1 (images), batched GEMM for stage 2 (pixels).

faiss's L2 indexes return *squared* distances (`sq_dist`); callers take the square root where the
paper means a distance.
"""

from __future__ import annotations

import math

import faiss
import numpy as np
import torch

from .config import IMAGE_INDEXES

# Bytes of one (queries x gallery) distance block per feature channel, capped. Few channels make
# the GEMM memory-bound: cache-sized blocks (1.5 MiB at C=24) ran 2-5x faster than 64 MiB ones.
# Many channels make it compute-bound, where taller blocks (16 MiB at C=256) ran 2x faster.
BLOCK_BYTES_PER_CHANNEL = 64 * 2**10
MAX_BLOCK_BYTES = 32 * 2**20


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


def pixel_knn(query: torch.Tensor, gallery: torch.Tensor, kappa: int) -> torch.Tensor:
    """Mean distance of each query feature to its `kappa` nearest gallery features (exact).

    Squared distances come from ||q||^2 + ||g||^2 - 2 q.g, one GEMM per chunk of queries; the
    gallery is never split, so no remainder is dropped and memory stays bounded.

    Args:
        query: (P, C) float32 query pixel features.
        gallery: (M, C) float32 gallery pixel features.
        kappa: neighbours averaged (kappa=1 in the paper).

    Returns:
        (P,) float32 mean L2 distances.
    """
    if kappa > gallery.shape[0]:
        raise ValueError(f"kappa={kappa} exceeds the {gallery.shape[0]} gallery features.")
    g_sq = gallery.pow(2).sum(dim=1)
    block_bytes = min(MAX_BLOCK_BYTES, BLOCK_BYTES_PER_CHANNEL * gallery.shape[1])
    chunk = max(1, block_bytes // (4 * gallery.shape[0]))
    out = torch.empty(query.shape[0], dtype=torch.float32, device=query.device)
    gallery_t = gallery.t()
    for start in range(0, query.shape[0], chunk):
        q = query[start : start + chunk]
        # ||q||^2 is constant along a row, so it is added after the min: one pass less over the block.
        partial = torch.addmm(g_sq.unsqueeze(0), q, gallery_t, beta=1.0, alpha=-2.0)
        if kappa == 1:
            nearest = partial.amin(dim=1, keepdim=True)
        else:
            nearest = partial.topk(kappa, dim=1, largest=False).values
        sq_dist = nearest + q.pow(2).sum(dim=1, keepdim=True)
        out[start : start + chunk] = sq_dist.clamp_min_(0.0).sqrt_().mean(dim=1)
    return out
