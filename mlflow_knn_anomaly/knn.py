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

# Query rows per GEMM block. 128 rows ran fastest (or within noise of it) at every layer of the
# Lite0 and WideResNet-50-2 pyramids on 1 and 2 threads (galleries of 12k-20k rows, 24-1024
# channels; docs/results/speed.md, "Stage 2 on the CPU"): thinner blocks starve the GEMM, taller
# ones spill the distance block out of cache.
QUERY_ROWS = 128


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

    Squared distances are ||q||^2 + ||g||^2 - 2 q.g. One GEMM per block of queries gives the last
    two terms at once: each gallery row gains its squared norm as an extra column and each query
    row a matching 1 (so no pass adds the norms to the block). The gallery is never split, so no
    remainder is dropped and memory stays bounded; ||q||^2 is constant along a row, so it is added
    after the min.

    Args:
        query: (P, C) float32 query pixel features.
        gallery: (M, C) float32 gallery pixel features.
        kappa: neighbours averaged (kappa=1 in the paper).

    Returns:
        (P,) float32 mean L2 distances.
    """
    if kappa > gallery.shape[0]:
        raise ValueError(f"kappa={kappa} exceeds the {gallery.shape[0]} gallery features.")
    ones = torch.ones(query.shape[0], 1, dtype=query.dtype, device=query.device)
    query_ext = torch.cat([query * -2.0, ones], dim=1)
    gallery_ext = torch.cat([gallery, gallery.pow(2).sum(dim=1, keepdim=True)], dim=1)
    q_sq = query.pow(2).sum(dim=1, keepdim=True)
    out = torch.empty(query.shape[0], dtype=torch.float32, device=query.device)
    for start in range(0, query.shape[0], QUERY_ROWS):
        rows = slice(start, start + QUERY_ROWS)
        partial = query_ext[rows] @ gallery_ext.t()  # ||g||^2 - 2 q.g
        if kappa == 1:
            nearest = partial.amin(dim=1, keepdim=True)
        else:
            nearest = partial.topk(kappa, dim=1, largest=False).values
        out[rows] = (nearest + q_sq[rows]).clamp_min_(0.0).sqrt_().mean(dim=1)
    return out
