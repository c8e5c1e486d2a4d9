"""The SPADE-pytorch pixel kNN, kept as a reference to compare against.

Per query image and layer, the gallery is walked in chunks of 100 features with
`torch.pairwise_distance` against every query pixel, and the minimum is kept (kappa = 1).
Unlike the original, the last partial chunk is not dropped (`ceil`, not `//`). The original ran
on PyTorch versions whose `pairwise_distance` reduced dim 1 (channels); current versions reduce
the last dim, so channels are moved last here to compute the same distances.
"""

from __future__ import annotations

import math

import torch


def reference_pixel_min_distance(query_map: torch.Tensor, gallery_maps: torch.Tensor, chunk: int = 100) -> torch.Tensor:
    """(H, W) distance of each query pixel to its nearest gallery feature.

    Args:
        query_map: (C, H, W) features of the query image on one layer.
        gallery_maps: (K, C, h, w) features of its K nearest normal images on that layer.
    """
    feat_gallery = gallery_maps.permute(0, 2, 3, 1).flatten(0, 2)[:, None, None, :]  # (K*h*w, 1, 1, C)
    test = query_map.permute(1, 2, 0).unsqueeze(0)  # (1, H, W, C)
    distances = [
        torch.pairwise_distance(feat_gallery[i * chunk : (i + 1) * chunk], test)
        for i in range(math.ceil(feat_gallery.shape[0] / chunk))
    ]
    return torch.cat(distances, 0).min(dim=0).values
