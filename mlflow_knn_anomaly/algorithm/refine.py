"""Stage 2 with the exhaustive pixel search only where it can change the answer.

SPADE spends pixel work only on the images that stage 1 flags; this spends the exhaustive pixel kNN
only on the pixels whose value can change what `predict` reports, the same idea one level down.

1. A cheap pass bounds every pixel's kNN distance from above (on layers of `MIN_CELLS` cells or
   more; a smaller one is searched whole): its exact distance to the gallery
   features at its own place (a `WINDOW` x `WINDOW` neighbourhood) in each of the `k_images`
   nearest normal images (those of its size). Any gallery feature's distance bounds the nearest
   one's, so this holds for every image; it is tight where parts sit where the fixture holds them,
   and merely loose where they do not. It costs 9 K C multiply-adds a pixel, against the
   exhaustive search's M C for a gallery of M features.
2. The map combined from those bounds bounds the exact map everywhere: upsampling, the layer
   combination (either kind) and the Gaussian only weight their inputs positively.
3. The exhaustive search then runs on every layer cell that feeds a pixel which "could still
   reach" something reported, on its bound: the pixel threshold in force, or the map score's top
   share (`score_top` of the scored pixels). The map is recombined and the step repeats until no
   such pixel rests on a bound. The first `SETTLE` rounds take the bound map's own top share
   (usually enough); a round after them takes every pixel whose bound reaches the n-th highest
   exact value known, which settles it in one more (`MAX_ROUNDS` caps the rounds, then every cell
   is searched).

So the mask, the regions, the map score and the image score are those of the exhaustive search
(the mask bit for bit: a pixel's distance does not depend on the others searched with it, see
`knn.ROW_ALIGN`); only map values below both the threshold and the top share keep their
stand-in, the windowed distance, which is the nearest neighbour's in most cells. `exact_maps=True`
turns this off.
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F

from .anomaly_map import combine_layers, scored_pixels
from .knn import PixelGallery, pixel_knn

WINDOW = 3  # the neighbourhood, in cells, searched around a pixel's own place in each gallery image
MIN_CELLS = 256  # a layer of fewer cells is searched whole: cheap, and most of it is needed anyway
SETTLE = 2  # rounds on the bound map's own top share before settling on the exact values known
MAX_ROUNDS = 8  # rounds before the rest of every layer is searched (never reached on the shared sets)


def window_bounds(fmap: torch.Tensor, gallery: torch.Tensor, image_rows: np.ndarray, kappa: int) -> torch.Tensor | None:
    """Upper bounds of each pixel's mean distance to its kappa nearest features of any gallery that
    holds `gallery`.

    Args:
        fmap: (C, h, w) one image's features on one layer.
        gallery: (M', C) features of some gallery images, image after image (`FeatureBank.gallery`).
        image_rows: (n,) rows of each of those images, in that order.
        kappa: neighbours averaged.

    Returns:
        (h * w,) the mean of the kappa smallest exact distances among the features in the window
        around each pixel's place in every gallery image of h x w cells; None when fewer than kappa
        such features exist (no image of that size).
    """
    c, h, w = fmap.shape
    starts = np.concatenate([[0], np.cumsum(image_rows)])
    same = [i for i, rows in enumerate(image_rows) if rows == h * w]
    pad = WINDOW // 2
    if len(same) * (pad + 1) ** 2 < kappa:  # a corner pixel's window holds (pad + 1)^2 cells per image
        return None
    # Channels first, as the query is: the sum over channels then runs along whole rows of cells. A
    # gallery feature of infinities outside the image is at an infinite distance from every query.
    images = torch.stack([gallery[starts[i] : starts[i] + h * w].t().reshape(c, h, w) for i in same])
    padded = F.pad(images.float(), (pad, pad, pad, pad), value=math.inf)  # (n, C, h + 2 pad, w + 2 pad)
    query = fmap.float()
    offsets = [(dy, dx) for dy in range(WINDOW) for dx in range(WINDOW)]
    shifted = ((padded[:, :, dy : dy + h, dx : dx + w] - query).pow_(2).sum(dim=1) for dy, dx in offsets)
    if kappa == 1:
        nearest = None
        for sq_dist in shifted:  # (n, h, w) each
            best = sq_dist.amin(dim=0)
            nearest = best if nearest is None else torch.minimum(nearest, best, out=nearest)
        return nearest.sqrt_().reshape(-1)
    sq_dist = torch.cat(list(shifted))  # (9 n, h, w): each gallery feature once
    return sq_dist.topk(kappa, dim=0, largest=False).values.sqrt_().mean(dim=0).reshape(-1)


def refined_map(
    query: dict[str, torch.Tensor],
    galleries: dict[str, PixelGallery],
    windows: dict[str, tuple[torch.Tensor, np.ndarray]],
    kappa: int,
    size: tuple[int, int],
    combine: dict,
    threshold: float,
    score: dict,
    roi: np.ndarray | None = None,
) -> tuple[np.ndarray, dict[str, float]]:
    """One image's (H, W) anomaly map on its input of `size`, searched exhaustively where it matters.

    Args:
        query: the image's features {layer: (C, h, w)}.
        galleries: {layer: gallery of its nearest normal images}, on the device the search runs on.
        windows: {layer: (features, image rows)} of the gallery images whose windows bound it
            (`window_bounds`).
        kappa: neighbours averaged.
        size: (H, W) of the network input.
        combine: `combine_layers`' settings: {"combine", "sigma", "layer_scales"}.
        threshold: the pixel threshold in force.
        score: `map_score`'s settings: {"margin", "top"}.
        roi: (H, W) bool inspection region of the input, or None.

    Returns:
        The map, and per layer the share of its cells searched exhaustively.
    """
    distances, searched = {}, {}
    device = next(iter(query.values())).device  # the search's; the bounds and the map live on the host
    for name, fmap in query.items():
        c, h, w = fmap.shape
        features, rows = windows[name]
        bound = window_bounds(fmap, features.to(device), rows, kappa) if h * w >= MIN_CELLS else None
        bound = None if bound is None else bound.cpu()
        searched[name] = torch.zeros(h * w, dtype=torch.bool)
        if bound is None:  # a small layer, or nothing to bound it with: search it whole
            bound = torch.empty(h * w)
            searched[name][:] = True
            bound[:] = _search(fmap, galleries[name], searched[name], kappa)
        distances[name] = bound.view(1, 1, h, w)
    scored = scored_pixels(size, score["margin"], roi)
    exact = np.zeros(size, dtype=bool)  # pixels whose every cell has been searched
    for rounds in range(MAX_ROUNDS + 2):
        input_map = combine_layers(distances, size, **combine)
        reported = _reported(input_map, threshold, scored, score["top"], exact if rounds >= SETTLE else None)
        cells = _cells(reported, combine["sigma"], query)
        todo = {name: (cells[name] if rounds < MAX_ROUNDS else True) & ~searched[name] for name in query}
        if not any(bool(t.any()) for t in todo.values()):
            break
        for name, cells_todo in todo.items():
            if cells_todo.any():
                distances[name].view(-1)[cells_todo] = _search(query[name], galleries[name], cells_todo, kappa)
                searched[name] |= cells_todo
        exact |= reported
    return input_map, {name: float(s.float().mean()) for name, s in searched.items()}


def _search(fmap: torch.Tensor, gallery: PixelGallery, cells: torch.Tensor, kappa: int) -> torch.Tensor:
    """Exhaustive kNN distances of the (h * w,) bool `cells` of `fmap` (C, h, w)."""
    c = fmap.shape[0]
    pixels = fmap.float().permute(1, 2, 0).reshape(-1, c)[cells.to(fmap.device)]
    return pixel_knn(pixels, gallery, kappa).cpu()


def _reported(
    input_map: np.ndarray, threshold: float, scored: np.ndarray, top: float, exact: np.ndarray | None
) -> np.ndarray:
    """(H, W) bool: the pixels that could reach the threshold or the map score's top share, judged on
    `input_map`, an upper bound of the exact map.

    Without `exact`, the top share is the bound map's own top n pixels. With it, the (H, W) bool
    pixels where the map is exact: the top share's n pixels score at least the n-th highest exact
    value known (when n are known), so every pixel whose bound reaches that could be among them."""
    values = input_map[scored]
    n = max(1, round(top * values.size))
    known = input_map[scored & exact] if exact is not None else values[:0]
    level_map = known if known.size >= n else values
    level = np.partition(level_map, level_map.size - n)[level_map.size - n]
    return (input_map >= threshold) | (scored & (input_map >= level))


def _cells(pixels: np.ndarray, sigma: float, query: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Per layer, the (h * w,) bool cells whose distances reach the (H, W) `pixels`: each layer's
    cells under those pixels, grown by the Gaussian's support (scipy's radius, 4 sigma) and one
    pixel for the resize to the image, in cells, and by the bilinear neighbour on either side."""
    radius = (int(4 * sigma + 0.5) if sigma > 0 else 0) + 1
    mask = torch.from_numpy(pixels).float()[None, None]
    out = {}
    for name, fmap in query.items():
        h, w = fmap.shape[1:]
        grow = tuple(math.ceil(radius * side / full) + 1 for side, full in zip((h, w), pixels.shape))
        under = F.adaptive_max_pool2d(mask, (h, w))
        grown = F.max_pool2d(under, (2 * grow[0] + 1, 2 * grow[1] + 1), stride=1, padding=grow)
        out[name] = grown.view(-1) > 0
    return out
