"""Stage 2's maths as pure functions: per-layer pixel distances, the combined and smoothed anomaly
map, and the image score read from it.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from scipy.ndimage import gaussian_filter

from .knn import PixelGallery, pixel_knn


def layer_distances(
    query: dict[str, torch.Tensor], galleries: dict[str, torch.Tensor | PixelGallery], kappa: int
) -> dict[str, torch.Tensor]:
    """Per layer, the (1, 1, h, w) mean distance of each query pixel to its kappa nearest gallery features.

    Args:
        query: one image's features {layer: (C, h, w)}, on the device the search runs on.
        galleries: {layer: (M, C) float32} pixel features of its nearest normal images (host
            memory; moved to the query's device here), or their `PixelGallery` on that device.
        kappa: neighbours averaged (the paper: 1).
    """
    distances = {}
    for name, fmap in query.items():
        c, h, w = fmap.shape
        pixels = fmap.float().permute(1, 2, 0).reshape(-1, c)
        gallery = galleries[name]
        if not isinstance(gallery, PixelGallery):
            gallery = gallery.to(pixels.device, non_blocking=True)
        distances[name] = pixel_knn(pixels, gallery, kappa).view(1, 1, h, w)
    return distances


def combine_layers(
    distances: dict[str, torch.Tensor],
    size: tuple[int, int],
    combine: str,
    sigma: float,
    layer_scales: tuple[float, ...] | None = None,
) -> np.ndarray:
    """The (H, W) anomaly map on a network input of `size`.

    Each layer's distances are upsampled bilinearly (divided by its `layer_scales` entry when
    given), combined by their geometric ("geometric") or arithmetic ("mean") mean, and smoothed
    with a Gaussian of `sigma` pixels (0: none).
    """
    scales = layer_scales or (1.0,) * len(distances)
    layer_maps = [
        F.interpolate(dist / scale, size=tuple(size), mode="bilinear", align_corners=False)
        for dist, scale in zip(distances.values(), scales, strict=True)
    ]
    stacked = torch.cat(layer_maps)[:, 0]
    if combine == "geometric":
        score_map = stacked.clamp_min(1e-12).log().mean(dim=0).exp()
    else:
        score_map = stacked.mean(dim=0)
    score_map = score_map.cpu().numpy()
    return gaussian_filter(score_map, sigma) if sigma > 0 else score_map


def map_score(input_map: np.ndarray, margin: int, top: float = 0.0, roi: np.ndarray | None = None) -> float:
    """Image score from a map of the network input: the mean of its highest `top` share of scored
    pixels (`scored_pixels`; 0: their maximum)."""
    values = input_map[scored_pixels(input_map.shape, margin, roi)]
    n = max(1, round(top * values.size))
    return float(np.partition(values, values.size - n)[values.size - n :].mean())


def scored_pixels(shape: tuple[int, int], margin: int, roi: np.ndarray | None = None) -> np.ndarray:
    """(H, W) bool: the pixels the map score reads. They leave out `margin` pixels at the border,
    where zero padding inflates the features of every image (normal ones too); the margin shrinks on
    a narrow input so that a quarter of each side is always scored. With `roi`, an (H, W) bool
    inspection region of the input, only its pixels count (all of them if none lies inside the
    margin)."""
    h, w = shape
    my, mx = (min(margin, side * 3 // 8) for side in (h, w))
    scored = np.zeros((h, w), dtype=bool)
    scored[my : h - my, mx : w - mx] = True
    if roi is not None:
        inside = scored & roi
        scored = inside if inside.any() else roi.astype(bool)
    return scored
